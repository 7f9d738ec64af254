//! Kafka-side fixtures: a Tansu broker per test (memory storage, its own port) and a consumer that
//! reads back everything the relay published.

use crate::free_port;
use anyhow::{bail, Context, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message, OwnedHeaders};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A Tansu broker with in-memory storage on its own port; killed on drop. A TLS broker is Tansu
/// behind stunnel: clients reach it (and Tansu advertises it) as `localhost:port` over TLS only.
/// A SASL broker keeps its users (and records) in SQLite and accepts SCRAM-SHA-256 logins only.
pub struct Broker {
    pub port: u16,
    child: Child,
    /// stunnel, in front of a TLS broker.
    tunnel: Option<Child>,
    /// What a client needs to reach it (security settings).
    settings: Vec<(String, String)>,
    host: &'static str,
    /// A SASL broker's storage, removed on drop.
    storage: Option<std::path::PathBuf>,
}

impl Broker {
    /// A broker on a free port. The port is free when picked, but another test's broker (or an
    /// outgoing connection) may take it before Tansu binds it: then Tansu exits, and the broker is
    /// started again on another port rather than the test talking to someone else's broker.
    pub fn start() -> Result<Broker> {
        Self::on_a_free_port(false, &[])
    }

    fn on_a_free_port(sqlite: bool, extra: &[&str]) -> Result<Broker> {
        let mut attempt = 1;
        loop {
            match Self::start_with(free_port(), sqlite, extra) {
                Ok(broker) => return Ok(broker),
                Err(e) if attempt < 5 => {
                    eprintln!("broker: {e:#}; trying another port");
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub fn start_on(port: u16) -> Result<Broker> {
        Self::start_with(port, false, &[])
    }

    /// A broker that validates what is produced to a topic against `registry`'s `<topic>.json`
    /// (Tansu's embedded schema registry): a record that does not conform is refused with
    /// `INVALID_RECORD`, a real broker's permanent refusal of one record. `registry` is a folder
    /// in the temp folder (Tansu resolves the URL's path against its working folder).
    pub fn start_with_schemas(registry: &std::path::Path) -> Result<Broker> {
        let name = registry
            .strip_prefix(std::env::temp_dir())
            .context("a schema registry in the temp folder")?;
        let url = format!("file://./{}", name.display());
        Self::on_a_free_port(false, &["--schema-registry", &url])
    }

    /// A broker that keeps its topics and records in SQLite, so that a test can change a topic
    /// under it: [`Broker::add_partitions`].
    pub fn start_sqlite() -> Result<Broker> {
        Self::on_a_free_port(true, &[])
    }

    /// Tansu on `port`, storing in memory or (`sqlite`) in a file of the temp folder.
    fn start_with(port: u16, sqlite: bool, extra: &[&str]) -> Result<Broker> {
        let url = format!("tcp://127.0.0.1:{port}");
        // Tansu reads the file name relative to its working folder (the temp folder)
        let name = format!("tansu-{port}.db");
        let storage = if sqlite {
            format!("sqlite://{name}")
        } else {
            "memory://tansu/".to_string()
        };
        let child = Self::tansu(port, &url, &storage, false, extra)?;
        Ok(Broker {
            port,
            child,
            tunnel: None,
            settings: Vec::new(),
            host: "127.0.0.1",
            storage: sqlite.then(|| std::env::temp_dir().join(name)),
        })
    }

    /// Grows `topic` to `total` partitions under the running broker, as Kafka's CreatePartitions
    /// would (Tansu 0.6 has none): the partitions' rows in its SQLite storage, then the count its
    /// Metadata answers with. Needs a [`Broker::start_sqlite`] broker.
    pub fn add_partitions(&self, topic: &str, total: i32) -> Result<()> {
        let db = self
            .storage
            .as_ref()
            .context("a broker with SQLite storage")?;
        let script = r#"
import sqlite3, sys
db, topic, total = sys.argv[1], sys.argv[2], int(sys.argv[3])
c = sqlite3.connect(db, isolation_level=None)
c.execute("BEGIN IMMEDIATE")
(tid, have), = c.execute("SELECT id, partitions FROM topic WHERE name = ?", (topic,)).fetchall()
for p in range(have, total):
    c.execute("INSERT INTO topition (topic, partition) VALUES (?, ?)", (tid, p))
    c.execute("INSERT INTO watermark (topition) SELECT id FROM topition WHERE topic = ? AND partition = ?", (tid, p))
c.execute("UPDATE topic SET partitions = ?, last_updated = current_timestamp WHERE id = ?", (total, tid))
c.execute("COMMIT")
"#;
        let status = Command::new("python3")
            .args(["-c", script])
            .arg(db)
            .arg(topic)
            .arg(total.to_string())
            .status()
            .context("python3 (scripts/setup.sh installs it)")?;
        anyhow::ensure!(status.success(), "adding partitions to {topic}: {status}");
        Ok(())
    }

    /// Tansu that requires a SCRAM-SHA-256 login as `user`/`password`. Tansu 0.6 keeps users in
    /// its storage and its own `user create` client cannot log in, so the user is made while the
    /// broker runs without authentication, then the broker restarts with it.
    pub fn start_sasl(user: &str, password: &str) -> Result<Broker> {
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        // Tansu reads the file name relative to its working folder (the temp folder)
        let name = format!("tansu-sasl-{port}.db");
        let db = std::env::temp_dir().join(&name);
        let storage = format!("sqlite://{name}");
        let mut open = Self::tansu(port, &url, &storage, false, &[])?;
        let made = Command::new("tansu")
            .args(["user", "create", user, password, "--mechanism", "scram256"])
            .args(["--broker", &url])
            .status();
        let _ = open.kill();
        let _ = open.wait();
        anyhow::ensure!(made?.success(), "tansu user create");
        let child = Self::tansu(port, &url, &storage, true, &[])?;
        let settings = [
            ("security.protocol", "SASL_PLAINTEXT"),
            ("sasl.mechanism", "SCRAM-SHA-256"),
            ("sasl.username", user),
            ("sasl.password", password),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .to_vec();
        Ok(Broker {
            port,
            child,
            tunnel: None,
            settings,
            host: "127.0.0.1",
            storage: Some(db),
        })
    }

    /// Tansu on a plain port of its own, reachable only through stunnel, which accepts TLS with
    /// `dir`'s server.crt (issued for localhost by `dir`'s ca.crt).
    pub fn start_tls(dir: &std::path::Path) -> Result<Broker> {
        let (plain, port) = (free_port(), free_port());
        let child = Self::tansu(
            plain,
            &format!("tcp://localhost:{port}"),
            "memory://tansu/",
            false,
            &[],
        )?;
        let conf = std::env::temp_dir().join(format!("stunnel-{port}.conf"));
        std::fs::write(
            &conf,
            format!(
                "foreground = yes\npid =\n[kafka]\naccept = 127.0.0.1:{port}\nconnect = 127.0.0.1:{plain}\n\
                 cert = {}\nkey = {}\n",
                dir.join("server.crt").display(),
                dir.join("server.key").display()
            ),
        )?;
        let log = std::fs::File::create(std::env::temp_dir().join(format!("stunnel-{port}.log")))?;
        let stunnel = Command::new("stunnel4")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting stunnel4 (scripts/setup.sh installs it)")?;
        wait_for_port(port)?;
        let settings = vec![
            ("security.protocol".to_string(), "ssl".to_string()),
            (
                "ssl.ca.location".to_string(),
                dir.join("ca.crt").display().to_string(),
            ),
        ];
        Ok(Broker {
            port,
            child,
            tunnel: Some(stunnel),
            settings,
            host: "localhost",
            storage: None,
        })
    }

    /// librdkafka settings a client needs for this broker (TLS or SASL ones, or none).
    pub fn client_settings(&self) -> &[(String, String)] {
        &self.settings
    }

    fn tansu(
        port: u16,
        advertised: &str,
        storage: &str,
        authentication: bool,
        extra: &[&str],
    ) -> Result<Child> {
        let url = format!("tcp://127.0.0.1:{port}");
        let log = std::fs::File::create(std::env::temp_dir().join(format!("tansu-{port}.log")))?;
        let mut child = Command::new("tansu")
            .current_dir(std::env::temp_dir())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                advertised,
            ])
            .args(["--storage-engine", storage])
            .args(authentication.then_some("--authentication"))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting tansu (scripts/setup.sh installs it)")?;
        // something answering on the port is not enough: it may be another process (then this
        // Tansu could not bind and exits), so wait until this very process holds the listener
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait()? {
                let log =
                    std::fs::read_to_string(std::env::temp_dir().join(format!("tansu-{port}.log")))
                        .unwrap_or_default();
                let last = log.lines().last().unwrap_or_default();
                bail!("tansu on port {port} exited at start ({status}): {last}");
            }
            if listens(child.id(), port) {
                return Ok(child);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("tansu (pid {}) does not listen on {port}", child.id());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn bootstrap(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn admin(&self) -> Result<AdminClient<DefaultClientContext>> {
        let mut cc = ClientConfig::new();
        cc.set("bootstrap.servers", self.bootstrap());
        for (k, v) in self.client_settings() {
            cc.set(k, v);
        }
        Ok(cc.create()?)
    }

    pub async fn delete_topic(&self, name: &str) -> Result<()> {
        let results = self
            .admin()?
            .delete_topics(&[name], &AdminOptions::new())
            .await?;
        for r in results {
            r.map_err(|(t, e)| anyhow::anyhow!("deleting topic {t}: {e}"))?;
        }
        Ok(())
    }

    pub async fn create_topic(&self, name: &str, partitions: i32) -> Result<()> {
        let admin = self.admin()?;
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
        if let Some(stunnel) = &mut self.tunnel {
            let _ = stunnel.kill();
            let _ = stunnel.wait();
        }
        if let Some(db) = &self.storage {
            for suffix in ["", "-shm", "-wal"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
            }
        }
    }
}

/// Waits until something listens on 127.0.0.1:`port`.
fn wait_for_port(port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on {port}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Whether process `pid` holds the socket that listens on TCP `port` (Linux: /proc/net/tcp names
/// the listening socket's inode, and /proc/PID/fd links to the sockets the process holds).
fn listens(pid: u32, port: u16) -> bool {
    let inodes: Vec<String> = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(table).ok())
        .flat_map(|table| {
            table
                .lines()
                .skip(1)
                .filter_map(|line| {
                    // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    let local_port = fields.get(1)?.rsplit(':').next()?;
                    let (state, inode) = (*fields.get(3)?, *fields.get(9)?);
                    (state == "0A" && u16::from_str_radix(local_port, 16).ok()? == port)
                        .then(|| format!("socket:[{inode}]"))
                })
                .collect::<Vec<_>>()
        })
        .collect();
    if inodes.is_empty() {
        return false;
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path()).is_ok_and(|link| {
            inodes
                .iter()
                .any(|inode| link.as_os_str() == inode.as_str())
        })
    })
}

/// One record read back from Kafka.
#[derive(Debug, Clone)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    /// In the record's order (the relay writes its own first).
    pub headers: Vec<(String, Vec<u8>)>,
    /// The record's timestamp, Unix ms.
    pub timestamp_ms: Option<i64>,
}

impl Record {
    /// The first header named `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }
    pub fn id(&self) -> String {
        self.header("pg_outbox-id").unwrap_or_default().to_string()
    }
}

/// Reads every partition of `topics` from the beginning until at least `expected` records arrived
/// and every partition is read to its end, or `timeout` passed; returns every record it read,
/// duplicates included, in (topic, partition, offset) order. The caller asserts the exact count.
///
/// The end of a partition is its high watermark, but a broker may report less than the end (Tansu
/// 0.6 reports the last batch's base offset + 1), so reaching the reported marks is not enough:
/// the marks are fetched again after the consumer went idle, and reading stops only when two
/// fetches in a row report the same marks and every record below them was read. A record written
/// after the first of those fetches moves a mark and reading goes on.
pub fn read_all(
    brokers: &str,
    topics: &[(&str, i32)],
    expected: usize,
    timeout: Duration,
) -> Result<Vec<Record>> {
    read_all_with(brokers, &[], topics, expected, timeout)
}

/// [`read_all`] with client settings (a TLS broker's [`Broker::client_settings`]).
pub fn read_all_with(
    brokers: &str,
    settings: &[(String, String)],
    topics: &[(&str, i32)],
    expected: usize,
    timeout: Duration,
) -> Result<Vec<Record>> {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", brokers)
        .set("group.id", "pg_outbox-tests")
        .set("enable.auto.commit", "false");
    for (k, v) in settings {
        cc.set(k, v);
    }
    let consumer: BaseConsumer = cc.create()?;
    let mut tpl = TopicPartitionList::new();
    // per partition: the offset after the last record read
    let mut next: BTreeMap<(String, i32), i64> = BTreeMap::new();
    for (topic, partitions) in topics {
        for p in 0..*partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)?;
            next.insert((topic.to_string(), p), 0);
        }
    }
    consumer.assign(&tpl)?;
    let mut out = Vec::new();
    let deadline = Instant::now() + timeout;
    let mut last_marks: Option<Vec<i64>> = None;
    while Instant::now() < deadline {
        // everything that is ready, until the consumer is idle for one poll
        while let Some(msg) = consumer.poll(Duration::from_millis(100)) {
            let record = to_record(&msg?);
            next.insert((record.topic.clone(), record.partition), record.offset + 1);
            out.push(record);
            if Instant::now() > deadline {
                break;
            }
        }
        if out.len() < expected {
            continue;
        }
        let marks = high_watermarks(&consumer, next.keys())?;
        let at_end = next
            .values()
            .zip(&marks)
            .all(|(read_to, high)| read_to >= high);
        if at_end && last_marks.as_ref() == Some(&marks) {
            break;
        }
        last_marks = at_end.then_some(marks);
    }
    out.sort_by(|a, b| (&a.topic, a.partition, a.offset).cmp(&(&b.topic, b.partition, b.offset)));
    Ok(out)
}

/// The high watermarks of `partitions`, in their order, in one request (a ListOffsets for the
/// latest offset of each, where `fetch_watermarks` would send two per partition).
fn high_watermarks<'a>(
    consumer: &BaseConsumer,
    partitions: impl Iterator<Item = &'a (String, i32)>,
) -> Result<Vec<i64>> {
    let mut tpl = TopicPartitionList::new();
    let mut order = Vec::new();
    for (topic, partition) in partitions {
        tpl.add_partition_offset(topic, *partition, Offset::End)?;
        order.push((topic.as_str(), *partition));
    }
    let ends = consumer.offsets_for_times(tpl, Duration::from_secs(10))?;
    order
        .into_iter()
        .map(|(topic, partition)| {
            let e = ends
                .find_partition(topic, partition)
                .with_context(|| format!("no end offset for {topic}[{partition}]"))?;
            e.error()?;
            match e.offset() {
                Offset::Offset(high) => Ok(high),
                // nothing written yet
                Offset::End | Offset::Beginning => Ok(0),
                other => bail!("end of {topic}[{partition}]: {other:?}"),
            }
        })
        .collect()
}

fn to_record(msg: &rdkafka::message::BorrowedMessage<'_>) -> Record {
    Record {
        topic: msg.topic().to_string(),
        partition: msg.partition(),
        offset: msg.offset(),
        key: msg.key().map(<[u8]>::to_vec),
        payload: msg.payload().unwrap_or_default().to_vec(),
        timestamp_ms: msg.timestamp().to_millis(),
        // raw: rdkafka's own accessor panics on a header name that is not UTF-8, and the tests
        // write such records
        headers: pg_outbox_relay::sink::kafka::raw_headers(msg)
            .into_iter()
            .map(|(name, value)| {
                (
                    String::from_utf8_lossy(name).into_owned(),
                    value.unwrap_or_default().to_vec(),
                )
            })
            .collect(),
    }
}

/// `headers` with one more header named `name`, whatever bytes (rdkafka's safe API takes only
/// `&str` names, so through librdkafka directly).
pub fn with_raw_header(headers: OwnedHeaders, name: &[u8], value: &[u8]) -> OwnedHeaders {
    use rdkafka::bindings as rd;
    use rdkafka::message::BorrowedHeaders;
    let native = headers.as_borrowed() as *const BorrowedHeaders as *mut rd::rd_kafka_headers_t;
    // SAFETY: `native` is the header list `headers` owns (BorrowedHeaders is that list, and nothing
    // else refers to it); librdkafka copies name and value.
    let err = unsafe {
        rd::rd_kafka_header_add(
            native,
            name.as_ptr().cast(),
            name.len() as isize,
            value.as_ptr().cast(),
            value.len() as isize,
        )
    };
    assert_eq!(err, rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR);
    headers
}
