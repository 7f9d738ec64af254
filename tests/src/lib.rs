//! Fixtures shared by the integration tests, one module per thing they start:
//! - [`postgres`]: connections to the test clusters and a database of its own per test;
//! - [`broker`]: a Tansu broker per test, and reading back what reached Kafka;
//! - [`relay`]: the relay as a child process, and its `/metrics`.

pub mod broker;
pub mod postgres;
pub mod relay;

pub use broker::{read_all, read_all_with, with_raw_header, Broker, Record};
pub use postgres::{
    backend_pid, connect, connect_as, conninfo, edition, expect_error, install_sql_edition,
    peek_wal_events, peek_wal_messages, pgoutput_message, port, replica_port, resilient_writer,
    restart_cluster, setup, sqlstate, tls_dir, wait_for_lock_wait, Edition, OwnedEvent, TestDb,
    SQL_EDITION, SQL_EDITION_OWNER,
};
pub use relay::{
    healthz, metric, relay_bin, relay_command, scrape_metrics, wait_for_metric, Relay,
};

use anyhow::{bail, Result};
use std::net::TcpListener;
use std::process::Command;

/// Waits until `check` returns true, polling every 100 ms, or fails after `timeout`.
pub async fn wait_for<F, Fut>(what: &str, timeout: std::time::Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if check().await? {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Sends a signal to a process (kill -9, SIGSTOP, SIGCONT, SIGTERM).
pub fn signal(pid: u32, sig: &str) -> Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()?;
    if !status.success() {
        bail!("kill -{sig} {pid} failed");
    }
    Ok(())
}

/// Per key, how often an event's n is not above the previous one's (in Kafka's order).
pub fn order_violations(entries: impl Iterator<Item = (String, i64)>) -> usize {
    let mut last: std::collections::HashMap<String, i64> = std::collections::HashMap::new();
    let mut violations = 0;
    for (key, n) in entries {
        if let Some(prev) = last.insert(key, n) {
            if n <= prev {
                violations += 1;
            }
        }
    }
    violations
}

/// The events of writer transaction `t` with `batch` events each: event `n = t * batch + i` has
/// the key `k{n % keys}` and the payload `{"n": n}` (keys and JSON payloads, as
/// [`resilient_writer`] takes them).
pub fn numbered_batch(t: i64, batch: i64, keys: i64) -> (Vec<String>, Vec<String>) {
    let ns = t * batch..(t + 1) * batch;
    (
        ns.clone().map(|n| format!("k{}", n % keys)).collect(),
        ns.map(|n| format!(r#"{{"n": {n}}}"#)).collect(),
    )
}

/// The `n` of a [`numbered_batch`] event's payload (`{"n": n}`), or -1 for anything else.
pub fn payload_n(payload: &[u8]) -> i64 {
    serde_json::from_slice::<serde_json::Value>(payload)
        .ok()
        .and_then(|v| v["n"].as_i64())
        .unwrap_or(-1)
}

/// [`order_violations`] of [`numbered_batch`] records in Kafka's order, per key.
pub fn record_order_violations(records: &[Record]) -> usize {
    order_violations(records.iter().map(|r| {
        (
            String::from_utf8_lossy(r.key.as_deref().unwrap_or_default()).to_string(),
            payload_n(&r.payload),
        )
    }))
}
