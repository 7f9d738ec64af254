//! The two editions side by side: the C extension (`CREATE EXTENSION pg_outbox`) and the SQL edition
//! (sql-edition/pg_outbox.sql, installed by a role that is not a superuser). The same inputs give
//! the same envelope bytes in the WAL and the same rows in table mode, the same refusals, and a
//! database switches from one to the other, with the relay running under load, without losing or
//! doubling an event. (The SQL, inbox, trust and two relay tests also run against each edition:
//! scripts/test.sh, PG_OUTBOX_EDITION=sql.)

use anyhow::{ensure, Context, Result};
use pg_outbox_envelope::{open, Event, TAG_LEN};
use pg_outbox_tests::{
    conninfo, expect_error, payload_n, peek_wal_messages, port, read_all, record_order_violations,
    resilient_writer, wait_for, Broker, Edition, Relay, TestDb,
};
use std::collections::HashSet;
use std::time::Duration;

/// The same calls in both editions: every argument kind, headers of every value kind and names in
/// and out of byte order, a trace context, keys and no keys, JSON and bytes, a batch.
const CALLS: &[&str] = &[
    "BEGIN",
    "SET LOCAL pg_outbox.trace_context = '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01'",
    r#"SELECT outbox.enqueue('orders.v1', 'c-42', '{"total": 9.50, "items": [1, 2.5e3], "note": "é ✓"}',
        '{"type": "OrderCreated", "attempt": 2, "replay": false, "price": 1.50, "ünï": "cödé", "Zed": "z",
          "big": 123456789012345678901234, "neg": -0.5}')"#,
    "COMMIT",
    r#"SELECT outbox.enqueue('orders', NULL, '{}')"#,
    r#"SELECT outbox.enqueue('orders', '', '"text"', 'null')"#,
    r"SELECT outbox.enqueue_bytes('blobs', 'k', '\x00ff10', '{}')",
    r#"SELECT outbox.enqueue_bytes('blobs', NULL, '', '{"a": true}')"#,
    r#"SELECT outbox.enqueue_batch('orders', ARRAY['a', NULL, 'c'], ARRAY['{"i": 1}', '[]', '3']::jsonb[], '{"h": "v"}')"#,
    r#"SELECT outbox.enqueue_batch('orders', NULL, ARRAY['{"j": 1}', '{"j": 2}']::jsonb[])"#,
];

async fn run_calls(db: &TestDb) -> Result<()> {
    for call in CALLS {
        db.client
            .batch_execute(call)
            .await
            .with_context(|| format!("{call} ({})", db.name))?;
    }
    Ok(())
}

/// A C-extension database and an SQL-edition database whose wal-mode messages are sealed with the
/// same key.
async fn both(prefix: &str) -> Result<(TestDb, TestDb)> {
    let ext = TestDb::create_with(&format!("{prefix}_ext"), port(), Edition::Extension).await?;
    let sql = TestDb::create_with(&format!("{prefix}_sql"), port(), Edition::Sql).await?;
    let key: Vec<u8> = ext
        .client
        .query_one("SELECT key FROM outbox.auth_key", &[])
        .await?
        .get(0);
    sql.client
        .execute("UPDATE outbox.auth_key SET key = $1", &[&key])
        .await?;
    Ok((ext, sql))
}

#[tokio::test]
async fn both_editions_write_the_same_envelope_bytes() -> Result<()> {
    let (ext, sql) = both("ed_bytes").await?;
    let key: Vec<u8> = ext
        .client
        .query_one("SELECT key FROM outbox.auth_key", &[])
        .await?
        .get(0);
    let mut messages = Vec::new();
    for db in [&ext, &sql] {
        db.create_slot().await?;
        run_calls(db).await?;
        messages.push(peek_wal_messages(&db.client, &db.name).await?);
    }
    let (from_ext, from_sql) = (&messages[0], &messages[1]);
    assert_eq!(from_ext.len(), 10);
    assert_eq!(from_sql.len(), from_ext.len());
    for (i, ((ext_xid, e), (sql_xid, s))) in from_ext.iter().zip(from_sql).enumerate() {
        // both sealed with the key, each for its own transaction: the relay accepts both
        let e_env = open(e, &key, *ext_xid).with_context(|| format!("extension message {i}"))?;
        let s_env = open(s, &key, *sql_xid).with_context(|| format!("SQL edition message {i}"))?;
        // byte for byte the same but for the event id and the time (bytes 2..26) and the tag
        assert_eq!(e.len(), s.len(), "message {i}: length");
        assert_eq!(e[..2], s[..2], "message {i}: version and flags");
        assert_eq!(
            e[26..e.len() - TAG_LEN],
            s[26..s.len() - TAG_LEN],
            "message {i}: topic, key, headers, trace context and payload"
        );
        let (de, ds) = (Event::decode(e_env)?, Event::decode(s_env)?);
        assert_eq!(uuid::Uuid::from_bytes(ds.id).get_version_num(), 7);
        let created = |e: &Event| e.created_at_micros / 1_000_000;
        assert!(
            (created(&de) - created(&ds)).abs() < 600,
            "created_at is a time"
        );
        // the UUIDv7's time is the event's time
        let ms = u64::from_be_bytes([
            0, 0, ds.id[0], ds.id[1], ds.id[2], ds.id[3], ds.id[4], ds.id[5],
        ]);
        assert_eq!(
            ms as i64,
            ds.created_at_micros.div_euclid(1000),
            "message {i}: id time"
        );
    }
    // a message sealed for one transaction does not open for another
    let (xid, first) = &from_sql[0];
    assert!(open(first, &key, xid.wrapping_add(1)).is_err());
    Ok(())
}

