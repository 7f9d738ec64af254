//! Upgrade from the first release to this version (docs/operations.md, "Upgrade"; DESIGN.md: every
//! schema change ships an upgrade script, and a test upgrades and compares with a fresh install).
//!
//! For each edition, in a throwaway cluster of its own (so that the roles the upgrade adds do not
//! exist yet): 0.1.0 is installed from its frozen script (`releases/`), with data in every table, and
//! upgraded (`ALTER EXTENSION pg_outbox UPDATE`, or the SQL edition's upgrade files in order). Then:
//! - the schema is a fresh install's: `pg_dump --schema-only` of both databases is the same once what
//!   differs between any two databases (OIDs, transaction ids) is taken out. For the C extension in
//!   `--binary-upgrade` mode, which dumps the extension's objects one by one with owners, ACLs,
//!   initial privileges and row security (a plain dump holds only CREATE EXTENSION); its dump marks
//!   (`pg_extension_config_dump`) are compared by name;
//! - every row of every table is still there, and the identity sequences go on where they were;
//! - the new roles exist, as a fresh install makes them;
//! - the old dedup records still deduplicate, the new topic-scoped key is in effect, and a relay
//!   publishes the table-mode events that were pending before the upgrade, each once.
//!
//! The C extension's 0.1.0 script runs against this build's library, as in a real upgrade (the new
//! package replaces the library; the database runs 0.1.0's SQL on it until ALTER EXTENSION UPDATE).
//! CREATE FUNCTION ... LANGUAGE c resolves each symbol, so a symbol the library no longer exports
//! fails here (scripts/releases.sh check-extension names it).

