//! Java-compatible partitioning, so a key lands where Kafka's Java producer would put it:
//! `(murmur2(key) & 0x7fffffff) % partitions`. The relay picks partitions itself (instead of letting
//! librdkafka do it) because the restart dedup must know a record's partition before sending it.
//! Events without a key are spread by their event id, which is stable across retries.

/// Kafka's murmur2 (seed 0x9747b28c), as in `org.apache.kafka.common.utils.Utils.murmur2`.
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let len = data.len();
    let mut h: u32 = SEED ^ (len as u32);
    let chunks = data.chunks_exact(4);
    let tail = chunks.remainder();
    for chunk in chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    match tail.len() {
        3 => {
            h ^= (tail[2] as u32) << 16;
            h ^= (tail[1] as u32) << 8;
            h ^= tail[0] as u32;
            h = h.wrapping_mul(M);
        }
        2 => {
            h ^= (tail[1] as u32) << 8;
            h ^= tail[0] as u32;
            h = h.wrapping_mul(M);
        }
        1 => {
            h ^= tail[0] as u32;
            h = h.wrapping_mul(M);
        }
        _ => {}
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition for `key` (or, without a key, for the event id) among `partitions`.
pub fn partition_for(key: Option<&[u8]>, event_id: &[u8; 16], partitions: i32) -> i32 {
    let hash = murmur2(key.unwrap_or(event_id));
    (hash & 0x7fff_ffff) % partitions.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_kafka_test_vectors() {
        // from Kafka's UtilsTest.testMurmur2
        let cases: [(&str, i32); 6] = [
            ("21", -973932308),
            ("foobar", -790332482),
            ("a-little-bit-long-string", -985981536),
            ("a-little-bit-longer-string", -1486304829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58897971,
            ),
            ("abc", 479470107),
        ];
        for (input, expected) in cases {
            assert_eq!(murmur2(input.as_bytes()), expected, "{input}");
        }
    }

    #[test]
    fn partition_is_stable_and_in_range() {
        let id = [9u8; 16];
        for n in 1..20 {
            let p = partition_for(Some(b"customer-42"), &id, n);
            assert!((0..n).contains(&p));
            assert_eq!(p, partition_for(Some(b"customer-42"), &[1u8; 16], n));
        }
        assert_eq!(partition_for(None, &id, 7), partition_for(None, &id, 7));
    }
}
