//! A writer stays a writer (docs/guarantees.md, "The security boundary in the database"; DESIGN.md,
//! "Trust boundary in the database").
//!
//! Whatever runs with rights its caller lacks (the C extension's owner switch, the SQL edition's
//! SECURITY DEFINER functions) must resolve no name through the caller's `search_path`. Each test
//! arms the classic hijacks (CVE-2018-1058) as a login that has only `outbox_writer` and
//! `inbox_consumer`: temporary domains named like every type the code uses, a schema of its own
//! first in its path with `=` operators and functions named like the built-ins that match better,
//! and the same in `public` where a DBA granted CREATE. Then it calls every entry point a writer
//! may call, in both modes. Every hijack function records that it ran (in `public.hijack_log`,
//! which anyone may insert into) and tries to make the writer a superuser. Expected: no hijack ran,
//! the writer is not a superuser, and the events are exactly the real ones.
//!
//! Runs against either edition (`PG_OUTBOX_EDITION=sql`, as scripts/test.sh does).

use anyhow::{ensure, Result};
use pg_outbox_tests::{edition, expect_error, port, Edition, TestDb};
use tokio_postgres::Client;

/// Types named in the extension's and the edition's SQL and in the owner switch.
const TYPES: &[&str] = &[
    "jsonb",
    "text",
    "uuid",
    "bytea",
    "bool",
    "xid8",
    "timestamptz",
    "regclass",
    "oid",
    "int4",
    "int8",
];

/// A database whose writer `role` has armed every hijack in `session`; the log and the victim
/// role are set up by the superuser.
async fn victim(name: &str) -> Result<(TestDb, String)> {
    let db = TestDb::create(name, port()).await?;
    db.create_slot().await?;
    let role = format!("{name}_w");
    db.client
        .batch_execute(&format!(
            "DO $$ BEGIN IF EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN
                 EXECUTE 'DROP OWNED BY {role} CASCADE'; EXECUTE 'DROP ROLE {role}'; END IF; END $$;
             CREATE ROLE {role} LOGIN NOSUPERUSER IN ROLE outbox_writer, inbox_consumer;
             CREATE SCHEMA {role} AUTHORIZATION {role};
             GRANT CREATE ON SCHEMA public TO {role};
             CREATE TABLE public.hijack_log (who text, what text);
             GRANT INSERT ON public.hijack_log TO PUBLIC;"
        ))
        .await?;
    Ok((db, role))
}

/// Arms every hijack in the writer's `session`: in `pg_temp` (types), in its own schema first in
/// its path and in `public` (operators and functions). `evil(what)` logs and tries to escalate.
async fn arm(session: &Client, role: &str) -> Result<()> {
    let mut sql = String::new();
    for schema in ["pg_temp", role, "public"] {
        sql += &format!(
            "CREATE FUNCTION {schema}.evil(what pg_catalog.text) RETURNS pg_catalog.bool
                 LANGUAGE plpgsql AS $f$
             BEGIN
                 INSERT INTO public.hijack_log VALUES (CURRENT_USER, what);
                 BEGIN EXECUTE 'ALTER ROLE {role} SUPERUSER'; EXCEPTION WHEN OTHERS THEN NULL; END;
                 RETURN true;
             END $f$;\n"
        );
        // types: a domain wins over pg_catalog's type only in pg_temp, but try every schema
        for ty in TYPES {
            sql += &format!(
                "CREATE DOMAIN {schema}.{ty} AS pg_catalog.{ty}
                     CHECK ({schema}.evil('domain {schema}.{ty}'));\n"
            );
        }
        if schema == "pg_temp" {
            continue; // functions and operators are never looked up in pg_temp
        }
        // operators that match better than pg_catalog's (the owner switch compared oid = regclass)
        for (left, right) in [
            ("oid", "regclass"),
            ("pg_catalog.text", "pg_catalog.varchar"),
            ("pg_catalog.uuid", "pg_catalog.text"),
            ("pg_catalog.int4", "pg_catalog.int8"),
            ("pg_catalog.bytea", "pg_catalog.text"),
        ] {
            let fname = format!(
                "eq_{}_{}",
                left.replace("pg_catalog.", ""),
                right.replace("pg_catalog.", "")
            );
            sql += &format!(
                "CREATE FUNCTION {schema}.{fname}(pg_catalog.{l}, pg_catalog.{r}) RETURNS pg_catalog.bool
                     LANGUAGE sql AS $f$ SELECT {schema}.evil('operator {schema}.= ({left}, {right})') $f$;
                 CREATE OPERATOR {schema}.= (LEFTARG = pg_catalog.{l}, RIGHTARG = pg_catalog.{r},
                                             FUNCTION = {schema}.{fname});\n",
                l = left.replace("pg_catalog.", ""),
                r = right.replace("pg_catalog.", ""),
            );
        }
        // functions named like the built-ins the code calls, with argument types that match better
        for (name, args) in [
            ("format", "pg_catalog.varchar, pg_catalog.varchar"),
            ("format", "pg_catalog.varchar"),
            ("hashtextextended", "pg_catalog.varchar, pg_catalog.int4"),
            ("length", "pg_catalog.varchar"),
            ("jsonb_typeof", "pg_catalog.json"),
            ("convert_to", "pg_catalog.varchar, pg_catalog.varchar"),
            ("sha256", "pg_catalog.text"),
            ("pg_current_xact_id", ""),
            ("clock_timestamp", ""),
            ("now", ""),
            ("gen_random_uuid", ""),
            ("pg_notify", "pg_catalog.varchar, pg_catalog.varchar"),
        ] {
            sql += &format!(
                "CREATE FUNCTION {schema}.{name}({args}) RETURNS pg_catalog.bool
                     LANGUAGE sql AS $f$ SELECT {schema}.evil('function {schema}.{name}({args})') $f$;\n"
            );
        }
    }
    session.batch_execute(&sql).await?;
    Ok(())
}

