//! Production connections. PostgreSQL: the relay connects with libpq's sslmode settings to a cluster
//! whose certificate a test CA signed for `localhost`, where the role `tls_only` may log in over TLS
//! only, reads passwords from libpq's password file, and takes a libpq URL with several hosts.
//! Kafka over SASL: Tansu with SCRAM-SHA-256, the credentials in the relay's config file. Kafka: Tansu behind stunnel, reachable over
//! TLS only. Real PostgreSQL, real broker.

use anyhow::Result;
use pg_outbox_tests::{
    port, read_all, read_all_with, relay_bin, relay_command, replica_port, tls_dir, Broker, Relay,
    TestDb,
};
use std::time::Duration;

/// The relay's login for these tests: TLS only (pg_hba), with what the relay needs.
async fn tls_only_role(db: &TestDb) -> Result<()> {
    db.client
        .batch_execute(
            "DO $$ BEGIN CREATE ROLE tls_only LOGIN SUPERUSER REPLICATION; \
             EXCEPTION WHEN duplicate_object THEN NULL; END $$",
        )
        .await?;
    Ok(())
}

/// Once the relay streams, three events enqueued in `db` arrive through `broker`'s security.
async fn three_events_arrive(db: &TestDb, broker: &Broker) -> Result<()> {
    db.wait_for_active_slot().await?;
    for n in 1..=3 {
        db.client
            .execute(
                "SELECT outbox.enqueue('orders', 'k', jsonb_build_object('n', $1::int))",
                &[&n],
            )
            .await?;
    }
    let records = read_all_with(
        &broker.bootstrap(),
        broker.client_settings(),
        &[("orders", 1)],
        3,
        Duration::from_secs(60),
    )?;
    assert_eq!(records.len(), 3);
    Ok(())
}

/// Starts a relay that must stop on its own; returns its log (of this run only).
async fn refused(db: &TestDb, broker: &Broker, args: &[&str]) -> Result<String> {
    let _ = std::fs::remove_file(std::env::temp_dir().join(format!("relay-{}.log", db.name)));
    let mut relay = Relay::start(db.port, &db.name, &broker.bootstrap(), args)?;
    assert!(!relay
        .wait_for_exit(Duration::from_secs(30))
        .await?
        .success());
    Ok(relay.log_text())
}

#[tokio::test]
async fn the_relay_publishes_over_verified_tls_and_refuses_what_it_cannot_verify() -> Result<()> {
    let db = TestDb::create("tl_verified", port()).await?;
    tls_only_role(&db).await?;
    let broker = Broker::start()?;
    broker.create_topic("orders", 1).await?;
    let ca = tls_dir()?.join("ca.crt");
    let ca = ca.to_str().expect("a UTF-8 path");
    let tls = |host: &'static str, mode: &'static str| {
        vec![
            "--pg-user",
            "tls_only",
            "--pg-host",
            host,
            "--pg-sslmode",
            mode,
            "--pg-sslrootcert",
            ca,
        ]
    };

    // without TLS the server refuses the role; the relay says what to check and stops
    let log = refused(&db, &broker, &tls("localhost", "disable")).await?;
    assert!(log.contains("pg_sslmode"), "{log}");
    assert!(log.contains("no encryption"), "the server's reason: {log}");

    // verify-full against a name the certificate was not issued for
    let log = refused(&db, &broker, &tls("127.0.0.1", "verify-full")).await?;
    assert!(log.contains("TLS failed"), "{log}");
    assert!(log.contains("pg_sslrootcert"), "{log}");

    // verify-ca and verify-full with the name the certificate was issued for (the replication
    // connection checks the name in verify-ca too: pgwire-replication 0.5, see
    // docs/configuration.md, pg_sslmode)
    for (n, (host, mode)) in [("localhost", "verify-ca"), ("localhost", "verify-full")]
        .into_iter()
        .enumerate()
    {
        let mut relay = Relay::start(db.port, &db.name, &broker.bootstrap(), &tls(host, mode))?;
        db.wait_for_active_slot().await?;
        // every connection of the relay's role is encrypted: its sessions and the walsender
        let (all, encrypted): (i64, i64) = {
            let r = db
                .client
                .query_one(
                    "SELECT count(*), count(*) FILTER (WHERE s.ssl) FROM pg_stat_activity a \
                     JOIN pg_stat_ssl s USING (pid) WHERE a.usename = 'tls_only'",
                    &[],
                )
                .await?;
            (r.get(0), r.get(1))
        };
        assert!(all >= 2, "sessions and walsender: {all}");
        assert_eq!(encrypted, all, "{mode}");
        db.client
            .execute("SELECT outbox.enqueue('orders', $1, '{}')", &[&mode])
            .await?;
        read_all(
            &broker.bootstrap(),
            &[("orders", 1)],
            n + 1,
            Duration::from_secs(60),
        )?;
        assert!(relay.terminate(Duration::from_secs(30))?.success());
    }
    let records = read_all(
        &broker.bootstrap(),
        &[("orders", 1)],
        2,
        Duration::from_secs(60),
    )?;
    let keys: Vec<&[u8]> = records.iter().filter_map(|r| r.key.as_deref()).collect();
    assert_eq!(keys, [b"verify-ca".as_slice(), b"verify-full"]);
    Ok(())
}

