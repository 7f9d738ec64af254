//! The Kafka sink: an idempotent producer (`acks=all`) plus the restart dedup.
//!
//! Every record carries its source position (`pg_outbox-position`: commit LSN and index in the
//! transaction, or xid and seq for the poll source) and source id (`pg_outbox-source`). Per partition, records are written in position
//! order (one producer, idempotence keeps the order through retries). After any restart, before the
//! first write to a partition, [`KafkaSink::last_position`] reads that partition's last record of this
//! source; every event at or before that position is already in Kafka and is skipped. That makes the
//! at-least-once replay from the slot exactly-once in Kafka without broker transactions.

use crate::config::Config;
use crate::error::RelayError;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::time::{Duration, Instant};

pub const HEADER_ID: &str = "pg_outbox-id";
pub const HEADER_POSITION: &str = "pg_outbox-position";
pub const HEADER_SOURCE: &str = "pg_outbox-source";
pub const HEADER_TRACE: &str = "traceparent";

/// Where an event sits in its source, totally ordered in the source's publishing order.
/// WAL source: (commit LSN of the transaction, index of the message in it).
/// Poll source: (xid of the transaction, `outbox.events.seq`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    pub major: u64,
    pub minor: u64,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.encode();
        f.write_str(std::str::from_utf8(&text).expect("ASCII hex"))
    }
}

impl Position {
    /// `%016X:%016X` without the formatting machinery (it is written into every record).
    pub fn encode(&self) -> [u8; 33] {
        const HEX: &[u8; 16] = b"0123456789ABCDEF";
        let mut out = [b':'; 33];
        for (half, value) in [(0, self.major), (17, self.minor)] {
            for i in 0..16 {
                out[half + i] = HEX[((value >> (60 - 4 * i)) & 15) as usize];
            }
        }
        out
    }

    pub fn parse(s: &str) -> Option<Position> {
        let (major, minor) = s.split_once(':')?;
        Some(Position {
            major: u64::from_str_radix(major, 16).ok()?,
            minor: u64::from_str_radix(minor, 16).ok()?,
        })
    }
}

/// What one partition holds of this source, as read back after a restart.
///
/// Records reach a partition in position order, except that a record can be missing in the middle
/// (the broker refused it, and the records after it were acknowledged). So the read-back keeps the
/// exact positions found in the last window rather than only the highest one: an event is known to
/// be in Kafka if its position was seen, or lies below the window, or was sent by this session.
#[derive(Debug, Clone, Default)]
pub struct Tail {
    /// The highest position of this source in the partition.
    pub last: Option<Position>,
    /// The lowest position seen in the window that was read; older ones are taken as present.
    floor: Option<Position>,
    seen: HashSet<Position>,
    /// The first position this session sent; everything from it up to `last` is in Kafka.
    first_sent: Option<Position>,
}

impl Tail {
    /// Whether the record at `position` is already in the partition.
    pub fn has(&self, position: Position) -> bool {
        match self.last {
            Some(last) if position <= last => {
                self.seen.contains(&position)
                    || self.floor.is_some_and(|floor| position < floor)
                    || self.first_sent.is_some_and(|first| position >= first)
            }
            _ => false,
        }
    }

    /// This session sent the record at `position` (positions are sent in increasing order).
    pub fn sent(&mut self, position: Position) {
        self.first_sent.get_or_insert(position);
        self.last = Some(position);
    }
}

/// Records of one partition are read back in windows of this many when looking for our last one.
const TAIL_WINDOW: i64 = 256;

pub struct KafkaSink {
    producer: FutureProducer,
    reader_config: ClientConfig,
    source_id: String,
    partitions: HashMap<String, i32>,
    timeout: Duration,
}

/// The producer settings the relay sends every record with, before `message.max.bytes` and the
/// `[kafka]` settings. (`make bench` produces its raw baseline with these too.)
pub fn producer_config(brokers: &str) -> ClientConfig {
    let mut producer = ClientConfig::new();
    producer
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        // never give up on a record: a timed-out record followed by acknowledged ones would be
        // a hole in the partition; an unreachable broker just holds the stream (and the slot)
        .set("message.timeout.ms", "0");
    producer
}

impl KafkaSink {
    pub fn new(config: &Config) -> Result<KafkaSink, RelayError> {
        let mut producer = producer_config(&config.brokers);
        producer.set(
            "message.max.bytes",
            (config.max_record_bytes + 65536).max(1_000_000).to_string(),
        );
        for (k, v) in &config.kafka {
            producer.set(k, v);
        }
        let producer: FutureProducer = producer.create().map_err(|e| {
            RelayError::Config(format!("kafka settings rejected by librdkafka: {e}"))
        })?;
        let mut reader_config = ClientConfig::new();
        reader_config
            .set("bootstrap.servers", &config.brokers)
            .set("group.id", format!("pg_outbox-relay-{}", config.source_id))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false");
        for (k, v) in &config.kafka {
            // connection and security settings apply to the reader too; producer-only ones would warn
            if k.starts_with("security.") || k.starts_with("sasl.") || k.starts_with("ssl.") {
                reader_config.set(k, v);
            }
        }
        Ok(KafkaSink {
            producer,
            reader_config,
            source_id: config.source_id.clone(),
            partitions: HashMap::new(),
            timeout: Duration::from_secs(10),
        })
    }