/// topic, key, headers, payload, payload_is_json, trace_context of an outbox.events row
type Row = (
    String,
    Option<String>,
    String,
    Vec<u8>,
    bool,
    Option<String>,
);

#[tokio::test]
async fn both_editions_write_the_same_rows_in_table_mode() -> Result<()> {
    let (ext, sql) = both("ed_rows").await?;
    let mut rows = Vec::new();
    for db in [&ext, &sql] {
        db.client
            .batch_execute("SET pg_outbox.mode = 'table'")
            .await?;
        run_calls(db).await?;
        let got: Vec<Row> = db
            .client
            .query(
                "SELECT topic, key, headers::text, payload, payload_is_json, trace_context \
                 FROM outbox.events ORDER BY seq",
                &[],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
            .collect();
        rows.push(got);
    }
    assert_eq!(rows[0].len(), 10);
    assert_eq!(rows[0], rows[1]);
    Ok(())
}

#[tokio::test]
async fn both_editions_refuse_the_same_input_with_the_same_sqlstate() -> Result<()> {
    let (ext, sql) = both("ed_refuse").await?;
    let big = "x".repeat(2000);
    let cases = [
        "SELECT outbox.enqueue(NULL, 'k', '{}')".to_string(),
        "SELECT outbox.enqueue('', 'k', '{}')".into(),
        "SELECT outbox.enqueue('a b', 'k', '{}')".into(),
        "SELECT outbox.enqueue('..', 'k', '{}')".into(),
        format!("SELECT outbox.enqueue('{}', 'k', '{{}}')", "t".repeat(250)),
        "SELECT outbox.enqueue('t', 'k', NULL)".into(),
        "SELECT outbox.enqueue_bytes('t', 'k', NULL)".into(),
        "SELECT outbox.enqueue('t', 'k', '{}', '[1]')".into(),
        "SELECT outbox.enqueue('t', 'k', '{}', '{\"pg_outbox-id\": \"x\"}')".into(),
        "SELECT outbox.enqueue('t', 'k', '{}', '{\"PG_OUTBOX-source\": \"x\"}')".into(),
        "SELECT outbox.enqueue('t', 'k', '{}', '{\"a\": {\"b\": 1}}')".into(),
        "SELECT outbox.enqueue('t', 'k', '{}', '{\"a\": null}')".into(),
        "SELECT outbox.enqueue('t', 'k', '{}', '{\"\": \"x\"}')".into(),
        format!("SELECT outbox.enqueue('t', 'k', '{{}}', '{{\"{big}\": \"x\"}}')"),
        format!("BEGIN; SET LOCAL pg_outbox.trace_context = '{big}'; SELECT outbox.enqueue('t', 'k', '{{}}'); COMMIT"),
        "BEGIN; SET LOCAL pg_outbox.max_payload_bytes = 10; SELECT outbox.enqueue('t', 'k', '{\"a\": 12345678}'); COMMIT".into(),
        "SELECT outbox.enqueue_batch('t', ARRAY['a'], ARRAY['{}', '{}']::jsonb[])".into(),
        "SELECT outbox.enqueue_batch('t', NULL, ARRAY['{}', NULL]::jsonb[])".into(),
        "SELECT outbox.enqueue_batch('t', NULL, NULL)".into(),
        // wal mode without a slot
        "SELECT outbox.enqueue('t', 'k', '{}')".into(),
    ];
    for case in &cases {
        let (e_code, e_msg, _) = expect_error(&ext.client, case).await?;
        let (s_code, s_msg, s_hint) = expect_error(&sql.client, case).await?;
        let _ = ext.client.batch_execute("ROLLBACK").await;
        let _ = sql.client.batch_execute("ROLLBACK").await;
        assert_eq!(s_code, e_code, "{case}: {e_msg} / {s_msg}");
        assert!(s_msg.starts_with("pg_outbox: "), "{case}: {s_msg}");
        assert!(s_hint.is_some_and(|h| !h.is_empty()), "{case}: a hint");
    }
    for db in [&ext, &sql] {
        let rows: i64 = db
            .client
            .query_one("SELECT count(*) FROM outbox.events", &[])
            .await?
            .get(0);
        assert_eq!(rows, 0, "{}: nothing written", db.name);
    }
    Ok(())
}

const TXNS: i64 = 400;
/// Events per transaction.
const BATCH: i64 = 10;
const KEYS: i64 = 8;
const PARTITIONS: i32 = 3;

/// Runs psql with one of the switch scripts in `db`, as a superuser (without blocking the writer,
/// which runs on the same runtime).
async fn switch(db: &str, script: &str) -> Result<()> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../sql-edition/").to_string() + script;
    let out = tokio::process::Command::new("psql")
        .args([
            "-X",
            "-q",
            "-h",
            "127.0.0.1",
            "-p",
            &port().to_string(),
            "-U",
            "postgres",
        ])
        .args(["-d", db, "-v", "ON_ERROR_STOP=1", "-f", &path])
        .output()
        .await?;
    ensure!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The SQL edition, then the C extension, then the SQL edition again, under a steady load with the
/// relay running: Kafka holds every committed event once, per key in order.
async fn switch_under_load(name: &str, mode: &str) -> Result<()> {
    let db = TestDb::create_with(name, port(), Edition::Sql).await?;
    db.client
        .batch_execute(&format!(
            "CREATE TABLE written (t bigint PRIMARY KEY); \
             ALTER DATABASE {name} SET pg_outbox.mode = '{mode}'"
        ))
        .await?;
    let broker = Broker::start()?;
    broker.create_topic("orders", PARTITIONS).await?;
    let source: &[&str] = if mode == "table" {
        &["--source", "poll"]
    } else {
        &[]
    };
    let relay = Relay::start(db.port, name, &broker.bootstrap(), source)?;
    if mode == "wal" {
        db.wait_for_active_slot().await?;
    }
    let writing = tokio::spawn(resilient_writer(
        conninfo(&[db.port], name),
        0..TXNS,
        |t| pg_outbox_tests::numbered_batch(t, BATCH, KEYS),
        |_, _| {},
    ));
    let written = |at_least: i64| {
        let c = &db.client;
        async move {
            Ok(c.query_one("SELECT count(*) FROM written", &[])
                .await?
                .get::<_, i64>(0)
                >= at_least)
        }
    };
    for (at, script) in [
        (TXNS / 4, "switch-to-extension.sql"),
        (TXNS / 2, "switch-to-sql-edition.sql"),
        (3 * TXNS / 4, "switch-to-extension.sql"),
    ] {
        wait_for("the writer to go on", Duration::from_secs(60), || {
            written(at)
        })
        .await?;
        switch(name, script).await?;
        println!("editions: {mode} mode: {script} with the relay running, after {at} transactions");
    }
    writing.await??;
    let events = (TXNS * BATCH) as usize;
    let records = read_all(
        &broker.bootstrap(),
        &[("orders", PARTITIONS)],
        events,
        Duration::from_secs(120),
    )?;
    let published: HashSet<i64> = records.iter().map(|r| payload_n(&r.payload)).collect();
    let lost = (0..events as i64)
        .filter(|n| !published.contains(n))
        .count();
    let out_of_order = record_order_violations(&records);
    println!(
        "editions: {mode} mode: {events} events committed across three switches; Kafka: {} records, \
         {} lost, {} duplicated, {out_of_order} out of order",
        records.len(),
        lost,
        records.len() - published.len()
    );
    assert_eq!(lost, 0, "every committed event published");
    assert_eq!(records.len(), events, "each once");
    assert_eq!(out_of_order, 0, "per key in order");
    let edition: String = db
        .client
        .query_one(
            "SELECT extversion FROM pg_extension WHERE extname = 'pg_outbox'",
            &[],
        )
        .await?
        .get(0);
    assert!(!edition.is_empty(), "the C extension at the end");
    drop(relay);
    Ok(())
}

#[tokio::test]
async fn switching_editions_under_load_in_wal_mode_loses_and_doubles_nothing() -> Result<()> {
    switch_under_load("ed_switch_wal", "wal").await
}

#[tokio::test]
async fn switching_editions_under_load_in_table_mode_loses_and_doubles_nothing() -> Result<()> {
    switch_under_load("ed_switch_table", "table").await
}
