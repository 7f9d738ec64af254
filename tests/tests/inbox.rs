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
            .query_one(
                "SELECT inbox.complete(id, claim_token) FROM inbox.messages WHERE id = $1",
                &[id],
            )
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
        .query_one("SELECT inbox.fail(id, claim_token, 'boom', '0 seconds') FROM inbox.messages WHERE id = $1", &[&victim])
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
            .query_one("SELECT inbox.fail(id, claim_token, 'boom', '0 seconds') FROM inbox.messages WHERE id = $1", &[&victim])
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
    let (code, _, _) = expect_error(
        c,
        &format!("SELECT inbox.fail({victim}, gen_random_uuid(), 'x')"),
    )
    .await?;
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
async fn only_the_current_claim_may_complete_or_fail_a_message() -> Result<()> {
    let db = TestDb::create("ib_claim_token", port()).await?;
    let c = &db.client;
    c.batch_execute("CREATE TABLE applied (message bigint)")
        .await?;
    c.batch_execute("SELECT inbox.deliver('audit', 'a1', 'orders', 0, 0, NULL, NULL)")
        .await?;
    let claim = |lease: &'static str| async move {
        let r = c
            .query_one(
                &format!("SELECT id, claim_token FROM inbox.claim('audit', 1, '{lease}')"),
                &[],
            )
            .await?;
        anyhow::Ok((r.get::<_, i64>(0), r.get::<_, uuid::Uuid>(1)))
    };
    // worker A claims with a short lease and is slow; the lease runs out and B claims the message
    let (id, token_a) = claim("1 millisecond").await?;
    wait_for("a1's lease to run out", Duration::from_secs(10), || async {
        Ok(c.query_one(
            "SELECT visible_at <= now() FROM inbox.messages WHERE id = $1",
            &[&id],
        )
        .await?
        .get::<_, bool>(0))
    })
    .await?;
    let (id_b, token_b) = claim("1 minute").await?;
    assert_eq!(id_b, id);
    assert_ne!(token_b, token_a);
    // A's work and completion, in one transaction, are refused and roll back together
    let a = db.session().await?;
    a.batch_execute("BEGIN").await?;
    a.execute("INSERT INTO applied VALUES ($1)", &[&id]).await?;
    let err = a
        .query_one("SELECT inbox.complete($1, $2)", &[&id, &token_a])
        .await
        .expect_err("a stale claim cannot complete");
    assert_eq!(pg_outbox_tests::sqlstate(&err), "55000", "{err}");
    a.batch_execute("ROLLBACK").await?;
    let err = c
        .query_one("SELECT inbox.fail($1, $2, 'late')", &[&id, &token_a])
        .await
        .expect_err("a stale claim cannot fail");
    assert_eq!(pg_outbox_tests::sqlstate(&err), "55000", "{err}");
    // B, the current claim, completes it; its token is then spent
    let done: bool = c
        .query_one("SELECT inbox.complete($1, $2)", &[&id, &token_b])
        .await?
        .get(0);
    assert!(done);
    let err = c
        .query_one("SELECT inbox.complete($1, $2)", &[&id, &token_b])
        .await
        .expect_err("completing twice");
    assert_eq!(pg_outbox_tests::sqlstate(&err), "55000", "{err}");
    let applied: i64 = c
        .query_one("SELECT count(*) FROM applied", &[])
        .await?
        .get(0);
    assert_eq!(
        applied, 0,
        "A's work rolled back with its refused completion"
    );
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
        "SELECT inbox.complete(id, claim_token) FROM inbox.messages WHERE message_id IN ('a1', 'b1'); COMMIT",
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

/// One message for `inbox.deliver_batch`: id, topic, partition, offset, dead reason.
type Msg<'a> = (&'a str, &'a str, i32, i64, Option<&'a str>);

