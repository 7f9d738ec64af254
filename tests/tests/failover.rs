//! A primary failover under load, PostgreSQL 17+: a primary and a `pg_basebackup` standby that
//! syncs the relay's failover slot; the primary is stopped as by a crash and the standby promoted;
//! the relay, given both servers, goes on from the synced slot. Real clusters, real broker.
//! (`make test` runs this file only on PostgreSQL 17 and later: the slot cannot fail over before.)

use anyhow::{ensure, Context, Result};
use pg_outbox_tests::{
    pgcluster, port, read_all, relay_bin, relay_command, wait_for, Broker, Relay,
};
use std::collections::HashSet;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const DB: &str = "tl_failover";

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as i64
}

/// Writes events 1..=n for one key, one per transaction, to whichever server is the primary,
/// riding out the failover. After `crashed` is set, records the first number it commits
/// (necessarily on the new primary).
async fn writer(
    ports: [u16; 2],
    n: i64,
    crashed: Arc<AtomicBool>,
    first_after: Arc<AtomicI64>,
    committed: Arc<AtomicI64>,
) -> Result<()> {
    pg_outbox_tests::resilient_writer(
        pg_outbox_tests::conninfo(&ports, DB),
        1..n + 1,
        |i| (vec!["k".into()], vec![format!(r#"{{"n": {i}}}"#)]),
        |i, fresh| {
            if fresh && crashed.load(Ordering::SeqCst) {
                let _ = first_after.compare_exchange(0, i, Ordering::SeqCst, Ordering::SeqCst);
            }
            committed.store(i, Ordering::SeqCst);
        },
    )
    .await
}

#[tokio::test]
async fn the_relay_follows_a_promoted_standby_from_the_synced_failover_slot() -> Result<()> {
    let base = port() + 5;
    let (primary, standby) = (base, base + 1);
    let dir = std::env::temp_dir().join(format!("pg_outbox-failover-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (pdir, sdir) = (dir.join("primary"), dir.join("standby"));
    let (pdir, sdir) = (
        pdir.to_str().context("path")?,
        sdir.to_str().context("path")?,
    );
    pgcluster(&["start", pdir, &primary.to_string(), "logical"])?;
    let result = run(primary, standby, pdir, sdir).await;
    let _ = pgcluster(&["stop", pdir]);
    let _ = pgcluster(&["stop", sdir]);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn run(primary: u16, standby: u16, pdir: &str, sdir: &str) -> Result<()> {
    let _ = std::fs::remove_file(std::env::temp_dir().join(format!("relay-{DB}.log")));
    let admin = pg_outbox_tests::connect(primary, "postgres").await?;
    for sql in [
        format!("CREATE DATABASE {DB}"),
        format!("ALTER DATABASE {DB} SET pg_outbox.slot_name = '{DB}'"),
        // the standby's physical slot
        "SELECT pg_create_physical_replication_slot('standby1')".into(),
    ] {
        admin.batch_execute(&sql).await?;
    }
    let pg = pg_outbox_tests::connect(primary, DB).await?;
    // one statement per call: outbox.setup commits between its steps
    for sql in [
        "CREATE EXTENSION pg_outbox",
        "CALL outbox.setup()",
        "CREATE TABLE written (n bigint PRIMARY KEY)",
    ] {
        pg.batch_execute(sql).await?;
    }
    let failover: bool = pg
        .query_one(
            "SELECT failover FROM pg_replication_slots WHERE slot_name = $1",
            &[&DB],
        )
        .await?
        .get(0);
    ensure!(failover, "outbox.setup creates a failover slot on 17+");
    pgcluster(&[
        "standby",
        sdir,
        &standby.to_string(),
        &primary.to_string(),
        DB,
        "standby1",
    ])?;
    let broker = Broker::start()?;
    broker.create_topic("orders", 1).await?;
    let url = format!(
        "postgres://postgres@127.0.0.1:{primary},127.0.0.1:{standby}/{DB}?connect_timeout=2"
    );
    // check sees the standby and asks for what makes the slot safe across a promotion
    let check = || -> Result<String> {
        let out = Command::new(relay_bin())
            .args(["check", "--pg-url", &url, "--slot", DB])
            .args(["--brokers", &broker.bootstrap()])
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    };
    wait_for("the standby streaming", Duration::from_secs(60), || async {
        Ok(admin
            .query_one("SELECT count(*) FROM pg_stat_replication", &[])
            .await?
            .get::<_, i64>(0)
            > 0)
    })
    .await?;
    let started = std::time::Instant::now();
    let text = check()?;
    println!("check took {:?}", started.elapsed());
    ensure!(
        text.contains("FAIL  synchronized_standby_slots = ''"),
        "check asks for synchronized_standby_slots: {text}"
    );
    ensure!(
        text.contains(&format!("ok    slot {DB} is a failover slot")),
        "{text}"
    );
    let (_, status) = relay_command("status", primary, DB, &broker.bootstrap(), &[])?;
    ensure!(
        status
            .lines()
            .any(|l| l.starts_with("failover_slot") && l.ends_with("true")),
        "status says the slot fails over: {status}"
    );
    // logical decoding now waits for the standby: no event is published before the standby has it
    for sql in [
        "ALTER SYSTEM SET synchronized_standby_slots = 'standby1'",
        "SELECT pg_reload_conf()",
    ] {
        admin.batch_execute(sql).await?;
    }
    wait_for(
        "check to accept the setting",
        Duration::from_secs(30),
        || async { Ok(check()?.contains("ok    synchronized_standby_slots = 'standby1'")) },
    )
    .await?;
    let mut relay = Relay::spawn(
        "run",
        DB,
        &[
            "--pg-url",
            &url,
            "--slot",
            DB,
            "--brokers",
            &broker.bootstrap(),
            "--record-timestamp",
            "publish",
        ],
    )?;

    const N: i64 = 4000;
    let crashed = Arc::new(AtomicBool::new(false));
    let first_after = Arc::new(AtomicI64::new(0));
    let committed = Arc::new(AtomicI64::new(0));
    let writing = tokio::spawn(writer(
        [primary, standby],
        N,
        crashed.clone(),
        first_after.clone(),
        committed.clone(),
    ));

    // the standby holds a synced, persistent copy of the slot, and the relay is under way
    let s = pg_outbox_tests::connect(standby, DB).await?;
    wait_for(
        "the slot synced to the standby",
        Duration::from_secs(120),
        || {
            let s = &s;
            async move {
                Ok(s.query_opt(
                    "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND synced \
                 AND NOT temporary",
                    &[&DB],
                )
                .await?
                .is_some())
            }
        },
    )
    .await?;
    wait_for("a third of the events", Duration::from_secs(120), || {
        let committed = committed.clone();
        async move { Ok(committed.load(Ordering::SeqCst) > N / 3) }
    })
    .await?;
    drop(s);

    // the primary dies; the standby is promoted
    let stopped_at = unix_ms();
    crashed.store(true, Ordering::SeqCst);
    pgcluster(&["crash", pdir])?;
    let before = committed.load(Ordering::SeqCst);
    pgcluster(&["promote", sdir])?;
    println!("primary stopped after {before} events; standby promoted");
    writing.await??;

    let records = read_all(
        &broker.bootstrap(),
        &[("orders", 1)],
        N as usize,
        Duration::from_secs(180),
    )?;
    ensure!(
        relay.try_wait()?.is_none(),
        "the relay follows the failover by itself: still running"
    );
    // every event of the surviving timeline exactly once, in order; none from the lost one
    let survivor = pg_outbox_tests::connect(standby, DB).await?;
    let rows: i64 = survivor
        .query_one("SELECT count(*) FROM written", &[])
        .await?
        .get(0);
    ensure!(rows == N, "the new primary has {rows} of {N} rows");
    let ids: HashSet<String> = records.iter().map(|r| r.id()).collect();
    let ns: Vec<i64> = records
        .iter()
        .map(|r| {
            serde_json::from_slice::<serde_json::Value>(&r.payload)
                .ok()
                .and_then(|v| v["n"].as_i64())
                .unwrap_or(-1)
        })
        .collect();
    println!(
        "records: {}, distinct ids: {}, events on the surviving timeline: {N}",
        records.len(),
        ids.len()
    );
    ensure!(
        ns == (1..=N).collect::<Vec<_>>(),
        "Kafka holds n = 1..={N} once each, in order (a duplicate or ghost shows up here); got {} \
         records, first out of place at index {:?}",
        ns.len(),
        ns.iter().enumerate().position(|(i, n)| *n != i as i64 + 1)
    );
    ensure!(ids.len() == records.len(), "every record a distinct event");
    // how long the stream stood still: the first event written on the new primary, by publish time
    let first = first_after.load(Ordering::SeqCst);
    let published = records
        .iter()
        .zip(&ns)
        .find(|(_, n)| **n == first)
        .and_then(|(r, _)| r.timestamp_ms)
        .context("the first event of the new primary in Kafka")?;
    println!(
        "failover: primary stopped -> first event from the new primary published: {:.1} s",
        (published - stopped_at) as f64 / 1000.0
    );
    let log = relay.log_text();
    ensure!(
        !log.contains("action=created"),
        "the relay created nothing on the new primary: {log}"
    );
    assert!(relay.terminate(Duration::from_secs(30))?.success());
    Ok(())
}
