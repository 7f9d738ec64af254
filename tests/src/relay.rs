//! The relay as a child process of a test (`run` or `ingest`, its log in the temp folder) and its
//! Prometheus `/metrics`.

use crate::signal;
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The relay binary built by `make test` (PG_OUTBOX_RELAY_BIN, else target/debug).
pub fn relay_bin() -> PathBuf {
    std::env::var_os("PG_OUTBOX_RELAY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/pg-outbox-relay")
        })
}

/// A relay child process; killed on drop.
pub struct Relay {
    child: Child,
    pub log: PathBuf,
    /// Where it serves `/metrics` and `/healthz`, if it was started with `--metrics-addr` by
    /// [`crate::Scenario::relay`]`.metrics()`.
    pub metrics: Option<String>,
}

impl Relay {
    /// Starts `pg-outbox-relay run` with `args` appended to the connection settings.
    pub fn start(pg_port: u16, db: &str, brokers: &str, args: &[&str]) -> Result<Relay> {
        Self::start_with_env(pg_port, db, brokers, args, &[])
    }

    /// [`Relay::start`] with environment variables `env` set for the relay.
    pub fn start_with_env(
        pg_port: u16,
        db: &str,
        brokers: &str,
        args: &[&str],
        env: &[(String, String)],
    ) -> Result<Relay> {
        let mut all = vec!["--slot", db];
        all.extend_from_slice(args);
        let port = pg_port.to_string();
        let mut with = vec![
            "--pg-port",
            &port,
            "--pg-database",
            db,
            "--brokers",
            brokers,
        ];
        with.extend_from_slice(&all);
        Self::spawn_with_env("run", db, &with, env)
    }

    /// Starts `pg-outbox-relay ingest --consumer CONSUMER --topics TOPICS` plus `args`.
    pub fn ingest(
        pg_port: u16,
        db: &str,
        brokers: &str,
        consumer: &str,
        topics: &str,
        args: &[&str],
    ) -> Result<Relay> {
        let mut all = vec!["--consumer", consumer, "--topics", topics];
        all.extend_from_slice(args);
        Self::command("ingest", pg_port, db, brokers, &all)
    }

    fn command(
        command: &str,
        pg_port: u16,
        db: &str,
        brokers: &str,
        args: &[&str],
    ) -> Result<Relay> {
        let port = pg_port.to_string();
        let mut all = vec![
            "--pg-port",
            &port,
            "--pg-database",
            db,
            "--brokers",
            brokers,
        ];
        all.extend_from_slice(args);
        Self::spawn(command, db, &all)
    }

    /// Starts `pg-outbox-relay <command> <args>` with no settings of its own; the log is named
    /// after `db`.
    pub fn spawn(command: &str, db: &str, args: &[&str]) -> Result<Relay> {
        Self::spawn_with_env(command, db, args, &[])
    }

