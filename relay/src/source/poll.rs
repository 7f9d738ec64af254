//! The poll source (`pg_outbox.mode = table`): rows of `outbox.events`, removed once published.
//!
//! Only rows of transactions below the snapshot horizon are read (`xid < pg_snapshot_xmin`): every
//! transaction that could still add a row with a smaller xid has finished, so nothing in flight is
//! skipped. Rows are published in (xid, seq) order; the position (xid, seq) increases in that
//! order across polls, which the restart dedup relies on. Per key this is commit order whenever
//! transactions on the same key are serialised (e.g. by a row lock on the aggregate) at or before
//! their first write; see docs/guarantees.md, "Order?".
//!
//! The source keeps a cursor, the last (xid, seq) it handed over, and the next poll reads after it
//! without waiting for Kafka. No row can appear behind the cursor, since its xid was below the
//! horizon. Each poll is one unit, closed by its last (xid, seq); once the pipeline confirms it,
//! every row up to it is deleted in one statement. After a crash the next session starts from the
//! first row left and the restart dedup skips what Kafka already has.
//! A statement-level trigger NOTIFYs `pg_outbox_events` at commit, which wakes the poller at once,
//! unless the poller said it is busy (`outbox.poller`): a transaction that NOTIFYs holds a
//! database-wide lock through its commit's WAL flush, so notifying writers commit one flush after
//! another. While busy, the poller polls every [`BUSY_PAUSE`] instead, and after [`IDLE_AFTER`]
//! empty polls it says it is idle, looks once more, and waits for a NOTIFY (or `poll_interval`).
//! One poller per source at a time: a session-level advisory lock (the slot plays this part for the
//! WAL source).

use crate::config::Config;
use crate::error::RelayError;
use crate::event::{Body, OwnedEvent, Position, SourceEvent};
use crate::postgres;
use crate::source::{Identity, Source, Step};
use futures_util::StreamExt;
use std::time::Duration;
use tokio_postgres::{AsyncMessage, Client};
use tracing::{info, warn};

pub const CHANNEL: &str = "pg_outbox_events";

/// While busy, the pause between a poll that found less than a batch and the next one.
const BUSY_PAUSE: Duration = Duration::from_millis(5);

/// Empty polls in a row (one every [`BUSY_PAUSE`]) before the poller is idle again.
const IDLE_AFTER: u32 = 20;

const SET_IDLE_SQL: &str = "INSERT INTO outbox.poller (id, idle) VALUES (1, $1) \
       ON CONFLICT (id) DO UPDATE SET idle = excluded.idle";

const POLL_SQL: &str = "SELECT seq, id, xid::text::bigint, topic, key, \
            ARRAY(SELECT h.key FROM pg_catalog.jsonb_each_text(headers) h ORDER BY h.key COLLATE pg_catalog.\"C\"), \
            payload, payload_is_json, trace_context, \
            (extract(epoch FROM created_at) * 1000000)::bigint, \
            ARRAY(SELECT h.value FROM pg_catalog.jsonb_each_text(headers) h ORDER BY h.key COLLATE pg_catalog.\"C\") \
       FROM outbox.events \
      WHERE (xid, seq) > ($1::text::xid8, $2) \
        AND xid < pg_catalog.pg_snapshot_xmin(pg_catalog.pg_current_snapshot()) \
      ORDER BY xid, seq \
      LIMIT $3";

/// (xid, seq) of the last row of a poll.
pub type RowId = (i64, i64);

pub struct PollSource {
    pg: Client,
    /// Ends the session when the sealing keys change (the record key is derived from them).
    key_watch: super::KeyWatch,
    /// This session's token as the source's holder, and whether the previous holder stopped
    /// cleanly (see [`super::hold`]).
    holder: String,
    predecessor_clean: bool,
    wake: Wake,
    /// The (xid, seq) of the last row handed over in this session.
    after: RowId,
    /// The last poll came back full: there may be more at once.
    more: bool,
    batch: i64,
    interval: Duration,
    identity: Identity,
    /// This source polls anyway: writers need not NOTIFY.
    busy: bool,
    /// What `outbox.poller` was last told (idle), if anything: it is told again after a call was
    /// cancelled before the statement completed.
    told: Option<bool>,
    /// Empty polls in a row while busy.
    empty_polls: u32,
    /// Gone idle, and not looked since: writers that saw the source busy did not NOTIFY.
    last_look: bool,
    /// While busy, when the next poll is due: a deadline, not a sleep, because the pipeline drops
    /// a waiting call whenever an acknowledgement arrives, and a fresh sleep each time would put
    /// the poll off for as long as acknowledgements keep coming.
    next_poll: tokio::time::Instant,
}

