//! The restart dedup: what a partition already holds of this source.
//!
//! Every record carries its source position, event id and source id. Per partition, records are
//! written in position order (one producer; idempotence keeps the order through retries). After
//! any restart, before the first write to a partition, the partition's records of this source are
//! read back ([`read_back`]) from the end until one older than the session's replay start (the
//! first position the source delivers, everything before it was confirmed) or the partition's
//! start; an event is skipped only when its exact (position, event id) was found, or this session
//! sent it. That makes the at-least-once replay from the source exactly-once in Kafka without
//! broker transactions, and no rule of "below what was found" can skip an event that is not there.
//!
//! Invariants:
//! - Only the relay's own records count. A record is this source's when its first headers are the
//!   relay's (`pg_outbox-id`, `pg_outbox-position`, `pg_outbox-source` = this identity,
//!   `pg_outbox-mac`) and the MAC verifies under the source's record key for this topic,
//!   partition, position and id ([`crate::sink::mac_fields`]). The key is derived from the
//!   database's sealing key, which no producer on the topic has; the identity, which every record
//!   shows, proves nothing by itself.
//! - A record that claims this identity without a MAC that verifies (another producer's copy of the
//!   headers, a made-up position, a record of a relay older than the MAC) is ignored: it moves no
//!   floor, is no "last position", and cannot make the relay stop as "ahead of the database". It
//!   is counted (`pg_outbox_relay_foreign_records_total`) and reported in one log line per topic
//!   and session, without its content.
//! - A copy of a real record proves only what the real one does: the MAC binds topic and
//!   partition, so a copy elsewhere does not verify.
//! - A proven record at an event's position with another event id means the database is not the
//!   one that wrote Kafka's records (restored to an earlier point, or a failover that lost
//!   transactions, after which positions were used again): a stop, stored as a verdict, never a
//!   skip.
//! - The read-back is bounded: it gives up after [`READ_BACK_MAX_RECORDS`] records of a partition
//!   without reaching the replay start (a partition full of other producers' records, or one this
//!   source never wrote). What it did not read is taken as absent: an event there may be written
//!   twice, never lost; the relay says so. A read that makes no progress for the client timeout
//!   fails the session; one that makes progress is never cut off by a deadline.

use crate::error::RelayError;
use crate::event::Position;
use crate::kafka::raw_headers;
use crate::sink::{mac_fields, Sink, HEADER_ID, HEADER_MAC, HEADER_POSITION, HEADER_SOURCE};
use crate::source::Identity;
use crate::telemetry::{Metrics, TopicLabels};
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Partitions read back at once on a topic's first touch. Each read is a consumer of its own (a
/// librdkafka client with its threads and connection): a topic of thousands of partitions read all
/// at once took thousands of threads and stalled the broker.
pub const READ_BACK_CONCURRENCY: usize = 16;

/// Records of one partition read back at most, looking for the replay start (see the module's
/// invariants).
pub const READ_BACK_MAX_RECORDS: i64 = 1_000_000;

/// What one partition holds of this source, as read back after a restart.
///
/// Records reach a partition in position order, except that a record can be missing in the middle
/// (the broker refused it, and the records after it were acknowledged): so the read-back keeps
/// every record of this source at or after the replay start, by position, with its event id.
#[derive(Debug, Clone, Default)]
pub struct Tail {
    /// The highest position of this source in the partition.
    pub last: Option<Position>,
    /// This source's records read back at or after the replay start: position → event id.
    pub seen: HashMap<Position, Vec<u8>>,
    /// The first position this session sent; everything from it up to `last` is in Kafka.
    first_sent: Option<Position>,
    /// Records read back that claim this source but do not prove it (see the module's invariants):
    /// ignored, and counted here.
    pub foreign: u64,
    /// Records read back, and whether the read stopped at [`READ_BACK_MAX_RECORDS`] before it
    /// reached the replay start.
    pub read: i64,
    pub cut_short: bool,
}

