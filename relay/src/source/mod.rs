//! Where events come from: the [`Source`] seam, implemented by the WAL ([`wal`],
//! `pg_outbox.mode = wal`), the `outbox.events` table ([`poll`], `pg_outbox.mode = table`) and, for
//! unit tests, memory ([`memory`]).
//!
//! A source never calls the pipeline or the sink: it hands over [`Step`]s in its publishing order
//! and is told, through [`Source::confirm`], what it may make durable (the slot position, the rows
//! to delete). What may be confirmed is decided in one place, [`crate::checkpoint`].

#[cfg(test)]
pub mod memory;
pub mod poll;
pub mod slot;
pub mod stream;
pub mod wal;

use crate::error::RelayError;
use crate::event::{Position, SourceEvent};
use pg_outbox_envelope::record::RecordFields;
use pg_outbox_envelope::record::RecordKey;
use pg_outbox_envelope::AUTH_KEY_LEN;
use std::time::{Duration, Instant};
use tokio_postgres::Client;

/// Who the events of a source belong to, as written into every record (`pg_outbox-source`) and
/// compared by the restart dedup: `<source_id>/<system identifier>.<database oid>.<incarnation>`.
/// Records of another cluster, another database or an earlier incarnation of the slot (or poll
/// source) never match, so they never make the relay skip an event.
///
/// The name is public (every record carries it); what proves a record is this relay's is its
/// `pg_outbox-mac` under [`Identity::key`], derived from the database's sealing key, which only the
/// relay's role (and the extension) can read.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    pub name: String,
    /// Its row in `outbox.sources`: `slot:<name>` or `poll:<source_id>`.
    pub source: String,
    /// Signs every record the relay writes and verifies what the restart dedup reads back: derived
    /// from the newest sealing key.
    pub key: RecordKey,
    /// Derived from the older sealing keys not yet retired: records signed before a rotation still
    /// count as this relay's.
    pub older_keys: Vec<RecordKey>,
    /// Above every position the database has committed when the session opened: a record of this
    /// identity at or beyond it means the database went back in time (a point-in-time recovery),
    /// and skipping by it would lose events.
    pub ceiling: Position,
    /// What the operator does then.
    pub recover: String,
}

impl Identity {
    /// Reads the identity of `source` (a row of `outbox.sources`: `slot:<name>` or
    /// `poll:<source_id>`), with `ceiling_sql` giving the ceiling's major part.
    pub async fn read(
        pg: &Client,
        source_id: &str,
        source: &str,
        ceiling_sql: &str,
        recover: String,
        keys: &SealKeys,
    ) -> Result<Identity, RelayError> {
        let sql = format!(
            "SELECT (SELECT system_identifier FROM pg_catalog.pg_control_system())::text, \
                    (SELECT oid FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database())::text, \
                    o.incarnation::text, ({ceiling_sql})::text, o.stopped, o.stopped_at::text \
               FROM outbox.sources o WHERE o.source = $1"
        );
        let row = pg.query_opt(&sql, &[&source]).await?.ok_or_else(|| {
            RelayError::permanent(format!(
                "outbox.sources has no row for {source:?}: update the pg_outbox extension"
            ))
        })?;
        let (system, database, incarnation, ceiling): (String, String, String, String) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        if let Some(why) = row.get::<_, Option<String>>(4) {
            let at: Option<String> = row.get(5);
            return Err(RelayError::permanent(format!(
                "source {source:?} was stopped at {}: {why}. This incarnation stays stopped \
                 whatever the database does since; {recover}",
                at.as_deref().unwrap_or("?")
            )));
        }
        let ceiling = parse_major(&ceiling).ok_or_else(|| {
            RelayError::permanent(format!("unexpected ceiling {ceiling:?} for {source:?}"))
        })?;
        // what outbox.retire_auth_key waits for: this source's records are signed with the newest key
        pg.execute(
            "UPDATE outbox.sources SET signing_key_id = $2 WHERE source = $1",
            &[&source, &i32::from(keys.newest)],
        )
        .await?;
        Ok(Identity {
            name: format!(
                "{source_id}/{system}.{database}.{}",
                incarnation.replace('-', "")
            ),
            source: source.to_string(),
            key: RecordKey::derive(keys.newest_key()),
            older_keys: keys
                .keys
                .iter()
                .filter(|(id, _)| *id != keys.newest)
                .map(|(_, key)| RecordKey::derive(key))
                .collect(),
            ceiling: Position::new(ceiling, 0),
            recover,
        })
    }
}

