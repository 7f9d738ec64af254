//! `raw_consume BROKERS TOPIC PARTITIONS N`: the baseline of the ingest benchmark in `make bench`.
//! A minimal rdkafka consumer reads TOPIC from the beginning of every partition until N records
//! arrived, looking at each record's id header and payload as the ingest does, and writes nothing.
//! Prints the elapsed seconds, from creating the consumer to the last record.

use anyhow::{bail, Context, Result};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use std::time::{Duration, Instant};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, brokers, topic, partitions, n] = args.as_slice() else {
        bail!("usage: raw_consume BROKERS TOPIC PARTITIONS N");
    };
    let partitions: i32 = partitions.parse().context("PARTITIONS")?;
    let n: usize = n.parse().context("N")?;
    let started = Instant::now();
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "pg_outbox-bench-raw")
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let (mut count, mut bytes, mut ids) = (0usize, 0usize, 0usize);
    let deadline = started + Duration::from_secs(300);
    while count < n {
        if Instant::now() > deadline {
            bail!("only {count} of {n} records within 300 s");
        }
        let Some(msg) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let msg = msg?;
        count += 1;
        bytes += msg.payload().map_or(0, <[u8]>::len);
        if let Some(hs) = msg.headers() {
            ids += hs.iter().filter(|h| h.key == "pg_outbox-id").count();
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    eprintln!("raw_consume: {count} records, {ids} with an id, {bytes} payload bytes");
    println!("{elapsed:.3}");
    Ok(())
}
