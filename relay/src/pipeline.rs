//! The relay loop: slot -> decode -> dedup -> Kafka -> confirm.
//!
//! Order: events arrive from the slot in commit order and are handed to one idempotent producer in
//! that order, so per partition (and so per key) Kafka holds them in commit order.
//! Durability: the slot position is advanced only through [`Checkpoint`], i.e. after Kafka
//! acknowledged (or the dead-letter table durably holds) every earlier event.
//! Recovery: any transient error ends the session; the next session starts from the slot's
//! confirmed position and the sink's per-partition dedup skips what Kafka already has.

use crate::checkpoint::Checkpoint;
use crate::config::Config;
use crate::error::RelayError;
use crate::sink::kafka::{record_headers, KafkaSink, Position, HEADER_ID, HEADER_POSITION};
use crate::sink::partition::partition_for;
use crate::telemetry::Metrics;
use futures_util::stream::{FuturesOrdered, StreamExt};
use pg_outbox_envelope::{Event, MESSAGE_PREFIX};
use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers, Message, OwnedMessage};
use rdkafka::producer::FutureRecord;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

type Delivery = (
    u64,
    Result<
        rdkafka::producer::future_producer::OwnedDeliveryResult,
        futures_channel::oneshot::Canceled,
    >,
);

/// Runs sessions until shutdown or a permanent error, reconnecting with backoff in between.
pub async fn run(
    config: &Config,
    shutdown: CancellationToken,
    metrics: Arc<Metrics>,
) -> Result<(), RelayError> {
    let mut backoff = Duration::from_millis(200);
    let mut first = true;
    // One producer for the life of the process: records of a failed session that are still in
    // flight are delivered (or fail) before the next session reads the partitions' last records.
    let mut sink = KafkaSink::new(config)?;
    loop {
        let started = Instant::now();
        match session(config, &shutdown, &metrics, &mut sink, first).await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_permanent() => return Err(e),
            Err(e) => {
                metrics.restarts.fetch_add(1, Ordering::Relaxed);
                metrics.healthy.store(false, Ordering::Relaxed);
                warn!(error = %e, backoff_ms = backoff.as_millis() as u64, "session ended; reconnecting");
            }
        }
        first = false;
        if started.elapsed() > Duration::from_secs(30) {
            backoff = Duration::from_millis(200);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(config.backoff_max);
    }
}

/// Makes sure the slot and publication exist (creating them only if allowed and this is the first
/// session), and refuses a slot that was invalidated.
async fn prepare_slot(pg: &Client, config: &Config, first: bool) -> Result<(), RelayError> {
    let row = pg
        .query_opt(
            "SELECT database, plugin, coalesce(wal_status, '') FROM pg_replication_slots WHERE slot_name = $1",
            &[&config.slot],
        )
        .await?;
    match row {
        None if config.create_slot && first => {}
        None => {
            return Err(RelayError::Slot(format!(
                "replication slot \"{}\" does not exist. It disappeared while the relay ran, so events \
                 may be lost: check, then run SELECT * FROM outbox.create_slot('{}') and restart",
                config.slot, config.slot
            )))
        }
        Some(r) => {
            let database: Option<String> = r.get(0);
            let plugin: Option<String> = r.get(1);
            let wal_status: String = r.get(2);
            if database.as_deref() != Some(config.pg_database.as_str()) || plugin.as_deref() != Some("pgoutput") {
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
        }
    }
    if config.create_slot {
        for r in pg
            .query(
                "SELECT object, name, action FROM outbox.create_slot($1)",
                &[&config.slot],
            )
            .await?
        {
            let (object, name, action): (String, String, String) = (r.get(0), r.get(1), r.get(2));
            info!(%object, %name, %action, "setup");
        }
    } else {
        let exists = pg
            .query_opt(
                "SELECT 1 FROM pg_publication WHERE pubname = $1",
                &[&config.slot],
            )
            .await?
            .is_some();
        if !exists {
            return Err(RelayError::Config(format!(
                "publication \"{}\" does not exist; run SELECT * FROM outbox.create_slot('{}') or set create_slot = true",
                config.slot, config.slot
            )));
        }
    }
    Ok(())
}

async fn connect_pg(config: &Config) -> Result<Client, RelayError> {
    let (client, connection) =
        tokio_postgres::connect(&config.conninfo(), tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            warn!(error = %e, "postgres connection closed");
        }
    });
    Ok(client)
}

