//! Ingest: Kafka topics -> `inbox.messages` + `inbox.offsets`, one PostgreSQL transaction per batch.
//!
//! Invariants:
//! - The database, not the broker, holds the consumer position: on start every partition is
//!   assigned at the offset stored in `inbox.offsets` (or the beginning), and a batch's messages
//!   and its new offsets commit together. A crash anywhere re-reads exactly the uncommitted tail.
//! - A message is identified by its `pg_outbox-id` header, or else by `topic/partition/offset`;
//!   `(consumer, topic, message_id)` is unique, so a duplicate already in Kafka is recorded once.
//! - Poison input (payload over `max_record_bytes`, a key or header that is not UTF-8 or holds a
//!   NUL byte, which PostgreSQL text and jsonb cannot store) is recorded in the `dead` state with
//!   the reason, without the part that could not be stored; its offset is stored like any other, so
//!   the partition keeps flowing and nothing is silently skipped.
//! - PostgreSQL refusing a batch for its content (SQLSTATE class 22, 23 or 54: a value, a
//!   constraint, a limit) is about one message, not the connection: the batch is written again one
//!   message at a time, and a message refused alone is recorded `dead` under its coordinates with
//!   only the SQLSTATE and PostgreSQL's message as its reason (key, headers and payload stay in
//!   Kafka at those coordinates). If even that is refused, the ingest stops: the database, not the
//!   message, is what needs fixing.

use crate::config::{Config, IngestConfig};
use crate::error::RelayError;
use crate::kafka::{fetch_partition_count, fetch_topic_id, off_runtime, raw_headers};
use crate::postgres;
use crate::retry::Retry;
use crate::sink::HEADER_ID;
use crate::telemetry::{database, seconds_since, Metrics, PartitionLabels, TopicLabels};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Runs ingest sessions until shutdown or a permanent error.
pub async fn run(
    config: &Config,
    ingest: &IngestConfig,
    shutdown: CancellationToken,
    metrics: Arc<Metrics>,
) -> Result<(), RelayError> {
    let mut retry = Retry::new(config.source.backoff_max);
    loop {
        let started = Instant::now();
        let result = session(config, ingest, &shutdown, &metrics).await;
        if !retry.after(result, started, &shutdown, &metrics).await? {
            return Ok(());
        }
    }
}

/// One row for `inbox.messages`.
struct Row {
    message_id: String,
    topic: String,
    partition: i32,
    offset: i64,
    /// The record's timestamp (Unix ms), part of the id of a message without one of the relay's.
    timestamp_ms: Option<i64>,
    key: Option<String>,
    headers: serde_json::Value,
    payload: Option<Vec<u8>>,
    dead_reason: Option<String>,
}

impl Row {
    /// The id of a message without one of the relay's: the coordinates and the record's
    /// timestamp, so that a topic re-created (offsets from 0 again) does not collide with what was
    /// received before.
    fn coordinates_id(
        topic: &str,
        partition: i32,
        offset: i64,
        timestamp_ms: Option<i64>,
    ) -> String {
        let at = timestamp_ms.map(|ms| format!("@{ms}")).unwrap_or_default();
        format!("{topic}/{partition}/{offset}{at}")
    }

    /// What is kept of a message PostgreSQL refused to store: its coordinates and why, dead.
    fn refused(&self, code: &str, message: &str) -> Row {
        Row {
            message_id: Row::coordinates_id(
                &self.topic,
                self.partition,
                self.offset,
                self.timestamp_ms,
            ),
            topic: self.topic.clone(),
            partition: self.partition,
            offset: self.offset,
            timestamp_ms: self.timestamp_ms,
            key: None,
            headers: serde_json::Value::Object(serde_json::Map::new()),
            payload: None,
            dead_reason: Some(format!(
                "PostgreSQL refused the message (SQLSTATE {code}: {message}); key, headers and \
                 payload are in Kafka at {}[{}] offset {}",
                self.topic, self.partition, self.offset
            )),
        }
    }
}

/// Text PostgreSQL cannot store: a NUL byte (text refuses it with 22021, jsonb with 22P05).
fn has_nul(text: &str) -> bool {
    text.contains('\0')
}

