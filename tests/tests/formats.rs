//! Record formats a consumer already understands (`record_format`): CloudEvents 1.0 in Kafka binary
//! content mode, read back by an independent reader (the CloudEvents SDK for Python's Kafka
//! binding, tests/tools/cloudevents_read.py). Real PostgreSQL and the real broker.

use anyhow::{ensure, Context, Result};
use pg_outbox_tests::{Record, Scenario};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const TIMEOUT: Duration = Duration::from_secs(60);

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The CloudEvents SDK's reading of each record: its attributes and data, as JSON.
fn read_as_cloudevents(records: &[Record]) -> Result<Vec<serde_json::Value>> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tools/cloudevents_read.py");
    let mut child = Command::new("python3")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("python3 (scripts/setup.sh installs the cloudevents package)")?;
    {
        let mut stdin = child.stdin.take().expect("piped");
        for r in records {
            let line = serde_json::json!({
                "headers": r.headers.iter().map(|(n, v)| (n.clone(), hex(v))).collect::<Vec<_>>(),
                "key": r.key.as_deref().map(hex),
                "value": hex(&r.payload),
            });
            writeln!(stdin, "{line}")?;
        }
    }
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "the CloudEvents reader refused the records: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)?
        .lines()
        .map(|l| Ok(serde_json::from_str(l)?))
        .collect()
}

#[tokio::test]
async fn cloudevents_records_are_read_by_the_cloudevents_sdk() -> Result<()> {
    let s = Scenario::builder("fm_cloudevents")
        .topic("orders", 1)
        .start()
        .await?;
    let _relay = s
        .relay()
        .args(&["--record-format", "cloudevents"])
        .running()
        .await?;
    let c = &s.db.client;
    let json: uuid::Uuid = c
        .query_one(
            r#"SELECT outbox.enqueue('orders', 'alice', '{"n": 1}', '{"tenant": "acme"}')"#,
            &[],
        )
        .await?
        .get(0);
    let bytes: uuid::Uuid = c
        .query_one(
            r#"SELECT outbox.enqueue_bytes('orders', 'bob', '\x00ff'::bytea)"#,
            &[],
        )
        .await?
        .get(0);
    // the event's own type and content type win
    let typed: uuid::Uuid = c
        .query_one(
            r#"SELECT outbox.enqueue('orders', 'carol', '{"n": 3}', '{"ce_type": "com.example.order.created", "content-type": "application/vnd.example+json"}')"#,
            &[],
        )
        .await?
        .get(0);
    let records = pg_outbox_tests::read_all(&s.broker.bootstrap(), &[("orders", 1)], 3, TIMEOUT)?;
    assert_eq!(records.len(), 3);
    let events = read_as_cloudevents(&records)?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs_f64();
    let source = records[0].header("pg_outbox-source").unwrap().to_string();
    for ((event, record), (id, kind, content_type, data)) in events.iter().zip(&records).zip([
        (json, "orders", "application/json", &br#"{"n": 1}"#[..]),
        (
            bytes,
            "orders",
            "application/octet-stream",
            &[0x00, 0xff][..],
        ),
        (
            typed,
            "com.example.order.created",
            "application/vnd.example+json",
            &br#"{"n": 3}"#[..],
        ),
    ]) {
        assert_eq!(event["specversion"], "1.0", "{event}");
        assert_eq!(event["id"], id.to_string(), "{event}");
        assert_eq!(event["source"], source.as_str(), "{event}");
        assert_eq!(event["type"], kind, "{event}");
        assert_eq!(event["datacontenttype"], content_type, "{event}");
        assert_eq!(event["data_hex"], hex(data), "{event}");
        let time = event["time_unix"].as_f64().unwrap();
        assert!((now - 120.0..=now + 1.0).contains(&time), "{event}");
        // the event's own headers stay, once; the relay's own are there for its restart dedup
        assert_eq!(
            record
                .headers
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case("content-type"))
                .count(),
            1
        );
        assert_eq!(
            record
                .headers
                .iter()
                .filter(|(n, _)| n == "ce_type")
                .count(),
            1
        );
        assert!(record.header("pg_outbox-mac").is_some());
    }
    assert_eq!(records[0].header("tenant"), Some("acme"));
    assert_eq!(events[0]["partitionkey"], "alice");
    Ok(())
}

/// Debezium's outbox event router with its defaults: the event id in the header `id`, the key as
/// the record key, the payload as the value; the event's own `eventType` header as
/// `table.fields.additional.placement = type:header:eventType` would put it.
#[tokio::test]
async fn debezium_records_follow_the_outbox_event_routers_conventions() -> Result<()> {
    let s = Scenario::builder("fm_debezium")
        .topic("outbox.event.order", 1)
        .start()
        .await?;
    let _relay = s
        .relay()
        .args(&["--record-format", "debezium"])
        .running()
        .await?;
    let id: uuid::Uuid = s
        .db
        .client
        .query_one(
            r#"SELECT outbox.enqueue('outbox.event.order', '1', '{"id": 1, "customerId": 123}', '{"eventType": "OrderCreated"}')"#,
            &[],
        )
        .await?
        .get(0);
    let records = pg_outbox_tests::read_all(
        &s.broker.bootstrap(),
        &[("outbox.event.order", 1)],
        1,
        TIMEOUT,
    )?;
    assert_eq!(records.len(), 1);
    let r = &records[0];
    assert_eq!(r.header("id"), Some(id.to_string().as_str()));
    assert_eq!(r.key.as_deref(), Some(&b"1"[..]));
    let value: serde_json::Value = serde_json::from_slice(&r.payload)?;
    assert_eq!(value, serde_json::json!({"id": 1, "customerId": 123}));
    assert_eq!(r.header("eventType"), Some("OrderCreated"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert!(r.header("ce_id").is_none());
    Ok(())
}