impl Tail {
    /// Whether the event `id` at `position` is already in the partition: its exact record was read
    /// back, or this session sent it. `Err` with the id found when a record of this source holds
    /// the position for another event (see the module's invariants).
    pub fn has(&self, position: Position, id: &[u8]) -> Result<bool, Vec<u8>> {
        if let Some(found) = self.seen.get(&position) {
            return if found == id {
                Ok(true)
            } else {
                Err(found.clone())
            };
        }
        Ok(self.first_sent.is_some_and(|first| {
            position >= first && self.last.is_some_and(|last| position <= last)
        }))
    }

    /// This session sent the record at `position` (positions are sent in increasing order).
    pub fn sent(&mut self, position: Position) {
        self.first_sent.get_or_insert(position);
        self.last = Some(position);
    }
}

/// Per topic, per partition: what is in Kafka of this source, as read back once per session and
/// then extended by what this session sends.
#[derive(Debug, Default)]
pub struct Dedup {
    tails: HashMap<String, TopicTails>,
    /// The first position the source delivered this session: everything before it was
    /// confirmed, so the read-back needs to reach only that far.
    replay_from: Option<Position>,
}

#[derive(Debug)]
struct TopicTails {
    partitions: Vec<Tail>,
    /// The highest position read back from any partition.
    read_last: Option<Position>,
}

impl Dedup {
    /// The source delivered the event at `position`: the first one of the session is where the
    /// replay starts.
    pub fn delivered(&mut self, position: Position) {
        self.replay_from.get_or_insert(position);
    }

    /// Whether the event at `position` is already in `topic`/`partition`; if not, it is taken as
    /// sent from now on (the caller sends it or dead-letters it). A topic's partitions are read
    /// back on its first touch in the session ([`Sink::read_tails`]).
    ///
    /// A partition that holds records of this identity at or beyond its ceiling (positions the
    /// database has not reached) stops the relay: skipping by them would lose every new event.
    #[allow(clippy::too_many_arguments)]
    pub async fn already_published<S: Sink>(
        &mut self,
        sink: &S,
        identity: &Identity,
        metrics: &Metrics,
        topic: &str,
        partitions: i32,
        partition: i32,
        position: Position,
        id: &[u8],
    ) -> Result<bool, RelayError> {
        let replay_from = *self.replay_from.get_or_insert(position);
        if self
            .tails
            .get(topic)
            .is_none_or(|t| t.partitions.len() != partitions as usize)
        {
            let started = std::time::Instant::now();
            let read = sink
                .read_tails(topic, partitions, identity, replay_from)
                .await?;
            if read.len() != partitions as usize {
                return Err(RelayError::transient(format!(
                    "read back {} of the {partitions} partitions of {topic}",
                    read.len()
                )));
            }
            metrics
                .readback
                .get_or_create(&TopicLabels {
                    topic: topic.to_string(),
                })
                .observe(started.elapsed().as_secs_f64());
            let mut tails = Vec::with_capacity(partitions as usize);
            let mut foreign = 0;
            for (p, tail) in read.into_iter().enumerate() {
                foreign += tail.foreign;
                if let Some(last) = tail.last.filter(|last| *last >= identity.ceiling) {
                    return Err(RelayError::ahead(&identity.source, last.major, format!(
                        "{topic}[{p}] holds records of source {} up to position {last}, beyond \
                         anything this database has committed ({}): the database was restored to an \
                         earlier point, or Kafka holds another database's records under this \
                         identity. Publishing would skip new events. Check what Kafka holds, then {}",
                        identity.name, identity.ceiling, identity.recover
                    )));
                }
                if let Some(last) = tail.last {
                    info!(%topic, partition = p, last_position = %last, records_read = tail.read, "resuming after the last record of this source");
                }
                if tail.cut_short {
                    warn!(%topic, partition = p, records_read = tail.read, %replay_from,
                          "the restart dedup read this many records of the partition without reaching the replay \
                           start: what it did not read is taken as absent, so an event replayed to this partition \
                           may be written twice (never lost)");
                }
                tails.push(tail);
            }
            if foreign > 0 {
                metrics.foreign_records.inc_by(foreign);
                // one line per topic and session, whatever the number of records
                warn!(
                    %topic,
                    records = foreign,
                    source = %identity.name,
                    "records carry this source's headers but do not prove they are its own (no valid \
                     pg_outbox-mac): written by another producer, or by a relay older than the MAC; \
                     the restart dedup ignores them"
                );
            }
            let read_last = tails.iter().filter_map(|t| t.last).max();
            self.tails.insert(
                topic.to_string(),
                TopicTails {
                    partitions: tails,
                    read_last,
                },
            );
        }
        let topic_tails = self.tails.get_mut(topic).expect("read back above");
        // An event that an earlier session routed with another partition count is found by its
        // exact position in another partition (the topic grew, and that session ended before its
        // last events were confirmed). Only replayed events (below what was read back) are looked
        // for there.
        let elsewhere = |tails: &TopicTails| {
            tails.read_last.is_some_and(|last| position <= last)
                && tails
                    .partitions
                    .iter()
                    .any(|t| t.seen.get(&position).is_some_and(|found| found == id))
        };
        match topic_tails.partitions[partition as usize].has(position, id) {
            Ok(true) => return Ok(true),
            Ok(false) if elsewhere(topic_tails) => return Ok(true),
            Ok(false) => {}
            Err(found) => {
                return Err(RelayError::verdict(&identity.source, format!(
                    "{topic}[{partition}] holds a record of source {} at position {position} for event {}, \
                     but the database has event {} there: the database is not the one that wrote \
                     Kafka's records (restored to an earlier point, or a failover that lost \
                     transactions). Publishing would skip or reorder events. Check what Kafka holds, then {}",
                    identity.name,
                    String::from_utf8_lossy(&found),
                    String::from_utf8_lossy(id),
                    identity.recover
                )));
            }
        }
        let tail = &mut topic_tails.partitions[partition as usize];
        // a position the source delivers again (a replay from the confirmed one) is skipped above
        tail.sent(position);
        Ok(false)
    }
}

