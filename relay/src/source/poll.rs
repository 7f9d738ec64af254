//! The poll source (`pg_outbox.mode = table`): rows of `outbox.events`, removed once published.
//!
//! Only rows of transactions below the snapshot horizon are read (`xid < pg_snapshot_xmin`): every
//! transaction that could still add a row with a smaller xid has finished, so nothing in flight is
//! skipped. Rows are published in (xid, seq) order; the position (xid, seq) increases in that
//! order across polls, which the restart dedup relies on. Per key this is commit order whenever
//! transactions on the same key are serialised (e.g. by a row lock on the aggregate) at or before
//! their first write; see README.md, "Two capture modes".
//!
//! The poller does not wait for Kafka between polls: a session keeps a cursor, the last (xid, seq)
//! it handed to the producer, and the next poll reads after it. No row can appear behind the
//! cursor, since its xid was below the horizon. Rows are deleted once Kafka acknowledged them, in
//! batches; after a crash the next session starts from the first row left and the restart dedup
//! skips what Kafka already has.
//! A statement-level trigger NOTIFYs `pg_outbox_events` at commit, which wakes the poller at once.

use crate::config::Config;
use crate::error::RelayError;
use crate::pipeline::{connect_pg, DeliveryOutcome, Publisher};
use crate::sink::kafka::{KafkaSink, Position};
use crate::telemetry::Metrics;
use futures_util::stream::{FuturesOrdered, StreamExt};
use futures_util::FutureExt;
use pg_outbox_envelope::Event;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub const CHANNEL: &str = "pg_outbox_events";

const POLL_SQL: &str =
    "SELECT seq, id, xid::text::bigint, topic, key, headers, payload, payload_is_json, \
            trace_context, (extract(epoch FROM created_at) * 1000000)::bigint \
       FROM outbox.events \
      WHERE (xid, seq) > ($1::text::xid8, $2) \
        AND xid < pg_snapshot_xmin(pg_current_snapshot()) \
      ORDER BY xid, seq \
      LIMIT $3";

/// Wake-ups from NOTIFY on a connection of their own; `rx` closes when that connection is lost.
struct Wake {
    rx: tokio::sync::mpsc::Receiver<()>,
    _client: tokio_postgres::Client,
}

async fn listen(config: &Config) -> Result<Wake, RelayError> {
    let (client, mut connection) =
        tokio_postgres::connect(&config.conninfo(), tokio_postgres::NoTls).await?;
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

pub async fn session(
    config: &Config,
    shutdown: &CancellationToken,
    metrics: &Metrics,
    sink: &mut KafkaSink,
) -> Result<(), RelayError> {
    let mut wake = listen(config).await?;
    let pg = connect_pg(config).await?;
    let has_table = pg
        .query_one("SELECT to_regclass('outbox.events') IS NOT NULL", &[])
        .await?
        .get::<_, bool>(0);
    if !has_table {
        return Err(RelayError::Config(format!(
            "outbox.events does not exist in database \"{}\": CREATE EXTENSION pg_outbox there",
            config.pg_database
        )));
    }
    // one poller per source at a time (the slot plays this part for the WAL source): a second
    // relay waits as a standby and takes over when the first one's session ends
    let locked: bool = pg
        .query_one(
            "SELECT pg_try_advisory_lock(hashtextextended('pg_outbox.poll:' || $1, 0))",
            &[&config.source_id],
        )
        .await?
        .get(0);
    if !locked {
        return Err(RelayError::Postgres(format!(
            "another relay polls with source_id \"{}\"; standing by",
            config.source_id
        )));
    }
    // as for the WAL source: let what a killed predecessor sent land before the read-back
    tokio::select! {
        _ = shutdown.cancelled() => return Ok(()),
        _ = tokio::time::sleep(config.restart_grace) => {}
    }
    let publisher = Publisher::start(config, metrics, pg, sink).await?;
    metrics.healthy.store(true, Ordering::Relaxed);
    info!("polling outbox.events");
    let mut poller = Poller {
        publisher,
        after: (0, 0),
        inflight: FuturesOrdered::new(),
        acked: Vec::new(),
    };
    let max_in_flight = config.max_in_flight;
    loop {
        // poll while there is more and room for it; then wait for acknowledgements or news
        let room = max_in_flight.saturating_sub(poller.inflight.len());
        let more = room > 0 && poller.poll(room).await?;
        // also deletes rows that needed no delivery (already in Kafka, dead-lettered)
        poller.settle_ready().await?;
        if shutdown.is_cancelled() {
            break;
        }
        if more && poller.inflight.len() < max_in_flight {
            continue;
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some((seq, since, outcome)) = poller.inflight.next(), if !poller.inflight.is_empty() => {
                poller.publisher.delivered(outcome, since).await?;
                poller.acked.push(seq);
                poller.settle_ready().await?;
            }
            woke = wake.rx.recv(), if !more => {
                if woke.is_none() {
                    return Err(RelayError::Postgres("LISTEN connection closed".into()));
                }
            }
            _ = tokio::time::sleep(config.poll_interval), if !more => {}
        }
    }
    // shutdown: what was handed to Kafka is acknowledged and deleted
    poller.publisher.sink.flush(Duration::from_secs(30)).await?;
    while let Some((seq, since, outcome)) = poller.inflight.next().await {
        poller.publisher.delivered(outcome, since).await?;
        poller.acked.push(seq);
    }
    poller.delete_acked().await
}

/// A delivery in flight: the row's seq, its transaction's start (Unix µs), the outcome.
type Delivery = (i64, i64, DeliveryOutcome);

struct Poller<'a> {
    publisher: Publisher<'a>,
    /// The (xid, seq) of the last row handed to the producer in this session.
    after: (i64, i64),
    inflight: FuturesOrdered<Pin<Box<dyn Future<Output = Delivery> + Send>>>,
    /// Rows acknowledged by Kafka and not deleted yet.
    acked: Vec<i64>,
}

