//! Configuration: an optional TOML file, then environment variables, then flags (later wins),
//! validated once into a typed [`Config`] that is passed down explicitly.
//!
//! Kafka settings pass through to librdkafka as a string map (`[kafka]` in the file, or
//! `--kafka key=value`), applied after our defaults (idempotence, acks=all, murmur2) so that every
//! librdkafka option stays usable.

use crate::error::RelayError;
use clap::{Args, Parser, Subcommand};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "pg-outbox-relay",
    version,
    about = "Publishes pg_outbox events to Kafka, exactly once"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Stream events from the slot to Kafka until SIGTERM/SIGINT.
    Run(Settings),
    /// Verify wal_level, slot, publication, grants and broker reachability; print what to fix.
    Check(Settings),
    /// Print slot lag, retained WAL and the last acknowledged position.
    Status(Settings),
    /// Consume Kafka topics into inbox.messages, with offsets stored in the same transaction.
    Ingest(Settings),
}

/// Every setting, as a flag with an environment fallback. Unset ones come from the file or defaults.
#[derive(Args, Debug, Default)]
pub struct Settings {
    /// TOML configuration file.
    #[arg(long, env = "PG_OUTBOX_CONFIG")]
    pub config: Option<PathBuf>,
    /// PostgreSQL host (or socket directory).
    #[arg(long, env = "PG_OUTBOX_PG_HOST")]
    pub pg_host: Option<String>,
    #[arg(long, env = "PG_OUTBOX_PG_PORT")]
    pub pg_port: Option<u16>,
    /// Login role: needs REPLICATION and outbox_relay.
    #[arg(long, env = "PG_OUTBOX_PG_USER")]
    pub pg_user: Option<String>,
    #[arg(long, env = "PG_OUTBOX_PG_PASSWORD", hide_env_values = true)]
    pub pg_password: Option<String>,
    #[arg(long, env = "PG_OUTBOX_PG_DATABASE")]
    pub pg_database: Option<String>,
    /// Replication slot (and publication) name; must match pg_outbox.slot_name.
    #[arg(long, env = "PG_OUTBOX_SLOT")]
    pub slot: Option<String>,
    /// Create the slot and publication at start when they are missing (default true).
    #[arg(long, env = "PG_OUTBOX_CREATE_SLOT")]
    pub create_slot: Option<bool>,
    /// Where events come from: `wal` (the slot; pg_outbox.mode = wal) or `poll` (outbox.events;
    /// pg_outbox.mode = table). Default wal.
    #[arg(long, env = "PG_OUTBOX_SOURCE")]
    pub source: Option<String>,
    /// Poll source: rows read per batch (default 1000).
    #[arg(long, env = "PG_OUTBOX_POLL_BATCH")]
    pub poll_batch: Option<i64>,
    /// Poll source: how often to look without a NOTIFY, in milliseconds (default 1000).
    #[arg(long, env = "PG_OUTBOX_POLL_INTERVAL_MS")]
    pub poll_interval_ms: Option<u64>,
    /// Ingest: the inbox consumer name the messages are recorded for.
    #[arg(long, env = "PG_OUTBOX_CONSUMER")]
    pub consumer: Option<String>,
    /// Ingest: topics to consume, comma-separated.
    #[arg(long, env = "PG_OUTBOX_TOPICS", value_delimiter = ',')]
    pub topics: Vec<String>,
    /// Ingest: messages written per PostgreSQL transaction (default 500).
    #[arg(long, env = "PG_OUTBOX_INGEST_BATCH")]
    pub ingest_batch: Option<usize>,
    /// Kafka bootstrap servers.
    #[arg(long, env = "PG_OUTBOX_BROKERS")]
    pub brokers: Option<String>,
    /// Kafka topic for an event: `{topic}` is replaced by the event's topic (default "{topic}").
    #[arg(long, env = "PG_OUTBOX_TOPIC_TEMPLATE")]
    pub topic_template: Option<String>,
    /// Identifies this source in record headers; the restart dedup only trusts records carrying it.
    #[arg(long, env = "PG_OUTBOX_SOURCE_ID")]
    pub source_id: Option<String>,
    /// Largest record (key + value + headers) sent to Kafka; larger events are dead-lettered.
    #[arg(long, env = "PG_OUTBOX_MAX_RECORD_BYTES")]
    pub max_record_bytes: Option<usize>,
    /// Events sent but not yet acknowledged before reading pauses.
    #[arg(long, env = "PG_OUTBOX_MAX_IN_FLIGHT")]
    pub max_in_flight: Option<usize>,
    /// Pause after taking the slot, before the restart dedup reads Kafka, in milliseconds (default
    /// 1000): lets the broker append what a killed predecessor had already sent.
    #[arg(long, env = "PG_OUTBOX_RESTART_GRACE_MS")]
    pub restart_grace_ms: Option<u64>,
    /// Address for /metrics and /healthz, e.g. 127.0.0.1:9187 (off when unset).
    #[arg(long, env = "PG_OUTBOX_METRICS_ADDR")]
    pub metrics_addr: Option<String>,
    /// Log as JSON lines.
    #[arg(long, env = "PG_OUTBOX_LOG_JSON")]
    pub log_json: Option<bool>,
    /// librdkafka settings, `key=value`, repeatable; override the defaults.
    #[arg(long = "kafka", value_parser = parse_key_value)]
    pub kafka: Vec<(String, String)>,
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .ok_or_else(|| format!("--kafka expects key=value, got {s:?}"))
}

