//! The WAL relay's everyday work against a real PostgreSQL cluster and a real Kafka-protocol broker
//! (Tansu): exactly the committed events arrive with their topic, key, headers and payload; the
//! counters count them; a poison event is dead-lettered and the stream goes on; an idle database
//! keeps no WAL; the record timestamp is the enqueue time unless asked otherwise.

use anyhow::Result;
use pg_outbox_relay::sink::partition::partition_for;
use pg_outbox_tests::{
    assert_exactly_once_in_order, enqueue, metric, read_all, scrape_metrics, wait_for, Record,
    Scenario,
};
use std::collections::HashMap;
use std::time::Duration;
use uuid::Uuid;

#[tokio::test]
async fn committed_events_arrive_with_topic_key_headers_and_payload() -> Result<()> {
    let s = Scenario::builder("rl_commit")
        .topic("orders", 3)
        .topic("payments", 2)
        .start()
        .await?;
    let mut relay = s.relay().metrics().running().await?;
    let metrics_addr = relay.metrics_addr().to_string();
    let (db, c) = (&s.db, &s.db.client);

    let mut expected = Vec::new();
    c.batch_execute("BEGIN; SET LOCAL pg_outbox.trace_context = '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01'").await?;
    let first: Uuid = c
        .query_one(
            r#"SELECT outbox.enqueue('orders', 'alice', '{"n": 1}', '{"type": "OrderCreated", "tenant": "acme"}')"#,
            &[],
        )
        .await?
        .get(0);
    expected.push(first);
    expected.push(enqueue(c, "payments", "alice", r#"{"n": 1}"#).await?);
    c.batch_execute("COMMIT").await?;
    c.batch_execute("BEGIN").await?;
    enqueue(c, "orders", "ghost", r#"{"n": 1}"#).await?;
    c.batch_execute("ROLLBACK").await?;
    c.batch_execute("BEGIN").await?;
    expected.push(enqueue(c, "orders", "bob", r#"{"n": 1}"#).await?);
    c.batch_execute("SAVEPOINT s").await?;
    enqueue(c, "orders", "ghost", r#"{"n": 1}"#).await?;
    c.batch_execute("ROLLBACK TO SAVEPOINT s").await?;
    expected.push(enqueue(c, "orders", "bob", r#"{"n": 2}"#).await?);
    c.batch_execute("COMMIT").await?;
    let bytes_id: Uuid = c
        .query_one(
            r"SELECT outbox.enqueue_bytes('payments', NULL, '\x00ff'::bytea)",
            &[],
        )
        .await?
        .get(0);
    expected.push(bytes_id);

    let records = s.read(5)?;
    let mut got: Vec<Uuid> = records
        .iter()
        .map(|r| Uuid::parse_str(&r.id()).unwrap())
        .collect();
    got.sort();
    expected.sort();
    assert_eq!(got, expected, "exactly the committed events");
    assert!(records.iter().all(|r| r.key.as_deref() != Some(b"ghost")));

    let by_id: HashMap<String, &Record> = records.iter().map(|r| (r.id(), r)).collect();
    let r = by_id[&first.to_string()];
    assert_eq!(r.topic, "orders");
    assert_eq!(r.key.as_deref(), Some(&b"alice"[..]));
    assert_eq!(r.payload, br#"{"n": 1}"#);
    assert_eq!(r.header("type"), Some("OrderCreated"));
    assert_eq!(r.header("tenant"), Some("acme"));
    // every record says what its payload is
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(
        r.header("traceparent"),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );
    let source = db.source_identity().await?;
    assert_eq!(r.header("pg_outbox-source"), Some(source.as_str()));
    assert!(source.starts_with("rl_commit/"), "{source}");
    assert!(r.header("pg_outbox-position").is_some());
    // Java-compatible partitioning by key
    assert_eq!(
        r.partition,
        partition_for(Some(b"alice"), first.as_bytes(), 3)
    );
    let b = by_id[&bytes_id.to_string()];
    assert_eq!((b.key.clone(), b.payload.clone()), (None, vec![0x00, 0xff]));

    // counters: five published, each with its commit-to-acknowledgement latency
    // (the delivery reports may trail the records a moment)
    wait_for("5 published", Duration::from_secs(10), || async {
        let text = scrape_metrics(&metrics_addr)?;
        Ok(metric(&text, "pg_outbox_relay_events_published_total") == Some(5.0))
    })
    .await?;
    let text = scrape_metrics(&metrics_addr)?;
    assert_eq!(
        metric(&text, "pg_outbox_relay_event_latency_seconds_count"),
        Some(5.0),
        "{text}"
    );
    let sum = metric(&text, "pg_outbox_relay_event_latency_seconds_sum").unwrap();
    assert!(sum > 0.0 && sum < 5.0 * 60.0, "latency sum {sum} s");

    // one more event, and the stop right after its acknowledgement: the last confirmation still
    // reaches the server before the relay ends the stream (the replication client sends the
    // applied position only every 500 ms on its own)
    enqueue(c, "orders", "carol", r#"{"n": 1}"#).await?;
    wait_for("6 published", Duration::from_secs(10), || async {
        let text = scrape_metrics(&metrics_addr)?;
        Ok(metric(&text, "pg_outbox_relay_events_published_total") == Some(6.0))
    })
    .await?;

    // graceful shutdown: exit 0, and the slot confirmed everything: nothing is left to replay
    let status = relay.terminate(Duration::from_secs(30))?;
    assert!(status.success(), "exit status {status}");
    let pending = db.peek_wal_events().await?;
    assert!(
        pending.is_empty(),
        "{} events left unconfirmed",
        pending.len()
    );
    Ok(())
}

#[tokio::test]
async fn idle_database_keeps_no_unbounded_wal() -> Result<()> {
    let s = Scenario::builder("rl_idle")
        .topic("orders", 1)
        .start()
        .await?;
    let _relay = s.relay().running().await?;
    let (db, c) = (&s.db, &s.db.client);
    enqueue(c, "orders", "k", r#"{"n": 1}"#).await?;
    // activity elsewhere: ~50 MB of WAL from another table, and no pg_outbox event at all
    c.batch_execute("CREATE TABLE other (id int, pad text)")
        .await?;
    for _ in 0..10 {
        c.batch_execute(
            "INSERT INTO other SELECT i, repeat('x', 400) FROM generate_series(1, 10000) i",
        )
        .await?;
    }
    let written: i64 = c
        .query_one("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint FROM pg_replication_slots WHERE slot_name = $1", &[&db.name])
        .await?
        .get(0);
    println!("WAL written since the last confirmation: {written} bytes");
    let name = db.name.clone();
    wait_for(
        "the slot to confirm the idle position",
        Duration::from_secs(30),
        || {
            let name = name.clone();
            async move {
                c.batch_execute("CHECKPOINT").await?;
                let r = c
                .query_one(
                    "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint, \
                            pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint \
                     FROM pg_replication_slots WHERE slot_name = $1",
                    &[&name],
                )
                .await?;
                let (lag, retained): (i64, i64) = (r.get(0), r.get(1));
                Ok(lag < 1 << 20 && retained < 8 << 20)
            }
        },
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn poison_events_are_dead_lettered_and_the_stream_goes_on() -> Result<()> {
    let s = Scenario::builder("rl_poison")
        .topic("orders", 2)
        .start()
        .await?;
    let _relay = s
        .relay()
        .args(&["--max-record-bytes", "2048"])
        .running()
        .await?;
    let (db, c) = (&s.db, &s.db.client);
    enqueue(c, "orders", "k", r#"{"n": 1}"#).await?;
    let big = format!(r#"{{"n": 0, "pad": "{}"}}"#, "y".repeat(4000));
    let big_id = enqueue(c, "orders", "k", &big).await?;
    enqueue(c, "orders", "k", r#"{"n": 2}"#).await?;
    // an envelope from a future version (sealed, as its extension would): reported, not guessed at
    db.emit_sealed_raw(&[vec![2, 0, 1, 2]]).await?;
    enqueue(c, "orders", "k", r#"{"n": 3}"#).await?;

    let records = s.read(3)?;
    assert_exactly_once_in_order(&records, 3)?;
    let rows = c
        .query(
            "SELECT event_id, reason, length(payload) FROM outbox.dead_letters ORDER BY position",
            &[],
        )
        .await?;
    assert_eq!(rows.len(), 2, "two dead letters");
    let (id, reason, len): (Option<Uuid>, String, i32) =
        (rows[0].get(0), rows[0].get(1), rows[0].get(2));
    assert_eq!(id, Some(big_id));
    assert!(reason.contains("max_record_bytes"), "{reason}");
    assert_eq!(len as usize, big.len(), "the payload is kept whole");
    let reason: String = rows[1].get(1);
    assert!(reason.contains("unknown envelope version 2"), "{reason}");
    Ok(())
}

#[tokio::test]
async fn the_record_timestamp_is_the_enqueue_time_or_if_asked_the_publish_time() -> Result<()> {
    let s = Scenario::builder("rl_timestamp")
        .topic("orders", 1)
        .start()
        .await?;
    s.db.create_slot().await?;
    let c = &s.db.client;
    let now_ms = || async move {
        anyhow::Ok(
            c.query_one(
                "SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint",
                &[],
            )
            .await?
            .get::<_, i64>(0),
        )
    };
    // enqueued while no relay runs; published at least 3 s later
    let enqueue_late = |n: i64| async move {
        c.execute(
            "SELECT outbox.enqueue('orders', 'k', jsonb_build_object('n', $1::bigint))",
            &[&n],
        )
        .await?;
        let enqueued = now_ms().await?;
        wait_for("3 s to pass", Duration::from_secs(10), || async {
            Ok(now_ms().await? > enqueued + 3000)
        })
        .await?;
        anyhow::Ok(enqueued)
    };
    let first = enqueue_late(1).await?;
    let mut relay = s.relay().start()?;
    let records = s.read(1)?;
    let ts = records[0].timestamp_ms.expect("a timestamp");
    assert!(
        ts <= first && ts > first - 3000,
        "enqueue time: {ts} vs {first}"
    );
    assert!(relay.terminate(Duration::from_secs(30))?.success());

    let second = enqueue_late(2).await?;
    let _relay = s.relay().args(&["--record-timestamp", "publish"]).start()?;
    let records = s.read(2)?;
    assert_eq!(records.len(), 2);
    let ts = records[1].timestamp_ms.expect("a timestamp");
    assert!(ts > second + 3000, "publish time: {ts} vs {second}");
    Ok(())
}

/// A relay stopped with SIGTERM had every record it sent acknowledged: the next one (here, on the
/// same source, a moment later) skips the restart grace. After a `kill -9` the next one waits it out,
/// and nothing is published twice either way.
#[tokio::test]
async fn after_a_clean_stop_the_next_relay_skips_the_restart_grace() -> Result<()> {
    const TIMEOUT: Duration = Duration::from_secs(60);
    const CLEAN: &str = "the source's last session stopped cleanly";
    let s = Scenario::builder("rl_handover")
        .topic("orders", 1)
        .start()
        .await?;
    let c = &s.db.client;
    let brokers = s.broker.bootstrap();
    let mut ids = Vec::new();

    // the relays of one database share a log file: count the line in it
    let mut first = s.relay().running().await?;
    let said = |r: &pg_outbox_tests::Relay| r.log_text().matches(CLEAN).count();
    let before = said(&first);
    ids.extend(pg_outbox_tests::enqueue_numbered(c, "orders", "k", 1..=3).await?);
    assert_eq!(read_all(&brokers, &[("orders", 1)], 3, TIMEOUT)?.len(), 3);
    let status = first.terminate(TIMEOUT)?;
    assert!(status.success(), "exit status {status}");
    assert_eq!(said(&first), before, "the first relay of the source waits");

    let second = s.relay().running().await?;
    ids.extend(pg_outbox_tests::enqueue_numbered(c, "orders", "k", 4..=5).await?);
    assert_eq!(read_all(&brokers, &[("orders", 1)], 5, TIMEOUT)?.len(), 5);
    assert_eq!(said(&second), before + 1, "{}", second.log_text());
    pg_outbox_tests::signal(second.pid(), "KILL")?;
    drop(second);

    let third = s.relay().running().await?;
    ids.extend(pg_outbox_tests::enqueue_numbered(c, "orders", "k", 6..=6).await?);
    let records = read_all(&brokers, &[("orders", 1)], 6, TIMEOUT)?;
    let got: Vec<String> = records.iter().map(|r| r.id()).collect();
    let want: Vec<String> = ids.iter().map(|u| u.to_string()).collect();
    assert_eq!(got, want, "every event once, in order");
    assert_eq!(
        said(&third),
        before + 1,
        "after a kill the grace is waited out:\n{}",
        third.log_text()
    );
    Ok(())
}
