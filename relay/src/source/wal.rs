//! The WAL source: pg_outbox messages from a logical replication slot (pgoutput), in commit order.
//!
//! A position is (commit LSN of the transaction, index of the message in it). A unit is one
//! transaction, closed by its end LSN, which the pipeline's checkpoint hands back to
//! [`WalSource::confirm`] once the transaction and every earlier one are fully acknowledged. With
//! no transaction open, a keepalive's position is handed over as [`Step::Idle`], so activity
//! elsewhere in the database never makes the slot retain WAL without bound.
//!
//! Only messages sealed by `outbox.enqueue` in the transaction that carries them are events: the
//! key is read once per session (`outbox.relay_auth_key()`), and a message that does not verify
//! (written with `pg_logical_emit_message` by any role, or copied from another transaction) is
//! handed over as [`Body::Unproven`], without its bytes: counted, never published, never stored.

use crate::config::Config;
use crate::error::RelayError;
use crate::event::{Body, Position, SourceEvent};
use crate::postgres;
use crate::source::slot::SlotState;
use crate::source::{Identity, Source, Step};
use crate::telemetry::Metrics;
use futures_util::FutureExt;
use pg_outbox_envelope::{AUTH_KEY_LEN, MESSAGE_PREFIX};
use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::Client;
use tracing::info;

/// PostgreSQL timestamps count from 2000-01-01; Unix µs from 1970-01-01.
const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// How often the slot's confirmed position is recorded in `outbox.sources`.
const REMEMBER_EVERY: Duration = Duration::from_secs(10);

/// How long a clean stop waits for the replication client to send the last confirmed position
/// (it sends one every status interval, 500 ms).
const FINAL_FEEDBACK_WAIT: Duration = Duration::from_secs(2);

/// Events handed over per call at most, so that acknowledgements are taken in between.
const MAX_BATCH: usize = 1024;

/// Bounds of the replication client's buffer of decoded messages (see [`buffered_messages`]).
const MIN_BUFFERED: usize = 16;
const MAX_BUFFERED: usize = 8192;

/// How many decoded messages the replication client may buffer ahead of the pipeline.
/// pgwire-replication counts its buffer in messages, not bytes, so the count is derived from a
/// byte budget (`max_in_flight_bytes`, the same as for records in flight) and the largest message
/// the relay publishes (`max_record_bytes`): 8,192 messages of 1 MB each would be 8 GB. With the
/// defaults (32 MiB, 1 MB) that is 33 messages; records capped at 4 KB keep 8,192.
fn buffered_messages(max_in_flight_bytes: usize, max_record_bytes: usize) -> usize {
    (max_in_flight_bytes / max_record_bytes.max(1)).clamp(MIN_BUFFERED, MAX_BUFFERED)
}

pub struct WalSource {
    repl: ReplicationClient,
    /// For recording the confirmed position now and then (see [`remember_confirmed`]).
    pg: Client,
    slot: String,
    remembered: Instant,
    /// The last position this session confirmed (0: none yet).
    confirmed: u64,
    identity: Identity,
    metrics: Arc<Metrics>,
    /// The key every message must be sealed with.
    key: [u8; AUTH_KEY_LEN],
    /// A full transaction id of the server, read at the start and now and then: what a Begin's 32-bit
    /// xid is widened against, for the seal that binds the full id ([`pg_outbox_envelope::widen_xid`]).
    next_xid: u64,
    /// The transaction being received.
    current: Option<Txn>,
    /// The server's wal_sender_timeout for this connection: how long after this relay's last word
    /// another relay can take the slot.
    sender_timeout: Option<Duration>,
}

/// The transaction being received: its id, commit LSN and time, next event index.
struct Txn {
    xid: u32,
    commit_lsn: u64,
    /// Unix µs.
    commit_time: i64,
    index: u64,
}

/// The server's next full transaction id (epoch and xid), assigning none.
async fn next_full_xid(pg: &Client) -> Result<u64, RelayError> {
    let next: i64 = pg
        .query_one(
            "SELECT pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot())::text::bigint",
            &[],
        )
        .await?
        .get(0);
    Ok(next as u64)
}

/// Which relay streams from `slot` (see [`postgres::HOLDER_SQL`]), if any.
pub async fn slot_holder(pg: &Client, slot: &str) -> Result<Option<String>, RelayError> {
    let sql = format!(
        "SELECT {} FROM pg_catalog.pg_replication_slots s \
           JOIN pg_catalog.pg_stat_activity a ON a.pid = s.active_pid \
         WHERE s.slot_name = $1 AND s.active",
        postgres::HOLDER_SQL
    );
    Ok(pg.query_opt(&sql, &[&slot]).await?.map(|r| r.get(0)))
}

