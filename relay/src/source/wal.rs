//! The WAL source: pg_outbox messages from a logical replication slot (pgoutput), in commit order.
//!
//! A position is (commit LSN of the transaction, index of the message in it). The slot is
//! confirmed through [`Checkpoint`]: a transaction's end LSN only once all its events and all
//! earlier ones are acknowledged. With nothing pending, a keepalive's position is confirmed as is,
//! so activity elsewhere in the database never makes the slot retain WAL without bound.

use crate::checkpoint::Checkpoint;
use crate::config::Config;
use crate::error::RelayError;
use crate::pipeline::{connect_pg, DeliveryOutcome, Publisher};
use crate::sink::kafka::{KafkaSink, Position};
use crate::telemetry::Metrics;
use futures_util::stream::{FuturesOrdered, StreamExt};
use pg_outbox_envelope::MESSAGE_PREFIX;
use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tracing::info;

/// (checkpoint seq, commit time in Unix µs, outcome)
type Delivery = (u64, i64, DeliveryOutcome);

/// Makes sure the publication and the slot exist, creating them (publication first, committed, then
/// the slot) only if allowed and this is the first session; refuses a slot that was invalidated, or
/// one without its publication (pgoutput would fail on every transaction older than the publication).
async fn prepare_slot(pg: &Client, config: &Config, first: bool) -> Result<(), RelayError> {
    let row = pg
        .query_opt(
            "SELECT database, plugin, coalesce(wal_status, '') FROM pg_replication_slots WHERE slot_name = $1",
            &[&config.slot],
        )
        .await?;
    let publication = pg
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&config.slot],
        )
        .await?
        .is_some();
    match row {
        None if config.create_slot && first => {
            // two statements, two transactions: the publication must commit before the slot exists
            for step in ["outbox.create_publication", "outbox.create_slot"] {
                let sql = format!("SELECT object, name, action FROM {step}($1)");
                for r in pg.query(&sql, &[&config.slot]).await? {
                    let (object, name, action): (String, String, String) =
                        (r.get(0), r.get(1), r.get(2));
                    info!(%object, %name, %action, "setup");
                }
            }
            return Ok(());
        }
        None => {
            return Err(RelayError::Slot(format!(
                "replication slot \"{}\" does not exist{}. Events it retained may be lost: check, then \
                 CALL outbox.setup('{}') and restart",
                config.slot,
                if first { " and create_slot is off" } else { "; it disappeared while the relay ran" },
                config.slot
            )))
        }
        Some(r) => {
            let database: Option<String> = r.get(0);
            let plugin: Option<String> = r.get(1);
            let wal_status: String = r.get(2);
            if database.as_deref() != Some(config.pg_database.as_str())
                || plugin.as_deref() != Some("pgoutput")
            {
                return Err(RelayError::Slot(format!(
                    "slot \"{}\" is not a pgoutput slot of database \"{}\"; set slot (PG_OUTBOX_SLOT) to the pg_outbox slot",
                    config.slot, config.pg_database
                )));
            }
            if wal_status == "lost" {
                return Err(RelayError::Slot(format!(
                    "slot \"{}\" was invalidated (wal_status = lost): WAL it needed is gone and events may be lost. \
                     Reconcile, then drop and recreate it",
                    config.slot
                )));
            }
            if !publication {
                return Err(RelayError::Slot(format!(
                    "publication \"{}\" does not exist but slot \"{}\" does: pgoutput cannot decode \
                     transactions older than the publication. Drop the slot, then CALL outbox.setup('{}')",
                    config.slot, config.slot, config.slot
                )));
            }
        }
    }
    Ok(())
}

struct Session<'a> {
    config: &'a Config,
    metrics: &'a Metrics,
    publisher: Publisher<'a>,
    repl: ReplicationClient,
    checkpoint: Checkpoint,
    inflight: FuturesOrdered<Pin<Box<dyn Future<Output = Delivery> + Send>>>,
    /// The transaction being received.
    current: Option<Txn>,
}

/// The transaction being received: its checkpoint seq, commit LSN and time, next event index.
struct Txn {
    seq: u64,
    commit_lsn: u64,
    /// Unix µs.
    commit_time: i64,
    index: u64,
}

/// PostgreSQL timestamps count from 2000-01-01; Unix µs from 1970-01-01.
const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