/// Where the relay reads events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    Wal,
    Poll,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub pg_host: String,
    pub pg_port: u16,
    pub pg_user: String,
    pub pg_password: String,
    pub pg_database: String,
    pub slot: String,
    pub create_slot: bool,
    pub source: SourceKind,
    pub poll_batch: i64,
    pub poll_interval: Duration,
    pub consumer: Option<String>,
    pub topics: Vec<String>,
    pub ingest_batch: usize,
    pub brokers: String,
    pub topic_template: String,
    pub source_id: String,
    pub max_record_bytes: usize,
    pub max_in_flight: usize,
    pub metrics_addr: Option<String>,
    pub log_json: bool,
    pub kafka: BTreeMap<String, String>,
    pub backoff_max: Duration,
    pub restart_grace: Duration,
}

/// The file form: the same settings, with `[kafka]` as a table.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileSettings {
    #[serde(default)]
    kafka: BTreeMap<String, toml::Value>,
    pg_host: Option<String>,
    pg_port: Option<u16>,
    pg_user: Option<String>,
    pg_password: Option<String>,
    pg_database: Option<String>,
    slot: Option<String>,
    create_slot: Option<bool>,
    source: Option<String>,
    poll_batch: Option<i64>,
    poll_interval_ms: Option<u64>,
    consumer: Option<String>,
    #[serde(default)]
    topics: Vec<String>,
    ingest_batch: Option<usize>,
    brokers: Option<String>,
    topic_template: Option<String>,
    source_id: Option<String>,
    max_record_bytes: Option<usize>,
    max_in_flight: Option<usize>,
    restart_grace_ms: Option<u64>,
    metrics_addr: Option<String>,
    log_json: Option<bool>,
}