impl WalSource {
    /// Makes sure the slot can be streamed (creating it only if allowed and `first` is the first
    /// session of the process), then starts streaming from its confirmed position.
    pub async fn open(
        config: &Config,
        first: &mut bool,
        metrics: Arc<Metrics>,
    ) -> Result<WalSource, RelayError> {
        // the replication connection goes to the server that took this session: the primary
        let (pg, at) = postgres::connect_at(&config.postgres).await?;
        // a standby waits here while another relay streams from the slot
        if let Some(holder) = slot_holder(&pg, &config.source.slot).await? {
            return Err(RelayError::standby(format!(
                "slot \"{}\" is streamed by {holder}",
                config.source.slot
            )));
        }
        prepare_slot(&pg, config, *first).await?;
        let key = super::auth_key(&pg).await?;
        let next_xid = next_full_xid(&pg).await?;
        // in ms; 0 turns the timeout off (the slot is then held until the connection closes)
        let sender_timeout: i64 = pg
            .query_one(
                "SELECT setting::bigint FROM pg_catalog.pg_settings WHERE name = 'wal_sender_timeout'",
                &[],
            )
            .await?
            .get(0);
        let sender_timeout =
            (sender_timeout > 0).then(|| Duration::from_millis(sender_timeout as u64));
        let slot = &config.source.slot;
        let identity = Identity::read(
            &pg,
            &config.source.source_id,
            &format!("slot:{slot}"),
            "pg_current_wal_insert_lsn()",
            format!(
                "SELECT * FROM outbox.recreate_slot('<why>', '{slot}') to go on under a new \
                 incarnation (the slot is kept)"
            ),
            &key,
        )
        .await?;
        info!(source = %identity.name, "source identity");
        // from now on a missing slot means it disappeared, never that it is still to be created
        *first = false;
        let p = &config.postgres;
        let repl_config = ReplicationConfig::new(
            at.host.clone(),
            p.user.clone(),
            at.password.clone(),
            p.database.clone(),
            slot.clone(),
            slot.clone(),
        )
        .with_port(at.port)
        .with_tls(p.tls.replication())
        .with_start_lsn(Lsn::ZERO)
        .with_status_interval(Duration::from_millis(500))
        .with_buffer_size(buffered_messages(
            config.source.max_in_flight_bytes,
            config.kafka.max_record_bytes,
        ))
        .with_application_name(postgres::application_name());
        let repl_config = match &p.options {
            // the user's `options` (pg_url); the relay's session settings do not apply to a
            // replication connection, which runs no SQL of the relay's
            Some(options) => repl_config.with_options(options.clone()),
            None => repl_config,
        };
        let mut repl = ReplicationClient::connect(repl_config).await?;
        repl.wait_started().await?;
        info!(slot = %slot, "streaming from slot");
        Ok(WalSource {
            repl,
            pg,
            slot: slot.clone(),
            remembered: Instant::now(),
            confirmed: 0,
            identity,
            metrics,
            key,
            next_xid,
            current: None,
            sender_timeout,
        })
    }

    /// Turns one replication message into steps; returns whether it was an event.
    fn take(
        &mut self,
        event: ReplicationEvent,
        out: &mut Vec<Step<u64>>,
    ) -> Result<bool, RelayError> {
        match event {
            ReplicationEvent::Begin {
                final_lsn,
                xid,
                commit_time_micros,
            } => {
                self.current = Some(Txn {
                    xid,
                    commit_lsn: final_lsn.as_u64(),
                    commit_time: commit_time_micros + PG_EPOCH_UNIX_MICROS,
                    index: 0,
                });
            }
            ReplicationEvent::Message {
                transactional,
                prefix,
                content,
                lsn,
            } if prefix == MESSAGE_PREFIX => {
                // outbox.enqueue writes transactional messages only, decoded inside their
                // transaction; pgoutput sends a non-transactional one on its own
                let event = match self.current.as_mut().filter(|_| transactional) {
                    Some(txn) => {
                        let position = Position::new(txn.commit_lsn, txn.index);
                        txn.index += 1;
                        let xid = pg_outbox_envelope::widen_xid(self.next_xid, txn.xid);
                        let body = match pg_outbox_envelope::open(&content, &self.key, xid) {
                            Ok(envelope) => Body::Envelope(content.slice(..envelope.len())),
                            Err(e) => Body::Unproven {
                                reason: e.to_string(),
                            },
                        };
                        SourceEvent {
                            position,
                            since_micros: txn.commit_time,
                            body,
                        }
                    }
                    // not written by outbox.enqueue (which is always transactional): nothing
                    // ties it to a commit
                    None => SourceEvent {
                        position: Position::new(lsn.as_u64(), 0),
                        since_micros: 0,
                        body: Body::Unproven {
                            reason: format!(
                                "non-transactional pg_outbox message (transactional = {transactional})"
                            ),
                        },
                    },
                };
                out.push(Step::Event(event));
                return Ok(true);
            }
            ReplicationEvent::Message { .. } | ReplicationEvent::XLogData { .. } => {}
            ReplicationEvent::Commit { end_lsn, .. } => {
                if self.current.take().is_some() {
                    out.push(Step::Close(end_lsn.as_u64()));
                }
            }
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                // everything before wal_end was received; only outside a transaction is it complete
                if self.current.is_none() {
                    out.push(Step::Idle(wal_end.as_u64()));
                }
            }
            ReplicationEvent::StoppedAt { .. } => {
                return Err(RelayError::transient("replication stream stopped"))
            }
        }
        Ok(false)
    }
}

