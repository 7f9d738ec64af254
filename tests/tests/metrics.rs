//! `/metrics` against a real PostgreSQL and Tansu: the labelled series move exactly as the events
//! do (sent and published per topic and partition, a dead letter on its topic and partition,
//! replays skipped after a restart on theirs), the database figures are sampled (slot lag and
//! retained WAL, the outbox table's backlog, stored dead letters), and the ingest's lag per
//! partition falls to zero once the inbox holds every message.

use anyhow::Result;
use pg_outbox_relay::sink::partition::partition_for;
use pg_outbox_tests::{
    free_port, metric, metric_with, scrape_metrics, wait_for, wait_for_metric, Scenario,
};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio_postgres::Client;
use uuid::Uuid;

const PUBLISHED: &str = "pg_outbox_relay_events_published_total";
const SENT: &str = "pg_outbox_relay_events_sent_total";
const SKIPPED: &str = "pg_outbox_relay_events_skipped_total";
const DEAD: &str = "pg_outbox_relay_events_dead_lettered_total";

/// The database figures are read every 10 s: two rounds and some.
const SAMPLED: Duration = Duration::from_secs(35);

/// Enqueues `n` events to `topic` (of `partitions`) with keys `<prefix>0..`; returns how many went
/// to each partition, by the relay's partitioner.
async fn enqueue_spread(
    c: &Client,
    topic: &str,
    partitions: i32,
    prefix: &str,
    n: usize,
    per_partition: &mut BTreeMap<(String, i32), f64>,
) -> Result<()> {
    for i in 0..n {
        let key = format!("{prefix}{i}");
        let id: Uuid = c
            .query_one(
                "SELECT outbox.enqueue($1, $2, jsonb_build_object('n', $3::int))",
                &[&topic, &key, &(i as i32)],
            )
            .await?
            .get(0);
        let p = partition_for(Some(key.as_bytes()), id.as_bytes(), partitions);
        *per_partition.entry((topic.to_string(), p)).or_default() += 1.0;
    }
    Ok(())
}

fn labels<'a>(topic: &'a str, partition: &'a str) -> [(&'a str, &'a str); 2] {
    [("topic", topic), ("partition", partition)]
}

