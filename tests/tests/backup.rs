//! pg_dump and pg_restore keep pg_outbox's state (docs/operations.md, "Backup and restore").
//!
//! A C extension's tables are not in a logical dump unless the extension marks them; unmarked, a
//! restore forgets every received id (the inbox delivers them again), every stored offset, the queued
//! messages, the sources (and with them that a slot existed) and the pending table-mode events. The
//! sealing key must not be in the dump. Runs against either edition.

use anyhow::{ensure, Context, Result};
use pg_outbox_tests::{connect, edition, port, Edition, TestDb};
use std::process::Command;

fn pg_tool(name: &str) -> Command {
    let bin = pg_outbox_tests::pgbin();
    let mut cmd = Command::new(bin.join(name));
    // a relocatable build brings its own libpq (scripts/pgcluster.sh does the same)
    let lib = bin.join("../lib");
    if lib.join("libpq.so.5").exists() {
        cmd.env("LD_LIBRARY_PATH", lib);
    }
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &port().to_string(),
        "-U",
        "postgres",
    ]);
    cmd
}

fn run(mut cmd: Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

async fn count(c: &tokio_postgres::Client, table: &str) -> Result<i64> {
    Ok(c.query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await?
        .get(0))
}

#[tokio::test]
async fn a_dump_and_restore_keeps_the_state_and_not_the_key() -> Result<()> {
    let src = TestDb::create("bk_source", port()).await?;
    src.create_slot().await?;
    let c = &src.client;
    c.batch_execute(
        "SET pg_outbox.mode = 'table';
         SELECT outbox.enqueue('orders', 'k' || n, pg_catalog.jsonb_build_object('n', n))
           FROM generate_series(1, 200) n;
         SELECT inbox.try_receive('billing', 'm' || n) FROM generate_series(1, 100) n;
         SELECT inbox.store_offset('billing', 'orders', p, 1000 + p) FROM generate_series(0, 2) p;
         SELECT inbox.deliver('billing', 'q' || n, 'orders', 0, n, 'k', '\\x00'::bytea)
           FROM generate_series(1, 50) n;",
    )
    .await?;
    let key: Vec<u8> = c
        .query_one("SELECT key FROM outbox.auth_key", &[])
        .await?
        .get(0);
    let incarnation: String = c
        .query_one(
            "SELECT incarnation::text FROM outbox.sources WHERE source = $1",
            &[&format!("slot:{}", src.name)],
        )
        .await?
        .get(0);

    let dir = std::env::temp_dir().join("pg_outbox-backup-test");
    std::fs::create_dir_all(&dir)?;
    let dump = dir.join(format!("{}.dump", src.name));
    let mut pg_dump = pg_tool("pg_dump");
    pg_dump.args(["-Fc", "-d", &src.name, "-f"]).arg(&dump);
    run(pg_dump)?;

    let admin = connect(port(), "postgres").await?;
    let dst = "bk_restored";
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {dst} WITH (FORCE)"))
        .await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {dst}"))
        .await?;
    let mut pg_restore = pg_tool("pg_restore");
    pg_restore.args(["--exit-on-error", "-d", dst]).arg(&dump);
    run(pg_restore)?;

    let r = connect(port(), dst).await?;
    assert_eq!(
        count(&r, "outbox.events").await?,
        200,
        "pending table-mode events"
    );
    assert_eq!(count(&r, "inbox.received").await?, 100, "received ids");
    assert_eq!(count(&r, "inbox.messages").await?, 50, "queued messages");
    let offsets: Vec<(i32, i64)> = r
        .query(
            "SELECT partition, next_offset FROM inbox.offsets WHERE consumer = 'billing' ORDER BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(offsets, vec![(0, 1000), (1, 1001), (2, 1002)]);
    let restored_incarnation: String = r
        .query_one(
            "SELECT incarnation::text FROM outbox.sources WHERE source = $1",
            &[&format!("slot:{}", src.name)],
        )
        .await?
        .get(0);
    assert_eq!(
        restored_incarnation, incarnation,
        "the source, and that its slot existed"
    );
    // a received id is still received; new rows do not collide with restored ones
    let again: bool = r
        .query_one("SELECT inbox.try_receive('billing', 'm7')", &[])
        .await?
        .get(0);
    assert!(!again, "a restored inbox delivered m7 again");
    r.batch_execute(&format!(
        "SET pg_outbox.mode = 'table'; SET pg_outbox.slot_name = '{dst}';
         SELECT outbox.enqueue('orders', 'new', '{{}}');
         SELECT inbox.deliver('billing', 'q-new', 'orders', 0, 51, 'k', '\\x00'::bytea);"
    ))
    .await?;
    assert_eq!(count(&r, "outbox.events").await?, 201);
    assert_eq!(count(&r, "inbox.messages").await?, 51);

    // the dump does not carry the sealing key (C extension; the SQL edition's key is an ordinary
    // table's row, docs/operations.md says so)
    if edition() == Edition::Extension {
        // the dump as SQL text (a bytea appears there as its hex digits)
        let mut as_sql = pg_tool("pg_restore");
        as_sql.args(["-f", "-"]).arg(&dump);
        let text = as_sql.output()?;
        ensure!(text.status.success(), "pg_restore -f - failed");
        let text = String::from_utf8_lossy(&text.stdout);
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        ensure!(
            text.contains("COPY inbox.received"),
            "the dump as SQL: {} bytes",
            text.len()
        );
        ensure!(!text.contains(&hex), "the dump holds the sealing key");
        let restored_key: Vec<u8> = r
            .query_one("SELECT key FROM outbox.auth_key", &[])
            .await?
            .get(0);
        assert_ne!(
            restored_key, key,
            "a restored database makes a key of its own"
        );
    }
    drop(r);
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {dst} WITH (FORCE)"))
        .await?;
    let _ = std::fs::remove_file(&dump);
    Ok(())
}