    /// [`Relay::spawn`] with environment variables `env` set for the relay.
    pub fn spawn_with_env(
        command: &str,
        db: &str,
        args: &[&str],
        env: &[(String, String)],
    ) -> Result<Relay> {
        let log = std::env::temp_dir().join(format!("relay-{db}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let child = Command::new(relay_bin())
            .arg(command)
            .args(args)
            // the relay's default login is pg_outbox_relay; the test clusters' superuser is
            // postgres (a test that wants another role passes --pg-user or a URL, which win)
            .env("PGUSER", "postgres")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env(
                "RUST_LOG",
                std::env::var("RELAY_LOG").unwrap_or("info,rdkafka=error".into()),
            )
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {}", relay_bin().display()))?;
        Ok(Relay {
            child,
            log,
            metrics: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its `/metrics` and `/healthz` address (host:port); panics for a relay started without one.
    pub fn metrics_addr(&self) -> &str {
        self.metrics
            .as_deref()
            .expect("a relay started with Scenario::relay().metrics()")
    }

    pub fn kill9(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        signal(self.child.id(), "TERM")?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("relay did not exit within {timeout:?} after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn try_wait(&mut self) -> Result<Option<std::process::ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// Waits until the relay exits by itself (a permanent error), or fails after `timeout`.
    pub async fn wait_for_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!(
                    "relay still running after {timeout:?}; log: {}",
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until `needle` appears `count` times in the log (relays of one database share it).
    pub async fn wait_for_log(&self, needle: &str, count: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while self.log_text().matches(needle).count() < count {
            if Instant::now() > deadline {
                bail!(
                    "timed out waiting for {needle:?} x{count} in {}",
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `pg-outbox-relay <command>` (`check`, `status`) for database `db` (and its slot, named like
/// it) with `args` appended; returns whether it succeeded, and its stdout then stderr.
pub fn relay_command(
    command: &str,
    pg_port: u16,
    db: &str,
    brokers: &str,
    args: &[&str],
) -> Result<(bool, String)> {
    let out = Command::new(relay_bin())
        .env("PGUSER", "postgres")
        .args([command, "--pg-port", &pg_port.to_string()])
        .args(["--pg-database", db, "--slot", db, "--brokers", brokers])
        .args(args)
        .output()?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    Ok((out.status.success(), text))
}

/// The answer to `GET /healthz` at `addr` (host:port): whether it said 200, and the whole text.
pub fn healthz(addr: &str) -> Result<(bool, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.write_all(b"GET /healthz HTTP/1.0\r\n\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok((text.starts_with("HTTP/1.0 200"), text))
}

/// The text of the relay's `/metrics` at `addr` (host:port).
pub fn scrape_metrics(addr: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok(text)
}

/// One sample of a text exposition: name, labels, value.
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// The samples of a Prometheus or OpenMetrics text exposition (comment lines and `# EOF` skipped).
/// Label values are taken as written (the relay's hold no `"`, `\` or `,`).
pub fn samples(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let value = value.parse().ok()?;
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let inner = rest.strip_suffix('}')?;
                    let labels = inner
                        .split(',')
                        .filter(|kv| !kv.is_empty())
                        .filter_map(|kv| {
                            let (k, v) = kv.split_once('=')?;
                            Some((k.to_string(), v.trim_matches('"').to_string()))
                        })
                        .collect();
                    (name, labels)
                }
                None => (series, Vec::new()),
            };
            Some(Sample {
                name: name.to_string(),
                labels,
                value,
            })
        })
        .collect()
}

/// The value of `name` summed over all its label sets (`pg_outbox_relay_events_published_total`
/// is counted per topic and partition; this is the total). Some(0) for a metric the exposition
/// declares without any sample yet (a labelled counter nothing was counted in), None for one it
/// does not know.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    metric_with(text, name, &[])
}

/// The value of `name` summed over the label sets that hold every pair of `labels`, e.g.
/// `&[("topic", "orders"), ("partition", "3")]`; Some(0) when the metric is declared but no
/// such series exists yet.
pub fn metric_with(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for sample in samples(text) {
        if sample.name == name
            && labels
                .iter()
                .all(|(k, v)| sample.labels.iter().any(|(sk, sv)| sk == k && sv == v))
        {
            *found.get_or_insert(0.0) += sample.value;
        }
    }
    found.or_else(|| declared(text, name).then_some(0.0))
}

/// Whether the exposition declares the metric family `name` belongs to (`# TYPE <family> ...`;
/// a counter's samples add `_total`, a histogram's `_bucket`, `_sum` and `_count`).
fn declared(text: &str, name: &str) -> bool {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.split_whitespace().next())
        .any(|family| {
            name == family
                || ["_total", "_sum", "_count", "_bucket"]
                    .iter()
                    .any(|suffix| name.strip_suffix(suffix) == Some(family))
        })
}

/// Waits until the counter `name` at `addr` reaches `at_least`; a relay whose `/metrics` is not up
/// yet counts as zero.
pub async fn wait_for_metric(
    addr: &str,
    name: &str,
    at_least: f64,
    timeout: Duration,
) -> Result<()> {
    wait_for_metric_with(addr, name, &[], at_least, timeout).await
}

/// [`wait_for_metric`] for the series of `name` that hold `labels` (summed, see [`metric_with`]).
pub async fn wait_for_metric_with(
    addr: &str,
    name: &str,
    labels: &[(&str, &str)],
    at_least: f64,
    timeout: Duration,
) -> Result<()> {
    crate::wait_for(
        &format!("{name}{labels:?} >= {at_least}"),
        timeout,
        || async move {
            Ok(scrape_metrics(addr)
                .ok()
                .and_then(|text| metric_with(&text, name, labels))
                .is_some_and(|v| v >= at_least))
        },
    )
    .await
}