    /// Number of partitions of `topic` (cached). An unknown topic is an error: the event stays in
    /// the slot and is retried, so create the topic (or enable auto-creation on the broker).
    pub async fn partition_count(&mut self, topic: &str) -> Result<i32, RelayError> {
        if let Some(n) = self.partitions.get(topic) {
            return Ok(*n);
        }
        let producer = self.producer.clone();
        let name = topic.to_string();
        let timeout = self.timeout;
        let n = tokio::task::spawn_blocking(move || {
            let md = producer.client().fetch_metadata(Some(&name), timeout)?;
            let t = md
                .topics()
                .iter()
                .find(|t| t.name() == name)
                .ok_or_else(|| RelayError::Kafka(format!("topic {name} not in metadata")))?;
            if let Some(err) = t.error() {
                return Err(RelayError::Kafka(format!(
                    "topic {name}: {err:?}; create the topic or enable auto-creation"
                )));
            }
            if t.partitions().is_empty() {
                return Err(RelayError::Kafka(format!(
                    "topic {name} has no partitions yet"
                )));
            }
            Ok(t.partitions().len() as i32)
        })
        .await
        .map_err(|e| RelayError::Kafka(format!("metadata task: {e}")))??;
        self.partitions.insert(topic.to_string(), n);
        Ok(n)
    }

    /// What `topic`/`partition` holds of this source (see [`Tail`]).
    pub async fn read_tail(&self, topic: &str, partition: i32) -> Result<Tail, RelayError> {
        let reader: BaseConsumer = self.reader_config.create()?;
        let topic = topic.to_string();
        let source = self.source_id.clone();
        let timeout = self.timeout;
        tokio::task::spawn_blocking(move || read_tail(&reader, &topic, partition, &source, timeout))
            .await
            .map_err(|e| RelayError::Kafka(format!("tail reader task: {e}")))?
    }

