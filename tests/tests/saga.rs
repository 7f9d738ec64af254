//! The saga example under load, across two services with their own databases, connected only by
//! SQL and Kafka: an order service (Rust) and a customer service (Python), with the four relay
//! processes (two WAL relays, two ingests) killed and restarted while it runs.

use anyhow::{Context, Result};
use pg_outbox_tests::{port, Broker, Relay, TestDb};
use rand::Rng;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const ORDERS: i64 = 1000;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn dsn(db: &TestDb) -> String {
    format!(
        "host=127.0.0.1 port={} user=postgres dbname={}",
        db.port, db.name
    )
}

/// Kills the child on drop.
struct Service(Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn order_service() -> PathBuf {
    std::env::var_os("PG_OUTBOX_SAGA_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/debug/saga-order-service"))
}

#[tokio::test]
async fn saga_under_load_with_relays_killed_decides_every_order_exactly_once() -> Result<()> {
    let orders = TestDb::create("saga_orders", port()).await?;
    let customers = TestDb::create("saga_customers", port()).await?;
    orders
        .client
        .batch_execute(&std::fs::read_to_string(
            repo().join("examples/saga/orders.sql"),
        )?)
        .await?;
    customers
        .client
        .batch_execute(&std::fs::read_to_string(
            repo().join("examples/saga/customers.sql"),
        )?)
        .await?;
    let broker = Broker::start()?;
    broker.create_topic("orders", 3).await?;
    broker.create_topic("customers", 3).await?;
    let b = broker.bootstrap();

    type Start = Box<dyn Fn() -> Result<Relay>>;
    let (op, cp) = (orders.port, customers.port);
    let (b1, b2, b3, b4) = (b.clone(), b.clone(), b.clone(), b.clone());
    let starts: Vec<Start> = vec![
        Box::new(move || Relay::start(op, "saga_orders", &b1, &[])),
        Box::new(move || Relay::start(cp, "saga_customers", &b2, &[])),
        Box::new(move || {
            Relay::ingest(cp, "saga_customers", &b3, "customer-service", "orders", &[])
        }),
        Box::new(move || Relay::ingest(op, "saga_orders", &b4, "order-service", "customers", &[])),
    ];
    let mut relays: Vec<Relay> = starts.iter().map(|s| s()).collect::<Result<_>>()?;
    orders.wait_for_active_slot().await?;
    customers.wait_for_active_slot().await?;

    let _customer_service = Service(
        Command::new("python3")
            .arg(repo().join("examples/saga/customer_service.py"))
            .arg(dsn(&customers))
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the Python customer service")?,
    );
    let status = Command::new(order_service())
        .args(["create", &dsn(&orders), &ORDERS.to_string()])
        .status()?;
    assert!(status.success(), "creating orders");
    let mut process = Service(
        Command::new(order_service())
            .args(["process", &dsn(&orders)])
            .spawn()?,
    );

    // kill -9 a random relay process now and then, and restart it, until every order is decided
    let mut kills = 0;
    let outcome = loop {
        // a random interval between kills is the point; the loop ends on the order service's exit
        tokio::time::sleep(Duration::from_millis(rand::rng().random_range(300..900))).await;
        if let Some(status) = process.0.try_wait()? {
            break status;
        }
        if kills < 12 {
            let i = rand::rng().random_range(0..relays.len());
            relays[i].kill9()?;
            relays[i] = starts[i]()?;
            kills += 1;
        }
    };
    assert!(outcome.success(), "order service: {outcome}");

    let by_status: BTreeMap<String, i64> = orders
        .client
        .query("SELECT status, count(*) FROM orders GROUP BY 1", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    println!("saga: {ORDERS} orders, relay processes killed {kills} times: {by_status:?}");
    assert_eq!(by_status.get("PENDING"), None);
    assert!(by_status.get("APPROVED").is_some_and(|n| *n > 0));
    assert!(
        by_status.get("CANCELLED").is_some_and(|n| *n > 0),
        "some orders exceed the credit limit"
    );
    assert_eq!(by_status.values().sum::<i64>(), ORDERS);

    // credit reserved per customer = the sum of that customer's approved orders
    let approved: BTreeMap<String, String> = orders
        .client
        .query(
            "SELECT customer, sum(amount)::text FROM orders WHERE status = 'APPROVED' GROUP BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let reserved: BTreeMap<String, String> = customers
        .client
        .query(
            "SELECT id, reserved::text FROM customers WHERE reserved > 0",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        approved, reserved,
        "credit totals match the approved orders"
    );

    // each event reached the other side exactly once, and was handled exactly once
    for (db, consumer) in [(&customers, "customer-service"), (&orders, "order-service")] {
        let r = db
            .client
            .query_one(
                "SELECT count(*), count(*) FILTER (WHERE status = 'done') FROM inbox.messages WHERE consumer = $1",
                &[&consumer],
            )
            .await?;
        let (all, done): (i64, i64) = (r.get(0), r.get(1));
        assert_eq!(
            (all, done),
            (ORDERS, ORDERS),
            "{consumer}: one message per order, all done"
        );
    }
    Ok(())
}
