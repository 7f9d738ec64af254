//! Fixtures shared by the integration tests, one module per thing they start or check:
//! - [`scenario`]: a test's database, broker, topics and relays in one value;
//! - [`postgres`]: connections to the test clusters and a database of its own per test;
//! - [`broker`]: a Tansu broker per test, and reading back what reached Kafka;
//! - [`relay`]: the relay as a child process, and its `/metrics`;
//! - [`outbox`]: enqueueing events as an application does;
//! - [`delivery`]: what reached Kafka, judged (exactly once, per-key order).

pub mod broker;
pub mod delivery;
pub mod outbox;
pub mod postgres;
pub mod relay;
pub mod scenario;

pub use broker::{read_all, read_all_with, with_raw_header, Broker, Record};
pub use delivery::{
    assert_exactly_once_in_order, numbered_batch, order_violations, payload_n,
    record_order_violations,
};
pub use outbox::{
    enqueue, enqueue_numbered, enqueue_with_headers, numbered, outbox_drained, outbox_rows,
};
pub use postgres::{
    backend_pid, connect, connect_as, conninfo, edition, expect_error, install_sql_edition,
    one_key_writer, peek_wal_events, peek_wal_messages, pgbin, pgcluster, pgoutput_message, port,
    replica_port, resilient_writer, restart_cluster, setup, sqlstate, tls_dir, wait_for_lock_wait,
    written_at_least, Edition, OwnedEvent, TestDb, SQL_EDITION, SQL_EDITION_OWNER,
};
pub use relay::{
    healthz, metric, metric_with, relay_bin, relay_command, samples, scrape_metrics,
    wait_for_metric, wait_for_metric_with, Relay, Sample,
};
pub use scenario::{RelayBuilder, Scenario, ScenarioBuilder, READ_TIMEOUT};

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

/// Lets `period` pass while `holds` stays true, checking every 100 ms; fails at once, naming
/// `what`, when it turns false. For a test whose point is that nothing happens for a while (a
/// process paused longer than a timeout): the time passing is the fault, not a wait for something.
pub async fn hold_for<F, Fut>(what: &str, period: std::time::Duration, mut holds: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let end = std::time::Instant::now() + period;
    loop {
        if !holds().await? {
            bail!("{what} stopped holding before {period:?} passed");
        }
        if std::time::Instant::now() >= end {
            return Ok(());
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
