//! What the relay and ingest trust: only the headers the relay wrote itself, and settings that can
//! work. Real PostgreSQL and the real broker; each test fails on the code before its fix.

use anyhow::Result;
use pg_outbox_tests::{port, read_all, Broker, Relay, TestDb};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::collections::HashSet;
use std::time::Duration;
use tokio_postgres::Client;

const READ_TIMEOUT: Duration = Duration::from_secs(60);
const FORGED: i64 = 50;

/// Headers a writer sets to look like the relay's own, with the largest possible position.
fn forged_headers(source: &str) -> String {
    format!(
        r#"{{"pg_outbox-id": "same", "pg_outbox-position": "FFFFFFFFFFFFFFFF:FFFFFFFFFFFFFFFF", "pg_outbox-source": "{source}"}}"#
    )
}

async fn enqueue(c: &Client, key: &str, n: i64, headers: &str) -> Result<()> {
    let payload = format!(r#"{{"n": {n}}}"#);
    c.execute(
        "SELECT outbox.enqueue('orders', $1, $2::text::jsonb, $3::text::jsonb)",
        &[&key, &payload, &headers],
    )
    .await?;
    Ok(())
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
    let db = TestDb::create("tr_forged_position", port()).await?;
    let broker = Broker::start()?;
    broker.create_topic("orders", 1).await?;
    // other producers' records first, one batch each, so the read-back's first window (256
    // offsets back from the end) does not reach the start of the partition
    fill(&broker.bootstrap(), "orders", 300).await?;
    let mut relay = Relay::start(db.port, &db.name, &broker.bootstrap(), &[])?;
    db.wait_for_active_slot().await?;
    // events whose writer set the relay's header names, with this relay's source id: more than the
    // read-back's first window (256), so that a partial read would take the forged one as its floor
    let forged = forged_headers(&db.name);
    db.client.batch_execute("BEGIN").await?;
    for n in 1..=FORGED {
        enqueue(&db.client, "forger", n, &forged).await?;
    }
    db.client.batch_execute("COMMIT").await?;
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
        enqueue(&db.client, "honest", n, "{}").await?;
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
            ("pg_outbox-source".into(), db.name.as_bytes().to_vec())
        );
    }
    Ok(())
}

#[tokio::test]
async fn ingest_trusts_only_the_id_the_relay_wrote() -> Result<()> {
    let db = TestDb::create("tr_forged_id", port()).await?;
    let broker = Broker::start()?;
    broker.create_topic("orders", 1).await?;
    let _relay = Relay::start(db.port, &db.name, &broker.bootstrap(), &[])?;
    db.wait_for_active_slot().await?;
    // two distinct events whose writers copied the same pg_outbox-id header
    let forged = forged_headers("elsewhere");
    enqueue(&db.client, "a", 1, &forged).await?;
    enqueue(&db.client, "b", 1, &forged).await?;
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
            assert!(
                !status.success(),
                "{command} {args:?}: exit status {status}"
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
