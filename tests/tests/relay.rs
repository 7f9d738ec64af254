//! The relay against a real PostgreSQL cluster and a real Kafka-protocol broker (Tansu): exactly
//! the committed events arrive, once, in per-key commit order, whatever is killed when.

use anyhow::{ensure, Result};
use pg_outbox_relay::sink::partition::partition_for;
use pg_outbox_tests::{
    free_port, healthz, metric, port, read_all, relay_command, restart_cluster, scrape_metrics,
    signal, wait_for, wait_for_metric, Broker, Record, Relay, TestDb,
};
use rand::{Rng, SeedableRng};
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use tokio_postgres::Client;
use uuid::Uuid;

const READ_TIMEOUT: Duration = Duration::from_secs(120);

/// Every id exactly once, and per key the payload field `n` strictly increasing by one.
fn assert_exactly_once_in_order(records: &[Record], expected: usize) -> Result<()> {
    let ids: HashSet<String> = records.iter().map(Record::id).collect();
    println!(
        "records read: {}, distinct event ids: {}, expected: {expected}",
        records.len(),
        ids.len()
    );
    ensure!(
        ids.len() == expected,
        "{} distinct ids, expected {expected}",
        ids.len()
    );
    if records.len() != expected {
        let mut seen: HashMap<String, &Record> = HashMap::new();
        for r in records {
            if let Some(first) = seen.insert(r.id(), r) {
                println!(
                    "duplicate {} in {}[{}]: offsets {} and {}, positions {:?} and {:?}",
                    r.id(),
                    r.topic,
                    r.partition,
                    first.offset,
                    r.offset,
                    first.header("pg_outbox-position"),
                    r.header("pg_outbox-position")
                );
            }
        }
    }
    ensure!(
        records.len() == expected,
        "{} records for {expected} events: duplicates",
        records.len()
    );
    let mut next: HashMap<Vec<u8>, i64> = HashMap::new();
    let mut partition_of: HashMap<Vec<u8>, (String, i32)> = HashMap::new();
    for r in records {
        // records are sorted by (topic, partition, offset): per key that is the Kafka order
        let key = r.key.clone().unwrap_or_default();
        let place = (r.topic.clone(), r.partition);
        ensure!(
            partition_of
                .entry(key.clone())
                .or_insert_with(|| place.clone())
                == &place,
            "key {:?} in two partitions",
            String::from_utf8_lossy(&key)
        );
        let v: serde_json::Value = serde_json::from_slice(&r.payload)?;
        let n = v["n"].as_i64().unwrap_or(-1);
        let want = next.entry(key.clone()).or_insert(1);
        ensure!(
            n == *want,
            "key {:?}: got n={n}, expected {want}",
            String::from_utf8_lossy(&key)
        );
        *want += 1;
    }
    Ok(())
}

async fn enqueue(c: &Client, topic: &str, key: &str, payload: &str) -> Result<Uuid> {
    Ok(c.query_one(
        "SELECT outbox.enqueue($1, $2, $3::text::jsonb)",
        &[&topic, &key, &payload],
    )
    .await?
    .get(0))
}

