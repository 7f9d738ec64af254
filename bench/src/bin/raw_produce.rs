//! `raw_produce BROKERS TOPICS N PAYLOAD_BYTES KEYS`: the physical limit the relay is compared with
//! in `make bench`: N records of the given size over KEYS keys, round-robin over TOPICS (comma
//! separated), with the same headers as the relay's records, produced with the relay's producer
//! settings (`producer_config`: idempotent, acks=all, linger 5 ms) and no PostgreSQL. Prints the
//! elapsed seconds.

use anyhow::{Context, Result};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use std::time::{Duration, Instant};

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, brokers, topics, n, size, keys] = args.as_slice() else {
        anyhow::bail!("usage: raw_produce BROKERS TOPICS N PAYLOAD_BYTES KEYS");
    };
    let topics: Vec<&str> = topics.split(',').collect();
    let n: usize = n.parse().context("N")?;
    let size: usize = size.parse().context("PAYLOAD_BYTES")?;
    let keys: usize = keys.parse().context("KEYS")?;
    let producer: FutureProducer = pg_outbox_relay::kafka::producer_config(brokers).create()?;
    let payload = vec![b'x'; size];
    let started = Instant::now();
    let mut pending = std::collections::VecDeque::new();
    for i in 0..n {
        let key = format!("key-{}", i % keys);
        // the same three headers the relay adds (event id, position, source), of the same sizes
        let id = format!("01a20000-0000-7000-8000-{i:012}");
        let position = format!("{:016X}:{:016X}", i / 1000, i % 1000);
        let headers = OwnedHeaders::new_with_capacity(3)
            .insert(Header {
                key: "pg_outbox-id",
                value: Some(&id),
            })
            .insert(Header {
                key: "pg_outbox-position",
                value: Some(&position),
            })
            .insert(Header {
                key: "pg_outbox-source",
                value: Some("pg_outbox"),
            });
        let record = FutureRecord::to(topics[i % topics.len()])
            .key(&key)
            .payload(&payload)
            .headers(headers);
        let mut record = record;
        loop {
            match producer.send_result(record) {
                Ok(f) => {
                    pending.push_back(f);
                    break;
                }
                Err((_, back)) => {
                    record = back;
                    if let Some(f) = pending.pop_front() {
                        f.await?.map_err(|(e, _)| e)?;
                    }
                }
            }
        }
        if pending.len() > 100_000 {
            pending.pop_front().unwrap().await?.map_err(|(e, _)| e)?;
        }
    }
    for f in pending {
        f.await?.map_err(|(e, _)| e)?;
    }
    producer.flush(Duration::from_secs(30))?;
    println!("{:.3}", started.elapsed().as_secs_f64());
    Ok(())
}