/// The context of a read-back consumer: the end of a partition is what [`read_back`] waits for, not
/// an error to log (librdkafka reports it as one).
#[derive(Default)]
pub struct ReaderContext;

impl ClientContext for ReaderContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() != Some(RDKafkaErrorCode::PartitionEOF) {
            tracing::error!("librdkafka: {error}: {reason}");
        }
    }
}

impl ConsumerContext for ReaderContext {}

/// A consumer of the restart read-back.
pub type Reader = BaseConsumer<ReaderContext>;

/// Records of one partition are read back in windows of this many when looking for our last one.
const TAIL_WINDOW: i64 = 256;

/// The first and next offsets (`low`, `high`) of each of the first `partitions` partitions of
/// `topic`, from ListOffsets rounds for many partitions at once (not two requests per partition):
/// the next offsets of all, then the first offsets of those that were ever written; blocking: run
/// it off the runtime.
pub fn partition_ends(
    reader: &Reader,
    topic: &str,
    partitions: i32,
    timeout: Duration,
) -> Result<Vec<(i64, i64)>, RelayError> {
    // ListOffsets takes a timestamp per partition, of which -2 means the first offset and -1 the
    // next (librdkafka's own watermark query sends the same, one partition at a time)
    let ask = |which: &[i32], at: Offset| -> Result<Vec<i64>, RelayError> {
        if which.is_empty() {
            return Ok(Vec::new());
        }
        let mut tpl = TopicPartitionList::with_capacity(which.len());
        for &p in which {
            tpl.add_partition_offset(topic, p, at)?;
        }
        let listed = reader.offsets_for_times(tpl, timeout)?;
        which
            .iter()
            .map(|&p| {
                let elem = listed.find_partition(topic, p).ok_or_else(|| {
                    RelayError::transient(format!("no offsets listed for {topic}[{p}]"))
                })?;
                elem.error()?;
                match elem.offset() {
                    Offset::Offset(o) if o >= 0 => Ok(o),
                    other => Err(RelayError::transient(format!(
                        "unexpected offset {other:?} listed for {topic}[{p}]"
                    ))),
                }
            })
            .collect()
    };
    let all: Vec<i32> = (0..partitions).collect();
    let high = ask(&all, Offset::End)?;
    let written: Vec<i32> = all.into_iter().filter(|&p| high[p as usize] > 0).collect();
    let mut ends: Vec<(i64, i64)> = high.into_iter().map(|h| (0, h)).collect();
    for (p, low) in written.iter().zip(ask(&written, Offset::Beginning)?) {
        ends[*p as usize].0 = low;
    }
    Ok(ends)
}