struct Session<'a> {
    config: &'a Config,
    metrics: &'a Metrics,
    pg: Client,
    sink: &'a mut KafkaSink,
    repl: ReplicationClient,
    checkpoint: Checkpoint,
    inflight: FuturesOrdered<Pin<Box<dyn Future<Output = Delivery> + Send>>>,
    last_written: HashMap<(String, i32), Option<Position>>,
    /// (checkpoint seq, commit LSN, next index) of the transaction being received.
    current: Option<(u64, u64, u32)>,
}

async fn session(
    config: &Config,
    shutdown: &CancellationToken,
    metrics: &Metrics,
    sink: &mut KafkaSink,
    first: bool,
) -> Result<(), RelayError> {
    let pg = connect_pg(config).await?;
    prepare_slot(&pg, config, first).await?;
    // whatever an earlier session of this process sent is settled before the dedup looks at Kafka
    sink.flush(Duration::from_secs(60)).await?;
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
        pg,
        sink,
        repl,
        checkpoint: Checkpoint::default(),
        inflight: FuturesOrdered::new(),
        last_written: HashMap::new(),
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
        self.sink.flush(Duration::from_secs(30)).await?;
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

    async fn delivered(&mut self, (seq, result): Delivery) -> Result<(), RelayError> {
        match result {
            Ok(Ok(_)) => {
                self.metrics.published.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Err((
                KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge),
                msg,
            ))) => {
                self.dead_letter_message(
                    &msg,
                    "broker refused the record as too large (MSG_SIZE_TOO_LARGE)",
                )
                .await?;
            }
            Ok(Err((e, _))) => return Err(RelayError::Kafka(format!("delivery failed: {e}"))),
            Err(_) => return Err(RelayError::Kafka("producer dropped a delivery".into())),
        }
        if let Some(lsn) = self.checkpoint.acked(seq) {
            self.confirm(lsn);
        }
        Ok(())
    }

    async fn received(&mut self, event: ReplicationEvent) -> Result<(), RelayError> {
        match event {
            ReplicationEvent::Begin { final_lsn, .. } => {
                let seq = self.checkpoint.begin();
                self.current = Some((seq, final_lsn.as_u64(), 0));
            }
            ReplicationEvent::Message {
                transactional,
                prefix,
                content,
                lsn,
            } if prefix == MESSAGE_PREFIX => {
                let Some((seq, commit_lsn, index)) = self.current.as_mut() else {
                    warn!(%lsn, transactional, "pg_outbox message outside a transaction ignored");
                    return Ok(());
                };
                let position = Position {
                    commit_lsn: *commit_lsn,
                    index: *index,
                };
                *index += 1;
                let seq = *seq;
                self.publish(seq, position, &content).await?;
            }
            ReplicationEvent::Message { .. } | ReplicationEvent::XLogData { .. } => {}
            ReplicationEvent::Commit { end_lsn, .. } => {
                if let Some((seq, _, _)) = self.current.take() {
                    if let Some(lsn) = self.checkpoint.commit(seq, end_lsn.as_u64()) {
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

    async fn publish(
        &mut self,
        seq: u64,
        position: Position,
        content: &[u8],
    ) -> Result<(), RelayError> {
        let event = match Event::decode(content) {
            Ok(event) => event,
            Err(e) => {
                let reason = format!("undecodable envelope: {e}");
                return self
                    .dead_letter(position, None, None, None, &[], content, &reason)
                    .await;
            }
        };
        let topic = self.config.kafka_topic(event.topic);
        let partitions = self.sink.partition_count(&topic).await?;
        let key = event.key.map(str::as_bytes);
        let partition = partition_for(key, &event.id, partitions);
        let last = match self.last_written.get(&(topic.clone(), partition)) {
            Some(last) => *last,
            None => {
                let last = self.sink.last_position(&topic, partition).await?;
                if let Some(p) = last {
                    info!(%topic, partition, last_position = %p, "resuming after the last record of this source");
                }
                self.last_written.insert((topic.clone(), partition), last);
                last
            }
        };
        if last.is_some_and(|last| position <= last) {
            self.metrics.skipped.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        // From now on this partition's last record is the one we send; a position the stream
        // delivers again (the server replays from the confirmed LSN) is skipped like above.
        self.last_written
            .insert((topic.clone(), partition), Some(position));
        let id = event.id_string();
        let size = event.payload.len()
            + key.map_or(0, <[u8]>::len)
            + event
                .headers
                .iter()
                .map(|(n, v)| n.len() + v.len())
                .sum::<usize>()
            + 128;
        if size > self.config.max_record_bytes {
            let reason = format!(
                "record of {size} bytes exceeds max_record_bytes ({})",
                self.config.max_record_bytes
            );
            return self
                .dead_letter(
                    position,
                    Some(&id),
                    Some(event.topic),
                    event.key,
                    &event.headers,
                    event.payload,
                    &reason,
                )
                .await;
        }
        let headers = record_headers(
            &id,
            position,
            &self.config.source_id,
            &event.headers,
            event.trace_context,
        );
        let mut record = FutureRecord::<[u8], [u8]>::to(&topic)
            .partition(partition)
            .payload(event.payload)
            .headers(headers)
            .timestamp(event.created_at_micros / 1000);
        if let Some(key) = key {
            record = record.key(key);
        }
        let future = self.sink.send(record)?;
        self.checkpoint.sent(seq);
        self.inflight
            .push_back(Box::pin(async move { (seq, future.await) }));
        Ok(())
    }

    /// Durably records an event that can never be published; exactly once per source position.
    #[allow(clippy::too_many_arguments)]
    async fn dead_letter(
        &mut self,
        position: Position,
        event_id: Option<&str>,
        topic: Option<&str>,
        key: Option<&str>,
        headers: &[(&str, &[u8])],
        payload: &[u8],
        reason: &str,
    ) -> Result<(), RelayError> {
        let headers: serde_json::Map<String, serde_json::Value> = headers
            .iter()
            .map(|(n, v)| {
                (
                    n.to_string(),
                    String::from_utf8_lossy(v).into_owned().into(),
                )
            })
            .collect();
        let event_id = event_id.and_then(|s| uuid::Uuid::parse_str(s).ok());
        self.pg
            .execute(
                "INSERT INTO outbox.dead_letters (source, position, event_id, topic, key, headers, payload, reason) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (source, position) DO NOTHING",
                &[
                    &self.config.source_id,
                    &position.to_string(),
                    &event_id,
                    &topic,
                    &key,
                    &serde_json::Value::Object(headers),
                    &payload,
                    &reason,
                ],
            )
            .await?;
        self.metrics.dead_lettered.fetch_add(1, Ordering::Relaxed);
        warn!(%position, event_id = ?event_id, reason, "event dead-lettered to outbox.dead_letters");
        Ok(())
    }

    async fn dead_letter_message(
        &mut self,
        msg: &OwnedMessage,
        reason: &str,
    ) -> Result<(), RelayError> {
        let mut id = None;
        let mut position = None;
        let mut user = Vec::new();
        if let Some(headers) = msg.headers() {
            for h in headers.iter() {
                let value = h.value.unwrap_or_default();
                match h.key {
                    HEADER_ID => id = std::str::from_utf8(value).ok().map(str::to_string),
                    HEADER_POSITION => {
                        position = std::str::from_utf8(value).ok().and_then(Position::parse)
                    }
                    k if k.starts_with("pg_outbox-") => {}
                    k => user.push((k.to_string(), value.to_vec())),
                }
            }
        }
        let position =
            position.ok_or_else(|| RelayError::Kafka("failed record without position".into()))?;
        let user: Vec<(&str, &[u8])> = user
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_slice()))
            .collect();
        let key = msg
            .key()
            .and_then(|k| std::str::from_utf8(k).ok())
            .map(str::to_string);
        let topic = msg.topic().to_string();
        let payload = msg.payload().unwrap_or_default().to_vec();
        self.dead_letter(
            position,
            id.as_deref(),
            Some(&topic),
            key.as_deref(),
            &user,
            &payload,
            reason,
        )
        .await
    }
}
