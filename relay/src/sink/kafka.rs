//! The Kafka sink: one idempotent producer (`acks=all`) for the life of the process, so records of
//! a failed session that are still in flight are delivered (or fail) before the next session reads
//! the partitions back; and a second one, made when first needed, for records sent alone.
//!
//! No librdkafka call that blocks runs on a runtime thread: metadata requests, flushes and the
//! read-back go through `spawn_blocking`, and a full producer queue is waited out asynchronously.

use crate::deadletter::DeadLetter;
use crate::error::RelayError;
use crate::event::Position;
use crate::kafka::RETRY_BACKOFF_MS;
use crate::kafka::{
    fetch_partition_count, off_runtime, producer_config, KafkaConfig, RecordFormat,
};
use crate::sink::dedup::{self, Reader, ReaderContext, Tail};
use crate::sink::{Delivered, Delivery, Record, Sink};
use crate::sink::{HEADER_ID, HEADER_MAC, HEADER_POSITION, HEADER_SOURCE, HEADER_TRACE};
use crate::source::Identity;
use futures_util::{StreamExt, TryStreamExt};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::Consumer;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer, PurgeConfig};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a broker may hold a fetch of the restart read-back that found nothing new (librdkafka's
/// `fetch.wait.max.ms`).
const READ_BACK_FETCH_WAIT_MS: &str = "1";

/// Where the tests' fixtures read consumed headers from (the function lives in [`crate::kafka`]).
pub use crate::kafka::raw_headers;

pub struct KafkaSink {
    producer: FutureProducer,
    /// For records sent alone ([`Record::alone`]), made when first needed: the same settings
    /// without `enable.gapless.guarantee`, so that a refused record fails with the broker's own
    /// error (and only that record) instead of stopping the producer.
    lone: Arc<Mutex<Option<FutureProducer>>>,
    lone_config: ClientConfig,
    reader_config: ClientConfig,
    /// Consumers of the restart read-back, kept for the next partition: a client per partition
    /// (its threads, a connection, metadata) made the start-up over thousands of partitions slow.
    readers: Arc<Mutex<Vec<Reader>>>,
    partitions: HashMap<String, i32>,
    timeout: Duration,
    /// Whether a record was handed to a producer: a sink that sent nothing holds nothing, and a
    /// standby relay keeps its producer (and connections) across its one-second retries.
    sent: AtomicBool,
}

impl KafkaSink {
    pub fn new(config: &KafkaConfig, source_id: &str) -> Result<KafkaSink, RelayError> {
        let mut producer = producer_config(&config.brokers);
        producer.set(
            "message.max.bytes",
            (config.max_record_bytes + 65536).max(1_000_000).to_string(),
        );
        for (k, v) in &config.settings {
            producer.set(k, v);
        }
        // A record lives fence_timeout (see fence.rs). A record that failed while a later one of
        // its partition could still be acknowledged would be a hole below the restart dedup's
        // floor: librdkafka then stops the producer instead (a fatal error; the relay builds a
        // new one and replays, sending alone what was in flight: see Pipeline).
        producer
            .set(
                "message.timeout.ms",
                config.fence_timeout.as_millis().to_string(),
            )
            // a request that was on the wire when the relay was paused fails (times out) the
            // moment it resumes; its retry waits this long, which leaves the pause clock's ticker
            // the time to withdraw it first (see fence.rs)
            .set("retry.backoff.ms", RETRY_BACKOFF_MS)
            .set("retry.backoff.max.ms", RETRY_BACKOFF_MS);
        // one record in flight at a time: nothing behind it can be acknowledged past a hole
        let mut lone_config = producer.clone();
        lone_config.set("linger.ms", "0");
        producer.set("enable.gapless.guarantee", "true");
        let producer: FutureProducer = producer.create().map_err(|e| {
            RelayError::config("kafka settings rejected by librdkafka").caused_by(e)
        })?;
        let mut reader_config = config.client_config();
        reader_config
            .set("group.id", format!("pg_outbox-relay-{source_id}"))
            .set("enable.auto.commit", "false")
            // the read-back reads up to the end the broker reports (see dedup::read_back)
            .set("enable.partition.eof", "true")
            // the relay's records are not transactional: none is hidden behind another producer's
            // open transaction
            .set("isolation.level", "read_uncommitted")
            // a fetch that reaches the end of a partition comes back at once (the read-back stops
            // there), and Tansu 0.6 holds even a fetch with records for half this wait
            .set("fetch.wait.max.ms", READ_BACK_FETCH_WAIT_MS);
        // one reader made now: it connects to the brokers while the source connects to PostgreSQL
        let reader = reader_config.create_with_context(ReaderContext)?;
        Ok(KafkaSink {
            producer,
            lone: Arc::default(),
            lone_config,
            reader_config,
            readers: Arc::new(Mutex::new(vec![reader])),
            partitions: HashMap::new(),
            timeout: Duration::from_secs(10),
            sent: AtomicBool::new(false),
        })
    }

    /// Whether a record was ever handed to this sink's producers.
    pub fn has_sent(&self) -> bool {
        self.sent.load(Ordering::Relaxed)
    }

    /// Ends this sink for good: withdraws what its producers hold (queued, and in flight, which
    /// librdkafka will not retry) and destroys them, which closes their broker connections, so a
    /// produce request half written to a socket is never completed. What was already whole in
    /// the kernel's socket buffers reaches the broker within the network's round trip.
    pub async fn close(self) {
        self.withdraw();
        let _ = off_runtime("closing the producer", move || {
            drop(self);
            Ok(())
        })
        .await;
    }
}

impl KafkaSink {
    /// librdkafka's fatal error, if the producer has one: it can send nothing more and must be
    /// replaced.
    pub fn fatal_error(&self) -> Option<String> {
        self.producers()
            .iter()
            .find_map(|p| p.client().fatal_error())
            .map(|(code, reason)| format!("{code}: {reason}"))
    }

    /// The producer for records sent alone, made on first use.
    fn lone_producer(&self) -> Result<FutureProducer, RelayError> {
        let mut lone = self.lone.lock().unwrap_or_else(|e| e.into_inner());
        if lone.is_none() {
            *lone = Some(self.lone_config.create().map_err(|e| {
                RelayError::config("kafka settings rejected by librdkafka").caused_by(e)
            })?);
        }
        Ok(lone.clone().expect("made above"))
    }

    /// Both producers (the lone one if it was made).
    fn producers(&self) -> Vec<FutureProducer> {
        both(&self.producer, &self.lone)
    }

    /// Runs `read` off the runtime with a consumer of the restart read-back: a pooled one, or a new
    /// one. The consumer goes back to the pool once its assignment is gone (a reader also ignores
    /// a record of another partition, should one still arrive).
    async fn with_reader<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Reader) -> Result<T, RelayError> + Send + 'static,
    ) -> Result<T, RelayError> {
        let pooled = self.readers.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let reader: Reader = match pooled {
            Some(reader) => reader,
            None => self.reader_config.create_with_context(ReaderContext)?,
        };
        let readers = self.readers.clone();
        off_runtime("tail reader task", move || {
            let result = read(&reader);
            if result.is_ok() && reader.unassign().is_ok() {
                let mut pool = readers.lock().unwrap_or_else(|e| e.into_inner());
                if pool.len() < dedup::READ_BACK_CONCURRENCY {
                    pool.push(reader);
                }
            }
            result
        })
        .await
    }
}

