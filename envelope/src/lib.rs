//! The pg_outbox event envelope, format version 1.
//!
//! In `wal` mode the extension writes every event as one transactional logical decoding message
//! (prefix `pg_outbox`) whose content is this envelope; the relay decodes it. Both sides use this
//! crate, so there is exactly one definition of the format.
//!
//! Byte layout (all integers big-endian):
//!
//! | size      | field                                                                   |
//! |-----------|-------------------------------------------------------------------------|
//! | 1         | format version, currently `1`                                            |
//! | 1         | flags: bit 0 key present, bit 1 payload is JSON, bit 2 trace context present, bit 3 sealed (a tag follows the envelope); other bits must be zero |
//! | 16        | event id (UUID bytes, a UUIDv7 when written by the extension)            |
//! | 8         | `created_at`, signed microseconds since 1970-01-01 00:00:00 UTC         |
//! | 1 + T     | topic: length `T` (1..=249) then `T` bytes of `[a-zA-Z0-9._-]`            |
//! | 4 + K     | key (only if flag bit 0): length `K` (<= [`MAX_KEY_LEN`]) then UTF-8 bytes |
//! | 2         | header count `H` (<= [`MAX_HEADERS`])                                    |
//! | H × (2 + N + 4 + V) | per header: name length `N` (1..=[`MAX_HEADER_NAME_LEN`]), UTF-8 name, value length `V`, value bytes |
//! | 2 + C     | trace context (only if flag bit 2): length `C` then UTF-8 bytes (a W3C `traceparent`) |
//! | 4 + P     | payload: length `P` then `P` bytes                                        |
//!
//! The envelope ends exactly after the payload; trailing bytes are an error.
//!
//! A *sealed* message (flag bit 3, what `outbox.enqueue` writes) is an envelope followed by a
//! [`TAG_LEN`]-byte tag: HMAC-SHA256 under the database's secret key (`outbox.auth_key`) of the
//! top-level transaction id (4 bytes, big-endian) followed by the envelope. Only code that can read
//! the key can write a message the relay accepts, and a sealed message copied into another
//! transaction (or database) does not verify there. [`seal`] appends the tag; [`open`] checks it and
//! returns the envelope that [`Event::decode`] reads. A decoder that sees an
//! unknown version or an unknown flag bit reports it (it never guesses), so a relay older than the
//! extension stops or dead-letters instead of publishing garbage.

pub mod record;

use std::fmt;

/// The format version this crate writes.
pub const VERSION: u8 = 1;
/// Logical decoding message prefix used for every event.
pub const MESSAGE_PREFIX: &str = "pg_outbox";
/// Kafka's limit on topic name length.
pub const MAX_TOPIC_LEN: usize = 249;
/// Largest key accepted (Kafka has no own limit; a key this big is a bug upstream).
pub const MAX_KEY_LEN: usize = 1 << 20;
/// Most headers one event may carry.
pub const MAX_HEADERS: usize = 1024;
/// Longest header name.
pub const MAX_HEADER_NAME_LEN: usize = 1024;
/// Longest trace context.
pub const MAX_TRACE_LEN: usize = 1024;
/// Largest payload the format can carry (PostgreSQL's own limit on a value is 1 GiB).
pub const MAX_PAYLOAD_LEN: usize = (1 << 30) - 1;

/// One limit for the event and its Kafka record. Enqueue counts an event as its payload, key and
/// headers (names and values, the trace context as `traceparent`); the relay counts a record as
/// the same plus this reserve, for its own headers (id, position, source, MAC) and Kafka's framing,
/// and dead-letters a record over its `max_record_bytes`. With both defaults, every event that
/// enqueue accepts is published.
pub const RECORD_RESERVE: usize = 1024;
/// The relay's default `max_record_bytes` (librdkafka's and Kafka's default `message.max.bytes`).
pub const DEFAULT_MAX_RECORD_BYTES: usize = 1_000_000;
/// The default of `pg_outbox.max_payload_bytes`: [`DEFAULT_MAX_RECORD_BYTES`] less the reserve.
pub const DEFAULT_MAX_EVENT_BYTES: usize = DEFAULT_MAX_RECORD_BYTES - RECORD_RESERVE;

