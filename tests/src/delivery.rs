//! What reached Kafka, judged: every event exactly once, and per key in commit order. The tests
//! number their events per key (`{"n": n}`, see [`crate::numbered`]) so that order can be checked.

use crate::Record;
use anyhow::{ensure, Result};
use std::collections::{HashMap, HashSet};

/// Every id exactly once, and per key the payload field `n` strictly increasing by one.
pub fn assert_exactly_once_in_order(records: &[Record], expected: usize) -> Result<()> {
    let ids: HashSet<String> = records.iter().map(Record::id).collect();
    println!(
        "records read: {}, distinct event ids: {}, expected: {expected}",
        records.len(),
        ids.len()
    );
    ensure!(
        ids.len() == expected,
        "{} distinct ids, expected {expected}",
        ids.len()
    );
    if records.len() != expected {
        let mut seen: HashMap<String, &Record> = HashMap::new();
        for r in records {
            if let Some(first) = seen.insert(r.id(), r) {
                println!(
                    "duplicate {} in {}[{}]: offsets {} and {}, positions {:?} and {:?}",
                    r.id(),
                    r.topic,
                    r.partition,
                    first.offset,
                    r.offset,
                    first.header("pg_outbox-position"),
                    r.header("pg_outbox-position")
                );
            }
        }
    }
    ensure!(
        records.len() == expected,
        "{} records for {expected} events: duplicates",
        records.len()
    );
    let mut next: HashMap<Vec<u8>, i64> = HashMap::new();
    let mut partition_of: HashMap<Vec<u8>, (String, i32)> = HashMap::new();
    for r in records {
        // records are sorted by (topic, partition, offset): per key that is the Kafka order
        let key = r.key.clone().unwrap_or_default();
        let place = (r.topic.clone(), r.partition);
        ensure!(
            partition_of
                .entry(key.clone())
                .or_insert_with(|| place.clone())
                == &place,
            "key {:?} in two partitions",
            String::from_utf8_lossy(&key)
        );
        let v: serde_json::Value = serde_json::from_slice(&r.payload)?;
        let n = v["n"].as_i64().unwrap_or(-1);
        let want = next.entry(key.clone()).or_insert(1);
        ensure!(
            n == *want,
            "key {:?}: got n={n}, expected {want}",
            String::from_utf8_lossy(&key)
        );
        *want += 1;
    }
    Ok(())
}

/// Per key, how often an event's n is not above the previous one's (in Kafka's order).
pub fn order_violations(entries: impl Iterator<Item = (String, i64)>) -> usize {
    let mut last: HashMap<String, i64> = HashMap::new();
    let mut violations = 0;
    for (key, n) in entries {
        if let Some(prev) = last.insert(key, n) {
            if n <= prev {
                violations += 1;
            }
        }
    }
    violations
}

/// The events of writer transaction `t` with `batch` events each: event `n = t * batch + i` has
/// the key `k{n % keys}` and the payload `{"n": n}` (keys and JSON payloads, as
/// [`resilient_writer`] takes them).
pub fn numbered_batch(t: i64, batch: i64, keys: i64) -> (Vec<String>, Vec<String>) {
    let ns = t * batch..(t + 1) * batch;
    (
        ns.clone().map(|n| format!("k{}", n % keys)).collect(),
        ns.map(|n| format!(r#"{{"n": {n}}}"#)).collect(),
    )
}

/// The `n` of a [`numbered_batch`] event's payload (`{"n": n}`), or -1 for anything else.
pub fn payload_n(payload: &[u8]) -> i64 {
    serde_json::from_slice::<serde_json::Value>(payload)
        .ok()
        .and_then(|v| v["n"].as_i64())
        .unwrap_or(-1)
}

/// [`order_violations`] of [`numbered_batch`] records in Kafka's order, per key.
pub fn record_order_violations(records: &[Record]) -> usize {
    order_violations(records.iter().map(|r| {
        (
            String::from_utf8_lossy(r.key.as_deref().unwrap_or_default()).to_string(),
            payload_n(&r.payload),
        )
    }))
}
