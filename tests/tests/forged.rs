//! Records that look like the relay's, written by someone else (any producer on the topic), never
//! move the restart dedup: only records whose `pg_outbox-mac` verifies under the database's record
//! key count. Real PostgreSQL and the real broker, in both capture modes; each test fails on the
//! code before the fix (issue 21, item 2).

use anyhow::{ensure, Result};
use pg_outbox_tests::{
    enqueue, free_port, metric, numbered, read_all, scrape_metrics, wait_for, Broker, Record,
    Relay, Scenario, TestDb,
};
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::time::Duration;
use tokio_postgres::Client;

const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// More than the read-back's first window (256 offsets), as in the issue.
const FORGED: usize = 256;
/// In every forged payload; never in a log line.
const PAYLOAD_MARK: &str = "zq-forger-payload";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Wal,
    Table,
}

impl Mode {
    fn relay_args(self) -> &'static [&'static str] {
        match self {
            Mode::Wal => &[],
            Mode::Table => &["--source", "poll"],
        }
    }
}

/// A database of its own (sessions enqueue in `mode`) and a broker with a one-partition `orders`.
async fn setup(name: &str, mode: Mode) -> Result<Scenario> {
    let scenario = Scenario::builder(name).topic("orders", 1);
    match mode {
        Mode::Wal => scenario.start().await,
        Mode::Table => scenario.table_mode().start().await,
    }
}

/// A relay publishes one real event and stops cleanly; returns the source identity its record
/// carries (`pg_outbox-source`, what anyone reading the topic sees).
async fn first_session(db: &TestDb, broker: &Broker, mode: Mode) -> Result<String> {
    let mut relay = Relay::start(db.port, &db.name, &broker.bootstrap(), mode.relay_args())?;
    if mode == Mode::Wal {
        db.wait_for_active_slot().await?;
    }
    let e0 = enqueue(&db.client, "orders", "first", &numbered(0))
        .await?
        .to_string();
    let records = read_all(&broker.bootstrap(), &[("orders", 1)], 1, READ_TIMEOUT)?;
    ensure!(records.len() == 1 && records[0].id() == e0, "{records:?}");
    let source = records[0]
        .header("pg_outbox-source")
        .expect("the relay writes its identity")
        .to_string();
    let status = relay.terminate(Duration::from_secs(30))?;
    ensure!(status.success(), "exit status {status}");
    Ok(source)
}

/// Where the source is now, as anyone with a login can read it: wal, the WAL insert position;
/// poll, the next transaction id. Both as (major, 0).
async fn position_now(c: &Client, mode: Mode) -> Result<u64> {
    let sql = match mode {
        Mode::Wal => "SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint",
        Mode::Table => "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint",
    };
    Ok(c.query_one(sql, &[]).await?.get::<_, i64>(0) as u64)
}

/// `count` records from a plain producer with the relay's headers, in the relay's order, at
/// position (`major`, 0) of `source`. Every other one also carries a `pg_outbox-mac` that is not
/// the real one (a forger who knows the header but not the key); the rest have none, as records
/// of a relay older than the MAC do. Each is acknowledged before the next (one batch each), so the
/// broker's high watermark is the partition's end and the read-back's first window (the last 256
/// offsets) holds only forged records, as when real records came long before.
async fn produce_forged(brokers: &str, source: &str, major: u64, count: usize) -> Result<()> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "0")
        .create()?;
    let position = format!("{major:016X}:{:016X}", 0);
    let fake_mac = "ab".repeat(32);
    for i in 0..count {
        let id = uuid::Uuid::now_v7().to_string();
        let mut headers = OwnedHeaders::new()
            .insert(Header {
                key: "pg_outbox-id",
                value: Some(id.as_str()),
            })
            .insert(Header {
                key: "pg_outbox-position",
                value: Some(position.as_str()),
            })
            .insert(Header {
                key: "pg_outbox-source",
                value: Some(source),
            });
        if i % 2 == 1 {
            headers = headers.insert(Header {
                key: "pg_outbox-mac",
                value: Some(fake_mac.as_str()),
            });
        }
        let payload = format!(r#"{{"{PAYLOAD_MARK}": {i}}}"#);
        producer
            .send(
                FutureRecord::to("orders")
                    .partition(0)
                    .key("forger")
                    .payload(&payload)
                    .headers(headers),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)?;
    }
    Ok(())
}

/// The ids of the records with `key`, in Kafka's order.
fn ids_of(records: &[Record], key: &str) -> Vec<String> {
    records
        .iter()
        .filter(|r| r.key.as_deref() == Some(key.as_bytes()))
        .map(Record::id)
        .collect()
}

/// A counter of the relay's `/metrics` (0 when it is not shown).
fn counter(addr: &str, name: &str) -> Result<f64> {
    Ok(metric(&scrape_metrics(addr)?, name).unwrap_or(0.0))
}

