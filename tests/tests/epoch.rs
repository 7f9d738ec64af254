//! The seal binds the full 64-bit transaction id (docs/sql-api.md, "Roles"; issue: a captured
//! sealed message replays after an xid wraparound, which a role with no grants can drive).
//!
//! A throwaway cluster is moved to transaction-id epoch 1 with `pg_resetwal -e 1`, as if 2^32
//! transactions had gone by. There a message sealed for the same 32-bit xid in epoch 0 (what a
//! captured message replayed after a wraparound is) must not be published, while the events that
//! enqueue writes in epoch 1 are, in both editions: the relay widens pgoutput's 32-bit xid to the
//! full id the writer sealed with.

use anyhow::{ensure, Context, Result};
use pg_outbox_envelope::Event;
use pg_outbox_tests::{
    free_port, metric, pgcluster, port, read_all, scrape_metrics, wait_for_metric, Broker, Edition,
    Relay, TestDb,
};
use std::process::Command;
use std::time::Duration;

/// `pg_resetwal -e epoch` on the stopped cluster in `dir`, as its owner.
fn set_epoch(dir: &str, epoch: u32) -> Result<()> {
    let bin = pg_outbox_tests::pgbin().display().to_string();
    let resetwal = format!("{bin}/pg_resetwal");
    let mut cmd = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", &resetwal]);
        c
    } else {
        Command::new(&resetwal)
    };
    let lib = format!("{bin}/../lib");
    if std::path::Path::new(&lib).join("libpq.so.5").exists() {
        cmd.env("LD_LIBRARY_PATH", &lib);
    }
    let out = cmd.args(["-e", &epoch.to_string(), dir]).output()?;
    ensure!(
        out.status.success(),
        "pg_resetwal: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

#[tokio::test]
async fn a_message_sealed_for_the_same_xid_in_another_epoch_is_never_published() -> Result<()> {
    let cluster_port = port() + 7;
    let dir = std::env::temp_dir().join(format!("pg_outbox-epoch-{}", std::process::id()));
    let dir = dir.to_str().context("path")?.to_string();
    // stopped and removed however the test ends (an assertion panics)
    struct Cluster(String);
    impl Drop for Cluster {
        fn drop(&mut self) {
            let _ = pgcluster(&["stop", &self.0]);
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let cluster = Cluster(dir);
    pgcluster(&["start", &cluster.0, &cluster_port.to_string(), "logical"])?;
    pgcluster(&["stop", &cluster.0])?;
    set_epoch(&cluster.0, 1)?;
    pgcluster(&["start", &cluster.0, &cluster_port.to_string(), "logical"])?;
    let mut published = 0;
    for edition in [Edition::Extension, Edition::Sql] {
        published += run(cluster_port, edition).await?;
    }
    assert_eq!(published, 6);
    Ok(())
}

/// Three real events around one replayed message; returns how many records reached Kafka.
async fn run(cluster_port: u16, edition: Edition) -> Result<usize> {
    let name = match edition {
        Edition::Extension => "ep_extension",
        Edition::Sql => "ep_sql_edition",
    };
    let db = TestDb::create_with(name, cluster_port, edition).await?;
    let c = &db.client;
    let epoch: i64 = c
        .query_one("SELECT pg_current_xact_id()::text::bigint >> 32", &[])
        .await?
        .get(0);
    assert_eq!(epoch, 1, "the cluster runs in epoch 1");
    db.create_slot().await?;
    let broker = Broker::start()?;
    broker.create_topic("orders", 1).await?;
    c.batch_execute("SELECT outbox.enqueue('orders', 'k', '{\"n\": 1}')")
        .await?;
    // a sealed message for this transaction's 32-bit xid, in epoch 0: the bytes a capture of
    // epoch 0 would hold for the transaction that had this xid then
    let key: Vec<u8> = c
        .query_one("SELECT key FROM outbox.auth_key", &[])
        .await?
        .get(0);
    c.batch_execute("BEGIN").await?;
    let full: i64 = c
        .query_one("SELECT pg_current_xact_id()::text::bigint", &[])
        .await?
        .get(0);
    let event = Event {
        id: *uuid::Uuid::now_v7().as_bytes(),
        created_at_micros: 0,
        topic: "orders",
        key: Some("k"),
        headers: vec![],
        trace_context: None,
        payload_is_json: true,
        payload: br#"{"n": "replayed"}"#,
    };
    let mut message = event.encode()?;
    pg_outbox_envelope::seal(
        &mut message,
        0,
        pg_outbox_envelope::FIRST_KEY_ID,
        &key,
        full as u64 & 0xffff_ffff,
    );
    c.execute(
        "SELECT pg_logical_emit_message(true, 'pg_outbox', $1::bytea)",
        &[&message],
    )
    .await?;
    c.batch_execute("COMMIT").await?;
    c.batch_execute(
        "SELECT outbox.enqueue('orders', 'k', '{\"n\": 2}'); \
         SELECT outbox.enqueue('orders', 'k', '{\"n\": 3}')",
    )
    .await?;
    let metrics = format!("127.0.0.1:{}", free_port());
    let _relay = Relay::start(
        db.port,
        &db.name,
        &broker.bootstrap(),
        &["--metrics-addr", &metrics],
    )?;
    let records = read_all(
        &broker.bootstrap(),
        &[("orders", 1)],
        3,
        Duration::from_secs(60),
    )?;
    let payloads: Vec<String> = records
        .iter()
        .map(|r| String::from_utf8_lossy(&r.payload).into_owned())
        .collect();
    assert_eq!(
        payloads,
        vec![r#"{"n": 1}"#, r#"{"n": 2}"#, r#"{"n": 3}"#],
        "{edition:?}: the real events, in epoch 1, and not the replay"
    );
    // the replay is passed over and counted, as every message that does not verify
    wait_for_metric(
        &metrics,
        "pg_outbox_relay_unproven_messages_total",
        1.0,
        Duration::from_secs(30),
    )
    .await?;
    let text = scrape_metrics(&metrics)?;
    assert_eq!(
        metric(&text, "pg_outbox_relay_unproven_messages_total"),
        Some(1.0),
        "{edition:?}: exactly the replay"
    );
    Ok(records.len())
}