impl Settings {
    /// Merges file < env/flags and validates.
    pub fn resolve(self) -> Result<Config, RelayError> {
        let mut file = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    RelayError::Config(format!("cannot read config file {}: {e}", path.display()))
                })?;
                toml::from_str::<FileSettings>(&text).map_err(|e| {
                    RelayError::Config(format!("config file {}: {e}", path.display()))
                })?
            }
            None => FileSettings::default(),
        };
        let file_kafka = std::mem::take(&mut file.kafka);
        let f = file;
        let slot = self.slot.or(f.slot).unwrap_or_else(|| "pg_outbox".into());
        if slot.is_empty()
            || slot.len() > 63
            || !slot
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(RelayError::Config(format!(
                "slot {slot:?} is not a valid slot name: use 1 to 63 of [a-z0-9_]"
            )));
        }
        let topic_template = self
            .topic_template
            .or(f.topic_template)
            .unwrap_or_else(|| "{topic}".into());
        let probe = topic_template.replace("{topic}", "t");
        pg_outbox_envelope::validate_topic(&probe).map_err(|e| {
            RelayError::Config(format!(
                "topic_template {topic_template:?} cannot produce a valid topic: {e}"
            ))
        })?;
        let max_record_bytes = self
            .max_record_bytes
            .or(f.max_record_bytes)
            .unwrap_or(1_000_000);
        if max_record_bytes < 1024 {
            return Err(RelayError::Config(format!(
                "max_record_bytes {max_record_bytes} is too small (at least 1024)"
            )));
        }
        let max_in_flight = self.max_in_flight.or(f.max_in_flight).unwrap_or(20_000);
        if max_in_flight == 0 {
            return Err(RelayError::Config(
                "max_in_flight must be at least 1".into(),
            ));
        }
        let source = match self.source.or(f.source).as_deref() {
            None | Some("wal") => SourceKind::Wal,
            Some("poll") => SourceKind::Poll,
            Some(other) => {
                return Err(RelayError::Config(format!(
                    "source {other:?} is unknown: use \"wal\" (pg_outbox.mode = wal) or \"poll\" (pg_outbox.mode = table)"
                )))
            }
        };
        let poll_batch = self.poll_batch.or(f.poll_batch).unwrap_or(1000);
        if !(1..=100_000).contains(&poll_batch) {
            return Err(RelayError::Config(format!(
                "poll_batch {poll_batch} is out of range (1 to 100000)"
            )));
        }
        let brokers = self.brokers.or(f.brokers).ok_or_else(|| {
            RelayError::Config(
                "brokers is not set (--brokers, PG_OUTBOX_BROKERS or brokers = \"host:port\")"
                    .into(),
            )
        })?;
        let topics = if self.topics.is_empty() {
            f.topics
        } else {
            self.topics
        };
        for t in &topics {
            pg_outbox_envelope::validate_topic(t)
                .map_err(|e| RelayError::Config(format!("topics: {t:?}: {e}")))?;
        }
        let consumer = self.consumer.or(f.consumer);
        if consumer
            .as_deref()
            .is_some_and(|c| c.is_empty() || c.len() > 200)
        {
            return Err(RelayError::Config(
                "consumer must be 1 to 200 characters".into(),
            ));
        }
        let ingest_batch = self.ingest_batch.or(f.ingest_batch).unwrap_or(500);
        if !(1..=100_000).contains(&ingest_batch) {
            return Err(RelayError::Config(format!(
                "ingest_batch {ingest_batch} is out of range (1 to 100000)"
            )));
        }
        let pg_database = self
            .pg_database
            .or(f.pg_database)
            .unwrap_or_else(|| "postgres".into());
        let mut kafka = BTreeMap::new();
        for (k, v) in file_kafka {
            let v = match v {
                toml::Value::String(s) => s,
                other => other.to_string(),
            };
            kafka.insert(k, v);
        }
        kafka.extend(self.kafka);
        // the restart dedup relies on per-partition order through retries: keep these as they are
        for (key, required) in [("enable.idempotence", "true"), ("acks", "all")] {
            if kafka
                .get(key)
                .is_some_and(|v| v != required && !(key == "acks" && v == "-1"))
            {
                return Err(RelayError::Config(format!(
                    "kafka setting {key} must stay {required}: the exactly-once guarantee depends on it"
                )));
            }
        }
        if let Some(limit) = kafka.get("message.max.bytes") {
            if limit
                .parse::<usize>()
                .map_or(true, |l| l < max_record_bytes)
            {
                return Err(RelayError::Config(format!(
                    "kafka setting message.max.bytes ({limit}) is below max_record_bytes ({max_record_bytes}): \
                     such records would fail over and over instead of being dead-lettered"
                )));
            }
        }
        Ok(Config {
            pg_host: self
                .pg_host
                .or(f.pg_host)
                .unwrap_or_else(|| "127.0.0.1".into()),
            pg_port: self.pg_port.or(f.pg_port).unwrap_or(5432),
            pg_user: self
                .pg_user
                .or(f.pg_user)
                .unwrap_or_else(|| "postgres".into()),
            pg_password: self.pg_password.or(f.pg_password).unwrap_or_default(),
            pg_database: pg_database.clone(),
            // the restart dedup compares positions of one source only: a WAL source and a poll
            // source must never share an id, so their defaults differ
            source_id: self
                .source_id
                .or(f.source_id)
                .unwrap_or_else(|| match source {
                    SourceKind::Wal => slot.clone(),
                    SourceKind::Poll => format!("poll.{pg_database}"),
                }),
            slot,
            create_slot: self.create_slot.or(f.create_slot).unwrap_or(true),
            source,
            consumer,
            topics,
            ingest_batch,
            poll_batch,
            poll_interval: Duration::from_millis(
                self.poll_interval_ms
                    .or(f.poll_interval_ms)
                    .unwrap_or(1000)
                    .max(10),
            ),
            brokers,
            topic_template,
            max_record_bytes,
            max_in_flight,
            metrics_addr: self.metrics_addr.or(f.metrics_addr),
            log_json: self.log_json.or(f.log_json).unwrap_or(false),
            kafka,
            backoff_max: Duration::from_secs(10),
            restart_grace: Duration::from_millis(
                self.restart_grace_ms.or(f.restart_grace_ms).unwrap_or(1000),
            ),
        })
    }
}

