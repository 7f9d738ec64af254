//! `latency CONNINFO BROKERS TOPIC PARTITIONS MODE RATE SECONDS [METRICS_ADDR]`: the commit-to-Kafka
//! latency of `make bench`.
//!
//! MODE `wal` or `table`: offers RATE events/s, each `SELECT outbox.enqueue(...)` its own
//! transaction with `pg_outbox.mode = MODE`, spread over a few connections on a fixed schedule (an
//! open loop: a slow event does not delay the next one); a relay must be running. MODE `raw`: the
//! baseline without PostgreSQL and relay, the same records produced straight to TOPIC at the same
//! rate with the relay's producer settings.
//!
//! Two latencies, the first second being a warm-up that is not counted:
//! - commit -> acknowledgement: from the relay's `pg_outbox_relay_event_latency_seconds` histogram
//!   at METRICS_ADDR (its change over the measured seconds; a percentile is the upper bound of the
//!   bucket it falls in). raw: from handing the record to the producer to its delivery report.
//! - commit -> receipt: from the COMMIT returning to the client (raw: from handing the record to
//!   the producer) to the record's first arrival at a consumer assigned to every partition of
//!   TOPIC. It adds the consumer's fetch to the above.
//!
//! Prints one line: `events achieved_rate ack_p50 ack_p95 ack_p99 recv_p50 recv_p95 recv_p99
//! recv_max` (ms). Fails if an event is missing after a 30 s grace, or stored twice (two positions
//! in Kafka with the same event id).

use anyhow::{bail, Context, Result};
use pg_outbox_tests::scrape_metrics;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::time::MissedTickBehavior;

const WRITERS: usize = 8;
const WARM_UP: Duration = Duration::from_secs(1);

/// Records with an event id received so far.
static RECEIVED: AtomicUsize = AtomicUsize::new(0);
/// The warm-up event's id once received.
static ARRIVED: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// Where events go: `outbox.enqueue` on a connection, or a producer (the raw baseline).
enum Writer {
    Enqueue(tokio_postgres::Client, tokio_postgres::Statement),
    Produce(FutureProducer, AckTimes),
}

/// Producer acknowledgement latencies (ms) of the raw baseline, after the warm-up.
type AckTimes = Arc<std::sync::Mutex<Vec<f64>>>;

