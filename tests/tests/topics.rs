//! A topic that gains partitions under a running relay and a running ingest. Kafka routes a key by
//! the partition count, so keys move at the change: the relay must notice within its check
//! interval, switch at a transaction boundary (every event of a transaction before the switch in
//! its old partition, every one after in its new one), and publish nothing twice; the ingest must
//! read the new partitions. Tansu 0.6 has no CreatePartitions, so the test grows the topic in the
//! broker's SQLite storage while it runs (`Broker::add_partitions`).

use anyhow::Result;
use pg_outbox_tests::{numbered_batch, payload_n, port, read_all, wait_for, Broker, Relay, TestDb};
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;
use tokio_postgres::Client;

const BATCH: i64 = 50;
const KEYS: i64 = 16;

/// Writes transactions of [`numbered_batch`] events, `pause` apart.
async fn write(client: &Client, transactions: std::ops::Range<i64>, pause: Duration) -> Result<()> {
    for t in transactions {
        tokio::time::sleep(pause).await;
        let (keys, payloads) = numbered_batch(t, BATCH, KEYS);
        client
            .execute(
                "SELECT outbox.enqueue_batch('grow', $1, $2::text[]::jsonb[])",
                &[&keys, &payloads],
            )
            .await?;
    }
    Ok(())
}

#[tokio::test]
async fn partitions_added_under_the_relay_and_the_ingest_move_keys_once_and_lose_nothing(
) -> Result<()> {
    let broker = Broker::start_sqlite()?;
    broker.create_topic("grow", 2).await?;
    let db = TestDb::create("tp_grow", port()).await?;
    let inbox = TestDb::create("tp_grow_inbox", port()).await?;
    let relay = Relay::start(
        db.port,
        &db.name,
        &broker.bootstrap(),
        &["--partition-check-ms", "500"],
    )?;
    let _ingest = Relay::ingest(
        inbox.port,
        &inbox.name,
        &broker.bootstrap(),
        "billing",
        "grow",
        &[],
    )?;
    db.wait_for_active_slot().await?;
    // before: two partitions
    write(&db.client, 0..20, Duration::ZERO).await?;
    read_all(
        &broker.bootstrap(),
        &[("grow", 2)],
        20 * BATCH as usize,
        Duration::from_secs(60),
    )?;
    // the topic grows while transactions keep coming, for about 3 s
    let writing = {
        let client = db.session().await?;
        tokio::spawn(async move { write(&client, 20..60, Duration::from_millis(75)).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    broker.add_partitions("grow", 4)?;
    relay
        .wait_for_log("partition count changed", 1, Duration::from_secs(30))
        .await?;
    assert!(
        !writing.is_finished(),
        "the change is seen while events flow"
    );
    writing.await??;
    write(&db.client, 60..80, Duration::ZERO).await?;
    let total = 80 * BATCH as usize;
    let records = read_all(
        &broker.bootstrap(),
        &[("grow", 4)],
        total,
        Duration::from_secs(120),
    )?;
    let ns: BTreeSet<i64> = records.iter().map(|r| payload_n(&r.payload)).collect();
    assert_eq!(records.len(), total, "every event once");
    assert_eq!(ns, (0..total as i64).collect(), "every event");
    // each key in one partition before the switch and one after it, in order in each
    let mut partitions: HashMap<(Vec<u8>, i32), Vec<i64>> = HashMap::new();
    for r in &records {
        partitions
            .entry((r.key.clone().unwrap_or_default(), r.partition))
            .or_default()
            .push(payload_n(&r.payload));
    }
    for ((key, partition), ns) in &partitions {
        assert!(
            ns.windows(2).all(|w| w[0] < w[1]),
            "key {key:?} out of order in partition {partition}"
        );
    }
    let mut switched = 0;
    for key in 0..KEYS {
        let key = format!("k{key}").into_bytes();
        let mut spans: Vec<(i64, i64)> = partitions
            .iter()
            .filter(|((k, _), _)| *k == key)
            .map(|(_, ns)| (ns[0], *ns.last().expect("not empty")))
            .collect();
        spans.sort();
        assert!(
            spans.len() <= 2,
            "key {key:?} in {} partitions",
            spans.len()
        );
        if spans.len() == 2 {
            switched += 1;
            // the switch is at a transaction boundary: a transaction is never split
            assert!(
                spans[0].1 < spans[1].0,
                "key {key:?} interleaved: {spans:?}"
            );
            assert_eq!(
                spans[0].1 / BATCH + 1,
                spans[1].0 / BATCH,
                "key {key:?}: {spans:?}"
            );
        }
    }
    assert!(switched > 0, "some keys moved to the new partitions");
    assert!(
        records.iter().any(|r| r.partition >= 2),
        "the new partitions are written"
    );
    // the ingest reads the new partitions too: every event once in the inbox
    let c = &inbox.client;
    wait_for(
        "the inbox to hold every event",
        Duration::from_secs(60),
        || async {
            let n: i64 = c
            .query_one(
                "SELECT count(DISTINCT message_id) FROM inbox.messages WHERE consumer = 'billing'",
                &[],
            )
            .await?
            .get(0);
            Ok(n == total as i64)
        },
    )
    .await?;
    let rows: i64 = c
        .query_one("SELECT count(*) FROM inbox.messages", &[])
        .await?
        .get(0);
    assert_eq!(rows, total as i64);
    Ok(())
}
