//! Rotating the sealing key (`outbox.rotate_auth_key`, `outbox.retire_auth_key`) while events flow:
//! nothing is lost or published twice, a backend that cached the older key seals with the new one
//! from its next transaction, a key is retired only once nothing sealed with it can still be in
//! flight, and a message sealed with a retired key is passed over. Real PostgreSQL and the real
//! broker; both editions.

use anyhow::Result;
use pg_outbox_tests::{enqueue_numbered, expect_error, port, read_all, Broker, Relay, TestDb};
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(60);

#[tokio::test]
async fn a_rotated_key_loses_nothing_and_a_retired_key_opens_nothing() -> Result<()> {
    let db = TestDb::create("keys_rotate", port()).await?;
    db.client
        .batch_execute(
            "DROP ROLE IF EXISTS keys_app; CREATE ROLE keys_app LOGIN IN ROLE outbox_writer",
        )
        .await?;
    db.create_slot().await?;
    let broker = Broker::start()?;
    broker.create_topic("orders", 1).await?;
    let brokers = broker.bootstrap();
    let metrics = format!("127.0.0.1:{}", pg_outbox_tests::free_port());
    let relay = Relay::start(db.port, &db.name, &brokers, &["--metrics-addr", &metrics])?;

    // a writer's backend that seals (and, in the C extension, caches) key 1
    let writer = db.session_as("keys_app").await?;
    let mut ids = enqueue_numbered(&writer, "orders", "k", 1..=5).await?;
    // the relay's session runs with key 1 only when the key rotates: it must not pass over what is
    // sealed with key 2 before it starts a new session
    assert_eq!(read_all(&brokers, &[("orders", 1)], 5, TIMEOUT)?.len(), 5);
    // a transaction that sealed with key 1 and is still open when the key rotates
    let old = db.session_as("keys_app").await?;
    old.batch_execute("BEGIN").await?;
    let late: uuid::Uuid = old
        .query_one("SELECT outbox.enqueue('orders', 'k', '{\"n\": 6}')", &[])
        .await?
        .get(0);

    // only a superuser (or whom one grants it to) rotates
    let (code, _, _) = expect_error(&writer, "SELECT outbox.rotate_auth_key()").await?;
    assert_eq!(code, "42501");
    let key_1: Vec<u8> = db
        .client
        .query_one("SELECT key FROM outbox.auth_key WHERE key_id = 1", &[])
        .await?
        .get(0);
    let new_id: i32 = db
        .client
        .query_one("SELECT outbox.rotate_auth_key()", &[])
        .await?
        .get(0);
    assert_eq!(new_id, 2);
    // the same backend, its next transactions
    ids.extend(enqueue_numbered(&writer, "orders", "k", 7..=10).await?);

    let (code, _, _) = expect_error(&db.client, "SELECT outbox.retire_auth_key(2)").await?;
    assert_eq!(code, "55000", "the newest key");
    let (code, _, _) = expect_error(&db.client, "SELECT outbox.retire_auth_key(9)").await?;
    assert_eq!(code, "22023", "no such key");
    // the open transaction may still seal with key 1
    let (code, message, _) = expect_error(
        &db.client,
        "SELECT outbox.retire_auth_key(1, timeout => '1 second')",
    )
    .await?;
    assert_eq!(code, "55000", "{message}");
    assert!(message.contains("still open"), "{message}");

    old.batch_execute("COMMIT").await?;
    ids.push(late);
    // waits for the relay to sign with key 2 (its next session, within 10 s) and to confirm
    // everything written until then
    db.client
        .batch_execute("SELECT outbox.retire_auth_key(1, timeout => '60 seconds')")
        .await?;
    let keys: Vec<i32> = db
        .client
        .query("SELECT key_id FROM outbox.sealing_keys", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(keys, [2]);

    // the running relay drops the retired key within KEYS_CHECK_EVERY (a new session)
    pg_outbox_tests::wait_for("the relay to drop key 1", TIMEOUT, || async {
        Ok(relay.log_text().contains("(ids [2], were"))
    })
    .await?;
    // still the same backend: sealed with key 2, or the relay would pass them over now
    ids.extend(enqueue_numbered(&writer, "orders", "k", 11..=12).await?);
    // a message sealed with the retired key, as someone who kept it would write one
    db.client.batch_execute("BEGIN").await?;
    let xid: i64 = db
        .client
        .query_one("SELECT pg_current_xact_id()::text::bigint", &[])
        .await?
        .get(0);
    let forged = pg_outbox_envelope::Event {
        id: *uuid::Uuid::now_v7().as_bytes(),
        created_at_micros: 0,
        topic: "orders",
        key: Some("k"),
        headers: Vec::new(),
        trace_context: None,
        payload_is_json: true,
        payload: b"{\"forged\": true}",
    };
    let mut message = forged.encode()?;
    pg_outbox_envelope::seal(
        &mut message,
        0,
        pg_outbox_envelope::FIRST_KEY_ID,
        &key_1,
        xid as u64,
    );
    db.client
        .execute(
            "SELECT pg_logical_emit_message(true, 'pg_outbox', $1::bytea)",
            &[&message],
        )
        .await?;
    db.client.batch_execute("COMMIT").await?;
    ids.extend(enqueue_numbered(&writer, "orders", "k", 13..=13).await?);

    let records = read_all(&brokers, &[("orders", 1)], ids.len(), TIMEOUT)?;
    let got: Vec<String> = records.iter().map(|r| r.id()).collect();
    let want: Vec<String> = ids.iter().map(|u| u.to_string()).collect();
    assert_eq!(
        got,
        want,
        "every event once, in commit order:\n{}",
        relay.log_text()
    );
    pg_outbox_tests::wait_for_metric(
        &metrics,
        "pg_outbox_relay_unproven_messages_total",
        1.0,
        TIMEOUT,
    )
    .await?;
    Ok(())
}
