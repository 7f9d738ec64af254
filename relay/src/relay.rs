//! The relay's wiring: the configured source (the slot or the outbox table), the Kafka sink and
//! the dead letters in PostgreSQL, handed to the one loop ([`crate::pipeline`]) session after
//! session, with backoff in between.
//!
//! - One Kafka sink serves the sessions of the process, so that records a failed session still has
//!   in flight are delivered or fail before the next session reads the partitions back; a producer
//!   that failed fatally is replaced.
//! - A session that ends in an error withdraws what its producer holds and closes the producer (a
//!   successor may hold the source within a second; see fence.rs).
//! - A stop verdict (Kafka ahead of the database, a foreign incarnation) is stored in
//!   `outbox.sources`, so that no later start goes on until an operator acts.

use crate::config::{Config, SourceKind};
use crate::deadletter::PgDeadLetters;
use crate::error::RelayError;
use crate::fence::PauseClock;
use crate::pipeline::{Frontier, Pipeline};
use crate::postgres;
use crate::retry::Retry;
use crate::sink::kafka::KafkaSink;
use crate::source::poll::PollSource;
use crate::source::wal::WalSource;
use crate::telemetry::Metrics;
use std::sync::Arc;
use std::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Runs sessions until shutdown or a permanent error, reconnecting with backoff in between.
pub async fn run(
    config: &Config,
    shutdown: CancellationToken,
    metrics: Arc<Metrics>,
) -> Result<(), RelayError> {
    let mut retry = Retry::new(config.source.backoff_max);
    PauseClock::start(metrics.pause.clone());
    let mut sink = KafkaSink::new(&config.kafka, &config.source.source_id)?;
    let mut frontier = Frontier::default();
    let mut first = true;
    loop {
        if let Some(fatal) = sink.fatal_error() {
            // an idempotent producer that hit a fatal error can send nothing more
            warn!(error = %fatal, "kafka producer failed fatally; building a new one");
            sink = KafkaSink::new(&config.kafka, &config.source.source_id)?;
        }
        let started = Instant::now();
        let result = session(
            config,
            &shutdown,
            &metrics,
            &mut sink,
            &mut frontier,
            &mut first,
        )
        .await;
        if result.is_err() {
            metrics.pause.disarm();
            if sink.has_sent() {
                // A session that ends in an error gives up what its producer still holds, at once,
                // and closes the producer's connections: once it lost its source a successor may
                // hold the slot or lock within a second, and a record of this session landing
                // after the successor read the partitions back would be a duplicate. What it
                // withdrew is unacknowledged, so whichever relay streams next replays it; what
                // already reached the broker is found by that relay's read-back.
                let old = std::mem::replace(
                    &mut sink,
                    KafkaSink::new(&config.kafka, &config.source.source_id)?,
                );
                old.close().await;
                info!("the session ended: what its producer held is withdrawn and its broker connections closed");
            }
        }
        let result = match result {
            Err(e) if e.verdict_source().is_some() => match still_ahead(config, &e).await {
                Ok(true) => {
                    let source = e.verdict_source().unwrap_or_default().to_string();
                    record_verdict(config, &source, &e.to_string()).await;
                    Err(e)
                }
                Ok(false) => Err(RelayError::transient(
                    "records of this source lie beyond what the database had committed when this \
                     session opened, but not beyond what it has committed now: the session was \
                     paused or superseded meanwhile (another relay wrote them); starting again",
                )),
                // the database cannot say: no verdict is stored, the relay stops all the same
                Err(check) => {
                    warn!(error = %check, "could not check the stop again; it is not stored");
                    Err(e)
                }
            },
            other => other,
        };
        if !retry.after(result, started, &shutdown, &metrics).await? {
            return Ok(());
        }
    }
}

/// Whether a verdict still holds now. A verdict that Kafka is ahead of the database compares the
/// records read back with what the database had committed when the session opened; a session
/// paused (SIGSTOP, a VM) or superseded since opened long ago, and the records beyond its view may
/// be a successor's. Asked again now: only records beyond what the database has committed *now*
/// are a sign that it went back in time. Other verdicts hold as they are.
async fn still_ahead(config: &Config, e: &RelayError) -> Result<bool, RelayError> {
    let (Some(major), Some(source)) = (e.ahead_of(), e.verdict_source()) else {
        return Ok(true);
    };
    let sql = if source.starts_with("slot:") {
        "SELECT ((pg_catalog.pg_current_wal_insert_lsn() OPERATOR(pg_catalog.-) '0/0'::pg_catalog.pg_lsn))::pg_catalog.int8"
    } else {
        "SELECT pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot())::pg_catalog.text::pg_catalog.int8"
    };
    let pg = postgres::connect(&config.postgres).await?;
    let now: i64 = pg.query_one(sql, &[]).await?.get(0);
    Ok(major >= now as u64)
}

/// Stores a stop verdict in `outbox.sources`, so that every later start (of this relay or another,
/// however far the database has moved meanwhile) refuses the incarnation until an operator acts.
/// The first verdict is kept.
async fn record_verdict(config: &Config, source: &str, why: &str) {
    let stored = async {
        let pg = postgres::connect(&config.postgres).await?;
        pg.execute(
            "UPDATE outbox.sources SET stopped = $2, stopped_at = pg_catalog.now() \
              WHERE source = $1 AND stopped IS NULL",
            &[&source, &why],
        )
        .await?;
        Ok::<_, RelayError>(())
    };
    if let Err(e) = stored.await {
        warn!(%source, error = %e, "could not record the stop in outbox.sources");
    }
}

/// One session: open the configured source, then run the loop until it ends.
async fn session(
    config: &Config,
    shutdown: &CancellationToken,
    metrics: &Arc<Metrics>,
    sink: &mut KafkaSink,
    frontier: &mut Frontier,
    first: &mut bool,
) -> Result<(), RelayError> {
    // the dead letters' session is opened alongside the source, not before it
    let dead = async {
        let pg = postgres::connect(&config.postgres).await?;
        Ok(PgDeadLetters::new(pg, &config.source.source_id))
    };
    match config.source.kind {
        SourceKind::Wal => {
            let (dead, source) =
                tokio::try_join!(dead, WalSource::open(config, first, metrics.clone()))?;
            Pipeline::new(&config.kafka, &config.source, metrics, sink, dead, frontier)
                .run(source, shutdown)
                .await
        }
        SourceKind::Poll => {
            let (dead, source) = tokio::try_join!(dead, PollSource::open(config))?;
            Pipeline::new(&config.kafka, &config.source, metrics, sink, dead, frontier)
                .run(source, shutdown)
                .await
        }
    }
}