impl Sink for KafkaSink {
    async fn partition_count(&mut self, topic: &str) -> Result<i32, RelayError> {
        if let Some(n) = self.partitions.get(topic) {
            return Ok(*n);
        }
        let producer = self.producer.clone();
        let name = topic.to_string();
        let timeout = self.timeout;
        let n = off_runtime("metadata task", move || {
            fetch_partition_count(producer.client(), &name, timeout)
        })
        .await?;
        self.partitions.insert(topic.to_string(), n);
        Ok(n)
    }

    async fn changed_partition_counts(&self) -> Vec<(String, i32, i32)> {
        let producer = self.producer.clone();
        let known = self.partitions.clone();
        let timeout = self.timeout;
        off_runtime("metadata task", move || {
            let mut changed = Vec::new();
            for (topic, was) in known {
                match fetch_partition_count(producer.client(), &topic, timeout) {
                    Ok(now) if now != was => changed.push((topic, was, now)),
                    Ok(_) => {}
                    Err(e) => tracing::debug!(%topic, error = %e, "partition check"),
                }
            }
            Ok(changed)
        })
        .await
        .unwrap_or_default()
    }

    fn forget_partition_counts(&mut self) {
        self.partitions.clear();
    }

    async fn read_tails(
        &self,
        topic: &str,
        partitions: i32,
        identity: &Identity,
        replay_from: Position,
    ) -> Result<Vec<Tail>, RelayError> {
        let (name, timeout) = (topic.to_string(), self.timeout);
        let ends = self
            .with_reader(move |reader| dedup::partition_ends(reader, &name, partitions, timeout))
            .await?;
        // only the partitions that hold records are read, READ_BACK_CONCURRENCY at a time
        let reads = ends.into_iter().enumerate().map(|(p, ends)| async move {
            if dedup::holds_nothing(ends) {
                return Ok(Tail::default());
            }
            let (topic, identity) = (topic.to_string(), identity.clone());
            self.with_reader(move |reader| {
                dedup::read_back(
                    reader,
                    &topic,
                    p as i32,
                    &identity,
                    replay_from,
                    ends,
                    timeout,
                )
            })
            .await
        });
        futures_util::stream::iter(reads)
            .buffered(dedup::READ_BACK_CONCURRENCY)
            .try_collect()
            .await
    }

