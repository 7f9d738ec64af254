//! A live predecessor cannot duplicate after a takeover (issue 21, item 7).
//!
//! Relay A streams under load with a producer that holds records for 10 s (`linger.ms=10000`, a
//! setting the relay accepts), relay B stands by. A's role gets a connection limit of 0 and its
//! sessions are terminated (`pg_terminate_backend`): A is alive and retrying (a transient error),
//! but cannot take its source back,
//! so B takes over within a second or two and reads the partitions back. Whatever A's producer
//! still held when its session ended must never reach Kafka after that read-back: A withdraws it
//! and closes its producer the moment its session ends. Before that, A's producer delivered its
//! lingering records seconds later, after B's copies (issue 21 measured 1,369 and 2,404 duplicates).

use anyhow::{ensure, Result};
use pg_outbox_tests::{
    conninfo, free_port, healthz, metric, numbered_batch, port, read_all, record_order_violations,
    resilient_writer, scrape_metrics, wait_for, wait_for_metric, Broker, Record, Relay, TestDb,
};
use std::collections::HashSet;
use std::time::Duration;

/// Writer transactions, of [`PER_TXN`] events each.
const TXNS: i64 = 4000;
const PER_TXN: i64 = 2;

async fn live_takeover(db: &TestDb, source_args: &[&str]) -> Result<()> {
    let wal = !source_args.contains(&"poll");
    let (a_role, b_role) = (format!("{}_a", db.name), format!("{}_b", db.name));
    db.client
        .batch_execute(&format!(
            "DROP ROLE IF EXISTS {a_role}; DROP ROLE IF EXISTS {b_role}; \
             CREATE ROLE {a_role} LOGIN REPLICATION IN ROLE outbox_relay; \
             CREATE ROLE {b_role} LOGIN REPLICATION IN ROLE outbox_relay; \
             CREATE TABLE written (n bigint PRIMARY KEY)"
        ))
        .await?;
    if wal {
        db.create_slot().await?;
    }
    let broker = Broker::start()?;
    broker.create_topic("orders", 2).await?;
    let (a_addr, b_addr) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let args = |role: &str, addr: &str| -> Vec<String> {
        let mut args: Vec<String> = source_args.iter().map(|a| a.to_string()).collect();
        args.extend(
            [
                "--pg-user",
                role,
                "--kafka",
                "linger.ms=10000",
                "--metrics-addr",
                addr,
            ]
            .map(String::from),
        );
        args
    };
    let a_args = args(&a_role, &a_addr);
    let a_args: Vec<&str> = a_args.iter().map(String::as_str).collect();
    let mut a = Relay::start(db.port, &db.name, &broker.bootstrap(), &a_args)?;
    wait_for("relay A active", Duration::from_secs(60), || async {
        Ok(healthz(&a_addr).is_ok_and(|(ok, text)| ok && text.contains("ok: active")))
    })
    .await?;
    let b_args = args(&b_role, &b_addr);
    let b_args: Vec<&str> = b_args.iter().map(String::as_str).collect();
    let b = Relay::start(db.port, &db.name, &broker.bootstrap(), &b_args)?;
    wait_for("relay B standing by", Duration::from_secs(60), || async {
        Ok(healthz(&b_addr).is_ok_and(|(ok, text)| ok && text.contains("standby: ")))
    })
    .await?;

    let writing = tokio::spawn(resilient_writer(
        conninfo(&[db.port], &db.name),
        0..TXNS,
        |t| numbered_batch(t, PER_TXN, 16),
        |_, _| {},
    ));
    // A has published, so its producer is busy: with a 10 s linger it holds seconds of records
    wait_for_metric(
        &a_addr,
        "pg_outbox_relay_events_published_total",
        400.0,
        Duration::from_secs(60),
    )
    .await?;
    // that was A's first batch, sent when its linger ran out: the next one gathers from now on
    // (a deliberate wait: the writer goes on, A's producer holds what it hands over)
    tokio::time::sleep(Duration::from_secs(3)).await;
    let held = scrape_metrics(&a_addr)
        .ok()
        .and_then(|m| metric(&m, "pg_outbox_relay_in_flight"))
        .unwrap_or(0.0);
    ensure!(held > 0.0, "A must hold records when its session ends");
    db.client
        .batch_execute(&format!(
            "ALTER ROLE {a_role} CONNECTION LIMIT 0; \
             SELECT pg_catalog.pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity \
              WHERE usename = '{a_role}'"
        ))
        .await?;
    let ended = std::time::Instant::now();
    println!("A held {held} records in flight when its sessions were terminated");
    wait_for("relay B active", Duration::from_secs(60), || async {
        Ok(healthz(&b_addr).is_ok_and(|(ok, text)| ok && text.contains("ok: active")))
    })
    .await?;
    println!(
        "B took over {:.1} s after A's sessions were terminated",
        ended.elapsed().as_secs_f64()
    );
    ensure!(
        a.try_wait()?.is_none(),
        "A must still be running (a live predecessor)"
    );
    writing.await??;
    let total = (TXNS * PER_TXN) as usize;
    let records = read_all(
        &broker.bootstrap(),
        &[("orders", 2)],
        total,
        Duration::from_secs(120),
    )?;
    ensure!(
        a.try_wait()?.is_none(),
        "A must have stayed alive throughout"
    );
    a.kill9()?;
    drop(b);
    check_once_in_order(&records, total)
}

fn check_once_in_order(records: &[Record], total: usize) -> Result<()> {
    let ids: HashSet<String> = records.iter().map(Record::id).collect();
    let violations = record_order_violations(records);
    println!(
        "records: {}, distinct ids: {}, expected: {total}, duplicates: {}, per-key order violations: {violations}",
        records.len(),
        ids.len(),
        records.len() - ids.len()
    );
    ensure!(
        ids.len() == total,
        "{} distinct ids, expected {total}",
        ids.len()
    );
    ensure!(
        records.len() == total,
        "{} duplicates: the predecessor delivered after the takeover",
        records.len() - ids.len()
    );
    ensure!(violations == 0, "{violations} per-key order violations");
    Ok(())
}

#[tokio::test]
async fn a_live_predecessor_whose_session_ended_adds_nothing_after_the_takeover() -> Result<()> {
    let db = TestDb::create("tk_live", port()).await?;
    live_takeover(&db, &[]).await
}

#[tokio::test]
async fn a_live_poll_predecessor_whose_session_ended_adds_nothing_after_the_takeover() -> Result<()>
{
    let db = TestDb::create("tk_live_poll", port()).await?;
    db.client
        .batch_execute(
            "ALTER DATABASE tk_live_poll SET pg_outbox.mode = 'table'; SET pg_outbox.mode = 'table'",
        )
        .await?;
    live_takeover(&db, &["--source", "poll"]).await
}