/// Makes sure the slot can stream, creating it (publication first, committed, then the slot) only
/// if it never existed, creation is allowed, and this is the first session of the process. A slot
/// that existed once and is gone or invalidated stops the relay (see [`super::slot`]); one made
/// by hand is adopted. Records the slot's confirmed position as the last one known.
async fn prepare_slot(pg: &Client, config: &Config, first: bool) -> Result<(), RelayError> {
    let slot = config.source.slot.as_str();
    let state = SlotState::read(pg, slot).await?;
    if !state.tracked {
        return Err(super::extension_predates_relay(&config.postgres.database));
    }
    let create = config.source.create_slot && first;
    if let Some(problem) = state.problem(pg, &config.postgres.database, create).await? {
        return Err(RelayError::permanent(problem));
    }
    if state.slot.is_none() || !state.known {
        // create (a slot that never existed) or adopt (one made by hand or an earlier version)
        let steps: &[&str] = if state.slot.is_none() {
            // two statements, two transactions: the publication must commit before the slot exists
            &["outbox.create_publication", "outbox.create_slot"]
        } else {
            &["outbox.create_slot"]
        };
        for step in steps {
            let sql = format!("SELECT object, name, action FROM {step}($1)");
            for r in pg.query(&sql, &[&slot]).await? {
                let (object, name, action): (String, String, String) =
                    (r.get(0), r.get(1), r.get(2));
                info!(%object, %name, %action, "setup");
            }
        }
    }
    remember_confirmed(pg, slot).await
}

/// Records the slot's confirmed position in `outbox.sources`: should the slot be lost, what may be
/// lost starts there.
async fn remember_confirmed(pg: &Client, slot: &str) -> Result<(), RelayError> {
    pg.execute(
        "UPDATE outbox.sources o SET seen_lsn = s.confirmed_flush_lsn, seen_at = pg_catalog.now() \
           FROM pg_catalog.pg_replication_slots s \
          WHERE o.source = 'slot:' || $1 AND s.slot_name = $1 AND s.confirmed_flush_lsn IS NOT NULL",
        &[&slot],
    )
    .await?;
    Ok(())
}

impl Source for WalSource {
    type Ack = u64;

    async fn next(&mut self, room: usize, out: &mut Vec<Step<u64>>) -> Result<(), RelayError> {
        // the first message is awaited (cancel-safe: a channel receive); the rest of the batch is
        // only what already arrived
        let Some(first) = self.repl.recv().await? else {
            return Err(RelayError::transient("replication stream ended"));
        };
        let room = room.min(MAX_BATCH);
        let mut events = usize::from(self.take(first, out)?);
        while events < room {
            match self.repl.recv().now_or_never() {
                Some(Ok(Some(event))) => events += usize::from(self.take(event, out)?),
                Some(Ok(None)) => return Err(RelayError::transient("replication stream ended")),
                Some(Err(e)) => return Err(e.into()),
                None => break,
            }
        }
        Ok(())
    }

    async fn confirm(&mut self, lsn: u64) -> Result<(), RelayError> {
        self.repl.update_applied_lsn(Lsn(lsn));
        self.confirmed = self.confirmed.max(lsn);
        self.metrics.confirmed_lsn.store(lsn, Ordering::Relaxed);
        if self.remembered.elapsed() >= REMEMBER_EVERY {
            // what the server has confirmed (it lags the update above by a status interval)
            self.remembered = Instant::now();
            remember_confirmed(&self.pg, &self.slot).await?;
            self.next_xid = next_full_xid(&self.pg).await?;
        }
        Ok(())
    }

    fn replaced_after(&self) -> Option<Duration> {
        self.sender_timeout
    }

    fn identity(&self) -> &Identity {
        &self.identity
    }

    async fn close(&mut self) -> Result<(), RelayError> {
        // The replication client sends its applied position every status interval and, on stop,
        // only CopyDone: wait until the server has the last confirmation, so that the next session
        // does not replay (and read Kafka back for) what this one confirmed.
        let deadline = Instant::now() + FINAL_FEEDBACK_WAIT;
        while self.repl.metrics().last_applied_lsn().as_u64() < self.confirmed
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.repl.shutdown().await?;
        info!(
            confirmed_lsn = %Lsn(self.metrics.confirmed_lsn.load(Ordering::Relaxed)),
            "stopped cleanly"
        );
        Ok(())
    }
}

impl Drop for WalSource {
    fn drop(&mut self) {
        // a session that failed releases the slot at once, for the next session or a standby
        self.repl.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_buffer_is_bounded_in_bytes() {
        // the defaults: 32 MiB over records of up to 1 MB
        assert_eq!(buffered_messages(32 << 20, 1_000_000), 33);
        // 200 events of 1 MB used to sit in a buffer of 8,192 messages (184 MB of RSS)
        assert!(buffered_messages(32 << 20, 1_100_000) * 1_100_000 <= 32 << 20);
        assert_eq!(buffered_messages(32 << 20, 1024), MAX_BUFFERED);
        assert_eq!(buffered_messages(1 << 20, 100 << 20), MIN_BUFFERED);
    }
}
