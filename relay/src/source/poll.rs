//! The poll source (`pg_outbox.mode = table`): rows of `outbox.events`, removed once published.
//!
//! Only rows of transactions below the snapshot horizon are read (`xid < pg_snapshot_xmin`): every
//! transaction that could still add a row with a smaller xid has finished, so nothing in flight is
//! skipped. Rows are published in (xid, seq) order; the position (xid, seq) increases in that
//! order across polls, which the restart dedup relies on. Per key this is commit order whenever
//! transactions on the same key are serialised (e.g. by a row lock on the aggregate) at or before
//! their first write; see README.md, "Two capture modes".
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
            ARRAY(SELECT h.key FROM jsonb_each_text(headers) h ORDER BY h.key COLLATE \"C\"), \
            payload, payload_is_json, trace_context, \
            (extract(epoch FROM created_at) * 1000000)::bigint, \
            ARRAY(SELECT h.value FROM jsonb_each_text(headers) h ORDER BY h.key COLLATE \"C\") \
       FROM outbox.events \
      WHERE (xid, seq) > ($1::text::xid8, $2) \
        AND xid < pg_snapshot_xmin(pg_current_snapshot()) \
      ORDER BY xid, seq \
      LIMIT $3";

/// (xid, seq) of the last row of a poll.
pub type RowId = (i64, i64);

pub struct PollSource {
    pg: Client,
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
                "SELECT to_regclass('outbox.events') IS NOT NULL, to_regclass('outbox.sources') IS NOT NULL",
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
        let locked: bool = pg
            .query_one(
                "SELECT pg_try_advisory_lock(hashtextextended('pg_outbox.poll:' || $1, 0))",
                &[&config.source.source_id],
            )
            .await?
            .get(0);
        if !locked {
            let who = lock_holder(&pg, &config.source.source_id)
                .await?
                .unwrap_or_else(|| "another session".to_string());
            return Err(RelayError::standby(format!(
                "source \"{}\" is polled by {who}",
                config.source.source_id
            )));
        }
        // the source's incarnation, made on its first poll
        let source = format!("poll:{}", config.source.source_id);
        pg.execute(
            "INSERT INTO outbox.sources (source) VALUES ($1) ON CONFLICT (source) DO NOTHING",
            &[&source],
        )
        .await?;
        let identity = Identity::read(
            &pg,
            &config.source.source_id,
            &source,
            "pg_snapshot_xmax(pg_current_snapshot())",
            format!(
                "SELECT outbox.new_poll_incarnation('<why>', '{}') to go on under a new incarnation",
                config.source.source_id
            ),
        )
        .await?;
        info!(source = %identity.name, "polling outbox.events");
        Ok(PollSource {
            pg,
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

/// Which relay holds the poll lock of `source_id` (see [`postgres::HOLDER_SQL`]), if any.
pub async fn lock_holder(pg: &Client, source_id: &str) -> Result<Option<String>, RelayError> {
    let sql = format!(
        "SELECT {} FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid, \
         hashtextextended('pg_outbox.poll:' || $1, 0) k \
         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
           AND l.classid = ((k >> 32) & 4294967295)::oid AND l.objid = (k & 4294967295)::oid",
        postgres::HOLDER_SQL
    );
    Ok(pg.query_opt(&sql, &[&source_id]).await?.map(|r| r.get(0)))
}

impl Source for PollSource {
    type Ack = RowId;

    async fn next(&mut self, room: usize, out: &mut Vec<Step<RowId>>) -> Result<(), RelayError> {
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

    async fn close(&mut self) -> Result<(), RelayError> {
        Ok(())
    }
}