impl Identity {
    /// Whether `mac` is this source's for `fields`, under the newest key or an older one.
    pub fn verifies(&self, fields: &RecordFields<'_>, mac: &[u8]) -> bool {
        self.key.verify(fields, mac) || self.older_keys.iter().any(|k| k.verify(fields, mac))
    }
}

/// The database's sealing keys (`outbox.auth_key`, by id): `outbox.enqueue` seals wal-mode messages
/// with the newest, and the record key is derived from it; a message sealed with an older key not
/// yet retired still opens. The relay's role needs EXECUTE on `outbox.relay_auth_keys()`, which
/// `outbox_relay` has.
#[derive(Clone)]
pub struct SealKeys {
    pub newest: u16,
    keys: Vec<(u16, [u8; AUTH_KEY_LEN])>,
}

/// How often a session checks that the sealing keys did not change (a rotation or a retirement):
/// a changed set ends the session, and the next one works with the new set. A retired key is
/// refused by a running relay this long after `outbox.retire_auth_key` returns, at most.
pub const KEYS_CHECK_EVERY: Duration = Duration::from_secs(5);

impl SealKeys {
    pub async fn read(pg: &Client) -> Result<SealKeys, RelayError> {
        let rows = pg
            .query("SELECT key_id, key FROM outbox.relay_auth_keys()", &[])
            .await
            .map_err(|e| match e.code().map(|c| c.code()) {
                // permission denied, no such function: retrying cannot help
                Some("42501") | Some("42883") => RelayError::permanent(
                    "cannot read the sealing keys with outbox.relay_auth_keys(): grant \
                     outbox_relay to the relay's role (pg_user), or update the pg_outbox extension",
                )
                .caused_by(e),
                _ => RelayError::from(e),
            })?;
        let mut keys = Vec::with_capacity(rows.len());
        for row in rows {
            let (id, key): (i32, Vec<u8>) = (row.get(0), row.get(1));
            let id = u16::try_from(id).map_err(|_| {
                RelayError::permanent(format!("outbox.relay_auth_keys() gave key id {id}"))
            })?;
            let key = key.try_into().map_err(|_| {
                RelayError::permanent("outbox.relay_auth_keys() gave a key that is not 32 bytes")
            })?;
            keys.push((id, key));
        }
        let newest = keys
            .iter()
            .map(|(id, _)| *id)
            .max()
            .ok_or_else(|| RelayError::permanent("outbox.auth_key holds no sealing key"))?;
        Ok(SealKeys { newest, keys })
    }

    pub fn get(&self, id: u16) -> Option<&[u8; AUTH_KEY_LEN]> {
        self.keys.iter().find(|(i, _)| *i == id).map(|(_, k)| k)
    }

    pub fn newest_key(&self) -> &[u8; AUTH_KEY_LEN] {
        self.get(self.newest).expect("the newest is one of them")
    }

    fn ids(&self) -> Vec<i32> {
        self.keys.iter().map(|(id, _)| i32::from(*id)).collect()
    }
}

/// Ends the session when the set of sealing keys changed, checked every [`KEYS_CHECK_EVERY`].
pub struct KeyWatch {
    ids: Vec<i32>,
    checked: Instant,
}

impl KeyWatch {
    pub fn new(keys: &SealKeys) -> KeyWatch {
        KeyWatch {
            ids: keys.ids(),
            checked: Instant::now(),
        }
    }

    /// Checks at most every [`KEYS_CHECK_EVERY`].
    pub async fn check(&mut self, pg: &Client) -> Result<(), RelayError> {
        if self.checked.elapsed() < KEYS_CHECK_EVERY {
            return Ok(());
        }
        self.checked = Instant::now();
        self.check_now(pg).await
    }

    /// Checks at once: when a message may be sealed with a key this session does not have.
    pub async fn check_now(&self, pg: &Client) -> Result<(), RelayError> {
        let ids: Vec<i32> = pg
            .query_one(
                "SELECT coalesce(array_agg(key_id ORDER BY key_id), '{}') FROM outbox.relay_auth_keys()",
                &[],
            )
            .await?
            .get(0);
        if ids != self.ids {
            return Err(RelayError::transient(format!(
                "the sealing keys changed (ids {:?}, were {:?}): a new session works with them",
                ids, self.ids
            )));
        }
        Ok(())
    }
}

