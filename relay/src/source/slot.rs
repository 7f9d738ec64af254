//! The replication slot as the relay, `check` and `status` see it, and what stops the relay.
//!
//! Once a slot has existed for a database (a row `slot:<name>` in `outbox.sources`), it is never
//! created again without the operator: a slot that was dropped or invalidated (`wal_status =
//! lost`) may have taken committed events with it, so the relay stops with the WAL range that may
//! be lost and the way out (`outbox.recreate_slot`, which records the gap in `outbox.gaps`). The
//! text comes from the extension (`outbox._slot_lost`), so SQL, the relay, `check` and `status`
//! say the same.

use crate::error::RelayError;
use tokio_postgres::Client;

/// What the database says about the slot and its publication.
#[derive(Debug, Clone)]
pub struct SlotState {
    pub name: String,
    /// `database/plugin/wal_status` when the slot exists.
    pub slot: Option<(Option<String>, Option<String>, Option<String>)>,
    pub publication: bool,
    /// The slot is remembered in `outbox.sources`: it existed once.
    pub known: bool,
    /// `outbox.sources` exists (an extension of this version or later).
    pub tracked: bool,
}

impl SlotState {
    pub async fn read(pg: &Client, name: &str) -> Result<SlotState, RelayError> {
        let tracked: bool = pg
            .query_one(
                "SELECT pg_catalog.to_regclass('outbox.sources') IS NOT NULL",
                &[],
            )
            .await?
            .get(0);
        let known = if tracked {
            pg.query_one(
                "SELECT EXISTS (SELECT FROM outbox.sources WHERE source = 'slot:' || $1)",
                &[&name],
            )
            .await?
            .get(0)
        } else {
            false
        };
        let slot = pg
            .query_opt(
                "SELECT database::text, plugin::text, wal_status FROM pg_catalog.pg_replication_slots \
                  WHERE slot_name = $1",
                &[&name],
            )
            .await?
            .map(|r| (r.get(0), r.get(1), r.get(2)));
        let publication = pg
            .query_opt(
                "SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = $1",
                &[&name],
            )
            .await?
            .is_some();
        Ok(SlotState {
            name: name.to_string(),
            slot,
            publication,
            known,
            tracked,
        })
    }

    /// What keeps the relay from streaming out of `database`, if anything. A missing slot that
    /// never existed is a problem only if the relay may not create it (`create_allowed`).
    pub async fn problem(
        &self,
        pg: &Client,
        database: &str,
        create_allowed: bool,
    ) -> Result<Option<String>, RelayError> {
        let name = &self.name;
        let lost = match &self.slot {
            None if self.known => Some("was dropped"),
            None if create_allowed => return Ok(None),
            None => {
                return Ok(Some(format!(
                    "replication slot \"{name}\" does not exist and create_slot is off: \
                     CALL outbox.setup('{name}'), or set create_slot = true"
                )))
            }
            Some((db, plugin, _))
                if db.as_deref() != Some(database) || plugin.as_deref() != Some("pgoutput") =>
            {
                return Ok(Some(format!(
                    "slot \"{name}\" is not a pgoutput slot of database \"{database}\"; set slot \
                     (PG_OUTBOX_SLOT) to the pg_outbox slot"
                )))
            }
            Some((_, _, status)) if status.as_deref() == Some("lost") => {
                Some("was invalidated (wal_status = lost)")
            }
            Some(_) if !self.publication => {
                return Ok(Some(format!(
                    "publication \"{name}\" does not exist but slot \"{name}\" does: pgoutput \
                     cannot decode transactions older than the publication. Drop the slot, then \
                     CALL outbox.setup('{name}')"
                )))
            }
            Some(_) => None,
        };
        let Some(what) = lost else {
            return Ok(None);
        };
        if !self.tracked {
            return Ok(Some(format!(
                "replication slot \"{name}\" {what}: events it retained may be lost. The pg_outbox \
                 extension predates this relay (no outbox.sources): install the matching version"
            )));
        }
        // the extension words it (range and way out), and raises it as an error
        match pg
            .execute("SELECT outbox._slot_lost($1, $2)", &[&name, &what])
            .await
        {
            Err(e) => match e.as_db_error() {
                Some(db) => Ok(Some(match db.hint() {
                    Some(hint) => format!("{} {hint}", db.message()),
                    None => db.message().to_string(),
                })),
                None => Err(e.into()),
            },
            Ok(_) => Ok(Some(format!("replication slot \"{name}\" {what}"))),
        }
    }
}
