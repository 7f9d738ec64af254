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
pub mod wal;

use crate::error::RelayError;
use crate::event::{Position, SourceEvent};
use pg_outbox_envelope::record::RecordKey;
use pg_outbox_envelope::AUTH_KEY_LEN;
use std::time::Duration;
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
    /// Signs every record the relay writes and verifies what the restart dedup reads back.
    pub key: RecordKey,
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
        auth_key: &[u8; AUTH_KEY_LEN],
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
        Ok(Identity {
            name: format!(
                "{source_id}/{system}.{database}.{}",
                incarnation.replace('-', "")
            ),
            source: source.to_string(),
            key: RecordKey::derive(auth_key),
            ceiling: Position::new(ceiling, 0),
            recover,
        })
    }
}

/// The database's sealing key: `outbox.enqueue` seals wal-mode messages with it, and the record key
/// is derived from it (the relay's role needs EXECUTE on `outbox.relay_auth_key()`, which
/// `outbox_relay` has).
pub async fn auth_key(pg: &Client) -> Result<[u8; AUTH_KEY_LEN], RelayError> {
    let key: Vec<u8> = pg
        .query_one("SELECT outbox.relay_auth_key()", &[])
        .await
        .map_err(|e| match e.code().map(|c| c.code()) {
            // permission denied, no such function: retrying cannot help
            Some("42501") | Some("42883") => RelayError::permanent(
                "cannot read the sealing key with outbox.relay_auth_key(): grant outbox_relay to \
                 the relay's role (pg_user), or update the pg_outbox extension",
            )
            .caused_by(e),
            _ => RelayError::from(e),
        })?
        .get(0);
    key.try_into()
        .map_err(|_| RelayError::permanent("outbox.relay_auth_key() did not return 32 bytes"))
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
