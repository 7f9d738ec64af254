//! The relay loop: source -> decode -> dedup -> Kafka -> acknowledge back to the source.
//!
//! Order: a source yields events in commit order (`source::wal`) or in transaction order below the
//! snapshot horizon (`source::poll`); they are handed to one idempotent producer in that order, so
//! per partition (and so per key) Kafka holds them in that order.
//! Durability: a source advances its durable position (slot LSN, deleted rows) only after Kafka
//! acknowledged, or the dead-letter table durably holds, every earlier event.
//! Recovery: any transient error ends the session; the next session starts from the durable
//! position and [`Publisher`]'s per-partition dedup skips what Kafka already has.

use crate::config::{Config, SourceKind};
use crate::error::RelayError;
use crate::sink::kafka::{record_headers, KafkaSink, Position, Tail, HEADER_ID, HEADER_POSITION};
use crate::sink::partition::partition_for;
use crate::source;
use crate::telemetry::{micros_since, Metrics};
use pg_outbox_envelope::Event;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers, Message, OwnedMessage};
use rdkafka::producer::{DeliveryFuture, FutureRecord};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// What a delivery future resolves to.
pub type DeliveryOutcome = Result<
    rdkafka::producer::future_producer::OwnedDeliveryResult,
    futures_channel::oneshot::Canceled,
>;

/// Runs sessions until shutdown or a permanent error, reconnecting with backoff in between.
pub async fn run(
    config: &Config,
    shutdown: CancellationToken,
    metrics: Arc<Metrics>,
) -> Result<(), RelayError> {
    let mut retry = Retry::new(config);
    let mut first = true;
    // One producer for the life of the process: records of a failed session that are still in
    // flight are delivered (or fail) before the next session reads the partitions' last records.
    let mut sink = KafkaSink::new(config)?;
    loop {
        let started = Instant::now();
        let result = match config.source {
            SourceKind::Wal => {
                source::wal::session(config, &shutdown, &metrics, &mut sink, &mut first).await
            }
            SourceKind::Poll => source::poll::session(config, &shutdown, &metrics, &mut sink).await,
        };
        if !retry.after(result, started, &shutdown, &metrics).await? {
            return Ok(());
        }
    }
}

/// Reconnects with exponential backoff after a transient error.
pub struct Retry {
    backoff: Duration,
    max: Duration,
}

impl Retry {
    pub fn new(config: &Config) -> Retry {
        Retry {
            backoff: Duration::from_millis(200),
            max: config.backoff_max,
        }
    }

    /// Decides what follows a session that began at `started`: Ok(false) to stop (clean end or
    /// shutdown), Ok(true) to start another after the backoff, Err for a permanent error.
    pub async fn after(
        &mut self,
        result: Result<(), RelayError>,
        started: Instant,
        shutdown: &CancellationToken,
        metrics: &Metrics,
    ) -> Result<bool, RelayError> {
        match result {
            Ok(()) => return Ok(false),
            Err(e) if e.is_permanent() => return Err(e),
            Err(e) => {
                metrics.restarts.fetch_add(1, Ordering::Relaxed);
                metrics.healthy.store(false, Ordering::Relaxed);
                warn!(error = %e, backoff_ms = self.backoff.as_millis() as u64, "session ended; reconnecting");
            }
        }
        if started.elapsed() > Duration::from_secs(30) {
            self.backoff = Duration::from_millis(200);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(false),
            _ = tokio::time::sleep(self.backoff) => {}
        }
        self.backoff = (self.backoff * 2).min(self.max);
        Ok(true)
    }
}

pub async fn connect_pg(config: &Config) -> Result<Client, RelayError> {
    let (client, connection) =
        tokio_postgres::connect(&config.conninfo(), tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            warn!(error = %e, "postgres connection closed");
        }
    });
    Ok(client)
}

/// Publishes events of one session: routing, partitioning, the restart dedup and dead letters.
pub struct Publisher<'a> {
    pub config: &'a Config,
    pub metrics: &'a Metrics,
    pub pg: Client,
    pub sink: &'a mut KafkaSink,
    /// Per partition, the position of the last record of this source known to be in Kafka (read
    /// back once per session), then of the last record this session sent.
    tails: HashMap<String, Vec<Tail>>,
}