pub async fn session(
    config: &Config,
    shutdown: &CancellationToken,
    metrics: &Metrics,
    sink: &mut KafkaSink,
    first: &mut bool,
) -> Result<(), RelayError> {
    let pg = connect_pg(config).await?;
    prepare_slot(&pg, config, *first).await?;
    // from now on a missing slot means it disappeared, never that it is still to be created
    *first = false;
    let publisher = Publisher::start(config, metrics, pg, sink).await?;
    let repl_config = ReplicationConfig::new(
        config.pg_host.clone(),
        config.pg_user.clone(),
        config.pg_password.clone(),
        config.pg_database.clone(),
        config.slot.clone(),
        config.slot.clone(),
    )
    .with_port(config.pg_port)
    .with_start_lsn(Lsn::ZERO)
    .with_status_interval(Duration::from_millis(500))
    .with_application_name("pg_outbox_relay");
    let mut repl = ReplicationClient::connect(repl_config).await?;
    repl.wait_started().await?;
    // Holding the slot fences out any other relay process from now on, but a relay that was just
    // killed may have left produce requests in its socket that the broker still appends. Give them
    // time to land before the dedup reads the partitions' last records.
    tokio::select! {
        _ = shutdown.cancelled() => return Ok(()),
        _ = tokio::time::sleep(config.restart_grace) => {}
    }
    info!(slot = %config.slot, "streaming from slot");
    metrics.healthy.store(true, Ordering::Relaxed);
    let mut s = Session {
        config,
        metrics,
        publisher,
        repl,
        checkpoint: Checkpoint::default(),
        inflight: FuturesOrdered::new(),
        current: None,
    };
    let result = s.pump(shutdown).await;
    if result.is_ok() {
        s.drain().await?;
    } else {
        s.repl.abort();
    }
    result
}

impl Session<'_> {
    async fn pump(&mut self, shutdown: &CancellationToken) -> Result<(), RelayError> {
        loop {
            let room = self.inflight.len() < self.config.max_in_flight;
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(()),
                Some(delivery) = self.inflight.next(), if !self.inflight.is_empty() => {
                    self.delivered(delivery).await?;
                }
                event = self.repl.recv(), if room => {
                    match event? {
                        Some(event) => self.received(event).await?,
                        None => return Err(RelayError::Replication("stream ended".into())),
                    }
                }
            }
        }
    }

    /// Graceful shutdown: everything handed to Kafka is flushed and its position confirmed.
    async fn drain(&mut self) -> Result<(), RelayError> {
        info!(in_flight = self.inflight.len(), "shutting down: flushing");
        self.publisher.sink.flush(Duration::from_secs(30)).await?;
        while let Some(delivery) = self.inflight.next().await {
            self.delivered(delivery).await?;
        }
        self.repl.shutdown().await?;
        info!(
            confirmed_lsn = %Lsn(self.metrics.confirmed_lsn.load(Ordering::Relaxed)),
            "stopped cleanly"
        );
        Ok(())
    }

    fn confirm(&self, lsn: u64) {
        self.repl.update_applied_lsn(Lsn(lsn));
        self.metrics.confirmed_lsn.store(lsn, Ordering::Relaxed);
    }

    async fn delivered(&mut self, (seq, since, outcome): Delivery) -> Result<(), RelayError> {
        self.publisher.delivered(outcome, since).await?;
        if let Some(lsn) = self.checkpoint.acked(seq) {
            self.confirm(lsn);
        }
        Ok(())
    }

    async fn received(&mut self, event: ReplicationEvent) -> Result<(), RelayError> {
        match event {
            ReplicationEvent::Begin {
                final_lsn,
                commit_time_micros,
                ..
            } => {
                self.current = Some(Txn {
                    seq: self.checkpoint.begin(),
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
                let Some(txn) = self.current.as_mut() else {
                    // not written by outbox.enqueue (which is always transactional): nothing
                    // ties it to a commit, so it is kept as a dead letter rather than published
                    let position = Position {
                        major: lsn.as_u64(),
                        minor: 0,
                    };
                    let reason = format!(
                        "non-transactional pg_outbox message (transactional = {transactional})"
                    );
                    return self
                        .publisher
                        .dead_letter(position, None, None, None, &[], &content, &reason)
                        .await;
                };
                let position = Position {
                    major: txn.commit_lsn,
                    minor: txn.index,
                };
                txn.index += 1;
                let (seq, since) = (txn.seq, txn.commit_time);
                if let Some(future) = self.publisher.publish_envelope(position, &content).await? {
                    self.checkpoint.sent(seq);
                    self.inflight
                        .push_back(Box::pin(async move { (seq, since, future.await) }));
                }
            }
            ReplicationEvent::Message { .. } | ReplicationEvent::XLogData { .. } => {}
            ReplicationEvent::Commit { end_lsn, .. } => {
                if let Some(txn) = self.current.take() {
                    if let Some(lsn) = self.checkpoint.commit(txn.seq, end_lsn.as_u64()) {
                        self.confirm(lsn);
                    }
                }
            }
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                // Nothing pending: everything before wal_end is handled, so let the slot move on
                // even when no pg_outbox event was written (activity elsewhere, idle database).
                if self.checkpoint.is_idle() && self.current.is_none() {
                    self.confirm(wal_end.as_u64());
                }
            }
            ReplicationEvent::StoppedAt { .. } => {
                return Err(RelayError::Replication("stream stopped".into()))
            }
        }
        Ok(())
    }
}
