//! Two relays for one source: a standby waits visibly (`/healthz`, `status`) and takes over exactly
//! once when the active one is killed; a relay paused (SIGSTOP) while its successor takes over
//! adds nothing when it resumes. WAL and poll source.

use anyhow::{ensure, Result};
use pg_outbox_tests::{
    assert_exactly_once_in_order, healthz, hold_for, one_key_writer, signal, wait_for,
    wait_for_metric, written_at_least, Scenario,
};
use std::time::Duration;
use tokio_postgres::Client;

/// Relay A streams, relay B stands by (its `/healthz` and `status` name A), A is killed under load,
/// B takes over: every event once, in order; prints the takeover time.
/// (`s` has the topic `orders` with 2 partitions.)
async fn standby_run(s: &Scenario, relay_args: &[&str]) -> Result<()> {
    let db = &s.db;
    db.client
        .batch_execute("CREATE TABLE written (n bigint PRIMARY KEY)")
        .await?;
    let mut a = s.relay().args(relay_args).metrics().start()?;
    let a_addr = a.metrics_addr().to_string();
    wait_for("relay A active", Duration::from_secs(60), || async {
        Ok(healthz(&a_addr).is_ok_and(|(ok, text)| ok && text.contains("ok: active")))
    })
    .await?;
    let b = s.relay().args(relay_args).metrics().start()?;
    let b_addr = b.metrics_addr().to_string();
    let a_name = format!("pg_outbox_relay {}@", a.pid());
    wait_for(
        "relay B standing by behind A",
        Duration::from_secs(60),
        || async {
            // A by its name and pid, not where it runs: /healthz names no host or address
            Ok(healthz(&b_addr).is_ok_and(|(ok, text)| {
                ok && text.contains("standby: ")
                    && text.contains(&format!("pg_outbox_relay {}\n", a.pid()))
                    && !text.contains('@')
                    && !text.contains("127.0.0.1")
            }))
        },
    )
    .await?;
    let (_, status) = s.relay_command("status", relay_args)?;
    let names = |status: &str, relay: &str| {
        status
            .lines()
            .any(|l| l.starts_with("active_relay") && l.contains(relay))
    };
    ensure!(names(&status, &a_name), "status names A: {status}");

    const N: i64 = 3000;
    let writing = tokio::spawn(one_key_writer(db.port, db.name.clone(), N));
    written_at_least(db.port, &db.name, N / 3).await?;
    let killed = std::time::Instant::now();
    a.kill9()?;
    wait_for("relay B active", Duration::from_secs(60), || async {
        Ok(healthz(&b_addr).is_ok_and(|(ok, text)| ok && text.contains("ok: active")))
    })
    .await?;
    println!(
        "standby takeover ({} source): {:.1} s from kill -9 of the active relay to the standby \
         streaming",
        if relay_args.contains(&"poll") {
            "poll"
        } else {
            "wal"
        },
        killed.elapsed().as_secs_f64()
    );
    writing.await??;
    let records = s.read(N as usize)?;
    let (_, status) = s.relay_command("status", relay_args)?;
    ensure!(
        names(&status, &format!("pg_outbox_relay {}@", b.pid())),
        "status names B now: {status}"
    );
    assert_exactly_once_in_order(&records, N as usize)
}

#[tokio::test]
async fn a_standby_relay_waits_visibly_and_takes_over_exactly_once() -> Result<()> {
    let s = Scenario::builder("rl_standby")
        .topic("orders", 2)
        .start()
        .await?;
    standby_run(&s, &[]).await
}

#[tokio::test]
async fn a_standby_poll_relay_waits_visibly_and_takes_over_exactly_once() -> Result<()> {
    let s = Scenario::builder("rl_standby_poll")
        .table_mode()
        .topic("orders", 2)
        .start()
        .await?;
    standby_run(&s, &["--source", "poll"]).await
}

