//! Records and sessions a stranger can shape: a record any producer writes into the relay's topic or
//! an ingested one, and functions a role with CREATE on `public` defines. None of them may stall a
//! pipeline or run as the relay's role. Real PostgreSQL and the real broker; each test failed on the
//! code before its fix.

use anyhow::Result;
use pg_outbox_tests::{
    enqueue_numbered, port, read_all, wait_for, with_raw_header, Broker, Relay, Scenario, TestDb,
};
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::collections::HashMap;
use std::time::Duration;
use tokio_postgres::Client;

const TIMEOUT: Duration = Duration::from_secs(60);

fn producer(brokers: &str) -> Result<FutureProducer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "0")
        .create()?)
}

/// Produces one record to partition 0 of `topic`; returns its offset.
async fn produce(
    p: &FutureProducer,
    topic: &str,
    key: &[u8],
    headers: OwnedHeaders,
    payload: &[u8],
) -> Result<i64> {
    let record = FutureRecord::<[u8], [u8]>::to(topic)
        .partition(0)
        .key(key)
        .payload(payload)
        .headers(headers);
    let d = p
        .send(record, Duration::from_secs(30))
        .await
        .map_err(|(e, _)| e)?;
    Ok(d.offset)
}

/// How often each relay id occurs among `records`.
fn id_counts(records: &[pg_outbox_tests::Record]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for r in records
        .iter()
        .filter(|r| r.header("pg_outbox-id").is_some())
    {
        *counts.entry(r.id()).or_default() += 1;
    }
    counts
}

/// A record from a plain producer whose first header name is not UTF-8 (`ff fe 78`) sits in the
/// relay's topic when the relay restarts. The restart read-back goes over it: before, rdkafka's
/// header accessor panicked on it in every session and nothing more was published. (The poll
/// source, so that the test does not depend on the WAL seal; the read-back is the same for both.)
#[tokio::test]
async fn a_header_name_that_is_not_utf8_in_the_relays_topic_does_not_stop_the_restart() -> Result<()>
{
    let s = Scenario::builder("ho_header_name")
        .topic("orders", 1)
        .start()
        .await?;
    let (db, broker) = (&s.db, &s.broker);
    let brokers = broker.bootstrap();
    let writer = db.session().await?;
    writer.batch_execute("SET pg_outbox.mode = 'table'").await?;
    let poll = ["--source", "poll"];
    let mut relay = Relay::start(db.port, &db.name, &brokers, &poll)?;
    let mut ids = enqueue_numbered(&writer, "orders", "before", 1..=5).await?;
    assert_eq!(read_all(&brokers, &[("orders", 1)], 5, TIMEOUT)?.len(), 5);
    let status = relay.terminate(Duration::from_secs(30))?;
    assert!(status.success(), "exit status {status}");

    // the stranger's record, after the relay's last one: the read-back reads over it
    let headers = with_raw_header(OwnedHeaders::new(), &[0xff, 0xfe, b'x'], b"v").insert(Header {
        key: "pg_outbox-id",
        value: Some("stranger"),
    });
    produce(&producer(&brokers)?, "orders", b"k", headers, b"{}").await?;
    ids.extend(enqueue_numbered(&writer, "orders", "after", 1..=10).await?);

    let relay = Relay::start(db.port, &db.name, &brokers, &poll)?;
    let records = read_all(&brokers, &[("orders", 1)], 16, TIMEOUT)?;
    assert_eq!(records.len(), 16, "5 + the stranger's + 10");
    let counts = id_counts(&records);
    for id in &ids {
        assert_eq!(
            counts.get(&id.to_string()),
            Some(&1),
            "event {id} exactly once"
        );
    }
    let mut relay = relay;
    assert!(relay.try_wait()?.is_none(), "the relay still runs");
    assert!(
        !relay.log_text().contains("panicked"),
        "no panic:\n{}",
        relay.log_text()
    );
    Ok(())
}

/// Headers: `pg_outbox-id` first (the place the relay writes it), then `extra`.
fn id_headers(id: &[u8], extra: &[(&str, &[u8])]) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new().insert(Header {
        key: "pg_outbox-id",
        value: Some(id),
    });
    for (name, value) in extra {
        headers = headers.insert(Header {
            key: name,
            value: Some(*value),
        });
    }
    headers
}

/// offset, message_id, status, last_error, key, headers as text
type InboxRow = (i64, String, String, Option<String>, Option<String>, String);

