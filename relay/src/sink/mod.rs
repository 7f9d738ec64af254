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
    /// Sent alone: nothing else is in flight, so a refusal is about this record. The relay sends
    /// alone what a session that lost a delivery had sent (see [`crate::pipeline::Frontier`]).
    pub alone: bool,
}

impl Record<'_> {
    /// Bytes the record counts against `max_record_bytes`: the event as enqueue counted it
    /// (payload, key, headers and the trace context) plus the reserve for the relay's own headers
    /// and Kafka's framing ([`pg_outbox_envelope::RECORD_RESERVE`]), so that the two limits agree.
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