/// Calls `inbox.deliver_batch` the way the relay's ingest does: key `k-<id>`, the id as header,
/// payload `p-<id>` (none for a dead message). Returns how many messages were new.
async fn deliver_batch(c: &Client, consumer: &str, msgs: &[Msg<'_>]) -> Result<i64> {
    let ids: Vec<&str> = msgs.iter().map(|m| m.0).collect();
    let topics: Vec<&str> = msgs.iter().map(|m| m.1).collect();
    let partitions: Vec<i32> = msgs.iter().map(|m| m.2).collect();
    let offsets: Vec<i64> = msgs.iter().map(|m| m.3).collect();
    let keys: Vec<Option<String>> = msgs.iter().map(|m| Some(format!("k-{}", m.0))).collect();
    let headers: Vec<serde_json::Value> = msgs
        .iter()
        .map(|m| serde_json::json!({ "pg_outbox-id": m.0 }))
        .collect();
    let payloads: Vec<Option<Vec<u8>>> = msgs
        .iter()
        .map(|m| m.4.is_none().then(|| format!("p-{}", m.0).into_bytes()))
        .collect();
    let reasons: Vec<Option<&str>> = msgs.iter().map(|m| m.4).collect();
    Ok(c.query_one(
        "SELECT inbox.deliver_batch($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        &[
            &consumer,
            &ids,
            &topics,
            &partitions,
            &offsets,
            &keys,
            &headers,
            &payloads,
            &reasons,
        ],
    )
    .await?
    .get(0))
}

/// (message_id, topic, partition, offset, status, last_error) of a consumer's messages, in queue order.
type Queued = (String, String, i32, i64, String, Option<String>);

async fn queued(c: &Client, consumer: &str) -> Result<Vec<Queued>> {
    Ok(c.query(
        "SELECT message_id, topic, partition, \"offset\", status, last_error \
           FROM inbox.messages WHERE consumer = $1 ORDER BY id",
        &[&consumer],
    )
    .await?
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
    .collect())
}

fn q(id: &str, topic: &str, partition: i32, offset: i64, dead: Option<&str>) -> Queued {
    (
        id.into(),
        topic.into(),
        partition,
        offset,
        if dead.is_some() { "dead" } else { "pending" }.into(),
        dead.map(str::to_string),
    )
}

/// (topic, partition, next_offset) stored for a consumer.
async fn stored(c: &Client, consumer: &str) -> Result<Vec<(String, i32, i64)>> {
    Ok(c.query(
        "SELECT topic, partition, next_offset FROM inbox.offsets WHERE consumer = $1 \
          ORDER BY topic, partition",
        &[&consumer],
    )
    .await?
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect())
}

fn o(topic: &str, partition: i32, next: i64) -> (String, i32, i64) {
    (topic.into(), partition, next)
}

#[tokio::test]
async fn deliver_batch_writes_messages_and_offsets_together() -> Result<()> {
    let db = TestDb::create("ib_batch", port()).await?;
    let c = &db.client;
    let batch: [Msg; 5] = [
        ("m0", "orders", 0, 0, None),
        ("m2", "orders", 0, 2, None), // offsets need not be contiguous nor sorted
        ("m1", "orders", 0, 1, None),
        ("m5", "orders", 1, 5, None),
        ("a7", "audit", 0, 7, None),
    ];
    assert_eq!(deliver_batch(c, "billing", &batch).await?, 5);
    assert_eq!(
        queued(c, "billing").await?,
        vec![
            q("m0", "orders", 0, 0, None),
            q("m2", "orders", 0, 2, None),
            q("m1", "orders", 0, 1, None),
            q("m5", "orders", 1, 5, None),
            q("a7", "audit", 0, 7, None),
        ]
    );
    // the next offset of each partition is its highest offset + 1
    assert_eq!(
        stored(c, "billing").await?,
        vec![o("audit", 0, 8), o("orders", 0, 3), o("orders", 1, 6)]
    );
    // key, headers and payload as given, like inbox.deliver stores them
    let r = c
        .query_one(
            "SELECT key, headers::text, convert_from(payload, 'UTF8'), attempts \
               FROM inbox.messages WHERE message_id = 'm5'",
            &[],
        )
        .await?;
    let row: (String, String, String, i32) = (r.get(0), r.get(1), r.get(2), r.get(3));
    assert_eq!(
        row,
        (
            "k-m5".into(),
            r#"{"pg_outbox-id": "m5"}"#.into(),
            "p-m5".into(),
            0
        )
    );
    // another consumer's messages and offsets are its own
    assert_eq!(
        deliver_batch(c, "audit", &[("m0", "orders", 0, 0, None)]).await?,
        1
    );
    assert_eq!(stored(c, "audit").await?, vec![o("orders", 0, 1)]);

    // rolled back: neither the messages nor the offsets
    c.batch_execute("BEGIN").await?;
    assert_eq!(
        deliver_batch(c, "billing", &[("m3", "orders", 0, 3, None)]).await?,
        1
    );
    c.batch_execute("ROLLBACK").await?;
    assert_eq!(queued(c, "billing").await?.len(), 5);
    assert_eq!(stored(c, "billing").await?[1], o("orders", 0, 3));

    // an empty batch changes nothing
    assert_eq!(deliver_batch(c, "billing", &[]).await?, 0);
    assert_eq!(queued(c, "billing").await?.len(), 5);
    assert_eq!(stored(c, "billing").await?.len(), 3);
    Ok(())
}