/// Every entry point a writer may call, in both modes; the casts in the caller's own statements
/// name pg_catalog's types (the writer's own domains would otherwise run in its own statement,
/// which is no escalation but would log). Returns how many events were written in each mode.
async fn call_everything(session: &Client) -> Result<(i64, i64)> {
    let calls = [
        "SELECT outbox.enqueue('orders', 'k', '{\"n\": 1}'::pg_catalog.jsonb)",
        "SELECT outbox.enqueue('orders', 'k', '{\"n\": 2}'::pg_catalog.jsonb, \
                '{\"h\": \"v\"}'::pg_catalog.jsonb)",
        "SELECT outbox.enqueue_bytes('orders', 'k', '\\x0102'::pg_catalog.bytea, \
                '{}'::pg_catalog.jsonb)",
        "SELECT outbox.enqueue_batch('orders', ARRAY['a', 'b']::pg_catalog.text[], \
                ARRAY['{\"n\": 3}', '{\"n\": 4}']::pg_catalog.jsonb[])",
        "SELECT outbox._enqueue_batch_json('orders', ARRAY['c']::pg_catalog.text[], \
                ARRAY['{\"n\": 5}']::pg_catalog.text[], '{}'::pg_catalog.jsonb)",
    ];
    let per_mode = 6;
    for mode in ["wal", "table"] {
        session
            .batch_execute(&format!("SET pg_outbox.mode = '{mode}'"))
            .await?;
        for call in calls {
            session.batch_execute(call).await?;
        }
    }
    // the inbox functions a consumer may call
    for call in [
        "SELECT inbox.try_receive('c', 'm1'::pg_catalog.text)",
        "SELECT inbox.store_offset('c', 'orders', 0, 5::pg_catalog.int8)",
        "SELECT inbox.get_offset('c', 'orders', 0)",
        "SELECT * FROM inbox.claim('c', 1)",
        "SELECT inbox.purge('c')",
    ] {
        session.batch_execute(call).await?;
    }
    Ok((per_mode, per_mode))
}