/// Issue 21, item 2, "silent loss": with the relay down, e1..e5 commit, a plain producer writes
/// 256 records that claim position P (above e1..e5) of the real source identity, more WAL is
/// written. On restart the forged records must not become the dedup's floor: e1..e5 arrive, once.
async fn forged_floor_run(name: &str, mode: Mode) -> Result<()> {
    let s = setup(name, mode).await?;
    let (db, broker) = (&s.db, &s.broker);
    let brokers = broker.bootstrap();
    let source = first_session(db, broker, mode).await?;
    let mut honest = Vec::new();
    for n in 1..=5 {
        honest.push(
            enqueue(&db.client, "orders", "honest", &numbered(n))
                .await?
                .to_string(),
        );
    }
    let p = position_now(&db.client, mode).await?;
    produce_forged(&brokers, &source, p, FORGED).await?;
    // the database moves on past P (WAL written, a transaction id taken)
    db.client
        .batch_execute("CREATE TABLE moves_on AS SELECT 1 AS x")
        .await?;
    ensure!(position_now(&db.client, mode).await? > p);

    let metrics = format!("127.0.0.1:{}", free_port());
    let mut args = mode.relay_args().to_vec();
    args.extend(["--metrics-addr", &metrics]);
    let mut relay = Relay::start(db.port, &db.name, &brokers, &args)?;
    let total = 1 + FORGED + honest.len();
    let records = read_all(&brokers, &[("orders", 1)], total, READ_TIMEOUT)?;
    assert_eq!(
        ids_of(&records, "honest"),
        honest,
        "e1..e5 arrive once each, in order; log: {}",
        relay.log.display()
    );
    assert_eq!(records.len(), total, "and nothing else is written twice");
    assert_eq!(
        counter(&metrics, "pg_outbox_relay_events_skipped_total")?,
        0.0
    );
    // every forged record of the read-back window is counted (and only once)
    wait_for("the foreign records counted", READ_TIMEOUT, || async {
        Ok(counter(&metrics, "pg_outbox_relay_foreign_records_total")? >= FORGED as f64)
    })
    .await?;
    assert_eq!(
        counter(&metrics, "pg_outbox_relay_foreign_records_total")?,
        FORGED as f64
    );
    assert_eq!(counter(&metrics, "pg_outbox_relay_restarts_total")?, 0.0);
    // one line for the topic, never a payload
    let log = relay.log_text();
    assert_eq!(log.matches("do not prove").count(), 1, "{log}");
    assert!(!log.contains(PAYLOAD_MARK), "{log}");
    ensure!(relay.try_wait()?.is_none(), "the relay stopped");
    Ok(())
}

#[tokio::test]
async fn forged_records_at_a_later_position_never_make_a_restart_skip_events() -> Result<()> {
    forged_floor_run("fg_floor", Mode::Wal).await
}

#[tokio::test]
async fn forged_records_at_a_later_position_never_make_a_poll_restart_skip_events() -> Result<()> {
    forged_floor_run("fg_floor_poll", Mode::Table).await
}

/// Issue 21, item 2, "permanent stop": one record from a plain producer that claims a position
/// beyond anything the database has committed. Only the relay's own records can say "Kafka is
/// ahead of the database"; this one is ignored, and the relay publishes 10 real events once each.
async fn forged_ceiling_run(name: &str, mode: Mode) -> Result<()> {
    let s = setup(name, mode).await?;
    let (db, broker) = (&s.db, &s.broker);
    let brokers = broker.bootstrap();
    let source = first_session(db, broker, mode).await?;
    let beyond = position_now(&db.client, mode).await? + (1 << 32);
    produce_forged(&brokers, &source, beyond, 1).await?;
    let mut honest = Vec::new();
    for n in 1..=10 {
        honest.push(
            enqueue(&db.client, "orders", "honest", &numbered(n))
                .await?
                .to_string(),
        );
    }

    let metrics = format!("127.0.0.1:{}", free_port());
    let mut args = mode.relay_args().to_vec();
    args.extend(["--metrics-addr", &metrics]);
    let mut relay = Relay::start(db.port, &db.name, &brokers, &args)?;
    let total = 1 + 1 + honest.len();
    let records = read_all(&brokers, &[("orders", 1)], total, READ_TIMEOUT)?;
    assert_eq!(
        ids_of(&records, "honest"),
        honest,
        "10 events published once each; log: {}",
        relay.log.display()
    );
    assert_eq!(records.len(), total);
    ensure!(
        relay.try_wait()?.is_none(),
        "the relay stopped: {}",
        relay.log_text()
    );
    assert!(
        !relay.log_text().contains("beyond anything this database"),
        "{}",
        relay.log_text()
    );
    assert_eq!(
        counter(&metrics, "pg_outbox_relay_foreign_records_total")?,
        1.0
    );
    Ok(())
}

#[tokio::test]
async fn a_forged_record_beyond_the_database_does_not_stop_the_relay() -> Result<()> {
    forged_ceiling_run("fg_ceiling", Mode::Wal).await
}

#[tokio::test]
async fn a_forged_record_beyond_the_database_does_not_stop_the_poll_relay() -> Result<()> {
    forged_ceiling_run("fg_ceiling_poll", Mode::Table).await
}
