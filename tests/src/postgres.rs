//! PostgreSQL fixtures: connections to the test clusters, a database per test, the extension's
//! setup, and reading what a slot holds.
//!
//! The clusters are started by `make test` (scripts/test.sh, with scripts/pgcluster.sh): one with
//! `wal_level=logical` on `PG_OUTBOX_TEST_PORT`, one with `wal_level=replica` on
//! `PG_OUTBOX_TEST_REPLICA_PORT`, and a logical one that a test restarts under the relay on
//! `PG_OUTBOX_TEST_RESTART_PORT` (its data directory in `PG_OUTBOX_TEST_RESTART_PGDATA`); the
//! defaults are scripts/test.sh's. Every test gets its own database, named after the test, with the
//! extension created and `pg_outbox.slot_name` set to the database name, so tests can run in
//! parallel without sharing a slot.

use crate::wait_for;
use anyhow::{bail, Context, Result};
use pg_outbox_envelope::{Event, MESSAGE_PREFIX};
use std::time::Duration;
use tokio_postgres::{Client, NoTls};

/// The clusters' ports when the environment names none: the same as scripts/test.sh's defaults.
const DEFAULT_PORT: u16 = 25432;
const DEFAULT_REPLICA_PORT: u16 = 25433;
const DEFAULT_RESTART_PORT: u16 = 25434;

/// The bin folder of the PostgreSQL the tests run against: `PGBIN` (scripts/test.sh sets it per
/// version), else the version's home as scripts/pgversions.sh, the one place that names it, says.
pub fn pgbin() -> std::path::PathBuf {
    if let Ok(bin) = std::env::var("PGBIN") {
        return bin.into();
    }
    let version = std::env::var("PG_OUTBOX_TEST_PG_VERSION").unwrap_or_else(|_| "15".into());
    let scripts = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts");
    let home = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            ". '{}/pgversions.sh' && pg_home '{version}'",
            scripts.display()
        ))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    std::path::Path::new(&home).join("bin")
}

/// The `wal_level=logical` cluster.
pub fn port() -> u16 {
    env_port("PG_OUTBOX_TEST_PORT", DEFAULT_PORT)
}

/// The `wal_level=replica` cluster.
pub fn replica_port() -> u16 {
    env_port("PG_OUTBOX_TEST_REPLICA_PORT", DEFAULT_REPLICA_PORT)
}

/// The folder with `ca.crt`, the CA that signed the `wal_level=logical` cluster's certificate (issued
/// for `localhost` only); the role `tls_only` may log in to that cluster over TLS only.
pub fn tls_dir() -> Result<std::path::PathBuf> {
    std::env::var_os("PG_OUTBOX_TEST_TLS_DIR")
        .map(Into::into)
        .context("PG_OUTBOX_TEST_TLS_DIR not set: run the tests with `make test`")
}

/// The cluster a test may restart under the relay: its port and data directory.
pub fn restart_cluster() -> Result<(u16, String)> {
    let port = env_port("PG_OUTBOX_TEST_RESTART_PORT", DEFAULT_RESTART_PORT);
    let pgdata = std::env::var("PG_OUTBOX_TEST_RESTART_PGDATA")
        .context("PG_OUTBOX_TEST_RESTART_PGDATA not set: run the tests with `make test`")?;
    Ok((port, pgdata))
}

fn env_port(name: &str, default: u16) -> u16 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Connects as `user` to `db` on the local test cluster at `port`.
pub async fn connect_as(port: u16, db: &str, user: &str) -> Result<Client> {
    let conninfo = format!("host=127.0.0.1 port={port} user={user} dbname={db}");
    let (client, connection) = tokio_postgres::connect(&conninfo, NoTls)
        .await
        .with_context(|| {
            format!("cannot connect to {conninfo}; run the tests with `make test`, which starts the clusters")
        })?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

pub async fn connect(port: u16, db: &str) -> Result<Client> {
    connect_as(port, db, "postgres").await
}

/// Which edition of pg_outbox a test database gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Edition {
    /// `CREATE EXTENSION pg_outbox` (the C extension), as a superuser.
    Extension,
    /// sql-edition/pg_outbox.sql, installed by [`SQL_EDITION_OWNER`], a role that is not a superuser.
    Sql,
}

