//! What `pg-outbox-relay check` and a relay that cannot start say: a missing publication is a
//! clear permanent error, events waiting in a mode no relay serves are reported, and a poll relay
//! needs no logical decoding.

use anyhow::Result;
use pg_outbox_tests::{replica_port, Scenario};
use std::time::Duration;

#[tokio::test]
async fn missing_publication_is_a_clear_permanent_error() -> Result<()> {
    let s = Scenario::builder("rl_nopub").start().await?;
    s.db.client
        .batch_execute("SELECT pg_create_logical_replication_slot('rl_nopub', 'pgoutput')")
        .await?;
    let mut relay = s.relay().args(&["--create-slot", "false"]).start()?;
    // the relay must stop on a permanent error
    let status = relay.wait_for_exit(Duration::from_secs(30)).await?;
    assert_eq!(status.code(), Some(3), "an operator must act: {status}");
    let log = relay.log_text();
    assert!(
        log.contains("publication \\\"rl_nopub\\\" does not exist")
            || log.contains("publication \"rl_nopub\" does not exist"),
        "{log}"
    );
    // `check` says what to fix
    let (ok, text) = s.relay_command("check", &["--create-slot", "false"])?;
    assert!(!ok, "{text}");
    assert!(
        text.contains("FAIL  publication rl_nopub: missing"),
        "{text}"
    );
    assert!(text.contains("ok    kafka"), "{text}");
    Ok(())
}

#[tokio::test]
async fn check_shows_events_waiting_in_a_mode_no_relay_serves() -> Result<()> {
    let s = Scenario::builder("rl_unserved").start().await?;
    s.db.create_slot().await?;
    let check = |args: &[&str]| s.relay_command("check", args);
    let (ok, text) = check(&[])?;
    assert!(ok, "{text}");
    assert!(
        text.contains("ok    no events wait where this relay does not read"),
        "{text}"
    );
    // a writer switched to table mode while only a wal relay runs
    s.db.client
        .batch_execute("SET pg_outbox.mode = 'table'; SELECT outbox.enqueue('orders', 'k', '{}')")
        .await?;
    let (ok, text) = check(&[])?;
    assert!(!ok, "{text}");
    assert!(
        text.contains("FAIL  1 event(s) wait in outbox.events (table mode)"),
        "{text}"
    );
    assert!(text.contains("source = poll"), "{text}");
    // the reverse: a poll relay, and a pg_outbox slot that nobody streams
    let (ok, text) = check(&["--source", "poll"])?;
    assert!(!ok, "{text}");
    assert!(
        text.contains("hold wal-mode events and nobody streams them"),
        "{text}"
    );
    Ok(())
}

#[tokio::test]
async fn check_for_a_poll_relay_needs_no_logical_decoding() -> Result<()> {
    // table mode on a server without wal_level = logical (a managed service without logical
    // replication): nothing about slots, publications or REPLICATION applies
    let s = Scenario::builder("rl_poll_check")
        .port(replica_port())
        .start()
        .await?;
    let (ok, text) = s.relay_command("check", &["--source", "poll"])?;
    assert!(ok, "{text}");
    assert!(
        !text.contains("wal_level") && !text.contains("publication"),
        "{text}"
    );
    assert!(text.contains("ok    role postgres: superuser"), "{text}");
    Ok(())
}
