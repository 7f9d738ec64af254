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
//!
//! No message is read whole if it is larger than any event can be ([`stream_limit`]): anyone may
//! write such a message with `pg_logical_emit_message`. The replication client refuses it before
//! buffering it, which ends the stream; the transaction it belongs to is then read through SQL
//! (`pg_logical_slot_peek_binary_changes`, the slot's rows filtered by transaction id, the big one
//! cut to its first bytes on the server), handed over like a streamed one, the big message as
//! unproven, and streaming resumes after it ([`Feed`]). Memory stays bounded by the limit whatever
//! the size of a message in the slot, and positions are the same in every session.

use crate::config::Config;
use crate::error::RelayError;
use crate::event::{Body, Position, SourceEvent};
use crate::postgres;
use crate::source::slot::SlotState;
use crate::source::stream::Stream;
use crate::source::{Identity, Source, Step};
use crate::telemetry::Metrics;
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use pg_outbox_envelope::{MESSAGE_PREFIX, RECORD_RESERVE};
use pgwire_replication::{Lsn, ReplicationConfig, ReplicationEvent};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::{Client, RowStream};
use tracing::{info, warn};

/// PostgreSQL timestamps count from 2000-01-01; Unix µs from 1970-01-01.
const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// How often the slot's confirmed position is recorded in `outbox.sources`.
const REMEMBER_EVERY: Duration = Duration::from_secs(10);

/// How long a clean stop waits for the replication client to send the last confirmed position
/// (it sends one every status interval, 500 ms).
const FINAL_FEEDBACK_WAIT: Duration = Duration::from_secs(2);

/// Events handed over per call at most, so that acknowledgements are taken in between.
const MAX_BATCH: usize = 1024;

/// Room above the largest record for the envelope's own fields (id, times, topic, the length of
/// each of up to 1,024 headers, the trace context, the seal) and the replication framing.
const STREAM_SLACK: usize = 64 * 1024;

/// How many bytes of a message over the limit the server sends when its transaction is read
/// through SQL: enough for its flags and prefix.
const OVERSIZED_HEAD: i32 = 1024;

/// How long to wait for the server to release the slot after the stream ended on an oversized
/// message.
const RELEASE_WAIT: Duration = Duration::from_secs(30);

/// The largest replication message the relay reads: no event is larger, whatever produced it
/// (`outbox.enqueue` refuses one over `pg_outbox.max_payload_bytes`; the relay dead-letters a record
/// over `max_record_bytes`), so a larger one is never read whole.
fn stream_limit(max_record_bytes: usize, max_payload_bytes: usize) -> usize {
    max_record_bytes
        .max(max_payload_bytes.saturating_add(RECORD_RESERVE))
        .saturating_add(STREAM_SLACK)
}

/// How many bytes of messages the stream reads ahead of the pipeline: a quarter of
/// `max_in_flight_bytes` (8 MiB with the defaults: some 30,000 events of a few hundred bytes, enough
/// to keep the pipeline fed), and at least one message of the largest size read. The pipeline
/// holds up to `max_in_flight_bytes` more in flight.
fn read_ahead_budget(max_in_flight_bytes: usize, limit: usize) -> usize {
    (max_in_flight_bytes / 4).max(limit)
}

/// `pg_outbox.max_payload_bytes` as this session sees it (a size with a unit, as `SHOW` gives it),
/// or the default when it is not set or not understood.
async fn max_payload_bytes(pg: &Client) -> Result<usize, RelayError> {
    let setting: Option<String> = pg
        .query_one(
            "SELECT pg_catalog.current_setting('pg_outbox.max_payload_bytes', true)",
            &[],
        )
        .await?
        .get(0);
    Ok(setting
        .as_deref()
        .and_then(parse_size)
        .unwrap_or(pg_outbox_envelope::DEFAULT_MAX_EVENT_BYTES))
}

/// A PostgreSQL memory size: a number, then optionally B, bytes, kB, MB, GB or TB (powers of 1024).
fn parse_size(text: &str) -> Option<usize> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (n, unit) = text.split_at(split);
    let n: usize = n.parse().ok()?;
    let shift = match unit.trim() {
        "" | "B" | "bytes" => 0,
        "kB" => 10,
        "MB" => 20,
        "GB" => 30,
        "TB" => 40,
        _ => return None,
    };
    n.checked_mul(1usize.checked_shl(shift)?)
}