#[tokio::test]
async fn the_relay_publishes_to_a_broker_over_tls_and_check_says_when_it_cannot() -> Result<()> {
    let db = TestDb::create("tl_kafka", port()).await?;
    let dir = tls_dir()?;
    let broker = Broker::start_tls(&dir)?;
    broker.create_topic("orders", 1).await?;
    let tls = |ca: &str| {
        vec![
            "--kafka".to_string(),
            "security.protocol=ssl".to_string(),
            "--kafka".to_string(),
            format!("ssl.ca.location={}", dir.join(ca).display()),
        ]
    };
    let good = tls("ca.crt");
    let good: Vec<&str> = good.iter().map(String::as_str).collect();
    let _relay = Relay::start(db.port, &db.name, &broker.bootstrap(), &good)?;
    three_events_arrive(&db, &broker).await?;
    // `check` says in one line when the broker cannot be reached as configured
    let check = |args: &[&str]| -> Result<String> {
        Ok(relay_command("check", db.port, &db.name, &broker.bootstrap(), args)?.1)
    };
    let text = check(&good)?;
    assert!(text.contains("ok    kafka"), "{text}");
    // a certificate that is not a CA cannot vouch for the broker's; plain text gets no answer
    let wrong = tls("server.crt");
    let wrong: Vec<&str> = wrong.iter().map(String::as_str).collect();
    for args in [wrong.as_slice(), &[]] {
        let text = check(args)?;
        let line = text
            .lines()
            .find(|l| l.contains(" kafka "))
            .unwrap_or_default();
        assert!(line.starts_with("FAIL  kafka"), "{text}");
    }
    Ok(())
}

#[tokio::test]
async fn the_password_file_is_read_as_libpq_reads_it() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let db = TestDb::create("tl_pgpass", port()).await?;
    db.client
        .batch_execute(
            "DO $$ BEGIN CREATE ROLE pw_only LOGIN SUPERUSER REPLICATION PASSWORD 'secret-pw'; \
             EXCEPTION WHEN duplicate_object THEN NULL; END $$",
        )
        .await?;
    let broker = Broker::start()?;
    let file = std::env::temp_dir().join(format!("pgpass-{}", db.name));
    // `check` as pw_only, the password only in the file PGPASSFILE names
    let check = |password: &str| -> Result<String> {
        std::fs::write(
            &file,
            format!(
                "# the relay\n127.0.0.1:{}:{}:pw_only:{password}\n",
                db.port, db.name
            ),
        )?;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))?;
        let out = std::process::Command::new(relay_bin())
            .args([
                "check",
                "--pg-port",
                &db.port.to_string(),
                "--pg-user",
                "pw_only",
            ])
            .args(["--pg-database", &db.name, "--slot", &db.name])
            .args(["--brokers", &broker.bootstrap()])
            .env("PGPASSFILE", &file)
            .env_remove("PG_OUTBOX_PG_PASSWORD")
            .env_remove("PGPASSWORD")
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    };
    let text = check("secret-pw")?;
    assert!(text.contains("ok    postgres"), "{text}");
    let text = check("wrong")?;
    assert!(text.contains("FAIL  postgres"), "{text}");
    assert!(
        text.contains("refused the login of role \"pw_only\""),
        "{text}"
    );
    let _ = std::fs::remove_file(&file);
    Ok(())
}