/// `PG_OUTBOX_EDITION=sql` runs the tests against the SQL edition (scripts/test.sh does, for the
/// SQL tests and the end-to-end relay tests); anything else, or nothing, is the C extension.
pub fn edition() -> Edition {
    match std::env::var("PG_OUTBOX_EDITION").as_deref() {
        Ok("sql") => Edition::Sql,
        _ => Edition::Extension,
    }
}

/// The SQL edition, as scripts/sql-edition.sh writes it.
pub const SQL_EDITION: &str = include_str!("../../sql-edition/pg_outbox.sql");

/// The role that installs the SQL edition in a test database: what a managed service gives its
/// customers' administrator (CREATEROLE, REPLICATION, owner of the database), not a superuser.
pub const SQL_EDITION_OWNER: &str = "outbox_installer";

/// Installs the SQL edition into `db` as [`SQL_EDITION_OWNER`], who owns the database.
pub async fn install_sql_edition(admin: &Client, port: u16, db: &str) -> Result<()> {
    admin
        .batch_execute(&format!(
            "DO $$ BEGIN
                 IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{SQL_EDITION_OWNER}') THEN
                     CREATE ROLE {SQL_EDITION_OWNER} LOGIN CREATEROLE REPLICATION;
                 END IF;
             EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
             END $$;
             ALTER DATABASE {db} OWNER TO {SQL_EDITION_OWNER}"
        ))
        .await?;
    let owner = connect_as(port, db, SQL_EDITION_OWNER).await?;
    owner
        .batch_execute(&format!("BEGIN; {SQL_EDITION} COMMIT;"))
        .await
        .context("installing sql-edition/pg_outbox.sql as a role that is not a superuser")?;
    Ok(())
}

/// A database of its own for one test.
pub struct TestDb {
    pub name: String,
    pub port: u16,
    pub client: Client,
}

impl TestDb {
    /// Drops what a previous run left (slot, database), then creates the database and pg_outbox in
    /// the edition the run asks for ([`edition`]).
    pub async fn create(name: &str, port: u16) -> Result<TestDb> {
        Self::create_with(name, port, edition()).await
    }