fn to_row(msg: &BorrowedMessage<'_>, max_bytes: usize) -> Row {
    let mut dead_reason = None;
    let mut message_id = None;
    let mut headers = serde_json::Map::new();
    for (i, (name, value)) in raw_headers(msg).into_iter().enumerate() {
        // (a name comes NUL-terminated from librdkafka: it holds no NUL)
        let Ok(name) = std::str::from_utf8(name) else {
            dead_reason = Some(format!(
                "header name {:?} is not valid UTF-8",
                String::from_utf8_lossy(name)
            ));
            continue;
        };
        match std::str::from_utf8(value.unwrap_or_default()) {
            Ok(v) if has_nul(v) => {
                dead_reason = Some(format!(
                    "header {name:?} contains a NUL byte, which PostgreSQL cannot store"
                ));
            }
            Ok(v) => {
                // the relay writes the id as the first header; one further on is the writer's
                if i == 0 && name == HEADER_ID && !v.is_empty() && v.len() <= 200 {
                    message_id = Some(v.to_string());
                }
                headers.insert(name.to_string(), v.into());
            }
            Err(_) => {
                dead_reason = Some(format!("header {name:?} is not valid UTF-8"));
            }
        }
    }
    let key = match msg.key().map(std::str::from_utf8) {
        None => None,
        Some(Ok(k)) if has_nul(k) => {
            dead_reason = Some("key contains a NUL byte, which PostgreSQL cannot store".into());
            None
        }
        Some(Ok(k)) => Some(k.to_string()),
        Some(Err(_)) => {
            dead_reason = Some("key is not valid UTF-8".into());
            None
        }
    };
    let payload = msg.payload().map(<[u8]>::to_vec);
    let size = payload.as_ref().map_or(0, Vec::len);
    let payload = if size > max_bytes {
        dead_reason = Some(format!(
            "payload of {size} bytes exceeds max_record_bytes ({max_bytes})"
        ));
        None
    } else {
        payload
    };
    let timestamp_ms = msg.timestamp().to_millis();
    Row {
        message_id: message_id.unwrap_or_else(|| {
            Row::coordinates_id(msg.topic(), msg.partition(), msg.offset(), timestamp_ms)
        }),
        topic: msg.topic().to_string(),
        partition: msg.partition(),
        offset: msg.offset(),
        timestamp_ms,
        key,
        headers: serde_json::Value::Object(headers),
        payload,
        dead_reason,
    }
}

