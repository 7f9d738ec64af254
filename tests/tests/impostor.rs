//! Ownership of a poll source is something only the relay's role can take (issue: a role with no
//! grant at all held the poll source's advisory lock, whose key the docs made computable, under a
//! relay-looking `application_name`; the poll relay stood by for as long as it liked, table-mode events
//! were not published, and `status` named the impostor as the active relay).
//!
//! Here the impostor does better than compute the key: it reads it from `pg_locks` while a relay
//! holds it, and takes it the moment that relay dies. The next relay must not stand by behind it.

use anyhow::{ensure, Result};
use pg_outbox_tests::{port, read_all, relay_command, wait_for, Broker, Relay, TestDb};
use std::time::Duration;

#[tokio::test]
async fn a_role_without_grants_cannot_hold_a_poll_source() -> Result<()> {
    let db = TestDb::create("im_poll_lock", port()).await?;
    db.client
        .batch_execute("DROP ROLE IF EXISTS im_nobody; CREATE ROLE im_nobody LOGIN")
        .await?;
    let broker = Broker::start()?;
    broker.create_topic("orders", 1).await?;
    let enqueue = |from: i64, to: i64| {
        let c = &db.client;
        async move {
            c.batch_execute(&format!(
                "SET pg_outbox.mode = 'table'; \
                 SELECT outbox.enqueue('orders', 'k', pg_catalog.jsonb_build_object('n', n)) \
                   FROM pg_catalog.generate_series({from}, {to}) n"
            ))
            .await?;
            anyhow::Ok(())
        }
    };
    let args = ["--source", "poll"];
    let mut a = Relay::start(db.port, &db.name, &broker.bootstrap(), &args)?;
    enqueue(1, 5).await?;
    read_all(
        &broker.bootstrap(),
        &[("orders", 1)],
        5,
        Duration::from_secs(60),
    )?;

    // the impostor reads the key from pg_locks, where anyone may look, while A holds it
    let nobody = db.session_as("im_nobody").await?;
    let key: i64 = nobody
        .query_one(
            "SELECT (l.classid::bigint << 32) | l.objid::bigint FROM pg_catalog.pg_locks l \
              WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
                AND l.database = (SELECT oid FROM pg_catalog.pg_database \
                                   WHERE datname = pg_catalog.current_database())",
            &[],
        )
        .await?
        .get(0);
    nobody
        .batch_execute("SET application_name = 'pg_outbox_relay 4711@relay-host'")
        .await?;
    a.kill9()?;
    wait_for(
        "the impostor to hold the lock",
        Duration::from_secs(30),
        || async {
            Ok(nobody
                .query_one("SELECT pg_catalog.pg_try_advisory_lock($1)", &[&key])
                .await?
                .get::<_, bool>(0))
        },
    )
    .await?;

    // B takes the source anyway, and publishes what waits
    enqueue(6, 10).await?;
    let b = Relay::start(db.port, &db.name, &broker.bootstrap(), &args)?;
    let records = read_all(
        &broker.bootstrap(),
        &[("orders", 1)],
        10,
        Duration::from_secs(60),
    )?;
    let payloads: Vec<String> = records
        .iter()
        .map(|r| String::from_utf8_lossy(&r.payload).into_owned())
        .collect();
    let expected: Vec<String> = (1..=10).map(|n| format!(r#"{{"n": {n}}}"#)).collect();
    assert_eq!(payloads, expected, "every event once, in order");
    let (_, status) = relay_command("status", db.port, &db.name, &broker.bootstrap(), &args)?;
    let active = status
        .lines()
        .find(|l| l.starts_with("active_relay"))
        .unwrap_or_default()
        .to_string();
    ensure!(
        active.contains(&format!("pg_outbox_relay {}@", b.pid())) && !active.contains("4711"),
        "status names B, not the impostor: {status}"
    );
    Ok(())
}