#[tokio::test]
async fn wal_counters_are_labelled_per_topic_and_partition_and_the_slot_is_sampled() -> Result<()> {
    let s = Scenario::builder("mx_wal")
        .topic("orders", 3)
        .topic("payments", 2)
        .start()
        .await?;
    let relay = s
        .relay()
        .args(&["--max-record-bytes", "2048"])
        .metrics()
        .running()
        .await?;
    let addr = relay.metrics_addr().to_string();
    let c = &s.db.client;
    let mut expected = BTreeMap::new();
    enqueue_spread(c, "orders", 3, "o", 20, &mut expected).await?;
    enqueue_spread(c, "payments", 2, "p", 10, &mut expected).await?;
    // one event too large for max_record_bytes: dead-lettered where it would have gone
    let big: Uuid = c
        .query_one(
            "SELECT outbox.enqueue('orders', 'big', jsonb_build_object('pad', repeat('x', 4000)))",
            &[],
        )
        .await?
        .get(0);
    let big_partition = partition_for(Some(b"big"), big.as_bytes(), 3).to_string();

    wait_for_metric(&addr, PUBLISHED, 30.0, Duration::from_secs(60)).await?;
    wait_for_metric(&addr, DEAD, 1.0, Duration::from_secs(60)).await?;
    let text = scrape_metrics(&addr)?;
    for ((topic, p), n) in &expected {
        let p = p.to_string();
        assert_eq!(
            metric_with(&text, PUBLISHED, &labels(topic, &p)),
            Some(*n),
            "{topic}[{p}]\n{text}"
        );
        assert_eq!(metric_with(&text, SENT, &labels(topic, &p)), Some(*n));
    }
    assert_eq!(metric(&text, PUBLISHED), Some(30.0), "{text}");
    assert_eq!(
        metric(&text, SENT),
        Some(30.0),
        "the dead letter was never sent"
    );
    assert_eq!(
        metric_with(&text, DEAD, &labels("orders", &big_partition)),
        Some(1.0),
        "{text}"
    );
    assert_eq!(metric(&text, DEAD), Some(1.0));
    // (a labelled counter shows no series until something is counted in it)
    assert_eq!(metric(&text, SKIPPED), None, "nothing replayed");
    // each topic was read back once, on its first event of the session
    for topic in ["orders", "payments"] {
        assert_eq!(
            metric_with(
                &text,
                "pg_outbox_relay_readback_duration_seconds_count",
                &[("topic", topic)]
            ),
            Some(1.0),
            "{text}"
        );
    }
    assert_eq!(
        metric_with(&text, "pg_outbox_relay_info", &[("mode", "run")]),
        Some(1.0)
    );
    assert_eq!(metric(&text, "pg_outbox_relay_up"), Some(1.0));
    assert_eq!(metric(&text, "pg_outbox_relay_standby"), Some(0.0));

    // the database's figures: the stored dead letter, and a slot that keeps up
    wait_for("the dead letter sampled", SAMPLED, || async {
        Ok(metric(
            &scrape_metrics(&addr)?,
            "pg_outbox_relay_dead_letters_stored",
        ) == Some(1.0))
    })
    .await?;
    let text = scrape_metrics(&addr)?;
    let lag = metric(&text, "pg_outbox_relay_slot_confirmed_lag_bytes").unwrap();
    let retained = metric(&text, "pg_outbox_relay_slot_retained_wal_bytes").unwrap();
    assert!(
        (0.0..16e6).contains(&lag),
        "confirmed lag {lag} bytes after everything was published"
    );
    assert!(
        retained >= lag && retained < 1e9,
        "retained {retained} bytes, lag {lag}"
    );
    assert_eq!(metric(&text, "pg_outbox_relay_gaps_stored"), Some(0.0));
    assert!(metric(&text, "pg_outbox_relay_database_sampled_timestamp_seconds").unwrap() > 1.6e9);
    Ok(())
}

#[tokio::test]
async fn a_replay_after_a_restart_is_counted_skipped_per_partition_and_the_backlog_is_sampled(
) -> Result<()> {
    let s = Scenario::builder("mx_poll")
        .table_mode()
        .topic("orders", 2)
        .start()
        .await?;
    let c = &s.db.client;
    // the relay's deletes of published rows are dropped: its successor reads them again
    c.batch_execute(
        "CREATE FUNCTION public.keep_rows() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NULL; END$$;
         CREATE TRIGGER keep_rows BEFORE DELETE ON outbox.events FOR EACH ROW EXECUTE FUNCTION public.keep_rows();",
    )
    .await?;
    let mut expected = BTreeMap::new();
    enqueue_spread(c, "orders", 2, "k", 12, &mut expected).await?;

    let mut first = s
        .relay()
        .args(&["--source", "poll"])
        .metrics()
        .running()
        .await?;
    let addr = first.metrics_addr().to_string();
    wait_for_metric(&addr, PUBLISHED, 12.0, Duration::from_secs(60)).await?;
    wait_for("the backlog sampled", SAMPLED, || async {
        Ok(metric(
            &scrape_metrics(&addr)?,
            "pg_outbox_relay_table_backlog_events",
        ) == Some(12.0))
    })
    .await?;
    let status = first.terminate(Duration::from_secs(30))?;
    assert!(status.success(), "{status}");

    c.batch_execute("DROP TRIGGER keep_rows ON outbox.events")
        .await?;
    let second = s
        .relay()
        .args(&["--source", "poll"])
        .metrics()
        .running()
        .await?;
    let addr = second.metrics_addr().to_string();
    wait_for_metric(&addr, SKIPPED, 12.0, Duration::from_secs(60)).await?;
    let text = scrape_metrics(&addr)?;
    for ((topic, p), n) in &expected {
        let p = p.to_string();
        assert_eq!(
            metric_with(&text, SKIPPED, &labels(topic, &p)),
            Some(*n),
            "{topic}[{p}]\n{text}"
        );
    }
    assert_eq!(
        metric(&text, PUBLISHED),
        None,
        "nothing published again\n{text}"
    );
    assert_eq!(metric(&text, SENT), None);
    // the skipped rows count as done: deleted now, and the backlog says so
    wait_for("the backlog sampled empty", SAMPLED, || async {
        Ok(metric(
            &scrape_metrics(&addr)?,
            "pg_outbox_relay_table_backlog_events",
        ) == Some(0.0))
    })
    .await?;
    assert_eq!(s.read(12)?.len(), 12, "each event once in Kafka");
    Ok(())
}