/// The extension in `database` has no `outbox.sources`: it is older than this relay.
pub fn extension_predates_relay(database: &str) -> RelayError {
    RelayError::permanent(format!(
        "the pg_outbox extension in database \"{database}\" predates this relay (no \
         outbox.sources): install the matching version"
    ))
}

/// An LSN (`16/B374D848`) or a transaction id (decimal) as a number.
fn parse_major(text: &str) -> Option<u64> {
    match text.split_once('/') {
        Some((hi, lo)) => {
            Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
        }
        None => text.parse().ok(),
    }
}

/// What a source hands over, in order.
#[derive(Debug, Clone)]
pub enum Step<A> {
    /// An event of the open unit (a WAL transaction, a poll batch).
    Event(SourceEvent),
    /// The open unit ends; `A` may be confirmed once all of it and everything before is done.
    Close(A),
    /// Nothing is open or buffered before `A`: with nothing pending, `A` may be confirmed as it is.
    Idle(A),
}

#[allow(async_fn_in_trait)]
pub trait Source {
    /// What the source makes durable: an LSN, the last (xid, seq) of a poll batch.
    type Ack: Copy + std::fmt::Debug;

    /// Waits until there is something, then appends steps holding at most `room` events to `out`.
    /// Cancel-safe: dropped before it returns, it loses nothing.
    async fn next(&mut self, room: usize, out: &mut Vec<Step<Self::Ack>>)
        -> Result<(), RelayError>;

    /// Everything up to `ack` is in Kafka (or dead-lettered): make it durable.
    async fn confirm(&mut self, ack: Self::Ack) -> Result<(), RelayError>;

    /// Whose events these are: what the dedup matches in Kafka.
    fn identity(&self) -> &Identity;

    /// After how long without a word from this relay the server lets another relay take the source
    /// (wal: `wal_sender_timeout`); None when that is not known.
    fn replaced_after(&self) -> Option<Duration> {
        None
    }

    /// A pause of the whole relay this long means it may have been replaced (see fence.rs).
    fn pause_limit(&self) -> Duration {
        self.replaced_after()
            .map_or(Duration::from_secs(10), |after| after / 2)
    }

    /// Graceful end of the session, after the last confirmation.
    async fn close(&mut self) -> Result<(), RelayError>;

    /// Whether the session that held the source before this one stopped cleanly (everything it sent
    /// was acknowledged): then none of its produce requests can still land, and no restart grace is
    /// needed before reading Kafka back.
    fn predecessor_stopped_cleanly(&self) -> bool {
        false
    }

    /// Everything this session sent is acknowledged and it stops: records so for the next session
    /// (only while this session still holds the source).
    async fn stopped_cleanly(&mut self) -> Result<(), RelayError> {
        Ok(())
    }
}

/// A session that now holds `source` (its slot or lock) records a token of its own as the holder;
/// returns it, and whether the previous holder stopped cleanly ([`Source::stopped_cleanly`] wrote
/// its token as the handover). Only the holder of the source writes these columns.
pub async fn hold(pg: &Client, source: &str) -> Result<(String, bool), RelayError> {
    let row = pg
        .query_one(
            "UPDATE outbox.sources o SET holder = pg_catalog.gen_random_uuid(), handover = NULL \
               FROM outbox.sources old \
              WHERE o.source = $1 AND old.source = $1 \
             RETURNING o.holder::text, old.handover IS NOT NULL AND old.handover = old.holder",
            &[&source],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// [`Source::stopped_cleanly`]: the holder's token becomes the handover, if this session still
/// holds the source.
pub async fn hand_over(pg: &Client, source: &str, token: &str) -> Result<(), RelayError> {
    pg.execute(
        "UPDATE outbox.sources SET handover = holder WHERE source = $1 AND holder::text = $2",
        &[&source, &token],
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn lsns_and_xids_parse_as_majors() {
        assert_eq!(super::parse_major("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(super::parse_major("0/0"), Some(0));
        assert_eq!(super::parse_major("745"), Some(745));
        assert_eq!(super::parse_major("x/1"), None);
    }
}