    /// [`TestDb::create`] with pg_outbox in `edition`.
    pub async fn create_with(name: &str, port: u16, edition: Edition) -> Result<TestDb> {
        let admin = connect(port, "postgres").await?;
        admin
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
                &[&name],
            )
            .await?;
        // one statement per call: DROP/CREATE DATABASE refuse to run in an implicit transaction
        for sql in [
            format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
            format!("CREATE DATABASE {name}"),
            format!("ALTER DATABASE {name} SET pg_outbox.slot_name = '{name}'"),
        ] {
            admin.batch_execute(&sql).await?;
        }
        if edition == Edition::Sql {
            install_sql_edition(&admin, port, name).await?;
        }
        let client = connect(port, name).await?;
        if edition == Edition::Extension {
            client.batch_execute("CREATE EXTENSION pg_outbox").await?;
        }
        // relay logs of this test start empty (Relay appends across restarts)
        let _ = std::fs::remove_file(std::env::temp_dir().join(format!("relay-{name}.log")));
        Ok(TestDb {
            name: name.to_string(),
            port,
            client,
        })
    }

    /// Sessions of this database enqueue in table mode from now on, this fixture's session too.
    pub async fn set_table_mode(&self) -> Result<()> {
        self.client
            .batch_execute(&format!(
                "ALTER DATABASE {} SET pg_outbox.mode = 'table'; SET pg_outbox.mode = 'table'",
                self.name
            ))
            .await?;
        Ok(())
    }

    /// A second session on the same database.
    pub async fn session(&self) -> Result<Client> {
        connect(self.port, &self.name).await
    }

    pub async fn session_as(&self, user: &str) -> Result<Client> {
        connect_as(self.port, &self.name, user).await
    }

    /// Writes `events` in one transaction as sealed wal-mode messages, bypassing `outbox.enqueue`'s
    /// validation: what an older extension, or anyone holding the key, could write. A superuser
    /// reads the key; the relay must still trust only the headers it writes itself.
    pub async fn emit_sealed(&self, events: &[Event<'_>]) -> Result<()> {
        let messages = events
            .iter()
            .map(Event::encode)
            .collect::<Result<Vec<_>, _>>()?;
        self.emit_sealed_raw(&messages).await
    }

    /// Writes each of `messages` (whatever bytes, e.g. an envelope of a future version) sealed for
    /// one transaction, as `emit_sealed` does.
    pub async fn emit_sealed_raw(&self, messages: &[Vec<u8>]) -> Result<()> {
        let c = &self.client;
        c.batch_execute("BEGIN").await?;
        // the newest key, as enqueue seals with
        let row = c
            .query_one(
                "SELECT key_id, key FROM outbox.auth_key ORDER BY key_id DESC LIMIT 1",
                &[],
            )
            .await?;
        let (key_id, key): (i32, Vec<u8>) = (row.get(0), row.get(1));
        let xid: i64 = c
            .query_one("SELECT pg_current_xact_id()::text::bigint", &[])
            .await?
            .get(0);
        for message in messages {
            let mut message = message.clone();
            pg_outbox_envelope::seal(&mut message, 0, key_id as u16, &key, xid as u64);
            c.execute(
                "SELECT pg_logical_emit_message(true, 'pg_outbox', $1::bytea)",
                &[&message],
            )
            .await?;
        }
        c.batch_execute("COMMIT").await?;
        Ok(())
    }

    /// The key this database's relay signs its records with (`pg_outbox-mac`), derived from the
    /// sealing key (read as a superuser): what a test needs to write a record exactly as this
    /// database's relay would have, e.g. before the database was restored to an earlier point.
    pub async fn record_key(&self) -> Result<pg_outbox_envelope::record::RecordKey> {
        let key: Vec<u8> = self
            .client
            .query_one(
                "SELECT key FROM outbox.auth_key ORDER BY key_id DESC LIMIT 1",
                &[],
            )
            .await?
            .get(0);
        Ok(pg_outbox_envelope::record::RecordKey::derive(&key))
    }

    /// Creates the publication and the slot through the extension's own setup procedure.
    pub async fn create_slot(&self) -> Result<()> {
        setup(&self.client).await
    }

    /// Waits until the relay streams from this test's slot (a walsender holds it; merely "active"
    /// is also true while the slot is still being created, when enqueue rightly refuses).
    pub async fn wait_for_active_slot(&self) -> Result<()> {
        let c = &self.client;
        let name = self.name.clone();
        wait_for("the relay to hold the slot", Duration::from_secs(30), || {
            let name = name.clone();
            async move {
                Ok(c.query_opt(
                    "SELECT 1 FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid \
                     WHERE s.slot_name = $1",
                    &[&name],
                )
                .await?
                .is_some())
            }
        })
        .await
    }

    /// The end of the WAL written so far (`pg_current_wal_lsn()`, as text).
    pub async fn current_wal_lsn(&self) -> Result<String> {
        Ok(self
            .client
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await?
            .get(0))
    }

    /// Waits until the walsender of this test's slot has sent the WAL up to `lsn`: the relay holds
    /// every event committed before it, whether or not it could publish them.
    pub async fn wait_for_sent_lsn(&self, lsn: &str) -> Result<()> {
        let c = &self.client;
        let name = self.name.as_str();
        wait_for(
            &format!("the relay to receive the WAL up to {lsn}"),
            Duration::from_secs(30),
            || async move {
                Ok(c.query_opt(
                    "SELECT 1 FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid \
                     WHERE s.slot_name = $1 AND r.sent_lsn >= $2::text::pg_lsn",
                    &[&name, &lsn],
                )
                .await?
                .is_some())
            },
        )
        .await
    }

    /// The slot's confirmed position is at or past `lsn`.
    pub async fn confirmed_at_least(&self, lsn: &str) -> Result<bool> {
        Ok(self
            .client
            .query_one(
                "SELECT coalesce(confirmed_flush_lsn >= $2::text::pg_lsn, false) \
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.name, &lsn],
            )
            .await?
            .get(0))
    }

    /// What the relay writes as `pg_outbox-source` for this test's slot (the default `source_id` is
    /// the slot name): `<source_id>/<system identifier>.<database oid>.<incarnation>`.
    pub async fn source_identity(&self) -> Result<String> {
        self.identity(&self.name, &format!("slot:{}", self.name))
            .await
    }

    /// The same for a row of `outbox.sources` (`slot:<name>` or `poll:<source_id>`).
    pub async fn identity(&self, source_id: &str, source: &str) -> Result<String> {
        let row = self
            .client
            .query_one(
                "SELECT (SELECT system_identifier FROM pg_control_system())::text || '.' || \
                        (SELECT oid FROM pg_database WHERE datname = current_database())::text || '.' || \
                        replace(incarnation::text, '-', '') \
                   FROM outbox.sources WHERE source = $1",
                &[&source],
            )
            .await
            .with_context(|| format!("no row {source:?} in outbox.sources"))?;
        Ok(format!("{source_id}/{}", row.get::<_, String>(0)))
    }

    /// Every pg_outbox event this test's slot would deliver, in commit order, without consuming them.
    pub async fn peek_wal_events(&self) -> Result<Vec<OwnedEvent>> {
        peek_wal_events(&self.client, &self.name).await
    }
}