const FLAG_KEY: u8 = 1;
const FLAG_JSON: u8 = 1 << 1;
const FLAG_TRACE: u8 = 1 << 2;
const FLAG_SEALED: u8 = 1 << 3;
/// The seal names its key: a key id (2 bytes, big-endian) sits between the envelope and the tag.
/// Without it the key is [`FIRST_KEY_ID`], so messages sealed before keys could rotate still open.
const FLAG_KEY_ID: u8 = 1 << 4;
const KNOWN_FLAGS: u8 = FLAG_KEY | FLAG_JSON | FLAG_TRACE | FLAG_SEALED | FLAG_KEY_ID;

/// The id of a database's first sealing key (`outbox.auth_key`); `CALL outbox.rotate_auth_key()`
/// adds the next. A message sealed with it carries no key id.
pub const FIRST_KEY_ID: u16 = 1;

/// Length of the tag after a sealed envelope.
pub const TAG_LEN: usize = 32;
/// Length of the key that seals messages.
pub const AUTH_KEY_LEN: usize = 32;

/// One event, borrowed from the caller (encode) or from the envelope bytes (decode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event<'a> {
    pub id: [u8; 16],
    pub created_at_micros: i64,
    pub topic: &'a str,
    pub key: Option<&'a str>,
    pub headers: Vec<(&'a str, &'a [u8])>,
    pub trace_context: Option<&'a str>,
    /// True when `payload` is JSON text (enqueued as `jsonb`), false for opaque bytes.
    pub payload_is_json: bool,
    pub payload: &'a [u8],
}

/// Why a topic name is not one Kafka accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic must not be empty")]
    Empty,
    #[error("topic is {0} bytes long, Kafka allows at most {MAX_TOPIC_LEN}")]
    TooLong(usize),
    #[error("topic contains {0:?} at byte {1}; Kafka allows only ASCII letters, digits, '.', '_' and '-'")]
    IllegalChar(char, usize),
    #[error("topic must not be \".\" or \"..\"")]
    Reserved,
}

/// Checks a topic name against Kafka's rules: 1 to 249 bytes of `[a-zA-Z0-9._-]`, not `.` or `..`.
pub fn validate_topic(topic: &str) -> Result<(), TopicError> {
    if topic.is_empty() {
        return Err(TopicError::Empty);
    }
    if let Some((pos, c)) = topic
        .char_indices()
        .find(|&(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(TopicError::IllegalChar(c, pos));
    }
    if topic.len() > MAX_TOPIC_LEN {
        return Err(TopicError::TooLong(topic.len()));
    }
    if topic == "." || topic == ".." {
        return Err(TopicError::Reserved);
    }
    Ok(())
}

/// Why an event cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error(transparent)]
    Topic(#[from] TopicError),
    #[error("{field} is {len} bytes long, the envelope allows at most {max}")]
    TooLong {
        field: Field,
        len: usize,
        max: usize,
    },
    #[error("{count} headers given, the envelope allows at most {MAX_HEADERS}")]
    TooManyHeaders { count: usize },
    #[error("header name must not be empty")]
    EmptyHeaderName,
}

/// Why bytes are not a valid envelope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("envelope is empty")]
    Empty,
    #[error(
        "unknown envelope version {0} (this build reads version {VERSION}); upgrade the relay"
    )]
    UnknownVersion(u8),
    #[error("unknown envelope flags {0:#04x}; upgrade the relay")]
    UnknownFlags(u8),
    #[error("envelope truncated while reading {0}")]
    Truncated(Field),
    #[error("{0} is not valid UTF-8")]
    InvalidUtf8(Field),
    #[error("invalid topic in envelope: {0}")]
    Topic(TopicError),
    #[error("{field} length {len} exceeds the limit {max}")]
    TooLong {
        field: Field,
        len: usize,
        max: usize,
    },
    #[error("{0} trailing bytes after the payload")]
    TrailingBytes(usize),
}

/// Names the envelope field an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Version,
    Flags,
    Id,
    CreatedAt,
    Topic,
    Key,
    HeaderCount,
    HeaderName,
    HeaderValue,
    TraceContext,
    Payload,
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Field::Version => "version",
            Field::Flags => "flags",
            Field::Id => "event id",
            Field::CreatedAt => "created_at",
            Field::Topic => "topic",
            Field::Key => "key",
            Field::HeaderCount => "header count",
            Field::HeaderName => "header name",
            Field::HeaderValue => "header value",
            Field::TraceContext => "trace context",
            Field::Payload => "payload",
        })
    }
}

