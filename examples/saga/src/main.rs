//! The order service of the saga example, in Rust: only SQL, no Kafka client.
//!
//! `saga-order-service create DSN N` creates N orders, each with its `OrderCreated` event in the
//! same transaction. `saga-order-service process DSN` applies the customer service's replies from
//! its inbox: `CreditReserved` approves an order, `CreditLimitExceeded` cancels it (the
//! compensation), each in the transaction that completes the inbox message. It exits once no order
//! is pending, or after the timeout.

use anyhow::{bail, Context, Result};
use std::time::{Duration, Instant};
use tokio_postgres::{Client, NoTls};

const CONSUMER: &str = "order-service";

async fn connect(dsn: &str) -> Result<Client> {
    let (client, connection) = tokio_postgres::connect(dsn, NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

async fn create(dsn: &str, n: i64) -> Result<()> {
    let c = connect(dsn).await?;
    for id in 1..=n {
        let customer = format!("customer-{}", id % 10);
        let amount = 100 + (id * 37) % 400;
        c.batch_execute("BEGIN").await?;
        c.execute(
            "INSERT INTO orders (id, customer, amount) VALUES ($1, $2, $3::bigint::numeric)",
            &[&id, &customer, &amount],
        )
        .await?;
        c.execute(
            "SELECT outbox.enqueue('orders', $1, jsonb_build_object('order_id', $2::bigint, \
             'customer', $1::text, 'amount', $3::bigint), '{\"type\": \"OrderCreated\"}')",
            &[&customer, &id, &amount],
        )
        .await?;
        c.batch_execute("COMMIT").await?;
    }
    println!("order service: created {n} orders");
    Ok(())
}

async fn process(dsn: &str, timeout: Duration) -> Result<()> {
    let mut client = connect(dsn).await?;
    let deadline = Instant::now() + timeout;
    loop {
        let tx = client.transaction().await?;
        let rows = tx
            .query(
                "SELECT id, headers->>'type', (convert_from(payload, 'UTF8')::jsonb->>'order_id')::bigint, \
                        claim_token::text \
                 FROM inbox.claim($1, 100, '30 seconds')",
                &[&CONSUMER],
            )
            .await?;
        for row in &rows {
            let (message, kind, order, token): (i64, Option<String>, i64, String) =
                (row.get(0), row.get(1), row.get(2), row.get(3));
            let status = match kind.as_deref() {
                Some("CreditReserved") => "APPROVED",
                Some("CreditLimitExceeded") => "CANCELLED",
                other => bail!("unexpected reply type {other:?}"),
            };
            let updated = tx
                .execute(
                    "UPDATE orders SET status = $1 WHERE id = $2 AND status = 'PENDING'",
                    &[&status, &order],
                )
                .await?;
            if updated != 1 {
                bail!("order {order} was not pending: a reply was applied twice");
            }
            tx.query_one(
                "SELECT inbox.complete($1, $2::text::uuid)",
                &[&message, &token],
            )
            .await?;
        }
        tx.commit().await?;
        let pending: i64 = client
            .query_one("SELECT count(*) FROM orders WHERE status = 'PENDING'", &[])
            .await?
            .get(0);
        if pending == 0 {
            println!("order service: every order decided");
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{pending} orders still pending after {timeout:?}");
        }
        if rows.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        [_, "create", dsn, n] => create(dsn, n.parse().context("N")?).await,
        [_, "process", dsn] => process(dsn, Duration::from_secs(300)).await,
        _ => bail!("usage: saga-order-service create DSN N | process DSN"),
    }
}
