//! Where events go: the [`Sink`] seam, implemented by Kafka ([`kafka`]) and, for unit tests, in
//! memory ([`memory`]). Records are partitioned like Java clients ([`partition`]); the restart dedup
//! ([`dedup`]) reads back what a partition already holds of this source.
//!
//! A sink keeps the order of `send` calls per partition through retries (one idempotent producer),
//! and reports each record's outcome exactly once through its [`Delivery`].

pub mod dedup;
pub mod kafka;
#[cfg(test)]
pub mod memory;
pub mod partition;

use crate::deadletter::DeadLetter;
use crate::error::RelayError;
use crate::event::Position;
use crate::kafka::RecordFormat;
use crate::source::Identity;
use dedup::Tail;
use pg_outbox_envelope::record::RecordFields;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

/// Header names the relay writes into every record, first and in this order (the trace context
/// only when the event has one).
pub const HEADER_ID: &str = "pg_outbox-id";
pub const HEADER_POSITION: &str = "pg_outbox-position";
pub const HEADER_SOURCE: &str = "pg_outbox-source";
/// The proof that the relay wrote the record: see [`mac_fields`] and `pg_outbox_envelope::record`.
pub const HEADER_MAC: &str = "pg_outbox-mac";
pub const HEADER_TRACE: &str = "traceparent";

/// The headers a [`RecordFormat`] adds after the relay's own and the trace context, before the
/// event's: each only where the event has no header of that name (the event's wins).
pub const HEADER_CONTENT_TYPE: &str = "content-type";
pub const HEADER_CE_SPECVERSION: &str = "ce_specversion";
pub const HEADER_CE_ID: &str = "ce_id";
pub const HEADER_CE_SOURCE: &str = "ce_source";
pub const HEADER_CE_TYPE: &str = "ce_type";
pub const HEADER_CE_TIME: &str = "ce_time";
/// Where Debezium's outbox event router puts the event id.
pub const HEADER_DEBEZIUM_ID: &str = "id";

/// The length of [`rfc3339`]'s text.
#[cfg(test)]
const RFC3339_LEN: usize = 27;

/// A Unix time in µs as RFC 3339 in UTC with microseconds (`2026-12-05T01:52:22.123456Z`), as
/// CloudEvents' `time` wants it.
pub fn rfc3339(unix_micros: i64) -> String {
    let secs = unix_micros.div_euclid(1_000_000);
    let micros = unix_micros.rem_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let of_day = secs.rem_euclid(86_400);
    // civil date from days since 1970-01-01 (Howard Hinnant's algorithm)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        of_day / 3600,
        of_day / 60 % 60,
        of_day % 60
    )
}

/// What a record's [`HEADER_MAC`] binds: the source identity, where the record is (topic,
/// partition), its position and its event id, as the relay writes them.
pub fn mac_fields<'a>(
    source: &'a str,
    topic: &'a str,
    partition: i32,
    position: Position,
    event_id: &'a [u8],
) -> RecordFields<'a> {
    RecordFields {
        source,
        topic,
        partition,
        position: (position.major, position.minor),
        event_id,
    }
}

/// One record to send, borrowed from the decoded event.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub key: Option<&'a [u8]>,
    pub payload: &'a [u8],
    /// Unix ms.
    pub timestamp_ms: i64,
    pub event_id: &'a str,
    pub position: Position,
    pub source_id: &'a str,
    /// The [`HEADER_MAC`] value: the hex tag of [`mac_fields`] under the source's record key.
    pub mac: &'a [u8],
    /// The user's headers, written after the relay's own.
    pub headers: &'a [(&'a str, &'a [u8])],
    pub trace: Option<&'a str>,
    pub format: RecordFormat,
    /// Whether the payload is JSON (its `content-type`).
    pub payload_is_json: bool,
    /// When the event was enqueued, Unix µs (CloudEvents' `time`).
    pub created_at_micros: i64,
    /// Sent alone: nothing else is in flight, so a refusal is about this record. The relay sends
    /// alone what a session that lost a delivery had sent (see [`crate::pipeline::Frontier`]).
    pub alone: bool,
}