async fn session(
    config: &Config,
    ingest: &IngestConfig,
    shutdown: &CancellationToken,
    metrics: &Metrics,
) -> Result<(), RelayError> {
    let consumer = ingest.consumer.as_str();
    let max_bytes = config.kafka.max_record_bytes;
    let pg = postgres::connect(&config.postgres).await?;
    let mut cc = config.kafka.client_config();
    cc.set("group.id", format!("pg_outbox-ingest-{consumer}"))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        // prefetch at most 16 MB (librdkafka's default is 64 MB): a batch is a few hundred messages
        .set("queued.max.messages.kbytes", "16384");
    let kafka: Arc<StreamConsumer> =
        Arc::new(cc.create().map_err(|e| {
            RelayError::config("kafka settings rejected by librdkafka").caused_by(e)
        })?);
    let mut cursors: HashMap<(String, i32), Cursor> = HashMap::new();
    assign_new_partitions(&pg, &kafka, ingest, &mut cursors).await?;
    metrics.healthy.store(true, Ordering::Relaxed);
    info!(consumer, topics = ?ingest.topics, "ingesting");
    let mut batch = Vec::with_capacity(ingest.batch);
    let mut idle_check = tokio::time::interval(IDLE / 4);
    let mut partition_check = tokio::time::interval(PARTITION_CHECK);
    partition_check.reset();
    let mut sample = tokio::time::interval(database::EVERY);
    sample.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut done_since = None;
    loop {
        let first = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = sample.tick() => {
                // figures for /metrics: a failure is logged, and the ingest goes on
                let sampled = async {
                    sample_lag(&pg, &kafka, consumer, &cursors, metrics).await?;
                    database::sample_inbox_done(&pg, consumer, done_since, metrics).await
                };
                match sampled.await {
                    Ok(now) => done_since = Some(now),
                    Err(e) => warn!(error = %e, "could not sample the ingest's lag for /metrics"),
                }
                continue;
            }
            _ = partition_check.tick() => {
                assign_new_partitions(&pg, &kafka, ingest, &mut cursors).await?;
                continue;
            }
            _ = idle_check.tick() => {
                for ((topic, partition), cursor) in &mut cursors {
                    match cursor.idle(Instant::now()) {
                        Idle::Wait => {}
                        Idle::Seek(offset) => {
                            debug!(topic, partition, expected = cursor.next, seek_to = ?offset,
                                   "nothing served at the stored offset; seeking back");
                            seek(&kafka, topic, *partition, offset).await?;
                        }
                        Idle::Suspect => {
                            let next = cursor.next.unwrap_or_default();
                            let end = high_watermark(&kafka, topic, *partition).await?;
                            if end < next {
                                return Err(RelayError::permanent(format!(
                                    "{topic}[{partition}] ends at offset {end}, but consumer \"{consumer}\" \
                                     stored {next} as its next offset: the topic was deleted and re-created, \
                                     or the brokers are another cluster. Reading on would skip every message \
                                     below {next}. Check, then rewind deliberately: SELECT \
                                     inbox.store_offset('{consumer}', '{topic}', {partition}, 0, force => true)"
                                )));
                            }
                            cursor.cleared();
                        }
                    }
                }
                continue;
            }
            m = kafka.recv() => m?,
        };
        let reseek = take(&mut cursors, &first, max_bytes, &mut batch);
        drop(first);
        reseek_to(&kafka, reseek).await?;
        let linger = tokio::time::sleep(Duration::from_millis(20));
        tokio::pin!(linger);
        while batch.len() < ingest.batch {
            tokio::select! {
                _ = &mut linger => break,
                m = kafka.recv() => {
                    let reseek = take(&mut cursors, &m?, max_bytes, &mut batch);
                    reseek_to(&kafka, reseek).await?;
                }
            }
        }
        if batch.is_empty() {
            continue;
        }
        deliver(&pg, consumer, &batch).await?;
        count_ingested(&batch, metrics);
        batch.clear();
    }
}

/// Counts a committed batch per topic, and observes each record's time from its Kafka timestamp
/// to now (just after the commit): `pg_outbox_relay_ingest_delay_seconds`.
fn count_ingested(batch: &[Row], metrics: &Metrics) {
    let mut per_topic: HashMap<&str, (u64, u64)> = HashMap::new();
    for row in batch {
        let (all, dead) = per_topic.entry(row.topic.as_str()).or_default();
        *all += 1;
        *dead += u64::from(row.dead_reason.is_some());
        if let Some(ms) = row.timestamp_ms {
            metrics
                .ingest_delay
                .observe(seconds_since(ms.saturating_mul(1000)));
        }
    }
    for (topic, (all, dead)) in per_topic {
        let labels = TopicLabels {
            topic: topic.to_string(),
        };
        metrics.ingested.get_or_create(&labels).inc_by(all);
        if dead > 0 {
            metrics.ingested_dead.get_or_create(&labels).inc_by(dead);
        }
    }
}