impl Poller<'_> {
    /// Reads and publishes up to `room` rows after the cursor. Returns whether a full batch came
    /// back (there may be more).
    async fn poll(&mut self, room: usize) -> Result<bool, RelayError> {
        let limit = self
            .publisher
            .config
            .poll_batch
            .min(i64::try_from(room).unwrap_or(i64::MAX));
        let rows = self
            .publisher
            .pg
            .query(
                POLL_SQL,
                &[&self.after.0.to_string(), &self.after.1, &limit],
            )
            .await?;
        for row in &rows {
            let seq: i64 = row.get(0);
            let xid: i64 = row.get(2);
            self.after = (xid, seq);
            let position = Position {
                major: xid as u64,
                minor: seq as u64,
            };
            let headers: serde_json::Value = row.get(5);
            let headers: Vec<(String, Vec<u8>)> = match headers {
                serde_json::Value::Object(map) => map
                    .into_iter()
                    .map(|(k, v)| {
                        let v = match v {
                            serde_json::Value::String(s) => s.into_bytes(),
                            other => other.to_string().into_bytes(),
                        };
                        (k, v)
                    })
                    .collect(),
                _ => Vec::new(),
            };
            let id: uuid::Uuid = row.get(1);
            let event = Event {
                id: *id.as_bytes(),
                created_at_micros: row.get(9),
                topic: row.get(3),
                key: row.get(4),
                headers: headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_slice()))
                    .collect(),
                trace_context: row.get(8),
                payload_is_json: row.get(7),
                payload: row.get(6),
            };
            match self.publisher.publish(position, &event).await? {
                Some(delivery) => {
                    let since = event.created_at_micros;
                    self.inflight
                        .push_back(Box::pin(async move { (seq, since, delivery.await) }));
                }
                // skipped (already in Kafka) or dead-lettered: done with the row
                None => self.acked.push(seq),
            }
        }
        Ok(rows.len() as i64 == limit)
    }

    /// Takes every delivery that is already complete, then deletes the acknowledged rows.
    async fn settle_ready(&mut self) -> Result<(), RelayError> {
        while let Some(Some((seq, since, outcome))) = self.inflight.next().now_or_never() {
            self.publisher.delivered(outcome, since).await?;
            self.acked.push(seq);
        }
        self.delete_acked().await
    }

    async fn delete_acked(&mut self) -> Result<(), RelayError> {
        if self.acked.is_empty() {
            return Ok(());
        }
        self.publisher
            .pg
            .execute(
                "DELETE FROM outbox.events WHERE seq = ANY($1)",
                &[&self.acked],
            )
            .await?;
        self.acked.clear();
        Ok(())
    }
}