/// A port nothing listens on.
fn dead_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

#[tokio::test]
async fn a_url_with_several_hosts_takes_the_first_that_accepts_writes() -> Result<()> {
    let db = TestDb::create("tl_hosts", port()).await?;
    // the same database on the other cluster, read-only: what a standby is to the relay
    let standin = TestDb::create("tl_hosts", replica_port()).await?;
    standin
        .client
        .batch_execute("ALTER DATABASE tl_hosts SET default_transaction_read_only = on")
        .await?;
    let broker = Broker::start()?;
    broker.create_topic("orders", 1).await?;
    let url = |attrs: &str| {
        Ok::<_, anyhow::Error>(format!(
            "postgres://postgres@127.0.0.1:{},127.0.0.1:{},localhost:{}/tl_hosts\
             ?connect_timeout=2&target_session_attrs={attrs}",
            dead_port()?,
            replica_port(),
            db.port
        ))
    };
    let check = |url: String| -> Result<String> {
        let out = std::process::Command::new(relay_bin())
            .args(["check", "--pg-url", &url, "--slot", "tl_hosts"])
            .args(["--brokers", &broker.bootstrap()])
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    };
    // read-write (the default): past the dead server and the read-only one, to the third
    let text = check(url("read-write")?)?;
    assert!(
        text.contains(&format!("ok    postgres localhost:{} reachable", db.port)),
        "{text}"
    );
    // any: the first server that answers
    let text = check(url("any")?)?;
    assert!(
        text.contains(&format!(
            "ok    postgres 127.0.0.1:{} reachable",
            replica_port()
        )),
        "{text}"
    );
    // the relay streams from the server that accepts writes (its replication connection too)
    let url = url("read-write")?;
    let mut relay = Relay::spawn(
        "run",
        "tl_hosts",
        &[
            "--pg-url",
            &url,
            "--slot",
            "tl_hosts",
            "--brokers",
            &broker.bootstrap(),
        ],
    )?;
    db.wait_for_active_slot().await?;
    db.client
        .execute("SELECT outbox.enqueue('orders', 'k', '{\"n\": 1}')", &[])
        .await?;
    let records = read_all(
        &broker.bootstrap(),
        &[("orders", 1)],
        1,
        Duration::from_secs(60),
    )?;
    assert_eq!(records[0].key.as_deref(), Some(b"k".as_slice()));
    assert!(relay.terminate(Duration::from_secs(30))?.success());
    Ok(())
}

#[tokio::test]
async fn the_relay_logs_in_to_kafka_with_sasl_scram_and_check_names_a_refused_login() -> Result<()>
{
    let db = TestDb::create("tl_sasl", port()).await?;
    let broker = Broker::start_sasl("relay", "kafka-secret")?;
    broker.create_topic("orders", 1).await?;
    // the credentials in the config file, not on the command line
    let config = |password: &str| -> Result<String> {
        let path = std::env::temp_dir().join(format!("relay-{}-{password}.toml", db.name));
        std::fs::write(
            &path,
            format!(
                "[kafka]\n\"security.protocol\" = \"SASL_PLAINTEXT\"\n\
                 \"sasl.mechanism\" = \"SCRAM-SHA-256\"\n\"sasl.username\" = \"relay\"\n\
                 \"sasl.password\" = \"{password}\"\n"
            ),
        )?;
        Ok(path.display().to_string())
    };
    let good = config("kafka-secret")?;
    let _relay = Relay::start(db.port, &db.name, &broker.bootstrap(), &["--config", &good])?;
    three_events_arrive(&db, &broker).await?;
    let check = |config: &str| -> Result<String> {
        let text = relay_command(
            "check",
            db.port,
            &db.name,
            &broker.bootstrap(),
            &["--config", config],
        )?
        .1;
        Ok(text
            .lines()
            .find(|l| l.contains(" kafka "))
            .unwrap_or_default()
            .to_string())
    };
    let line = check(&good)?;
    assert!(line.starts_with("ok    kafka"), "{line}");
    // a wrong password: one line that says the login was refused, without the password
    let line = check(&config("wrong-secret")?)?;
    assert!(
        line.starts_with("FAIL  kafka") && line.contains("authentication failed"),
        "{line}"
    );
    assert!(!line.contains("wrong-secret"), "{line}");
    Ok(())
}