    async fn send(&self, record: Record<'_>) -> Result<Delivery, RelayError> {
        self.sent.store(true, Ordering::Relaxed);
        let position = record.position.encode();
        let time = match record.format {
            RecordFormat::CloudEvents => crate::sink::rfc3339(record.created_at_micros),
            RecordFormat::PgOutbox | RecordFormat::Debezium => String::new(),
        };
        let added = record.format_headers(&time);
        let headers = record_headers(&record, &position, &added);
        // the dead letter of a refused record keeps the event's headers, not these
        let added: Vec<&'static str> = added.iter().map(|(n, _)| *n).collect();
        let mut future = FutureRecord::<[u8], [u8]>::to(record.topic)
            .partition(record.partition)
            .payload(record.payload)
            .headers(headers)
            .timestamp(record.timestamp_ms);
        if let Some(key) = record.key {
            future = future.key(key);
        }
        // a record sent alone goes through the lone producer, which it drops if it fails
        let alone = record.alone;
        let lone = alone.then(|| self.lone.clone());
        let lone_producer = if alone {
            Some(self.lone_producer()?)
        } else {
            None
        };
        let producer = lone_producer.as_ref().unwrap_or(&self.producer);
        let mut wait = Duration::from_micros(500);
        loop {
            match producer.send_result(future) {
                Ok(delivery) => {
                    return Ok(Box::pin(async move {
                        match delivery.await {
                            Ok(Ok(_)) => Delivered::Acked,
                            Ok(Err((e, msg))) => {
                                if let Some(lone) = lone {
                                    // after a refusal librdkafka moves the producer to a new
                                    // epoch, which a broker may fence: the next record gets a
                                    // new producer
                                    lone.lock().unwrap_or_else(|e| e.into_inner()).take();
                                }
                                judge_failure(e, &msg, alone, &added)
                            }
                            Err(_) => Delivered::Failed(RelayError::transient(
                                "producer dropped a delivery",
                            )),
                        }
                    }));
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    // librdkafka's queue is full: its own thread delivers meanwhile
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_millis(20));
                    future = back;
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
    }

    async fn flush(&self, timeout: Duration) -> Result<(), RelayError> {
        let producers = self.producers();
        off_runtime("flush task", move || {
            for producer in producers {
                producer.flush(timeout)?;
            }
            Ok(())
        })
        .await
    }

    fn withdraw(&self) {
        self.producers().iter().for_each(purge);
    }

    fn withdrawal(&self) -> Option<crate::fence::OnPause> {
        let (producer, lone) = (self.producer.clone(), self.lone.clone());
        Some(Box::new(move || {
            both(&producer, &lone).iter().for_each(purge);
            tracing::warn!(
                "this relay was paused beyond the pause limit: what its producer held is withdrawn"
            );
        }))
    }
}

/// The producer and the lone one, if it was made.
fn both(producer: &FutureProducer, lone: &Mutex<Option<FutureProducer>>) -> Vec<FutureProducer> {
    let lone = lone.lock().unwrap_or_else(|e| e.into_inner()).clone();
    std::iter::once(producer.clone()).chain(lone).collect()
}

/// Gives up what the producer holds, queued and in flight (see [`Sink::withdraw`]).
fn purge(producer: &FutureProducer) {
    producer.purge(PurgeConfig::default().queue().inflight());
}

/// A record the broker refuses for good (too large, invalid, a timestamp out of range, a null key on
/// a compacted topic, a topic the relay may not write) can never be delivered: it is dead-lettered,
/// but only when it was sent alone. The broker refuses a whole batch for one bad record, so a
/// refusal of a record sent with others says nothing about that record: it ends the session like
/// any other failure (the source replays, the dedup skips what arrived, and what was in flight is
/// sent alone).
fn judge_failure(e: KafkaError, msg: &OwnedMessage, alone: bool, added: &[&str]) -> Delivered {
    match e {
        KafkaError::MessageProduction(
            code @ (RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidMessage
            | RDKafkaErrorCode::InvalidRecord
            | RDKafkaErrorCode::InvalidTimestamp
            | RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::PolicyViolation),
        ) if alone => {
            let reason = format!("broker refused the record: {code} ({code:?})");
            match dead_letter_of(msg, &reason, added) {
                Some(letter) => Delivered::Rejected(Box::new(letter)),
                None => Delivered::Failed(RelayError::transient("failed record without position")),
            }
        }
        e => Delivered::Failed(RelayError::transient("delivery failed").caused_by(e)),
    }
}

/// The relay's headers, then those of the record format (`added`), then the user's.
fn record_headers(
    record: &Record<'_>,
    position: &[u8; 33],
    added: &[(&'static str, &[u8])],
) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new_with_capacity(record.headers.len() + 5 + added.len())
        .insert(Header {
            key: HEADER_ID,
            value: Some(record.event_id.as_bytes()),
        })
        .insert(Header {
            key: HEADER_POSITION,
            value: Some(&position[..]),
        })
        .insert(Header {
            key: HEADER_SOURCE,
            value: Some(record.source_id.as_bytes()),
        })
        .insert(Header {
            key: HEADER_MAC,
            value: Some(record.mac),
        });
    if let Some(trace) = record.trace {
        headers = headers.insert(Header {
            key: HEADER_TRACE,
            value: Some(trace.as_bytes()),
        });
    }
    for (name, value) in added.iter().chain(record.headers) {
        headers = headers.insert(Header {
            key: name,
            value: Some(*value),
        });
    }
    headers
}

/// Rebuilds the dead letter of a record the broker refused, from the record itself.
fn dead_letter_of(msg: &OwnedMessage, reason: &str, added: &[&str]) -> Option<DeadLetter> {
    // what the record format added is not the event's (the first of each name: the event had none)
    let mut added = added.to_vec();
    let mut id = None;
    let mut position = None;
    let mut headers = Vec::new();
    if let Some(hs) = msg.headers() {
        for h in hs.iter() {
            let value = h.value.unwrap_or_default();
            match h.key {
                HEADER_ID => id = std::str::from_utf8(value).ok().map(str::to_string),
                HEADER_POSITION => {
                    position = std::str::from_utf8(value).ok().and_then(Position::parse)
                }
                k if k.starts_with("pg_outbox-") => {}
                k if added.contains(&k) => added.retain(|a| *a != k),
                k => headers.push((k.to_string(), String::from_utf8_lossy(value).into_owned())),
            }
        }
    }
    Some(DeadLetter {
        position: position?,
        event_id: id.and_then(|s| uuid::Uuid::parse_str(&s).ok()),
        topic: Some(msg.topic().to_string()),
        key: msg
            .key()
            .and_then(|k| std::str::from_utf8(k).ok())
            .map(str::to_string),
        headers,
        payload: msg.payload().unwrap_or_default().to_vec(),
        reason: reason.to_string(),
    })
}