/// Where the WAL source reads from. Streaming is interrupted only by a message over the limit.
enum Feed {
    /// The slot's replication stream.
    Live(Stream),
    /// A message over the limit ended the stream: read what it belongs to through SQL.
    Oversized,
    /// The rest of the transaction that holds an oversized message, read through SQL.
    Peek {
        /// A connection of its own, so that [`remember_confirmed`] never waits behind the rows.
        _client: Client,
        rows: Pin<Box<RowStream>>,
        /// The index of the next pg_outbox message of the transaction in the rows.
        index: u64,
    },
    /// Everything before `start` was handed over: stream from there.
    Resume { start: u64 },
}

/// One row of `pg_logical_slot_peek_binary_changes` as pgoutput (protocol 1) wrote it.
enum Change {
    Message {
        transactional: bool,
        prefix: Vec<u8>,
        content: Bytes,
        lsn: u64,
        /// The message's whole length, when only its head was read.
        oversized: Option<i64>,
    },
    Commit {
        end_lsn: u64,
    },
    Other,
}

impl Change {
    /// Parses one row; `len` is the row's whole length, `data` all of it or its head.
    fn parse(data: &[u8], len: i64) -> Result<Change, RelayError> {
        let bad = || RelayError::transient("unexpected pgoutput row from the slot");
        let be64 = |b: &[u8]| -> Result<u64, RelayError> {
            Ok(u64::from_be_bytes(b.try_into().map_err(|_| bad())?))
        };
        match data.first() {
            Some(b'M') => {
                let flags = *data.get(1).ok_or_else(bad)?;
                let lsn = be64(data.get(2..10).ok_or_else(bad)?)?;
                let rest = data.get(10..).ok_or_else(bad)?;
                let oversized = (len > data.len() as i64).then_some(len);
                // the head of an oversized message may end inside a long prefix: not ours
                let Some(nul) = rest.iter().position(|&b| b == 0) else {
                    return Ok(Change::Message {
                        transactional: flags & 1 == 1,
                        prefix: Vec::new(),
                        content: Bytes::new(),
                        lsn,
                        oversized: Some(len),
                    });
                };
                let prefix = rest[..nul].to_vec();
                let content = match oversized {
                    Some(_) => Bytes::new(),
                    None => {
                        let body = rest.get(nul + 1 + 4..).ok_or_else(bad)?;
                        Bytes::copy_from_slice(body)
                    }
                };
                Ok(Change::Message {
                    transactional: flags & 1 == 1,
                    prefix,
                    content,
                    lsn,
                    oversized,
                })
            }
            Some(b'C') => Ok(Change::Commit {
                end_lsn: be64(data.get(10..18).ok_or_else(bad)?)?,
            }),
            Some(_) => Ok(Change::Other),
            None => Err(bad()),
        }
    }
}

