//! The relay as a daemon: systemd's readiness protocol (`Type=notify`), the `healthcheck`
//! subcommand of the image and the Kubernetes probes, `check`/`status` as JSON, exit statuses, and
//! connection settings as users copy them (every libpq keyword, a port per host, secrets in files).

use anyhow::{bail, Result};
use pg_outbox_tests::{enqueue, free_port, port, relay_bin, Relay, Scenario};
use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::{Duration, Instant};

/// Waits for a datagram on `socket` that contains every one of `needles`; returns it. Earlier
/// messages are kept in `seen`.
fn expect_message(
    socket: &UnixDatagram,
    needles: &[&str],
    seen: &mut Vec<String>,
    timeout: Duration,
) -> Result<String> {
    let deadline = Instant::now() + timeout;
    socket.set_read_timeout(Some(Duration::from_millis(200)))?;
    loop {
        let mut buf = [0u8; 1024];
        if let Ok(n) = socket.recv(&mut buf) {
            let message = String::from_utf8_lossy(&buf[..n]).to_string();
            seen.push(message.clone());
            if needles.iter().all(|n| message.contains(n)) {
                return Ok(message);
            }
        }
        if Instant::now() > deadline {
            bail!("no message with {needles:?} within {timeout:?}; got {seen:?}");
        }
    }
}

/// `pg-outbox-relay healthcheck` against `addr`: the exit status and its one line.
fn healthcheck(addr: &str, extra: &[&str]) -> Result<(Option<i32>, String)> {
    let out = Command::new(relay_bin())
        .args(["healthcheck", "--metrics-addr", addr])
        .args(extra)
        .output()?;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).trim_end().to_string(),
    ))
}

