//! `consume_events BROKERS COUNT TOPIC:PARTITIONS...`: reads topics from the beginning until COUNT
//! records arrived and every partition is read to its end (or 60 s passed) and prints them. Used by
//! `make demo`.

use anyhow::{Context, Result};
use std::time::Duration;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, brokers, count, topics @ ..] = args.as_slice() else {
        anyhow::bail!("usage: consume_events BROKERS COUNT TOPIC:PARTITIONS...");
    };
    let count: usize = count.parse().context("COUNT")?;
    let topics: Vec<(String, i32)> = topics
        .iter()
        .map(|t| {
            let (name, n) = t.split_once(':').context("TOPIC:PARTITIONS")?;
            Ok((name.to_string(), n.parse()?))
        })
        .collect::<Result<_>>()?;
    let refs: Vec<(&str, i32)> = topics.iter().map(|(t, n)| (t.as_str(), *n)).collect();
    let records = pg_outbox_tests::read_all(brokers, &refs, count, Duration::from_secs(60))?;
    println!("{} record(s) in Kafka:", records.len());
    for r in &records {
        println!(
            "  {}[{}]@{:<4} key={:<8} id={} type={:<14} {}",
            r.topic,
            r.partition,
            r.offset,
            r.key
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default(),
            r.id(),
            r.header("type").unwrap_or("-"),
            String::from_utf8_lossy(&r.payload)
        );
    }
    Ok(())
}
