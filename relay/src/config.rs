//! Configuration: an optional TOML file, then environment variables, then flags (later wins),
//! validated once, at load, for the subcommand being run, into a typed [`Config`] that is passed
//! down explicitly.
//!
//! Settings are grouped by concern (PostgreSQL, Kafka, source, ingest, telemetry). Each group is
//! one struct used both as flags (clap, flattened) and as keys of the file (serde, flattened), so
//! the file and the command line name every setting the same way.
//!
//! Kafka settings pass through to librdkafka as a string map (`[kafka]` in the file, or
//! `--kafka key=value`), applied after our defaults (idempotence, acks=all, murmur2) so that every
//! librdkafka option stays usable.

use crate::error::RelayError;
use crate::kafka::{check_settings, KafkaConfig, RecordTimestamp};
use crate::postgres::{Given, PgConfig};
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

/// What the process was asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Run,
    Check,
    Status,
    Ingest,
}

impl Command {
    pub fn into_parts(self) -> (Mode, Settings) {
        match self {
            Command::Run(s) => (Mode::Run, s),
            Command::Check(s) => (Mode::Check, s),
            Command::Status(s) => (Mode::Status, s),
            Command::Ingest(s) => (Mode::Ingest, s),
        }
    }
}

/// Declares a group of optional settings and how a higher layer overrides a lower one.
macro_rules! settings_group {
    ($(#[$meta:meta])* pub struct $name:ident {
        $( $(#[$field_meta:meta])* pub $field:ident : Option<$ty:ty>, )*
    }) => {
        $(#[$meta])*
        #[derive(Args, Deserialize, Debug, Default, Clone)]
        pub struct $name {
            $( $(#[$field_meta])* pub $field: Option<$ty>, )*
        }

        impl $name {
            /// Each setting from `self` where set, else from `lower`.
            fn over(self, lower: $name) -> $name {
                $name { $( $field: self.$field.or(lower.$field), )* }
            }
        }
    };
}

settings_group! {
    /// PostgreSQL connection.
    pub struct PgSettings {
        /// A libpq connection string: a URL (`postgres://user@host1,host2/db?sslmode=verify-full`)
        /// or key-value pairs (`host=a,b dbname=db`). The pg_* settings below override its parts.
        #[arg(long, env = "PG_OUTBOX_PG_URL", hide_env_values = true)]
        pub pg_url: Option<String>,
        /// PostgreSQL host; several, comma-separated, are tried in order for the primary.
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
        /// TLS to PostgreSQL, as libpq's sslmode: disable, prefer (default), require, verify-ca,
        /// verify-full.
        #[arg(long, env = "PG_OUTBOX_PG_SSLMODE")]
        pub pg_sslmode: Option<String>,
        /// CA certificate(s) (PEM) that signed the server's; needed by verify-ca and verify-full.
        #[arg(long, env = "PG_OUTBOX_PG_SSLROOTCERT")]
        pub pg_sslrootcert: Option<std::path::PathBuf>,
        /// Client certificate (PEM), with pg_sslkey, for servers that ask for one.
        #[arg(long, env = "PG_OUTBOX_PG_SSLCERT")]
        pub pg_sslcert: Option<std::path::PathBuf>,
        /// The client certificate's private key (PEM).
        #[arg(long, env = "PG_OUTBOX_PG_SSLKEY")]
        pub pg_sslkey: Option<std::path::PathBuf>,
    }
}

settings_group! {
    /// Kafka: brokers, routing and record limits (librdkafka settings are `--kafka`).
    pub struct KafkaSettings {
        /// Kafka bootstrap servers.
        #[arg(long, env = "PG_OUTBOX_BROKERS")]
        pub brokers: Option<String>,
        /// Kafka topic for an event: `{topic}` is replaced by the event's topic (default "{topic}").
        #[arg(long, env = "PG_OUTBOX_TOPIC_TEMPLATE")]
        pub topic_template: Option<String>,
        /// Largest record (key + value + headers) sent to Kafka; larger events are dead-lettered.
        #[arg(long, env = "PG_OUTBOX_MAX_RECORD_BYTES")]
        pub max_record_bytes: Option<usize>,
        /// The Kafka record timestamp: `enqueue` (the event's enqueue time, default) or `publish`
        /// (when the relay sends it; retention then counts from publication).
        #[arg(long, env = "PG_OUTBOX_RECORD_TIMESTAMP")]
        pub record_timestamp: Option<String>,
        /// A record not sent within this many milliseconds is never sent (default 30000): what
        /// bounds how long a paused relay can append after a successor took over (see fence.rs).
        #[arg(long, env = "PG_OUTBOX_FENCE_TIMEOUT_MS")]
        pub fence_timeout_ms: Option<u64>,
        /// How often the partition counts of the topics written to are asked again, in
        /// milliseconds (default 10000): a change ends the session at the next transaction
        /// boundary, and the next one routes keys with the new count.
        #[arg(long, env = "PG_OUTBOX_PARTITION_CHECK_MS")]
        pub partition_check_ms: Option<u64>,
        /// The Kafka topics this source may publish to, comma-separated: names, or prefixes
        /// ending in `*` (`orders,billing.*`). An event for another topic is dead-lettered. Unset:
        /// any topic (writers choose the topic of their events).
        #[arg(long, env = "PG_OUTBOX_ALLOWED_TOPICS")]
        pub allowed_topics: Option<String>,
    }
}

settings_group! {
    /// Where events come from and how the pipeline paces them.
    pub struct SourceSettings {
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
        /// Identifies this source in record headers; the restart dedup only trusts records carrying it.
        #[arg(long, env = "PG_OUTBOX_SOURCE_ID")]
        pub source_id: Option<String>,
        /// Events sent but not yet acknowledged before reading pauses.
        #[arg(long, env = "PG_OUTBOX_MAX_IN_FLIGHT")]
        pub max_in_flight: Option<usize>,
        /// Bytes of records (key, payload, headers) sent but not yet acknowledged before reading
        /// pauses (default 32 MiB): what bounds memory with large events.
        #[arg(long, env = "PG_OUTBOX_MAX_IN_FLIGHT_BYTES")]
        pub max_in_flight_bytes: Option<usize>,
        /// Pause after taking the slot, before the restart dedup reads Kafka, in milliseconds (default
        /// 1000): lets the broker append what a killed predecessor had already sent.
        #[arg(long, env = "PG_OUTBOX_RESTART_GRACE_MS")]
        pub restart_grace_ms: Option<u64>,
        /// An event that can never be published (missing or forbidden topic, a record the broker
        /// refuses, an undecodable envelope): `dead-letter` it into outbox.dead_letters and go on
        /// (default), or `stop` the relay.
        #[arg(long, env = "PG_OUTBOX_ON_POISON")]
        pub on_poison: Option<String>,
        /// How long an event to a topic that does not exist (or may not be written) is retried
        /// before it counts as poison, in milliseconds (default 30000).
        #[arg(long, env = "PG_OUTBOX_POISON_RETRY_MS")]
        pub poison_retry_ms: Option<u64>,
    }
}

settings_group! {
    /// `ingest`: Kafka into the inbox.
    pub struct IngestSettings {
        /// Ingest: the inbox consumer name the messages are recorded for.
        #[arg(long, env = "PG_OUTBOX_CONSUMER")]
        pub consumer: Option<String>,
        /// Ingest: topics to consume, comma-separated.
        #[arg(long, env = "PG_OUTBOX_TOPICS", value_delimiter = ',')]
        pub topics: Option<Vec<String>>,
        /// Ingest: messages written per PostgreSQL transaction (default 500).
        #[arg(long, env = "PG_OUTBOX_INGEST_BATCH")]
        pub ingest_batch: Option<usize>,
    }
}

settings_group! {
    /// Logs and metrics.
    pub struct TelemetrySettings {
        /// Address for /metrics and /healthz, e.g. 127.0.0.1:9187 (off when unset).
        #[arg(long, env = "PG_OUTBOX_METRICS_ADDR")]
        pub metrics_addr: Option<String>,
        /// Log as JSON lines.
        #[arg(long, env = "PG_OUTBOX_LOG_JSON")]
        pub log_json: Option<bool>,
        /// /healthz answers 503 "stalled" when records are in flight and none was acknowledged
        /// for this long, in milliseconds (default 60000).
        #[arg(long, env = "PG_OUTBOX_STALL_TIMEOUT_MS")]
        pub stall_timeout_ms: Option<u64>,
    }
}

/// Every setting, as a flag with an environment fallback. Unset ones come from the file or defaults.
#[derive(Args, Debug, Default)]
pub struct Settings {
    /// TOML configuration file.
    #[arg(long, env = "PG_OUTBOX_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub pg: PgSettings,
    #[command(flatten)]
    pub kafka: KafkaSettings,
    #[command(flatten)]
    pub source: SourceSettings,
    #[command(flatten)]
    pub ingest: IngestSettings,
    #[command(flatten)]
    pub telemetry: TelemetrySettings,
    /// librdkafka settings, `key=value`, repeatable; override the defaults.
    #[arg(long = "kafka", value_parser = parse_key_value)]
    pub librdkafka: Vec<(String, String)>,
}

/// The file form: the same groups, flattened, plus `[kafka]` as a table.
#[derive(Deserialize, Default)]
struct FileSettings {
    #[serde(default)]
    kafka: BTreeMap<String, toml::Value>,
    #[serde(flatten)]
    pg: PgSettings,
    #[serde(flatten)]
    broker: KafkaSettings,
    #[serde(flatten)]
    source: SourceSettings,
    #[serde(flatten)]
    ingest: IngestSettings,
    #[serde(flatten)]
    telemetry: TelemetrySettings,
    /// Whatever no group took: a misspelt key, reported by name.
    #[serde(flatten)]
    unknown: BTreeMap<String, toml::Value>,
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

/// What happens to an event that can never be published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnPoison {
    DeadLetter,
    Stop,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub postgres: PgConfig,
    pub kafka: KafkaConfig,
    pub source: SourceConfig,
    /// Present exactly when the mode is [`Mode::Ingest`].
    pub ingest: Option<IngestConfig>,
    pub telemetry: TelemetryConfig,
}

#[derive(Debug, Clone)]
pub struct SourceConfig {
    pub kind: SourceKind,
    pub slot: String,
    pub create_slot: bool,
    pub source_id: String,
    pub poll_batch: i64,
    pub poll_interval: Duration,
    pub max_in_flight: usize,
    pub max_in_flight_bytes: usize,
    pub restart_grace: Duration,
    pub backoff_max: Duration,
    pub on_poison: OnPoison,
    pub poison_retry: Duration,
}

#[derive(Debug, Clone)]
pub struct IngestConfig {
    pub consumer: String,
    pub topics: Vec<String>,
    pub batch: usize,
}

#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    pub metrics_addr: Option<String>,
    pub log_json: bool,
    pub stall_timeout: Duration,
}

impl Settings {
    /// Merges file < env/flags and validates what `mode` needs, once.
    pub fn resolve(self, mode: Mode) -> Result<Config, RelayError> {
        let file = match &self.config {
            Some(path) => read_file(path)?,
            None => FileSettings::default(),
        };
        let postgres = PgConfig::resolve(self.pg.over(file.pg).into())?;
        let source = self.source.over(file.source);
        let kind = match source.source.as_deref() {
            None | Some("wal") => SourceKind::Wal,
            Some("poll") => SourceKind::Poll,
            Some(other) => {
                return Err(RelayError::config(format!(
                    "source {other:?} is unknown: use \"wal\" (pg_outbox.mode = wal) or \"poll\" (pg_outbox.mode = table)"
                )))
            }
        };
        let mut settings = BTreeMap::new();
        for (k, v) in file.kafka {
            let v = match v {
                toml::Value::String(s) => s,
                other => other.to_string(),
            };
            settings.insert(k, v);
        }
        settings.extend(kafka_from_env(std::env::vars()));
        settings.extend(self.librdkafka);
        Ok(Config {
            kafka: resolve_kafka(self.kafka.over(file.broker), settings)?,
            source: resolve_source(source, kind, &postgres.database)?,
            ingest: match mode {
                Mode::Ingest => Some(resolve_ingest(self.ingest.over(file.ingest))?),
                _ => None,
            },
            telemetry: {
                let t = self.telemetry.over(file.telemetry);
                let stall = t.stall_timeout_ms.unwrap_or(60_000);
                if stall == 0 {
                    return Err(RelayError::config(
                        "stall_timeout_ms must be at least 1 (PG_OUTBOX_STALL_TIMEOUT_MS)",
                    ));
                }
                TelemetryConfig {
                    metrics_addr: t.metrics_addr,
                    log_json: t.log_json.unwrap_or(false),
                    stall_timeout: Duration::from_millis(stall),
                }
            },
            postgres,
        })
    }
}

impl From<PgSettings> for Given {
    fn from(s: PgSettings) -> Given {
        Given {
            url: s.pg_url,
            host: s.pg_host,
            port: s.pg_port,
            user: s.pg_user,
            password: s.pg_password,
            database: s.pg_database,
            sslmode: s.pg_sslmode,
            sslrootcert: s.pg_sslrootcert,
            sslcert: s.pg_sslcert,
            sslkey: s.pg_sslkey,
        }
    }
}

/// librdkafka settings from the environment, between the file and `--kafka`:
/// `PG_OUTBOX_KAFKA_SASL_PASSWORD=…` is `sasl.password` (the name upper-cased, dots as
/// underscores), so that credentials need neither a command line nor a file.
fn kafka_from_env(vars: impl Iterator<Item = (String, String)>) -> Vec<(String, String)> {
    vars.filter_map(|(name, value)| {
        let key = name.strip_prefix("PG_OUTBOX_KAFKA_")?;
        (!key.is_empty()).then(|| (key.to_ascii_lowercase().replace('_', "."), value))
    })
    .collect()
}

fn read_file(path: &std::path::Path) -> Result<FileSettings, RelayError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        RelayError::config(format!("cannot read config file {}", path.display())).caused_by(e)
    })?;
    let file = toml::from_str::<FileSettings>(&text)
        .map_err(|e| RelayError::config(format!("config file {}", path.display())).caused_by(e))?;
    if let Some(key) = file.unknown.keys().next() {
        return Err(RelayError::config(format!(
            "config file {}: unknown setting `{key}`",
            path.display()
        )));
    }
    Ok(file)
}

fn resolve_kafka(
    s: KafkaSettings,
    settings: BTreeMap<String, String>,
) -> Result<KafkaConfig, RelayError> {
    let brokers = s.brokers.ok_or_else(|| {
        RelayError::config(
            "brokers is not set (--brokers, PG_OUTBOX_BROKERS or brokers = \"host:port\")",
        )
    })?;
    let topic_template = s.topic_template.unwrap_or_else(|| "{topic}".into());
    let probe = topic_template.replace("{topic}", "t");
    pg_outbox_envelope::validate_topic(&probe).map_err(|e| {
        RelayError::config(format!(
            "topic_template {topic_template:?} cannot produce a valid topic: {e}"
        ))
    })?;
    let max_record_bytes = s
        .max_record_bytes
        .unwrap_or(pg_outbox_envelope::DEFAULT_MAX_RECORD_BYTES);
    if max_record_bytes < 1024 {
        return Err(RelayError::config(format!(
            "max_record_bytes {max_record_bytes} is too small (at least 1024)"
        )));
    }
    check_settings(&settings, max_record_bytes)?;
    let record_timestamp = match s.record_timestamp.as_deref() {
        None | Some("enqueue") => RecordTimestamp::Enqueue,
        Some("publish") => RecordTimestamp::Publish,
        Some(other) => {
            return Err(RelayError::config(format!(
                "record_timestamp {other:?} is unknown: use \"enqueue\" or \"publish\" (PG_OUTBOX_RECORD_TIMESTAMP)"
            )))
        }
    };
    let fence_timeout = s.fence_timeout_ms.unwrap_or(30_000);
    if fence_timeout < 1000 {
        return Err(RelayError::config(format!(
            "fence_timeout_ms {fence_timeout} is too small (at least 1000; PG_OUTBOX_FENCE_TIMEOUT_MS)"
        )));
    }
    let allowed_topics = parse_allowed_topics(s.allowed_topics.as_deref().unwrap_or(""))?;
    let partition_check = s.partition_check_ms.unwrap_or(10_000);
    if partition_check < 100 {
        return Err(RelayError::config(format!(
            "partition_check_ms {partition_check} is too small (at least 100; PG_OUTBOX_PARTITION_CHECK_MS)"
        )));
    }
    Ok(KafkaConfig {
        brokers,
        fence_timeout: Duration::from_millis(fence_timeout),
        partition_check: Duration::from_millis(partition_check),
        topic_template,
        max_record_bytes,
        record_timestamp,
        settings,
        allowed_topics,
    })
}

/// `allowed_topics`: comma-separated topic names, or prefixes ending in `*`.
fn parse_allowed_topics(list: &str) -> Result<Vec<String>, RelayError> {
    list.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            let name = t.strip_suffix('*').unwrap_or(t);
            // a prefix may be empty (`*`: any topic) or end in a separator
            let probe = if name.is_empty() || t.ends_with('*') {
                format!("{name}x")
            } else {
                name.to_string()
            };
            pg_outbox_envelope::validate_topic(&probe).map_err(|e| {
                RelayError::config(format!(
                    "allowed_topics entry {t:?} is not a topic name or a prefix ending in '*': {e} \
                     (PG_OUTBOX_ALLOWED_TOPICS)"
                ))
            })?;
            Ok(t.to_string())
        })
        .collect()
}