fn check_len(field: Field, len: usize, max: usize) -> Result<(), EncodeError> {
    if len > max {
        Err(EncodeError::TooLong { field, len, max })
    } else {
        Ok(())
    }
}

impl<'a> Event<'a> {
    /// Exact number of bytes [`Event::encode_into`] appends.
    pub fn encoded_len(&self) -> usize {
        let mut n = 1 + 1 + 16 + 8 + 1 + self.topic.len() + 2 + 4 + self.payload.len();
        if let Some(key) = self.key {
            n += 4 + key.len();
        }
        for (name, value) in &self.headers {
            n += 2 + name.len() + 4 + value.len();
        }
        if let Some(trace) = self.trace_context {
            n += 2 + trace.len();
        }
        n
    }

    /// Checks every limit without encoding.
    pub fn validate(&self) -> Result<(), EncodeError> {
        validate_topic(self.topic)?;
        if let Some(key) = self.key {
            check_len(Field::Key, key.len(), MAX_KEY_LEN)?;
        }
        if self.headers.len() > MAX_HEADERS {
            return Err(EncodeError::TooManyHeaders {
                count: self.headers.len(),
            });
        }
        for (name, value) in &self.headers {
            if name.is_empty() {
                return Err(EncodeError::EmptyHeaderName);
            }
            check_len(Field::HeaderName, name.len(), MAX_HEADER_NAME_LEN)?;
            check_len(Field::HeaderValue, value.len(), MAX_PAYLOAD_LEN)?;
        }
        if let Some(trace) = self.trace_context {
            check_len(Field::TraceContext, trace.len(), MAX_TRACE_LEN)?;
        }
        check_len(Field::Payload, self.payload.len(), MAX_PAYLOAD_LEN)
    }

    /// Validates and appends the envelope to `buf`.
    pub fn encode_into(&self, buf: &mut Vec<u8>) -> Result<(), EncodeError> {
        self.validate()?;
        buf.reserve(self.encoded_len());
        let mut flags = 0;
        if self.key.is_some() {
            flags |= FLAG_KEY;
        }
        if self.payload_is_json {
            flags |= FLAG_JSON;
        }
        if self.trace_context.is_some() {
            flags |= FLAG_TRACE;
        }
        buf.push(VERSION);
        buf.push(flags);
        buf.extend_from_slice(&self.id);
        buf.extend_from_slice(&self.created_at_micros.to_be_bytes());
        // Lengths below were checked by validate(), so the casts cannot truncate.
        buf.push(self.topic.len() as u8);
        buf.extend_from_slice(self.topic.as_bytes());
        if let Some(key) = self.key {
            buf.extend_from_slice(&(key.len() as u32).to_be_bytes());
            buf.extend_from_slice(key.as_bytes());
        }
        buf.extend_from_slice(&(self.headers.len() as u16).to_be_bytes());
        for (name, value) in &self.headers {
            buf.extend_from_slice(&(name.len() as u16).to_be_bytes());
            buf.extend_from_slice(name.as_bytes());
            buf.extend_from_slice(&(value.len() as u32).to_be_bytes());
            buf.extend_from_slice(value);
        }
        if let Some(trace) = self.trace_context {
            buf.extend_from_slice(&(trace.len() as u16).to_be_bytes());
            buf.extend_from_slice(trace.as_bytes());
        }
        buf.extend_from_slice(&(self.payload.len() as u32).to_be_bytes());
        buf.extend_from_slice(self.payload);
        Ok(())
    }