/// Whether a partition with these ends ([`partition_ends`]) holds no record at all: never written
/// to (a broker reports at least 1 once it holds a batch), or everything in it deleted. Nothing
/// to read back there.
pub fn holds_nothing((low, high): (i64, i64)) -> bool {
    high <= 0 || high <= low
}

/// Reads back what `topic`/`partition` holds of the source `identity`: its own records, proven by
/// their MAC, from the end back to one older than `replay_from` (or the partition's start, or
/// [`READ_BACK_MAX_RECORDS`]); blocking: run it off the runtime. `ends` are the partition's
/// offsets listed when the read-back began ([`partition_ends`]); `timeout` bounds a read that
/// makes no progress. The reader reports the end of a partition (`enable.partition.eof`).
pub fn read_back(
    reader: &Reader,
    topic: &str,
    partition: i32,
    identity: &Identity,
    replay_from: Position,
    (low, high): (i64, i64),
    timeout: Duration,
) -> Result<Tail, RelayError> {
    if holds_nothing((low, high)) {
        return Ok(Tail::default());
    }
    // The listed high offset is only a lower bound of the end: some brokers (Tansu 0.6) report
    // the last batch's base offset + 1. So the newest window is read forward until the broker
    // says the reader reached the end (the high watermark of a fetch answer, which is exact, and
    // from later than the listing), never just up to `high`. Nobody else writes this source's
    // records meanwhile: the slot is held by this process, and what a predecessor's producer
    // still had in its sockets landed during the restart grace.
    let mut window_end = high;
    let mut found_end: Option<i64> = None;
    // windows double going back, so a partition full of other producers' records takes a few
    // reads, not one per 256 records; they do not overlap, and every one adds to the same tail
    let mut span = TAIL_WINDOW;
    let mut tail = Tail::default();
    loop {
        let start = (window_end - span).max(low);
        span = span.saturating_mul(2);
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(start))?;
        reader.assign(&tpl)?;
        let mut next = start;
        // the first offset this window delivered: a broker may answer a fetch from the middle of a
        // batch with the next batch (Tansu 0.6 does), so the records between the window's start
        // and this offset are read by the next window, which reads up to here
        let mut first: Option<i64> = None;
        let mut progress = Instant::now();
        let mut quiet_since = Instant::now();
        // the newest window: the broker said this assignment reached the partition's end
        let mut at_end = false;
        // whether this window holds a record of this source from before the replay start
        let mut reached = false;
        loop {
            if progress.elapsed() > timeout.max(Duration::from_secs(30)) {
                return Err(RelayError::transient(format!(
                    "reading {topic}[{partition}] back for the restart dedup made no progress at offset \
                     {next}"
                )));
            }
            // past the window (a later window was read already), at the end the broker reported,
            // or past the listed end with none of our records for a while (other producers may
            // keep writing faster than the reader reaches the end)
            if found_end.is_some_and(|e| next >= e)
                || ((at_end || next >= window_end) && quiet_since.elapsed() > TAIL_QUIET)
            {
                break;
            }
            let msg = match reader.poll(Duration::from_millis(50)) {
                None => continue,
                // Every record before the end is delivered before the end is reported (one queue
                // per partition; a report of an earlier assignment is dropped by librdkafka). The
                // newest window reads up to it; an older one stops at `found_end` before.
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    at_end = p == partition && found_end.is_none();
                    continue;
                }
                Some(msg) => msg?,
            };
            if msg.topic() != topic || msg.partition() != partition {
                // a record of an earlier assignment of a reused consumer
                continue;
            }
            progress = Instant::now();
            first.get_or_insert(msg.offset());
            next = msg.offset() + 1;
            tail.read += 1;
            match claim(&raw_headers(&msg), topic, partition, identity) {
                Claim::Own(p, id) => {
                    quiet_since = Instant::now();
                    tail.last = tail.last.max(Some(p));
                    if p >= replay_from {
                        tail.seen.insert(p, id);
                    } else {
                        reached = true;
                    }
                }
                Claim::Unproven => tail.foreign += 1,
                Claim::None => {}
            }
        }
        if reached || start <= low {
            return Ok(tail);
        }
        if tail.read >= READ_BACK_MAX_RECORDS {
            tail.cut_short = true;
            return Ok(tail);
        }
        found_end = first.or(found_end).or(Some(start));
        window_end = start;
    }
}