#[tokio::test]
async fn deliver_batch_records_a_duplicate_id_once() -> Result<()> {
    let db = TestDb::create("ib_batch_dup", port()).await?;
    let c = &db.client;
    assert_eq!(
        deliver_batch(
            c,
            "billing",
            &[("e1", "orders", 0, 0, None), ("e2", "orders", 0, 1, None)]
        )
        .await?,
        2
    );
    // a redelivery of e1 (the producer retried: same id, new offset), e3 twice in one batch
    let n = deliver_batch(
        c,
        "billing",
        &[
            ("e1", "orders", 0, 2, None),
            ("e3", "orders", 0, 3, None),
            ("e3", "orders", 0, 4, None),
        ],
    )
    .await?;
    assert_eq!(n, 1, "only e3 is new, and only once");
    assert_eq!(
        queued(c, "billing").await?,
        vec![
            q("e1", "orders", 0, 0, None),
            q("e2", "orders", 0, 1, None),
            q("e3", "orders", 0, 3, None),
        ],
        "the first delivery of an id is the one kept"
    );
    // the offsets of the duplicates still count: nothing before offset 5 is read again
    assert_eq!(stored(c, "billing").await?, vec![o("orders", 0, 5)]);
    // inbox.deliver shares the rule: the id is already there
    let again: bool = c
        .query_one(
            "SELECT inbox.deliver('billing', 'e2', 'orders', 0, 9, NULL, NULL)",
            &[],
        )
        .await?
        .get(0);
    assert!(!again);
    assert_eq!(queued(c, "billing").await?.len(), 3);
    Ok(())
}

