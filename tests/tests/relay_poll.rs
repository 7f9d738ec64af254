//! The poll source (table mode): it publishes exactly the committed rows, also of a transaction
//! still open while it polls, and removes them; a busy poll relay spares writers the NOTIFY, and an
//! idle one is woken by it.

use anyhow::Result;
use pg_outbox_tests::{assert_exactly_once_in_order, enqueue, outbox_rows, wait_for, Scenario};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::Client;
use uuid::Uuid;

#[tokio::test]
async fn table_mode_publishes_exactly_the_committed_rows_and_removes_them() -> Result<()> {
    let s = Scenario::builder("rl_table_commit")
        .table_mode()
        .topic("orders", 3)
        .start()
        .await?;
    let (db, c) = (&s.db, &s.db.client);
    // events written before the relay starts are published too
    let early = enqueue(c, "orders", "alice", r#"{"n": 1}"#).await?;
    let mut relay = s.relay().args(&["--source", "poll"]).start()?;
    let mut expected = vec![early];
    c.batch_execute("BEGIN").await?;
    expected.push(enqueue(c, "orders", "alice", r#"{"n": 2}"#).await?);
    expected.push(enqueue(c, "orders", "bob", r#"{"n": 1}"#).await?);
    c.batch_execute("COMMIT; BEGIN").await?;
    enqueue(c, "orders", "ghost", r#"{"n": 1}"#).await?;
    c.batch_execute("ROLLBACK; BEGIN").await?;
    expected.push(enqueue(c, "orders", "bob", r#"{"n": 2}"#).await?);
    c.batch_execute("SAVEPOINT s").await?;
    enqueue(c, "orders", "ghost", r#"{"n": 1}"#).await?;
    c.batch_execute("ROLLBACK TO SAVEPOINT s").await?;
    // a transaction still open while the relay polls: not skipped, published once it commits
    let open = db.session().await?;
    open.batch_execute("BEGIN").await?;
    let late = enqueue(&open, "orders", "carol", r#"{"n": 1}"#).await?;
    c.batch_execute("COMMIT").await?;
    // the relay polls past the open transaction: it publishes and removes every committed row
    // (the open one's row is invisible here) while that transaction is still in flight
    wait_for(
        "the committed rows to be published and removed",
        Duration::from_secs(30),
        || async { Ok(outbox_rows(c).await? == 0) },
    )
    .await?;
    open.batch_execute("COMMIT").await?;
    expected.push(late);

    let records = s.read(expected.len())?;
    assert_exactly_once_in_order(&records, expected.len())?;
    let mut got: Vec<Uuid> = records
        .iter()
        .map(|r| Uuid::parse_str(&r.id()).unwrap())
        .collect();
    got.sort();
    expected.sort();
    assert_eq!(got, expected);
    wait_for(
        "published rows to be deleted",
        Duration::from_secs(30),
        || async { Ok(outbox_rows(c).await? == 0) },
    )
    .await?;
    let status = relay.terminate(Duration::from_secs(30))?;
    assert!(status.success(), "exit status {status}");
    Ok(())
}

/// The channel of the test's own NOTIFY, sent after the writers' (see [`count_notifications`]).
const MARKER: &str = "pg_outbox_tests_marker";

/// Counts the NOTIFYs on `channel` from now on, on a connection of its own; and apart, those on
/// [`MARKER`]. PostgreSQL delivers notifications in commit order, so once the listener counted a
/// marker sent after some writers committed, it has counted theirs too.
async fn count_notifications(
    port: u16,
    db: &str,
    channel: &str,
) -> Result<(Client, Arc<AtomicUsize>, Arc<AtomicUsize>)> {
    use futures_util::StreamExt;
    let (client, mut connection) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} user=postgres dbname={db}"),
        tokio_postgres::NoTls,
    )
    .await?;
    let (count, markers) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (seen, seen_markers) = (count.clone(), markers.clone());
    let channel_name = channel.to_string();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = message {
                if n.channel() == channel_name {
                    seen.fetch_add(1, Ordering::Relaxed);
                } else if n.channel() == MARKER {
                    seen_markers.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN {channel}; LISTEN {MARKER}"))
        .await?;
    Ok((client, count, markers))
}

/// A NOTIFY holds a database-wide lock through the commit's WAL flush, so table-mode writers leave
/// it out while the poll source is busy (it polls anyway), and an idle poll source is still woken
/// at once. The poll interval is a minute here: only a NOTIFY can wake the idle relay in time.
#[tokio::test]
async fn a_busy_poll_relay_spares_writers_the_notify_and_an_idle_one_is_woken_by_it() -> Result<()>
{
    let s = Scenario::builder("rl_table_notify")
        .table_mode()
        .topic("orders", 1)
        .start()
        .await?;
    let (db, c) = (&s.db, &s.db.client);
    let _relay = s
        .relay()
        .args(&["--source", "poll", "--poll-interval-ms", "60000"])
        .start()?;
    let idle = || async {
        let idle: Option<bool> = c
            .query_opt("SELECT idle FROM outbox.poller", &[])
            .await?
            .map(|r| r.get(0));
        Ok::<_, anyhow::Error>(idle)
    };
    // the first event also makes the relay read the topic back (the restart dedup)
    enqueue(c, "orders", "k", r#"{"n": 0}"#).await?;
    s.read_within(1, Duration::from_secs(30))?;
    wait_for(
        "the poller to say idle",
        Duration::from_secs(30),
        || async { Ok(idle().await? == Some(true)) },
    )
    .await?;
    let (_listener, notifications, markers) =
        count_notifications(db.port, &db.name, "pg_outbox_events").await?;
    // a steady stream: after the first event wakes the relay, writers stop notifying
    for n in 1..=200 {
        enqueue(c, "orders", "k", &format!(r#"{{"n": {n}}}"#)).await?;
        // pacing, not a wait: a steady stream rather than one burst
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    s.read_within(201, Duration::from_secs(30))?;
    // read_all blocked this (one-threaded) runtime: wait until the listener has counted every
    // writer's NOTIFY, which it has once it sees the marker sent after them
    c.batch_execute(&format!("NOTIFY {MARKER}")).await?;
    wait_for(
        "the listener to catch up with the writers' NOTIFYs",
        Duration::from_secs(10),
        || async { Ok(markers.load(Ordering::Relaxed) >= 1) },
    )
    .await?;
    let notified = notifications.load(Ordering::Relaxed);
    println!("writers that notified: {notified} of 200");
    assert!(notified >= 1, "the first event woke the relay");
    assert!(
        notified <= 10,
        "{notified} of 200 writers notified while the relay was busy"
    );
    // the stream stops: the relay says it is idle again, and the next event wakes it
    wait_for(
        "the poller to say idle again",
        Duration::from_secs(30),
        || async { Ok(idle().await? == Some(true)) },
    )
    .await?;
    enqueue(c, "orders", "k", r#"{"n": 201}"#).await?;
    let records = s.read_within(202, Duration::from_secs(30))?;
    assert_eq!(records.len(), 202, "woken well before the minute's poll");
    wait_for("the writer's NOTIFY", Duration::from_secs(10), || async {
        Ok(notifications.load(Ordering::Relaxed) > notified)
    })
    .await?;
    Ok(())
}