async fn assert_unharmed(db: &TestDb, role: &str, expected: (i64, i64)) -> Result<()> {
    // the checks themselves must not run what the writer put in public
    db.client
        .batch_execute("SET search_path = pg_catalog, pg_temp")
        .await?;
    let log: Vec<(String, String)> = db
        .client
        .query("SELECT who, what FROM public.hijack_log", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let superuser: bool = db
        .client
        .query_one("SELECT rolsuper FROM pg_roles WHERE rolname = $1", &[&role])
        .await?
        .get(0);
    ensure!(
        log.is_empty() && !superuser,
        "a writer's object ran inside pg_outbox (superuser now: {superuser}): {log:?}"
    );
    // the events are the real ones, all of them
    let wal = db.peek_wal_events().await?;
    let payloads: Vec<String> = wal
        .iter()
        .map(|e| String::from_utf8_lossy(&e.payload).into_owned())
        .collect();
    assert_eq!(
        wal.len() as i64,
        expected.0,
        "wal-mode events: {payloads:?}"
    );
    let rows: Vec<String> = db
        .client
        .query(
            "SELECT pg_catalog.encode(payload, 'escape') FROM outbox.events ORDER BY seq",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(rows.len() as i64, expected.1, "table-mode rows: {rows:?}");
    assert_eq!(payloads, rows, "both modes wrote the same events");
    Ok(())
}

/// The hijacks are armed before the session's first call (the owner switch looks its owner up
/// then, and prepares its statement).
#[tokio::test]
async fn a_writer_cannot_hijack_any_entry_point() -> Result<()> {
    let (db, role) = victim("hj_armed_first").await?;
    let writer = db.session_as(&role).await?;
    arm(&writer, &role).await?;
    let expected = call_everything(&writer).await?;
    assert_unharmed(&db, &role, expected).await
}

/// The statement was prepared before the hijacks existed: a cached plan must not pick them up
/// when it is planned again.
#[tokio::test]
async fn a_writer_cannot_hijack_a_statement_prepared_before() -> Result<()> {
    let (db, role) = victim("hj_prepared_first").await?;
    let writer = db.session_as(&role).await?;
    writer
        .batch_execute(
            "SET pg_outbox.mode = 'table'; \
             SELECT outbox.enqueue('orders', 'k', '{\"n\": 0}'::pg_catalog.jsonb); \
             SELECT outbox.enqueue('orders', 'k', '{\"n\": 0}'::pg_catalog.jsonb, '{}'::pg_catalog.jsonb); \
             SET pg_outbox.mode = 'wal'; \
             SELECT outbox.enqueue('orders', 'k', '{\"n\": 0}'::pg_catalog.jsonb); \
             SELECT outbox.enqueue('orders', 'k', '{\"n\": 0}'::pg_catalog.jsonb, '{}'::pg_catalog.jsonb)",
        )
        .await?;
    arm(&writer, &role).await?;
    let (wal, table) = call_everything(&writer).await?;
    assert_unharmed(&db, &role, (wal + 2, table + 2)).await
}

/// Least privilege as a second wall: the role a writer's call runs as is not a superuser and
/// cannot log in (C extension: outbox_owner; SQL edition: the installer, who is no superuser).
/// PUBLIC may execute nothing of pg_outbox.
#[tokio::test]
async fn what_a_writer_runs_as_is_no_superuser_and_public_runs_nothing() -> Result<()> {
    let db = TestDb::create("hj_least_privilege", port()).await?;
    let owners: Vec<(String, String, bool, bool)> = db
        .client
        .query(
            "SELECT c.oid::regclass::text, r.rolname, r.rolsuper, r.rolcanlogin \
               FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner \
              WHERE c.oid IN ('outbox.events'::regclass, 'outbox.auth_key'::regclass) ORDER BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    for (table, owner, superuser, login) in &owners {
        assert!(!superuser, "{table} is owned by {owner}, a superuser");
        if edition() == Edition::Extension {
            assert_eq!(owner, "outbox_owner", "{table}");
            assert!(!login, "{table} is owned by {owner}, who can log in");
        }
    }
    // every SECURITY DEFINER function runs as a role that is no superuser (C extension: the
    // relay's key reader runs as outbox_owner; SQL edition: everything runs as the installer)
    let definers: Vec<String> = db
        .client
        .query(
            "SELECT p.oid::regprocedure::text FROM pg_proc p \
               JOIN pg_namespace n ON n.oid = p.pronamespace JOIN pg_roles r ON r.oid = p.proowner \
              WHERE n.nspname IN ('outbox', 'inbox') AND p.prosecdef AND r.rolsuper ORDER BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        definers.is_empty(),
        "SECURITY DEFINER functions owned by a superuser: {definers:?}"
    );
    db.client
        .batch_execute("DROP ROLE IF EXISTS hj_nobody; CREATE ROLE hj_nobody LOGIN")
        .await?;
    let public: Vec<String> = db
        .client
        .query(
            "SELECT p.oid::regprocedure::text FROM pg_proc p \
               JOIN pg_namespace n ON n.oid = p.pronamespace \
              WHERE n.nspname IN ('outbox', 'inbox') \
                AND pg_catalog.has_function_privilege('hj_nobody', p.oid, 'EXECUTE') ORDER BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(public.is_empty(), "PUBLIC may execute {public:?}");
    let stranger = db.session_as("hj_nobody").await?;
    let (code, _, _) = expect_error(&stranger, "CALL outbox.setup()").await?;
    assert_eq!(code, "42501");
    Ok(())
}

/// The sealing key is readable only by what enqueue runs as and through `outbox.relay_auth_key()`:
/// not by a member of `pg_read_all_data` (which bypasses table privileges but not row security),
/// and not by a writer or a consumer.
#[tokio::test]
async fn the_sealing_key_is_hidden_from_pg_read_all_data() -> Result<()> {
    let db = TestDb::create("hj_key_reader", port()).await?;
    db.client
        .batch_execute(
            "DROP ROLE IF EXISTS hj_reader; CREATE ROLE hj_reader LOGIN IN ROLE pg_read_all_data",
        )
        .await?;
    let reader = db.session_as("hj_reader").await?;
    // the reader does read the other tables
    reader.batch_execute("SELECT * FROM inbox.received").await?;
    let rows = reader.query("SELECT key FROM outbox.auth_key", &[]).await?;
    assert!(rows.is_empty(), "pg_read_all_data read the sealing key");
    let (code, _, _) = expect_error(&reader, "SELECT outbox.relay_auth_key()").await?;
    assert_eq!(code, "42501");
    // the owner's own paths still read it: a sealed wal-mode event is written
    db.create_slot().await?;
    db.client
        .batch_execute("SELECT outbox.enqueue('orders', 'k', '{}')")
        .await?;
    assert_eq!(db.peek_wal_events().await?.len(), 1);
    Ok(())
}