#[tokio::test]
async fn committed_events_arrive_with_topic_key_headers_and_payload() -> Result<()> {
    let db = TestDb::create("rl_commit", port()).await?;
    let broker = Broker::start()?;
    broker.create_topic("orders", 3).await?;
    broker.create_topic("payments", 2).await?;
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let mut relay = Relay::start(
        db.port,
        &db.name,
        &broker.bootstrap(),
        &["--metrics-addr", &metrics_addr],
    )?;
    db.wait_for_active_slot().await?;
    let c = &db.client;

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

    let records = read_all(
        &broker.bootstrap(),
        &[("orders", 3), ("payments", 2)],
        5,
        READ_TIMEOUT,
    )?;
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

/// `writers` sessions each commit `per_writer` events; per key, `n` counts up in commit order
/// (a row lock on the key's counter serialises the transactions of one key).
async fn concurrent_writers(
    db: &TestDb,
    writers: usize,
    per_writer: usize,
    keys: usize,
    lock_key_first: bool,
) -> Result<usize> {
    db.client
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS key_seq (key text PRIMARY KEY, n bigint NOT NULL); \
             INSERT INTO key_seq SELECT 'k' || i, 0 FROM generate_series(0, {keys} - 1) i ON CONFLICT DO NOTHING"
        ))
        .await?;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let c = db.session().await?;
        tasks.push(tokio::spawn(async move {
            for i in 0..per_writer {
                let key = format!("k{}", (w * 7 + i * 13) % keys);
                let topic = if key.len() % 2 == 0 { "orders" } else { "payments" };
                c.batch_execute("BEGIN").await?;
                if lock_key_first {
                    // table mode orders by xid: serialise the key before the first write (which
                    // assigns the xid); an advisory lock assigns none
                    c.query_one("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", &[&key])
                        .await?;
                }
                let n: i64 = c
                    .query_one("UPDATE key_seq SET n = n + 1 WHERE key = $1 RETURNING n", &[&key])
                    .await?
                    .get(0);
                c.query_one(
                    "SELECT outbox.enqueue($1, $2, jsonb_build_object('n', $3::bigint, 'w', $4::int))",
                    &[&topic, &key, &n, &(w as i32)],
                )
                .await?;
                c.batch_execute("COMMIT").await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(writers * per_writer)
}

/// A WAL relay must hold its slot before wal-mode enqueues are accepted; a poll relay needs nothing.
async fn wait_for_source(db: &TestDb, relay_args: &[&str]) -> Result<()> {
    if relay_args.contains(&"poll") {
        Ok(())
    } else {
        db.wait_for_active_slot().await
    }
}

/// 8 concurrent writers over 24 keys and two topics; per key, the records arrive in commit order.
async fn order_run(db: &TestDb, relay_args: &[&str], lock_key_first: bool) -> Result<()> {
    let broker = Broker::start()?;
    broker.create_topic("orders", 4).await?;
    broker.create_topic("payments", 3).await?;
    let _relay = Relay::start(db.port, &db.name, &broker.bootstrap(), relay_args)?;
    wait_for_source(db, relay_args).await?;
    let total = concurrent_writers(db, 8, 250, 24, lock_key_first).await?;
    let topics = [("orders", 4), ("payments", 3)];
    let records = read_all(&broker.bootstrap(), &topics, total, READ_TIMEOUT)?;
    assert_exactly_once_in_order(&records, total)
}

#[tokio::test]
async fn per_key_order_is_commit_order_with_concurrent_writers() -> Result<()> {
    let db = TestDb::create("rl_order", port()).await?;
    order_run(&db, &[], false).await
}

/// Streams `txns` transactions of `per_txn` events (one writer, so commit order is the order it
/// issues; per key, n counts up) while the relay is killed with SIGKILL at random moments, at least
/// 10 times, and restarted; then checks every event arrived once, in per-key order.
async fn crash_run(
    db: &TestDb,
    relay_args: &[&str],
    txns: usize,
    per_txn: usize,
    partitions: i32,
) -> Result<()> {
    const KEYS: usize = 64;
    let broker = Broker::start()?;
    broker.create_topic("orders", partitions).await?;
    let brokers = broker.bootstrap();
    let mut relay = Relay::start(db.port, &db.name, &brokers, relay_args)?;
    wait_for_source(db, relay_args).await?;
    let writer = db.session().await?;
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
        relay = Relay::start(db.port, &db.name, &brokers, relay_args)?;
    }
    writing.await??;
    let total = txns * per_txn;
    let records = read_all(&brokers, &[("orders", partitions)], total, READ_TIMEOUT)?;
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
    let db = TestDb::create("rl_crash", port()).await?;
    crash_run(&db, &[], 500, 100, 6).await
}

#[tokio::test]
async fn idle_database_keeps_no_unbounded_wal() -> Result<()> {
    let db = TestDb::create("rl_idle", port()).await?;
    let broker = Broker::start()?;
    broker.create_topic("orders", 1).await?;
    let _relay = Relay::start(db.port, &db.name, &broker.bootstrap(), &[])?;
    db.wait_for_active_slot().await?;
    let c = &db.client;
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
    let db = TestDb::create("rl_poison", port()).await?;
    let broker = Broker::start()?;
    broker.create_topic("orders", 2).await?;
    let _relay = Relay::start(
        db.port,
        &db.name,
        &broker.bootstrap(),
        &["--max-record-bytes", "2048"],
    )?;
    db.wait_for_active_slot().await?;
    let c = &db.client;
    enqueue(c, "orders", "k", r#"{"n": 1}"#).await?;
    let big = format!(r#"{{"n": 0, "pad": "{}"}}"#, "y".repeat(4000));
    let big_id = enqueue(c, "orders", "k", &big).await?;
    enqueue(c, "orders", "k", r#"{"n": 2}"#).await?;
    // an envelope from a future version (sealed, as its extension would): reported, not guessed at
    db.emit_sealed_raw(&[vec![2, 0, 1, 2]]).await?;
    enqueue(c, "orders", "k", r#"{"n": 3}"#).await?;

    let records = read_all(&broker.bootstrap(), &[("orders", 2)], 3, READ_TIMEOUT)?;
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
async fn missing_publication_is_a_clear_permanent_error() -> Result<()> {
    let db = TestDb::create("rl_nopub", port()).await?;
    db.client
        .batch_execute("SELECT pg_create_logical_replication_slot('rl_nopub', 'pgoutput')")
        .await?;
    let broker = Broker::start()?;
    let mut relay = Relay::start(
        db.port,
        &db.name,
        &broker.bootstrap(),
        &["--create-slot", "false"],
    )?;
    // the relay must stop on a permanent error
    let status = relay.wait_for_exit(Duration::from_secs(30)).await?;
    assert!(!status.success());
    let log = relay.log_text();
    assert!(
        log.contains("publication \\\"rl_nopub\\\" does not exist")
            || log.contains("publication \"rl_nopub\" does not exist"),
        "{log}"
    );
    // `check` says what to fix
    let (ok, text) = relay_command(
        "check",
        db.port,
        &db.name,
        &broker.bootstrap(),
        &["--create-slot", "false"],
    )?;
    assert!(!ok, "{text}");
    assert!(
        text.contains("FAIL  publication rl_nopub: missing"),
        "{text}"
    );
    assert!(text.contains("ok    kafka"), "{text}");
    Ok(())
}

/// Waits until the table `written` of `db` has more than `n` rows.
async fn written_at_least(port: u16, db: &str, n: i64) -> Result<()> {
    let c = pg_outbox_tests::connect(port, db).await?;
    wait_for("the writer under way", Duration::from_secs(60), || {
        let c = &c;
        async move {
            Ok(c.query_one("SELECT count(*) FROM written", &[])
                .await?
                .get::<_, i64>(0)
                > n)
        }
    })
    .await
}

/// Writes events 1..=n for one key, one per transaction, riding out connection loss.
async fn resilient_writer(port: u16, db: String, n: i64) -> Result<()> {
    pg_outbox_tests::resilient_writer(
        pg_outbox_tests::conninfo(&[port], &db),
        1..n + 1,
        |i| (vec!["k".into()], vec![format!(r#"{{"n": {i}}}"#)]),
        |_, _| {},
    )
    .await
}

#[tokio::test]
async fn postgres_restart_mid_stream_loses_and_duplicates_nothing() -> Result<()> {
    // a cluster of its own: PostgreSQL is restarted under the relay
    let (pg_port, pgdata) = restart_cluster()?;
    let db = TestDb::create("rl_pgrestart", pg_port).await?;
    db.client
        .batch_execute("CREATE TABLE written (n bigint PRIMARY KEY)")
        .await?;
    let broker = Broker::start()?;
    broker.create_topic("orders", 2).await?;
    let mut relay = Relay::start(pg_port, &db.name, &broker.bootstrap(), &[])?;
    db.wait_for_active_slot().await?;
    const N: i64 = 3000;
    let writing = tokio::spawn(resilient_writer(pg_port, db.name.clone(), N));
    written_at_least(pg_port, &db.name, N / 3).await?;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/pgcluster.sh");
    let status = std::process::Command::new(script)
        .args(["restart", &pgdata])
        .status()?;
    assert!(status.success(), "restarting PostgreSQL");
    writing.await??;
    let records = read_all(
        &broker.bootstrap(),
        &[("orders", 2)],
        N as usize,
        READ_TIMEOUT,
    )?;
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

/// A test database whose sessions enqueue in table mode.
async fn table_mode_db(name: &str) -> Result<TestDb> {
    let db = TestDb::create(name, port()).await?;
    db.client
        .batch_execute(&format!(
            "ALTER DATABASE {name} SET pg_outbox.mode = 'table'; SET pg_outbox.mode = 'table'"
        ))
        .await?;
    Ok(db)
}

async fn outbox_rows(c: &Client) -> Result<i64> {
    Ok(c.query_one("SELECT count(*) FROM outbox.events", &[])
        .await?
        .get(0))
}

#[tokio::test]
async fn table_mode_publishes_exactly_the_committed_rows_and_removes_them() -> Result<()> {
    let db = table_mode_db("rl_table_commit").await?;
    let broker = Broker::start()?;
    broker.create_topic("orders", 3).await?;
    let c = &db.client;
    // events written before the relay starts are published too
    let early = enqueue(c, "orders", "alice", r#"{"n": 1}"#).await?;
    let mut relay = Relay::start(
        db.port,
        &db.name,
        &broker.bootstrap(),
        &["--source", "poll"],
    )?;
    let mut expected = vec![early];
    c.batch_execute("BEGIN").await?;
    expected.push(enqueue(c, "orders", "alice", r#"{"n": 2}"#).await?);
    expected.push(enqueue(c, "orders", "bob", r#"{"n": 1}"#).await?);
    c.batch_execute("COMMIT; BEGIN").await?;
    enqueue(c, "orders", "ghost", r#"{"n": 1}"#).await?;
    c.batch_execute("ROLLBACK; BEGIN").await?;
    expected.push(enqueue(c, "orders", "bob", r#"{"n": 2}"#).await?);
    c.batch_execute("SAVEPOINT s").await?;
    enqueue(c, "orders", "ghost", r#"{"n": 1}"#).await?;
    c.batch_execute("ROLLBACK TO SAVEPOINT s").await?;
    // a transaction still open while the relay polls: not skipped, published once it commits
    let open = db.session().await?;
    open.batch_execute("BEGIN").await?;
    let late = enqueue(&open, "orders", "carol", r#"{"n": 1}"#).await?;
    c.batch_execute("COMMIT").await?;
    // the relay polls past the open transaction: it publishes and removes every committed row
    // (the open one's row is invisible here) while that transaction is still in flight
    wait_for(
        "the committed rows to be published and removed",
        Duration::from_secs(30),
        || async { Ok(outbox_rows(c).await? == 0) },
    )
    .await?;
    open.batch_execute("COMMIT").await?;
    expected.push(late);

    let records = read_all(
        &broker.bootstrap(),
        &[("orders", 3)],
        expected.len(),
        READ_TIMEOUT,
    )?;
    assert_exactly_once_in_order(&records, expected.len())?;
    let mut got: Vec<Uuid> = records
        .iter()
        .map(|r| Uuid::parse_str(&r.id()).unwrap())
        .collect();
    got.sort();
    expected.sort();
    assert_eq!(got, expected);
    wait_for(
        "published rows to be deleted",
        Duration::from_secs(30),
        || async { Ok(outbox_rows(c).await? == 0) },
    )
    .await?;
    let status = relay.terminate(Duration::from_secs(30))?;
    assert!(status.success(), "exit status {status}");
    Ok(())
}

#[tokio::test]
async fn table_mode_per_key_order_with_concurrent_writers() -> Result<()> {
    let db = table_mode_db("rl_table_order").await?;
    order_run(&db, &["--source", "poll"], true).await
}

#[tokio::test]
async fn table_mode_kill_9_loses_and_duplicates_nothing() -> Result<()> {
    let db = table_mode_db("rl_table_crash").await?;
    crash_run(
        &db,
        &["--source", "poll", "--poll-batch", "300"],
        200,
        100,
        4,
    )
    .await?;
    wait_for(
        "the outbox table to drain",
        Duration::from_secs(30),
        || async { Ok(outbox_rows(&db.client).await? == 0) },
    )
    .await
}

#[tokio::test]
async fn check_shows_events_waiting_in_a_mode_no_relay_serves() -> Result<()> {
    let db = TestDb::create("rl_unserved", port()).await?;
    let broker = Broker::start()?;
    db.create_slot().await?;
    let check =
        |args: &[&str]| relay_command("check", db.port, &db.name, &broker.bootstrap(), args);
    let (ok, text) = check(&[])?;
    assert!(ok, "{text}");
    assert!(
        text.contains("ok    no events wait where this relay does not read"),
        "{text}"
    );
    // a writer switched to table mode while only a wal relay runs
    db.client
        .batch_execute("SET pg_outbox.mode = 'table'; SELECT outbox.enqueue('orders', 'k', '{}')")
        .await?;
    let (ok, text) = check(&[])?;
    assert!(!ok, "{text}");
    assert!(
        text.contains("FAIL  1 event(s) wait in outbox.events (table mode)"),
        "{text}"
    );
    assert!(text.contains("source = poll"), "{text}");
    // the reverse: a poll relay, and a pg_outbox slot that nobody streams
    let (ok, text) = check(&["--source", "poll"])?;
    assert!(!ok, "{text}");
    assert!(
        text.contains("hold wal-mode events and nobody streams them"),
        "{text}"
    );
    Ok(())
}

#[tokio::test]
async fn the_record_timestamp_is_the_enqueue_time_or_if_asked_the_publish_time() -> Result<()> {
    let db = TestDb::create("rl_timestamp", port()).await?;
    let broker = Broker::start()?;
    broker.create_topic("orders", 1).await?;
    db.create_slot().await?;
    let c = &db.client;
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
    let mut relay = Relay::start(db.port, &db.name, &broker.bootstrap(), &[])?;
    let records = read_all(&broker.bootstrap(), &[("orders", 1)], 1, READ_TIMEOUT)?;
    let ts = records[0].timestamp_ms.expect("a timestamp");
    assert!(
        ts <= first && ts > first - 3000,
        "enqueue time: {ts} vs {first}"
    );
    assert!(relay.terminate(Duration::from_secs(30))?.success());

    let second = enqueue_late(2).await?;
    let _relay = Relay::start(
        db.port,
        &db.name,
        &broker.bootstrap(),
        &["--record-timestamp", "publish"],
    )?;
    let records = read_all(&broker.bootstrap(), &[("orders", 1)], 2, READ_TIMEOUT)?;
    assert_eq!(records.len(), 2);
    let ts = records[1].timestamp_ms.expect("a timestamp");
    assert!(ts > second + 3000, "publish time: {ts} vs {second}");
    Ok(())
}

#[tokio::test]
async fn check_for_a_poll_relay_needs_no_logical_decoding() -> Result<()> {
    // table mode on a server without wal_level = logical (a managed service without logical
    // replication): nothing about slots, publications or REPLICATION applies
    let db = TestDb::create("rl_poll_check", pg_outbox_tests::replica_port()).await?;
    let broker = Broker::start()?;
    let (ok, text) = relay_command(
        "check",
        db.port,
        &db.name,
        &broker.bootstrap(),
        &["--source", "poll"],
    )?;
    assert!(ok, "{text}");
    assert!(
        !text.contains("wal_level") && !text.contains("publication"),
        "{text}"
    );
    assert!(text.contains("ok    role postgres: superuser"), "{text}");
    Ok(())
}

/// Relay A streams, relay B stands by (its `/healthz` and `status` name A), A is killed under load,
/// B takes over: every event once, in order; prints the takeover time.
async fn standby_run(db: &TestDb, relay_args: &[&str]) -> Result<()> {
    db.client
        .batch_execute("CREATE TABLE written (n bigint PRIMARY KEY)")
        .await?;
    let broker = Broker::start()?;
    broker.create_topic("orders", 2).await?;
    let (a_addr, b_addr) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let with = |addr: &str| {
        let mut args: Vec<String> = relay_args.iter().map(|a| a.to_string()).collect();
        args.extend(["--metrics-addr".to_string(), addr.to_string()]);
        args
    };
    let a_args = with(&a_addr);
    let a_args: Vec<&str> = a_args.iter().map(String::as_str).collect();
    let mut a = Relay::start(db.port, &db.name, &broker.bootstrap(), &a_args)?;
    wait_for("relay A active", Duration::from_secs(60), || async {
        Ok(healthz(&a_addr).is_ok_and(|(ok, text)| ok && text.contains("ok: active")))
    })
    .await?;
    let b_args = with(&b_addr);
    let b_args: Vec<&str> = b_args.iter().map(String::as_str).collect();
    let b = Relay::start(db.port, &db.name, &broker.bootstrap(), &b_args)?;
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
    let (_, status) = relay_command("status", db.port, &db.name, &broker.bootstrap(), relay_args)?;
    let names = |status: &str, relay: &str| {
        status
            .lines()
            .any(|l| l.starts_with("active_relay") && l.contains(relay))
    };
    ensure!(names(&status, &a_name), "status names A: {status}");

    const N: i64 = 3000;
    let writing = tokio::spawn(resilient_writer(db.port, db.name.clone(), N));
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
    let records = read_all(
        &broker.bootstrap(),
        &[("orders", 2)],
        N as usize,
        READ_TIMEOUT,
    )?;
    let (_, status) = relay_command("status", db.port, &db.name, &broker.bootstrap(), relay_args)?;
    ensure!(
        names(&status, &format!("pg_outbox_relay {}@", b.pid())),
        "status names B now: {status}"
    );
    assert_exactly_once_in_order(&records, N as usize)
}

#[tokio::test]
async fn a_standby_relay_waits_visibly_and_takes_over_exactly_once() -> Result<()> {
    let db = TestDb::create("rl_standby", port()).await?;
    standby_run(&db, &[]).await
}

#[tokio::test]
async fn a_standby_poll_relay_waits_visibly_and_takes_over_exactly_once() -> Result<()> {
    let db = table_mode_db("rl_standby_poll").await?;
    standby_run(&db, &["--source", "poll"]).await
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
async fn paused_run(db: &TestDb, args: &[&str], total: usize) -> Result<()> {
    let broker = Broker::start()?;
    broker.create_topic("orders", 2).await?;
    let wal = !args.contains(&"poll");
    let a_metrics = format!("127.0.0.1:{}", free_port());
    let mut a_args = args.to_vec();
    a_args.extend(["--metrics-addr", &a_metrics]);
    let a = Relay::start(db.port, &db.name, &broker.bootstrap(), &a_args)?;
    wait_for_metric(
        &a_metrics,
        "pg_outbox_relay_events_published_total",
        2000.0,
        Duration::from_secs(60),
    )
    .await?;
    signal(a.pid(), "STOP")?;
    let paused = std::time::Instant::now();
    let b = Relay::start(db.port, &db.name, &broker.bootstrap(), args)?;
    if wal {
        read_all(&broker.bootstrap(), &[("orders", 2)], total, READ_TIMEOUT)?;
    } else {
        b.wait_for_log("standing by", 1, Duration::from_secs(30))
            .await?;
        tokio::time::sleep(Duration::from_secs(8)).await;
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
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let records = read_all(&broker.bootstrap(), &[("orders", 2)], total, READ_TIMEOUT)?;
    drop(b);
    assert_exactly_once_in_order(&records, total)
}

#[tokio::test]
async fn a_paused_relay_that_resumes_after_its_successor_took_over_adds_nothing() -> Result<()> {
    let db = TestDb::create("rl_paused", port()).await?;
    // the walsender lets go of the slot 3 s after the relay's last word (the default is 60 s)
    db.client
        .batch_execute("ALTER DATABASE rl_paused SET wal_sender_timeout = '3s'")
        .await?;
    db.create_slot().await?;
    let total = backlog(&db.client).await?;
    paused_run(&db, &["--fence-timeout-ms", "5000"], total).await
}

#[tokio::test]
async fn a_paused_poll_relay_keeps_its_lock_and_goes_on_when_it_resumes() -> Result<()> {
    let db = table_mode_db("rl_paused_poll").await?;
    // the relay's sessions are not ended for idleness, even where the server asks for it
    db.client
        .batch_execute("ALTER DATABASE rl_paused_poll SET idle_session_timeout = '2s'")
        .await?;
    let total = backlog(&db.client).await?;
    paused_run(
        &db,
        &["--source", "poll", "--fence-timeout-ms", "5000"],
        total,
    )
    .await
}

/// Counts the NOTIFYs on `channel` from now on, on a connection of its own.
async fn count_notifications(
    port: u16,
    db: &str,
    channel: &str,
) -> Result<(Client, std::sync::Arc<std::sync::atomic::AtomicUsize>)> {
    use futures_util::StreamExt;
    let (client, mut connection) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} user=postgres dbname={db}"),
        tokio_postgres::NoTls,
    )
    .await?;
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(_) = message {
                seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    });
    client.batch_execute(&format!("LISTEN {channel}")).await?;
    Ok((client, count))
}

/// A NOTIFY holds a database-wide lock through the commit's WAL flush, so table-mode writers leave
/// it out while the poll source is busy (it polls anyway), and an idle poll source is still woken
/// at once. The poll interval is a minute here: only a NOTIFY can wake the idle relay in time.
#[tokio::test]
async fn a_busy_poll_relay_spares_writers_the_notify_and_an_idle_one_is_woken_by_it() -> Result<()>
{
    let db = table_mode_db("rl_table_notify").await?;
    let broker = Broker::start()?;
    broker.create_topic("orders", 1).await?;
    let c = &db.client;
    let _relay = Relay::start(
        db.port,
        &db.name,
        &broker.bootstrap(),
        &["--source", "poll", "--poll-interval-ms", "60000"],
    )?;
    let idle = || async {
        let idle: Option<bool> = c
            .query_opt("SELECT idle FROM outbox.poller", &[])
            .await?
            .map(|r| r.get(0));
        Ok::<_, anyhow::Error>(idle)
    };
    // the first event also makes the relay read the topic back (the restart dedup)
    enqueue(c, "orders", "k", r#"{"n": 0}"#).await?;
    read_all(
        &broker.bootstrap(),
        &[("orders", 1)],
        1,
        Duration::from_secs(30),
    )?;
    wait_for(
        "the poller to say idle",
        Duration::from_secs(30),
        || async { Ok(idle().await? == Some(true)) },
    )
    .await?;
    let (_listener, notifications) =
        count_notifications(db.port, &db.name, "pg_outbox_events").await?;
    // a steady stream: after the first event wakes the relay, writers stop notifying
    for n in 1..=200 {
        enqueue(c, "orders", "k", &format!(r#"{{"n": {n}}}"#)).await?;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    read_all(
        &broker.bootstrap(),
        &[("orders", 1)],
        201,
        Duration::from_secs(30),
    )?;
    // read_all blocks this (one-threaded) runtime: let the listener count what arrived meanwhile
    tokio::time::sleep(Duration::from_millis(500)).await;
    let notified = notifications.load(std::sync::atomic::Ordering::Relaxed);
    println!("writers that notified: {notified} of 200");
    assert!(notified >= 1, "the first event woke the relay");
    assert!(
        notified <= 10,
        "{notified} of 200 writers notified while the relay was busy"
    );
    // the stream stops: the relay says it is idle again, and the next event wakes it
    wait_for(
        "the poller to say idle again",
        Duration::from_secs(30),
        || async { Ok(idle().await? == Some(true)) },
    )
    .await?;
    enqueue(c, "orders", "k", r#"{"n": 201}"#).await?;
    let records = read_all(
        &broker.bootstrap(),
        &[("orders", 1)],
        202,
        Duration::from_secs(30),
    )?;
    assert_eq!(records.len(), 202, "woken well before the minute's poll");
    wait_for("the writer's NOTIFY", Duration::from_secs(10), || async {
        Ok(notifications.load(std::sync::atomic::Ordering::Relaxed) > notified)
    })
    .await?;
    Ok(())
}