    /// Hands a record to librdkafka. The future resolves when the broker acknowledged it (or failed).
    pub fn send(&self, record: FutureRecord<'_, [u8], [u8]>) -> Result<DeliveryFuture, RelayError> {
        let mut record = record;
        loop {
            match self.producer.send_result(record) {
                Ok(fut) => return Ok(fut),
                Err((
                    rdkafka::error::KafkaError::MessageProduction(
                        rdkafka::types::RDKafkaErrorCode::QueueFull,
                    ),
                    back,
                )) => {
                    // librdkafka's queue is full: let it deliver, then try again
                    self.producer.poll(Duration::from_millis(10));
                    record = back;
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
    }

    /// Waits until everything handed over is acknowledged (or the timeout passes).
    pub async fn flush(&self, timeout: Duration) -> Result<(), RelayError> {
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || producer.flush(timeout))
            .await
            .map_err(|e| RelayError::Kafka(format!("flush task: {e}")))??;
        Ok(())
    }
}

/// Builds the headers of one record.
pub fn record_headers(
    event_id: &str,
    position: Position,
    source: &str,
    user: &[(&str, &[u8])],
    trace: Option<&str>,
) -> OwnedHeaders {
    let position = position.encode();
    let mut headers = OwnedHeaders::new_with_capacity(user.len() + 4)
        .insert(Header {
            key: HEADER_ID,
            value: Some(event_id.as_bytes()),
        })
        .insert(Header {
            key: HEADER_POSITION,
            value: Some(&position[..]),
        })
        .insert(Header {
            key: HEADER_SOURCE,
            value: Some(source.as_bytes()),
        });
    if let Some(trace) = trace {
        headers = headers.insert(Header {
            key: HEADER_TRACE,
            value: Some(trace.as_bytes()),
        });
    }
    for (name, value) in user {
        headers = headers.insert(Header {
            key: name,
            value: Some(*value),
        });
    }
    headers
}

fn read_tail(
    reader: &BaseConsumer,
    topic: &str,
    partition: i32,
    source: &str,
    timeout: Duration,
) -> Result<Tail, RelayError> {
    let (low, high) = reader.fetch_watermarks(topic, partition, timeout)?;
    if high <= 0 {
        // never written to (a broker reports at least 1 once it holds a batch)
        return Ok(Tail::default());
    }
    // The reported high watermark is only a lower bound of the end: some brokers (Tansu 0.6)
    // report the last batch's base offset + 1. So each window is read forward until the partition
    // stays quiet, never just up to `high`. Nobody else writes this source's records meanwhile:
    // the slot is held by this process.
    let mut window_end = high;
    let mut found_end: Option<i64> = None;
    // windows double going back, so a partition full of other producers' records takes a few
    // reads, not one per 256 records
    let mut span = TAIL_WINDOW;
    loop {
        let start = (window_end - span).max(low);
        span = span.saturating_mul(2);
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(start))?;
        reader.assign(&tpl)?;
        let mut tail = Tail::default();
        let mut next = start;
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut quiet_since = Instant::now();
        loop {
            if Instant::now() > deadline {
                return Err(RelayError::Kafka(format!(
                    "timed out reading {topic}[{partition}] from offset {start} for the restart dedup"
                )));
            }
            // past the window (a later window was read already), or past the reported end with
            // none of our records for a while (other producers may keep writing)
            if found_end.is_some_and(|e| next >= e)
                || (next >= window_end && quiet_since.elapsed() > TAIL_QUIET)
            {
                break;
            }
            let Some(msg) = reader.poll(Duration::from_millis(50)) else {
                continue;
            };
            let msg = msg?;
            next = msg.offset() + 1;
            if let Some(p) = own_position(&msg, source) {
                quiet_since = Instant::now();
                tail.last = tail.last.max(Some(p));
                tail.floor = Some(tail.floor.map_or(p, |f| f.min(p)));
                tail.seen.insert(p);
            }
        }
        if tail.last.is_some() || start <= low {
            if start <= low {
                // the whole partition was read: nothing older is present
                tail.floor = None;
            }
            return Ok(tail);
        }
        found_end = Some(start);
        window_end = start;
    }
}

/// How long a partition must stay quiet before its end is taken as reached.
const TAIL_QUIET: Duration = Duration::from_millis(300);

/// The position of a record written by `source`, if it is one.
fn own_position(msg: &rdkafka::message::BorrowedMessage<'_>, source: &str) -> Option<Position> {
    let headers = msg.headers()?;
    let mut ours = false;
    let mut pos = None;
    for h in headers.iter() {
        match (h.key, h.value) {
            (HEADER_SOURCE, Some(v)) => ours = v == source.as_bytes(),
            (HEADER_POSITION, Some(v)) => {
                pos = std::str::from_utf8(v).ok().and_then(Position::parse)
            }
            _ => {}
        }
    }
    pos.filter(|_| ours)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_text_round_trips_and_sorts() {
        let a = Position {
            major: 0x16B3748,
            minor: 2,
        };
        let b = Position {
            major: 0x16B3748,
            minor: 10,
        };
        let c = Position {
            major: 0x1_0000_0000,
            minor: 0,
        };
        for p in [a, b, c] {
            assert_eq!(Position::parse(&p.to_string()), Some(p));
        }
        assert!(a < b && b < c);
        assert!(a.to_string() < b.to_string() && b.to_string() < c.to_string());
        assert_eq!(Position::parse("nonsense"), None);
        let exact = Position {
            major: 0x1A2B_3C4D,
            minor: u64::MAX,
        };
        assert_eq!(exact.to_string(), "000000001A2B3C4D:FFFFFFFFFFFFFFFF");
    }
}

#[cfg(test)]
mod tail_tests {
    use super::*;

    fn p(major: u64, minor: u64) -> Position {
        Position { major, minor }
    }

    #[test]
    fn a_hole_in_the_window_is_not_taken_as_present() {
        let tail = Tail {
            last: Some(p(10, 3)),
            floor: Some(p(10, 0)),
            seen: [p(10, 0), p(10, 1), p(10, 3)].into_iter().collect(),
            first_sent: None,
        };
        assert!(tail.has(p(9, 7)), "below the window");
        assert!(tail.has(p(10, 1)));
        assert!(!tail.has(p(10, 2)), "the hole is sent again");
        assert!(!tail.has(p(10, 4)), "beyond the last");
    }

    #[test]
    fn what_this_session_sent_is_present() {
        let mut tail = Tail::default();
        assert!(!tail.has(p(1, 0)));
        tail.sent(p(5, 0));
        tail.sent(p(6, 0));
        assert!(tail.has(p(5, 0)) && tail.has(p(6, 0)));
        assert!(!tail.has(p(7, 0)));
    }

    #[test]
    fn a_fully_read_partition_has_only_what_was_seen() {
        let tail = Tail {
            last: Some(p(4, 0)),
            floor: None,
            seen: [p(2, 0), p(4, 0)].into_iter().collect(),
            first_sent: None,
        };
        assert!(!tail.has(p(1, 0)) && tail.has(p(2, 0)) && !tail.has(p(3, 0)));
    }
}