/// 40,000 events in 400 transactions, 16 keys, `n` counting per key: a backlog for [`paused_run`].
async fn backlog(c: &Client) -> Result<usize> {
    const KEYS: usize = 16;
    const TXNS: usize = 400;
    const PER_TXN: usize = 100;
    let mut seq = [0i64; KEYS];
    for t in 0..TXNS {
        let mut keys = Vec::with_capacity(PER_TXN);
        let mut payloads = Vec::with_capacity(PER_TXN);
        for i in 0..PER_TXN {
            let k = (t * PER_TXN + i) % KEYS;
            seq[k] += 1;
            keys.push(format!("key-{k}"));
            payloads.push(format!(r#"{{"n": {}}}"#, seq[k]));
        }
        c.query(
            "SELECT outbox.enqueue_batch('orders', $1, $2::text[]::jsonb[])",
            &[&keys, &payloads],
        )
        .await?;
    }
    Ok(TXNS * PER_TXN)
}

/// Relay A is paused (SIGSTOP) in the middle of a backlog with records in flight, relay B is
/// started, A resumes later: Kafka holds every event once, in order. With the wal source B takes
/// the slot over once the server lets go of it (wal_sender_timeout) and publishes everything
/// before A resumes; with the poll source A's session keeps the lock and B stands by.
/// (`s` has the topic `orders` with 2 partitions, and the backlog.)
async fn paused_run(s: &Scenario, args: &[&str], total: usize) -> Result<()> {
    let wal = !args.contains(&"poll");
    let a = s.relay().args(args).metrics().start()?;
    let a_metrics = a.metrics_addr().to_string();
    wait_for_metric(
        &a_metrics,
        "pg_outbox_relay_events_published_total",
        2000.0,
        Duration::from_secs(60),
    )
    .await?;
    signal(a.pid(), "STOP")?;
    let paused = std::time::Instant::now();
    let b = s.relay().args(args).start()?;
    if wal {
        s.read(total)?;
    } else {
        b.wait_for_log("standing by", 1, Duration::from_secs(30))
            .await?;
        // A stays paused well beyond its --fence-timeout-ms (5 s) and the database's
        // idle_session_timeout (2 s): the length of the pause is the fault under test, so this
        // time passes on purpose. Meanwhile B must go on standing by behind A's lock (the relays
        // of one database share a log: B polling would add a "polling outbox.events").
        let polling = || b.log_text().matches("polling outbox.events").count();
        let before = polling();
        hold_for(
            "relay B standing by while A is paused",
            Duration::from_secs(8),
            || async { Ok(polling() == before) },
        )
        .await?;
    }
    println!(
        "A paused {:.1} s ({})",
        paused.elapsed().as_secs_f64(),
        if wal {
            "B took the slot over and published the backlog"
        } else {
            "B stood by: A's session kept the lock"
        }
    );
    // A resumes: whatever it still held must not reach Kafka a second time
    signal(a.pid(), "CONT")?;
    if wal {
        // the pause clock's ticker says so the moment it withdraws (the session may then end
        // through the withdrawn records' failed deliveries or at the loop's own pause check)
        a.wait_for_log("was paused", 1, Duration::from_secs(60))
            .await?;
        // A's paused session is over once A's next one stands by behind B (who holds the slot):
        // from then on nothing A held can reach Kafka, and the read below sees whatever it sent
        wait_for(
            "relay A to stand by behind B after its pause",
            Duration::from_secs(60),
            || async { Ok(healthz(&a_metrics).is_ok_and(|(_, text)| text.contains("standby: "))) },
        )
        .await?;
    }
    let records = s.read(total)?;
    drop(b);
    assert_exactly_once_in_order(&records, total)
}

#[tokio::test]
async fn a_paused_relay_that_resumes_after_its_successor_took_over_adds_nothing() -> Result<()> {
    let s = Scenario::builder("rl_paused")
        .topic("orders", 2)
        .start()
        .await?;
    let db = &s.db;
    // the walsender lets go of the slot 3 s after the relay's last word (the default is 60 s)
    db.client
        .batch_execute("ALTER DATABASE rl_paused SET wal_sender_timeout = '3s'")
        .await?;
    db.create_slot().await?;
    let total = backlog(&db.client).await?;
    paused_run(&s, &["--fence-timeout-ms", "5000"], total).await
}

#[tokio::test]
async fn a_paused_poll_relay_keeps_its_lock_and_goes_on_when_it_resumes() -> Result<()> {
    let s = Scenario::builder("rl_paused_poll")
        .table_mode()
        .topic("orders", 2)
        .start()
        .await?;
    let db = &s.db;
    // the relay's sessions are not ended for idleness, even where the server asks for it
    db.client
        .batch_execute("ALTER DATABASE rl_paused_poll SET idle_session_timeout = '2s'")
        .await?;
    let total = backlog(&db.client).await?;
    paused_run(
        &s,
        &["--source", "poll", "--fence-timeout-ms", "5000"],
        total,
    )
    .await
}
