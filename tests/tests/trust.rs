//! What the relay and ingest trust: only the headers the relay wrote itself, and settings that can
//! work. Real PostgreSQL and the real broker; each test fails on the code before its fix.

use anyhow::Result;
use pg_outbox_envelope::Event;
use pg_outbox_tests::{
    enqueue_with_headers, expect_error, numbered, port, read_all, Broker, Relay, Scenario, TestDb,
};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::collections::HashSet;
use std::time::Duration;

const READ_TIMEOUT: Duration = Duration::from_secs(60);
const FORGED: i64 = 50;

/// Headers that look like the relay's own, with the largest possible position.
fn forged_headers(source: &str) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("pg_outbox-id", b"same".to_vec()),
        (
            "pg_outbox-position",
            b"FFFFFFFFFFFFFFFF:FFFFFFFFFFFFFFFF".to_vec(),
        ),
        ("pg_outbox-source", source.as_bytes().to_vec()),
    ]
}

/// Events that carry `headers`, written past enqueue's validation (which refuses these names) as
/// sealed messages in one transaction: what an older extension or a key holder could write.
async fn emit_forged(
    db: &TestDb,
    key: &str,
    count: i64,
    headers: &[(&'static str, Vec<u8>)],
) -> Result<()> {
    let payloads: Vec<String> = (1..=count).map(|n| format!(r#"{{"n": {n}}}"#)).collect();
    let events: Vec<Event> = payloads
        .iter()
        .map(|payload| Event {
            id: *uuid::Uuid::now_v7().as_bytes(),
            created_at_micros: 0,
            topic: "orders",
            key: Some(key),
            headers: headers.iter().map(|(n, v)| (*n, v.as_slice())).collect(),
            trace_context: None,
            payload_is_json: true,
            payload: payload.as_bytes(),
        })
        .collect();
    db.emit_sealed(&events).await
}

/// `n` records from a plain producer, each acknowledged before the next (one batch each).
async fn fill(brokers: &str, topic: &str, n: usize) -> Result<()> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "0")
        .create()?;
    for i in 0..n {
        let payload = format!("filler {i}");
        producer
            .send(
                FutureRecord::<str, str>::to(topic).payload(&payload),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)?;
    }
    Ok(())
}

#[tokio::test]
async fn a_forged_position_header_never_makes_a_restart_skip_events() -> Result<()> {
    let s = Scenario::builder("tr_forged_position")
        .topic("orders", 1)
        .start()
        .await?;
    let (db, broker) = (&s.db, &s.broker);
    // other producers' records first, one batch each, so the read-back's first window (256
    // offsets back from the end) does not reach the start of the partition
    fill(&broker.bootstrap(), "orders", 300).await?;
    let mut relay = Relay::start(db.port, &db.name, &broker.bootstrap(), &[])?;
    db.wait_for_active_slot().await?;
    // events whose writer set the relay's header names, with this relay's source id: more than the
    // read-back's first window (256), so that a partial read would take the forged one as its floor
    let source = db.source_identity().await?;
    emit_forged(db, "forger", FORGED, &forged_headers(&source)).await?;
    let first = read_all(
        &broker.bootstrap(),
        &[("orders", 1)],
        300 + FORGED as usize,
        READ_TIMEOUT,
    )?;
    assert_eq!(first.len(), 300 + FORGED as usize);
    let status = relay.terminate(Duration::from_secs(30))?;
    assert!(status.success(), "exit status {status}");
    // a restart reads the partition back: the forged position must not become the floor
    for n in 1..=5 {
        enqueue_with_headers(&db.client, "orders", "honest", &numbered(n), "{}").await?;
    }
    let _relay = Relay::start(db.port, &db.name, &broker.bootstrap(), &[])?;
    let total = 300 + FORGED as usize + 5;
    let records = read_all(&broker.bootstrap(), &[("orders", 1)], total, READ_TIMEOUT)?;
    let honest = records
        .iter()
        .filter(|r| r.key.as_deref() == Some(b"honest"))
        .count();
    assert_eq!(honest, 5, "every event after the forged ones arrives");
    assert_eq!(records.len(), total, "and nothing twice");
    // the relay's own headers come first, with the real values
    for r in records
        .iter()
        .filter(|r| r.header("pg_outbox-id").is_some())
    {
        assert_eq!(r.headers[0].0, "pg_outbox-id");
        assert_ne!(r.headers[0].1, b"same");
        assert_eq!(
            r.headers[2],
            ("pg_outbox-source".into(), source.as_bytes().to_vec())
        );
    }
    Ok(())
}

#[tokio::test]
async fn ingest_trusts_only_the_id_the_relay_wrote() -> Result<()> {
    let s = Scenario::builder("tr_forged_id")
        .topic("orders", 1)
        .start()
        .await?;
    let (db, broker) = (&s.db, &s.broker);
    let _relay = Relay::start(db.port, &db.name, &broker.bootstrap(), &[])?;
    db.wait_for_active_slot().await?;
    // two distinct events that carry the same copied pg_outbox-id header
    let forged = forged_headers("elsewhere");
    emit_forged(db, "a", 1, &forged).await?;
    emit_forged(db, "b", 1, &forged).await?;
    let records = read_all(&broker.bootstrap(), &[("orders", 1)], 2, READ_TIMEOUT)?;
    let ids: HashSet<String> = records.iter().map(|r| r.id()).collect();
    assert_eq!(ids.len(), 2, "two events, two relay ids");
    let _ingest = Relay::ingest(
        db.port,
        &db.name,
        &broker.bootstrap(),
        "billing",
        "orders",
        &[],
    )?;
    pg_outbox_tests::wait_for("two inbox rows", Duration::from_secs(60), || async {
        let n: i64 = db
            .client
            .query_one(
                "SELECT count(*) FROM inbox.messages WHERE consumer = 'billing'",
                &[],
            )
            .await?
            .get(0);
        Ok(n == 2)
    })
    .await?;
    let stored: HashSet<String> = db
        .client
        .query(
            "SELECT message_id FROM inbox.messages WHERE consumer = 'billing'",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(stored, ids, "each message under the id the relay wrote");
    Ok(())
}

#[tokio::test]
async fn a_missing_database_or_refused_login_stops_at_start_with_one_clear_line() -> Result<()> {
    let db = TestDb::create("tr_fatal", port()).await?;
    db.client
        .batch_execute("DROP ROLE IF EXISTS tr_nologin; CREATE ROLE tr_nologin NOLOGIN")
        .await?;
    let broker = Broker::start()?;
    for (database, args, setting) in [
        ("tr_no_such_db", vec![], "pg_database"),
        (db.name.as_str(), vec!["--pg-user", "tr_nologin"], "pg_user"),
    ] {
        for command in ["run", "ingest"] {
            // each run's log on its own
            let _ =
                std::fs::remove_file(std::env::temp_dir().join(format!("relay-{database}.log")));
            let mut relay = if command == "run" {
                Relay::start(db.port, database, &broker.bootstrap(), &args)?
            } else {
                Relay::ingest(db.port, database, &broker.bootstrap(), "c", "orders", &args)?
            };
            // before: a warning every backoff, forever; now: exit non-zero at once
            let status = relay.wait_for_exit(Duration::from_secs(30)).await?;
            assert_eq!(
                status.code(),
                Some(3),
                "{command} {args:?}: exit status {status} (an operator must act)"
            );
            let log = relay.log_text();
            let line = log
                .lines()
                .find(|l| l.contains("relay stopped"))
                .unwrap_or_else(|| panic!("{command} {args:?}: no stop line in\n{log}"));
            assert!(line.contains(setting), "{command} {args:?}: {line}");
            assert!(
                !log.contains("reconnecting"),
                "{command} {args:?}: retried instead of stopping:\n{log}"
            );
        }
    }
    Ok(())
}

/// A role with no grant at all can call `pg_logical_emit_message` with the relay's prefix. Neither
/// the bytes of a real event replayed in its own transaction, nor a well-formed envelope it made
/// itself, nor a non-transactional copy reaches Kafka: each is dead-lettered with its reason, and
/// the real events around them arrive once each.
#[tokio::test]
async fn messages_not_written_by_enqueue_are_never_published() -> Result<()> {
    let db = TestDb::create("tr_inject", port()).await?;
    db.client
        .batch_execute("DROP ROLE IF EXISTS tr_nobody; CREATE ROLE tr_nobody LOGIN")
        .await?;
    db.create_slot().await?;
    let broker = Broker::start()?;
    broker.create_topic("orders", 1).await?;
    let genuine: uuid::Uuid = db
        .client
        .query_one(
            "SELECT outbox.enqueue('orders', 'genuine', '{\"n\": 1}')",
            &[],
        )
        .await?
        .get(0);
    // the real message's bytes, as anyone who can read WAL (or a backup) could copy them
    let raw: Vec<u8> = db
        .client
        .query(
            "SELECT data FROM pg_logical_slot_peek_binary_changes($1::text::name, NULL, NULL, \
             'proto_version', '1', 'publication_names', $1::text, 'messages', 'true')",
            &[&db.name],
        )
        .await?
        .iter()
        .find_map(|r| {
            let data: Vec<u8> = r.get(0);
            pg_outbox_tests::pgoutput_message(&data, "pg_outbox")
                .ok()
                .flatten()
                .map(<[u8]>::to_vec)
        })
        .expect("the genuine message");
    let made_up = Event {
        id: *uuid::Uuid::now_v7().as_bytes(),
        created_at_micros: 0,
        topic: "orders",
        key: Some("made-up"),
        headers: vec![],
        trace_context: None,
        payload_is_json: true,
        payload: b"{}",
    }
    .encode()?;
    let nobody = db.session_as("tr_nobody").await?;
    for (transactional, bytes) in [(true, &raw), (true, &made_up), (false, &raw)] {
        nobody
            .execute(
                "SELECT pg_logical_emit_message($1, 'pg_outbox', $2::bytea)",
                &[&transactional, bytes],
            )
            .await?;
    }
    // nor may it enqueue, or read the key
    let (code, _, _) = expect_error(&nobody, "SELECT outbox.enqueue('orders', 'k', '{}')").await?;
    assert_eq!(code, "42501");
    let (code, _, _) = expect_error(&nobody, "SELECT outbox.relay_auth_key()").await?;
    assert_eq!(code, "42501");
    let last: uuid::Uuid = db
        .client
        .query_one("SELECT outbox.enqueue('orders', 'last', '{\"n\": 2}')", &[])
        .await?
        .get(0);

    let metrics = format!("127.0.0.1:{}", pg_outbox_tests::free_port());
    let relay = Relay::start(
        db.port,
        &db.name,
        &broker.bootstrap(),
        &["--metrics-addr", &metrics],
    )?;
    let records = read_all(&broker.bootstrap(), &[("orders", 1)], 2, READ_TIMEOUT)?;
    let ids: Vec<String> = records.iter().map(|r| r.id()).collect();
    assert_eq!(ids, vec![genuine.to_string(), last.to_string()]);
    // the three are passed over and counted: never published, never stored
    pg_outbox_tests::wait_for_metric(
        &metrics,
        "pg_outbox_relay_unproven_messages_total",
        3.0,
        READ_TIMEOUT,
    )
    .await?;
    let text = pg_outbox_tests::scrape_metrics(&metrics)?;
    assert_eq!(
        pg_outbox_tests::metric(&text, "pg_outbox_relay_unproven_messages_total"),
        Some(3.0)
    );
    let dead: i64 = db
        .client
        .query_one("SELECT count(*) FROM outbox.dead_letters", &[])
        .await?
        .get(0);
    assert_eq!(dead, 0, "a message anyone can write costs no row");
    let log = relay.log_text();
    assert!(
        log.contains("passed over pg_outbox messages"),
        "one line says so: {log}"
    );
    Ok(())
}