/// Wake-ups from NOTIFY on a connection of their own; `rx` closes when that connection is lost.
struct Wake {
    rx: tokio::sync::mpsc::Receiver<()>,
    _client: Client,
}

async fn listen(config: &Config) -> Result<Wake, RelayError> {
    let (client, mut connection) = postgres::open(&config.postgres).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(_)) => {
                    let _ = tx.try_send(());
                }
                Ok(_) => {}
                Err(e) => {
                    warn!(error = %e, "listen connection lost");
                    break;
                }
            }
        }
    });
    client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
    Ok(Wake {
        rx,
        _client: client,
    })
}

impl PollSource {
    /// Listens for NOTIFY, then takes this source's advisory lock (a second relay stands by).
    pub async fn open(config: &Config) -> Result<PollSource, RelayError> {
        let wake = listen(config).await?;
        let pg = postgres::connect(&config.postgres).await?;
        let tables = pg
            .query_one(
                "SELECT pg_catalog.to_regclass('outbox.events') IS NOT NULL, \
                        pg_catalog.to_regclass('outbox.sources') IS NOT NULL",
                &[],
            )
            .await?;
        if !tables.get::<_, bool>(0) {
            return Err(RelayError::config(format!(
                "outbox.events does not exist in database \"{}\": CREATE EXTENSION pg_outbox there \
                 (or install the SQL edition, sql-edition/pg_outbox.sql)",
                config.postgres.database
            )));
        }
        if !tables.get::<_, bool>(1) {
            return Err(super::extension_predates_relay(&config.postgres.database));
        }
        // the source's row (its incarnation, made on its first poll) is made with its lock key
        take_poll_lock(&pg, &config.source.source_id).await?;
        let source = format!("poll:{}", config.source.source_id);
        // the record key: the dedup believes only records signed with it
        let keys = super::SealKeys::read(&pg).await?;
        let key_watch = super::KeyWatch::new(&keys);
        let identity = Identity::read(
            &pg,
            &config.source.source_id,
            &source,
            "pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot())",
            format!(
                "SELECT outbox.new_poll_incarnation('<why>', '{}') to go on under a new incarnation",
                config.source.source_id
            ),
            &keys,
        )
        .await?;
        // the lock is this session's: the source's holder
        let (holder, predecessor_clean) = super::hold(&pg, &source).await?;
        info!(source = %identity.name, "polling outbox.events");
        Ok(PollSource {
            pg,
            key_watch,
            holder,
            predecessor_clean,
            wake,
            after: (0, 0),
            more: true,
            batch: config.source.poll_batch,
            interval: config.source.poll_interval,
            identity,
            // a relay that ended while busy left writers without NOTIFY: told idle at once
            busy: false,
            told: None,
            empty_polls: 0,
            last_look: false,
            next_poll: tokio::time::Instant::now(),
        })
    }
}

/// Takes the advisory lock that makes this relay the poller of `source_id`, or says who holds it.
///
/// The lock's key is random and kept in `outbox.sources` (`outbox._poll_lock_key`), which only
/// `outbox_relay` reads, so that a role without grants cannot take it first. A key shows in
/// `pg_locks` while it is held, though: a session whose role is no member of `outbox_relay` that
/// holds it (having seen it there) is not a relay, and the relay asks for a new key instead of
/// standing by behind it. Of several relays that find the same impostor, only the first changes the
/// key; the others then find that relay holding the new one and stand by.
async fn take_poll_lock(pg: &Client, source_id: &str) -> Result<(), RelayError> {
    let mut key: i64 = pg
        .query_one("SELECT outbox._poll_lock_key($1)", &[&source_id])
        .await?
        .get(0);
    for _ in 0..3 {
        let locked: bool = pg
            .query_one("SELECT pg_catalog.pg_try_advisory_lock($1)", &[&key])
            .await?
            .get(0);
        if locked {
            return Ok(());
        }
        match holder_of(pg, key).await? {
            Some(holder) if !holder.relay => {
                warn!(
                    holder = %holder.who,
                    "the poll lock of this source is held by a session whose role is no member of \
                     outbox_relay: taking a new lock key instead of standing by"
                );
                key = pg
                    .query_one("SELECT outbox._poll_lock_key($1, $2)", &[&source_id, &key])
                    .await?
                    .get(0);
            }
            holder => {
                let who = holder.map_or_else(|| "another session".to_string(), |h| h.who);
                return Err(RelayError::standby(format!(
                    "source \"{source_id}\" is polled by {who}"
                )));
            }
        }
    }
    Err(RelayError::standby(format!(
        "source \"{source_id}\" is polled by another session"
    )))
}

/// The session that holds an advisory lock, and whether its role may be a relay.
pub struct Holder {
    /// See [`postgres::HOLDER_SQL`].
    pub who: String,
    /// Its role is a member of `outbox_relay` (or a superuser).
    pub relay: bool,
}