pub struct WalSource {
    feed: Feed,
    /// Messages taken from the stream and not yet handed over (see `next`).
    stash: Vec<ReplicationEvent>,
    /// This session's token as the slot's holder, and whether the previous holder stopped cleanly
    /// (see [`super::hold`]).
    holder: String,
    predecessor_clean: bool,
    /// How to stream again after an oversized message (the start position is set then).
    repl_config: ReplicationConfig,
    /// For reading an oversized message's transaction through SQL.
    pg_config: crate::postgres::PgConfig,
    /// The largest message read whole ([`stream_limit`]).
    limit: usize,
    /// How many bytes of messages the stream reads ahead ([`read_ahead_budget`]).
    budget: usize,
    /// The highest position handed over in this session: an oversized message is after it.
    seen: u64,
    /// For recording the confirmed position now and then (see [`remember_confirmed`]).
    pg: Client,
    slot: String,
    remembered: Instant,
    /// The last position this session confirmed (0: none yet).
    confirmed: u64,
    identity: Identity,
    metrics: Arc<Metrics>,
    /// The keys a message may be sealed with, by id.
    keys: super::SealKeys,
    /// Ends the session when they change.
    key_watch: super::KeyWatch,
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
        let keys = super::SealKeys::read(&pg).await?;
        let key_watch = super::KeyWatch::new(&keys);
        let next_xid = next_full_xid(&pg).await?;
        let limit = stream_limit(config.kafka.max_record_bytes, max_payload_bytes(&pg).await?);
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
            &keys,
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
        .with_max_message_size(limit)
        .with_application_name(postgres::application_name());
        let repl_config = match &p.options {
            // the user's `options` (pg_url); the relay's session settings do not apply to a
            // replication connection, which runs no SQL of the relay's
            Some(options) => repl_config.with_options(options.clone()),
            None => repl_config,
        };
        let budget = read_ahead_budget(config.source.max_in_flight_bytes, limit);
        let stream = Stream::start(repl_config.clone(), budget).await?;
        info!(slot = %slot, "streaming from slot");
        // the slot is this session's now
        let (holder, predecessor_clean) = super::hold(&pg, &identity.source).await?;
        Ok(WalSource {
            stash: Vec::new(),
            holder,
            predecessor_clean,
            feed: Feed::Live(stream),
            budget,
            repl_config,
            pg_config: config.postgres.clone(),
            limit,
            seen: 0,
            pg,
            slot: slot.clone(),
            remembered: Instant::now(),
            confirmed: 0,
            identity,
            metrics,
            keys,
            key_watch,
            next_xid,
            current: None,
            sender_timeout,
        })
    }

    /// Whether `event` is a pg_outbox message sealed with a key id above this session's newest.
    fn names_a_newer_key(&self, event: &ReplicationEvent) -> bool {
        match event {
            ReplicationEvent::Message {
                transactional: true,
                prefix,
                content,
                ..
            } if prefix == MESSAGE_PREFIX => {
                pg_outbox_envelope::sealed_key_id(content).is_ok_and(|id| id > self.keys.newest)
            }
            _ => false,
        }
    }

    /// The stream refused a message over the limit (before buffering any of it) and ended.
    fn oversized(&mut self, e: &pgwire_replication::PgWireError) {
        warn!(
            error = %e,
            limit = self.limit,
            in_transaction = self.current.is_some(),
            "a message in the slot is larger than any event: reading its transaction through SQL, \
             without it"
        );
        // the stream's task has ended with the error; dropping it releases the slot
        self.feed = Feed::Oversized;
    }

    /// Waits until no session holds the slot (the stream that ended on an oversized message is
    /// released by the server a moment later).
    async fn slot_released(&self, pg: &Client) -> Result<(), RelayError> {
        let deadline = Instant::now() + RELEASE_WAIT;
        loop {
            let active: bool = pg
                .query_opt(
                    "SELECT active FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
                    &[&self.slot],
                )
                .await?
                .is_some_and(|r| r.get(0));
            if !active {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(RelayError::transient(format!(
                    "slot \"{}\" is still active {} s after its stream ended",
                    self.slot,
                    RELEASE_WAIT.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// After the stream ended on an oversized message: in a transaction, starts reading the rest
    /// of it through SQL ([`Feed::Peek`]); outside one (a non-transactional message), finds the
    /// message's position, hands it over as unproven and resumes after it. Returns whether it
    /// handed something over.
    async fn read_oversized(&mut self, out: &mut Vec<Step<u64>>) -> Result<bool, RelayError> {
        let (pg, _) = postgres::connect_at(&self.pg_config).await?;
        self.slot_released(&pg).await?;
        // the keys the transaction may be sealed with exist now: a key this session lacks is a
        // rotation it has not seen, and a new session reads it
        self.key_watch.check_now(&pg).await?;
        let options = "'proto_version', '1', 'publication_names', $2, 'messages', 'true'";
        let limit = i64::try_from(self.limit).unwrap_or(i64::MAX);
        match &self.current {
            Some(txn) => {
                // the rows of this transaction only, up to its commit, the big ones cut on the
                // server: their bytes never reach the relay
                let sql = format!(
                    "SELECT pg_catalog.octet_length(c.data)::int8, \
                            CASE WHEN pg_catalog.octet_length(c.data) <= $3::int8 THEN c.data \
                                 ELSE pg_catalog.substring(c.data, 1, {OVERSIZED_HEAD}) END \
                       FROM pg_catalog.pg_logical_slot_peek_binary_changes($1, $4::text::pg_lsn, \
                            NULL, {options}) c \
                      WHERE c.xid::text = $5"
                );
                let upto = Lsn(txn.commit_lsn + 1).to_string();
                let xid = txn.xid.to_string();
                let params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] =
                    [&self.slot, &self.slot, &limit, &upto, &xid];
                let rows = pg.query_raw(&sql, params).await?;
                self.feed = Feed::Peek {
                    _client: pg,
                    rows: Box::pin(rows),
                    index: 0,
                };
                Ok(false)
            }
            None => {
                let sql = format!(
                    "SELECT c.lsn::text, pg_catalog.octet_length(c.data)::int8 \
                       FROM pg_catalog.pg_logical_slot_peek_binary_changes($1, NULL, NULL, \
                            {options}) c \
                      WHERE c.lsn > $4::text::pg_lsn AND pg_catalog.octet_length(c.data) > $3::int8 \
                      LIMIT 1"
                );
                let seen = Lsn(self.seen).to_string();
                let row = pg
                    .query_opt(&sql, &[&self.slot, &self.slot, &limit, &seen])
                    .await?
                    .ok_or_else(|| {
                        RelayError::transient(
                            "the stream ended on an oversized message that the slot's changes do \
                             not show",
                        )
                    })?;
                let (lsn, len): (String, i64) = (row.get(0), row.get(1));
                let lsn = Lsn::parse(&lsn)
                    .map_err(|e| RelayError::transient(format!("bad LSN {lsn}: {e}")))?
                    .as_u64();
                // a message's position is the end of its record: streaming from there skips it
                let event = self.message(false, Bytes::new(), lsn, Some(len));
                out.push(Step::Event(event));
                self.seen = self.seen.max(lsn);
                self.feed = Feed::Resume { start: lsn };
                Ok(true)
            }
        }
    }

    /// Streams again from `start`, everything before it having been handed over. The server is
    /// told only what the pipeline confirmed (or what it had), never `start` itself.
    async fn resume(&mut self, start: u64) -> Result<(), RelayError> {
        let confirmed: Option<String> = self
            .pg
            .query_opt(
                "SELECT confirmed_flush_lsn::text FROM pg_catalog.pg_replication_slots \
                  WHERE slot_name = $1",
                &[&self.slot],
            )
            .await?
            .and_then(|r| r.get(0));
        let confirmed = confirmed
            .and_then(|c| Lsn::parse(&c).ok())
            .map_or(0, |c| c.as_u64())
            .max(self.confirmed);
        let config = self
            .repl_config
            .clone()
            .with_start_lsn(Lsn(start))
            .with_ack_lsn(Lsn(confirmed));
        let stream = Stream::start(config, self.budget).await?;
        info!(slot = %self.slot, start = %Lsn(start), "streaming from slot again, after the oversized message");
        self.feed = Feed::Live(stream);
        Ok(())
    }

    /// One pg_outbox message (streamed, or read through SQL): an event if it is sealed for the
    /// transaction it is in, else unproven. `oversized`: its length, when it was not read.
    fn message(
        &mut self,
        transactional: bool,
        content: Bytes,
        lsn: u64,
        oversized: Option<i64>,
    ) -> SourceEvent {
        let limit = self.limit;
        let unread = |len: i64| {
            Body::Unproven {
            reason: format!(
                "pg_outbox message of {len} bytes, larger than any event (limit {limit} bytes, from \
                 max_record_bytes and pg_outbox.max_payload_bytes): not read"
            ),
        }
        };
        // outbox.enqueue writes transactional messages only, decoded inside their transaction;
        // pgoutput sends a non-transactional one on its own
        match self.current.as_mut().filter(|_| transactional) {
            Some(txn) => {
                let position = Position::new(txn.commit_lsn, txn.index);
                txn.index += 1;
                let body = match oversized {
                    Some(len) => unread(len),
                    None => {
                        let xid = pg_outbox_envelope::widen_xid(self.next_xid, txn.xid);
                        let opened = pg_outbox_envelope::sealed_key_id(&content)
                            .map_err(|e| e.to_string())
                            .and_then(|id| {
                                self.keys.get(id).ok_or_else(|| {
                                    format!(
                                        "sealed with key id {id}, which this database does not \
                                         have (retired, or never made)"
                                    )
                                })
                            })
                            .and_then(|key| {
                                pg_outbox_envelope::open(&content, key, xid)
                                    .map_err(|e| e.to_string())
                            });
                        match opened {
                            Ok(envelope) => Body::Envelope(content.slice(..envelope.len())),
                            Err(reason) => Body::Unproven { reason },
                        }
                    }
                };
                SourceEvent {
                    position,
                    since_micros: txn.commit_time,
                    body,
                }
            }
            // not written by outbox.enqueue (which is always transactional): nothing ties it to a
            // commit
            None => SourceEvent {
                position: Position::new(lsn, 0),
                since_micros: 0,
                body: match oversized {
                    Some(len) => unread(len),
                    None => Body::Unproven {
                        reason: format!(
                            "non-transactional pg_outbox message (transactional = {transactional})"
                        ),
                    },
                },
            },
        }
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
                self.seen = self.seen.max(lsn.as_u64());
                let event = self.message(transactional, content, lsn.as_u64(), None);
                out.push(Step::Event(event));
                return Ok(true);
            }
            ReplicationEvent::Message { .. } | ReplicationEvent::XLogData { .. } => {}
            ReplicationEvent::Commit { end_lsn, .. } => {
                self.seen = self.seen.max(end_lsn.as_u64());
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
        self.key_watch.check(&self.pg).await?;
        let room = room.min(MAX_BATCH);
        loop {
            match &mut self.feed {
                Feed::Live(repl) => {
                    // The batch is taken into `stash` first (the first message awaited, cancel-
                    // safe: a channel receive; the rest only what already arrived), checked, then
                    // handed over: nothing is awaited once a step is in `out`.
                    let mut ended = None;
                    if self.stash.is_empty() {
                        match repl.recv().await {
                            Ok(Some(first)) => self.stash.push(first),
                            Ok(None) => {
                                return Err(RelayError::transient("replication stream ended"))
                            }
                            Err(e) if e.is_message_too_large() => {
                                self.oversized(&e);
                                continue;
                            }
                            Err(e) => return Err(e.into()),
                        }
                        while self.stash.len() < room {
                            match repl.try_recv() {
                                Some(Ok(Some(event))) => self.stash.push(event),
                                Some(Ok(None)) => {
                                    ended = Some(RelayError::transient("replication stream ended"));
                                    break;
                                }
                                // what arrived before it is handed over first
                                Some(Err(e)) if e.is_message_too_large() => {
                                    self.oversized(&e);
                                    break;
                                }
                                Some(Err(e)) => {
                                    ended = Some(e.into());
                                    break;
                                }
                                None => break,
                            }
                        }
                    }
                    // A message sealed with a key newer than this session's keys: a rotation this
                    // session has not seen yet (the key existed before the message was written,
                    // so the database has it now), or a made-up id. Asked once per batch.
                    if self.stash.iter().any(|e| self.names_a_newer_key(e)) {
                        self.key_watch.check_now(&self.pg).await?;
                    }
                    for event in std::mem::take(&mut self.stash) {
                        self.take(event, out)?;
                    }
                    return match ended {
                        Some(e) => Err(e),
                        None => Ok(()),
                    };
                }
                Feed::Oversized => {
                    if self.read_oversized(out).await? {
                        return Ok(());
                    }
                }
                Feed::Peek { rows, .. } => {
                    // cancel-safe like the stream: the first row is awaited, the rest only taken
                    // if already there
                    let mut next = rows.next().await;
                    let mut events = 0;
                    loop {
                        let Some(row) = next else {
                            return Err(RelayError::transient(
                                "the transaction with an oversized message ended without its \
                                 commit in the slot's changes",
                            ));
                        };
                        let row = row?;
                        let (len, data): (i64, Vec<u8>) = (row.get(0), row.get(1));
                        match Change::parse(&data, len)? {
                            Change::Message {
                                transactional,
                                prefix,
                                content,
                                lsn,
                                oversized,
                            } if prefix == MESSAGE_PREFIX.as_bytes() && transactional => {
                                let Feed::Peek { index, .. } = &mut self.feed else {
                                    unreachable!()
                                };
                                let at = *index;
                                *index += 1;
                                // the messages before the oversized one were streamed already
                                let txn = self.current.as_ref().expect("in a transaction");
                                if at >= txn.index {
                                    let event = self.message(true, content, lsn, oversized);
                                    out.push(Step::Event(event));
                                    events += 1;
                                }
                            }
                            Change::Message { .. } | Change::Other => {}
                            Change::Commit { end_lsn } => {
                                self.current = None;
                                self.seen = self.seen.max(end_lsn);
                                out.push(Step::Close(end_lsn));
                                self.feed = Feed::Resume { start: end_lsn };
                                return Ok(());
                            }
                        }
                        if events >= room {
                            return Ok(());
                        }
                        let Feed::Peek { rows, .. } = &mut self.feed else {
                            unreachable!()
                        };
                        match rows.next().now_or_never() {
                            Some(row) => next = row,
                            None => return Ok(()),
                        }
                    }
                }
                Feed::Resume { start } => {
                    let start = *start;
                    self.resume(start).await?;
                }
            }
        }
    }

    async fn confirm(&mut self, lsn: u64) -> Result<(), RelayError> {
        // between two streams the position is kept, and sent when streaming resumes
        if let Feed::Live(repl) = &self.feed {
            repl.update_applied_lsn(Lsn(lsn));
        }
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

    fn predecessor_stopped_cleanly(&self) -> bool {
        self.predecessor_clean
    }

    async fn stopped_cleanly(&mut self) -> Result<(), RelayError> {
        super::hand_over(&self.pg, &self.identity.source, &self.holder).await
    }

    async fn close(&mut self) -> Result<(), RelayError> {
        // The replication client sends its applied position every status interval and, on stop,
        // only CopyDone: wait until the server has the last confirmation, so that the next session
        // does not replay (and read Kafka back for) what this one confirmed.
        if let Feed::Live(stream) = &mut self.feed {
            stream.shutdown(self.confirmed, FINAL_FEEDBACK_WAIT).await?;
        }
        info!(
            confirmed_lsn = %Lsn(self.metrics.confirmed_lsn.load(Ordering::Relaxed)),
            "stopped cleanly"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_read_ahead_is_a_quarter_of_the_in_flight_budget_and_holds_the_largest_message() {
        assert_eq!(read_ahead_budget(32 << 20, 1_065_536), 8 << 20);
        assert_eq!(read_ahead_budget(1 << 20, 1_065_536), 1_065_536);
    }

    #[test]
    fn sizes_read_as_postgresql_shows_them() {
        assert_eq!(parse_size("998976"), Some(998_976));
        assert_eq!(parse_size("998976B"), Some(998_976));
        assert_eq!(parse_size("976kB"), Some(976 * 1024));
        assert_eq!(parse_size("5MB"), Some(5 << 20));
        assert_eq!(parse_size("1GB"), Some(1 << 30));
        assert_eq!(parse_size("12 bytes"), Some(12));
        assert_eq!(parse_size("12 parsecs"), None);
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("99999999999999999999TB"), None);
    }

    #[test]
    fn the_stream_limit_covers_every_event_either_side_allows() {
        // the defaults: the relay's limit is the larger one
        assert_eq!(stream_limit(1_000_000, 998_976), 1_000_000 + STREAM_SLACK);
        // a database that allows 5 MB events
        assert_eq!(
            stream_limit(1_000_000, 5 << 20),
            (5 << 20) + RECORD_RESERVE + STREAM_SLACK
        );
        assert_eq!(stream_limit(usize::MAX, 1), usize::MAX);
    }

    #[test]
    fn pgoutput_rows_are_parsed_and_an_oversized_head_is_never_an_event() {
        let message = |flags: u8, prefix: &[u8], body: &[u8]| {
            let mut m = vec![b'M', flags];
            m.extend_from_slice(&42u64.to_be_bytes());
            m.extend_from_slice(prefix);
            m.push(0);
            m.extend_from_slice(&(body.len() as u32).to_be_bytes());
            m.extend_from_slice(body);
            m
        };
        let whole = message(1, b"pg_outbox", b"hello");
        match Change::parse(&whole, whole.len() as i64).unwrap() {
            Change::Message {
                transactional,
                prefix,
                content,
                lsn,
                oversized,
            } => {
                assert!(transactional);
                assert_eq!(prefix, b"pg_outbox");
                assert_eq!(&content[..], b"hello");
                assert_eq!(lsn, 42);
                assert_eq!(oversized, None);
            }
            _ => panic!("a message"),
        }
        // only the head of a big one: its prefix, no content
        let head = &whole[..21];
        match Change::parse(head, 120_000_000).unwrap() {
            Change::Message {
                prefix,
                content,
                oversized,
                ..
            } => {
                assert_eq!(prefix, b"pg_outbox");
                assert!(content.is_empty());
                assert_eq!(oversized, Some(120_000_000));
            }
            _ => panic!("a message"),
        }
        // a head that ends inside a long prefix is not ours
        let long = message(1, &[b'p'; 2000], b"x");
        match Change::parse(&long[..1024], 10_000_000).unwrap() {
            Change::Message { prefix, .. } => assert!(prefix.is_empty()),
            _ => panic!("a message"),
        }
        let mut commit = vec![b'C', 0];
        commit.extend_from_slice(&7u64.to_be_bytes());
        commit.extend_from_slice(&9u64.to_be_bytes());
        commit.extend_from_slice(&0u64.to_be_bytes());
        assert!(matches!(
            Change::parse(&commit, commit.len() as i64).unwrap(),
            Change::Commit { end_lsn: 9 }
        ));
        assert!(matches!(Change::parse(b"B", 1).unwrap(), Change::Other));
        assert!(Change::parse(b"", 0).is_err());
        assert!(Change::parse(b"C\0", 2).is_err());
    }
}