/// The process id of a session's backend.
pub async fn backend_pid(client: &Client) -> Result<i32> {
    Ok(client
        .query_one("SELECT pg_backend_pid()", &[])
        .await?
        .get(0))
}

/// Waits until backend `waiter` waits for a lock that backend `holder` holds, as PostgreSQL sees
/// it (`pg_blocking_pids`), asking through `client`, a third session.
pub async fn wait_for_lock_wait(client: &Client, waiter: i32, holder: i32) -> Result<()> {
    wait_for(
        &format!("backend {waiter} to wait for a lock of backend {holder}"),
        Duration::from_secs(30),
        || async move {
            Ok(client
                .query_one(
                    "SELECT $2::int = ANY (pg_blocking_pids($1::int))",
                    &[&waiter, &holder],
                )
                .await?
                .get(0))
        },
    )
    .await
}

/// `CALL outbox.setup()`, tried again when PostgreSQL 15 fails it with "snapshot reference ... is
/// not owned by resource owner TopTransaction" (XX000). That internal error comes now and then from
/// `pg_create_logical_replication_slot` called from PL/pgSQL while other sessions' transactions
/// are running, as they are when tests run in parallel; the slot is not created, and a second try
/// succeeds. The relay retries its setup the same way.
pub async fn setup(client: &Client) -> Result<()> {
    for attempt in 1.. {
        match client.batch_execute("CALL outbox.setup()").await {
            Ok(()) => return Ok(()),
            Err(e)
                if attempt < 5
                    && e.as_db_error().is_some_and(|d| {
                        d.code().code() == "XX000" && d.message().contains("snapshot reference")
                    }) =>
            {
                eprintln!("outbox.setup hit PostgreSQL's snapshot-reference error; trying again");
            }
            Err(e) => return Err(e.into()),
        }
    }
    unreachable!()
}

/// Every pg_outbox message `slot` would deliver (pgoutput, publication of the same name), in commit
/// order, without consuming them: the transaction id that carries it and its bytes (a sealed
/// envelope).
/// Each message with the full 64-bit id of its transaction (what the seal binds).
pub async fn peek_wal_messages(client: &Client, slot: &str) -> Result<Vec<(u64, Vec<u8>)>> {
    let next: i64 = client
        .query_one(
            "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint",
            &[],
        )
        .await?
        .get(0);
    let rows = client
        .query(
            "SELECT data FROM pg_logical_slot_peek_binary_changes($1::text::name, NULL, NULL, \
             'proto_version', '1', 'publication_names', $1::text, 'messages', 'true')",
            &[&slot],
        )
        .await?;
    let mut messages = Vec::new();
    let mut xid = None;
    for row in rows {
        let data: Vec<u8> = row.get(0);
        if let Some(begin) = pgoutput_begin_xid(&data) {
            xid = Some(begin);
        } else if let Some(content) = pgoutput_message(&data, MESSAGE_PREFIX)? {
            let xid = xid.context("pg_outbox message outside a transaction")?;
            messages.push((
                pg_outbox_envelope::widen_xid(next as u64, xid),
                content.to_vec(),
            ));
        }
    }
    Ok(messages)
}

