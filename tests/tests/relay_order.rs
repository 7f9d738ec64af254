//! Per-key order under concurrency: eight writers commit over 24 keys and two topics while the relay
//! publishes; per key, the records arrive in commit order, exactly once, from the WAL source and
//! from the poll source (table mode orders by transaction id, so writers lock the key first).

use anyhow::Result;
use pg_outbox_tests::{assert_exactly_once_in_order, Scenario, TestDb};

/// `writers` sessions each commit `per_writer` events; per key, `n` counts up in commit order
/// (a row lock on the key's counter serialises the transactions of one key).
async fn concurrent_writers(
    db: &TestDb,
    writers: usize,
    per_writer: usize,
    keys: usize,
    lock_key_first: bool,
) -> Result<usize> {
    db.client
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS key_seq (key text PRIMARY KEY, n bigint NOT NULL); \
             INSERT INTO key_seq SELECT 'k' || i, 0 FROM generate_series(0, {keys} - 1) i ON CONFLICT DO NOTHING"
        ))
        .await?;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let c = db.session().await?;
        tasks.push(tokio::spawn(async move {
            for i in 0..per_writer {
                let key = format!("k{}", (w * 7 + i * 13) % keys);
                let topic = if key.len() % 2 == 0 { "orders" } else { "payments" };
                c.batch_execute("BEGIN").await?;
                if lock_key_first {
                    // table mode orders by xid: serialise the key before the first write (which
                    // assigns the xid); an advisory lock assigns none
                    c.query_one("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", &[&key])
                        .await?;
                }
                let n: i64 = c
                    .query_one("UPDATE key_seq SET n = n + 1 WHERE key = $1 RETURNING n", &[&key])
                    .await?
                    .get(0);
                c.query_one(
                    "SELECT outbox.enqueue($1, $2, jsonb_build_object('n', $3::bigint, 'w', $4::int))",
                    &[&topic, &key, &n, &(w as i32)],
                )
                .await?;
                c.batch_execute("COMMIT").await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(writers * per_writer)
}

/// 8 concurrent writers over 24 keys and two topics (`orders` and `payments`); per key, the
/// records arrive in commit order.
async fn order_run(s: &Scenario, relay_args: &[&str], lock_key_first: bool) -> Result<()> {
    let _relay = s.relay().args(relay_args).running().await?;
    let total = concurrent_writers(&s.db, 8, 250, 24, lock_key_first).await?;
    let records = s.read(total)?;
    assert_exactly_once_in_order(&records, total)
}

#[tokio::test]
async fn per_key_order_is_commit_order_with_concurrent_writers() -> Result<()> {
    let s = Scenario::builder("rl_order")
        .topic("orders", 4)
        .topic("payments", 3)
        .start()
        .await?;
    order_run(&s, &[], false).await
}

#[tokio::test]
async fn table_mode_per_key_order_with_concurrent_writers() -> Result<()> {
    let s = Scenario::builder("rl_table_order")
        .table_mode()
        .topic("orders", 4)
        .topic("payments", 3)
        .start()
        .await?;
    order_run(&s, &["--source", "poll"], true).await
}