/// Sets `pg_outbox_relay_ingest_lag_messages` of every assigned partition: its high watermark
/// (one ListOffsets request per broker for all of them) minus the next offset the database stored
/// for it (0 when none is stored yet: an overestimate when retention removed the partition's
/// start).
async fn sample_lag(
    pg: &Client,
    kafka: &Arc<StreamConsumer>,
    consumer: &str,
    cursors: &HashMap<(String, i32), Cursor>,
    metrics: &Metrics,
) -> Result<(), RelayError> {
    if cursors.is_empty() {
        return Ok(());
    }
    let stored: HashMap<(String, i32), i64> = pg
        .query(
            "SELECT topic, partition, next_offset FROM inbox.offsets WHERE consumer = $1",
            &[&consumer],
        )
        .await?
        .iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect();
    let mut latest = TopicPartitionList::new();
    for (topic, partition) in cursors.keys() {
        // a timestamp of -1 (Offset::End) asks for the partition's end
        latest.add_partition_offset(topic, *partition, Offset::End)?;
    }
    let k = kafka.clone();
    let ends = off_runtime("watermark task", move || {
        Ok(k.offsets_for_times(latest, Duration::from_secs(10))?)
    })
    .await?;
    for end in ends.elements() {
        let Offset::Offset(end_offset) = end.offset() else {
            continue;
        };
        let place = (end.topic().to_string(), end.partition());
        let next = stored.get(&place).copied().unwrap_or(0);
        metrics
            .ingest_lag
            .get_or_create(&PartitionLabels::new(end.topic(), end.partition()))
            .set((end_offset - next).max(0));
    }
    Ok(())
}

/// How often the topics' partition counts are looked at again, so that partitions added to a topic
/// are read without a restart.
const PARTITION_CHECK: Duration = Duration::from_secs(10);

/// Assigns every partition of the ingested topics that is not assigned yet, each at the offset
/// the database stored for it (or its beginning): the stored offsets are the truth, the broker's
/// committed offsets are never used.
async fn assign_new_partitions(
    pg: &Client,
    kafka: &Arc<StreamConsumer>,
    ingest: &IngestConfig,
    cursors: &mut HashMap<(String, i32), Cursor>,
) -> Result<(), RelayError> {
    let mut counts = Vec::with_capacity(ingest.topics.len());
    for topic in &ingest.topics {
        let (k, t) = (kafka.clone(), topic.clone());
        let (n, id) = off_runtime("metadata task", move || {
            let n = fetch_partition_count(k.client(), &t, Duration::from_secs(10))?;
            Ok((n, fetch_topic_id(k.client(), &t, Duration::from_secs(10))?))
        })
        .await?;
        if let Some(id) = id {
            check_topic_identity(pg, &ingest.consumer, topic, &id).await?;
        }
        counts.push((topic, n));
    }
    if counts
        .iter()
        .all(|(topic, n)| (0..*n).all(|p| cursors.contains_key(&(topic.to_string(), p))))
    {
        return Ok(());
    }
    let stored: HashMap<(String, i32), i64> = pg
        .query(
            "SELECT topic, partition, next_offset FROM inbox.offsets WHERE consumer = $1",
            &[&ingest.consumer],
        )
        .await?
        .iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect();
    let initial = cursors.is_empty();
    let mut tpl = TopicPartitionList::new();
    for (topic, n) in counts {
        for p in 0..n {
            let place = (topic.to_string(), p);
            if cursors.contains_key(&place) {
                continue;
            }
            let next = stored.get(&place).copied();
            tpl.add_partition_offset(topic, p, next.map_or(Offset::Beginning, Offset::Offset))?;
            if !initial {
                info!(%topic, partition = p, "a partition was added to the topic; reading it");
            }
            cursors.insert(place, Cursor::new(next));
        }
    }
    kafka.incremental_assign(&tpl)?;
    Ok(())
}

/// Records the id of `topic` for `consumer` the first time, and stops the ingest if the topic has
/// another id now: it was deleted and created again (or the brokers are another cluster), so the
/// stored offsets belong to another topic and reading on from them would skip messages.
async fn check_topic_identity(
    pg: &Client,
    consumer: &str,
    topic: &str,
    id: &str,
) -> Result<(), RelayError> {
    let recorded: Option<String> = pg
        .query_opt(
            "SELECT topic_id FROM inbox.topics WHERE consumer = $1 AND topic = $2",
            &[&consumer, &topic],
        )
        .await?
        .map(|r| r.get(0));
    match recorded {
        None => {
            pg.execute(
                "INSERT INTO inbox.topics (consumer, topic, topic_id) VALUES ($1, $2, $3) \
                 ON CONFLICT DO NOTHING",
                &[&consumer, &topic, &id],
            )
            .await?;
            Ok(())
        }
        Some(recorded) if recorded == id => Ok(()),
        Some(recorded) => Err(RelayError::permanent(format!(
            "topic {topic} is not the topic consumer \"{consumer}\" stored its offsets for: its id was \
             {recorded} and is {id} now, so it was deleted and created again, or the brokers are \
             another cluster. Reading on from the stored offsets would skip messages of the new \
             topic. Check, then read it from its beginning (message ids keep what the inbox holds \
             from being recorded twice): SELECT inbox.forget_topic('{consumer}', '{topic}')"
        ))),
    }
}