use anyhow::{bail, ensure, Context, Result};
use pg_outbox_tests::{
    connect, connect_as, port, read_all, Broker, Relay, SQL_EDITION, SQL_EDITION_OWNER,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tokio_postgres::Client;
use uuid::Uuid;

/// The first release: the oldest frozen install script.
const FIRST: &str = "0.1.0";
const CURRENT: &str = env!("CARGO_PKG_VERSION");
const EVENTS: usize = 20;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Edition {
    Extension,
    Sql,
}

#[tokio::test]
async fn the_extension_upgraded_from_0_1_0_is_a_fresh_install_with_its_data() -> Result<()> {
    upgrade_and_compare(Edition::Extension, port() + 3).await
}

#[tokio::test]
async fn the_sql_edition_upgraded_from_0_1_0_is_a_fresh_install_with_its_data() -> Result<()> {
    upgrade_and_compare(Edition::Sql, port() + 4).await
}

async fn upgrade_and_compare(edition: Edition, cluster_port: u16) -> Result<()> {
    let tag = format!("{edition:?}").to_lowercase();
    let cluster = Cluster::start(&tag, cluster_port)?;
    // named after the edition: the relay's log is named after its database
    let (upgraded, fresh_db) = (format!("upgraded_{tag}"), format!("fresh_{tag}"));
    let admin = connect(cluster.port, "postgres").await?;
    for db in [&upgraded, &fresh_db] {
        admin
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await?;
    }
    let new_roles: &[&str] = match edition {
        Edition::Extension => &["inbox_ingest", "outbox_owner"],
        Edition::Sql => &["inbox_ingest"],
    };
    ensure!(
        roles(&admin, new_roles).await?.is_empty(),
        "a new cluster has no role {new_roles:?}"
    );

    // 0.1.0, with data in every table
    let db = connect(cluster.port, &upgraded).await?;
    match edition {
        Edition::Extension => db
            .batch_execute(&format!("CREATE EXTENSION pg_outbox VERSION '{FIRST}'"))
            .await
            .context(
                "installing 0.1.0 (scripts/test.sh copies pg_outbox/sql/releases/ into the \
                 extension folder: scripts/releases.sh install PG_CONFIG)",
            )?,
        Edition::Sql => {
            let first = read_sql(&format!("sql-edition/releases/pg_outbox--{FIRST}.sql"))?;
            install_as_owner(&admin, cluster.port, &upgraded, &first).await?;
        }
    }
    let events = fill_every_table(&db).await?;
    let columns = columns(&db).await?;
    let before = fingerprint(&db, &columns).await?;
    for (table, (rows, _)) in &before {
        ensure!(*rows > 0, "{table} has no row before the upgrade");
    }

    // the upgrade
    match edition {
        Edition::Extension => {
            db.batch_execute("ALTER EXTENSION pg_outbox UPDATE").await?;
            let version: String = db
                .query_one(
                    "SELECT extversion FROM pg_extension WHERE extname = 'pg_outbox'",
                    &[],
                )
                .await?
                .get(0);
            assert_eq!(version, CURRENT);
        }
        Edition::Sql => {
            for step in sql_edition_upgrades()? {
                install_as_owner(&admin, cluster.port, &upgraded, &read_sql(&step)?)
                    .await
                    .with_context(|| format!("running {step}"))?;
            }
            let edition: String = db.query_one("SELECT outbox._edition()", &[]).await?.get(0);
            assert_eq!(edition, format!("sql {CURRENT}"));
        }
    }

    // the same schema as a fresh install
    let fresh = connect(cluster.port, &fresh_db).await?;
    match edition {
        Edition::Extension => fresh.batch_execute("CREATE EXTENSION pg_outbox").await?,
        Edition::Sql => install_as_owner(&admin, cluster.port, &fresh_db, SQL_EDITION).await?,
    }
    let binary_upgrade = edition == Edition::Extension;
    let upgraded_schema = pg_dump(cluster.port, &upgraded, binary_upgrade)?;
    let fresh_schema = pg_dump(cluster.port, &fresh_db, binary_upgrade)?;
    if upgraded_schema != fresh_schema {
        bail!(
            "the upgraded schema differs from a fresh {CURRENT} install (- upgraded, + fresh):\n{}",
            diff(&upgraded_schema, &fresh_schema)?
        );
    }
    if edition == Edition::Extension {
        assert_eq!(dump_marks(&db).await?, dump_marks(&fresh).await?);
        assert_eq!(
            dump_marks(&db).await?.len(),
            10,
            "the state tables and sequences are marked"
        );
    }
    let created = roles(&admin, new_roles).await?;
    assert_eq!(
        created.keys().map(String::as_str).collect::<Vec<_>>(),
        new_roles,
        "the upgrade creates the new roles"
    );
    for (role, attributes) in &created {
        assert_eq!(attributes, "nologin", "{role} can log in or has attributes");
    }

    // the data survives
    let after = fingerprint(&db, &columns).await?;
    assert_eq!(after, before, "rows or sequences changed in the upgrade");

    // and works: old dedup records, the topic-scoped inbox key, the pending events
    let again: bool = db
        .query_one("SELECT inbox.try_receive('billing', 'm1')", &[])
        .await?
        .get(0);
    assert!(!again, "a message received under 0.1.0 is received again");
    let queued: Vec<bool> = db
        .query(
            "SELECT inbox.deliver('billing', 'q1', t, 0, 99, NULL, NULL) FROM unnest(ARRAY['orders', 'payments']) t",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        queued,
        [false, true],
        "(consumer, topic, message id) is the inbox's key"
    );

    let broker = Broker::start()?;
    broker.create_topic("orders", 3).await?;
    let mut relay = Relay::start(
        cluster.port,
        &upgraded,
        &broker.bootstrap(),
        &["--source", "poll"],
    )?;
    let records = read_all(
        &broker.bootstrap(),
        &[("orders", 3)],
        events.len(),
        Duration::from_secs(60),
    )?;
    let mut published: Vec<Uuid> = records
        .iter()
        .map(|r| Uuid::parse_str(&r.id()))
        .collect::<Result<_, _>>()?;
    published.sort();
    let mut expected = events;
    expected.sort();
    assert_eq!(
        published, expected,
        "the events pending before the upgrade, each once"
    );
    pg_outbox_tests::outbox_drained(&db).await?;
    let status = relay.terminate(Duration::from_secs(30))?;
    ensure!(status.success(), "the relay exited with {status}");
    Ok(())
}

/// Writes rows into every table of 0.1.0 through its API where it has one (as a superuser), and
/// returns the ids of the table-mode events, which stay pending until a relay publishes them.
async fn fill_every_table(c: &Client) -> Result<Vec<Uuid>> {
    c.batch_execute("SET pg_outbox.mode = 'table'").await?;
    let events = c
        .query(
            &format!(
                "SELECT outbox.enqueue('orders', 'k' || n, pg_catalog.jsonb_build_object('n', n)) \
                   FROM generate_series(1, {EVENTS}) n"
            ),
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get::<_, Uuid>(0))
        .collect();
    c.batch_execute(
        "SELECT inbox.try_receive('billing', 'm' || n) FROM generate_series(1, 10) n;
         SELECT inbox.store_offset('billing', 'orders', p, 100 + p) FROM generate_series(0, 2) p;
         SELECT inbox.deliver('billing', 'q' || n, 'orders', 0, n, 'k' || n, '\\x7b7d', '{}', NULL)
           FROM generate_series(1, 5) n;
         INSERT INTO inbox.topics (consumer, topic, topic_id) VALUES ('billing', 'orders', 'AAAAAAAAAAAAAAAAAAAAAA');
         INSERT INTO outbox.sources (source, created_lsn, seen_lsn, seen_at)
         VALUES ('slot:old', '0/16B3748', '0/16B3800', now());
         INSERT INTO outbox.gaps (source, old_incarnation, new_incarnation, from_lsn, to_lsn, reason)
         VALUES ('slot:old', gen_random_uuid(), gen_random_uuid(), '0/1000', '0/2000', 'a restore');
         INSERT INTO outbox.dead_letters (source, position, event_id, topic, key, payload, reason)
         VALUES ('slot:old', '0/16B3748/0', gen_random_uuid(), 'orders', 'k', '\\x00', 'oversized');
         INSERT INTO outbox.poller (id, idle) VALUES (1, true);",
    )
    .await?;
    Ok(events)
}

/// Each table of both schemas, with its columns now: the rows are compared on these after the
/// upgrade, which may add columns.
async fn columns(c: &Client) -> Result<BTreeMap<String, String>> {
    Ok(c.query(
        "SELECT c.oid::regclass::text, string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum)
           FROM pg_class c
           JOIN pg_namespace n ON n.oid = c.relnamespace
           JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
          WHERE n.nspname IN ('outbox', 'inbox') AND c.relkind = 'r'
          GROUP BY 1",
        &[],
    )
    .await?
    .iter()
    .map(|r| {
        let (table, cols): (String, String) = (r.get(0), r.get(1));
        // 0.2.0 gives the sealing key an id (rotation): the key itself must survive
        let cols = if table == "outbox.auth_key" {
            "key".to_string()
        } else {
            cols
        };
        (table, cols)
    })
    .collect())
}

/// Per table, the row count and a digest of every row (as a superuser: row security does not
/// hide the key), and each identity sequence's position.
async fn fingerprint(
    c: &Client,
    columns: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, (i64, String)>> {
    let mut all = BTreeMap::new();
    for (table, cols) in columns {
        let row = c
            .query_one(
                &format!(
                    "SELECT count(*), coalesce(md5(string_agg(r::text, E'\\n' ORDER BY r::text)), '')
                       FROM (SELECT {cols} FROM {table}) r"
                ),
                &[],
            )
            .await?;
        all.insert(table.clone(), (row.get(0), row.get(1)));
    }
    for row in c
        .query(
            "SELECT schemaname || '.' || sequencename, coalesce(last_value, 0)::text
               FROM pg_sequences WHERE schemaname IN ('outbox', 'inbox')",
            &[],
        )
        .await?
    {
        all.insert(row.get(0), (1, row.get(1)));
    }
    Ok(all)
}

/// The extension's dump marks: each marked table or sequence by name, with its condition, in order.
async fn dump_marks(c: &Client) -> Result<Vec<String>> {
    Ok(c.query(
        "SELECT u.oid::regclass::text || ' ' || coalesce(e.extcondition[u.i], '')
           FROM pg_extension e, unnest(e.extconfig) WITH ORDINALITY AS u(oid, i)
          WHERE e.extname = 'pg_outbox' ORDER BY u.i",
        &[],
    )
    .await?
    .iter()
    .map(|r| r.get(0))
    .collect())
}

/// Those of `names` that exist, with their attributes.
async fn roles(admin: &Client, names: &[&str]) -> Result<BTreeMap<String, String>> {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    Ok(admin
        .query(
            "SELECT rolname::text, concat_ws(' ',
                        CASE WHEN rolcanlogin THEN 'login' ELSE 'nologin' END,
                        CASE WHEN rolsuper THEN 'superuser' END, CASE WHEN rolcreaterole THEN 'createrole' END,
                        CASE WHEN rolcreatedb THEN 'createdb' END, CASE WHEN rolreplication THEN 'replication' END,
                        CASE WHEN rolbypassrls THEN 'bypassrls' END)
               FROM pg_roles WHERE rolname = ANY($1)",
            &[&names],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// Runs `sql` in one transaction as the SQL edition's owner (a role that is not a superuser, as on a
/// managed service), who owns `db`.
async fn install_as_owner(admin: &Client, port: u16, db: &str, sql: &str) -> Result<()> {
    admin
        .batch_execute(&format!(
            "DO $$ BEGIN
                 IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{SQL_EDITION_OWNER}') THEN
                     CREATE ROLE {SQL_EDITION_OWNER} LOGIN CREATEROLE REPLICATION;
                 END IF;
             END $$;
             ALTER DATABASE {db} OWNER TO {SQL_EDITION_OWNER}"
        ))
        .await?;
    let owner = connect_as(port, db, SQL_EDITION_OWNER).await?;
    owner
        .batch_execute(&format!("BEGIN; {sql} COMMIT;"))
        .await?;
    Ok(())
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read_sql(path: &str) -> Result<String> {
    std::fs::read_to_string(repo().join(path)).with_context(|| format!("reading {path}"))
}

/// The SQL edition's upgrade files from the first release to this version, in order.
fn sql_edition_upgrades() -> Result<Vec<String>> {
    let mut steps = BTreeMap::new();
    for entry in std::fs::read_dir(repo().join("sql-edition"))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        let Some(versions) = name
            .strip_prefix("pg_outbox--")
            .and_then(|n| n.strip_suffix(".sql"))
        else {
            continue;
        };
        if let Some((from, to)) = versions.split_once("--") {
            steps.insert(
                from.to_string(),
                (to.to_string(), format!("sql-edition/{name}")),
            );
        }
    }
    let mut path = Vec::new();
    let mut at = FIRST.to_string();
    while at != CURRENT {
        let (to, file) = steps
            .get(&at)
            .with_context(|| format!("no sql-edition/pg_outbox--{at}--*.sql: the SQL edition cannot be upgraded from {at}"))?;
        path.push(file.clone());
        at = to.clone();
    }
    Ok(path)
}

/// `pg_dump --schema-only` of `db`, without what differs between any two databases of one schema:
/// the OIDs and relfilenodes that binary-upgrade mode sets, transaction ids, the dump's random
/// `\restrict` key, the OIDs in the extension's dump marks (compared by name in [`dump_marks`]), and
/// the marked sequences' positions, which are data (compared in [`fingerprint`]).
fn pg_dump(port: u16, db: &str, binary_upgrade: bool) -> Result<String> {
    let bin = pg_outbox_tests::pgbin();
    let mut cmd = Command::new(bin.join("pg_dump"));
    // a relocatable build brings its own libpq (scripts/pgcluster.sh does the same)
    let lib = bin.join("../lib");
    if lib.join("libpq.so.5").exists() {
        cmd.env("LD_LIBRARY_PATH", lib);
    }
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"]);
    cmd.args(["--schema-only", db]);
    if binary_upgrade {
        cmd.arg("--binary-upgrade");
    }
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dump = String::from_utf8(out.stdout)?;
    Ok(dump
        .lines()
        .filter(|l| {
            !(l.starts_with("\\restrict")
                || l.starts_with("\\unrestrict")
                || l.contains("binary_upgrade_set_next_")
                || l.contains("relfrozenxid")
                || l.starts_with("WHERE oid = '")
                || l.starts_with("SELECT pg_catalog.setval("))
        })
        .map(mask_dump_mark_oids)
        .collect::<Vec<_>>()
        .join("\n"))
}

/// `binary_upgrade_create_empty_extension(..., '{16535,16601}', ...)`: the marked tables' OIDs.
fn mask_dump_mark_oids(line: &str) -> String {
    if line.contains("binary_upgrade_create_empty_extension(") {
        if let Some(start) = line.find("'{") {
            if let Some(len) = line[start..].find("}'") {
                let inner = &line[start + 2..start + len];
                if inner.chars().all(|c| c.is_ascii_digit() || c == ',') {
                    return format!("{}'{{oids}}'{}", &line[..start], &line[start + len + 2..]);
                }
            }
        }
    }
    line.to_string()
}

/// `diff -u` of two texts, at most 200 lines.
fn diff(a: &str, b: &str) -> Result<String> {
    let dir = std::env::temp_dir().join(format!("pg_outbox-upgrade-diff-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (fa, fb) = (dir.join("upgraded.sql"), dir.join("fresh.sql"));
    std::fs::write(&fa, a)?;
    std::fs::write(&fb, b)?;
    let out = Command::new("diff").arg("-u").arg(&fa).arg(&fb).output()?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .take(200)
        .collect::<Vec<_>>()
        .join("\n"))
}

/// A throwaway cluster (scripts/pgcluster.sh), stopped and removed however the test ends.
struct Cluster {
    dir: String,
    port: u16,
}

impl Cluster {
    fn start(name: &str, port: u16) -> Result<Cluster> {
        let dir =
            std::env::temp_dir().join(format!("pg_outbox-upgrade-{name}-{}", std::process::id()));
        let cluster = Cluster {
            dir: dir.to_str().context("path")?.to_string(),
            port,
        };
        pgcluster(&["start", &cluster.dir, &port.to_string(), "logical"])?;
        Ok(cluster)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = pgcluster(&["stop", &self.dir]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn pgcluster(args: &[&str]) -> Result<()> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/pgcluster.sh");
    let status = Command::new(script).args(args).status()?;
    ensure!(status.success(), "pgcluster.sh {args:?}");
    Ok(())
}