/// Every pg_outbox event `slot` would deliver, in commit order, without consuming them. Each
/// message must be sealed with the database's key for the transaction that carries it (read as a
/// superuser), as the relay requires.
pub async fn peek_wal_events(client: &Client, slot: &str) -> Result<Vec<OwnedEvent>> {
    let keys: std::collections::HashMap<i32, Vec<u8>> = client
        .query("SELECT key_id, key FROM outbox.auth_key", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut events = Vec::new();
    for (xid, message) in peek_wal_messages(client, slot).await? {
        let id = pg_outbox_envelope::sealed_key_id(&message)
            .with_context(|| format!("the message of transaction {xid}"))?;
        let key = keys
            .get(&i32::from(id))
            .with_context(|| format!("no key {id} for the message of transaction {xid}"))?;
        let envelope = pg_outbox_envelope::open(&message, key, xid)
            .with_context(|| format!("opening the message of transaction {xid}"))?;
        let event = Event::decode(envelope).context("decoding envelope")?;
        events.push(OwnedEvent::from(&event));
    }
    Ok(events)
}

/// The transaction id of a pgoutput Begin message ('B', final LSN u64, commit time i64, xid u32).
pub fn pgoutput_begin_xid(data: &[u8]) -> Option<u32> {
    (data.first() == Some(&b'B') && data.len() >= 21)
        .then(|| u32::from_be_bytes(data[17..21].try_into().expect("4 bytes")))
}

/// The content of a pgoutput logical message ('M') with `prefix`, or None for any other message.
///
/// Layout: 'M', flags (u8, 1 = transactional), LSN (u64), prefix (NUL-terminated), length (u32), bytes.
pub fn pgoutput_message<'a>(data: &'a [u8], prefix: &str) -> Result<Option<&'a [u8]>> {
    if data.first() != Some(&b'M') {
        return Ok(None);
    }
    if data.len() < 10 {
        bail!("short pgoutput message");
    }
    if data[1] != 1 {
        bail!("pg_outbox message is not transactional (flags {})", data[1]);
    }
    let rest = &data[10..];
    let nul = rest
        .iter()
        .position(|&b| b == 0)
        .context("prefix without NUL")?;
    if &rest[..nul] != prefix.as_bytes() {
        return Ok(None);
    }
    let rest = &rest[nul + 1..];
    let len = u32::from_be_bytes(rest[..4].try_into()?) as usize;
    let content = &rest[4..];
    if content.len() != len {
        bail!("message length {len} but {} bytes", content.len());
    }
    Ok(Some(content))
}

/// An event decoded from WAL, owning its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedEvent {
    pub id: uuid::Uuid,
    pub topic: String,
    pub key: Option<String>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub trace_context: Option<String>,
    pub payload_is_json: bool,
    pub payload: Vec<u8>,
}

impl From<&Event<'_>> for OwnedEvent {
    fn from(e: &Event<'_>) -> Self {
        OwnedEvent {
            id: uuid::Uuid::from_bytes(e.id),
            topic: e.topic.to_string(),
            key: e.key.map(str::to_string),
            headers: e
                .headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_vec()))
                .collect(),
            trace_context: e.trace_context.map(str::to_string),
            payload_is_json: e.payload_is_json,
            payload: e.payload.to_vec(),
        }
    }
}

/// The SQLSTATE of a database error, or a description of why there is none.
pub fn sqlstate(err: &tokio_postgres::Error) -> String {
    err.code()
        .map(|c| c.code().to_string())
        .unwrap_or_else(|| format!("no SQLSTATE: {err}"))
}