/// The partition's high watermark (a lower bound of its end on some brokers).
async fn high_watermark(
    kafka: &Arc<StreamConsumer>,
    topic: &str,
    partition: i32,
) -> Result<i64, RelayError> {
    let (kafka, t) = (kafka.clone(), topic.to_string());
    off_runtime("watermark task", move || {
        Ok(kafka
            .fetch_watermarks(&t, partition, Duration::from_secs(10))?
            .1)
    })
    .await
}

/// A partition to seek back: (topic, partition, offset).
type Reseek = Option<(String, i32, Offset)>;

/// Adds a message to the batch unless its partition's cursor says otherwise; returns the seek the
/// cursor asks for, if any.
fn take(
    cursors: &mut HashMap<(String, i32), Cursor>,
    msg: &BorrowedMessage<'_>,
    max_bytes: usize,
    batch: &mut Vec<Row>,
) -> Reseek {
    let cursor = cursors.get_mut(&(msg.topic().to_string(), msg.partition()))?;
    match cursor.judge(msg.offset()) {
        Verdict::Take => batch.push(to_row(msg, max_bytes)),
        Verdict::Skip => {}
        Verdict::Reseek(offset) => {
            warn!(
                topic = msg.topic(),
                partition = msg.partition(),
                expected = cursor.next.unwrap_or_default(),
                got = msg.offset(),
                seek_to = ?offset,
                "broker served past the stored offset; seeking back"
            );
            return Some((msg.topic().to_string(), msg.partition(), offset));
        }
    }
    None
}

async fn reseek_to(kafka: &Arc<StreamConsumer>, reseek: Reseek) -> Result<(), RelayError> {
    match reseek {
        Some((topic, partition, offset)) => seek(kafka, &topic, partition, offset).await,
        None => Ok(()),
    }
}

/// Seeks a partition (a blocking librdkafka call, run off the runtime).
async fn seek(
    kafka: &Arc<StreamConsumer>,
    topic: &str,
    partition: i32,
    offset: Offset,
) -> Result<(), RelayError> {
    let (kafka, t) = (kafka.clone(), topic.to_string());
    off_runtime("seek task", move || {
        kafka
            .seek(&t, partition, offset, Duration::from_secs(10))
            .map_err(|e| {
                RelayError::transient(format!("seeking {t}[{partition}] to {offset:?}"))
                    .caused_by(e)
            })
    })
    .await
}

/// How long a partition may serve nothing at its stored offset before the ingest seeks back.
const IDLE: Duration = Duration::from_secs(2);

/// Per partition: the next offset the database expects, and whether the broker was seen serving
/// from there.
///
/// Kafka returns the whole batch containing a fetch offset and the client drops what precedes it.
/// Some brokers (Tansu 0.6) instead start at the *next* batch: a message beyond the expected
/// offset arrives, or, when that batch is the partition's last, nothing at all. Either would lose
/// the rest of the batch. So until the partition serves its expected offset or anything before
/// it, a message beyond it, or `IDLE` without any message, makes the ingest seek further back
/// (doubling the distance) and skip what it already has. Once verified, fetching proceeds batch
/// by batch, and a gap is the log's own (compaction, transaction markers), accepted.
struct Cursor {
    next: Option<i64>,
    verified: bool,
    lookback: i64,
    /// When the partition was assigned or last sought.
    since: Instant,
    /// Skipping what is stored, not yet at the stored offset: when the last message came.
    catching_up: Option<Instant>,
}

/// What an idle partition calls for.
#[derive(Debug)]
enum Idle {
    Wait,
    Seek(Offset),
    /// The partition seems to end before the stored offset: compare with its end.
    Suspect,
}