#[tokio::test]
async fn ingest_lag_is_per_partition_and_falls_to_zero_once_the_inbox_holds_everything(
) -> Result<()> {
    let s = Scenario::builder("mx_ingest")
        .topic("events", 2)
        .start()
        .await?;
    let c = &s.db.client;
    // the inbox refuses every batch at first (not for a message's content: the session restarts)
    c.batch_execute(
        "CREATE FUNCTION public.refuse() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RAISE EXCEPTION 'not yet'; END$$;
         CREATE TRIGGER refuse BEFORE INSERT ON inbox.messages FOR EACH ROW EXECUTE FUNCTION public.refuse();",
    )
    .await?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", s.brokers())
        .create()?;
    for (partition, n) in [(0, 7), (1, 3)] {
        for i in 0..n {
            let id = format!("m-{partition}-{i}");
            producer
                .send(
                    FutureRecord::<str, str>::to("events")
                        .partition(partition)
                        .key(&id)
                        .payload("{}"),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(e, _)| e)?;
        }
    }
    let addr = format!("127.0.0.1:{}", free_port());
    let _ingest = s.ingest("mx", "events", &["--metrics-addr", &addr])?;
    let lag = |text: &str, p: &str| {
        metric_with(
            text,
            "pg_outbox_relay_ingest_lag_messages",
            &labels("events", p),
        )
    };
    wait_for(
        "the lag of each partition",
        Duration::from_secs(60),
        || async {
            let text = scrape_metrics(&addr).unwrap_or_default();
            Ok(lag(&text, "0") == Some(7.0) && lag(&text, "1") == Some(3.0))
        },
    )
    .await?;
    let text = scrape_metrics(&addr)?;
    assert_eq!(
        metric(&text, "pg_outbox_relay_messages_ingested_total"),
        None
    );

    c.batch_execute("DROP TRIGGER refuse ON inbox.messages")
        .await?;
    wait_for_metric(
        &addr,
        "pg_outbox_relay_messages_ingested_total",
        10.0,
        Duration::from_secs(60),
    )
    .await?;
    wait_for("no lag", SAMPLED, || async {
        let text = scrape_metrics(&addr)?;
        Ok(lag(&text, "0") == Some(0.0) && lag(&text, "1") == Some(0.0))
    })
    .await?;
    let text = scrape_metrics(&addr)?;
    assert_eq!(
        metric_with(
            &text,
            "pg_outbox_relay_messages_ingested_total",
            &[("topic", "events")]
        ),
        Some(10.0)
    );
    assert_eq!(
        metric(&text, "pg_outbox_relay_ingest_delay_seconds_count"),
        Some(10.0),
        "each message's time from its record timestamp to the inbox"
    );
    assert_eq!(
        metric_with(
            &text,
            "pg_outbox_relay_info",
            &[("mode", "ingest"), ("source", "mx")]
        ),
        Some(1.0)
    );

    // a worker completes three: their wait is sampled
    let done: i64 = c
        .query_one(
            "WITH claimed AS (SELECT * FROM inbox.claim('mx', 3)) \
             SELECT count(*) FILTER (WHERE inbox.complete(claimed.id, claimed.claim_token)) FROM claimed",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(done, 3);
    wait_for("the completed messages sampled", SAMPLED, || async {
        Ok(metric(
            &scrape_metrics(&addr)?,
            "pg_outbox_relay_inbox_done_delay_seconds_count",
        ) == Some(3.0))
    })
    .await?;
    Ok(())
}