impl Record<'_> {
    /// Bytes the record counts against `max_record_bytes`: the event as enqueue counted it
    /// (payload, key, headers and the trace context) plus the reserve for the relay's own headers,
    /// those of the record format and Kafka's framing ([`pg_outbox_envelope::RECORD_RESERVE`]), so
    /// that the two limits agree. The reserve holds them all for a source id of up to 200 bytes
    /// and any topic: about 230 bytes of the relay's, 36 of `content-type`, 110 of CloudEvents'
    /// attributes, plus the source id twice and the topic once.
    pub fn size(&self) -> usize {
        self.payload.len()
            + self.key.map_or(0, <[u8]>::len)
            + self
                .headers
                .iter()
                .map(|(n, v)| n.len() + v.len())
                .sum::<usize>()
            + self.trace.map_or(0, |t| HEADER_TRACE.len() + t.len())
            + pg_outbox_envelope::RECORD_RESERVE
    }

    /// Whether the event has a header named `name` (`content-type` in any case).
    fn has_header(&self, name: &str) -> bool {
        self.headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case(name))
    }

    /// The headers the record's format adds, with `time` as CloudEvents' `time` ([`rfc3339`] of
    /// the enqueue time): see [`RecordFormat`].
    pub fn format_headers<'t>(&'t self, time: &'t str) -> Vec<(&'static str, &'t [u8])> {
        let mut added: Vec<(&'static str, &'t [u8])> = Vec::with_capacity(6);
        if !self.has_header(HEADER_CONTENT_TYPE) {
            let content_type: &[u8] = if self.payload_is_json {
                b"application/json"
            } else {
                b"application/octet-stream"
            };
            added.push((HEADER_CONTENT_TYPE, content_type));
        }
        if self.format == RecordFormat::CloudEvents {
            let attributes: [(&'static str, &'t [u8]); 5] = [
                (HEADER_CE_SPECVERSION, b"1.0"),
                (HEADER_CE_ID, self.event_id.as_bytes()),
                (HEADER_CE_SOURCE, self.source_id.as_bytes()),
                (HEADER_CE_TYPE, self.topic.as_bytes()),
                (HEADER_CE_TIME, time.as_bytes()),
            ];
            added.extend(attributes.into_iter().filter(|(n, _)| !self.has_header(n)));
        }
        if self.format == RecordFormat::Debezium && !self.has_header(HEADER_DEBEZIUM_ID) {
            added.push((HEADER_DEBEZIUM_ID, self.event_id.as_bytes()));
        }
        added
    }
}

/// How one record ended.
#[derive(Debug)]
pub enum Delivered {
    /// In Kafka.
    Acked,
    /// The broker refuses this record for good (retrying cannot help): dead-letter it. Only a
    /// record sent alone is judged so (a broker refuses a whole batch for one record).
    Rejected(Box<DeadLetter>),
    /// Not delivered, for a reason that may pass: the session ends and the source replays.
    Failed(RelayError),
}

/// Resolves once the record's outcome is known.
pub type Delivery = Pin<Box<dyn Future<Output = Delivered> + Send>>;

#[allow(async_fn_in_trait)]
pub trait Sink {
    /// Number of partitions of `topic` (an unknown topic is a transient error: the event stays in
    /// the source and is retried).
    async fn partition_count(&mut self, topic: &str) -> Result<i32, RelayError>;

    /// What each of the first `partitions` partitions of `topic` already holds of the source
    /// `identity`, in partition order: only records whose [`HEADER_MAC`] verifies under its key
    /// count (see [`Tail`]).
    async fn read_tails(
        &self,
        topic: &str,
        partitions: i32,
        identity: &Identity,
        replay_from: Position,
    ) -> Result<Vec<Tail>, RelayError>;