/// How long a partition may stop short of the stored offset before its end is checked.
const SHORT: Duration = Duration::from_secs(5);

enum Verdict {
    Take,
    Skip,
    Reseek(Offset),
}

impl Cursor {
    fn new(next: Option<i64>) -> Cursor {
        Cursor {
            next,
            verified: next.is_none_or(|n| n == 0),
            lookback: 256,
            since: Instant::now(),
            catching_up: None,
        }
    }

    /// The partition's end is at or beyond the stored offset after all: wait on.
    fn cleared(&mut self) {
        if self.catching_up.is_some() {
            self.catching_up = Some(Instant::now());
        } else {
            self.verified = true;
        }
    }

    fn judge(&mut self, offset: i64) -> Verdict {
        let Some(next) = self.next else {
            self.next = Some(offset + 1);
            return Verdict::Take;
        };
        if offset < next {
            // served from before the expected offset: the fetch goes on from here in order
            self.verified = true;
            self.catching_up = (offset + 1 < next).then(Instant::now);
            return Verdict::Skip;
        }
        self.catching_up = None;
        if offset > next && !self.verified {
            // (librdkafka drops messages fetched before a seek, so this is the broker's answer)
            if let Some(to) = self.back(next) {
                return Verdict::Reseek(to);
            }
            warn!(
                expected = next,
                got = offset,
                "no message at the stored offset (a gap in the log, or retention)"
            );
        }
        self.verified = true;
        self.next = Some(offset + 1);
        Verdict::Take
    }

    /// Where to seek when nothing has been served for `IDLE` before the partition was verified;
    /// or whether the partition seems to end before the stored offset (nothing at all from its
    /// beginning, or nothing more for `SHORT` while still below the stored offset).
    fn idle(&mut self, now: Instant) -> Idle {
        if let Some(last) = self.catching_up {
            return if now.duration_since(last) >= SHORT {
                Idle::Suspect
            } else {
                Idle::Wait
            };
        }
        if self.verified || now.duration_since(self.since) < IDLE {
            return Idle::Wait;
        }
        let Some(next) = self.next else {
            return Idle::Wait;
        };
        match self.back(next) {
            Some(to) => Idle::Seek(to),
            // nothing at all from the beginning: emptied by retention, or re-created
            None => Idle::Suspect,
        }
    }

    /// The next seek-back target, doubling the distance; None once the beginning was tried.
    fn back(&mut self, next: i64) -> Option<Offset> {
        self.since = Instant::now();
        if self.lookback <= next {
            let to = next - self.lookback;
            self.lookback *= 2;
            return Some(Offset::Offset(to));
        }
        if self.lookback < i64::MAX / 2 {
            // last resort: the very beginning, which every broker serves from its first batch
            self.lookback = i64::MAX / 2;
            return Some(Offset::Beginning);
        }
        None
    }
}

/// Writes a batch ([`write_batch`]). When PostgreSQL refuses it for the content of a message
/// ([`refuses_content`]), the messages are written again one at a time, in order, and a message
/// refused alone is written in the dead state as [`Row::refused`]; if PostgreSQL refuses that
/// too, the fault is not the message's and the ingest stops.
async fn deliver(pg: &Client, consumer: &str, batch: &[Row]) -> Result<(), RelayError> {
    match write_batch(pg, consumer, batch).await {
        Err(e) if batch.len() > 1 && refuses_content(&e) => {}
        Err(e) if refuses_content(&e) => return refused(pg, consumer, &batch[0], &e).await,
        result => return Ok(result?),
    }
    for row in batch {
        match write_batch(pg, consumer, std::slice::from_ref(row)).await {
            Err(e) if refuses_content(&e) => refused(pg, consumer, row, &e).await?,
            result => result?,
        }
    }
    Ok(())
}

