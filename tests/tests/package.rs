//! The Debian packages in use (docs/install.md): scripts/package-test.sh builds them, installs them
//! with `dpkg -i` into a private root that holds a copy of PostgreSQL `PG_OUTBOX_TEST_PG_VERSION`
//! without pg_outbox, starts a cluster from that copy on `PG_OUTBOX_TEST_PORT`, and runs these tests
//! with `PG_OUTBOX_PACKAGE_ROOT` (the private root) and `PG_OUTBOX_RELAY_BIN` (the packaged
//! binary). They are `#[ignore]`d in the other runs, which have no packages installed.
//!
//! Everything here comes from the packages: the server loads the extension from the root's
//! `/usr/lib/postgresql/<major>/lib` and `/usr/share/postgresql/<major>/extension` (checked through the
//! server's own `pg_config` view, whose paths follow its executable), and the relay is the root's
//! `/usr/bin/pg-outbox-relay`.

use anyhow::{ensure, Context, Result};
use pg_outbox_tests::{
    assert_exactly_once_in_order, connect, enqueue, numbered, port, read_all, relay_bin, Broker,
    Relay, Scenario,
};
use std::path::PathBuf;
use std::time::Duration;
use uuid::Uuid;

const FIRST: &str = "0.1.0";
const CURRENT: &str = env!("CARGO_PKG_VERSION");

/// The PostgreSQL major under test (`PG_OUTBOX_TEST_PG_VERSION`, as scripts/test.sh sets it).
fn major() -> String {
    std::env::var("PG_OUTBOX_TEST_PG_VERSION").unwrap_or_else(|_| "15".to_string())
}

/// The private root the packages are installed in, after checking that the cluster and the relay
/// binary are the root's.
async fn package_root() -> Result<PathBuf> {
    let root = PathBuf::from(
        std::env::var_os("PG_OUTBOX_PACKAGE_ROOT")
            .context("PG_OUTBOX_PACKAGE_ROOT not set: run scripts/package-test.sh")?,
    );
    ensure!(
        relay_bin() == root.join("usr/bin/pg-outbox-relay"),
        "the relay under test is {}, not the packaged one",
        relay_bin().display()
    );
    let c = connect(port(), "postgres").await?;
    let major = major();
    for (name, dir) in [
        ("PKGLIBDIR", format!("usr/lib/postgresql/{major}/lib")),
        ("SHAREDIR", format!("usr/share/postgresql/{major}")),
    ] {
        let setting: String = c
            .query_one("SELECT setting FROM pg_config WHERE name = $1", &[&name])
            .await?
            .get(0);
        // a relocatable build reaches the share folder through a link next to its bin folder
        ensure!(
            std::fs::canonicalize(&setting)? == std::fs::canonicalize(root.join(&dir))?,
            "the server's {name} is {setting}, not the private root's {dir}"
        );
    }
    Ok(root)
}

#[tokio::test]
#[ignore = "needs the packages installed: scripts/package-test.sh"]
async fn the_packaged_relay_publishes_what_the_packaged_extension_enqueues() -> Result<()> {
    package_root().await?;
    // CREATE EXTENSION pg_outbox from the package's files
    let s = Scenario::builder("pkg_fresh")
        .topic("orders", 3)
        .start()
        .await?;
    let version: String =
        s.db.client
            .query_one(
                "SELECT extversion FROM pg_extension WHERE extname = 'pg_outbox'",
                &[],
            )
            .await?
            .get(0);
    assert_eq!(version, CURRENT);
    let mut relay = s.relay().running().await?;
    let mut expected = Vec::new();
    // per key numbered from 1, keys interleaved: the order per key is checked
    for n in 1..=4 {
        for key in ["alice", "bob", "carol"] {
            expected.push(enqueue(&s.db.client, "orders", key, &numbered(n)).await?);
        }
    }
    let records = s.read(expected.len())?;
    assert_exactly_once_in_order(&records, expected.len())?;
    let mut got: Vec<Uuid> = records
        .iter()
        .map(|r| Uuid::parse_str(&r.id()))
        .collect::<Result<_, _>>()?;
    got.sort();
    expected.sort();
    assert_eq!(got, expected, "the enqueued events, each once");
    let status = relay.terminate(Duration::from_secs(30))?;
    ensure!(status.success(), "the relay exited with {status}");
    Ok(())
}

#[tokio::test]
#[ignore = "needs the packages installed: scripts/package-test.sh"]
async fn the_packaged_extension_upgrades_from_0_1_0_and_keeps_its_events() -> Result<()> {
    package_root().await?;
    let name = "pkg_upgrade";
    let admin = connect(port(), "postgres").await?;
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await?;
    let db = connect(port(), name).await?;
    // the package carries every release's install script and the upgrade scripts between them
    let versions: Vec<String> = db
        .query(
            "SELECT version FROM pg_available_extension_versions WHERE name = 'pg_outbox' ORDER BY version",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(versions, [FIRST, CURRENT]);
    db.batch_execute(&format!("CREATE EXTENSION pg_outbox VERSION '{FIRST}'"))
        .await?;
    // table-mode events enqueued under 0.1.0, pending across the upgrade
    db.batch_execute("SET pg_outbox.mode = 'table'").await?;
    let mut pending: Vec<Uuid> = db
        .query(
            "SELECT outbox.enqueue('orders', 'k' || n, pg_catalog.jsonb_build_object('n', n)) \
               FROM generate_series(1, 5) n",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();

    db.batch_execute("ALTER EXTENSION pg_outbox UPDATE").await?;
    let version: String = db
        .query_one(
            "SELECT extversion FROM pg_extension WHERE extname = 'pg_outbox'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(version, CURRENT);
    // a role and a view that 0.2.0 brings
    let upgraded: bool = db
        .query_one(
            "SELECT pg_catalog.to_regrole('outbox_owner') IS NOT NULL \
                AND pg_catalog.to_regclass('outbox.source_status') IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    ensure!(
        upgraded,
        "0.2.0's outbox_owner and outbox.source_status exist"
    );

    // the packaged relay publishes what was pending, each once, and removes it
    let broker = Broker::start()?;
    broker.create_topic("orders", 3).await?;
    let mut relay = Relay::start(port(), name, &broker.bootstrap(), &["--source", "poll"])?;
    let records = read_all(
        &broker.bootstrap(),
        &[("orders", 3)],
        pending.len(),
        Duration::from_secs(60),
    )?;
    let mut published: Vec<Uuid> = records
        .iter()
        .map(|r| Uuid::parse_str(&r.id()))
        .collect::<Result<_, _>>()?;
    published.sort();
    pending.sort();
    assert_eq!(
        published, pending,
        "the events pending before the upgrade, each once"
    );
    pg_outbox_tests::outbox_drained(&db).await?;
    let status = relay.terminate(Duration::from_secs(30))?;
    ensure!(status.success(), "the relay exited with {status}");
    Ok(())
}