/// How long a partition that other producers keep writing must go without a record of this source,
/// past its listed end, before that end is taken as reached (the broker reports the end as soon as
/// the reader catches up with it).
const TAIL_QUIET: Duration = Duration::from_millis(300);

/// What a record read back is to the source being read back for.
#[derive(Debug, PartialEq, Eq)]
enum Claim {
    /// Not a record of this source: another source's, or no relay headers in the relay's places.
    None,
    /// Written by this source's relay, at this position, for this event id: its MAC verifies.
    Own(Position, Vec<u8>),
    /// Claims this source (the relay's headers in the relay's places, this identity) without
    /// proof: ignored and counted.
    Unproven,
}

/// [`Claim`] of a record with `headers` (names and values as bytes, in the record's order) in
/// `topic`/`partition`. The relay writes its own headers first, in a fixed order (id, position,
/// source, MAC), so only those places are looked at: a header of the same name further on came
/// from the event's writer. Any producer may write the topic, so the headers are read raw
/// ([`raw_headers`]: rdkafka's own accessor panics on a name that is not UTF-8) and nothing in
/// them is trusted until the MAC over them verifies.
fn claim(
    headers: &[(&[u8], Option<&[u8]>)],
    topic: &str,
    partition: i32,
    identity: &Identity,
) -> Claim {
    let [(id_name, id), (position_name, Some(position)), (source_name, Some(source)), rest @ ..] =
        headers
    else {
        return Claim::None;
    };
    if *id_name != HEADER_ID.as_bytes()
        || *position_name != HEADER_POSITION.as_bytes()
        || *source_name != HEADER_SOURCE.as_bytes()
        || *source != identity.name.as_bytes()
    {
        return Claim::None;
    }
    let proven = || {
        let position = Position::parse(std::str::from_utf8(position).ok()?)?;
        let (mac_name, Some(mac)) = rest.first()? else {
            return None;
        };
        if *mac_name != HEADER_MAC.as_bytes() {
            return None;
        }
        let id = id.unwrap_or_default();
        let fields = mac_fields(&identity.name, topic, partition, position, id);
        identity
            .verifies(&fields, mac)
            .then(|| (position, id.to_vec()))
    };
    proven().map_or(Claim::Unproven, |(p, id)| Claim::Own(p, id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pg_outbox_envelope::record::RecordKey;

    fn p(major: u64, minor: u64) -> Position {
        Position { major, minor }
    }

    const A: &[u8] = b"id-a";
    const B: &[u8] = b"id-b";

    #[test]
    fn only_an_exact_record_is_present() {
        let tail = Tail {
            last: Some(p(10, 3)),
            seen: [
                (p(10, 0), A.to_vec()),
                (p(10, 1), B.to_vec()),
                (p(10, 3), A.to_vec()),
            ]
            .into_iter()
            .collect(),
            ..Tail::default()
        };
        assert_eq!(tail.has(p(10, 1), B), Ok(true));
        // nothing below what was read is taken as present: there is no floor
        assert_eq!(tail.has(p(9, 7), A), Ok(false), "not read back, so absent");
        assert_eq!(tail.has(p(10, 2), A), Ok(false), "the hole is sent again");
        assert_eq!(tail.has(p(10, 4), A), Ok(false), "beyond the last");
        // the position of another event: the database is not the one that wrote Kafka's records
        assert_eq!(tail.has(p(10, 0), B), Err(A.to_vec()));
    }

    #[test]
    fn only_a_partition_listed_without_records_is_left_unread() {
        assert!(holds_nothing((0, 0)), "never written");
        assert!(holds_nothing((7, 7)), "everything deleted");
        assert!(!holds_nothing((0, 1)));
        // a broker that lists the last batch's base offset + 1 (Tansu 0.6) lists at least that
        assert!(!holds_nothing((6, 7)));
    }

    #[test]
    fn what_this_session_sent_is_present() {
        let mut tail = Tail::default();
        assert_eq!(tail.has(p(1, 0), A), Ok(false));
        tail.sent(p(5, 0));
        tail.sent(p(6, 0));
        assert_eq!(tail.has(p(5, 0), A), Ok(true));
        assert_eq!(tail.has(p(6, 0), A), Ok(true));
        assert_eq!(tail.has(p(7, 0), A), Ok(false));
    }

    fn stored(
        topic: &str,
        partition: i32,
        at: Position,
        id: &str,
    ) -> (String, i32, Position, String) {
        (topic.into(), partition, at, id.into())
    }

    #[tokio::test]
    async fn a_record_of_this_source_for_another_event_at_the_position_is_a_stored_stop() {
        let sink = crate::sink::memory::MemorySink::acking();
        sink.log.lock().unwrap().stored.extend([
            stored("t", 0, p(3, 0), "old-3"),
            stored("t", 0, p(4, 0), "old-4"),
        ]);
        let identity = Identity {
            name: "s".into(),
            source: "slot:s".into(),
            ceiling: p(10, 0),
            recover: "do this".into(),
            key: Default::default(),
            older_keys: Vec::new(),
        };
        let mut dedup = Dedup::default();
        dedup.delivered(p(3, 0));
        assert!(dedup
            .already_published(
                &sink,
                &identity,
                &Metrics::default(),
                "t",
                1,
                0,
                p(3, 0),
                b"old-3"
            )
            .await
            .unwrap());
        let err = dedup
            .already_published(
                &sink,
                &identity,
                &Metrics::default(),
                "t",
                1,
                0,
                p(4, 0),
                b"new-4",
            )
            .await
            .unwrap_err();
        assert!(err.is_permanent(), "{err}");
        assert_eq!(err.verdict_source(), Some("slot:s"));
        assert!(
            err.to_string().contains("old-4") && err.to_string().contains("new-4"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn records_beyond_the_ceiling_stop_the_relay_instead_of_skipping() {
        let sink = crate::sink::memory::MemorySink::acking();
        sink.log
            .lock()
            .unwrap()
            .stored
            .push(stored("t", 0, p(9, 0), "e9"));
        let identity = Identity {
            name: "s".into(),
            source: "slot:s".into(),
            ceiling: p(5, 0),
            recover: "do this".into(),
            key: Default::default(),
            older_keys: Vec::new(),
        };
        let err = Dedup::default()
            .already_published(
                &sink,
                &identity,
                &Metrics::default(),
                "t",
                1,
                0,
                p(3, 0),
                b"e3",
            )
            .await
            .unwrap_err();
        assert!(err.is_permanent(), "{err}");
        assert_eq!(
            err.verdict_source(),
            Some("slot:s"),
            "a verdict the relay stores before it stops"
        );
        assert!(err.to_string().contains("do this"), "{err}");
        // below the ceiling the same record is found again, exactly
        let identity = Identity {
            ceiling: p(10, 0),
            ..identity
        };
        let mut dedup = Dedup::default();
        assert!(dedup
            .already_published(
                &sink,
                &identity,
                &Metrics::default(),
                "t",
                1,
                0,
                p(9, 0),
                b"e9"
            )
            .await
            .unwrap());
        assert!(!dedup
            .already_published(
                &sink,
                &identity,
                &Metrics::default(),
                "t",
                1,
                0,
                p(9, 1),
                b"e91"
            )
            .await
            .unwrap());
    }

    #[tokio::test]
    async fn an_event_routed_with_another_partition_count_is_found_in_its_partition() {
        // an earlier session wrote (5,0) to partition 0 of two, then the topic grew to three
        let sink = crate::sink::memory::MemorySink::acking();
        sink.log.lock().unwrap().stored.extend([
            stored("t", 0, p(5, 0), "e50"),
            stored("t", 1, p(5, 1), "e51"),
            stored("t", 2, p(6, 0), "e60"),
        ]);
        let identity = Identity {
            name: "s".into(),
            source: "slot:s".into(),
            ceiling: p(100, 0),
            recover: String::new(),
            key: Default::default(),
            older_keys: Vec::new(),
        };
        let mut dedup = Dedup::default();
        dedup.delivered(p(5, 0));
        // replayed, (5,0) now goes to partition 2, whose last record is later
        assert!(dedup
            .already_published(
                &sink,
                &identity,
                &Metrics::default(),
                "t",
                3,
                2,
                p(5, 0),
                b"e50"
            )
            .await
            .unwrap());
        // (5,2) is nowhere: it is sent, even below what partition 2 holds
        assert!(!dedup
            .already_published(
                &sink,
                &identity,
                &Metrics::default(),
                "t",
                3,
                2,
                p(5, 2),
                b"e52"
            )
            .await
            .unwrap());
        // a new event is never looked for elsewhere
        assert!(!dedup
            .already_published(
                &sink,
                &identity,
                &Metrics::default(),
                "t",
                3,
                1,
                p(7, 0),
                b"e70"
            )
            .await
            .unwrap());
    }

    fn identity(name: &str, auth_key: u8) -> Identity {
        Identity {
            name: name.into(),
            key: RecordKey::derive(&[auth_key; 32]),
            ..Identity::default()
        }
    }

    /// The first headers of a record as the relay writes them for `identity`.
    fn relay_headers(
        identity: &Identity,
        topic: &str,
        partition: i32,
        at: Position,
    ) -> Vec<Vec<u8>> {
        let id = b"0193b2f0-0000-7000-8000-000000000001";
        let mac = identity
            .key
            .sign(&mac_fields(&identity.name, topic, partition, at, id));
        vec![
            id.to_vec(),
            at.encode().to_vec(),
            identity.name.as_bytes().to_vec(),
            mac.to_vec(),
        ]
    }

    fn named<'a>(names: &[&'a [u8]], values: &'a [Vec<u8>]) -> Vec<(&'a [u8], Option<&'a [u8]>)> {
        names
            .iter()
            .zip(values)
            .map(|(n, v)| (*n, Some(v.as_slice())))
            .collect()
    }

    const NAMES: [&[u8]; 4] = [
        HEADER_ID.as_bytes(),
        HEADER_POSITION.as_bytes(),
        HEADER_SOURCE.as_bytes(),
        HEADER_MAC.as_bytes(),
    ];

    #[test]
    fn records_signed_before_a_rotation_stay_proven_until_their_key_is_retired() {
        let before = identity("s", 1);
        let at = Position::new(7, 1);
        let values = relay_headers(&before, "t", 0, at);
        let signed_with_1 = named(&NAMES, &values);
        // after the rotation: key 2 signs, key 1 still verifies
        let rotated = Identity {
            older_keys: vec![RecordKey::derive(&[1; 32])],
            ..identity("s", 2)
        };
        assert_eq!(
            claim(&signed_with_1, "t", 0, &rotated),
            Claim::Own(at, values[0].clone())
        );
        // key 1 retired
        assert_eq!(
            claim(&signed_with_1, "t", 0, &identity("s", 2)),
            Claim::Unproven
        );
    }

    #[test]
    fn only_the_relays_own_proven_records_give_a_position() {
        let me = identity("s", 9);
        let at = Position::new(7, 1);
        let values = relay_headers(&me, "t", 0, at);
        let ours = named(&NAMES, &values);
        assert_eq!(claim(&ours, "t", 0, &me), Claim::Own(at, values[0].clone()));
        // the same record read back for another source is none of its business
        assert_eq!(claim(&ours, "t", 0, &identity("other", 9)), Claim::None);
        // the same bytes anywhere else, or under another database's key: not proven
        assert_eq!(
            claim(&ours, "t", 1, &me),
            Claim::Unproven,
            "another partition"
        );
        assert_eq!(claim(&ours, "u", 0, &me), Claim::Unproven, "another topic");
        assert_eq!(claim(&ours, "t", 0, &identity("s", 8)), Claim::Unproven);
        // a copied record with another position or id
        let mut moved = values.clone();
        moved[1] = Position::new(8, 0).encode().to_vec();
        assert_eq!(claim(&named(&NAMES, &moved), "t", 0, &me), Claim::Unproven);
        let mut renamed = values.clone();
        renamed[0] = b"0193b2f0-0000-7000-8000-000000000002".to_vec();
        assert_eq!(
            claim(&named(&NAMES, &renamed), "t", 0, &me),
            Claim::Unproven
        );
        // no MAC (a relay older than the MAC), a made-up one, a MAC header out of place
        assert_eq!(claim(&ours[..3], "t", 0, &me), Claim::Unproven);
        let mut made_up = values.clone();
        made_up[3] = "ab".repeat(32).into_bytes();
        assert_eq!(
            claim(&named(&NAMES, &made_up), "t", 0, &me),
            Claim::Unproven
        );
        let mut late = ours[..3].to_vec();
        late.push((b"x".as_slice(), Some(b"1".as_slice())));
        late.push(ours[3]);
        assert_eq!(claim(&late, "t", 0, &me), Claim::Unproven);
        // a garbled position
        let mut garbled = values.clone();
        garbled[1] = b"zz".to_vec();
        assert_eq!(
            claim(&named(&NAMES, &garbled), "t", 0, &me),
            Claim::Unproven
        );
    }

    #[test]
    fn a_writers_header_of_the_same_name_out_of_place_is_not_a_claim() {
        let me = identity("s", 9);
        let values = relay_headers(&me, "t", 0, Position::new(7, 1));
        let mut forged = named(&NAMES, &values);
        forged[0].0 = b"x";
        assert_eq!(claim(&forged, "t", 0, &me), Claim::None);
        // a name that is not UTF-8 is just another name
        let mut odd = named(&NAMES, &values);
        odd[0].0 = &[0xff, 0xfe, b'x'];
        assert_eq!(claim(&odd, "t", 0, &me), Claim::None);
        assert_eq!(
            claim(&named(&NAMES, &values)[..2], "t", 0, &me),
            Claim::None,
            "too few headers"
        );
        assert_eq!(claim(&[], "t", 0, &me), Claim::None);
    }
}
