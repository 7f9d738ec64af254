//! A test's world in one value: a fresh database with pg_outbox (named after the test, its slot
//! named like it), a broker of its own with the test's topics, and relays started against both.
//!
//! ```ignore
//! let s = Scenario::builder("rl_commit").topic("orders", 3).start().await?;
//! let relay = s.relay().metrics().running().await?;
//! enqueue(&s.db.client, "orders", "alice", r#"{"n": 1}"#).await?;
//! assert_exactly_once_in_order(&s.read(1)?, 1)?;
//! ```

use crate::{free_port, port, read_all_with, relay_command, Broker, Record, Relay, TestDb};
use anyhow::Result;
use std::time::Duration;

/// How long [`Scenario::read`] waits for the records it expects: a deadline, not a pause.
pub const READ_TIMEOUT: Duration = Duration::from_secs(120);

/// A database, a broker and the broker's topics; everything is dropped with it (the broker killed,
/// the database left for the next run to drop).
pub struct Scenario {
    pub db: TestDb,
    pub broker: Broker,
    topics: Vec<(String, i32)>,
}

/// What [`Scenario::builder`] makes: the `wal_level=logical` cluster, the C extension or the SQL
/// edition as the run asks ([`crate::edition`]), wal mode and a plain in-memory broker unless told
/// otherwise.
pub struct ScenarioBuilder {
    name: String,
    port: u16,
    table_mode: bool,
    broker: Option<Broker>,
    topics: Vec<(String, i32)>,
}

impl Scenario {
    /// A scenario whose database is named `name` (unique per test: tests run in parallel).
    pub fn builder(name: &str) -> ScenarioBuilder {
        ScenarioBuilder {
            name: name.to_string(),
            port: port(),
            table_mode: false,
            broker: None,
            topics: Vec::new(),
        }
    }

    /// The broker's bootstrap address.
    pub fn brokers(&self) -> String {
        self.broker.bootstrap()
    }

    /// A relay (`pg-outbox-relay run`) for this database, its slot and this broker.
    pub fn relay(&self) -> RelayBuilder<'_> {
        RelayBuilder {
            scenario: self,
            args: Vec::new(),
            metrics: false,
            env: Vec::new(),
        }
    }

    /// `pg-outbox-relay ingest` into this database's inbox: `consumer` reads `topics`
    /// (comma-separated) from this broker, with `args`.
    pub fn ingest(&self, consumer: &str, topics: &str, args: &[&str]) -> Result<Relay> {
        Relay::ingest(
            self.db.port,
            &self.db.name,
            &self.brokers(),
            consumer,
            topics,
            args,
        )
    }

    /// Every record of the scenario's topics once at least `expected` arrived and every partition
    /// is read to its end, or after [`READ_TIMEOUT`] (see [`crate::read_all`]).
    pub fn read(&self, expected: usize) -> Result<Vec<Record>> {
        self.read_within(expected, READ_TIMEOUT)
    }

    /// [`Scenario::read`] with another deadline.
    pub fn read_within(&self, expected: usize, timeout: Duration) -> Result<Vec<Record>> {
        let topics: Vec<(&str, i32)> = self.topics.iter().map(|(t, p)| (t.as_str(), *p)).collect();
        read_all_with(
            &self.brokers(),
            self.broker.client_settings(),
            &topics,
            expected,
            timeout,
        )
    }

    /// `pg-outbox-relay <command>` (`check`, `status`) for this database with `args`: whether it
    /// succeeded, and its stdout then stderr.
    pub fn relay_command(&self, command: &str, args: &[&str]) -> Result<(bool, String)> {
        relay_command(command, self.db.port, &self.db.name, &self.brokers(), args)
    }
}

impl ScenarioBuilder {
    /// The database on the cluster at `port` instead (the replica-level or the restart cluster).
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// Sessions of the database enqueue in table mode (for a poll relay).
    pub fn table_mode(mut self) -> Self {
        self.table_mode = true;
        self
    }

    /// This broker instead of a plain one (TLS, SASL, SQLite storage, a schema registry).
    pub fn broker(mut self, broker: Broker) -> Self {
        self.broker = Some(broker);
        self
    }

    /// A topic with `partitions`, created on the broker and read by [`Scenario::read`].
    pub fn topic(mut self, name: &str, partitions: i32) -> Self {
        self.topics.push((name.to_string(), partitions));
        self
    }

    pub async fn start(self) -> Result<Scenario> {
        let db = TestDb::create(&self.name, self.port).await?;
        if self.table_mode {
            db.set_table_mode().await?;
        }
        let broker = match self.broker {
            Some(broker) => broker,
            None => Broker::start()?,
        };
        for (topic, partitions) in &self.topics {
            broker.create_topic(topic, *partitions).await?;
        }
        Ok(Scenario {
            db,
            broker,
            topics: self.topics,
        })
    }
}

/// A relay about to start: its arguments beyond the connection settings, and whether it serves
/// `/metrics` (on a free port, [`Relay::metrics_addr`]).
pub struct RelayBuilder<'a> {
    scenario: &'a Scenario,
    args: Vec<String>,
    metrics: bool,
    env: Vec<(String, String)>,
}

impl RelayBuilder<'_> {
    /// Sets an environment variable for the relay (`NOTIFY_SOCKET`, a `*_FILE` secret).
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.to_string(), value.to_string()));
        self
    }

    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// Serves `/metrics` and `/healthz` on a free port of 127.0.0.1.
    pub fn metrics(mut self) -> Self {
        self.metrics = true;
        self
    }

    /// Starts the relay and returns at once.
    pub fn start(self) -> Result<Relay> {
        let mut args = self.args.clone();
        let addr = self.metrics.then(|| format!("127.0.0.1:{}", free_port()));
        if let Some(addr) = &addr {
            args.extend(["--metrics-addr".to_string(), addr.clone()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let s = self.scenario;
        let mut relay =
            Relay::start_with_env(s.db.port, &s.db.name, &s.brokers(), &args, &self.env)?;
        relay.metrics = addr;
        Ok(relay)
    }

    /// Starts the relay and waits until it reads its source: a WAL relay holds the slot (wal-mode
    /// enqueues are refused before); a poll relay needs nothing first.
    pub async fn running(self) -> Result<Relay> {
        let poll = self.args.iter().any(|a| a == "poll");
        let db = &self.scenario.db;
        let relay = self.start()?;
        if !poll {
            db.wait_for_active_slot().await?;
        }
        Ok(relay)
    }
}