/// Runs `sql` expecting an error; returns its SQLSTATE, message and hint.
pub async fn expect_error(client: &Client, sql: &str) -> Result<(String, String, Option<String>)> {
    match client.batch_execute(sql).await {
        Ok(()) => bail!("expected an error from: {sql}"),
        Err(e) => {
            let db = e
                .as_db_error()
                .with_context(|| format!("not a database error: {e}"))?;
            Ok((
                db.code().code().to_string(),
                db.message().to_string(),
                db.hint().map(str::to_string),
            ))
        }
    }
}

/// A connection string for `db` on the local servers at `ports`, taking the one that accepts writes
/// (libpq's target_session_attrs=read-write): one port, or a primary and its standbys.
pub fn conninfo(ports: &[u16], db: &str) -> String {
    let hosts = vec!["127.0.0.1"; ports.len()].join(",");
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    format!(
        "host={hosts} port={} user=postgres dbname={db} target_session_attrs=read-write \
         connect_timeout=2",
        ports.join(",")
    )
}

/// Runs scripts/pgcluster.sh with `args` (`restart DIR`, `crash DIR`, `standby ...`) and fails
/// unless it succeeds.
pub fn pgcluster(args: &[&str]) -> Result<()> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/pgcluster.sh");
    let status = std::process::Command::new(script).args(args).status()?;
    anyhow::ensure!(status.success(), "pgcluster.sh {args:?}");
    Ok(())
}

/// Writes events 1..=n for the key `k` to `orders` in `db` on `port`, one per transaction, riding
/// out connection loss ([`resilient_writer`]; the caller creates `written (n bigint PRIMARY KEY)`).
pub async fn one_key_writer(port: u16, db: String, n: i64) -> Result<()> {
    resilient_writer(
        conninfo(&[port], &db),
        1..n + 1,
        |i| (vec!["k".into()], vec![crate::numbered(i)]),
        |_, _| {},
    )
    .await
}

/// Waits until the table `written` of `db` on `port` has more than `n` rows: the writer is under
/// way.
pub async fn written_at_least(port: u16, db: &str, n: i64) -> Result<()> {
    let c = connect(port, db).await?;
    wait_for("the writer under way", Duration::from_secs(60), || {
        let c = &c;
        async move {
            Ok(c.query_one("SELECT count(*) FROM written", &[])
                .await?
                .get::<_, i64>(0)
                > n)
        }
    })
    .await
}

/// Commits transactions `ts` in order, each enqueueing the events `events(t)` gives (keys and JSON
/// payloads) to the topic `orders`, riding out restarts and failovers of the servers of
/// `conninfo`: a row `t` in the caller's table `written` makes a retried transaction idempotent,
/// so each transaction's events exist once on the server that survives. `committed(t, fresh)`
/// follows each commit (`fresh`: this attempt enqueued the events).
pub async fn resilient_writer(
    conninfo: String,
    ts: std::ops::Range<i64>,
    events: impl Fn(i64) -> (Vec<String>, Vec<String>),
    mut committed: impl FnMut(i64, bool),
) -> Result<()> {
    let mut t = ts.start;
    let mut client: Option<Client> = None;
    while t < ts.end {
        let c = match &client {
            Some(c) if !c.is_closed() => c,
            _ => {
                match tokio_postgres::connect(&conninfo, NoTls).await {
                    Ok((c, connection)) => {
                        tokio::spawn(async move {
                            let _ = connection.await;
                        });
                        client = Some(c);
                    }
                    // backoff while PostgreSQL restarts
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
                continue;
            }
        };
        let (keys, payloads) = events(t);
        let attempt = async {
            c.batch_execute("BEGIN").await?;
            let fresh = c
                .query_opt(
                    "INSERT INTO written VALUES ($1) ON CONFLICT DO NOTHING RETURNING 1",
                    &[&t],
                )
                .await?
                .is_some();
            if fresh {
                c.query(
                    "SELECT outbox.enqueue_batch('orders', $1, $2::text[]::jsonb[])",
                    &[&keys, &payloads],
                )
                .await?;
            }
            c.batch_execute("COMMIT").await?;
            anyhow::Ok(fresh)
        };
        match attempt.await {
            Ok(fresh) => {
                committed(t, fresh);
                t += 1;
                // a steady load, not a flood
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Err(_) => {
                client = None;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    Ok(())
}
