//! The poll source (`pg_outbox.mode = table`): rows of `outbox.events`, removed once published.
//!
//! Only rows of transactions below the snapshot horizon are read (`xid < pg_snapshot_xmin`): every
//! transaction that could still add a row with a smaller xid has finished, so nothing in flight is
//! skipped, and no high-water mark is needed because published rows are deleted (after Kafka
//! acknowledged them). Rows are published in (xid, seq) order; the position (xid, seq) increases
//! in that order across polls, which the restart dedup relies on. Per key this is commit order
//! whenever transactions on the same key are serialised (e.g. by a row lock on the aggregate) at
//! or before their first write; see README.md, "Two capture modes".
//! A statement-level trigger NOTIFYs `pg_outbox_events` at commit, which wakes the poller at once.

use crate::config::Config;
use crate::error::RelayError;
use crate::pipeline::{connect_pg, Publisher};
use crate::sink::kafka::{KafkaSink, Position};
use crate::telemetry::Metrics;
use futures_util::stream::StreamExt;
use pg_outbox_envelope::Event;
use std::sync::atomic::Ordering;
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub const CHANNEL: &str = "pg_outbox_events";

const POLL_SQL: &str =
    "SELECT seq, id, xid::text::bigint, topic, key, headers, payload, payload_is_json, \
            trace_context, (extract(epoch FROM created_at) * 1000000)::bigint \
       FROM outbox.events \
      WHERE xid < pg_snapshot_xmin(pg_current_snapshot()) \
      ORDER BY xid, seq \
      LIMIT $1";

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
    let mut publisher = Publisher::start(config, metrics, pg, sink).await?;
    metrics.healthy.store(true, Ordering::Relaxed);
    info!("polling outbox.events");
    loop {
        while drain_batch(&mut publisher).await? {
            if shutdown.is_cancelled() {
                return Ok(());
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            woke = wake.rx.recv() => {
                if woke.is_none() {
                    return Err(RelayError::Postgres("LISTEN connection closed".into()));
                }
            }
            _ = tokio::time::sleep(config.poll_interval) => {}
        }
    }
}

/// Publishes one batch, waits for every acknowledgement, then deletes the rows. Returns whether
/// there was anything to publish.
async fn drain_batch(publisher: &mut Publisher<'_>) -> Result<bool, RelayError> {
    let rows = publisher
        .pg
        .query(POLL_SQL, &[&publisher.config.poll_batch])
        .await?;
    if rows.is_empty() {
        return Ok(false);
    }
    let mut deliveries = Vec::with_capacity(rows.len());
    let mut seqs = Vec::with_capacity(rows.len());
    for row in &rows {
        let seq: i64 = row.get(0);
        let id: uuid::Uuid = row.get(1);
        let xid: i64 = row.get(2);
        let topic: &str = row.get(3);
        let key: Option<&str> = row.get(4);
        let headers: serde_json::Value = row.get(5);
        let payload: &[u8] = row.get(6);
        let trace: Option<&str> = row.get(8);
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
        let event = Event {
            id: *id.as_bytes(),
            created_at_micros: row.get(9),
            topic,
            key,
            headers: headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_slice()))
                .collect(),
            trace_context: trace,
            payload_is_json: row.get(7),
            payload,
        };
        let position = Position {
            major: xid as u64,
            minor: seq as u64,
        };
        if let Some(delivery) = publisher.publish(position, &event).await? {
            deliveries.push(delivery);
        }
        seqs.push(seq);
    }
    for delivery in deliveries {
        publisher.delivered(delivery.await).await?;
    }
    publisher
        .pg
        .execute("DELETE FROM outbox.events WHERE seq = ANY($1)", &[&seqs])
        .await?;
    Ok(true)
}