    /// Validates and encodes into a new buffer.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        let mut buf = Vec::with_capacity(self.encoded_len());
        self.encode_into(&mut buf)?;
        Ok(buf)
    }

    /// Decodes an envelope (for a sealed message: what [`open`] returned), borrowing strings and bytes from `bytes`.
    pub fn decode(bytes: &'a [u8]) -> Result<Event<'a>, DecodeError> {
        let mut r = Reader { bytes, pos: 0 };
        let version = *bytes.first().ok_or(DecodeError::Empty)?;
        r.pos = 1;
        if version != VERSION {
            return Err(DecodeError::UnknownVersion(version));
        }
        let flags = r.u8(Field::Flags)?;
        if flags & !KNOWN_FLAGS != 0 {
            return Err(DecodeError::UnknownFlags(flags));
        }
        let id: [u8; 16] = r.take(16, Field::Id)?.try_into().expect("16 bytes");
        let created_at_micros =
            i64::from_be_bytes(r.take(8, Field::CreatedAt)?.try_into().expect("8 bytes"));
        let topic_len = r.u8(Field::Topic)? as usize;
        let topic = r.str(topic_len, Field::Topic)?;
        validate_topic(topic).map_err(DecodeError::Topic)?;
        let key = if flags & FLAG_KEY != 0 {
            let len = r.u32(Field::Key)? as usize;
            limit(Field::Key, len, MAX_KEY_LEN)?;
            Some(r.str(len, Field::Key)?)
        } else {
            None
        };
        let count = r.u16(Field::HeaderCount)? as usize;
        limit(Field::HeaderCount, count, MAX_HEADERS)?;
        let mut headers = Vec::with_capacity(count);
        for _ in 0..count {
            let name_len = r.u16(Field::HeaderName)? as usize;
            limit(Field::HeaderName, name_len, MAX_HEADER_NAME_LEN)?;
            let name = r.str(name_len, Field::HeaderName)?;
            let value_len = r.u32(Field::HeaderValue)? as usize;
            let value = r.take(value_len, Field::HeaderValue)?;
            headers.push((name, value));
        }
        let trace_context = if flags & FLAG_TRACE != 0 {
            let len = r.u16(Field::TraceContext)? as usize;
            limit(Field::TraceContext, len, MAX_TRACE_LEN)?;
            Some(r.str(len, Field::TraceContext)?)
        } else {
            None
        };
        let payload_len = r.u32(Field::Payload)? as usize;
        limit(Field::Payload, payload_len, MAX_PAYLOAD_LEN)?;
        let payload = r.take(payload_len, Field::Payload)?;
        if r.pos != bytes.len() {
            return Err(DecodeError::TrailingBytes(bytes.len() - r.pos));
        }
        Ok(Event {
            id,
            created_at_micros,
            topic,
            key,
            headers,
            trace_context,
            payload_is_json: flags & FLAG_JSON != 0,
            payload,
        })
    }

    /// The event id in the canonical 8-4-4-4-12 hex form.
    pub fn id_string(&self) -> String {
        format_uuid(&self.id)
    }
}

/// Why a message is not a sealed envelope written with the expected key in the expected transaction.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("message is not sealed (written with pg_logical_emit_message, not outbox.enqueue)")]
    NotSealed,
    #[error(
        "message tag does not verify (forged, or copied from another transaction or database)"
    )]
    BadTag,
}

/// The tag binds the full 64-bit transaction id (epoch and xid, PostgreSQL's `xid8`): a message
/// captured from the WAL does not verify again in the transaction that has the same 32-bit id after a
/// wraparound, which any role can drive by burning transaction ids.
fn mac(key: &[u8], xid: u64, envelope: &[u8]) -> hmac::Hmac<sha2::Sha256> {
    use hmac::Mac;
    let mut mac = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(key)
        .expect("HMAC takes a key of any length");
    mac.update(&xid.to_be_bytes());
    mac.update(envelope);
    mac
}

/// The full 64-bit id of a transaction whose 32-bit `xid` (as pgoutput's Begin carries it) is
/// within 2^31 transactions of `reference`, a full id read from the server (`pg_current_snapshot()`'s
/// xmax). PostgreSQL keeps every transaction that can still be decoded within that distance of the
/// next id (wraparound protection), so the choice is unique.
pub fn widen_xid(reference: u64, xid: u32) -> u64 {
    let delta = xid.wrapping_sub(reference as u32) as i32;
    reference.wrapping_add_signed(i64::from(delta))
}

/// Seals the envelope that starts at `buf[start]` (it must be the last thing in `buf`): sets flag
/// bit 3, appends the key id unless it is [`FIRST_KEY_ID`] (then flag bit 4), then the tag binding
/// it all to `key` and to transaction `xid` (the full 64-bit id).
pub fn seal(buf: &mut Vec<u8>, start: usize, key_id: u16, key: &[u8], xid: u64) {
    use hmac::Mac;
    buf[start + 1] |= FLAG_SEALED;
    if key_id != FIRST_KEY_ID {
        buf[start + 1] |= FLAG_KEY_ID;
        buf.extend_from_slice(&key_id.to_be_bytes());
    }
    let tag = mac(key, xid, &buf[start..]).finalize().into_bytes();
    buf.extend_from_slice(&tag);
}

