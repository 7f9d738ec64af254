//! One event that can never be published does not stop the stream: it is retried for a bounded
//! time (the relay says it is degraded meanwhile), then dead-lettered with its reason, and every
//! other event flows, in order, while the slot advances. Real PostgreSQL, real broker.

use anyhow::Result;
use pg_outbox_tests::{
    free_port, healthz, port, read_all, wait_for, Broker, Relay, Scenario, TestDb,
};
use std::collections::HashMap;
use std::io::Read;
use std::time::Duration;

#[tokio::test]
async fn one_event_to_a_missing_topic_among_1000_is_dead_lettered_and_the_rest_flows() -> Result<()>
{
    let s = Scenario::builder("po_missing_topic")
        .topic("orders", 2)
        .start()
        .await?;
    let (db, broker) = (&s.db, &s.broker);
    let relay = s
        .relay()
        .args(&["--poison-retry-ms", "20000"])
        .metrics()
        .running()
        .await?;
    let metrics = relay.metrics_addr().to_string();
    let c = &db.client;
    let mut sent: HashMap<String, i64> = HashMap::new();
    for i in 0..1000 {
        if i == 500 {
            c.execute(
                "SELECT outbox.enqueue('no_such_topic', 'lost', '{\"n\": 1}')",
                &[],
            )
            .await?;
            continue;
        }
        let key = format!("k{}", i % 10);
        let n = sent.entry(key.clone()).or_insert(0);
        *n += 1;
        let payload = format!(r#"{{"n": {n}}}"#);
        c.execute(
            "SELECT outbox.enqueue('orders', $1, $2::text::jsonb)",
            &[&key, &payload],
        )
        .await?;
    }
    let end = db.current_wal_lsn().await?;
    // while the event is retried the relay says so
    wait_for(
        "/healthz to say degraded",
        Duration::from_secs(30),
        || async {
            let (ok, text) = healthz(&metrics)?;
            Ok(!ok && text.contains("degraded"))
        },
    )
    .await?;
    let records = read_all(
        &broker.bootstrap(),
        &[("orders", 2)],
        999,
        Duration::from_secs(120),
    )?;
    assert_eq!(records.len(), 999, "every other event, once");
    // the events behind the one to the missing topic did not wait for it: it still waits
    let waiting: i64 = c
        .query_one("SELECT count(*) FROM outbox.dead_letters", &[])
        .await?
        .get(0);
    assert_eq!(
        waiting, 0,
        "the other 999 were published while the event to the missing topic waited (20 s)"
    );
    // per key, in commit order
    let mut next: HashMap<Vec<u8>, i64> = HashMap::new();
    for r in &records {
        let n = serde_json::from_slice::<serde_json::Value>(&r.payload)?["n"]
            .as_i64()
            .unwrap_or(-1);
        let want = next.entry(r.key.clone().unwrap_or_default()).or_insert(1);
        assert_eq!(n, *want, "key {:?}", r.key);
        *want += 1;
    }
    wait_for("the dead letter", Duration::from_secs(60), || async {
        Ok(c.query_one("SELECT count(*) FROM outbox.dead_letters", &[])
            .await?
            .get::<_, i64>(0)
            > 0)
    })
    .await?;
    let rows = c
        .query("SELECT topic, key, reason FROM outbox.dead_letters", &[])
        .await?;
    assert_eq!(rows.len(), 1, "one dead letter");
    let (topic, key, reason): (String, String, String) =
        (rows[0].get(0), rows[0].get(1), rows[0].get(2));
    assert_eq!((topic.as_str(), key.as_str()), ("no_such_topic", "lost"));
    assert!(
        reason.contains("no_such_topic") && reason.contains("retried"),
        "{reason}"
    );
    // the slot moves past everything, the dead letter included
    wait_for("the slot to advance", Duration::from_secs(30), || async {
        db.confirmed_at_least(&end).await
    })
    .await?;
    let (ok, text) = healthz(&metrics)?;
    assert!(ok, "healthy again: {text}");
    Ok(())
}

/// A topic that appears while its events wait (created late, or a writer's authorization that
/// comes back) gets them, in order; nothing is dead-lettered, and the other topics never waited.
#[tokio::test]
async fn events_to_a_topic_that_appears_while_they_wait_are_published_not_dead_lettered(
) -> Result<()> {
    let s = Scenario::builder("po_late_topic")
        .topic("orders", 1)
        .start()
        .await?;
    let (db, broker) = (&s.db, &s.broker);
    let _relay = s
        .relay()
        .args(&["--poison-retry-ms", "60000"])
        .running()
        .await?;
    let c = &db.client;
    for n in 1..=5 {
        c.execute(
            "SELECT outbox.enqueue('late_topic', 'k', $1::text::jsonb)",
            &[&format!(r#"{{"n": {n}}}"#)],
        )
        .await?;
        c.execute(
            "SELECT outbox.enqueue('orders', 'k', $1::text::jsonb)",
            &[&format!(r#"{{"n": {n}}}"#)],
        )
        .await?;
    }
    // the events to the existing topic flow while the others wait for theirs
    let orders = read_all(
        &broker.bootstrap(),
        &[("orders", 1)],
        5,
        Duration::from_secs(60),
    )?;
    assert_eq!(orders.len(), 5);
    broker.create_topic("late_topic", 1).await?;
    let late = read_all(
        &broker.bootstrap(),
        &[("late_topic", 1)],
        5,
        Duration::from_secs(60),
    )?;
    let ns: Vec<i64> = late
        .iter()
        .map(|r| pg_outbox_tests::payload_n(&r.payload))
        .collect();
    assert_eq!(ns, [1, 2, 3, 4, 5], "every waiting event once, in order");
    let dead: i64 = c
        .query_one("SELECT count(*) FROM outbox.dead_letters", &[])
        .await?
        .get(0);
    assert_eq!(dead, 0, "nothing dead-lettered");
    Ok(())
}

#[tokio::test]
async fn healthz_says_stalled_while_the_broker_acknowledges_nothing() -> Result<()> {
    let s = Scenario::builder("po_stalled")
        .topic("orders", 1)
        .start()
        .await?;
    let (db, broker) = (&s.db, &s.broker);
    let relay = s
        .relay()
        .args(&["--stall-timeout-ms", "2000"])
        .metrics()
        .running()
        .await?;
    let metrics = relay.metrics_addr().to_string();
    let c = &db.client;
    c.execute("SELECT outbox.enqueue('orders', 'k', '{\"n\": 1}')", &[])
        .await?;
    read_all(
        &broker.bootstrap(),
        &[("orders", 1)],
        1,
        Duration::from_secs(60),
    )?;
    let (ok, text) = healthz(&metrics)?;
    assert!(ok, "{text}");
    // the broker freezes with records in flight
    pg_outbox_tests::signal(broker.pid(), "STOP")?;
    let frozen = async {
        c.execute("SELECT outbox.enqueue('orders', 'k', '{\"n\": 2}')", &[])
            .await?;
        wait_for(
            "/healthz to say stalled",
            Duration::from_secs(30),
            || async {
                let (ok, text) = healthz(&metrics)?;
                Ok(!ok && text.contains("stalled: 1 record(s) unacknowledged"))
            },
        )
        .await
    }
    .await;
    pg_outbox_tests::signal(broker.pid(), "CONT")?;
    frozen?;
    wait_for(
        "/healthz to say ok again",
        Duration::from_secs(60),
        || async { Ok(healthz(&metrics)?.0) },
    )
    .await?;
    let records = read_all(
        &broker.bootstrap(),
        &[("orders", 1)],
        2,
        Duration::from_secs(60),
    )?;
    assert_eq!(records.len(), 2);
    // a client that sends no request is let go, and others are served meanwhile
    let mut idle = std::net::TcpStream::connect(&metrics)?;
    idle.set_read_timeout(Some(Duration::from_secs(30)))?;
    assert!(healthz(&metrics)?.0);
    let mut rest = Vec::new();
    let n = idle.read_to_end(&mut rest)?;
    assert_eq!(n, 0, "closed without an answer");
    Ok(())
}

/// A record the broker itself refuses for good (Tansu's schema registry answers `INVALID_RECORD`),
/// in the middle of a backlog published with many records in flight, while later records are
/// acknowledged: it is dead-lettered with the broker's reason, so no position below the next
/// session's floor is neither in Kafka nor in `outbox.dead_letters`. A restarted relay publishes
/// what comes next and repeats nothing.
#[tokio::test]
async fn a_record_the_broker_refuses_mid_stream_is_dead_lettered_and_leaves_no_hole() -> Result<()>
{
    let registry = std::env::temp_dir().join(format!("pg_outbox-schemas-{}", free_port()));
    std::fs::create_dir_all(&registry)?;
    std::fs::write(
        registry.join("checked.json"),
        r#"{"type": "object", "properties": {"value": {"type": "object",
            "properties": {"n": {"type": "integer"}}, "required": ["n"]}}}"#,
    )?;
    let broker = Broker::start_with_schemas(&registry)?;
    broker.create_topic("checked", 2).await?;
    let db = TestDb::create("po_refused", port()).await?;
    db.create_slot().await?;
    let c = &db.client;
    // a backlog the relay sends in one go: 4 transactions of 500, event 1,000 does not conform
    const EVENTS: i64 = 2000;
    for t in 0..4 {
        let (keys, mut payloads) = pg_outbox_tests::numbered_batch(t, 500, 10);
        if t == 2 {
            payloads[0] = r#"{"m": 1000}"#.to_string();
        }
        c.execute(
            "SELECT outbox.enqueue_batch('checked', $1, $2::text[]::jsonb[])",
            &[&keys, &payloads],
        )
        .await?;
    }
    let end = db.current_wal_lsn().await?;
    let mut relay = Relay::start(db.port, &db.name, &broker.bootstrap(), &[])?;
    let records = read_all(
        &broker.bootstrap(),
        &[("checked", 2)],
        EVENTS as usize - 1,
        Duration::from_secs(120),
    )?;
    let ns: std::collections::BTreeSet<i64> = records
        .iter()
        .map(|r| pg_outbox_tests::payload_n(&r.payload))
        .collect();
    assert_eq!(records.len(), ns.len(), "no event twice");
    assert_eq!(
        ns,
        (0..EVENTS).filter(|n| *n != 1000).collect(),
        "every conforming event"
    );
    assert_eq!(pg_outbox_tests::record_order_violations(&records), 0);
    wait_for("the slot to advance", Duration::from_secs(30), || async {
        db.confirmed_at_least(&end).await
    })
    .await?;
    let rows = c
        .query(
            "SELECT topic, key, convert_from(payload, 'UTF8'), reason FROM outbox.dead_letters",
            &[],
        )
        .await?;
    assert_eq!(rows.len(), 1, "one dead letter");
    let (topic, key, payload, reason): (String, String, String, String) = (
        rows[0].get(0),
        rows[0].get(1),
        rows[0].get(2),
        rows[0].get(3),
    );
    assert_eq!((topic.as_str(), key.as_str()), ("checked", "k0"));
    assert!(payload.contains("1000"), "the refused event's payload");
    assert!(reason.contains("broker refused the record"), "{reason}");
    assert!(reason.contains("InvalidRecord"), "{reason}");
    // the next session starts above the refused record and loses nothing after it
    relay.terminate(Duration::from_secs(30))?;
    let (keys, payloads) = pg_outbox_tests::numbered_batch(4, 500, 10);
    c.execute(
        "SELECT outbox.enqueue_batch('checked', $1, $2::text[]::jsonb[])",
        &[&keys, &payloads],
    )
    .await?;
    let _relay = Relay::start(db.port, &db.name, &broker.bootstrap(), &[])?;
    let records = read_all(
        &broker.bootstrap(),
        &[("checked", 2)],
        EVENTS as usize - 1 + 500,
        Duration::from_secs(120),
    )?;
    let again: std::collections::BTreeSet<i64> = records
        .iter()
        .map(|r| pg_outbox_tests::payload_n(&r.payload))
        .collect();
    assert_eq!(records.len(), again.len(), "no event twice");
    assert_eq!(again.len(), EVENTS as usize - 1 + 500);
    assert_eq!(pg_outbox_tests::record_order_violations(&records), 0);
    let letters: i64 = c
        .query_one("SELECT count(*) FROM outbox.dead_letters", &[])
        .await?
        .get(0);
    assert_eq!(
        letters, 1,
        "the refused event is not retried nor lost again"
    );
    let _ = std::fs::remove_dir_all(&registry);
    Ok(())
}

/// One limit (issue: an event of 1,040,000 bytes was accepted by enqueue and dead-lettered by the
/// relay): with every default, the largest event that enqueue accepts (payload, key, headers and
/// trace context adding up to `pg_outbox.max_payload_bytes`) is published, and one byte more is
/// refused at enqueue with 54000.
#[tokio::test]
async fn the_largest_event_enqueue_accepts_is_published_with_the_defaults() -> Result<()> {
    let s = Scenario::builder("po_one_limit")
        .topic("orders", 1)
        .start()
        .await?;
    let (db, c) = (&s.db, &s.db.client);
    // the default of pg_outbox.max_payload_bytes, in either edition
    let max = pg_outbox_envelope::DEFAULT_MAX_EVENT_BYTES;
    let trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let key = "order-1";
    let header = ("h", "v".repeat(100));
    // payload bytes so that the event is exactly the limit: "traceparent" + trace, key, header
    let fixed = "traceparent".len() + trace.len() + key.len() + header.0.len() + header.1.len();
    let payload = |len: usize| format!("\"{}\"", "x".repeat(len - 2));
    let headers = format!(r#"{{"{}": "{}"}}"#, header.0, header.1);
    db.create_slot().await?;
    c.batch_execute(&format!("SET pg_outbox.trace_context = '{trace}'"))
        .await?;
    let too_big = payload(max - fixed + 1);
    let err = c
        .execute(
            "SELECT outbox.enqueue('orders', $1, $2::text::jsonb, $3::text::jsonb)",
            &[&key, &too_big, &headers],
        )
        .await
        .expect_err("one byte over the limit");
    assert_eq!(pg_outbox_tests::sqlstate(&err), "54000");
    let largest = payload(max - fixed);
    c.execute(
        "SELECT outbox.enqueue('orders', $1, $2::text::jsonb, $3::text::jsonb)",
        &[&key, &largest, &headers],
    )
    .await?;
    c.execute("SELECT outbox.enqueue('orders', 'after', '{}')", &[])
        .await?;
    let _relay = s.relay().start()?;
    let records = s.read_within(2, Duration::from_secs(60))?;
    assert_eq!(records.len(), 2);
    assert_eq!(
        records[0].payload,
        largest.as_bytes(),
        "the largest event, whole"
    );
    let dead: i64 = c
        .query_one("SELECT count(*) FROM outbox.dead_letters", &[])
        .await?
        .get(0);
    assert_eq!(dead, 0, "nothing dead-lettered");
    Ok(())
}

/// Writers choose their events' topics; `allowed_topics` limits where this source publishes. An
/// event for a topic outside the list is dead-lettered with the reason (even when the topic exists),
/// and the rest flows.
#[tokio::test]
async fn an_event_for_a_topic_outside_allowed_topics_is_dead_lettered() -> Result<()> {
    let s = Scenario::builder("po_allowed_topics")
        .topic("orders", 1)
        .topic("billing.invoices", 1)
        .topic("secrets", 1)
        .start()
        .await?;
    let (db, broker) = (&s.db, &s.broker);
    db.create_slot().await?;
    db.client
        .batch_execute(
            "SELECT outbox.enqueue('orders', 'k', '{\"n\": 1}'); \
             SELECT outbox.enqueue('secrets', 'k', '{\"n\": 2}'); \
             SELECT outbox.enqueue('billing.invoices', 'k', '{\"n\": 3}'); \
             SELECT outbox.enqueue('orders', 'k', '{\"n\": 4}')",
        )
        .await?;
    let _relay = s
        .relay()
        .args(&["--allowed-topics", "orders,billing.*"])
        .start()?;
    let records = read_all(
        &broker.bootstrap(),
        &[("orders", 1), ("billing.invoices", 1)],
        3,
        Duration::from_secs(60),
    )?;
    assert_eq!(records.len(), 3);
    let c = &db.client;
    wait_for("the dead letter", Duration::from_secs(30), || async {
        let n: i64 = c
            .query_one("SELECT count(*) FROM outbox.dead_letters", &[])
            .await?
            .get(0);
        Ok(n == 1)
    })
    .await?;
    let (topic, reason): (String, String) = {
        let row = c
            .query_one("SELECT topic, reason FROM outbox.dead_letters", &[])
            .await?;
        (row.get(0), row.get(1))
    };
    assert_eq!(topic, "secrets");
    assert!(reason.contains("allowed_topics"), "{reason}");
    let secrets = read_all(
        &broker.bootstrap(),
        &[("secrets", 1)],
        0,
        Duration::from_secs(2),
    )?;
    assert!(
        secrets.is_empty(),
        "nothing reached the topic outside the list"
    );
    Ok(())
}
