//! Ingest and the worker API against PostgreSQL and Tansu: every Kafka message lands in the inbox
//! exactly once with its offset, whatever is killed when, and a worker's side effects happen once.

use anyhow::Result;
use pg_outbox_tests::{port, wait_for, with_raw_header, Scenario, TestDb};
use rand::{Rng, SeedableRng};
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;
use tokio_postgres::Client;

fn producer(brokers: &str) -> Result<FutureProducer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .create()?)
}

/// Produces one record; returns (partition, offset).
async fn produce(
    p: &FutureProducer,
    topic: &str,
    partition: i32,
    key: &[u8],
    id: Option<&str>,
    payload: &[u8],
) -> Result<(i32, i64)> {
    let mut record = FutureRecord::<[u8], [u8]>::to(topic)
        .partition(partition)
        .key(key)
        .payload(payload);
    if let Some(id) = id {
        record = record.headers(OwnedHeaders::new().insert(Header {
            key: "pg_outbox-id",
            value: Some(id),
        }));
    }
    let d = p
        .send(record, Duration::from_secs(30))
        .await
        .map_err(|(e, _)| e)?;
    Ok((d.partition, d.offset))
}

async fn inbox_count(c: &Client) -> Result<i64> {
    Ok(c.query_one("SELECT count(*) FROM inbox.messages", &[])
        .await?
        .get(0))
}

async fn stored_offsets(c: &Client, consumer: &str) -> Result<BTreeMap<i32, i64>> {
    Ok(c.query(
        "SELECT partition, next_offset FROM inbox.offsets WHERE consumer = $1",
        &[&consumer],
    )
    .await?
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect())
}

#[tokio::test]
async fn ingest_killed_at_random_moments_records_every_message_once() -> Result<()> {
    const EVENTS: usize = 20_000;
    let s = Scenario::builder("in_crash")
        .topic("events", 3)
        .start()
        .await?;
    let (db, broker) = (&s.db, &s.broker);
    let brokers = broker.bootstrap();
    let args = ["--ingest-batch", "200"];
    let mut ingest = s.ingest("billing", "events", &args)?;

    // a stream of events, 10% of them produced twice (a producer retry upstream)
    let p = producer(&brokers)?;
    let producing = tokio::spawn(async move {
        let mut rng = rand::rngs::StdRng::from_os_rng();
        let mut ends: BTreeMap<i32, i64> = BTreeMap::new();
        let mut ids = HashSet::new();
        let mut pending = Vec::new();
        for i in 0..EVENTS {
            let id = uuid::Uuid::now_v7().to_string();
            let copies = if i % 10 == 0 { 2 } else { 1 };
            for _ in 0..copies {
                let part = (i % 3) as i32;
                let payload = format!(r#"{{"i": {i}}}"#);
                let p = p.clone();
                let id = id.clone();
                pending.push(tokio::spawn(async move {
                    produce(
                        &p,
                        "events",
                        part,
                        format!("k{}", i % 50).as_bytes(),
                        Some(&id),
                        payload.as_bytes(),
                    )
                    .await
                }));
            }
            ids.insert(id);
            if pending.len() >= 500 {
                for h in pending.drain(..) {
                    let (part, off) = h.await??;
                    let e = ends.entry(part).or_insert(0);
                    *e = (*e).max(off + 1);
                }
                // pacing: the stream arrives in bursts while the ingest is killed and restarted
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..100))).await;
            }
        }
        for h in pending {
            let (part, off) = h.await??;
            let e = ends.entry(part).or_insert(0);
            *e = (*e).max(off + 1);
        }
        anyhow::Ok((ids, ends))
    });

    let mut kills = 0;
    while !producing.is_finished() || kills < 10 {
        // the random moment of the kill is the point of the test, not a wait for anything
        tokio::time::sleep(Duration::from_millis(rand::rng().random_range(150..700))).await;
        ingest.kill9()?;
        kills += 1;
        ingest = s.ingest("billing", "events", &args)?;
    }
    let (ids, ends) = producing.await??;
    let c = &db.client;
    wait_for(
        "the offsets to reach the end of every partition",
        Duration::from_secs(120),
        || async { Ok(stored_offsets(c, "billing").await? == ends) },
    )
    .await?;
    let stored: HashSet<String> = c
        .query(
            "SELECT message_id FROM inbox.messages WHERE consumer = 'billing'",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let rows: i64 = inbox_count(c).await?;
    let produced: i64 = ends.values().sum();
    println!(
        "ingest killed with SIGKILL {kills} times; {produced} records produced for {} events; \
         {rows} inbox rows; offsets {ends:?}",
        ids.len()
    );
    assert!(kills >= 10);
    assert_eq!(rows as usize, ids.len(), "one row per event id");
    assert_eq!(stored, ids, "exactly the produced ids");
    Ok(())
}