#[tokio::test]
async fn systemd_hears_ready_status_and_stopping_and_healthcheck_agrees() -> Result<()> {
    let s = Scenario::builder("dm_notify")
        .topic("orders", 1)
        .start()
        .await?;
    let dir = std::env::temp_dir().join(format!("dm_notify-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("notify.sock");
    let _ = std::fs::remove_file(&path);
    let first_socket = UnixDatagram::bind(&path)?;
    // the second relay's socket is abstract, as systemd's own often is
    let name = format!("dm_notify_{}", std::process::id());
    let second_socket = {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        UnixDatagram::bind_addr(&addr)?
    };
    let (mut one, mut two) = (Vec::new(), Vec::new());
    let mut first = s
        .relay()
        .env("NOTIFY_SOCKET", path.to_str().unwrap_or_default())
        .metrics()
        .start()?;
    let ready = expect_message(
        &first_socket,
        &["READY=1"],
        &mut one,
        Duration::from_secs(60),
    )?;
    assert_eq!(ready, "READY=1\nSTATUS=streaming", "{one:?}");
    let (code, line) = healthcheck(first.metrics_addr(), &[])?;
    assert_eq!((code, line.as_str()), (Some(0), "ok: active"));
    // a second relay stands by, and says so: ready too (standing by is its job)
    let mut second = s
        .relay()
        .env("NOTIFY_SOCKET", &format!("@{name}"))
        .metrics()
        .start()?;
    let ready = expect_message(
        &second_socket,
        &["READY=1"],
        &mut two,
        Duration::from_secs(60),
    )?;
    assert!(
        ready.starts_with("READY=1\nSTATUS=standby behind ") && ready.contains("pg_outbox_relay "),
        "{two:?}"
    );
    let (code, line) = healthcheck(second.metrics_addr(), &[])?;
    assert_eq!(code, Some(0), "{line}");
    assert!(line.starts_with("standby: "), "{line}");
    // the first stops: STOPPING=1, exit 0; the second takes over and streams
    let status = first.terminate(Duration::from_secs(60))?;
    assert_eq!(status.code(), Some(0));
    expect_message(
        &first_socket,
        &["STOPPING=1"],
        &mut one,
        Duration::from_secs(5),
    )?;
    expect_message(
        &second_socket,
        &["STATUS=streaming"],
        &mut two,
        Duration::from_secs(60),
    )?;
    assert_eq!(
        two.iter().filter(|m| m.contains("READY=1")).count(),
        1,
        "READY=1 once: {two:?}"
    );
    let id = enqueue(&s.db.client, "orders", "k", r#"{"n": 1}"#).await?;
    let records = s.read(1)?;
    assert_eq!(records[0].id(), id.to_string());
    // nobody answers: exit 1 with one line, for liveness too
    let addr = second.metrics_addr().to_string();
    second.kill9()?;
    for extra in [&[][..], &["--live"]] {
        let (code, line) = healthcheck(&addr, extra)?;
        assert_eq!(code, Some(1), "{line}");
        assert_eq!(line.lines().count(), 1, "{line}");
    }
    let (code, _) = healthcheck(&format!("0.0.0.0:{}", free_port()), &[])?;
    assert_eq!(code, Some(1));
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[tokio::test]
async fn check_and_status_as_json() -> Result<()> {
    let s = Scenario::builder("dm_json")
        .topic("orders", 1)
        .start()
        .await?;
    let _relay = s.relay().running().await?;
    enqueue(&s.db.client, "orders", "k", r#"{"n": 1}"#).await?;
    s.read(1)?;
    let json = |command: &str| -> Result<(Option<i32>, serde_json::Value)> {
        let out = Command::new(relay_bin())
            .env("PGUSER", "postgres")
            .args([command, "--json", "--pg-port", &s.db.port.to_string()])
            .args(["--pg-database", &s.db.name, "--slot", &s.db.name])
            .args(["--brokers", &s.brokers()])
            .output()?;
        Ok((out.status.code(), serde_json::from_slice(&out.stdout)?))
    };
    let (code, check) = json("check")?;
    assert_eq!(code, Some(0), "{check}");
    assert_eq!(check["ok"], true);
    let findings = check["findings"].as_array().cloned().unwrap_or_default();
    assert!(findings.len() >= 5, "{check}");
    assert!(findings
        .iter()
        .all(|f| f["ok"].is_boolean() && f["what"].is_string() && f["fix"].is_string()));
    let (code, status) = json("status")?;
    assert_eq!(code, Some(0), "{status}");
    assert_eq!(status["slot"], s.db.name.as_str());
    assert!(status["lag_bytes"].is_i64(), "{status}");
    assert!(status["retained_wal_bytes"].is_i64(), "{status}");
    assert!(status["lag_seconds"].is_number(), "{status}");
    assert_eq!(status["dead_letters"], 0);
    assert!(
        status["active_relay"]
            .as_str()
            .is_some_and(|a| a.starts_with("slot") || a.contains("pg_outbox_relay")),
        "{status}"
    );
    // a failure is JSON too
    let out = Command::new(relay_bin())
        .env("PGUSER", "postgres")
        .args(["status", "--json", "--pg-port", &s.db.port.to_string()])
        .args(["--pg-database", &s.db.name, "--slot", "dm_json_missing"])
        .args(["--brokers", &s.brokers()])
        .output()?;
    let error: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert!(
        error["error"]
            .as_str()
            .is_some_and(|e| e.contains("dm_json_missing")),
        "{error}"
    );
    assert_eq!(
        out.status.code(),
        Some(3),
        "a missing slot: an operator must act"
    );
    Ok(())
}

#[tokio::test]
async fn connection_strings_as_providers_print_them() -> Result<()> {
    let s = Scenario::builder("dm_conninfo")
        .topic("orders", 1)
        .start()
        .await?;
    let dead = free_port();
    // what a console prints: keywords the relay applies (options, target_session_attrs) and
    // keywords it does without; two hosts, a port per host, the first one dead
    let url = format!(
        "postgresql://postgres@127.0.0.1,localhost/{}?application_name=shop&keepalives=1\
         &keepalives_idle=30&channel_binding=prefer&gssencmode=disable&connect_timeout=2\
         &options=-c%20statement_timeout%3D0&target_session_attrs=read-write",
        s.db.name
    );
    let ports = format!("{dead},{}", s.db.port);
    let check = |port_flag: bool, url: &str| -> Result<(Option<i32>, String, String)> {
        let mut c = Command::new(relay_bin());
        c.args(["check", "--pg-url", url, "--slot", &s.db.name])
            .args(["--brokers", &s.brokers()]);
        if port_flag {
            c.args(["--pg-port", &ports]);
        } else {
            c.env("PG_OUTBOX_PG_PORT", &ports);
        }
        let out = c.output()?;
        Ok((
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        ))
    };
    for port_flag in [true, false] {
        let (code, out, err) = check(port_flag, &url)?;
        assert!(
            out.contains(&format!("ok    postgres localhost:{} reachable", s.db.port)),
            "{out}{err}"
        );
        assert_eq!(code, Some(0), "{out}{err}");
        for keyword in [
            "application_name",
            "keepalives",
            "keepalives_idle",
            "channel_binding",
            "gssencmode",
        ] {
            let lines = err
                .lines()
                .filter(|l| l.contains(&format!("warning: pg_url: {keyword} is ignored")))
                .count();
            assert_eq!(lines, 1, "{keyword}: {err}");
        }
    }
    // a keyword libpq does not know is refused by name (a configuration error: exit 2)
    let (code, _, err) = check(true, &format!("{url}&sslmod=require"))?;
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("\"sslmod\" is not a libpq connection keyword"),
        "{err}"
    );
    // the relay itself streams with that URL and logs each ignored keyword once
    let relay = Relay::spawn(
        "run",
        &s.db.name,
        &[
            "--pg-url",
            &url,
            "--pg-port",
            &ports,
            "--slot",
            &s.db.name,
            "--brokers",
            &s.brokers(),
        ],
    )?;
    s.db.wait_for_active_slot().await?;
    let id = enqueue(&s.db.client, "orders", "k", r#"{"n": 1}"#).await?;
    assert_eq!(s.read(1)?[0].id(), id.to_string());
    let log = relay.log_text();
    assert_eq!(
        log.matches("pg_url: channel_binding is ignored").count(),
        1,
        "{log}"
    );
    assert!(log.contains("WARN"), "{log}");
    Ok(())
}

#[tokio::test]
async fn secrets_from_files_and_exit_statuses() -> Result<()> {
    let s = Scenario::builder("dm_secrets").start().await?;
    s.db.client
        .batch_execute(
            "DO $$ BEGIN CREATE ROLE pw_only LOGIN SUPERUSER REPLICATION PASSWORD 'secret-pw'; \
             EXCEPTION WHEN duplicate_object THEN NULL; END $$",
        )
        .await?;
    let dir = std::env::temp_dir().join(format!("dm_secrets-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("pg_password");
    let run = |command: &str, env: &[(&str, &str)]| -> Result<(Option<i32>, String)> {
        let out = Command::new(relay_bin())
            .args([
                command,
                "--pg-port",
                &port().to_string(),
                "--pg-user",
                "pw_only",
            ])
            .args(["--pg-database", &s.db.name, "--slot", &s.db.name])
            .args(["--brokers", &s.brokers()])
            .env_remove("PGPASSWORD")
            .env_remove("PGPASSFILE")
            .env("HOME", &dir)
            .envs(env.iter().copied())
            .output()?;
        Ok((
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        ))
    };
    let var = (
        "PG_OUTBOX_PG_PASSWORD_FILE",
        file.to_str().unwrap_or_default(),
    );
    // the file as a secret store writes it: with a trailing newline
    std::fs::write(&file, "secret-pw\n")?;
    let (_, text) = run("check", &[var])?;
    assert!(text.contains("ok    postgres"), "{text}");
    // a wrong password in the file: the login is refused, and the relay stops with 3
    std::fs::write(&file, "wrong\n")?;
    let (_, text) = run("check", &[var])?;
    assert!(text.contains("FAIL  postgres"), "{text}");
    let (code, text) = run("run", &[var])?;
    assert_eq!(code, Some(3), "an operator must act: {text}");
    // an unreadable file is a configuration error that names the variable: 2
    std::fs::remove_file(&file)?;
    let (code, text) = run("run", &[var])?;
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("PG_OUTBOX_PG_PASSWORD_FILE"), "{text}");
    // the Kafka SASL password the same way
    let (code, text) = run(
        "check",
        &[(
            "PG_OUTBOX_KAFKA_SASL_PASSWORD_FILE",
            "/nonexistent/kafka-password",
        )],
    )?;
    assert_eq!(code, Some(2), "{text}");
    assert!(
        text.contains("PG_OUTBOX_KAFKA_SASL_PASSWORD_FILE"),
        "{text}"
    );
    // a port that is no number names the setting
    let out = Command::new(relay_bin())
        .args(["run", "--pg-port", "5432,x", "--brokers", "k:9092"])
        .output()?;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("pg_port"));
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