impl<'a> Publisher<'a> {
    /// Starts a session: whatever an earlier session of this process sent is settled first, so
    /// that the dedup sees it in Kafka.
    pub async fn start(
        config: &'a Config,
        metrics: &'a Metrics,
        pg: Client,
        sink: &'a mut KafkaSink,
    ) -> Result<Publisher<'a>, RelayError> {
        sink.flush(Duration::from_secs(60)).await?;
        Ok(Publisher {
            config,
            metrics,
            pg,
            sink,
            tails: HashMap::new(),
        })
    }

    /// Decodes a WAL envelope and publishes it; an undecodable one is dead-lettered.
    pub async fn publish_envelope(
        &mut self,
        position: Position,
        content: &[u8],
    ) -> Result<Option<DeliveryFuture>, RelayError> {
        match Event::decode(content) {
            Ok(event) => self.publish(position, &event).await,
            Err(e) => {
                let reason = format!("undecodable envelope: {e}");
                self.dead_letter(position, None, None, None, &[], content, &reason)
                    .await?;
                Ok(None)
            }
        }
    }

    /// Sends one event unless Kafka already has it. Returns the delivery to wait for, or None
    /// when there is nothing to wait for (skipped as a duplicate, or dead-lettered).
    pub async fn publish(
        &mut self,
        position: Position,
        event: &Event<'_>,
    ) -> Result<Option<DeliveryFuture>, RelayError> {
        let topic = self.config.kafka_topic(event.topic);
        if let Err(e) = pg_outbox_envelope::validate_topic(&topic) {
            let reason = format!("topic_template gives an invalid Kafka topic {topic:?}: {e}");
            return self.dead_letter_event(position, event, &reason).await;
        }
        let partitions = self.sink.partition_count(&topic).await?;
        let key = event.key.map(str::as_bytes);
        let partition = partition_for(key, &event.id, partitions);
        if !self.tails.contains_key(topic.as_ref()) {
            self.read_back(&topic, partitions).await?;
        }
        let tail =
            &mut self.tails.get_mut(topic.as_ref()).expect("read back above")[partition as usize];
        if tail.has(position) {
            self.metrics.skipped.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        }
        // a position the stream delivers again (a replay from the confirmed LSN) is skipped above
        tail.sent(position);
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
            return self.dead_letter_event(position, event, &reason).await;
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
        Ok(Some(self.sink.send(record)?))
    }

    /// First touch of a topic in this session: reads the last record of this source in every
    /// partition, all partitions at once (a restart waits for this before publishing).
    async fn read_back(&mut self, topic: &str, partitions: i32) -> Result<(), RelayError> {
        let sink = &*self.sink;
        let reads = (0..partitions).map(|p| async move { (p, sink.read_tail(topic, p).await) });
        let mut tails = Vec::with_capacity(partitions as usize);
        for (partition, tail) in futures_util::future::join_all(reads).await {
            let tail = tail?;
            if let Some(p) = tail.last {
                info!(%topic, partition, last_position = %p, "resuming after the last record of this source");
            }
            tails.push(tail);
        }
        self.tails.insert(topic.to_string(), tails);
        Ok(())
    }

    /// Handles one delivery report of an event committed (or begun) at `since` (Unix µs): a
    /// record the broker refuses as too large is dead-lettered, any other failure ends the session
    /// (the source replays, the dedup skips what arrived).
    pub async fn delivered(
        &mut self,
        outcome: DeliveryOutcome,
        since: i64,
    ) -> Result<(), RelayError> {
        match outcome {
            Ok(Ok(_)) => {
                self.metrics.published.fetch_add(1, Ordering::Relaxed);
                self.metrics.latency.observe(micros_since(since));
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
        Ok(())
    }

    /// Dead-letters a decoded event: there is no delivery to wait for afterwards.
    async fn dead_letter_event(
        &mut self,
        position: Position,
        event: &Event<'_>,
        reason: &str,
    ) -> Result<Option<DeliveryFuture>, RelayError> {
        let id = event.id_string();
        self.dead_letter(
            position,
            Some(&id),
            Some(event.topic),
            event.key,
            &event.headers,
            event.payload,
            reason,
        )
        .await?;
        Ok(None)
    }

    /// Durably records an event that can never be published; exactly once per source position.
    #[allow(clippy::too_many_arguments)]
    pub async fn dead_letter(
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
