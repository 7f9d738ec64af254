//! Chaos: the relay and ingest under a steady enqueue load while the relay, ingest, PostgreSQL and
//! the broker are killed or paused at random moments. Counts what was committed, published,
//! duplicated, lost and out of order, in Kafka and in the consumer's inbox, and fails on anything
//! but exactly once in order. `make test` runs a short version; `make chaos` runs 100,000 events
//! (PG_OUTBOX_CHAOS_EVENTS). Real PostgreSQL (restarted with -m immediate), real broker (SIGSTOP).
//!
//! Faults: SIGKILL of the relay, SIGKILL of ingest, PostgreSQL stopped with -m immediate and started,
//! the broker paused (SIGSTOP), and with `make chaos` (PG_OUTBOX_CHAOS_PAUSE=1) the relay paused while
//! a second relay takes the slot over (`wal_sender_timeout = 3s` here), then resumed
//! (docs/guarantees.md, "A paused relay is fenced": not yet without a residual window, so not in
//! `make test`).

use anyhow::{ensure, Result};
use pg_outbox_tests::{
    order_violations, payload_n, pgcluster, read_all, record_order_violations, restart_cluster,
    signal, wait_for, Broker, Relay, TestDb,
};
use rand::Rng;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

const KEYS: i64 = 16;
/// Events per transaction.
const BATCH: i64 = 10;
const PARTITIONS: i32 = 3;

/// Writes transactions 0..txns of BATCH events each (event n = t * BATCH + i, key n % KEYS),
/// riding out restarts.
async fn writer(port: u16, db: String, txns: i64) -> Result<()> {
    pg_outbox_tests::resilient_writer(
        pg_outbox_tests::conninfo(&[port], &db),
        0..txns,
        |t| pg_outbox_tests::numbered_batch(t, BATCH, KEYS),
        |_, _| {},
    )
    .await
}