/// Which session holds the poll lock of `source_id`, if any; for `status` (reads, changes nothing).
pub async fn lock_holder(pg: &Client, source_id: &str) -> Result<Option<Holder>, RelayError> {
    let key: Option<i64> = pg
        .query_opt(
            "SELECT o.lock_key FROM outbox.sources o WHERE o.source = 'poll:' || $1",
            &[&source_id],
        )
        .await?
        .and_then(|r| r.get(0));
    match key {
        Some(key) => holder_of(pg, key).await,
        None => Ok(None),
    }
}

async fn holder_of(pg: &Client, key: i64) -> Result<Option<Holder>, RelayError> {
    let sql = format!(
        "SELECT {}, pg_catalog.pg_has_role(a.usesysid, 'outbox_relay', 'MEMBER') \
           FROM pg_catalog.pg_locks l JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid, \
                (SELECT $1::bigint) AS key(k) \
         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
           AND l.database = (SELECT oid FROM pg_catalog.pg_database \
                              WHERE datname = pg_catalog.current_database()) \
           AND l.classid = ((k >> 32) & 4294967295)::oid AND l.objid = (k & 4294967295)::oid",
        postgres::HOLDER_SQL
    );
    Ok(pg.query_opt(&sql, &[&key]).await?.map(|r| Holder {
        who: r.get(0),
        relay: r.get(1),
    }))
}

impl Source for PollSource {
    type Ack = RowId;

    async fn next(&mut self, room: usize, out: &mut Vec<Step<RowId>>) -> Result<(), RelayError> {
        self.key_watch.check(&self.pg).await?;
        if !self.more && self.busy && self.empty_polls >= IDLE_AFTER {
            // writers NOTIFY again from now on; a last look covers those that did not
            self.busy = false;
            self.last_look = true;
        }
        let idle = !self.busy;
        if self.told != Some(idle) {
            self.pg.execute(SET_IDLE_SQL, &[&idle]).await?;
            self.told = Some(idle);
        }
        if !self.more && !self.last_look {
            if self.busy {
                tokio::time::sleep_until(self.next_poll).await;
            } else {
                tokio::select! {
                    woke = self.wake.rx.recv() => {
                        if woke.is_none() {
                            return Err(RelayError::transient("LISTEN connection closed"));
                        }
                    }
                    _ = tokio::time::sleep(self.interval) => {}
                }
            }
        }
        let limit = self.batch.min(i64::try_from(room).unwrap_or(i64::MAX));
        let rows = self
            .pg
            .query(
                POLL_SQL,
                &[&self.after.0.to_string(), &self.after.1, &limit],
            )
            .await?;
        // from here on nothing awaits: the batch is handed over whole or not at all
        self.next_poll = tokio::time::Instant::now() + BUSY_PAUSE;
        self.last_look = false;
        if rows.is_empty() {
            self.empty_polls += 1;
        } else {
            // the next call tells writers to leave the NOTIFY out
            self.empty_polls = 0;
            self.busy = true;
        }
        self.more = rows.len() as i64 == limit;
        for row in &rows {
            let seq: i64 = row.get(0);
            let xid: i64 = row.get(2);
            self.after = (xid, seq);
            // header values as the envelope carries them (pg_outbox/src/outbox.rs, Headers): a
            // string's UTF-8, a number's or boolean's jsonb text, names in byte order
            let names: Vec<String> = row.get(5);
            let values: Vec<Option<String>> = row.get(10);
            let headers: Vec<(String, Vec<u8>)> = names
                .into_iter()
                .zip(values)
                .map(|(name, value)| (name, value.unwrap_or_default().into_bytes()))
                .collect();
            let id: uuid::Uuid = row.get(1);
            let event = OwnedEvent {
                id: *id.as_bytes(),
                created_at_micros: row.get(9),
                topic: row.get(3),
                key: row.get(4),
                headers,
                trace_context: row.get(8),
                payload_is_json: row.get(7),
                payload: row.get(6),
            };
            out.push(Step::Event(SourceEvent {
                position: Position::new(xid as u64, seq as u64),
                since_micros: event.created_at_micros,
                body: Body::Row(Box::new(event)),
            }));
        }
        if !rows.is_empty() {
            out.push(Step::Close(self.after));
        }
        Ok(())
    }

    async fn confirm(&mut self, (xid, seq): RowId) -> Result<(), RelayError> {
        self.pg
            .execute(
                "DELETE FROM outbox.events WHERE (xid, seq) <= ($1::text::xid8, $2)",
                &[&xid.to_string(), &seq],
            )
            .await?;
        Ok(())
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
        Ok(())
    }
}
