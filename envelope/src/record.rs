//! The proof that a Kafka record was written by the relay of a source: the `pg_outbox-mac` header.
//!
//! The relay's restart dedup believes a record only if it carries this proof, so a producer that
//! copies the relay's other headers (all of them readable in any record) cannot make the relay skip
//! or stop. The proof is HMAC-SHA256 under the *record key*, derived from the database's sealing key
//! ([`RecordKey::derive`]): HMAC-SHA256(sealing key, `"pg_outbox record mac v1"`). The sealing key
//! itself never reaches Kafka, and a record key cannot seal a WAL message (another input, another key).
//!
//! What is authenticated ([`RecordFields`]), each field unambiguous (lengths before variable bytes,
//! integers big-endian):
//!
//! | size      | field                                                            |
//! |-----------|------------------------------------------------------------------|
//! | 4 + S     | source identity (the `pg_outbox-source` value)                   |
//! | 4 + T     | topic                                                            |
//! | 4         | partition (signed)                                               |
//! | 8 + 8     | position: major, minor (the `pg_outbox-position` value, parsed)  |
//! | 4 + I     | event id (the `pg_outbox-id` value, as written)                  |
//!
//! Binding topic and partition means a copy of a real record in another partition proves nothing
//! there. The header value is the tag in lowercase hex ([`HEX_MAC_LEN`] ASCII bytes): consumers that
//! store headers as text (the ingest does) take it as they take the others.

use hmac::Mac;
use std::fmt;

/// Length of the tag, in bytes.
pub const MAC_LEN: usize = 32;
/// Length of the header value: the tag in hex.
pub const HEX_MAC_LEN: usize = 2 * MAC_LEN;

/// What the record key is derived with from the sealing key (and so, which version of the proof).
const DERIVATION: &[u8] = b"pg_outbox record mac v1";

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// The key the relay signs its records with; derived from the database's sealing key. Kept keyed
/// (HMAC's inner and outer states), so that a record costs only the hashing of its fields.
#[derive(Clone)]
pub struct RecordKey(HmacSha256);

impl Default for RecordKey {
    /// A key no database has (all zero bytes): for tests and a pipeline not started yet.
    fn default() -> RecordKey {
        RecordKey::from_bytes(&[0; MAC_LEN])
    }
}

impl fmt::Debug for RecordKey {
    // a key never reaches a log line
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RecordKey(..)")
    }
}

/// The fields of one record that its tag binds.
#[derive(Debug, Clone, Copy)]
pub struct RecordFields<'a> {
    pub source: &'a str,
    pub topic: &'a str,
    pub partition: i32,
    pub position: (u64, u64),
    pub event_id: &'a [u8],
}

impl RecordKey {
    /// The record key of the database whose sealing key is `auth_key`.
    pub fn derive(auth_key: &[u8]) -> RecordKey {
        let mut mac = HmacSha256::new_from_slice(auth_key).expect("HMAC takes a key of any length");
        mac.update(DERIVATION);
        RecordKey::from_bytes(&mac.finalize().into_bytes())
    }

    fn from_bytes(key: &[u8]) -> RecordKey {
        RecordKey(HmacSha256::new_from_slice(key).expect("HMAC takes a key of any length"))
    }

    fn hmac(&self, fields: &RecordFields<'_>) -> HmacSha256 {
        let mut mac = self.0.clone();
        with_length(&mut mac, fields.source.as_bytes());
        with_length(&mut mac, fields.topic.as_bytes());
        mac.update(&fields.partition.to_be_bytes());
        mac.update(&fields.position.0.to_be_bytes());
        mac.update(&fields.position.1.to_be_bytes());
        with_length(&mut mac, fields.event_id);
        mac
    }

    /// The `pg_outbox-mac` header value of a record with `fields`.
    pub fn sign(&self, fields: &RecordFields<'_>) -> [u8; HEX_MAC_LEN] {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let tag = self.hmac(fields).finalize().into_bytes();
        let mut out = [0u8; HEX_MAC_LEN];
        for (i, b) in tag.iter().enumerate() {
            out[2 * i] = HEX[usize::from(b >> 4)];
            out[2 * i + 1] = HEX[usize::from(b & 15)];
        }
        out
    }