/// Writes what is kept of a message PostgreSQL refused ([`Row::refused`]).
async fn refused(
    pg: &Client,
    consumer: &str,
    row: &Row,
    e: &tokio_postgres::Error,
) -> Result<(), RelayError> {
    let (code, message) = e
        .as_db_error()
        .map(|d| (d.code().code(), d.message()))
        .unwrap_or_default();
    // the coordinates and the code only: PostgreSQL's message may quote the message's bytes
    warn!(
        topic = row.topic,
        partition = row.partition,
        offset = row.offset,
        sqlstate = code,
        "postgresql refused a message; it is kept in the dead state"
    );
    write_batch(pg, consumer, &[row.refused(code, message)])
        .await
        .map_err(|again| {
            RelayError::permanent(format!(
                "PostgreSQL refuses even the dead-state record of {}[{}] offset {} (first refusal: \
                 SQLSTATE {code}), so the database, not the message, is at fault: check \
                 inbox.messages' constraints and triggers and the consumer name",
                row.topic, row.partition, row.offset
            ))
            .caused_by(again)
        })
}

/// SQLSTATE classes that mean "this data", not "this connection" or "this server": 22 (data
/// exception, e.g. 22021 a NUL byte in text, 22P05 in jsonb), 23 (integrity constraint), 54
/// (program limit exceeded). Retrying the same batch can never help.
fn refuses_content(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| content_class(c.code()))
}

fn content_class(code: &str) -> bool {
    ["22", "23", "54"]
        .iter()
        .any(|class| code.starts_with(class))
}