impl Config {
    /// The Kafka topic an event with `topic` is published to.
    pub fn kafka_topic<'t>(&self, topic: &'t str) -> std::borrow::Cow<'t, str> {
        if self.topic_template == "{topic}" {
            std::borrow::Cow::Borrowed(topic)
        } else {
            std::borrow::Cow::Owned(self.topic_template.replace("{topic}", topic))
        }
    }

    /// A libpq-style connection string for tokio-postgres (the password is not logged anywhere).
    pub fn conninfo(&self) -> String {
        // every value quoted, with \ and ' escaped, as libpq's connection strings require
        let quote = |v: &str| format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"));
        let mut s = format!(
            "host={} port={} user={} dbname={} application_name=pg_outbox_relay",
            quote(&self.pg_host),
            self.pg_port,
            quote(&self.pg_user),
            quote(&self.pg_database)
        );
        if !self.pg_password.is_empty() {
            s.push_str(&format!(" password={}", quote(&self.pg_password)));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            brokers: Some("127.0.0.1:9092".into()),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_are_sensible() {
        let c = settings().resolve().unwrap();
        assert_eq!(c.slot, "pg_outbox");
        assert_eq!(c.source_id, "pg_outbox");
        let poll = Settings {
            source: Some("poll".into()),
            pg_database: Some("shop".into()),
            ..settings()
        }
        .resolve()
        .unwrap();
        assert_eq!(poll.source_id, "poll.shop", "never the WAL source's id");
        assert_eq!(c.kafka_topic("orders"), "orders");
        assert!(c.create_slot);
    }

    #[test]
    fn errors_name_the_setting() {
        let err = Settings::default().resolve().unwrap_err().to_string();
        assert!(err.contains("brokers"), "{err}");
        let err = Settings {
            slot: Some("Bad-Slot".into()),
            ..settings()
        }
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(err.contains("slot"), "{err}");
        let err = Settings {
            topic_template: Some("out box.{topic}".into()),
            ..settings()
        }
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(err.contains("topic_template"), "{err}");
        let err = Settings {
            source: Some("table".into()),
            ..settings()
        }
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(err.contains("source") && err.contains("poll"), "{err}");
        for (key, value) in [
            ("enable.idempotence", "false"),
            ("acks", "1"),
            ("message.max.bytes", "1000"),
        ] {
            let err = Settings {
                kafka: vec![(key.into(), value.into())],
                ..settings()
            }
            .resolve()
            .unwrap_err()
            .to_string();
            assert!(err.contains(key), "{err}");
        }
    }

    #[test]
    fn conninfo_quotes_every_value() {
        let c = Settings {
            pg_password: Some(r"it's a \secret".into()),
            pg_database: Some("my db".into()),
            ..settings()
        }
        .resolve()
        .unwrap();
        let info = c.conninfo();
        assert!(info.contains(r"password='it\'s a \\secret'"), "{info}");
        assert!(info.contains("dbname='my db'"), "{info}");
        info.parse::<tokio_postgres::Config>().unwrap();
    }

    #[test]
    fn file_then_flags() {
        let dir = std::env::temp_dir().join(format!("relay-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("relay.toml");
        std::fs::write(
            &path,
            "brokers = \"file:9092\"\nslot = \"from_file\"\ntopic_template = \"outbox.event.{topic}\"\n\
             [kafka]\n\"linger.ms\" = 5\n\"compression.type\" = \"lz4\"\n",
        )
        .unwrap();
        let c = Settings {
            config: Some(path.clone()),
            slot: Some("from_flag".into()),
            kafka: vec![("linger.ms".into(), "20".into())],
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(c.brokers, "file:9092");
        assert_eq!(c.slot, "from_flag");
        assert_eq!(c.kafka_topic("orders"), "outbox.event.orders");
        assert_eq!(c.kafka.get("linger.ms").unwrap(), "20");
        assert_eq!(c.kafka.get("compression.type").unwrap(), "lz4");
        std::fs::write(&path, "brokerz = \"x\"\n").unwrap();
        let err = Settings {
            config: Some(path),
            ..Default::default()
        }
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(err.contains("brokerz"), "{err}");
    }
}
