//! outbox.enqueue against a real cluster: what commits is there, what rolls back is not, in both
//! modes; bad input is refused with its documented SQLSTATE and leaves nothing behind.

use anyhow::Result;
use pg_outbox_tests::{
    edition, enqueue, expect_error, port, replica_port, Edition, OwnedEvent, TestDb,
};
use uuid::Uuid;

/// Commit, rollback and a rolled-back savepoint, in one mode; returns the ids that must exist.
async fn commit_rollback_savepoint(db: &TestDb) -> Result<Vec<Uuid>> {
    let c = &db.client;
    let mut expected = Vec::new();

    c.batch_execute("BEGIN").await?;
    expected.push(enqueue(c, "orders", "o-1", r#"{"n": 1}"#).await?);
    expected.push(enqueue(c, "payments", "o-1", r#"{"n": 2}"#).await?);
    c.batch_execute("COMMIT").await?;

    c.batch_execute("BEGIN").await?;
    enqueue(c, "orders", "ghost", r#"{"n": 3}"#).await?;
    c.batch_execute("ROLLBACK").await?;

    c.batch_execute("BEGIN").await?;
    expected.push(enqueue(c, "orders", "o-2", r#"{"n": 4}"#).await?);
    c.batch_execute("SAVEPOINT s").await?;
    enqueue(c, "orders", "ghost", r#"{"n": 5}"#).await?;
    c.batch_execute("ROLLBACK TO SAVEPOINT s").await?;
    expected.push(enqueue(c, "orders", "o-2", r#"{"n": 6}"#).await?);
    c.batch_execute("COMMIT").await?;
    Ok(expected)
}

#[tokio::test]
async fn wal_mode_publishes_exactly_the_committed_events() -> Result<()> {
    let db = TestDb::create("ob_wal_commit", port()).await?;
    db.create_slot().await?;
    let expected = commit_rollback_savepoint(&db).await?;

    let events = db.peek_wal_events().await?;
    let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
    assert_eq!(ids, expected, "commit order, no rolled-back event");
    let payloads: Vec<&[u8]> = events.iter().map(|e| e.payload.as_slice()).collect();
    assert_eq!(
        payloads,
        vec![
            &br#"{"n": 1}"#[..],
            br#"{"n": 2}"#,
            br#"{"n": 4}"#,
            br#"{"n": 6}"#
        ]
    );
    assert_eq!(events[1].topic, "payments");
    assert_eq!(events[2].key.as_deref(), Some("o-2"));
    assert!(events.iter().all(|e| e.payload_is_json));
    // UUIDv7, increasing in commit order here
    assert!(ids.iter().all(|id| id.get_version_num() == 7));
    assert!(ids.windows(2).all(|w| w[0] < w[1]));
    // nothing was written to the table
    let rows: i64 = db
        .client
        .query_one("SELECT count(*) FROM outbox.events", &[])
        .await?
        .get(0);
    assert_eq!(rows, 0);
    Ok(())
}

#[tokio::test]
async fn table_mode_keeps_exactly_the_committed_events() -> Result<()> {
    let db = TestDb::create("ob_table_commit", port()).await?;
    db.client
        .batch_execute("SET pg_outbox.mode = 'table'")
        .await?;
    let expected = commit_rollback_savepoint(&db).await?;

    let rows = db
        .client
        .query(
            "SELECT id, topic, key, convert_from(payload, 'UTF8'), payload_is_json, xid::text::bigint \
             FROM outbox.events ORDER BY seq",
            &[],
        )
        .await?;
    let ids: Vec<Uuid> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(ids, expected);
    let payloads: Vec<String> = rows.iter().map(|r| r.get(3)).collect();
    assert_eq!(
        payloads,
        vec![r#"{"n": 1}"#, r#"{"n": 2}"#, r#"{"n": 4}"#, r#"{"n": 6}"#]
    );
    assert!(rows.iter().all(|r| r.get::<_, bool>(4)));
    // the two events of the first transaction share its xid; the savepoint's survivors share theirs
    let xids: Vec<i64> = rows.iter().map(|r| r.get(5)).collect();
    assert_eq!(xids[0], xids[1]);
    assert_ne!(xids[1], xids[2]);
    // and nothing went to WAL: there is not even a slot
    Ok(())
}

#[tokio::test]
async fn wal_envelope_carries_headers_bytes_and_trace_context() -> Result<()> {
    let db = TestDb::create("ob_wal_envelope", port()).await?;
    db.create_slot().await?;
    let c = &db.client;
    c.batch_execute("BEGIN; SET LOCAL pg_outbox.trace_context = '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01'").await?;
    let json_id: Uuid = c
        .query_one(
            r#"SELECT outbox.enqueue('orders.v1', 'c-42', '{"total": 9.5}', '{"type": "OrderCreated", "attempt": 2, "replay": false, "price": 1.50, "big": 123456789012345678901234}')"#,
            &[],
        )
        .await?
        .get(0);
    c.batch_execute("COMMIT").await?;
    let bytes_id: Uuid = c
        .query_one(
            r"SELECT outbox.enqueue_bytes('blobs', NULL, '\x00ff10'::bytea)",
            &[],
        )
        .await?
        .get(0);
    let batch: Vec<Uuid> = c
        .query(
            r#"SELECT outbox.enqueue_batch('orders', ARRAY['a', NULL, 'c'], ARRAY['{"i":1}', '{"i":2}', '{"i":3}']::jsonb[])"#,
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();

    let events = db.peek_wal_events().await?;
    assert_eq!(events.len(), 5);
    let e = &events[0];
    assert_eq!(e.id, json_id);
    assert_eq!(e.topic, "orders.v1");
    assert_eq!(e.key.as_deref(), Some("c-42"));
    assert_eq!(e.payload, br#"{"total": 9.5}"#);
    let mut headers = e.headers.clone();
    headers.sort();
    assert_eq!(
        headers,
        vec![
            ("attempt".to_string(), b"2".to_vec()),
            // numbers exactly as jsonb prints them, not as a float would
            ("big".to_string(), b"123456789012345678901234".to_vec()),
            ("price".to_string(), b"1.50".to_vec()),
            ("replay".to_string(), b"false".to_vec()),
            ("type".to_string(), b"OrderCreated".to_vec()),
        ]
    );
    // in byte order of their names, as the SQL edition and the poll source write them
    let names: Vec<&str> = e.headers.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["attempt", "big", "price", "replay", "type"]);
    assert_eq!(
        e.trace_context.as_deref(),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );
    let b = &events[1];
    assert_eq!(
        (
            b.id,
            b.key.clone(),
            b.payload.clone(),
            b.payload_is_json,
            b.trace_context.clone()
        ),
        (bytes_id, None, vec![0x00, 0xff, 0x10], false, None)
    );
    let batch_events: Vec<&OwnedEvent> = events[2..].iter().collect();
    assert_eq!(batch_events.iter().map(|e| e.id).collect::<Vec<_>>(), batch);
    assert_eq!(
        batch_events
            .iter()
            .map(|e| e.key.as_deref())
            .collect::<Vec<_>>(),
        vec![Some("a"), None, Some("c")]
    );
    assert_eq!(batch_events[2].payload, br#"{"i": 3}"#);
    Ok(())
}

#[tokio::test]
async fn bad_input_is_refused_with_its_sqlstate_and_leaves_other_work_intact() -> Result<()> {
    let db = TestDb::create("ob_bad_input", port()).await?;
    db.create_slot().await?;
    let c = &db.client;
    c.batch_execute("CREATE TABLE business (n int)").await?;
    let long_topic = "x".repeat(250);
    let big = format!(r#"'{{"a": "{}"}}'"#, "y".repeat(64));
    let cases: Vec<(String, &str)> = vec![
        ("SELECT outbox.enqueue(NULL, 'k', '{}')".into(), "22004"),
        ("SELECT outbox.enqueue('', 'k', '{}')".into(), "22023"),
        ("SELECT outbox.enqueue('orders created', 'k', '{}')".into(), "22023"),
        ("SELECT outbox.enqueue('orders/v1', 'k', '{}')".into(), "22023"),
        ("SELECT outbox.enqueue('..', 'k', '{}')".into(), "22023"),
        (format!("SELECT outbox.enqueue('{long_topic}', 'k', '{{}}')"), "22023"),
        ("SELECT outbox.enqueue('orders', 'k', NULL)".into(), "22004"),
        ("SELECT outbox.enqueue('orders', 'k', '{}', '[1]')".into(), "22023"),
        (r#"SELECT outbox.enqueue('orders', 'k', '{}', '{"h": {"nested": 1}}')"#.into(), "22023"),
        (r#"SELECT outbox.enqueue('orders', 'k', '{}', '{"h": null}')"#.into(), "22023"),
        (r#"SELECT outbox.enqueue_batch('orders', ARRAY['a'], ARRAY['{}', '{}']::jsonb[])"#.into(), "22023"),
        (format!("SET pg_outbox.max_payload_bytes = 64; SELECT outbox.enqueue('orders', 'k', {big})"), "54000"),
        (format!("SET pg_outbox.max_payload_bytes = 64; SELECT outbox.enqueue_bytes('orders', 'k', convert_to({big}, 'UTF8'))"), "54000"),
        // the limit bounds the whole record: a small payload with a large key or large headers
        (format!("SET pg_outbox.max_payload_bytes = 64; SELECT outbox.enqueue('orders', '{}', '{{}}')", "k".repeat(63)), "54000"),
        (format!(r#"SET pg_outbox.max_payload_bytes = 64; SELECT outbox.enqueue('orders', 'k', '{{}}', '{{"h": "{}"}}')"#, "v".repeat(62)), "54000"),
        ("SELECT outbox.create_slot('Bad-Name')".into(), "22023"),
    ];
    for (sql, code) in &cases {
        // the business write before the failing enqueue survives (savepoint), and so does the
        // good event after it; the refused event leaves no trace
        c.batch_execute("BEGIN; INSERT INTO business VALUES (1); SAVEPOINT s")
            .await?;
        let (got, message, hint) = expect_error(c, sql).await?;
        assert_eq!(&got, code, "{sql}: {message}");
        assert!(message.starts_with("pg_outbox:"), "{sql}: {message}");
        assert!(hint.is_some_and(|h| !h.is_empty()), "{sql}: no hint");
        c.batch_execute("ROLLBACK TO SAVEPOINT s; RESET pg_outbox.max_payload_bytes")
            .await?;
        enqueue(c, "orders", "good", "{}").await?;
        c.batch_execute("COMMIT").await?;
    }
    let business: i64 = c
        .query_one("SELECT count(*) FROM business", &[])
        .await?
        .get(0);
    assert_eq!(business as usize, cases.len());
    let events = db.peek_wal_events().await?;
    assert_eq!(
        events.len(),
        cases.len(),
        "only the good events reached WAL"
    );
    assert!(events.iter().all(|e| e.key.as_deref() == Some("good")));

    // a record exactly at the limit is fine: payload (2) + key (4)
    c.batch_execute("SET pg_outbox.max_payload_bytes = 6")
        .await?;
    enqueue(c, "orders", "edge", "{}").await?;
    c.batch_execute("RESET pg_outbox.max_payload_bytes").await?;
    Ok(())
}

#[tokio::test]
async fn wal_mode_without_a_slot_is_refused() -> Result<()> {
    let db = TestDb::create("ob_no_slot", port()).await?;
    let c = &db.client;
    c.batch_execute(
        "CREATE TABLE business (n int); BEGIN; INSERT INTO business VALUES (1); SAVEPOINT s",
    )
    .await?;
    let (code, message, hint) =
        expect_error(c, "SELECT outbox.enqueue('orders', 'k', '{}')").await?;
    assert_eq!(code, "55000", "{message}");
    assert!(message.contains("ob_no_slot"), "{message}");
    assert!(hint.unwrap().contains("outbox.setup"));
    c.batch_execute("ROLLBACK TO SAVEPOINT s; COMMIT").await?;
    let n: i64 = c
        .query_one("SELECT count(*) FROM business", &[])
        .await?
        .get(0);
    assert_eq!(n, 1);
    // table mode needs no slot
    c.batch_execute("SET pg_outbox.mode = 'table'").await?;
    enqueue(c, "orders", "k", "{}").await?;
    // setup is two idempotent steps that say what they did; the slot needs the publication first
    c.batch_execute("SET pg_outbox.mode = 'wal'").await?;
    let actions = |sql: &'static str| async move {
        let rows = c.query(sql, &[]).await?;
        anyhow::Ok(
            rows.iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>(),
        )
    };
    let (code, message, hint) = expect_error(c, "SELECT * FROM outbox.create_slot()").await?;
    assert_eq!(code, "55000", "{message}");
    assert!(hint.unwrap().contains("outbox.setup"));
    let publication = "SELECT object || ' ' || action FROM outbox.create_publication()";
    let slot = "SELECT object || ' ' || action FROM outbox.create_slot()";
    assert_eq!(actions(publication).await?, vec!["publication created"]);
    assert_eq!(actions(slot).await?, vec!["slot created"]);
    assert_eq!(actions(publication).await?, vec!["publication exists"]);
    assert_eq!(actions(slot).await?, vec!["slot exists"]);
    pg_outbox_tests::setup(c).await?;
    enqueue(c, "orders", "k", "{}").await?;
    assert_eq!(db.peek_wal_events().await?.len(), 1);
    // a slot of another database does not count
    let other = TestDb::create("ob_no_slot_other", port()).await?;
    other
        .client
        .batch_execute("SET pg_outbox.slot_name = 'ob_no_slot'")
        .await?;
    let (code, _, _) =
        expect_error(&other.client, "SELECT outbox.enqueue('orders', 'k', '{}')").await?;
    assert_eq!(code, "55000");
    Ok(())
}

#[tokio::test]
async fn wal_mode_without_logical_wal_is_refused() -> Result<()> {
    let db = TestDb::create("ob_replica_level", replica_port()).await?;
    let c = &db.client;
    let (code, message, hint) =
        expect_error(c, "SELECT outbox.enqueue('orders', 'k', '{}')").await?;
    assert_eq!(code, "55000");
    assert!(message.contains("wal_level = logical"), "{message}");
    assert!(hint.unwrap().contains("pg_outbox.mode = 'table'"));
    let (code, _, _) = expect_error(c, "SELECT * FROM outbox.create_slot()").await?;
    assert_eq!(code, "55000");
    // in a new session that has not loaded the library and has no pg_outbox setting, too
    c.batch_execute("ALTER DATABASE ob_replica_level RESET pg_outbox.slot_name")
        .await?;
    let fresh = db.session().await?;
    let (code, message, _) = expect_error(&fresh, "SELECT * FROM outbox.create_slot()").await?;
    assert_eq!(code, "55000", "{message}");
    // table mode works on any cluster
    c.batch_execute("SET pg_outbox.mode = 'table'").await?;
    enqueue(c, "orders", "k", "{}").await?;
    let n: i64 = c
        .query_one("SELECT count(*) FROM outbox.events", &[])
        .await?
        .get(0);
    assert_eq!(n, 1);
    Ok(())
}

#[tokio::test]
async fn only_writers_may_enqueue() -> Result<()> {
    let db = TestDb::create("ob_roles", port()).await?;
    db.create_slot().await?;
    db.client
        .batch_execute(
            "DROP ROLE IF EXISTS ob_app; DROP ROLE IF EXISTS ob_stranger; \
             CREATE ROLE ob_app LOGIN IN ROLE outbox_writer; CREATE ROLE ob_stranger LOGIN",
        )
        .await?;
    let app = db.session_as("ob_app").await?;
    enqueue(&app, "orders", "k", r#"{"by": "app"}"#).await?;
    app.batch_execute("SET pg_outbox.mode = 'table'").await?;
    enqueue(&app, "orders", "k", r#"{"by": "app"}"#).await?;
    // a writer cannot read, write or delete the outbox directly, nor read the sealing key, nor
    // touch the inbox
    let (code, _, _) = expect_error(&app, "SELECT * FROM outbox.events").await?;
    assert_eq!(code, "42501");
    let (code, _, _) = expect_error(
        &app,
        "INSERT INTO outbox.events (id, topic, payload, xid) \
         VALUES (gen_random_uuid(), 'orders', '', '1'::xid8)",
    )
    .await?;
    assert_eq!(
        code, "42501",
        "a writer's own row could skip validation and order"
    );
    let (code, _, _) = expect_error(&app, "SELECT key FROM outbox.auth_key").await?;
    assert_eq!(code, "42501");
    let (code, _, _) = expect_error(&app, "SELECT outbox.relay_auth_key()").await?;
    assert_eq!(code, "42501");
    let (code, _, _) = expect_error(&app, "SELECT inbox.try_receive('c', 'm')").await?;
    assert_eq!(code, "42501");

    let stranger = db.session_as("ob_stranger").await?;
    let (code, _, _) =
        expect_error(&stranger, "SELECT outbox.enqueue('orders', 'k', '{}')").await?;
    assert_eq!(code, "42501");
    let (code, _, _) = expect_error(
        &stranger,
        "INSERT INTO outbox.events (id, topic, payload) VALUES (gen_random_uuid(), 'orders', '')",
    )
    .await?;
    assert_eq!(code, "42501");
    assert_eq!(db.peek_wal_events().await?.len(), 1);
    let rows: i64 = db
        .client
        .query_one("SELECT count(*) FROM outbox.events", &[])
        .await?
        .get(0);
    assert_eq!(
        rows, 1,
        "the table-mode event, inserted by enqueue as the table's owner"
    );
    Ok(())
}

/// Both modes refuse the same headers and trace contexts with 22023 and write nothing: the relay's
/// own header names (in any case, through every enqueue function), empty and overlong names,
/// overlong trace contexts, and headers nested deeper than anyone needs.
#[tokio::test]
async fn both_modes_validate_headers_alike_and_reserve_the_relays_names() -> Result<()> {
    let db = TestDb::create("ob_header_rules", port()).await?;
    db.create_slot().await?;
    let c = &db.client;
    let long_name = "n".repeat(2000);
    let long_trace = "t".repeat(2000);
    let deep_object = format!("{}1{}", r#"{"h": "#.repeat(200), "}".repeat(200));
    let deep_array = format!(r#"{{"h": {}1{}}}"#, "[".repeat(10_000), "]".repeat(10_000));
    let cases: Vec<String> = vec![
        r#"SELECT outbox.enqueue('orders', 'k', '{}', '{"pg_outbox-id": "same"}')"#.into(),
        r#"SELECT outbox.enqueue('orders', 'k', '{}', '{"ok": 1, "PG_OUTBOX-Position": "F:F"}')"#.into(),
        r#"SELECT outbox.enqueue_bytes('orders', 'k', '\x00', '{"pg_outbox-source": "x"}')"#.into(),
        r#"SELECT outbox.enqueue_batch('orders', ARRAY['a'], ARRAY['{}']::jsonb[], '{"pg_outbox-id": "x"}')"#.into(),
        r#"SELECT outbox.enqueue('orders', 'k', '{}', '{"": "v"}')"#.into(),
        format!(r#"SELECT outbox.enqueue('orders', 'k', '{{}}', '{{"{long_name}": "v"}}')"#),
        format!("SET LOCAL pg_outbox.trace_context = '{long_trace}'; SELECT outbox.enqueue('orders', 'k', '{{}}')"),
        format!("SELECT outbox.enqueue('orders', 'k', '{{}}', '{deep_object}')"),
        format!("SELECT outbox.enqueue('orders', 'k', '{{}}', '{deep_array}')"),
    ];
    for mode in ["wal", "table"] {
        for sql in &cases {
            c.batch_execute(&format!("BEGIN; SET LOCAL pg_outbox.mode = '{mode}'"))
                .await?;
            let (code, message, hint) = expect_error(c, sql).await?;
            let shown = &sql[..sql.len().min(120)];
            assert_eq!(code, "22023", "{mode}: {shown}: {message}");
            assert!(
                message.starts_with("pg_outbox:"),
                "{mode}: {shown}: {message}"
            );
            assert!(
                hint.is_some_and(|h| !h.is_empty()),
                "{mode}: {shown}: no hint"
            );
            c.batch_execute("ROLLBACK").await?;
        }
    }
    let (_, message, _) = expect_error(c, &cases[1]).await?;
    assert!(
        message.contains("PG_OUTBOX-Position"),
        "names the header: {message}"
    );
    assert!(db.peek_wal_events().await?.is_empty());
    let rows: i64 = c
        .query_one("SELECT count(*) FROM outbox.events", &[])
        .await?
        .get(0);
    assert_eq!(rows, 0);
    // a header that merely mentions the prefix elsewhere is fine
    enqueue(c, "orders", "k", "{}").await?;
    c.execute(
        r#"SELECT outbox.enqueue('orders', 'k', '{}', '{"x-pg_outbox-id": "fine"}')"#,
        &[],
    )
    .await?;
    assert_eq!(db.peek_wal_events().await?.len(), 2);
    Ok(())
}

#[tokio::test]
async fn the_payload_is_the_jsonb_text_exactly() -> Result<()> {
    let db = TestDb::create("ob_wal_jsonb_text", port()).await?;
    db.create_slot().await?;
    let c = &db.client;
    // jsonb normalises key order and whitespace but keeps numeric precision; so must the payload
    let input = r#"{"zeta": 1.000000000000000000000000001, "a": [1, 2.50, {"b": null}], "big": 123456789012345678901234567890}"#;
    let id = enqueue(c, "orders", "k", input).await?;
    let expected: String = c
        .query_one("SELECT $1::text::jsonb::text", &[&input])
        .await?
        .get(0);
    let events = db.peek_wal_events().await?;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].id, id);
    assert_eq!(String::from_utf8_lossy(&events[0].payload), expected);
    assert!(expected.contains("1.000000000000000000000000001"));
    Ok(())
}

/// docs/guarantees.md, "The security boundary in the database": every function pins search_path
/// except `outbox.setup` (PostgreSQL forbids COMMIT with a SET clause) and the C enqueue functions,
/// which resolve no names.
#[tokio::test]
async fn every_function_pins_search_path_but_the_documented_ones() -> Result<()> {
    let db = TestDb::create("ob_search_path", port()).await?;
    let unpinned: Vec<String> = db
        .client
        .query(
            "SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
              WHERE n.nspname IN ('outbox', 'inbox') \
                AND NOT coalesce('search_path=pg_catalog, pg_temp' = ANY (p.proconfig), false) \
              ORDER BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    // the C extension's enqueue functions resolve no names (see src/outbox.rs); the SQL edition's
    // are SECURITY DEFINER, which must pin it
    let expected = match edition() {
        Edition::Extension => vec![
            "outbox._enqueue_batch_json(text,text[],text[],jsonb)",
            "outbox.enqueue(text,text,jsonb)",
            "outbox.enqueue(text,text,jsonb,jsonb)",
            "outbox.enqueue_bytes(text,text,bytea,jsonb)",
            "outbox.setup(text)",
        ],
        // the helpers of the hot path run only inside the SECURITY DEFINER entry points, which
        // pin it (pg_outbox/sql/edition.sql); nobody else may call them
        Edition::Sql => vec![
            "outbox._check_event(bigint,bigint,bigint,text[],bigint,text)",
            "outbox._check_topic(text)",
            "outbox._check_wal_ready(text)",
            "outbox._enqueue(text,text[],bytea[],boolean,jsonb)",
            "outbox._header_pairs(jsonb)",
            "outbox.setup(text)",
        ],
    };
    assert_eq!(unpinned, expected);
    let definers_unpinned: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
              WHERE n.nspname IN ('outbox', 'inbox') AND p.prosecdef \
                AND NOT coalesce('search_path=pg_catalog, pg_temp' = ANY (p.proconfig), false)",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(
        definers_unpinned, 0,
        "every SECURITY DEFINER function pins search_path"
    );
    Ok(())
}

/// Event ids of one session increase, also within one millisecond (a batch of 2,000 takes less).
#[tokio::test]
async fn event_ids_of_a_session_increase() -> Result<()> {
    let db = TestDb::create("ob_id_order", port()).await?;
    db.create_slot().await?;
    let ids: Vec<Uuid> = db
        .client
        .query(
            "SELECT outbox.enqueue_batch('orders', array_fill(NULL::text, ARRAY[2000]), \
                    array_fill('{}'::jsonb, ARRAY[2000]))",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids.len(), 2000);
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids in creation order");
    assert!(ids.iter().all(|id| id.get_version_num() == 7));
    let single = enqueue(&db.client, "orders", "k", "{}").await?;
    assert!(single > ids[1999]);
    Ok(())
}

/// DROP and CREATE EXTENSION make a new sealing key. A session that sealed with the old key must
/// seal its next event with the new one (it cached the old key, and the relay dead-letters what does
/// not open, telling the writer nothing).
#[tokio::test]
async fn a_session_seals_with_the_new_key_after_the_extension_is_created_again() -> Result<()> {
    let db = TestDb::create("ob_key_change", port()).await?;
    if edition() == Edition::Sql {
        // the SQL edition reads the key on every call; re-installing it is not DROP EXTENSION
        return Ok(());
    }
    db.create_slot().await?;
    let writer = db.session().await?;
    enqueue(&writer, "orders", "k", r#"{"n": 1}"#).await?;
    db.client
        .batch_execute("DROP EXTENSION pg_outbox CASCADE; CREATE EXTENSION pg_outbox")
        .await?;
    pg_outbox_tests::setup(&db.client).await?;
    enqueue(&writer, "orders", "k", r#"{"n": 2}"#).await?;
    let key: Vec<u8> = db
        .client
        .query_one("SELECT key FROM outbox.auth_key", &[])
        .await?
        .get(0);
    let messages = pg_outbox_tests::peek_wal_messages(&db.client, &db.name).await?;
    assert_eq!(messages.len(), 2);
    let (xid, last) = &messages[1];
    pg_outbox_envelope::open(last, &key, *xid)
        .map_err(|e| anyhow::anyhow!("the second event does not open with the new key: {e:?}"))?;
    let (xid, first) = &messages[0];
    assert!(
        pg_outbox_envelope::open(first, &key, *xid).is_err(),
        "the first event was sealed with the old key"
    );
    Ok(())
}

/// docs/sql-edition.md, "What differs from the C extension": the SQL edition's owner (no superuser)
/// cannot set a database default for a `pg_outbox.*` setting (PostgreSQL refuses ALTER DATABASE ...
/// SET for a setting no library defines), and the way the docs give instead, the connection's
/// options, works.
#[tokio::test]
async fn the_sql_editions_owner_sets_defaults_per_connection() -> Result<()> {
    if edition() != Edition::Sql {
        return Ok(());
    }
    let db = TestDb::create("ob_owner_settings", port()).await?;
    let owner = db.session_as(pg_outbox_tests::SQL_EDITION_OWNER).await?;
    let (code, _, _) = expect_error(
        &owner,
        &format!("ALTER DATABASE {} SET pg_outbox.mode = 'table'", db.name),
    )
    .await?;
    assert_eq!(
        code, "42501",
        "docs/sql-edition.md says this needs a superuser"
    );
    let conninfo = format!(
        "host=127.0.0.1 port={} user={} dbname={} options='-c pg_outbox.mode=table'",
        db.port,
        pg_outbox_tests::SQL_EDITION_OWNER,
        db.name
    );
    let (client, connection) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    enqueue(&client, "orders", "k", "{}").await?;
    let rows: i64 = db
        .client
        .query_one("SELECT count(*) FROM outbox.events", &[])
        .await?
        .get(0);
    assert_eq!(
        rows, 1,
        "the event went to the table, as the connection said"
    );
    Ok(())
}

/// The SQL edition keeps a session's last event id in a setting the writer can change
/// (`pg_outbox.last_event_id`): that must not let a writer make an id that exists already, nor move
/// its ids ahead of the clock.
#[tokio::test]
async fn a_writer_cannot_choose_its_event_ids() -> Result<()> {
    let db = TestDb::create("ob_chosen_ids", port()).await?;
    db.create_slot().await?;
    let existing = enqueue(&db.client, "orders", "k", "{}").await?;
    let writer = db.session().await?;
    // the id just before an existing one: counting up would make the existing id again
    let mut before = *existing.as_bytes();
    let low = u32::from_be_bytes([before[12], before[13], before[14], before[15]]);
    before[12..].copy_from_slice(&low.wrapping_sub(1).to_be_bytes());
    let far_ahead = uuid::Uuid::from_u128((u128::from(u64::MAX >> 16) << 80) | 7);
    for chosen in [Uuid::from_bytes(before), far_ahead] {
        writer
            .batch_execute(&format!(
                "SET pg_outbox.last_event_id = '{}'",
                chosen.simple()
            ))
            .await?;
        let id = enqueue(&writer, "orders", "k", "{}").await?;
        assert_ne!(id, existing, "a writer made an existing id again");
        let ms = |u: &Uuid| u128::from_be_bytes(*u.as_bytes()) >> 80;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis();
        assert!(
            ms(&id) <= now + 1000,
            "an id {} ms ahead of the clock",
            ms(&id) - now
        );
    }
    Ok(())
}