/// Messages and the partitions' next offsets, in one transaction.
async fn write_batch(
    pg: &Client,
    consumer: &str,
    batch: &[Row],
) -> Result<(), tokio_postgres::Error> {
    let ids: Vec<&str> = batch.iter().map(|r| r.message_id.as_str()).collect();
    let topics: Vec<&str> = batch.iter().map(|r| r.topic.as_str()).collect();
    let partitions: Vec<i32> = batch.iter().map(|r| r.partition).collect();
    let offsets: Vec<i64> = batch.iter().map(|r| r.offset).collect();
    let keys: Vec<Option<&str>> = batch.iter().map(|r| r.key.as_deref()).collect();
    let headers: Vec<&serde_json::Value> = batch.iter().map(|r| &r.headers).collect();
    let payloads: Vec<Option<&[u8]>> = batch.iter().map(|r| r.payload.as_deref()).collect();
    let reasons: Vec<Option<&str>> = batch.iter().map(|r| r.dead_reason.as_deref()).collect();
    // one statement, so one transaction: the extension queues the messages and stores each
    // partition's next offset (highest offset + 1, never backwards) by the inbox's own rules
    pg.execute(
        "SELECT inbox.deliver_batch($1, $2::text[], $3::text[], $4::int[], $5::bigint[], \
                                    $6::text[], $7::jsonb[], $8::bytea[], $9::text[])",
        &[
            &consumer,
            &ids,
            &topics,
            &partitions,
            &offsets,
            &keys,
            &headers,
            &payloads,
            &reasons,
        ],
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_takes_the_expected_offset_and_skips_what_is_stored() {
        let mut c = Cursor::new(Some(10));
        assert!(matches!(c.judge(8), Verdict::Skip));
        assert!(matches!(c.judge(10), Verdict::Take));
        assert!(matches!(c.judge(11), Verdict::Take));
        // verified: a later gap is the log's own
        assert!(matches!(c.judge(20), Verdict::Take));
        assert!(matches!(c.judge(20), Verdict::Skip));
    }

    #[test]
    fn cursor_seeks_back_when_the_broker_serves_past_the_stored_offset() {
        let mut c = Cursor::new(Some(1000));
        assert!(matches!(
            c.judge(1050),
            Verdict::Reseek(Offset::Offset(744))
        ));
        assert!(matches!(
            c.judge(1050),
            Verdict::Reseek(Offset::Offset(488))
        ));
        assert!(matches!(c.judge(1050), Verdict::Reseek(Offset::Beginning)));
        // served from before the stored offset now: skip up to it, then take
        assert!(matches!(c.judge(0), Verdict::Skip));
        assert!(matches!(c.judge(1000), Verdict::Take));
    }

    #[test]
    fn a_gap_at_the_stored_offset_is_accepted_after_reading_from_the_beginning() {
        let mut c = Cursor::new(Some(10));
        assert!(matches!(c.judge(12), Verdict::Reseek(Offset::Beginning)));
        assert!(matches!(c.judge(3), Verdict::Skip));
        // offsets 10 and 11 do not exist (a transaction marker, compaction): take 12, not skip it
        assert!(matches!(c.judge(12), Verdict::Take));
        assert!(matches!(c.judge(13), Verdict::Take));
    }

    #[test]
    fn a_partition_serving_nothing_at_the_stored_offset_is_sought_back() {
        let mut c = Cursor::new(Some(1000));
        let t0 = c.since;
        assert!(matches!(
            c.idle(t0 + Duration::from_millis(500)),
            Idle::Wait
        ));
        assert!(matches!(c.idle(t0 + IDLE), Idle::Seek(Offset::Offset(744))));
        // the timer restarts at each seek
        assert!(matches!(
            c.idle(c.since + Duration::from_millis(10)),
            Idle::Wait
        ));
        // served from before the expected offset: verified, no more idle seeks
        assert!(matches!(c.judge(800), Verdict::Skip));
        assert!(matches!(c.judge(999), Verdict::Skip));
        assert!(matches!(c.idle(c.since + IDLE * 10), Idle::Wait));
        assert!(matches!(c.judge(1000), Verdict::Take));
    }

    #[test]
    fn an_empty_partition_is_suspect_after_the_beginning_unless_its_end_clears_it() {
        let mut c = Cursor::new(Some(10));
        assert!(matches!(
            c.idle(c.since + IDLE),
            Idle::Seek(Offset::Beginning)
        ));
        assert!(matches!(c.idle(c.since + IDLE), Idle::Suspect));
        // its end is at the stored offset (retention emptied it): take what comes
        c.cleared();
        assert!(c.verified);
        assert!(matches!(c.idle(c.since + IDLE * 10), Idle::Wait));
        assert!(matches!(c.judge(12), Verdict::Take));
    }

    #[test]
    fn a_partition_that_stops_short_of_the_stored_offset_is_suspect() {
        let mut c = Cursor::new(Some(500));
        assert!(matches!(c.judge(0), Verdict::Skip));
        assert!(matches!(c.judge(99), Verdict::Skip));
        let last = c.catching_up.expect("catching up");
        assert!(matches!(c.idle(last + Duration::from_secs(1)), Idle::Wait));
        assert!(matches!(c.idle(last + SHORT), Idle::Suspect));
        // reaching the stored offset ends the suspicion
        assert!(matches!(c.judge(499), Verdict::Skip));
        assert!(matches!(c.idle(last + SHORT * 10), Idle::Wait));
    }

    #[test]
    fn only_data_integrity_and_limit_errors_are_a_messages_own() {
        for code in ["22021", "22P05", "22001", "23505", "23514", "54000"] {
            assert!(content_class(code), "{code}");
        }
        // the connection, the server, the role, a conflict worth retrying
        for code in [
            "08006", "57P01", "53300", "42501", "40001", "40P01", "XX000",
        ] {
            assert!(!content_class(code), "{code}");
        }
    }

    #[test]
    fn a_refused_message_is_kept_by_its_coordinates_only() {
        let row = Row {
            message_id: "id".into(),
            topic: "t".into(),
            partition: 2,
            offset: 7,
            timestamp_ms: Some(1000),
            key: Some("k".into()),
            headers: serde_json::json!({"h": "v"}),
            payload: Some(b"secret".to_vec()),
            dead_reason: None,
        };
        let dead = row.refused("23514", "new row violates check constraint");
        assert_eq!(dead.message_id, "t/2/7@1000");
        assert_eq!((dead.key, dead.payload), (None, None));
        assert_eq!(dead.headers, serde_json::json!({}));
        let reason = dead.dead_reason.unwrap();
        assert!(
            reason.contains("SQLSTATE 23514") && reason.contains("t[2] offset 7"),
            "{reason}"
        );
        assert!(!reason.contains("secret"));
    }

    #[test]
    fn a_partition_without_stored_offset_takes_everything() {
        let mut c = Cursor::new(None);
        assert!(matches!(c.judge(5), Verdict::Take));
        assert!(matches!(c.judge(6), Verdict::Take));
    }
}