fn resolve_source(
    s: SourceSettings,
    kind: SourceKind,
    database: &str,
) -> Result<SourceConfig, RelayError> {
    let slot = s.slot.unwrap_or_else(|| "pg_outbox".into());
    if slot.is_empty()
        || slot.len() > 63
        || !slot
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(RelayError::config(format!(
            "slot {slot:?} is not a valid slot name: use 1 to 63 of [a-z0-9_]"
        )));
    }
    let max_in_flight = s.max_in_flight.unwrap_or(20_000);
    if max_in_flight == 0 {
        return Err(RelayError::config("max_in_flight must be at least 1"));
    }
    let max_in_flight_bytes = s.max_in_flight_bytes.unwrap_or(32 << 20);
    if max_in_flight_bytes == 0 {
        return Err(RelayError::config(
            "max_in_flight_bytes must be at least 1 (PG_OUTBOX_MAX_IN_FLIGHT_BYTES)",
        ));
    }
    let poll_batch = s.poll_batch.unwrap_or(1000);
    if !(1..=100_000).contains(&poll_batch) {
        return Err(RelayError::config(format!(
            "poll_batch {poll_batch} is out of range (1 to 100000)"
        )));
    }
    let on_poison = match s.on_poison.as_deref() {
        None | Some("dead-letter") => OnPoison::DeadLetter,
        Some("stop") => OnPoison::Stop,
        Some(other) => {
            return Err(RelayError::config(format!(
                "on_poison {other:?} is unknown: use \"dead-letter\" or \"stop\""
            )))
        }
    };
    Ok(SourceConfig {
        kind,
        on_poison,
        poison_retry: Duration::from_millis(s.poison_retry_ms.unwrap_or(30_000)),
        // the restart dedup compares positions of one source only: a WAL source and a poll
        // source must never share an id, so their defaults differ
        source_id: s.source_id.unwrap_or_else(|| match kind {
            SourceKind::Wal => slot.clone(),
            SourceKind::Poll => format!("poll.{database}"),
        }),
        slot,
        create_slot: s.create_slot.unwrap_or(true),
        poll_batch,
        poll_interval: Duration::from_millis(s.poll_interval_ms.unwrap_or(1000).max(10)),
        max_in_flight,
        max_in_flight_bytes,
        restart_grace: Duration::from_millis(s.restart_grace_ms.unwrap_or(1000)),
        backoff_max: Duration::from_secs(10),
    })
}