impl Writer {
    /// Writes one event; returns its id once committed (or handed to the producer).
    async fn write(
        &self,
        topic: &str,
        key: &str,
        payload: &str,
        n: u64,
        measured: bool,
    ) -> Result<String> {
        match self {
            Writer::Enqueue(client, enqueue) => Ok(client
                .query_one(enqueue, &[&topic, &key, &payload])
                .await?
                .get(0)),
            Writer::Produce(producer, acks) => {
                let id = format!("raw-{n}");
                let headers = OwnedHeaders::new().insert(Header {
                    key: "pg_outbox-id",
                    value: Some(&id),
                });
                let record = FutureRecord::to(topic)
                    .key(key)
                    .payload(payload)
                    .headers(headers);
                let sent = Instant::now();
                let delivery = producer
                    .send_result(record)
                    .map_err(|(e, _)| anyhow::anyhow!("produce: {e}"))?;
                let acks = acks.clone();
                tokio::spawn(async move {
                    if let Ok(Ok(_)) = delivery.await {
                        if measured {
                            let ms = sent.elapsed().as_secs_f64() * 1e3;
                            acks.lock().expect("not poisoned").push(ms);
                        }
                    }
                });
                Ok(id)
            }
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (metrics_addr, args) = match args.len() {
        9 => (Some(args[8].clone()), &args[..8]),
        _ => (None, &args[..]),
    };
    let [_, conninfo, brokers, topic, partitions, mode, rate, seconds] = args else {
        bail!(
            "usage: latency CONNINFO BROKERS TOPIC PARTITIONS wal|table|raw RATE SECONDS [METRICS_ADDR]"
        );
    };
    let partitions: i32 = partitions.parse().context("PARTITIONS")?;
    let rate: f64 = rate.parse().context("RATE")?;
    let seconds: f64 = seconds.parse().context("SECONDS")?;
    let total = (rate * (seconds + WARM_UP.as_secs_f64())) as usize;

    let consumer = receiver(brokers, topic, partitions)?;
    let done = Arc::new(AtomicBool::new(false));
    let receiving = {
        let done = done.clone();
        std::thread::spawn(move || receive(consumer, &done))
    };

    let producer: Option<FutureProducer> = match mode.as_str() {
        "raw" => Some(pg_outbox_relay::kafka::producer_config(brokers).create()?),
        "wal" | "table" => None,
        other => bail!("MODE must be wal, table or raw, not {other:?}"),
    };
    if producer.is_none() && metrics_addr.is_none() {
        bail!("MODE {mode} needs METRICS_ADDR, the relay's --metrics-addr");
    }
    let acks = AckTimes::default();
    let mut writers = Vec::new();
    for _ in 0..WRITERS {
        let writer = match &producer {
            Some(p) => Writer::Produce(p.clone(), acks.clone()),
            None => {
                let (client, connection) =
                    tokio_postgres::connect(conninfo, tokio_postgres::NoTls).await?;
                tokio::spawn(connection);
                client
                    .batch_execute(&format!("SET pg_outbox.mode = '{mode}'"))
                    .await?;
                let enqueue = client
                    .prepare("SELECT outbox.enqueue($1, $2, $3::text::jsonb)::text")
                    .await?;
                Writer::Enqueue(client, enqueue)
            }
        };
        writers.push(writer);
    }
    // one event through the whole path first: the relay's first touch of a topic reads back its
    // partitions, which is start-up, not latency
    let warm_up = writers[0]
        .write(topic, "warm-up", "{}", u64::MAX, false)
        .await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while ARRIVED.lock().expect("not poisoned").as_deref() != Some(warm_up.as_str()) {
        if Instant::now() > deadline {
            bail!("the warm-up event did not arrive within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = Instant::now();
    let measured_from = started + WARM_UP;
    let mut tasks = Vec::new();
    for (w, writer) in writers.into_iter().enumerate() {
        let topic = topic.clone();
        let share = total / WRITERS + usize::from(w < total % WRITERS);
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(WRITERS as f64 / rate));
            tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
            let pad = "x".repeat(200);
            let mut committed = Vec::with_capacity(share);
            for i in 0..share {
                tick.tick().await;
                let key = format!("key-{}", (i * WRITERS + w) % 1000);
                let payload = format!(r#"{{"writer": {w}, "i": {i}, "pad": "{pad}"}}"#);
                let n = (i * WRITERS + w) as u64;
                let measured = Instant::now() >= measured_from;
                let id = writer.write(&topic, &key, &payload, n, measured).await?;
                committed.push((id, Instant::now()));
            }
            anyhow::Ok(committed)
        }));
    }
    let before = match &metrics_addr {
        Some(addr) => {
            tokio::time::sleep_until(measured_from.into()).await;
            Some(histogram(addr).await?)
        }
        None => None,
    };
    let mut committed = HashMap::with_capacity(total);
    for t in tasks {
        committed.extend(t.await??);
    }
    let achieved = total as f64 / started.elapsed().as_secs_f64();

    // wait for the stragglers (30 s at most), and a moment more for any duplicate
    let grace = Instant::now() + Duration::from_secs(30);
    while RECEIVED.load(Ordering::Relaxed) < total && Instant::now() < grace {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    done.store(true, Ordering::Relaxed);
    let ack = match (&metrics_addr, before) {
        (Some(addr), Some(before)) => {
            let after = histogram(addr).await?;
            let delta: Vec<(f64, u64)> = after
                .iter()
                .zip(&before)
                .map(|((le, a), (_, b))| (*le, a - b))
                .collect();
            [0.50, 0.95, 0.99].map(|p| bucket_percentile(&delta, p))
        }
        _ => {
            let mut acks = acks.lock().expect("not poisoned").clone();
            acks.sort_by(f64::total_cmp);
            [0.50, 0.95, 0.99].map(|p| percentile(&acks, p))
        }
    };
    let received = receiving
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))??;

    // the first arrival of each event; a record fetched twice at one position is one record
    let mut first: HashMap<&str, (Instant, (i32, i64))> = HashMap::with_capacity(total);
    let mut duplicates = 0;
    for (id, at, position) in &received {
        if !committed.contains_key(id) {
            continue;
        }
        match first.get(id.as_str()) {
            None => {
                first.insert(id, (*at, *position));
            }
            Some((_, p)) if p != position => {
                duplicates += 1;
                eprintln!("latency: event {id} stored twice, at {p:?} and {position:?}");
            }
            Some(_) => {}
        }
    }
    let mut latencies: Vec<f64> = first
        .iter()
        .filter_map(|(id, (at, _))| {
            let commit = committed[*id];
            (commit >= measured_from)
                .then(|| at.saturating_duration_since(commit).as_secs_f64() * 1e3)
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    println!(
        "{} {:.0} {:.2} {:.2} {:.2} {:.2} {:.2} {:.2} {:.2}",
        latencies.len(),
        achieved,
        ack[0],
        ack[1],
        ack[2],
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.95),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or(f64::NAN)
    );
    if first.len() != committed.len() || duplicates > 0 {
        bail!(
            "{} of {} events arrived, {duplicates} stored twice",
            first.len(),
            committed.len()
        );
    }
    Ok(())
}

/// The value at quantile `p` of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1));
    sorted.get(i).copied().unwrap_or(f64::NAN)
}

/// The upper bound (ms) of the bucket holding quantile `p`, from per-bucket counts (not cumulative).
fn bucket_percentile(buckets: &[(f64, u64)], p: f64) -> f64 {
    let total: u64 = buckets.iter().map(|(_, n)| n).sum();
    let rank = (total as f64 * p).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (le, n) in buckets {
        seen += n;
        if seen >= rank {
            return le * 1e3;
        }
    }
    f64::NAN
}

/// The relay's latency histogram: per bucket, its upper bound in seconds and its own count.
async fn histogram(addr: &str) -> Result<Vec<(f64, u64)>> {
    let owned = addr.to_string();
    let text = tokio::task::spawn_blocking(move || scrape_metrics(&owned)).await??;
    let mut cumulative = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("pg_outbox_relay_event_latency_seconds_bucket{le=\"")
        else {
            continue;
        };
        let (le, count) = rest.split_once("\"} ").context("bucket line")?;
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse()?
        };
        cumulative.push((le, count.parse::<u64>()?));
    }
    if cumulative.is_empty() {
        bail!("no pg_outbox_relay_event_latency_seconds at {addr}");
    }
    let mut previous = 0;
    Ok(cumulative
        .into_iter()
        .map(|(le, c)| {
            let own = c - previous;
            previous = c;
            (le, own)
        })
        .collect())
}

/// A consumer of every partition of `topic`, from its current end (fetching with little delay).
fn receiver(brokers: &str, topic: &str, partitions: i32) -> Result<BaseConsumer> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "pg_outbox-bench-latency")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "1")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        let (_, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        tpl.add_partition_offset(topic, p, Offset::Offset(high))?;
    }
    consumer.assign(&tpl)?;
    Ok(consumer)
}

/// Receives records until told to stop: each event id, when it arrived, and where it is stored.
type Arrival = (String, Instant, (i32, i64));

fn receive(consumer: BaseConsumer, done: &AtomicBool) -> Result<Vec<Arrival>> {
    let mut out = Vec::new();
    while !done.load(Ordering::Relaxed) {
        let Some(msg) = consumer.poll(Duration::from_millis(20)) else {
            continue;
        };
        let msg = msg?;
        let at = Instant::now();
        let id = msg.headers().and_then(|hs| {
            hs.iter()
                .find(|h| h.key == "pg_outbox-id")
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        });
        if let Some(id) = id {
            if msg.key() == Some(b"warm-up") {
                *ARRIVED.lock().expect("not poisoned") = Some(id);
                continue;
            }
            out.push((id, at, (msg.partition(), msg.offset())));
            RECEIVED.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(out)
}
