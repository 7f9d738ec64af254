//! What a source hands to the pipeline: an event's place in its source ([`Position`]) and its
//! body, still in envelope form.
//!
//! Positions are totally ordered in the order the source publishes events:
//! - WAL source: (commit LSN of the transaction, index of the message in it);
//! - poll source: (xid of the transaction, `outbox.events.seq`).
//!
//! Every record carries its position, and the restart dedup compares positions of one source only,
//! so a position must never be reused for another event of the same source.

use bytes::Bytes;
use std::fmt;

/// Where an event sits in its source, totally ordered in the source's publishing order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
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
    pub const fn new(major: u64, minor: u64) -> Position {
        Position { major, minor }
    }

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

/// One event from a source.
#[derive(Debug, Clone)]
pub struct SourceEvent {
    pub position: Position,
    /// When the event committed (WAL) or its transaction began (poll), Unix µs: the start of the
    /// commit-to-acknowledgement latency.
    pub since_micros: i64,
    pub body: Body,
}

#[derive(Debug, Clone)]
pub enum Body {
    /// A pg_outbox envelope (`pg_outbox_envelope::Event::encode`), decoded by the pipeline.
    Envelope(Bytes),
    /// A row of `outbox.events`, already split into fields.
    Row(Box<OwnedEvent>),
    /// A message that nothing proves `outbox.enqueue` wrote (no valid seal, or not transactional):
    /// any role may write one with `pg_logical_emit_message`, so it is counted and passed over,
    /// never published and never stored (a flood of them costs a counter, not a row each).
    Unproven { reason: String },
}

/// An event whose fields are owned (the poll source builds it from a row).
#[derive(Debug, Clone)]
pub struct OwnedEvent {
    pub id: [u8; 16],
    pub created_at_micros: i64,
    pub topic: String,
    pub key: Option<String>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub trace_context: Option<String>,
    pub payload_is_json: bool,
    pub payload: Vec<u8>,
}

impl OwnedEvent {
    pub fn as_event(&self) -> pg_outbox_envelope::Event<'_> {
        pg_outbox_envelope::Event {
            id: self.id,
            created_at_micros: self.created_at_micros,
            topic: &self.topic,
            key: self.key.as_deref(),
            headers: self
                .headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_slice()))
                .collect(),
            trace_context: self.trace_context.as_deref(),
            payload_is_json: self.payload_is_json,
            payload: &self.payload,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_text_round_trips_and_sorts() {
        let a = Position::new(0x16B3748, 2);
        let b = Position::new(0x16B3748, 10);
        let c = Position::new(0x1_0000_0000, 0);
        for p in [a, b, c] {
            assert_eq!(Position::parse(&p.to_string()), Some(p));
        }
        assert!(a < b && b < c);
        assert!(a.to_string() < b.to_string() && b.to_string() < c.to_string());
        assert_eq!(Position::parse("nonsense"), None);
        let exact = Position::new(0x1A2B_3C4D, u64::MAX);
        assert_eq!(exact.to_string(), "000000001A2B3C4D:FFFFFFFFFFFFFFFF");
    }
}