#[tokio::test]
async fn chaos_kills_and_pauses_lose_duplicate_and_reorder_nothing() -> Result<()> {
    let events: i64 = std::env::var("PG_OUTBOX_CHAOS_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let txns = (events + BATCH - 1) / BATCH;
    let events = txns * BATCH;
    let (pg_port, pgdata) = restart_cluster()?;
    let source = TestDb::create("ch_source", pg_port).await?;
    source
        .client
        .batch_execute(
            "CREATE TABLE written (t bigint PRIMARY KEY); \
             ALTER DATABASE ch_source SET wal_sender_timeout = '3s'",
        )
        .await?;
    let _sink = TestDb::create("ch_sink", pg_port).await?;
    let broker = Broker::start()?;
    broker.create_topic("orders", PARTITIONS).await?;
    let brokers = broker.bootstrap();
    let start_relay = || {
        Relay::start(
            pg_port,
            "ch_source",
            &brokers,
            &["--fence-timeout-ms", "5000"],
        )
    };
    let start_ingest = || Relay::ingest(pg_port, "ch_sink", &brokers, "chaos", "orders", &[]);
    let mut relay = start_relay()?;
    let mut ingest = start_ingest()?;
    source.wait_for_active_slot().await?;

    let started = Instant::now();
    let writing = tokio::spawn(writer(pg_port, "ch_source".into(), txns));
    let mut counts: HashMap<&str, usize> = HashMap::new();
    // each kind of fault in turn, from a random first one, at random moments: the randomness is
    // the point of this test
    // the paused-and-replaced relay only in `make chaos` (PG_OUTBOX_CHAOS_PAUSE=1): an in-flight
    // batch retried by librdkafka after the resume can be appended again (docs/guarantees.md, "A
    // paused relay is fenced", "What is left")
    let kinds = if std::env::var_os("PG_OUTBOX_CHAOS_PAUSE").is_some() {
        5
    } else {
        4
    };
    let mut turn = rand::rng().random_range(0..kinds);
    // relays that were paused and resumed after another took over: they stand by
    let mut resumed = Vec::new();
    // until the writer is done and every kind of fault happened at least once
    while !writing.is_finished() || counts.len() < kinds {
        let pause = rand::rng().random_range(500..2500);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        turn += 1;
        let fault = match turn % kinds {
            0 => {
                relay.kill9()?;
                relay = start_relay()?;
                "relay SIGKILL"
            }
            1 => {
                ingest.kill9()?;
                ingest = start_ingest()?;
                "ingest SIGKILL"
            }
            2 => {
                pgcluster(&["crash", &pgdata])?;
                pgcluster(&["start", &pgdata, &pg_port.to_string(), "logical"])?;
                "PostgreSQL immediate restart"
            }
            4 => {
                signal(relay.pid(), "STOP")?;
                let paused = std::mem::replace(&mut relay, start_relay()?);
                let frozen = rand::rng().random_range(4000..9000);
                tokio::time::sleep(Duration::from_millis(frozen)).await;
                signal(paused.pid(), "CONT")?;
                resumed.push(paused);
                "relay paused, replaced and resumed"
            }
            _ => {
                signal(broker.pid(), "STOP")?;
                let frozen = rand::rng().random_range(500..3000);
                tokio::time::sleep(Duration::from_millis(frozen)).await;
                signal(broker.pid(), "CONT")?;
                "broker paused"
            }
        };
        *counts.entry(fault).or_default() += 1;
    }
    writing.await??;
    let wrote = started.elapsed();

    // Kafka: every committed event once, per key in order
    let records = read_all(
        &brokers,
        &[("orders", PARTITIONS)],
        events as usize,
        Duration::from_secs(600),
    )?;
    let published: HashSet<i64> = records.iter().map(|r| payload_n(&r.payload)).collect();
    let ids: HashSet<String> = records.iter().map(|r| r.id()).collect();
    let lost = (0..events).filter(|n| !published.contains(n)).count();
    let ghosts = published
        .iter()
        .filter(|n| !(0..events).contains(*n))
        .count();
    let duplicated = records.len() - ids.len();
    let out_of_order = record_order_violations(&records);

    // the inbox: every message once, and in per-partition order within each key
    let sink_client = pg_outbox_tests::connect(pg_port, "ch_sink").await?;
    let _ = wait_for(
        "the inbox to hold every event",
        Duration::from_secs(300),
        || {
            let c = &sink_client;
            async move {
                Ok(c.query_one(
                    "SELECT count(*) FROM inbox.messages WHERE consumer = 'chaos'",
                    &[],
                )
                .await?
                .get::<_, i64>(0)
                    >= events)
            }
        },
    )
    .await;
    let inbox = sink_client
        .query(
            "SELECT key, convert_from(payload, 'UTF8')::jsonb->>'n', message_id FROM inbox.messages \
             WHERE consumer = 'chaos' ORDER BY partition, \"offset\"",
            &[],
        )
        .await?;
    let inbox_ids: HashSet<String> = inbox.iter().map(|r| r.get(2)).collect();
    let inbox_duplicated = inbox.len() - inbox_ids.len();
    let inbox_missing = ids.difference(&inbox_ids).count();
    let inbox_out_of_order = order_violations(inbox.iter().map(|r| {
        (
            r.get::<_, Option<String>>(0).unwrap_or_default(),
            r.get::<_, Option<String>>(1)
                .and_then(|n| n.parse().ok())
                .unwrap_or(-1),
        )
    }));

    let mut faults: Vec<String> = counts.iter().map(|(f, c)| format!("{f} x{c}")).collect();
    faults.sort();
    println!(
        "chaos: {events} events committed; {:.0} s of faults: {}",
        wrote.as_secs_f64(),
        faults.join(", ")
    );
    println!(
        "chaos: kafka: published {} records, {} distinct events, duplicated {duplicated}, lost {lost}, \
         ghosts {ghosts}, per-key order violations {out_of_order}",
        records.len(),
        ids.len()
    );
    println!(
        "chaos: inbox: {} rows, duplicated {inbox_duplicated}, missing {inbox_missing}, per-key \
         order violations {inbox_out_of_order}",
        inbox.len()
    );
    ensure!(counts.len() == kinds, "every kind of fault during the run");
    ensure!(
        lost == 0 && ghosts == 0 && duplicated == 0 && out_of_order == 0,
        "Kafka holds every committed event once, in order"
    );
    ensure!(
        inbox_duplicated == 0 && inbox_missing == 0 && inbox_out_of_order == 0,
        "the inbox holds every event once, in order"
    );
    drop(relay);
    drop(resumed);
    drop(ingest);
    Ok(())
}