#[tokio::test]
async fn deliver_batch_records_poison_as_dead_with_its_reason() -> Result<()> {
    let db = TestDb::create("ib_batch_dead", port()).await?;
    let c = &db.client;
    let n = deliver_batch(
        c,
        "billing",
        &[
            ("ok1", "orders", 0, 0, None),
            ("bad", "orders", 0, 1, Some("key is not valid UTF-8")),
            ("ok2", "orders", 0, 2, None),
        ],
    )
    .await?;
    assert_eq!(n, 3);
    assert_eq!(
        queued(c, "billing").await?,
        vec![
            q("ok1", "orders", 0, 0, None),
            q("bad", "orders", 0, 1, Some("key is not valid UTF-8")),
            q("ok2", "orders", 0, 2, None),
        ]
    );
    // the dead message's offset is stored like any other, and workers never get it
    assert_eq!(stored(c, "billing").await?, vec![o("orders", 0, 3)]);
    let claimed: Vec<String> = c
        .query("SELECT message_id FROM inbox.claim('billing', 10)", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(claimed, vec!["ok1", "ok2"]);
    Ok(())
}

#[tokio::test]
async fn deliver_batch_never_moves_an_offset_backwards() -> Result<()> {
    let db = TestDb::create("ib_batch_back", port()).await?;
    let c = &db.client;
    c.batch_execute("SELECT inbox.store_offset('billing', 'orders', 0, 10)")
        .await?;
    // partition 1 would move forward, partition 0 backwards: the whole batch is refused
    let sql =
        "SELECT inbox.deliver_batch('billing', ARRAY['x1', 'x2'], ARRAY['orders', 'orders'], \
               ARRAY[1, 0], ARRAY[20, 4]::bigint[], NULL, NULL, NULL, NULL)";
    let (code, message, hint) = expect_error(c, sql).await?;
    assert_eq!(code, "22023", "{message}");
    assert!(message.starts_with("pg_outbox:"), "{message}");
    assert!(hint.unwrap_or_default().contains("force"));
    assert!(
        queued(c, "billing").await?.is_empty(),
        "no message of a refused batch is kept"
    );
    assert_eq!(stored(c, "billing").await?, vec![o("orders", 0, 10)]);
    // the stored offset itself (a redelivered tail) is accepted and stays where it is
    assert_eq!(
        deliver_batch(
            c,
            "billing",
            &[("y9", "orders", 0, 9, None), ("z1", "orders", 1, 0, None)]
        )
        .await?,
        2
    );
    assert_eq!(
        stored(c, "billing").await?,
        vec![o("orders", 0, 10), o("orders", 1, 1)]
    );
    Ok(())
}

#[tokio::test]
async fn deliver_batch_refuses_bad_input_with_its_sqlstate() -> Result<()> {
    let db = TestDb::create("ib_batch_bad", port()).await?;
    let c = &db.client;
    let call = |args: &str| format!("SELECT inbox.deliver_batch({args})");
    for (args, code) in [
        // arrays of different lengths
        (
            "'billing', ARRAY['a', 'b'], ARRAY['orders'], ARRAY[0, 0], ARRAY[0, 1]::bigint[], NULL, NULL, NULL, NULL",
            "22023",
        ),
        (
            "'billing', ARRAY['a', 'b'], ARRAY['orders', 'orders'], ARRAY[0], ARRAY[0, 1]::bigint[], NULL, NULL, NULL, NULL",
            "22023",
        ),
        (
            "'billing', ARRAY['a'], ARRAY['orders'], ARRAY[0], ARRAY[0]::bigint[], ARRAY['k', 'l'], NULL, NULL, NULL",
            "22023",
        ),
        (
            "'billing', ARRAY['a'], ARRAY['orders'], ARRAY[0], ARRAY[0]::bigint[], NULL, ARRAY[]::jsonb[], NULL, NULL",
            "22023",
        ),
        (
            "'billing', ARRAY['a'], ARRAY['orders'], ARRAY[0], ARRAY[0]::bigint[], NULL, NULL, NULL, ARRAY['x', 'y']",
            "22023",
        ),
        // consumer
        (
            "NULL, ARRAY['a'], ARRAY['orders'], ARRAY[0], ARRAY[0]::bigint[], NULL, NULL, NULL, NULL",
            "22004",
        ),
        (
            "'', ARRAY['a'], ARRAY['orders'], ARRAY[0], ARRAY[0]::bigint[], NULL, NULL, NULL, NULL",
            "22023",
        ),
        // ids, topics and Kafka coordinates
        (
            "'billing', NULL, ARRAY['orders'], ARRAY[0], ARRAY[0]::bigint[], NULL, NULL, NULL, NULL",
            "22004",
        ),
        (
            "'billing', ARRAY[NULL]::text[], ARRAY['orders'], ARRAY[0], ARRAY[0]::bigint[], NULL, NULL, NULL, NULL",
            "22004",
        ),
        (
            "'billing', ARRAY['a'], ARRAY[NULL]::text[], ARRAY[0], ARRAY[0]::bigint[], NULL, NULL, NULL, NULL",
            "22004",
        ),
        (
            "'billing', ARRAY['a'], ARRAY['orders'], NULL, ARRAY[0]::bigint[], NULL, NULL, NULL, NULL",
            "22004",
        ),
        (
            "'billing', ARRAY['a'], ARRAY['orders'], ARRAY[0], ARRAY[NULL]::bigint[], NULL, NULL, NULL, NULL",
            "22004",
        ),
        (
            "'billing', ARRAY['a'], ARRAY['orders'], ARRAY[-1], ARRAY[0]::bigint[], NULL, NULL, NULL, NULL",
            "22023",
        ),
    ] {
        let sql = call(args);
        let (got, message, hint) = expect_error(c, &sql).await?;
        assert_eq!(got, code, "{sql}: {message}");
        assert!(message.starts_with("pg_outbox:"), "{sql}: {message}");
        assert!(hint.is_some_and(|h| !h.is_empty()), "{sql}: no hint");
    }
    let (_, message, hint) = expect_error(
        c,
        &call("'billing', ARRAY['a', 'b'], ARRAY['orders'], ARRAY[0, 0], ARRAY[0, 1]::bigint[], NULL, NULL, NULL, NULL"),
    )
    .await?;
    assert!(message.contains("message_ids 2, topics 1"), "{message}");
    assert!(hint.unwrap().contains("matched by position"));
    let rows: i64 = c
        .query_one(
            "SELECT (SELECT count(*) FROM inbox.messages) + (SELECT count(*) FROM inbox.offsets)",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(rows, 0, "refused batches leave nothing behind");
    Ok(())
}

#[tokio::test]
async fn deliver_batch_is_granted_to_the_ingest_and_consumers_only() -> Result<()> {
    let db = TestDb::create("ib_batch_roles", port()).await?;
    db.client
        .batch_execute(
            "DROP ROLE IF EXISTS ib_relay; DROP ROLE IF EXISTS ib_worker; DROP ROLE IF EXISTS ib_writer; \
             DROP ROLE IF EXISTS ib_publisher; \
             CREATE ROLE ib_relay LOGIN IN ROLE inbox_ingest; \
             CREATE ROLE ib_publisher LOGIN IN ROLE outbox_relay; \
             CREATE ROLE ib_worker LOGIN IN ROLE inbox_consumer; \
             CREATE ROLE ib_writer LOGIN IN ROLE outbox_writer",
        )
        .await?;
    let relay = db.session_as("ib_relay").await?;
    assert_eq!(
        deliver_batch(&relay, "billing", &[("r1", "orders", 0, 0, None)]).await?,
        1
    );
    let worker = db.session_as("ib_worker").await?;
    assert_eq!(
        deliver_batch(&worker, "billing", &[("w1", "orders", 0, 1, None)]).await?,
        1
    );
    // neither a writer nor the publishing relay's role may deliver into the inbox
    for role in ["ib_writer", "ib_publisher"] {
        let session = db.session_as(role).await?;
        let err = deliver_batch(&session, "billing", &[("x1", "orders", 0, 2, None)])
            .await
            .expect_err("may not deliver into the inbox");
        let code = err
            .downcast_ref::<tokio_postgres::Error>()
            .map(pg_outbox_tests::sqlstate);
        assert_eq!(code.as_deref(), Some("42501"), "{role}: {err}");
    }
    // and the ingest's role sees nothing of the outbox side, the sealing key least of all
    let (code, _, _) = expect_error(&relay, "SELECT outbox.relay_auth_key()").await?;
    assert_eq!(code, "42501");
    assert_eq!(
        stored(&db.client, "billing").await?,
        vec![o("orders", 0, 2)]
    );
    Ok(())
}

/// docs/sql-api.md, "Roles": a login that has only `inbox_consumer` may use every `inbox.*`
/// function (the SQL edition's inbox read its settings through a helper in schema `outbox`, where
/// that role has no USAGE: 42501 from `inbox.claim`).
#[tokio::test]
async fn a_consumer_role_alone_may_use_every_inbox_function() -> Result<()> {
    let db = TestDb::create("ib_consumer_only", port()).await?;
    db.client
        .batch_execute(
            "DROP ROLE IF EXISTS ib_worker; CREATE ROLE ib_worker LOGIN IN ROLE inbox_consumer;
             SELECT inbox.deliver('billing', 'm1', 'orders', 0, 0, 'k', '\\x01'::bytea);
             SELECT inbox.deliver('billing', 'm2', 'orders', 0, 1, 'k', '\\x02'::bytea);",
        )
        .await?;
    let worker = db.session_as("ib_worker").await?;
    assert!(worker
        .query_one("SELECT inbox.try_receive('billing', 'x')", &[])
        .await?
        .get::<_, bool>(0));
    worker
        .batch_execute(
            "SELECT inbox.store_offset('billing', 'orders', 0, 2);
             SELECT inbox.get_offset('billing', 'orders', 0);
             SELECT * FROM inbox.get_offsets('billing', 'orders');",
        )
        .await?;
    let claimed = worker
        .query(
            "SELECT id, claim_token FROM inbox.claim('billing', 2, '30 seconds', true)",
            &[],
        )
        .await?;
    assert_eq!(
        claimed.len(),
        1,
        "per key: one of the two messages of key k"
    );
    let (id, token): (i64, uuid::Uuid) = (claimed[0].get(0), claimed[0].get(1));
    worker
        .execute("SELECT inbox.complete($1, $2)", &[&id, &token])
        .await?;
    let claimed = worker
        .query("SELECT id, claim_token FROM inbox.claim('billing')", &[])
        .await?;
    assert_eq!(claimed.len(), 1);
    let (id, token): (i64, uuid::Uuid) = (claimed[0].get(0), claimed[0].get(1));
    worker
        .execute(
            "SELECT inbox.fail($1, $2, 'try later', '1 second')",
            &[&id, &token],
        )
        .await?;
    worker
        .batch_execute(
            "SELECT inbox.purge('billing'); SELECT inbox.forget_topic('billing', 'orders');",
        )
        .await?;
    Ok(())
}

/// docs/sql-api.md, "Two capture modes": the relay, `check`, `status` and `setup` say the same
/// thing when the slot is gone. As
/// `outbox_relay` (the SQL edition's `_slot_lost` called a helper that role may not run: "permission
/// denied for function _setting").
#[tokio::test]
async fn the_relay_role_is_told_that_the_slot_is_lost() -> Result<()> {
    let db = TestDb::create("ib_slot_lost_as_relay", port()).await?;
    db.create_slot().await?;
    db.client
        .batch_execute(&format!(
            "DROP ROLE IF EXISTS ib_relay; CREATE ROLE ib_relay LOGIN REPLICATION IN ROLE outbox_relay;
             SELECT pg_drop_replication_slot('{}');",
            db.name
        ))
        .await?;
    let relay = db.session_as("ib_relay").await?;
    let (code, message, hint) = expect_error(&relay, "SELECT * FROM outbox.create_slot()").await?;
    assert_eq!(code, "55000", "{message}");
    assert!(
        message.contains("was dropped") && message.contains("may never have been published"),
        "{message}"
    );
    assert!(
        hint.unwrap_or_default().contains("outbox.recreate_slot"),
        "the way out"
    );
    Ok(())
}

/// docs/sql-api.md, "Roles": the ingest needs nothing but `inbox_ingest` (and never sees the outbox
/// side).
#[tokio::test]
async fn the_ingest_runs_as_a_login_with_only_inbox_ingest() -> Result<()> {
    use rdkafka::config::ClientConfig;
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let db = TestDb::create("ib_ingest_role", port()).await?;
    db.client
        .batch_execute(
            "DROP ROLE IF EXISTS ib_ingest; CREATE ROLE ib_ingest LOGIN IN ROLE inbox_ingest",
        )
        .await?;
    let broker = pg_outbox_tests::Broker::start()?;
    broker.create_topic("events", 1).await?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .create()?;
    for i in 0..3 {
        let id = format!("m{i}");
        producer
            .send(
                FutureRecord::<str, str>::to("events")
                    .key("k")
                    .payload("{}")
                    .headers(OwnedHeaders::new().insert(Header {
                        key: "pg_outbox-id",
                        value: Some(&id),
                    })),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)?;
    }
    let _ingest = pg_outbox_tests::Relay::ingest(
        db.port,
        &db.name,
        &broker.bootstrap(),
        "billing",
        "events",
        &["--pg-user", "ib_ingest"],
    )?;
    let c = &db.client;
    wait_for(
        "3 messages and their offset",
        Duration::from_secs(60),
        || async {
            let n: i64 = c
                .query_one("SELECT count(*) FROM inbox.messages", &[])
                .await?
                .get(0);
            let offset: Option<i64> = c
                .query_opt(
                    "SELECT next_offset FROM inbox.offsets WHERE consumer = 'billing'",
                    &[],
                )
                .await?
                .map(|r| r.get(0));
            Ok(n == 3 && offset == Some(3))
        },
    )
    .await
}

/// The inbox deduplicates per consumer and topic: a record that another producer wrote with a copied
/// `pg_outbox-id` to another ingested topic, read first, does not make the real event a duplicate.
/// Within a topic a redelivery is still recorded once.
#[tokio::test]
async fn a_copied_id_on_another_topic_does_not_drop_the_real_event() -> Result<()> {
    let db = TestDb::create("ib_copied_id", port()).await?;
    let c = &db.client;
    let deliver = |topic: &'static str, offset: i64| async move {
        let new: bool = c
            .query_one(
                "SELECT inbox.deliver('billing', 'evt-1', $1, 0, $2, 'k', '\\x01'::bytea)",
                &[&topic, &offset],
            )
            .await?
            .get(0);
        anyhow::Ok(new)
    };
    assert!(deliver("scratch", 0).await?, "the forged copy, read first");
    assert!(deliver("orders", 0).await?, "the real event is queued too");
    assert!(
        !deliver("orders", 1).await?,
        "a redelivery on its topic is a duplicate"
    );
    let topics: Vec<String> = c
        .query(
            "SELECT topic FROM inbox.messages WHERE message_id = 'evt-1' ORDER BY topic",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(topics, vec!["orders", "scratch"]);
    Ok(())
}