/// The id of the key a sealed message names (not yet verified: see [`open`]).
pub fn sealed_key_id(message: &[u8]) -> Result<u16, OpenError> {
    if message.len() < 2 + TAG_LEN || message[1] & FLAG_SEALED == 0 {
        return Err(OpenError::NotSealed);
    }
    if message[1] & FLAG_KEY_ID == 0 {
        return Ok(FIRST_KEY_ID);
    }
    let end = message.len() - TAG_LEN;
    let id = message
        .get(
            end.checked_sub(2)
                .filter(|&at| at >= 2)
                .ok_or(OpenError::NotSealed)?..end,
        )
        .ok_or(OpenError::NotSealed)?;
    Ok(u16::from_be_bytes([id[0], id[1]]))
}

/// Checks a sealed message's tag for `key` (the one [`sealed_key_id`] names) and transaction `xid`
/// (in constant time) and returns the envelope without the key id and the tag.
pub fn open<'m>(message: &'m [u8], key: &[u8], xid: u64) -> Result<&'m [u8], OpenError> {
    use hmac::Mac;
    let key_id_len = match sealed_key_id(message)? {
        _ if message[1] & FLAG_KEY_ID == 0 => 0,
        _ => 2,
    };
    let (sealed, tag) = message.split_at(message.len() - TAG_LEN);
    mac(key, xid, sealed)
        .verify_slice(tag)
        .map_err(|_| OpenError::BadTag)?;
    Ok(&sealed[..sealed.len() - key_id_len])
}

/// Formats 16 UUID bytes as `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
pub fn format_uuid(id: &[u8; 16]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(36);
    for (i, b) in id.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push(HEX[usize::from(b >> 4)] as char);
        s.push(HEX[usize::from(b & 15)] as char);
    }
    s
}