    /// The partition counts asked for since they were last forgotten, asked again: those that
    /// changed, as (topic, count in use, count now). A topic the broker does not answer for is
    /// left out (its records fail, or it is poison).
    async fn changed_partition_counts(&self) -> Vec<(String, i32, i32)> {
        Vec::new()
    }

    /// Forgets the partition counts: the next [`Sink::partition_count`] asks the broker.
    fn forget_partition_counts(&mut self) {}

    /// Hands a record over without blocking the runtime; waits while the sink's queue is full.
    async fn send(&self, record: Record<'_>) -> Result<Delivery, RelayError>;

    /// Waits until everything handed over has an outcome (or the timeout passes).
    async fn flush(&self, timeout: Duration) -> Result<(), RelayError>;

    /// Gives up everything handed over and not yet acknowledged: it is not sent (again); what the
    /// broker already has stays. Their deliveries fail.
    fn withdraw(&self) {}

    /// [`Sink::withdraw`] as a function another thread may call (the pause clock's ticker).
    fn withdrawal(&self) -> Option<crate::fence::OnPause> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_is_utc_with_microseconds() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            rfc3339(1_796_435_542_123_456),
            "2026-12-05T01:52:22.123456Z"
        );
        // a leap day, and before 1970
        assert_eq!(rfc3339(951_782_400_000_001), "2000-02-29T00:00:00.000001Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59.999999Z");
        assert_eq!(rfc3339(1_796_435_542_123_456).len(), RFC3339_LEN);
    }

    fn record<'a>(format: RecordFormat, headers: &'a [(&'a str, &'a [u8])]) -> Record<'a> {
        Record {
            topic: "orders",
            partition: 0,
            key: Some(b"k"),
            payload: b"{}",
            timestamp_ms: 0,
            event_id: "01a243c5-2029-7721-9766-0c8d08518282",
            position: Position::new(1, 0),
            source_id: "src/1.2.3",
            mac: b"",
            headers,
            trace: None,
            format,
            payload_is_json: true,
            created_at_micros: 0,
            alone: false,
        }
    }

    #[test]
    fn every_record_has_a_content_type_and_cloudevents_its_attributes_unless_the_event_set_them() {
        let plain = record(RecordFormat::PgOutbox, &[]);
        assert_eq!(
            plain.format_headers("t"),
            [(HEADER_CONTENT_TYPE, b"application/json".as_slice())]
        );
        let bytes = Record {
            payload_is_json: false,
            ..plain
        };
        assert_eq!(
            bytes.format_headers("t"),
            [(HEADER_CONTENT_TYPE, b"application/octet-stream".as_slice())]
        );
        let own: &[(&str, &[u8])] = &[
            ("Content-Type", b"application/avro"),
            ("ce_type", b"order.created"),
        ];
        assert!(record(RecordFormat::PgOutbox, own)
            .format_headers("t")
            .is_empty());
        let ce = record(RecordFormat::CloudEvents, &[]);
        let time = rfc3339(0);
        let names: Vec<&str> = ce.format_headers(&time).iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            [
                HEADER_CONTENT_TYPE,
                HEADER_CE_SPECVERSION,
                HEADER_CE_ID,
                HEADER_CE_SOURCE,
                HEADER_CE_TYPE,
                HEADER_CE_TIME
            ]
        );
        let debezium = record(RecordFormat::Debezium, &[]);
        assert_eq!(
            debezium.format_headers(&time)[1],
            (HEADER_DEBEZIUM_ID, debezium.event_id.as_bytes())
        );
        let with_id: &[(&str, &[u8])] = &[("id", b"mine")];
        assert_eq!(
            record(RecordFormat::Debezium, with_id)
                .format_headers(&time)
                .len(),
            1
        );
        let with_type = record(RecordFormat::CloudEvents, own);
        let added = with_type.format_headers(&time);
        assert_eq!(
            added.len(),
            4,
            "the event's content-type and ce_type win: {added:?}"
        );
        // within the reserve, as the relay's own headers
        assert_eq!(ce.size(), plain.size());
    }
}