fn resolve_ingest(s: IngestSettings) -> Result<IngestConfig, RelayError> {
    let consumer = s.consumer.ok_or_else(|| {
        RelayError::config("ingest needs consumer (--consumer or PG_OUTBOX_CONSUMER)")
    })?;
    if consumer.is_empty() || consumer.len() > 200 {
        return Err(RelayError::config("consumer must be 1 to 200 characters"));
    }
    let topics = s.topics.unwrap_or_default();
    if topics.is_empty() {
        return Err(RelayError::config(
            "ingest needs topics (--topics a,b or PG_OUTBOX_TOPICS)",
        ));
    }
    for t in &topics {
        pg_outbox_envelope::validate_topic(t)
            .map_err(|e| RelayError::config(format!("topics: {t:?}: {e}")))?;
    }
    let batch = s.ingest_batch.unwrap_or(500);
    if !(1..=100_000).contains(&batch) {
        return Err(RelayError::config(format!(
            "ingest_batch {batch} is out of range (1 to 100000)"
        )));
    }
    Ok(IngestConfig {
        consumer,
        topics,
        batch,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            kafka: KafkaSettings {
                brokers: Some("127.0.0.1:9092".into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn run_error(s: Settings) -> String {
        s.resolve(Mode::Run).unwrap_err().to_string()
    }

    #[test]
    fn defaults_are_sensible() {
        let c = settings().resolve(Mode::Run).unwrap();
        assert_eq!(c.source.slot, "pg_outbox");
        assert_eq!(c.source.source_id, "pg_outbox");
        let mut poll = settings();
        poll.source.source = Some("poll".into());
        poll.pg.pg_database = Some("shop".into());
        let poll = poll.resolve(Mode::Run).unwrap();
        assert_eq!(
            poll.source.source_id, "poll.shop",
            "never the WAL source's id"
        );
        assert_eq!(c.kafka.topic_for("orders"), "orders");
        assert!(c.source.create_slot);
        assert!(c.ingest.is_none(), "ingest settings belong to ingest only");
    }

    #[test]
    fn allowed_topics_are_names_or_prefixes() {
        let rules = parse_allowed_topics(" orders, billing.* ,").unwrap();
        let kafka = KafkaConfig {
            brokers: String::new(),
            fence_timeout: Duration::from_secs(30),
            topic_template: "{topic}".into(),
            max_record_bytes: 1_000_000,
            record_timestamp: RecordTimestamp::Enqueue,
            partition_check: Duration::from_secs(10),
            settings: Default::default(),
            allowed_topics: rules,
        };
        assert!(kafka.allows("orders"));
        assert!(kafka.allows("billing.invoices"));
        assert!(!kafka.allows("orders2"), "a name is exact");
        assert!(!kafka.allows("secrets"));
        let open = KafkaConfig {
            allowed_topics: Vec::new(),
            ..kafka
        };
        assert!(open.allows("secrets"), "unset: any topic");
        let err = parse_allowed_topics("orders,bad topic")
            .unwrap_err()
            .to_string();
        assert!(err.contains("allowed_topics"), "{err}");
    }

    #[test]
    fn errors_name_the_setting() {
        let err = Settings::default()
            .resolve(Mode::Run)
            .unwrap_err()
            .to_string();
        assert!(err.contains("brokers"), "{err}");
        let mut s = settings();
        s.source.slot = Some("Bad-Slot".into());
        let err = run_error(s);
        assert!(err.contains("slot"), "{err}");
        let mut s = settings();
        s.kafka.topic_template = Some("out box.{topic}".into());
        let err = run_error(s);
        assert!(err.contains("topic_template"), "{err}");
        let mut s = settings();
        s.kafka.record_timestamp = Some("commit".into());
        let err = run_error(s);
        assert!(
            err.contains("record_timestamp") && err.contains("PG_OUTBOX_RECORD_TIMESTAMP"),
            "{err}"
        );
        let mut s = settings();
        s.telemetry.stall_timeout_ms = Some(0);
        let err = run_error(s);
        assert!(err.contains("stall_timeout_ms"), "{err}");
        let mut s = settings();
        s.source.source = Some("table".into());
        let err = run_error(s);
        assert!(err.contains("source") && err.contains("poll"), "{err}");
        let mut s = settings();
        s.source.on_poison = Some("ignore".into());
        let err = run_error(s);
        assert!(err.contains("on_poison"), "{err}");
        for (key, value) in [
            ("enable.idempotence", "false"),
            ("acks", "1"),
            ("message.max.bytes", "1000"),
            ("message.timeout.ms", "30000"),
            ("delivery.timeout.ms", "120000"),
            ("retry.backoff.ms", "100"),
        ] {
            let mut s = settings();
            s.librdkafka = vec![(key.into(), value.into())];
            let err = run_error(s);
            assert!(err.contains(key), "{err}");
        }
        let mut s = settings();
        s.kafka.fence_timeout_ms = Some(999);
        assert!(run_error(s).contains("fence_timeout_ms"));
    }

    #[test]
    fn ingest_settings_are_validated_at_load_for_ingest() {
        let err = settings().resolve(Mode::Ingest).unwrap_err().to_string();
        assert!(err.contains("consumer"), "{err}");
        let mut s = settings();
        s.ingest.consumer = Some("billing".into());
        let err = s.resolve(Mode::Ingest).unwrap_err().to_string();
        assert!(err.contains("topics"), "{err}");
        let mut s = settings();
        s.ingest.consumer = Some("billing".into());
        s.ingest.topics = Some(vec!["orders".into()]);
        s.ingest.ingest_batch = Some(0);
        let err = s.resolve(Mode::Ingest).unwrap_err().to_string();
        assert!(err.contains("ingest_batch"), "{err}");
        let mut s = settings();
        s.ingest.consumer = Some("billing".into());
        s.ingest.topics = Some(vec!["orders".into()]);
        let c = s.resolve(Mode::Ingest).unwrap();
        let ingest = c.ingest.unwrap();
        assert_eq!((ingest.consumer.as_str(), ingest.batch), ("billing", 500));
    }

    #[test]
    fn kafka_settings_from_the_environment() {
        let vars = [
            ("PG_OUTBOX_KAFKA_SASL_PASSWORD", "s3cret"),
            ("PG_OUTBOX_KAFKA_SECURITY_PROTOCOL", "SASL_SSL"),
            ("PG_OUTBOX_BROKERS", "not a kafka setting"),
            ("PG_OUTBOX_KAFKA_", "no name"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let got = kafka_from_env(vars.into_iter());
        assert_eq!(
            got,
            [
                ("sasl.password".to_string(), "s3cret".to_string()),
                ("security.protocol".to_string(), "SASL_SSL".to_string())
            ]
        );
    }

    #[test]
    fn file_then_flags() {
        let dir = std::env::temp_dir().join(format!("relay-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("relay.toml");
        std::fs::write(
            &path,
            "brokers = \"file:9092\"\nslot = \"from_file\"\ntopic_template = \"outbox.event.{topic}\"\n\
             pg_port = 6543\nconsumer = \"c\"\ntopics = [\"a\", \"b\"]\nlog_json = true\n\
             [kafka]\n\"linger.ms\" = 5\n\"compression.type\" = \"lz4\"\n",
        )
        .unwrap();
        let c = Settings {
            config: Some(path.clone()),
            source: SourceSettings {
                slot: Some("from_flag".into()),
                ..Default::default()
            },
            librdkafka: vec![("linger.ms".into(), "20".into())],
            ..Default::default()
        }
        .resolve(Mode::Ingest)
        .unwrap();
        assert_eq!(c.kafka.brokers, "file:9092");
        assert_eq!(c.source.slot, "from_flag");
        assert_eq!(c.postgres.endpoints[0].port, 6543);
        assert!(c.telemetry.log_json);
        assert_eq!(c.ingest.unwrap().topics, ["a", "b"]);
        assert_eq!(c.kafka.topic_for("orders"), "outbox.event.orders");
        assert_eq!(c.kafka.settings.get("linger.ms").unwrap(), "20");
        assert_eq!(c.kafka.settings.get("compression.type").unwrap(), "lz4");
        std::fs::write(&path, "brokerz = \"x\"\n").unwrap();
        let err = Settings {
            config: Some(path),
            ..Default::default()
        }
        .resolve(Mode::Run)
        .unwrap_err()
        .to_string();
        assert!(err.contains("brokerz"), "{err}");
    }
}
