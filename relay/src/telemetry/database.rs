//! The figures only the database knows, sampled every [`EVERY`] on a session of their own (never
//! the loop's, so a slow sample cannot delay publishing) while `/metrics` is served:
//!
//! - wal source: the slot's confirmed lag (`pg_current_wal_lsn() - confirmed_flush_lsn`) and the
//!   WAL it retains (`pg_current_wal_lsn() - restart_lsn`), from `pg_replication_slots`;
//! - poll source: the rows in `outbox.events`, counted up to [`BACKLOG_COUNT_LIMIT`] (a bounded
//!   scan), the planner's estimate (`pg_class.reltuples`) beyond;
//! - both: the rows of this source in `outbox.dead_letters` and `outbox.gaps`;
//! - ingest ([`sample_inbox_done`]): how long the newest completed inbox messages waited for a worker.
//!
//! Each query reads an index or a bounded number of rows. A failed sample is logged and tried
//! again at the next tick; the gauges keep their last value, and
//! `pg_outbox_relay_database_sampled_timestamp_seconds` shows how old it is.

use super::Metrics;
use crate::config::{Config, SourceKind};
use crate::error::RelayError;
use crate::postgres;
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// How often the database figures are read.
pub const EVERY: Duration = Duration::from_secs(10);

/// Rows of `outbox.events` counted exactly; beyond, the planner's estimate is shown.
pub const BACKLOG_COUNT_LIMIT: i64 = 100_000;

/// Samples the source's figures (see the module) until shutdown.
pub async fn sample_source(config: Config, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pg: Option<Client> = None;
    let mut failing = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let result = async {
            if pg.as_ref().is_none_or(Client::is_closed) {
                pg = Some(postgres::connect(&config.postgres).await?);
            }
            let client = pg.as_ref().expect("connected above");
            sample_once(client, &config, &metrics).await
        }
        .await;
        match result {
            Ok(()) => failing = false,
            Err(e) => {
                // one line when sampling starts failing, not one per tick
                if !failing {
                    warn!(error = %e, "could not read the source's figures for /metrics; trying again every 10 s");
                } else {
                    debug!(error = %e, "database figures still unreadable");
                }
                failing = true;
                pg = None;
            }
        }
    }
}

async fn sample_once(pg: &Client, config: &Config, metrics: &Metrics) -> Result<(), RelayError> {
    let source = &config.source;
    let row_key = match source.kind {
        SourceKind::Wal => {
            let slot = pg
                .query_opt(
                    "SELECT pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), confirmed_flush_lsn)::int8, \
                            pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), restart_lsn)::int8 \
                       FROM pg_catalog.pg_replication_slots WHERE slot_name OPERATOR(pg_catalog.=) $1",
                    &[&source.slot],
                )
                .await?;
            if let Some(row) = slot {
                // NULL while the slot has no position yet (being created)
                let lag: Option<i64> = row.get(0);
                let retained: Option<i64> = row.get(1);
                metrics.slot_confirmed_lag_bytes.set(lag.unwrap_or(0));
                metrics.slot_retained_bytes.set(retained.unwrap_or(0));
            }
            format!("slot:{}", source.slot)
        }
        SourceKind::Poll => {
            metrics.table_backlog.set(table_backlog(pg).await?);
            format!("poll:{}", source.source_id)
        }
    };
    let dead: i64 = pg
        .query_one(
            "SELECT pg_catalog.count(*) FROM outbox.dead_letters WHERE source OPERATOR(pg_catalog.=) $1",
            &[&source.source_id],
        )
        .await?
        .get(0);
    metrics.dead_letters_stored.set(dead);
    let gaps: i64 = pg
        .query_one(
            "SELECT pg_catalog.count(*) FROM outbox.gaps WHERE source OPERATOR(pg_catalog.=) $1",
            &[&row_key],
        )
        .await?
        .get(0);
    metrics.gaps_stored.set(gaps);
    metrics.sampled_at.set(super::unix_micros_now() / 1_000_000);
    Ok(())
}

/// Rows in `outbox.events`: counted up to [`BACKLOG_COUNT_LIMIT`], estimated beyond.
async fn table_backlog(pg: &Client) -> Result<i64, RelayError> {
    let counted: i64 = pg
        .query_one(
            "SELECT pg_catalog.count(*) FROM (SELECT FROM outbox.events LIMIT $1) e",
            &[&(BACKLOG_COUNT_LIMIT + 1)],
        )
        .await?
        .get(0);
    if counted <= BACKLOG_COUNT_LIMIT {
        return Ok(counted);
    }
    let estimate: i64 = pg
        .query_one(
            "SELECT pg_catalog.greatest(reltuples::int8, $1) FROM pg_catalog.pg_class \
              WHERE oid OPERATOR(pg_catalog.=) 'outbox.events'::pg_catalog.regclass",
            &[&counted],
        )
        .await?
        .get(0);
    Ok(estimate)
}

/// Messages read per sample of [`sample_inbox_done`]: the newest rows of `inbox.messages`, by id.
pub const DONE_SAMPLE_ROWS: i64 = 10_000;

/// Observes, into `pg_outbox_relay_inbox_done_delay_seconds`, `completed_at - received_at` of the
/// messages of `consumer` completed after `since` (the database's clock, from the last sample)
/// among the newest [`DONE_SAMPLE_ROWS`] messages of the inbox (a backward scan of its primary
/// key, so the cost is bounded). Messages completed long after they arrived, when more than that
/// many arrived since, are missed: the histogram leans to short waits under a deep backlog.
/// Returns the database's clock for the next sample; the first sample (no `since`) only reads it.
pub async fn sample_inbox_done(
    pg: &Client,
    consumer: &str,
    since: Option<std::time::SystemTime>,
    metrics: &Metrics,
) -> Result<std::time::SystemTime, RelayError> {
    let Some(since) = since else {
        // the first sample only sets the clock: what completed before this process is not its to count
        let now = pg.query_one("SELECT pg_catalog.now()", &[]).await?.get(0);
        return Ok(now);
    };
    let rows = pg
        .query(
            "SELECT pg_catalog.date_part('epoch', m.completed_at OPERATOR(pg_catalog.-) m.received_at) \
               FROM (SELECT consumer, status, received_at, completed_at FROM inbox.messages \
                      ORDER BY id DESC LIMIT $1) m \
              WHERE m.consumer OPERATOR(pg_catalog.=) $2 AND m.status OPERATOR(pg_catalog.=) 'done' \
                AND m.completed_at OPERATOR(pg_catalog.>) $3",
            &[
                &DONE_SAMPLE_ROWS,
                &consumer,
                &since,
            ],
        )
        .await?;
    for row in &rows {
        let waited: Option<f64> = row.get(0);
        if let Some(waited) = waited {
            metrics.inbox_done_delay.observe(waited.max(0.0));
        }
    }
    let now: std::time::SystemTime = pg.query_one("SELECT pg_catalog.now()", &[]).await?.get(0);
    Ok(now)
}
