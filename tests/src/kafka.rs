//! Kafka-side fixtures: a Tansu broker per test (memory storage, its own port), the relay as a child
//! process, and a consumer that reads back everything the relay published.

use anyhow::{bail, Context, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
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

/// One value from a Prometheus text exposition (the line `name value`).
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Sends a signal to a process (kill -9, SIGSTOP, SIGCONT, SIGTERM).
pub fn signal(pid: u32, sig: &str) -> Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()?;
    if !status.success() {
        bail!("kill -{sig} {pid} failed");
    }
    Ok(())
}

/// A Tansu broker with in-memory storage on its own port; killed on drop.
pub struct Broker {
    pub port: u16,
    child: Child,
}

impl Broker {
    pub fn start() -> Result<Broker> {
        Self::start_on(free_port())
    }

    pub fn start_on(port: u16) -> Result<Broker> {
        let url = format!("tcp://127.0.0.1:{port}");
        let log = std::fs::File::create(std::env::temp_dir().join(format!("tansu-{port}.log")))?;
        let child = Command::new("tansu")
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting tansu (scripts/setup.sh installs it)")?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("tansu did not listen on {port}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Broker { port, child })
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub async fn create_topic(&self, name: &str, partitions: i32) -> Result<()> {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .create()?;
        let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        let results = admin.create_topics([&topic], &AdminOptions::new()).await?;
        for r in results {
            r.map_err(|(t, e)| anyhow::anyhow!("creating topic {t}: {e}"))?;
        }
        Ok(())
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

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
}

impl Relay {
    /// Starts `pg-outbox-relay run` with `args` appended to the connection settings.
    pub fn start(pg_port: u16, db: &str, brokers: &str, args: &[&str]) -> Result<Relay> {
        let mut all = vec!["--slot", db];
        all.extend_from_slice(args);
        Self::command("run", pg_port, db, brokers, &all)
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
        let log = std::env::temp_dir().join(format!("relay-{db}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let child = Command::new(relay_bin())
            .arg(command)
            .args(["--pg-port", &pg_port.to_string(), "--pg-database", db])
            .args(["--brokers", brokers])
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RELAY_LOG").unwrap_or("info,rdkafka=error".into()),
            )
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {}", relay_bin().display()))?;
        Ok(Relay { child, log })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
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

/// One record read back from Kafka.
#[derive(Debug, Clone)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: HashMap<String, Vec<u8>>,
}

impl Record {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .and_then(|v| std::str::from_utf8(v).ok())
    }
    pub fn id(&self) -> String {
        self.header("pg_outbox-id").unwrap_or_default().to_string()
    }
}

/// Reads every partition of `topics` from the beginning until `expected` records arrived or
/// `timeout` passed; returns what it read, in (topic, partition, offset) order.
pub fn read_all(
    brokers: &str,
    topics: &[(&str, i32)],
    expected: usize,
    timeout: Duration,
) -> Result<Vec<Record>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "pg_outbox-tests")
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for (topic, partitions) in topics {
        for p in 0..*partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)?;
        }
    }
    consumer.assign(&tpl)?;
    let mut out = Vec::new();
    let deadline = Instant::now() + timeout;
    while out.len() < expected && Instant::now() < deadline {
        if let Some(msg) = consumer.poll(Duration::from_millis(100)) {
            out.push(to_record(&msg?));
        }
    }
    // linger a moment: anything beyond `expected` would be a duplicate
    let settle = Instant::now() + Duration::from_millis(500);
    while Instant::now() < settle {
        if let Some(msg) = consumer.poll(Duration::from_millis(100)) {
            out.push(to_record(&msg?));
        }
    }
    out.sort_by(|a, b| (&a.topic, a.partition, a.offset).cmp(&(&b.topic, b.partition, b.offset)));
    Ok(out)
}

fn to_record(msg: &rdkafka::message::BorrowedMessage<'_>) -> Record {
    Record {
        topic: msg.topic().to_string(),
        partition: msg.partition(),
        offset: msg.offset(),
        key: msg.key().map(<[u8]>::to_vec),
        payload: msg.payload().unwrap_or_default().to_vec(),
        headers: msg
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                    .collect()
            })
            .unwrap_or_default(),
    }
}
