//! The monitoring views (docs/operations.md, "The same numbers in SQL"): what the relay's metrics
//! say, queryable in SQL by a login that has only `outbox_monitor`, and nothing else that login can
//! read. Both editions.

use anyhow::Result;
use pg_outbox_tests::{expect_error, read_all, sqlstate, wait_for, Scenario};
use std::time::Duration;

#[tokio::test]
async fn a_monitoring_login_sees_lag_dead_letters_backlog_and_the_inbox_but_no_event() -> Result<()>
{
    let s = Scenario::builder("ob_views")
        .topic("orders", 1)
        .start()
        .await?;
    let (db, broker) = (&s.db, &s.broker);
    let _relay = s
        .relay()
        .args(&["--poison-retry-ms", "500"])
        .running()
        .await?;
    let c = &db.client;
    for n in 1..=3 {
        c.execute(
            "SELECT outbox.enqueue('orders', 'k', $1::text::jsonb)",
            &[&format!(r#"{{"n": {n}}}"#)],
        )
        .await?;
    }
    c.execute("SELECT outbox.enqueue('ob_missing', 'k', '{}')", &[])
        .await?;
    read_all(
        &broker.bootstrap(),
        &[("orders", 1)],
        3,
        Duration::from_secs(60),
    )?;
    wait_for("the dead letter", Duration::from_secs(60), || async {
        Ok(c.query_one("SELECT count(*) FROM outbox.dead_letters", &[])
            .await?
            .get::<_, i64>(0)
            == 1)
    })
    .await?;
    // the ingest's bookkeeping, as the consumer's own transaction would write it
    c.execute("SELECT inbox.store_offset('billing', 'orders', 0, 7)", &[])
        .await?;
    c.execute(
        "SELECT inbox.deliver('billing', 'm1', 'orders', 0, 6, 'k', '\\x7b7d'::bytea)",
        &[],
    )
    .await?;

    c.batch_execute(
        "DROP ROLE IF EXISTS ob_monitor; CREATE ROLE ob_monitor LOGIN IN ROLE outbox_monitor",
    )
    .await?;
    let m = db.session_as("ob_monitor").await?;

    let source = m
        .query_one(
            "SELECT kind, slot_exists, relay_active, relay_pid IS NOT NULL, lag_bytes, \
                    retained_wal_bytes, stopped, gaps \
               FROM outbox.source_status",
            &[],
        )
        .await?;
    assert_eq!(source.get::<_, String>(0), "wal");
    assert_eq!(
        source.get::<_, Option<bool>>(1),
        Some(true),
        "the slot exists"
    );
    assert!(source.get::<_, bool>(2), "a relay holds it");
    assert!(source.get::<_, bool>(3), "its walsender's pid");
    let (lag, retained): (i64, i64) = (source.get(4), source.get(5));
    assert!(
        lag >= 0 && retained >= lag,
        "lag {lag}, retained {retained}"
    );
    assert_eq!(source.get::<_, Option<String>>(6), None, "no stop verdict");
    assert_eq!(source.get::<_, i64>(7), 0, "no gaps");

    let dead = m
        .query(
            "SELECT topic, dead_letters FROM outbox.dead_letter_summary",
            &[],
        )
        .await?;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        dead[0].get::<_, Option<String>>(0).as_deref(),
        Some("ob_missing")
    );
    assert_eq!(dead[0].get::<_, i64>(1), 1);

    let backlog: i64 = m
        .query_one("SELECT events FROM outbox.table_backlog", &[])
        .await?
        .get(0);
    assert_eq!(backlog, 0, "wal mode keeps no rows");

    let offset = m
        .query_one(
            "SELECT consumer, topic, partition, next_offset, age_seconds >= 0 FROM inbox.offset_status",
            &[],
        )
        .await?;
    assert_eq!(offset.get::<_, String>(0), "billing");
    assert_eq!(offset.get::<_, i64>(3), 7);
    assert!(offset.get::<_, bool>(4));
    let queue = m
        .query_one(
            "SELECT consumer, status, messages FROM inbox.queue_status",
            &[],
        )
        .await?;
    assert_eq!(
        (
            queue.get::<_, String>(0),
            queue.get::<_, String>(1),
            queue.get::<_, i64>(2)
        ),
        ("billing".to_string(), "pending".to_string(), 1)
    );

    // the views are all it may read: no event, payload, message or key
    for table in [
        "outbox.dead_letters",
        "outbox.events",
        "outbox.sources",
        "outbox.auth_key",
        "inbox.messages",
        "inbox.offsets",
    ] {
        let (code, message, _) = expect_error(&m, &format!("SELECT * FROM {table}")).await?;
        assert_eq!(code, "42501", "{table}: {message}");
    }
    let err = m
        .query_one("SELECT outbox.relay_auth_key()", &[])
        .await
        .expect_err("no key for the monitor");
    assert_eq!(sqlstate(&err), "42501");

    // a table-mode backlog shows as rows and an age
    c.batch_execute(
        "SET pg_outbox.mode = 'table'; SELECT outbox.enqueue('orders', 'k', '{\"n\": 4}')",
    )
    .await?;
    let (events, aged): (i64, bool) = {
        let row = m
            .query_one(
                "SELECT events, oldest_age_seconds >= 0 FROM outbox.table_backlog",
                &[],
            )
            .await?;
        (row.get(0), row.get(1))
    };
    assert_eq!((events, aged), (1, true));
    Ok(())
}
