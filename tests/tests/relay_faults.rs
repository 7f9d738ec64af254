//! Faults under the relay: it is killed with SIGKILL at random moments (WAL and poll source), the
//! broker is unreachable at its start and frozen mid-stream, PostgreSQL restarts under it. Every
//! committed event arrives exactly once, in per-key commit order, and no event is confirmed before
//! the broker acknowledged it.

use anyhow::{Context, Result};
use pg_outbox_tests::{
    assert_exactly_once_in_order, enqueue, free_port, metric, one_key_writer, outbox_rows,
    pgcluster, port, read_all, restart_cluster, scrape_metrics, signal, wait_for, wait_for_metric,
    written_at_least, Broker, Relay, Scenario, TestDb, READ_TIMEOUT,
};
use rand::{Rng, SeedableRng};
use std::time::Duration;

/// Streams `txns` transactions of `per_txn` events (one writer, so commit order is the order it
/// issues; per key, n counts up) while the relay is killed with SIGKILL at random moments, at least
/// 10 times, and restarted; then checks every event arrived once, in per-key order.
/// (`s` has the topic `orders`.)
async fn crash_run(s: &Scenario, relay_args: &[&str], txns: usize, per_txn: usize) -> Result<()> {
    const KEYS: usize = 64;
    let mut relay = s.relay().args(relay_args).running().await?;
    let writer = s.db.session().await?;
    let writing = tokio::spawn(async move {
        let mut seq = vec![0i64; KEYS];
        let mut rng = rand::rngs::StdRng::from_os_rng();
        for _ in 0..txns {
            let mut keys = Vec::with_capacity(per_txn);
            let mut payloads = Vec::with_capacity(per_txn);
            for _ in 0..per_txn {
                let k = rng.random_range(0..KEYS);
                seq[k] += 1;
                keys.push(format!("key-{k}"));
                payloads.push(format!(
                    r#"{{"n": {}, "pad": "{}"}}"#,
                    seq[k],
                    "x".repeat(64)
                ));
            }
            writer
                .query(
                    "SELECT outbox.enqueue_batch('orders', $1, $2::text[]::jsonb[])",
                    &[&keys, &payloads],
                )
                .await?;
            // pacing: transactions keep coming while the relay is killed and restarted
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..80))).await;
        }
        anyhow::Ok(())
    });
    // kill each relay at a random moment after it started publishing (not while it sets up)
    let streaming = if relay_args.contains(&"poll") {
        "polling outbox.events"
    } else {
        "streaming from slot"
    };
    let mut kills = 0;
    while !writing.is_finished() || kills < 10 {
        relay
            .wait_for_log(streaming, kills + 1, Duration::from_secs(60))
            .await?;
        // the random moment of the kill is the point of the test, not a wait for anything
        let wait = rand::rng().random_range(200..1500);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        relay.kill9()?;
        kills += 1;
        relay = s.relay().args(relay_args).start()?;
    }
    writing.await??;
    let total = txns * per_txn;
    let records = s.read(total)?;
    let resumed = relay
        .log_text()
        .matches("resuming after the last record")
        .count();
    println!(
        "relay {relay_args:?} killed with SIGKILL {kills} times during {total} events; \
         {resumed} partition resumes after a partition's last record"
    );
    assert!(kills >= 10);
    assert_exactly_once_in_order(&records, total)
}

#[tokio::test]
async fn kill_9_at_random_moments_loses_and_duplicates_nothing() -> Result<()> {
    let s = Scenario::builder("rl_crash")
        .topic("orders", 6)
        .start()
        .await?;
    crash_run(&s, &[], 500, 100).await
}

#[tokio::test]
async fn table_mode_kill_9_loses_and_duplicates_nothing() -> Result<()> {
    let s = Scenario::builder("rl_table_crash")
        .table_mode()
        .topic("orders", 4)
        .start()
        .await?;
    crash_run(&s, &["--source", "poll", "--poll-batch", "300"], 200, 100).await?;
    wait_for(
        "the outbox table to drain",
        Duration::from_secs(30),
        || async { Ok(outbox_rows(&s.db.client).await? == 0) },
    )
    .await
}