#[tokio::test]
async fn poison_and_id_less_messages_keep_the_partition_flowing() -> Result<()> {
    let s = Scenario::builder("in_poison")
        .topic("events", 1)
        .start()
        .await?;
    let (db, broker) = (&s.db, &s.broker);
    let brokers = broker.bootstrap();
    let _ingest = s.ingest("billing", "events", &["--max-record-bytes", "2048"])?;
    let p = producer(&brokers)?;
    produce(&p, "events", 0, b"k", Some("good-1"), b"{}").await?;
    produce(&p, "events", 0, b"k", Some("big"), &[b'x'; 4000]).await?;
    produce(&p, "events", 0, &[0xff, 0xfe], Some("bad-key"), b"{}").await?;
    let (_, no_id_offset) = produce(&p, "events", 0, b"k", None, b"{}").await?;
    produce(&p, "events", 0, b"k", Some("good-2"), b"{}").await?;
    let c = &db.client;
    wait_for("five messages", Duration::from_secs(60), || async {
        Ok(stored_offsets(c, "billing").await?.get(&0) == Some(&5))
    })
    .await?;
    let rows: Vec<(String, String, Option<String>)> = c
        .query(
            "SELECT message_id, status, last_error FROM inbox.messages ORDER BY \"offset\"",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(rows.len(), 5);
    assert_eq!(
        (rows[0].0.as_str(), rows[0].1.as_str()),
        ("good-1", "pending")
    );
    assert_eq!((rows[1].0.as_str(), rows[1].1.as_str()), ("big", "dead"));
    assert!(rows[1].2.as_deref().unwrap().contains("max_record_bytes"));
    assert_eq!(
        (rows[2].0.as_str(), rows[2].1.as_str()),
        ("bad-key", "dead")
    );
    assert!(rows[2].2.as_deref().unwrap().contains("UTF-8"));
    // coordinates and timestamp: deterministic, and new after a topic is re-created
    assert!(
        rows[3].0.starts_with(&format!("events/0/{no_id_offset}@")),
        "{}",
        rows[3].0
    );
    assert_eq!(
        (rows[4].0.as_str(), rows[4].1.as_str()),
        ("good-2", "pending")
    );
    Ok(())
}

/// One worker step in one transaction: claim, apply the side effect, complete.
async fn work_once(c: &Client, lease: &str) -> Result<usize> {
    c.batch_execute("BEGIN").await?;
    let ids: Vec<(i64, uuid::Uuid)> = c
        .query(
            &format!("SELECT id, claim_token FROM inbox.claim('billing', 5, '{lease}')"),
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for (id, token) in &ids {
        c.execute("INSERT INTO credit_reserved (message) VALUES ($1)", &[id])
            .await?;
        c.query_one("SELECT inbox.complete($1, $2)", &[id, token])
            .await?;
    }
    c.batch_execute("COMMIT").await?;
    Ok(ids.len())
}

#[tokio::test]
async fn a_worker_killed_mid_transaction_changes_nothing_and_its_messages_are_processed_once(
) -> Result<()> {
    let db = TestDb::create("in_worker", port()).await?;
    let c = &db.client;
    c.batch_execute(
        "CREATE TABLE credit_reserved (message bigint NOT NULL); \
         SELECT inbox.deliver('billing', 'm' || i, 'orders', 0, i, 'k', NULL) FROM generate_series(1, 50) i",
    )
    .await?;
    // worker A claims and applies side effects, then dies before COMMIT
    let a = db.session().await?;
    a.batch_execute("BEGIN").await?;
    let claimed: Vec<i64> = a
        .query(
            "SELECT id FROM inbox.claim('billing', 5, '30 seconds')",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for id in &claimed {
        a.execute("INSERT INTO credit_reserved (message) VALUES ($1)", &[id])
            .await?;
    }
    let pid: i32 = a.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
    // wait (up to 10 s) until A is gone and its transaction rolled back
    let gone: bool = c
        .query_one("SELECT pg_terminate_backend($1, 10000)", &[&pid])
        .await?
        .get(0);
    assert!(gone, "worker A terminated");
    // worker B (and a committed-claim worker C whose lease runs out) finish the job
    let c2 = db.session().await?;
    c2.batch_execute(
        "BEGIN; SELECT inbox.claim('billing', 3, '300 milliseconds'); COMMIT", // C claims, then dies
    )
    .await?;
    drop(c2);
    let b = db.session().await?;
    // B works until every message is done; C's three come back when their lease runs out
    let done = std::cell::Cell::new(0);
    let (b, done_ref) = (&b, &done);
    wait_for(
        "worker B to process 50 messages",
        Duration::from_secs(30),
        || async move {
            done_ref.set(done_ref.get() + work_once(b, "30 seconds").await?);
            Ok(done_ref.get() >= 50)
        },
    )
    .await?;
    assert_eq!(done.get(), 50);
    let (rows, distinct): (i64, i64) = {
        let r = c
            .query_one(
                "SELECT count(*), count(DISTINCT message) FROM credit_reserved",
                &[],
            )
            .await?;
        (r.get(0), r.get(1))
    };
    assert_eq!(
        (rows, distinct),
        (50, 50),
        "each credit reserved exactly once"
    );
    let open: i64 = c
        .query_one(
            "SELECT count(*) FROM inbox.messages WHERE status <> 'done'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(open, 0);
    Ok(())
}

/// A previous ingest stored an offset in the middle of the partition's last batch (its own batches
/// need not match the producer's). Some brokers serve a fetch from the middle of a batch from the
/// *next* batch, and there is none yet: the ingest must still deliver the rest of that batch.
#[tokio::test]
async fn an_offset_stored_inside_the_last_batch_is_resumed_from_exactly_there() -> Result<()> {
    let s = Scenario::builder("in_midbatch")
        .topic("events", 1)
        .start()
        .await?;
    let (db, broker) = (&s.db, &s.broker);
    let brokers = broker.bootstrap();
    // 100 records sent at once with a long linger: one batch
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("linger.ms", "200")
        .create()?;
    let sends: Vec<_> = (0..100)
        .map(|i| {
            let p = p.clone();
            tokio::spawn(async move {
                let id = format!("m{i}");
                produce(&p, "events", 0, b"k", Some(&id), b"{}").await
            })
        })
        .collect();
    let mut offsets = Vec::new();
    for s in sends {
        offsets.push(s.await??.1);
    }
    offsets.sort();
    assert_eq!(offsets, (0..100).collect::<Vec<i64>>());
    // as if an ingest had recorded 0..49 and stopped
    let c = &db.client;
    c.execute("SELECT inbox.store_offset('billing', 'events', 0, 50)", &[])
        .await?;
    let _ingest = s.ingest("billing", "events", &[])?;
    wait_for("offset 100", Duration::from_secs(60), || async {
        Ok(stored_offsets(c, "billing").await?.get(&0) == Some(&100))
    })
    .await?;
    let offsets: Vec<i64> = c
        .query(
            "SELECT \"offset\" FROM inbox.messages WHERE consumer = 'billing' ORDER BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(offsets, (50..100).collect::<Vec<i64>>(), "exactly 50..99");
    Ok(())
}

/// Headers with a name that is not UTF-8 (rdkafka's safe API cannot write one) and an id.
fn headers_with_raw_name(name: &[u8], id: &str) -> OwnedHeaders {
    let headers = OwnedHeaders::new().insert(Header {
        key: "pg_outbox-id",
        value: Some(id),
    });
    with_raw_header(headers, name, b"v")
}

#[tokio::test]
async fn a_header_name_that_is_not_utf8_or_a_huge_key_is_dead_lettered_not_a_crash() -> Result<()> {
    let s = Scenario::builder("in_poison_names")
        .topic("events", 1)
        .start()
        .await?;
    let (db, broker) = (&s.db, &s.broker);
    let brokers = broker.bootstrap();
    let mut ingest = s.ingest("billing", "events", &[])?;
    let p = producer(&brokers)?;
    produce(&p, "events", 0, b"k", Some("good-1"), b"{}").await?;
    let record = FutureRecord::<[u8], [u8]>::to("events")
        .partition(0)
        .key(b"k")
        .payload(b"{}")
        .headers(headers_with_raw_name(&[0xff, 0xfe, b'x'], "bad-name"));
    p.send(record, Duration::from_secs(30))
        .await
        .map_err(|(e, _)| e)?;
    // longer than the inbox's key index can hold, and incompressible: before, the batch failed
    // over and over
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let huge_key: Vec<u8> = (0..4000)
        .map(|_| {
            b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                [rng.random_range(0..62)]
        })
        .collect();
    produce(&p, "events", 0, &huge_key, Some("huge-key"), b"{}").await?;
    produce(&p, "events", 0, b"k", Some("good-2"), b"{}").await?;
    let c = &db.client;
    wait_for("four messages", Duration::from_secs(60), || async {
        Ok(stored_offsets(c, "billing").await?.get(&0) == Some(&4))
    })
    .await?;
    assert!(
        ingest.try_wait()?.is_none(),
        "ingest still running (no panic)"
    );
    let rows: Vec<(String, String, Option<String>, Option<String>)> = c
        .query(
            "SELECT message_id, status, last_error, key FROM inbox.messages ORDER BY \"offset\"",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let summary: Vec<(&str, &str)> = rows.iter().map(|r| (r.0.as_str(), r.1.as_str())).collect();
    assert_eq!(
        summary,
        [
            ("good-1", "pending"),
            ("bad-name", "dead"),
            ("huge-key", "dead"),
            ("good-2", "pending")
        ]
    );
    assert!(
        rows[1].2.as_deref().unwrap().contains("not valid UTF-8"),
        "{:?}",
        rows[1]
    );
    assert!(
        rows[2].2.as_deref().unwrap().contains("4000 bytes"),
        "{:?}",
        rows[2]
    );
    assert_eq!(rows[2].3, None, "the key is not kept");
    Ok(())
}

#[tokio::test]
async fn a_stored_offset_beyond_the_end_of_the_partition_stops_the_ingest() -> Result<()> {
    let s = Scenario::builder("in_reset")
        .topic("events", 1)
        .start()
        .await?;
    let (db, broker) = (&s.db, &s.broker);
    let p = producer(&broker.bootstrap())?;
    for n in 0..10 {
        produce(&p, "events", 0, b"k", Some(&format!("e{n}")), b"{}").await?;
    }
    // what a topic deleted and re-created (or another cluster) looks like: the inbox stored an
    // offset the partition never reached
    let c = &db.client;
    c.execute(
        "SELECT inbox.store_offset('billing', 'events', 0, 1000)",
        &[],
    )
    .await?;
    let mut ingest = s.ingest("billing", "events", &[])?;
    let status = ingest.wait_for_exit(Duration::from_secs(60)).await?;
    assert!(!status.success());
    let log = ingest.log_text();
    assert!(log.contains("ends at offset"), "{log}");
    assert!(log.contains("stored 1000 as its next offset"), "{log}");
    assert!(log.contains("force => true"), "{log}");
    let received: i64 = inbox_count(c).await?;
    assert_eq!(received, 0, "nothing skipped, nothing taken");
    // the operator rewinds on purpose; everything arrives
    c.execute(
        "SELECT inbox.store_offset('billing', 'events', 0, 0, force => true)",
        &[],
    )
    .await?;
    let _ingest = s.ingest("billing", "events", &[])?;
    wait_for("ten messages", Duration::from_secs(60), || async {
        Ok(stored_offsets(c, "billing").await?.get(&0) == Some(&10))
    })
    .await?;
    let received: i64 = inbox_count(c).await?;
    assert_eq!(received, 10);
    Ok(())
}

/// A topic deleted and created again that already holds more messages than the stored offset
/// looks like the old one by its offsets alone; its Kafka topic id (KIP-516) differs, and the
/// ingest stops instead of reading on from the old topic's offset. `inbox.forget_topic` is the way on.
#[tokio::test]
async fn a_topic_created_again_with_more_messages_than_the_stored_offset_stops_the_ingest(
) -> Result<()> {
    let s = Scenario::builder("in_topic_id")
        .topic("events", 1)
        .start()
        .await?;
    let (db, broker) = (&s.db, &s.broker);
    let p = producer(&broker.bootstrap())?;
    for n in 0..10 {
        produce(&p, "events", 0, b"k", Some(&format!("old-{n}")), b"{}").await?;
    }
    let c = &db.client;
    let mut ingest = s.ingest("billing", "events", &[])?;
    wait_for("ten messages", Duration::from_secs(60), || async {
        Ok(stored_offsets(c, "billing").await?.get(&0) == Some(&10))
    })
    .await?;
    ingest.terminate(Duration::from_secs(30))?;
    // deleted and created again, with more messages than the stored offset
    broker.delete_topic("events").await?;
    broker.create_topic("events", 1).await?;
    let p = producer(&broker.bootstrap())?;
    for n in 0..25 {
        produce(&p, "events", 0, b"k", Some(&format!("new-{n}")), b"{}").await?;
    }
    let mut ingest = s.ingest("billing", "events", &[])?;
    let status = ingest.wait_for_exit(Duration::from_secs(60)).await?;
    assert!(!status.success());
    let log = ingest.log_text();
    assert!(log.contains("deleted and created again"), "{log}");
    assert!(
        log.contains("inbox.forget_topic('billing', 'events')"),
        "{log}"
    );
    let received: i64 = inbox_count(c).await?;
    assert_eq!(received, 10, "nothing of the new topic skipped or taken");
    // the operator's way on: the new topic from its beginning
    let forgotten: i64 = c
        .query_one("SELECT inbox.forget_topic('billing', 'events')", &[])
        .await?
        .get(0);
    assert_eq!(forgotten, 1, "one partition's offset");
    let _ingest = s.ingest("billing", "events", &[])?;
    wait_for(
        "the new topic's 25 messages",
        Duration::from_secs(60),
        || async { Ok(stored_offsets(c, "billing").await?.get(&0) == Some(&25)) },
    )
    .await?;
    let ids: Vec<String> = c
        .query(
            "SELECT message_id FROM inbox.messages ORDER BY message_id",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids.len(), 35, "ten old and 25 new, each once");
    assert_eq!(ids.iter().filter(|id| id.starts_with("new-")).count(), 25);
    Ok(())
}