/// PostgreSQL refuses a NUL byte in text (22021) and in jsonb (22P05): one in a record's key, in a
/// header value or in `pg_outbox-id` made the ingest retry the same batch forever. A refusal of one
/// message for its content (a CHECK a DBA added, class 23 here) is that message's, too. Each such
/// message is kept in the dead state with its reason, and the ten good messages after them are
/// ingested by the same session.
#[tokio::test]
async fn a_message_postgresql_refuses_is_dead_and_the_partition_flows_on() -> Result<()> {
    let db = TestDb::create("ho_nul", port()).await?;
    let c = &db.client;
    // what a DBA may add: refused with 23514 for this one message
    c.batch_execute(
        "ALTER TABLE inbox.messages ADD CONSTRAINT ho_no_refuse_me CHECK (key IS DISTINCT FROM 'refuse-me')",
    )
    .await?;
    let broker = Broker::start()?;
    broker.create_topic("events", 1).await?;
    let brokers = broker.bootstrap();
    let p = producer(&brokers)?;
    produce(&p, "events", b"k\0ey", id_headers(b"nul-key", &[]), b"{}").await?;
    let h = id_headers(b"nul-header", &[("h", b"a\0b"), ("fine", b"yes")]);
    produce(&p, "events", b"k", h, b"{}").await?;
    let nul_id = produce(&p, "events", b"k", id_headers(b"id\0x", &[]), b"{}").await?;
    let refused = produce(
        &p,
        "events",
        b"refuse-me",
        id_headers(b"refused", &[]),
        b"{}",
    )
    .await?;
    for n in 1..=10 {
        let id = format!("good-{n}");
        produce(&p, "events", b"k", id_headers(id.as_bytes(), &[]), b"{}").await?;
    }

    let mut ingest = Relay::ingest(db.port, &db.name, &brokers, "billing", "events", &[])?;
    wait_for("14 messages stored", TIMEOUT, || async {
        let next: Option<i64> = c
            .query_opt(
                "SELECT next_offset FROM inbox.offsets WHERE consumer = 'billing' AND partition = 0",
                &[],
            )
            .await?
            .map(|r| r.get(0));
        Ok(next == Some(14))
    })
    .await?;
    let rows: Vec<InboxRow> = c
        .query(
            "SELECT \"offset\", message_id, status, last_error, key, headers::text \
               FROM inbox.messages WHERE consumer = 'billing' ORDER BY \"offset\"",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
        .collect();
    assert_eq!(rows.len(), 14);
    let dead: Vec<&str> = rows.iter().map(|r| r.2.as_str()).collect();
    assert_eq!(dead[..4], ["dead"; 4]);
    assert_eq!(dead[4..], ["pending"; 10]);
    let good: Vec<String> = (1..=10).map(|n| format!("good-{n}")).collect();
    let ids: Vec<&str> = rows[4..].iter().map(|r| r.1.as_str()).collect();
    assert_eq!(ids, good);
    // the key with a NUL: not kept, the message is
    assert_eq!(rows[0].1, "nul-key");
    assert_eq!(rows[0].4, None);
    assert!(
        rows[0]
            .3
            .as_deref()
            .unwrap()
            .contains("key contains a NUL byte"),
        "{:?}",
        rows[0]
    );
    // the header value with a NUL: that header is not kept, the others are
    assert_eq!(rows[1].1, "nul-header");
    assert_eq!(
        rows[1].5,
        r#"{"fine": "yes", "pg_outbox-id": "nul-header"}"#
    );
    assert!(
        rows[1]
            .3
            .as_deref()
            .unwrap()
            .contains(r#"header "h" contains a NUL byte"#),
        "{:?}",
        rows[1]
    );
    // an id with a NUL is no id: the coordinates stand for it
    assert!(
        rows[2].1.starts_with(&format!("events/0/{nul_id}@")),
        "{:?}",
        rows[2]
    );
    assert!(
        rows[2]
            .3
            .as_deref()
            .unwrap()
            .contains(r#"header "pg_outbox-id" contains a NUL byte"#),
        "{:?}",
        rows[2]
    );
    // refused by PostgreSQL for its content: kept under its coordinates, without key or headers
    assert!(
        rows[3].1.starts_with(&format!("events/0/{refused}@")),
        "{:?}",
        rows[3]
    );
    assert_eq!((rows[3].4.as_deref(), rows[3].5.as_str()), (None, "{}"));
    assert!(
        rows[3].3.as_deref().unwrap().contains("23514"),
        "{:?}",
        rows[3]
    );
    // one session did it all
    assert!(ingest.try_wait()?.is_none(), "the ingest still runs");
    let log = ingest.log_text();
    assert!(
        !log.contains("reconnecting"),
        "the ingest restarted:\n{log}"
    );
    Ok(())
}

/// Who ran the trap functions: `function:application_name:role` per call.
async fn hijack_calls(c: &Client) -> Result<Vec<String>> {
    Ok(c.query(
        "SELECT fn || ':' || app || ':' || by_role FROM public.hijack_calls ORDER BY fn",
        &[],
    )
    .await?
    .iter()
    .map(|r| r.get(0))
    .collect())
}

/// A role that may create in `public` (any role on PostgreSQL 14, or wherever a DBA granted it)
/// defines `format` and `hashtextextended` with argument types that match the relay's calls better
/// than the built-ins. Before, `status`, `check` and the poll relay ran them as the relay's role
/// (resolving through the login's `search_path`). Now every relay session pins its own.
#[tokio::test]
async fn functions_a_writer_defines_in_public_never_run_as_the_relay() -> Result<()> {
    let db = TestDb::create("ho_search_path", port()).await?;
    let c = &db.client;
    c.batch_execute(
        "DROP ROLE IF EXISTS ho_hijacker; CREATE ROLE ho_hijacker LOGIN; \
         GRANT CREATE ON SCHEMA public TO ho_hijacker",
    )
    .await?;
    let hijacker = db.session_as("ho_hijacker").await?;
    hijacker
        .batch_execute(
            "CREATE TABLE public.hijack_calls (fn text, app text, by_role text);
             GRANT INSERT ON public.hijack_calls TO PUBLIC;
             CREATE FUNCTION public.hashtextextended(t text, seed integer) RETURNS bigint
                 LANGUAGE plpgsql AS $$
             BEGIN
                 INSERT INTO public.hijack_calls
                     VALUES ('hashtextextended', current_setting('application_name'), current_user);
                 RETURN pg_catalog.hashtextextended(t, seed);
             END $$;
             CREATE FUNCTION public.format(f text, a text, b integer, c text) RETURNS text
                 LANGUAGE plpgsql AS $$
             BEGIN
                 INSERT INTO public.hijack_calls
                     VALUES ('format', current_setting('application_name'), current_user);
                 RETURN pg_catalog.format(f, a, b, c);
             END $$;",
        )
        .await?;
    // the trap works: a session with the default path runs them
    let probe = db.session().await?;
    probe
        .batch_execute("SELECT hashtextextended('x', 0), format('%s %s %s', 'a', 1, 'b')")
        .await?;
    assert_eq!(hijack_calls(c).await?.len(), 2, "the trap is armed");
    c.batch_execute("TRUNCATE public.hijack_calls").await?;

    let broker = Broker::start()?;
    broker.create_topic("orders", 1).await?;
    let brokers = broker.bootstrap();
    // table-mode events, written by a session whose own path cannot be hijacked
    let writer = db.session().await?;
    writer
        .batch_execute("SET search_path = pg_catalog, pg_temp; SET pg_outbox.mode = 'table'")
        .await?;
    let ids = enqueue_numbered(&writer, "orders", "polled", 1..=5).await?;
    let poll = Relay::start(db.port, &db.name, &brokers, &["--source", "poll"])?;
    let records = read_all(&brokers, &[("orders", 1)], 5, TIMEOUT)?;
    let counts = id_counts(&records);
    assert_eq!(records.len(), 5);
    assert!(
        ids.iter().all(|id| counts.get(&id.to_string()) == Some(&1)),
        "{counts:?}"
    );
    // while the poll relay holds its lock and a wal relay its slot, `status` names them (format)
    let _wal = Relay::start(db.port, &db.name, &brokers, &[])?;
    db.wait_for_active_slot().await?;
    let relay_name = format!("pg_outbox_relay {}@", poll.pid());
    for args in [&["--source", "poll"][..], &[]] {
        let (ok, text) =
            pg_outbox_tests::relay_command("status", db.port, &db.name, &brokers, args)?;
        assert!(ok, "status {args:?}: {text}");
        assert!(
            text.lines()
                .any(|l| l.starts_with("active_relay") && l.contains("pg_outbox_relay")),
            "status {args:?}: {text}"
        );
        if !args.is_empty() {
            assert!(text.contains(&relay_name), "{text}");
        }
        let (_, text) = pg_outbox_tests::relay_command("check", db.port, &db.name, &brokers, args)?;
        assert!(text.contains("reachable"), "check {args:?}: {text}");
    }
    let made = hijack_calls(c).await?;
    assert_eq!(
        made,
        Vec::<String>::new(),
        "functions the relay's sessions ran"
    );
    Ok(())
}

/// `pg_sslmode = prefer` (the default) goes on without TLS when the server offers none; a login
/// with a password is then warned about, once, and never when the server took TLS.
#[tokio::test]
async fn a_password_over_a_session_without_tls_is_warned_about() -> Result<()> {
    let broker = Broker::start()?;
    let brokers = broker.bootstrap();
    let warning = "postgres session without TLS";
    // the wal_level=replica cluster offers no TLS; the logical one does
    for (port, db, tls) in [
        (pg_outbox_tests::replica_port(), "ho_no_tls", false),
        (port(), "ho_tls", true),
    ] {
        let admin = pg_outbox_tests::connect(port, "postgres").await?;
        // one statement per call: DROP/CREATE DATABASE refuse to run in an implicit transaction
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
            .await?;
        admin
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await?;
        let _ = std::fs::remove_file(std::env::temp_dir().join(format!("relay-{db}.log")));
        let args = ["--pg-password", "not-a-secret-that-matters"];
        let ingest = Relay::ingest(port, db, &brokers, "c", "events", &args)?;
        // the session opened (the ingest then finds no inbox here and retries)
        ingest
            .wait_for_log("session ended; reconnecting", 1, TIMEOUT)
            .await?;
        let log = ingest.log_text();
        let warned = log.matches(warning).count();
        assert_eq!(warned, if tls { 0 } else { 1 }, "tls {tls}:\n{log}");
        assert!(!log.contains("not-a-secret"), "{log}");
    }
    Ok(())
}

/// A role with no grant floods the slot with `pg_outbox` messages (PUBLIC may execute
/// `pg_logical_emit_message`): 100,000 of one byte in one transaction, ahead of real events. Each
/// costs a counter, not a dead-letter row and a log line (before: 100,000 INSERTs one by one and as
/// many WARN lines, with the real events behind them for a minute).
#[tokio::test]
async fn a_flood_of_unsealed_messages_costs_a_counter_and_real_events_flow() -> Result<()> {
    const FLOOD: f64 = 100_000.0;
    let db = TestDb::create("ho_flood", port()).await?;
    db.client
        .batch_execute("DROP ROLE IF EXISTS ho_nobody; CREATE ROLE ho_nobody LOGIN")
        .await?;
    db.create_slot().await?;
    let broker = Broker::start()?;
    broker.create_topic("orders", 1).await?;
    let nobody = db.session_as("ho_nobody").await?;
    nobody
        .batch_execute(
            "SELECT pg_catalog.count(pg_catalog.pg_logical_emit_message(true, 'pg_outbox', 'x')) \
               FROM pg_catalog.generate_series(1, 100000)",
        )
        .await?;
    db.client
        .batch_execute(
            "SELECT outbox.enqueue('orders', 'k', pg_catalog.jsonb_build_object('n', n)) \
               FROM pg_catalog.generate_series(1, 10) n",
        )
        .await?;
    let metrics = format!("127.0.0.1:{}", pg_outbox_tests::free_port());
    let relay = Relay::start(
        db.port,
        &db.name,
        &broker.bootstrap(),
        &["--metrics-addr", &metrics],
    )?;
    let started = std::time::Instant::now();
    let records = read_all(
        &broker.bootstrap(),
        &[("orders", 1)],
        10,
        Duration::from_secs(60),
    )?;
    println!(
        "10 real events behind 100,000 unsealed messages published {:.1} s after the relay started",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(records.len(), 10);
    pg_outbox_tests::wait_for_metric(
        &metrics,
        "pg_outbox_relay_unproven_messages_total",
        FLOOD,
        Duration::from_secs(30),
    )
    .await?;
    let text = pg_outbox_tests::scrape_metrics(&metrics)?;
    assert_eq!(
        pg_outbox_tests::metric(&text, "pg_outbox_relay_unproven_messages_total"),
        Some(FLOOD)
    );
    let dead: i64 = db
        .client
        .query_one("SELECT count(*) FROM outbox.dead_letters", &[])
        .await?
        .get(0);
    assert_eq!(dead, 0, "no row per unsealed message");
    let lines = relay
        .log_text()
        .lines()
        .filter(|l| l.contains("passed over pg_outbox messages"))
        .count();
    assert!(
        (1..=10).contains(&lines),
        "a few log lines, not one per message: {lines}"
    );
    Ok(())
}

/// The relay's peak resident memory (VmHWM), in bytes.
fn peak_rss(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmHWM in /proc/{pid}/status"))?;
    Ok(kb * 1024)
}

/// Messages far larger than any event can be sit in the slot: a role with no grants writes a
/// transactional and a non-transactional `pg_outbox` message of 120 MB, and a writer puts one in
/// the same transaction as two real events. Each costs a counter; the relay never holds one in
/// memory (before: the replication client buffered each whole, 120 MB of RSS and more), and every
/// real event, also those beside the big message in its transaction, is published once, in order,
/// also after a restart that replays them.
#[tokio::test]
async fn messages_larger_than_any_event_cost_a_counter_not_memory() -> Result<()> {
    const BIG: &str = "pg_catalog.repeat('x', 120000000)";
    let db = TestDb::create("ho_oversized", port()).await?;
    db.client
        .batch_execute("DROP ROLE IF EXISTS ho_big; CREATE ROLE ho_big LOGIN")
        .await?;
    db.create_slot().await?;
    let broker = Broker::start()?;
    broker.create_topic("orders", 1).await?;
    let brokers = broker.bootstrap();
    let nobody = db.session_as("ho_big").await?;
    let mut ids = enqueue_numbered(&db.client, "orders", "k", 1..=2).await?;
    nobody
        .batch_execute(&format!(
            "SELECT pg_catalog.pg_logical_emit_message(true, 'pg_outbox', {BIG})"
        ))
        .await?;
    ids.extend(enqueue_numbered(&db.client, "orders", "k", 3..=4).await?);
    nobody
        .batch_execute(&format!(
            "SELECT pg_catalog.pg_logical_emit_message(false, 'pg_outbox', {BIG})"
        ))
        .await?;
    // a writer's own transaction: an event, the big message, an event
    let both: Vec<uuid::Uuid> = db
        .client
        .query(
            &format!(
                "WITH a AS (SELECT outbox.enqueue('orders', 'k', '{{\"n\": 5}}') AS id), \
                      b AS (SELECT pg_catalog.pg_logical_emit_message(true, 'pg_outbox', {BIG}) \
                              FROM a), \
                      c AS (SELECT outbox.enqueue('orders', 'k', '{{\"n\": 6}}') AS id FROM b) \
                 SELECT id FROM a UNION ALL SELECT id FROM c"
            ),
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(both.len(), 2);
    ids.extend(both);
    ids.extend(enqueue_numbered(&db.client, "orders", "k", 7..=8).await?);

    let metrics = format!("127.0.0.1:{}", pg_outbox_tests::free_port());
    let relay = Relay::start(db.port, &db.name, &brokers, &["--metrics-addr", &metrics])?;
    let records = read_all(&brokers, &[("orders", 1)], 8, TIMEOUT)?;
    let got: Vec<String> = records.iter().map(|r| r.id()).collect();
    let want: Vec<String> = ids.iter().map(|u| u.to_string()).collect();
    assert_eq!(got, want, "every real event once, in commit order");
    pg_outbox_tests::wait_for_metric(
        &metrics,
        "pg_outbox_relay_unproven_messages_total",
        3.0,
        TIMEOUT,
    )
    .await?;
    let peak = peak_rss(relay.pid())?;
    println!(
        "relay peak RSS with three 120 MB messages in the slot: {} MB",
        peak >> 20
    );
    assert!(peak < 100 << 20, "peak RSS {} MB", peak >> 20);
    let dead: i64 = db
        .client
        .query_one("SELECT count(*) FROM outbox.dead_letters", &[])
        .await?
        .get(0);
    assert_eq!(dead, 0);

    // killed before it may have confirmed it all: the next one replays what the slot still holds,
    // the big messages included, and publishes nothing twice
    pg_outbox_tests::signal(relay.pid(), "KILL")?;
    drop(relay);
    ids.extend(enqueue_numbered(&db.client, "orders", "k", 9..=9).await?);
    let relay = Relay::start(db.port, &db.name, &brokers, &[])?;
    let records = read_all(&brokers, &[("orders", 1)], 9, TIMEOUT)?;
    let got: Vec<String> = records.iter().map(|r| r.id()).collect();
    let want: Vec<String> = ids.iter().map(|u| u.to_string()).collect();
    assert_eq!(got, want, "after the restart:\n{}", relay.log_text());
    Ok(())
}