#[tokio::test]
async fn broker_unreachable_at_start_then_stopped_mid_stream() -> Result<()> {
    let db = TestDb::create("rl_broker", port()).await?;
    let broker_port = free_port();
    let brokers = format!("127.0.0.1:{broker_port}");
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    // the relay starts while nothing listens on the broker port
    let _relay = Relay::start(
        db.port,
        &db.name,
        &brokers,
        &["--metrics-addr", &metrics_addr],
    )?;
    db.wait_for_active_slot().await?;
    let c = &db.client;
    let mut after_first = String::new();
    for n in 1..=100 {
        enqueue(c, "orders", "k", &format!(r#"{{"n": {n}}}"#)).await?;
        if n == 1 {
            after_first = db.current_wal_lsn().await?;
        }
    }
    // the relay holds all 100 events and has no broker to give them to: it confirms none
    db.wait_for_sent_lsn(&db.current_wal_lsn().await?).await?;
    assert!(
        !db.confirmed_at_least(&after_first).await?,
        "the slot confirmed an event no broker acknowledged"
    );
    let broker = Broker::start_on(broker_port)?;
    broker.create_topic("orders", 2).await?;
    let records = read_all(&brokers, &[("orders", 2)], 100, READ_TIMEOUT)?;
    assert_exactly_once_in_order(&records, 100)?;

    // now freeze the broker while events keep coming, then let it go
    let writer = db.session().await?;
    let writing = tokio::spawn(async move {
        for n in 101..=2000 {
            writer
                .query_one(
                    "SELECT outbox.enqueue('orders', 'k', jsonb_build_object('n', $1::int))",
                    &[&n],
                )
                .await?;
        }
        anyhow::Ok(())
    });
    // mid-stream: the relay is publishing the new events
    wait_for_metric(
        &metrics_addr,
        "pg_outbox_relay_events_published_total",
        101.0,
        Duration::from_secs(60),
    )
    .await?;
    signal(broker.pid(), "STOP")?;
    // while the broker is frozen, the rest of the stream is committed and reaches the relay
    writing.await??;
    db.wait_for_sent_lsn(&db.current_wal_lsn().await?).await?;
    let published = metric(
        &scrape_metrics(&metrics_addr)?,
        "pg_outbox_relay_events_published_total",
    );
    println!("published before the broker thawed: {published:?} of 2000");
    assert!(
        published.is_some_and(|p| p < 2000.0),
        "the frozen broker acknowledged everything: {published:?}"
    );
    signal(broker.pid(), "CONT")?;
    let records = read_all(&brokers, &[("orders", 2)], 2000, READ_TIMEOUT)?;
    assert_exactly_once_in_order(&records, 2000)
}

#[tokio::test]
async fn postgres_restart_mid_stream_loses_and_duplicates_nothing() -> Result<()> {
    // a cluster of its own: PostgreSQL is restarted under the relay
    let (pg_port, pgdata) = restart_cluster()?;
    let s = Scenario::builder("rl_pgrestart")
        .port(pg_port)
        .topic("orders", 2)
        .start()
        .await?;
    let db = &s.db;
    db.client
        .batch_execute("CREATE TABLE written (n bigint PRIMARY KEY)")
        .await?;
    let mut relay = s.relay().running().await?;
    const N: i64 = 3000;
    let writing = tokio::spawn(one_key_writer(pg_port, db.name.clone(), N));
    written_at_least(pg_port, &db.name, N / 3).await?;
    pgcluster(&["restart", &pgdata]).context("restarting PostgreSQL")?;
    writing.await??;
    let records = s.read(N as usize)?;
    assert!(
        relay.try_wait()?.is_none(),
        "the relay recovers by itself: still running"
    );
    let reconnects = relay
        .log_text()
        .matches("session ended; reconnecting")
        .count();
    println!("relay sessions restarted after the PostgreSQL restart: {reconnects}");
    assert!(reconnects >= 1, "the relay must have noticed the restart");
    assert_exactly_once_in_order(&records, N as usize)
}
