//! The inbox against a real cluster: try_receive is true exactly once per (consumer, id) under
//! concurrency, offsets only move forward, the work queue hands each message to one worker, and
//! purge keeps every dedup record that may still be needed.

use anyhow::Result;
use pg_outbox_tests::{backend_pid, expect_error, port, wait_for, wait_for_lock_wait, TestDb};
use std::time::Duration;
use tokio_postgres::Client;

async fn try_receive_in_tx(
    client: &Client,
    consumer: &str,
    id: &str,
    commit: bool,
) -> Result<bool> {
    let tx_end = if commit { "COMMIT" } else { "ROLLBACK" };
    client.batch_execute("BEGIN").await?;
    let got: bool = client
        .query_one("SELECT inbox.try_receive($1, $2)", &[&consumer, &id])
        .await?
        .get(0);
    client.batch_execute(tx_end).await?;
    Ok(got)
}

#[tokio::test]
async fn try_receive_is_true_exactly_once_under_races() -> Result<()> {
    let db = TestDb::create("ib_race", port()).await?;
    let a = db.session().await?;
    let b = db.session().await?;
    let ids: Vec<String> = (0..300).map(|i| format!("evt-{i}")).collect();
    let (ra, rb) = tokio::join!(
        async {
            let mut out = Vec::new();
            for id in &ids {
                out.push(try_receive_in_tx(&a, "billing", id, true).await?);
            }
            anyhow::Ok(out)
        },
        async {
            let mut out = Vec::new();
            for id in ids.iter().rev() {
                out.push(try_receive_in_tx(&b, "billing", id, true).await?);
            }
            out.reverse();
            anyhow::Ok(out)
        }
    );
    let (ra, rb) = (ra?, rb?);
    for (i, (x, y)) in ra.iter().zip(&rb).enumerate() {
        assert!(x ^ y, "id {i}: a={x} b={y}, expected exactly one true");
    }
    // a third look at any id is false; another consumer sees it fresh
    assert!(!try_receive_in_tx(&a, "billing", "evt-7", true).await?);
    assert!(try_receive_in_tx(&a, "shipping", "evt-7", true).await?);
    Ok(())
}

#[tokio::test]
async fn try_receive_of_a_rolled_back_transaction_does_not_count() -> Result<()> {
    let db = TestDb::create("ib_rollback", port()).await?;
    let a = db.session().await?;
    let b = db.session().await?;
    let (a_pid, b_pid) = (backend_pid(&a).await?, backend_pid(&b).await?);
    // a holds the id in an open transaction; b waits for it; a rolls back; b gets it
    a.batch_execute("BEGIN").await?;
    let first: bool = a
        .query_one("SELECT inbox.try_receive('billing', 'evt-1')", &[])
        .await?
        .get(0);
    assert!(first);
    let waiting = tokio::spawn(async move {
        let got: bool = b
            .query_one("SELECT inbox.try_receive('billing', 'evt-1')", &[])
            .await?
            .get(0);
        anyhow::Ok(got)
    });
    wait_for_lock_wait(&db.client, b_pid, a_pid).await?;
    assert!(!waiting.is_finished(), "b must wait for a's transaction");
    a.batch_execute("ROLLBACK").await?;
    assert!(waiting.await??, "a rolled back, so b receives the message");
    // the uuid variant is the same key space as its text form
    let id = uuid::Uuid::now_v7();
    let c = &db.client;
    let first: bool = c
        .query_one("SELECT inbox.try_receive('billing', $1::uuid)", &[&id])
        .await?
        .get(0);
    let second: bool = c
        .query_one(
            "SELECT inbox.try_receive('billing', $1::text)",
            &[&id.to_string()],
        )
        .await?
        .get(0);
    assert!(first && !second);
    Ok(())
}