fn limit(field: Field, len: usize, max: usize) -> Result<(), DecodeError> {
    if len > max {
        Err(DecodeError::TooLong { field, len, max })
    } else {
        Ok(())
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: Field) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or(DecodeError::Truncated(field))?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }
    fn u8(&mut self, field: Field) -> Result<u8, DecodeError> {
        Ok(self.take(1, field)?[0])
    }
    fn u16(&mut self, field: Field) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(
            self.take(2, field)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self, field: Field) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(
            self.take(4, field)?.try_into().expect("4 bytes"),
        ))
    }
    fn str(&mut self, n: usize, field: Field) -> Result<&'a str, DecodeError> {
        std::str::from_utf8(self.take(n, field)?).map_err(|_| DecodeError::InvalidUtf8(field))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Event<'static> {
        Event {
            id: [7; 16],
            created_at_micros: 1_700_000_000_123_456,
            topic: "orders.v1",
            key: Some("customer-42"),
            headers: vec![("type", b"OrderCreated"), ("x-tenant", b"acme")],
            trace_context: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            payload_is_json: true,
            payload: br#"{"order_id":1,"total":"9.99"}"#,
        }
    }

    #[test]
    fn a_32_bit_xid_widens_to_the_full_id_nearest_the_reference() {
        let epoch = |e: u64, x: u32| (e << 32) | u64::from(x);
        assert_eq!(widen_xid(epoch(0, 1000), 900), epoch(0, 900));
        assert_eq!(widen_xid(epoch(0, 1000), 1100), epoch(0, 1100));
        assert_eq!(widen_xid(epoch(3, 1000), 900), epoch(3, 900));
        // across an epoch boundary, both ways
        assert_eq!(widen_xid(epoch(3, 5), u32::MAX - 5), epoch(2, u32::MAX - 5));
        assert_eq!(widen_xid(epoch(2, u32::MAX - 5), 5), epoch(3, 5));
    }

    #[test]
    fn a_sealed_message_opens_only_with_its_key_and_transaction() {
        let key = [9u8; AUTH_KEY_LEN];
        let mut buf = b"prefix".to_vec();
        sample().encode_into(&mut buf).unwrap();
        seal(&mut buf, 6, FIRST_KEY_ID, &key, 4711);
        let message = &buf[6..];
        assert_eq!(sealed_key_id(message), Ok(FIRST_KEY_ID));
        let envelope = open(message, &key, 4711).unwrap();
        assert_eq!(envelope.len(), message.len() - TAG_LEN);
        let event = Event::decode(envelope).unwrap();
        assert_eq!(event, sample());

        assert_eq!(open(message, &key, 4712), Err(OpenError::BadTag));
        // the same 32-bit xid in another epoch (after a wraparound) is another transaction
        assert_eq!(
            open(message, &key, 4711 + (1 << 32)),
            Err(OpenError::BadTag)
        );
        assert_eq!(
            open(message, &[8u8; AUTH_KEY_LEN], 4711),
            Err(OpenError::BadTag)
        );
        let unsealed = sample().encode().unwrap();
        assert_eq!(open(&unsealed, &key, 4711), Err(OpenError::NotSealed));
        let mut flipped = message.to_vec();
        flipped[30] ^= 1;
        assert_eq!(open(&flipped, &key, 4711), Err(OpenError::BadTag));
        // a sealed message read without opening it is refused, not published with the tag
        assert_eq!(
            Event::decode(message),
            Err(DecodeError::TrailingBytes(TAG_LEN))
        );
    }

    #[test]
    fn a_message_sealed_with_a_later_key_names_it_and_opens_only_with_it() {
        let (key1, key2) = ([9u8; AUTH_KEY_LEN], [7u8; AUTH_KEY_LEN]);
        let mut buf = Vec::new();
        sample().encode_into(&mut buf).unwrap();
        let plain = buf.len();
        seal(&mut buf, 0, 2, &key2, 4711);
        assert_eq!(buf.len(), plain + 2 + TAG_LEN);
        assert_eq!(sealed_key_id(&buf), Ok(2));
        let envelope = open(&buf, &key2, 4711).unwrap();
        assert_eq!(envelope.len(), plain);
        assert_eq!(Event::decode(envelope).unwrap(), sample());
        assert_eq!(open(&buf, &key1, 4711), Err(OpenError::BadTag));
        // the key id is under the tag: naming another key breaks it
        let mut renamed = buf.clone();
        let at = renamed.len() - TAG_LEN - 1;
        renamed[at] = 1;
        assert_eq!(sealed_key_id(&renamed), Ok(0x0001));
        assert_eq!(open(&renamed, &key2, 4711), Err(OpenError::BadTag));
        assert_eq!(open(&renamed, &key1, 4711), Err(OpenError::BadTag));
        // dropping the flag makes it claim the first key, and breaks the tag too
        let mut unflagged = buf.clone();
        unflagged[1] &= !FLAG_KEY_ID;
        assert_eq!(sealed_key_id(&unflagged), Ok(FIRST_KEY_ID));
        assert_eq!(open(&unflagged, &key1, 4711), Err(OpenError::BadTag));
        // too short to hold a key id
        let mut short = vec![VERSION, FLAG_SEALED | FLAG_KEY_ID];
        short.extend_from_slice(&[0; TAG_LEN]);
        assert_eq!(sealed_key_id(&short), Err(OpenError::NotSealed));
    }

    #[test]
    fn round_trip_full_event() {
        let event = sample();
        let bytes = event.encode().unwrap();
        assert_eq!(bytes.len(), event.encoded_len());
        assert_eq!(bytes[0], VERSION);
        assert_eq!(Event::decode(&bytes).unwrap(), event);
    }

    #[test]
    fn round_trip_minimal_event() {
        let event = Event {
            id: [0; 16],
            created_at_micros: -1,
            topic: "t",
            key: None,
            headers: vec![],
            trace_context: None,
            payload_is_json: false,
            payload: b"",
        };
        let bytes = event.encode().unwrap();
        assert_eq!(bytes.len(), 1 + 1 + 16 + 8 + 2 + 2 + 4);
        assert_eq!(Event::decode(&bytes).unwrap(), event);
    }

    #[test]
    fn round_trip_binary_payload_and_empty_key() {
        let payload: Vec<u8> = (0..=255u8).collect();
        let event = Event {
            key: Some(""),
            payload_is_json: false,
            payload: &payload,
            ..sample()
        };
        let bytes = event.encode().unwrap();
        assert_eq!(Event::decode(&bytes).unwrap(), event);
    }

    #[test]
    fn layout_is_stable() {
        let event = Event {
            id: [0xab; 16],
            created_at_micros: 1,
            topic: "a",
            key: Some("k"),
            headers: vec![("h", b"v")],
            trace_context: None,
            payload_is_json: true,
            payload: b"{}",
        };
        let mut expected = vec![1, 0b011];
        expected.extend([0xab; 16]);
        expected.extend([0, 0, 0, 0, 0, 0, 0, 1]);
        expected.extend([1, b'a']);
        expected.extend([0, 0, 0, 1, b'k']);
        expected.extend([0, 1, 0, 1, b'h', 0, 0, 0, 1, b'v']);
        expected.extend([0, 0, 0, 2, b'{', b'}']);
        assert_eq!(event.encode().unwrap(), expected);
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = sample().encode().unwrap();
        for len in 0..bytes.len() {
            let err = Event::decode(&bytes[..len]).unwrap_err();
            if len == 0 {
                assert_eq!(err, DecodeError::Empty);
            } else {
                assert!(
                    matches!(err, DecodeError::Truncated(_)),
                    "len {len}: {err:?}"
                );
            }
        }
    }

    #[test]
    fn malformed_input_is_reported() {
        let good = sample().encode().unwrap();

        let mut bad = good.clone();
        bad[0] = 2;
        assert_eq!(Event::decode(&bad), Err(DecodeError::UnknownVersion(2)));

        let mut bad = good.clone();
        bad[1] |= 0x80;
        assert!(matches!(
            Event::decode(&bad),
            Err(DecodeError::UnknownFlags(_))
        ));

        let mut bad = good.clone();
        bad.push(0);
        assert_eq!(Event::decode(&bad), Err(DecodeError::TrailingBytes(1)));

        // topic byte replaced with a space: not a Kafka topic
        let mut bad = good.clone();
        bad[27] = b' ';
        assert!(matches!(Event::decode(&bad), Err(DecodeError::Topic(_))));

        // key byte replaced with invalid UTF-8
        let mut bad = good.clone();
        let key_start = 27 + "orders.v1".len() + 4;
        bad[key_start] = 0xff;
        assert_eq!(
            Event::decode(&bad),
            Err(DecodeError::InvalidUtf8(Field::Key))
        );

        // a payload length far beyond the buffer
        let mut bad = good.clone();
        let n = bad.len();
        let payload_len = sample().payload.len();
        bad[n - payload_len - 4..n - payload_len].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            Event::decode(&bad),
            Err(DecodeError::TooLong {
                field: Field::Payload,
                ..
            })
        ));
    }

    #[test]
    fn topic_rules_match_kafka() {
        assert!(validate_topic("orders").is_ok());
        assert!(validate_topic("a.b_c-D9").is_ok());
        assert!(validate_topic(&"x".repeat(249)).is_ok());
        assert_eq!(validate_topic(""), Err(TopicError::Empty));
        assert_eq!(
            validate_topic(&"x".repeat(250)),
            Err(TopicError::TooLong(250))
        );
        assert_eq!(
            validate_topic("orders created"),
            Err(TopicError::IllegalChar(' ', 6))
        );
        assert_eq!(
            validate_topic("ordérs"),
            Err(TopicError::IllegalChar('é', 3))
        );
        assert_eq!(validate_topic(".."), Err(TopicError::Reserved));
    }

    #[test]
    fn encode_refuses_what_decode_would_refuse() {
        let bad_topic = Event {
            topic: "no/slash",
            ..sample()
        };
        assert!(matches!(bad_topic.encode(), Err(EncodeError::Topic(_))));
        let empty_header = Event {
            headers: vec![("", b"v")],
            ..sample()
        };
        assert_eq!(empty_header.encode(), Err(EncodeError::EmptyHeaderName));
        let names: Vec<String> = (0..=MAX_HEADERS).map(|i| format!("h{i}")).collect();
        let many = Event {
            headers: names.iter().map(|n| (n.as_str(), &b""[..])).collect(),
            ..sample()
        };
        assert_eq!(
            many.encode(),
            Err(EncodeError::TooManyHeaders {
                count: MAX_HEADERS + 1
            })
        );
    }

    #[test]
    fn uuid_formatting() {
        let id = [
            0x01, 0x8f, 0x3c, 0x4d, 0x5e, 0x6f, 0x70, 0x81, 0x92, 0xa3, 0xb4, 0xc5, 0xd6, 0xe7,
            0xf8, 0x09,
        ];
        assert_eq!(format_uuid(&id), "018f3c4d-5e6f-7081-92a3-b4c5d6e7f809");
    }
}