    /// Whether `header` (a `pg_outbox-mac` value, from anyone) is the tag of `fields`, compared in
    /// constant time. Anything but [`HEX_MAC_LEN`] hex digits is simply false.
    pub fn verify(&self, fields: &RecordFields<'_>, header: &[u8]) -> bool {
        if header.len() != HEX_MAC_LEN {
            return false;
        }
        let mut tag = [0u8; MAC_LEN];
        for (i, pair) in header.chunks_exact(2).enumerate() {
            match (hex_digit(pair[0]), hex_digit(pair[1])) {
                (Some(hi), Some(lo)) => tag[i] = (hi << 4) | lo,
                _ => return false,
            }
        }
        self.hmac(fields).verify_slice(&tag).is_ok()
    }
}

/// `bytes` behind their length (32 bits, big-endian). A length beyond 32 bits is a record no broker
/// takes; saturating keeps the encoding total.
fn with_length(mac: &mut HmacSha256, bytes: &[u8]) {
    mac.update(&u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_be_bytes());
    mac.update(bytes);
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields() -> RecordFields<'static> {
        RecordFields {
            source: "orders/7301.16384.0193b2f0",
            topic: "orders",
            partition: 2,
            position: (0x016B_3748, 1),
            event_id: b"0193b2f0-0000-7000-8000-000000000001",
        }
    }

    #[test]
    fn a_tag_verifies_only_for_its_key_and_every_field_it_binds() {
        let key = RecordKey::derive(&[9; 32]);
        let tag = key.sign(&fields());
        assert!(key.verify(&fields(), &tag));
        assert!(key.verify(&fields(), tag.to_ascii_uppercase().as_slice()));
        assert!(
            !RecordKey::derive(&[8; 32]).verify(&fields(), &tag),
            "another database"
        );
        let changed = [
            RecordFields {
                source: "orders/7301.16384.0193b2f1",
                ..fields()
            },
            RecordFields {
                topic: "orders2",
                ..fields()
            },
            RecordFields {
                partition: 3,
                ..fields()
            },
            RecordFields {
                position: (0x016B_3748, 2),
                ..fields()
            },
            RecordFields {
                position: (0x016B_3749, 1),
                ..fields()
            },
            RecordFields {
                event_id: b"0193b2f0-0000-7000-8000-000000000002",
                ..fields()
            },
        ];
        for f in changed {
            assert!(!key.verify(&f, &tag), "{f:?}");
        }
        // lengths come first, so moving bytes from one field to the next changes the tag
        let a = RecordFields {
            source: "ab",
            topic: "c",
            ..fields()
        };
        let b = RecordFields {
            source: "a",
            topic: "bc",
            ..fields()
        };
        assert_ne!(key.sign(&a), key.sign(&b));
    }

    #[test]
    fn anything_but_the_tag_is_refused_without_panicking() {
        let key = RecordKey::derive(&[9; 32]);
        let tag = key.sign(&fields());
        for bad in [
            &b""[..],
            &tag[..63],
            b"zz",
            &[0xff; 64],
            &[b'0'; 64],
            &[0; 64],
        ] {
            assert!(!key.verify(&fields(), bad));
        }
        let mut longer = tag.to_vec();
        longer.push(b'0');
        assert!(!key.verify(&fields(), &longer));
    }

    #[test]
    fn the_record_key_is_not_the_sealing_key_and_never_printed() {
        let auth = [9u8; 32];
        let key = RecordKey::derive(&auth);
        let tag = key.sign(&fields());
        assert!(!RecordKey::from_bytes(&auth).verify(&fields(), &tag));
        // as documented: HMAC-SHA256(sealing key, "pg_outbox record mac v1")
        let mut derivation = HmacSha256::new_from_slice(&auth).unwrap();
        derivation.update(b"pg_outbox record mac v1");
        let derived = derivation.finalize().into_bytes();
        assert!(RecordKey::from_bytes(&derived).verify(&fields(), &tag));
        assert_eq!(format!("{key:?}"), "RecordKey(..)");
    }
}