#[tokio::test]
async fn offsets_only_move_forward_unless_forced() -> Result<()> {
    let db = TestDb::create("ib_offsets", port()).await?;
    let c = &db.client;
    let get = |p: i32| {
        let c = &db.client;
        async move {
            let v: Option<i64> = c
                .query_one("SELECT inbox.get_offset('billing', 'orders', $1)", &[&p])
                .await?
                .get(0);
            anyhow::Ok(v)
        }
    };
    assert_eq!(get(0).await?, None);
    c.batch_execute("SELECT inbox.store_offset('billing', 'orders', 0, 5)")
        .await?;
    c.batch_execute("SELECT inbox.store_offset('billing', 'orders', 0, 10)")
        .await?;
    c.batch_execute("SELECT inbox.store_offset('billing', 'orders', 0, 10)")
        .await?;
    let (code, message, hint) =
        expect_error(c, "SELECT inbox.store_offset('billing', 'orders', 0, 7)").await?;
    assert_eq!(code, "22023", "{message}");
    assert!(hint.unwrap().contains("force"));
    assert_eq!(get(0).await?, Some(10));
    // an offset stored in a rolled-back transaction is not stored
    c.batch_execute("BEGIN; SELECT inbox.store_offset('billing', 'orders', 0, 20); ROLLBACK")
        .await?;
    assert_eq!(get(0).await?, Some(10));
    // a deliberate rewind
    let previous: Option<i64> = c
        .query_one(
            "SELECT inbox.store_offset('billing', 'orders', 0, 7, force => true)",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(previous, Some(10));
    assert_eq!(get(0).await?, Some(7));
    // partitions and consumers are independent
    c.batch_execute("SELECT inbox.store_offset('billing', 'orders', 1, 3); SELECT inbox.store_offset('audit', 'orders', 0, 1)").await?;
    let parts: Vec<(i32, i64)> = c
        .query(
            "SELECT partition, next_offset FROM inbox.get_offsets('billing', 'orders')",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(parts, vec![(0, 7), (1, 3)]);
    for (sql, code) in [
        (
            "SELECT inbox.store_offset('billing', 'orders', 0, -1)",
            "22023",
        ),
        (
            "SELECT inbox.store_offset('billing', 'orders', -1, 1)",
            "22023",
        ),
        ("SELECT inbox.store_offset(NULL, 'orders', 0, 1)", "22004"),
        ("SELECT inbox.store_offset('', 'orders', 0, 1)", "22023"),
        ("SELECT inbox.try_receive('billing', '')", "22023"),
        ("SELECT inbox.try_receive('billing', NULL::text)", "22004"),
    ] {
        let (got, message, _) = expect_error(c, sql).await?;
        assert_eq!(got, code, "{sql}: {message}");
    }
    Ok(())
}

#[tokio::test]
async fn concurrent_first_stores_do_not_lose_the_check() -> Result<()> {
    let db = TestDb::create("ib_offsets_race", port()).await?;
    let a = db.session().await?;
    let b = db.session().await?;
    let (a_pid, b_pid) = (backend_pid(&a).await?, backend_pid(&b).await?);
    // both start from "no row"; the second to commit must still refuse to go backwards
    a.batch_execute("BEGIN; SELECT inbox.store_offset('billing', 'orders', 0, 100)")
        .await?;
    let waiting = tokio::spawn(async move {
        b.batch_execute("SELECT inbox.store_offset('billing', 'orders', 0, 50)")
            .await
    });
    // the race is real only if b is inside its store, blocked by a's uncommitted first row
    wait_for_lock_wait(&db.client, b_pid, a_pid).await?;
    assert!(!waiting.is_finished(), "b must wait for a's transaction");
    a.batch_execute("COMMIT").await?;
    let err = waiting.await?.expect_err("going from 100 to 50 must fail");
    assert_eq!(pg_outbox_tests::sqlstate(&err), "22023");
    Ok(())
}

async fn deliver(c: &Client, consumer: &str, id: &str, offset: i64) -> Result<bool> {
    Ok(c.query_one(
        "SELECT inbox.deliver($1, $2, 'orders', 0, $3, 'k', convert_to('{}', 'UTF8'))",
        &[&consumer, &id, &offset],
    )
    .await?
    .get(0))
}

#[tokio::test]
async fn claim_hands_each_message_to_one_worker_and_dead_letters_after_the_limit() -> Result<()> {
    let db = TestDb::create("ib_claim", port()).await?;
    let c = &db.client;
    for i in 0..20 {
        assert!(deliver(c, "billing", &format!("m{i}"), i).await?);
    }
    assert!(
        !deliver(c, "billing", "m3", 3).await?,
        "duplicate delivery is recorded once"
    );

    // two workers claiming in open transactions get disjoint messages (SKIP LOCKED)
    let w1 = db.session().await?;
    let w2 = db.session().await?;
    w1.batch_execute("BEGIN").await?;
    w2.batch_execute("BEGIN").await?;
    let ids = |rows: Vec<tokio_postgres::Row>| {
        rows.iter()
            .map(|r| r.get::<_, i64>("id"))
            .collect::<Vec<_>>()
    };
    let got1 = ids(w1
        .query("SELECT * FROM inbox.claim('billing', 8)", &[])
        .await?);
    let got2 = ids(w2
        .query("SELECT * FROM inbox.claim('billing', 8)", &[])
        .await?);
    assert_eq!(got1.len(), 8);
    assert_eq!(got2.len(), 8);
    assert!(got1.iter().all(|id| !got2.contains(id)));
    for id in &got1 {
        let done: bool = w1
            .query_one("SELECT inbox.complete($1)", &[id])
            .await?
            .get(0);
        assert!(done);
    }
    w1.batch_execute("COMMIT").await?;
    w2.batch_execute("ROLLBACK").await?; // w2 crashed: its claims vanish with its transaction

    let done: i64 = c
        .query_one(
            "SELECT count(*) FROM inbox.messages WHERE status = 'done'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(done, 8);
    let left = ids(c
        .query("SELECT * FROM inbox.claim('billing', 100)", &[])
        .await?);
    assert_eq!(left.len(), 12, "w2's rolled-back claims are visible again");

    // fail until dead: max_attempts 3
    c.batch_execute("SET pg_outbox.inbox_max_attempts = 3")
        .await?;
    let victim = left[0];
    let status: String = c
        .query_one("SELECT inbox.fail($1, 'boom', '0 seconds')", &[&victim])
        .await?
        .get(0);
    assert_eq!(status, "pending");
    let mut last = status;
    for _ in 0..2 {
        let again: Vec<i64> = ids(c
            .query("SELECT * FROM inbox.claim('billing', 100)", &[])
            .await?);
        assert_eq!(
            again,
            vec![victim],
            "only the failed message is visible again"
        );
        last = c
            .query_one("SELECT inbox.fail($1, 'boom', '0 seconds')", &[&victim])
            .await?
            .get(0);
    }
    assert_eq!(last, "dead");
    let (attempts, error): (i32, String) = {
        let r = c
            .query_one(
                "SELECT attempts, last_error FROM inbox.messages WHERE id = $1",
                &[&victim],
            )
            .await?;
        (r.get(0), r.get(1))
    };
    assert_eq!((attempts, error.as_str()), (3, "boom"));
    assert!(c
        .query("SELECT * FROM inbox.claim('billing', 100)", &[])
        .await?
        .is_empty());
    let (code, _, _) = expect_error(c, &format!("SELECT inbox.fail({victim}, 'x')")).await?;
    assert_eq!(code, "55000");

    // a lease that expires makes the message visible again
    c.batch_execute("SELECT inbox.deliver('audit', 'a1', 'orders', 0, 0, NULL, NULL)")
        .await?;
    let first = ids(c
        .query(
            "SELECT * FROM inbox.claim('audit', 1, '1 millisecond')",
            &[],
        )
        .await?);
    assert_eq!(first.len(), 1, "a1 is claimed");
    // the lease runs out by the database's clock, the one claim compares with
    wait_for("a1's lease to run out", Duration::from_secs(10), || async {
        Ok(c.query_one(
            "SELECT visible_at <= now() FROM inbox.messages WHERE consumer = 'audit' AND message_id = 'a1'",
            &[],
        )
        .await?
        .get::<_, bool>(0))
    })
    .await?;
    let again = ids(c
        .query("SELECT * FROM inbox.claim('audit', 1)", &[])
        .await?);
    assert_eq!(first, again);
    Ok(())
}

#[tokio::test]
async fn purge_keeps_what_dedup_still_needs() -> Result<()> {
    let db = TestDb::create("ib_purge", port()).await?;
    let c = &db.client;
    // received: old and new
    c.batch_execute(
        "SELECT inbox.try_receive('billing', 'old'), inbox.try_receive('billing', 'new'), \
                inbox.try_receive('audit', 'old'); \
         UPDATE inbox.received SET received_at = now() - interval '30 days' WHERE message_id = 'old'",
    )
    .await?;
    // messages at offsets 0..4, all old; 0..3 done, 4 pending; stored offset horizon is 2
    for i in 0..5 {
        deliver(c, "billing", &format!("m{i}"), i).await?;
    }
    c.batch_execute(
        "UPDATE inbox.messages SET received_at = now() - interval '30 days'; \
         UPDATE inbox.messages SET status = 'done' WHERE \"offset\" < 4; \
         SELECT inbox.store_offset('billing', 'orders', 0, 2)",
    )
    .await?;

    // a window shorter than pg_outbox.inbox_dedup_window is refused
    let (code, _, hint) = expect_error(c, "SELECT inbox.purge('billing', '1 hour')").await?;
    assert_eq!(code, "22023");
    assert!(hint.unwrap().contains("inbox_dedup_window"));

    let removed: i64 = c
        .query_one("SELECT inbox.purge('billing')", &[])
        .await?
        .get(0);
    // 'old' received + m0, m1 (done, old, below the horizon)
    assert_eq!(removed, 3);
    let received: Vec<String> = c
        .query(
            "SELECT consumer || ':' || message_id FROM inbox.received ORDER BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(received, vec!["audit:old", "billing:new"]);
    let messages: Vec<String> = c
        .query("SELECT message_id FROM inbox.messages ORDER BY id", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        messages,
        vec!["m2", "m3", "m4"],
        "at/after the horizon or not done: kept"
    );
    // after the dedup still-needed records, purge again removes nothing
    let removed: i64 = c
        .query_one("SELECT inbox.purge('billing')", &[])
        .await?
        .get(0);
    assert_eq!(removed, 0);
    Ok(())
}

async fn claim(client: &Client) -> Result<Vec<String>> {
    Ok(client
        .query(
            "SELECT message_id FROM inbox.claim('billing', 10, '30 seconds', per_key => true)",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

#[tokio::test]
async fn per_key_claims_hand_a_key_to_one_worker_at_a_time_in_order() -> Result<()> {
    let db = TestDb::create("ib_per_key", port()).await?;
    let c = &db.client;
    for (id, key, offset) in [
        ("a1", "A", 0i64),
        ("b1", "B", 1),
        ("a2", "A", 2),
        ("a3", "A", 3),
    ] {
        c.execute(
            "SELECT inbox.deliver('billing', $1, 'orders', 0, $3, $2, NULL)",
            &[&id, &key, &offset],
        )
        .await?;
    }
    let w1 = db.session().await?;
    let w2 = db.session().await?;
    w1.batch_execute("BEGIN").await?;
    w2.batch_execute("BEGIN").await?;
    assert_eq!(claim(&w1).await?, vec!["a1", "b1"], "the head of each key");
    assert!(claim(&w2).await?.is_empty(), "A and B are being processed");
    w2.batch_execute("ROLLBACK").await?;
    w1.batch_execute(
        "SELECT inbox.complete(id) FROM inbox.messages WHERE message_id IN ('a1', 'b1'); COMMIT",
    )
    .await?;
    assert_eq!(claim(&w2).await?, vec!["a2"]);
    // without per_key, the rest of the queue is handed out regardless of keys
    let rest: Vec<String> = c
        .query("SELECT message_id FROM inbox.claim('billing', 10)", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(rest, vec!["a3"]);
    Ok(())
}
