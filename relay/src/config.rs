//! Configuration: an optional TOML file, then environment variables, then flags (later wins),
//! validated once, at load, for the subcommand being run, into a typed [`Config`] that is passed
//! down explicitly.
//!
//! Settings are grouped by concern (PostgreSQL, Kafka, source, ingest, telemetry). Each group is
//! one struct used both as flags (clap, flattened) and as keys of the file (serde), so the file
//! and the command line name every setting the same way. A setting of the wrong type in the file
//! is reported with its name and line.
//!
//! Secrets need neither a command line nor the file: `pg_password_file`
//! (`PG_OUTBOX_PG_PASSWORD_FILE`) and `PG_OUTBOX_KAFKA_<NAME>_FILE` name files whose content is
//! the secret (one trailing newline trimmed), as container platforms and systemd's
//! `LoadCredential=` provide them.
//!
//! Kafka settings pass through to librdkafka as a string map (`[kafka]` in the file, or
//! `--kafka key=value`), applied after our defaults (idempotence, acks=all, murmur2) so that every
//! librdkafka option stays usable.

use crate::error::RelayError;
use crate::kafka::{check_settings, KafkaConfig, RecordFormat, RecordTimestamp};
use crate::postgres::{Given, PgConfig};
use clap::builder::BoolishValueParser;
use clap::{Args, Parser, Subcommand};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "pg-outbox-relay",
    version,
    about = "Publishes pg_outbox events to Kafka, exactly once",
    after_help = "Exit status: 0 done (or stopped by SIGTERM/SIGINT), 1 a failure (check: a \
                  finding failed), 2 a configuration error, 3 an operator must act (a lost slot, \
                  Kafka ahead of the database, a wrong identity, a refused login, a missing \
                  database): restarting will not help."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Stream events from the slot (or the outbox table) to Kafka until SIGTERM/SIGINT.
    Run(Settings),
    /// Verify wal_level, slot, publication, grants and broker reachability; print what to fix.
    Check(Report),
    /// Print slot lag, retained WAL and the last acknowledged position.
    Status(Report),
    /// Consume Kafka topics into inbox.messages, with offsets stored in the same transaction.
    Ingest(Settings),
    /// Ask a running relay's /healthz (for a container's HEALTHCHECK or a Kubernetes probe): exit
    /// 0 when it answers 200 (streaming or standing by), else 1 with one line.
    Healthcheck(Healthcheck),
}

/// `check` and `status`: the settings, and how to print the answer.
#[derive(Args, Debug, Default)]
pub struct Report {
    /// Print one JSON object (field names in docs/operations.md, "check and status as JSON")
    /// instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub settings: Settings,
}

/// `healthcheck`: where the relay serves /healthz.
#[derive(Args, Debug, Clone)]
pub struct Healthcheck {
    /// The relay's /metrics and /healthz address (its metrics_addr); an unspecified address
    /// (0.0.0.0, [::]) is asked on loopback.
    #[arg(long, env = "PG_OUTBOX_METRICS_ADDR")]
    pub metrics_addr: String,
    /// Liveness only: fail when the relay does not answer or says it is stalled, not while it
    /// reconnects or is degraded (what a Kubernetes livenessProbe wants: a restart cures a stall,
    /// not a database outage).
    #[arg(long)]
    pub live: bool,
    /// How long to wait for the answer, in milliseconds.
    #[arg(long, default_value_t = 3000)]
    pub timeout_ms: u64,
}

/// What the process was asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Run,
    Check,
    Status,
    Ingest,
}

/// A subcommand and its settings; `healthcheck` needs none of the relay's.
pub enum Job {
    Relay(Mode, Box<Settings>, bool),
    Healthcheck(Healthcheck),
}

impl Command {
    /// The mode, the settings, and whether to print JSON.
    pub fn into_job(self) -> Job {
        match self {
            Command::Run(s) => Job::Relay(Mode::Run, Box::new(s), false),
            Command::Check(r) => Job::Relay(Mode::Check, Box::new(r.settings), r.json),
            Command::Status(r) => Job::Relay(Mode::Status, Box::new(r.settings), r.json),
            Command::Ingest(s) => Job::Relay(Mode::Ingest, Box::new(s), false),
            Command::Healthcheck(h) => Job::Healthcheck(h),
        }
    }
}

/// Declares a group of optional settings and how a higher layer overrides a lower one.
macro_rules! settings_group {
    ($(#[$meta:meta])* pub struct $name:ident {
        $( $(#[$field_meta:meta])* pub $field:ident : Option<$ty:ty>, )*
    }) => {
        #[derive(Args, Deserialize, Debug, Default, Clone)]
        #[serde(deny_unknown_fields)]
        $(#[$meta])*
        pub struct $name {
            $( $(#[$field_meta])* pub $field: Option<$ty>, )*
        }

        impl $name {
            /// Each setting from `self` where set, else from `lower`.
            fn over(self, lower: $name) -> $name {
                $name { $( $field: self.$field.or(lower.$field), )* }
            }

            /// The settings' names (the file's keys; the flags are the same with `-`).
            pub const NAMES: &'static [&'static str] = &[$(stringify!($field)),*];
        }
    };
}

/// A `pg_port` in the file: `5432` or `"5432,5433"`.
fn port_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Port {
        One(u16),
        List(String),
    }
    const EXPECTED: &str = "expected a port number, or a string of comma-separated port numbers";
    let list = match Port::deserialize(d).map_err(|_| serde::de::Error::custom(EXPECTED))? {
        Port::One(p) => p.to_string(),
        Port::List(s) => s,
    };
    if list
        .split(',')
        .map(str::trim)
        .any(|p| !p.is_empty() && p.parse::<u16>().is_err())
    {
        return Err(serde::de::Error::custom(format!("{list:?}: {EXPECTED}")));
    }
    Ok(Some(list))
}

settings_group! {
    /// PostgreSQL connection.
    #[command(next_help_heading = "PostgreSQL")]
    pub struct PgSettings {
        /// A libpq connection string: a URL (`postgres://user@host1,host2/db?sslmode=verify-full`)
        /// or key-value pairs (`host=a,b dbname=db`). Every libpq keyword is accepted; the ones
        /// the relay does without are logged once each. The pg_* settings below override its parts.
        #[arg(long, env = "PG_OUTBOX_PG_URL", hide_env_values = true)]
        pub pg_url: Option<String>,
        /// PostgreSQL host; several, comma-separated, are tried in order for the primary.
        /// [default: PGHOST, else 127.0.0.1]
        #[arg(long, env = "PG_OUTBOX_PG_HOST")]
        pub pg_host: Option<String>,
        /// Port: one for every host, or one per host, comma-separated (`5432,5433`).
        /// [default: PGPORT, else 5432]
        #[arg(long, env = "PG_OUTBOX_PG_PORT")]
        #[serde(default, deserialize_with = "port_list")]
        pub pg_port: Option<String>,
        /// Login role: needs REPLICATION and outbox_relay (never a superuser in production).
        /// [default: PGUSER, else pg_outbox_relay]
        #[arg(long, env = "PG_OUTBOX_PG_USER")]
        pub pg_user: Option<String>,
        /// Password (prefer pg_password_file, or a password file: PGPASSFILE).
        #[arg(long, env = "PG_OUTBOX_PG_PASSWORD", hide_env_values = true)]
        pub pg_password: Option<String>,
        /// A file whose content is the password (one trailing newline trimmed): a mounted
        /// secret, or systemd's `%d/pg_password` with LoadCredential=.
        #[arg(long, env = "PG_OUTBOX_PG_PASSWORD_FILE")]
        pub pg_password_file: Option<PathBuf>,
        /// Database. [default: PGDATABASE, else postgres]
        #[arg(long, env = "PG_OUTBOX_PG_DATABASE")]
        pub pg_database: Option<String>,
        /// TLS to PostgreSQL, as libpq's sslmode: disable, prefer, require, verify-ca,
        /// verify-full. [default: PGSSLMODE, else prefer; verify-full with sslrootcert = system]
        #[arg(long, env = "PG_OUTBOX_PG_SSLMODE")]
        pub pg_sslmode: Option<String>,
        /// CA certificate(s) (PEM) that signed the server's, or `system` (the operating system's
        /// CAs, as in libpq 16); needed by verify-ca and verify-full.
        #[arg(long, env = "PG_OUTBOX_PG_SSLROOTCERT")]
        pub pg_sslrootcert: Option<PathBuf>,
        /// Client certificate (PEM), with pg_sslkey, for servers that ask for one.
        #[arg(long, env = "PG_OUTBOX_PG_SSLCERT")]
        pub pg_sslcert: Option<PathBuf>,
        /// The client certificate's private key (PEM).
        #[arg(long, env = "PG_OUTBOX_PG_SSLKEY")]
        pub pg_sslkey: Option<PathBuf>,
    }
}

settings_group! {
    /// Kafka: brokers, routing and record limits (librdkafka settings are `--kafka`).
    #[command(next_help_heading = "Kafka")]
    pub struct KafkaSettings {
        /// Kafka bootstrap servers (required).
        #[arg(long, env = "PG_OUTBOX_BROKERS")]
        pub brokers: Option<String>,
        /// Kafka topic for an event: `{topic}` is replaced by the event's topic.
        /// [default: {topic}]
        #[arg(long, env = "PG_OUTBOX_TOPIC_TEMPLATE")]
        pub topic_template: Option<String>,
        /// Largest record (key + value + headers) sent to Kafka; larger events are dead-lettered.
        /// [default: 1000000]
        #[arg(long, env = "PG_OUTBOX_MAX_RECORD_BYTES")]
        pub max_record_bytes: Option<usize>,
        /// The Kafka record timestamp: `enqueue` (the event's enqueue time) or `publish`
        /// (when the relay sends it; retention then counts from publication). [default: enqueue]
        #[arg(long, env = "PG_OUTBOX_RECORD_TIMESTAMP")]
        pub record_timestamp: Option<String>,
        /// How records present their events: `pg_outbox` (the relay's headers, `content-type`,
        /// the event's headers), `cloudevents` (CloudEvents 1.0, Kafka binary content mode:
        /// `ce_*` headers as well) or `debezium` (Debezium's outbox event router: the event id
        /// in the header `id` as well). [default: pg_outbox]
        #[arg(long, env = "PG_OUTBOX_RECORD_FORMAT")]
        pub record_format: Option<String>,
        /// A record not sent within this many milliseconds is never sent: what bounds how long a
        /// paused relay can append after a successor took over (see fence.rs). [default: 30000]
        #[arg(long, env = "PG_OUTBOX_FENCE_TIMEOUT_MS")]
        pub fence_timeout_ms: Option<u64>,
        /// How often the partition counts of the topics written to are asked again, in
        /// milliseconds: a change ends the session at the next transaction boundary, and the next
        /// one routes keys with the new count. [default: 10000]
        #[arg(long, env = "PG_OUTBOX_PARTITION_CHECK_MS")]
        pub partition_check_ms: Option<u64>,
        /// The Kafka topics this source may publish to, comma-separated: names, or prefixes
        /// ending in `*` (`orders,billing.*`). An event for another topic is dead-lettered.
        /// [default: any topic (writers choose the topic of their events)]
        #[arg(long, env = "PG_OUTBOX_ALLOWED_TOPICS")]
        pub allowed_topics: Option<String>,
    }
}

settings_group! {
    /// Where events come from and how the pipeline paces them.
    #[command(next_help_heading = "Source")]
    pub struct SourceSettings {
        /// Replication slot (and publication) name; must match pg_outbox.slot_name.
        /// [default: pg_outbox]
        #[arg(long, env = "PG_OUTBOX_SLOT")]
        pub slot: Option<String>,
        /// Create the slot and publication at start when they are missing (`--create-slot=false`
        /// to only use existing ones). [default: true]
        #[arg(long, env = "PG_OUTBOX_CREATE_SLOT", num_args = 0..=1,
              default_missing_value = "true", value_parser = BoolishValueParser::new())]
        pub create_slot: Option<bool>,
        /// Where events come from: `wal` (the slot; pg_outbox.mode = wal) or `poll` (outbox.events;
        /// pg_outbox.mode = table). [default: wal]
        #[arg(long, env = "PG_OUTBOX_SOURCE")]
        pub source: Option<String>,
        /// Poll source: rows read per batch. [default: 1000]
        #[arg(long, env = "PG_OUTBOX_POLL_BATCH")]
        pub poll_batch: Option<i64>,
        /// Poll source: how often to look without a NOTIFY, in milliseconds. [default: 1000]
        #[arg(long, env = "PG_OUTBOX_POLL_INTERVAL_MS")]
        pub poll_interval_ms: Option<u64>,
        /// Identifies this source in record headers; the restart dedup only trusts records
        /// carrying it. [default: the slot's name (wal), poll.<database> (poll)]
        #[arg(long, env = "PG_OUTBOX_SOURCE_ID")]
        pub source_id: Option<String>,
        /// Events sent but not yet acknowledged before reading pauses. [default: 20000]
        #[arg(long, env = "PG_OUTBOX_MAX_IN_FLIGHT")]
        pub max_in_flight: Option<usize>,
        /// Bytes of records (key, payload, headers) sent but not yet acknowledged before reading
        /// pauses: what bounds memory with large events. [default: 33554432 (32 MiB)]
        #[arg(long, env = "PG_OUTBOX_MAX_IN_FLIGHT_BYTES")]
        pub max_in_flight_bytes: Option<usize>,
        /// Pause after taking the slot, before the restart dedup reads Kafka, in milliseconds:
        /// lets the broker append what a killed predecessor had already sent. [default: 1000]
        #[arg(long, env = "PG_OUTBOX_RESTART_GRACE_MS")]
        pub restart_grace_ms: Option<u64>,
        /// An event that can never be published (missing or forbidden topic, a record the broker
        /// refuses, an undecodable envelope): `dead-letter` it into outbox.dead_letters and go on,
        /// or `stop` the relay. [default: dead-letter]
        #[arg(long, env = "PG_OUTBOX_ON_POISON")]
        pub on_poison: Option<String>,
        /// How long an event to a topic that does not exist (or may not be written) is retried
        /// before it counts as poison, in milliseconds. [default: 30000]
        #[arg(long, env = "PG_OUTBOX_POISON_RETRY_MS")]
        pub poison_retry_ms: Option<u64>,
    }
}

settings_group! {
    /// `ingest`: Kafka into the inbox.
    #[command(next_help_heading = "Ingest")]
    pub struct IngestSettings {
        /// Ingest: the inbox consumer name the messages are recorded for (required by ingest).
        #[arg(long, env = "PG_OUTBOX_CONSUMER")]
        pub consumer: Option<String>,
        /// Ingest: topics to consume, comma-separated (required by ingest).
        #[arg(long, env = "PG_OUTBOX_TOPICS", value_delimiter = ',')]
        pub topics: Option<Vec<String>>,
        /// Ingest: messages written per PostgreSQL transaction. [default: 500]
        #[arg(long, env = "PG_OUTBOX_INGEST_BATCH")]
        pub ingest_batch: Option<usize>,
    }
}

settings_group! {
    /// Logs and metrics.
    #[command(next_help_heading = "Telemetry")]
    pub struct TelemetrySettings {
        /// Address for /metrics and /healthz, e.g. 127.0.0.1:9187. [default: off]
        #[arg(long, env = "PG_OUTBOX_METRICS_ADDR")]
        pub metrics_addr: Option<String>,
        /// Log as JSON lines. [default: false]
        #[arg(long, env = "PG_OUTBOX_LOG_JSON", num_args = 0..=1,
              default_missing_value = "true", value_parser = BoolishValueParser::new())]
        pub log_json: Option<bool>,
        /// /healthz answers 503 "stalled" when records are in flight and none was acknowledged
        /// for this long, in milliseconds. [default: 60000]
        #[arg(long, env = "PG_OUTBOX_STALL_TIMEOUT_MS")]
        pub stall_timeout_ms: Option<u64>,
    }
}

/// Every setting, as a flag with an environment fallback. Unset ones come from the file or defaults.
#[derive(Args, Debug, Default)]
pub struct Settings {
    /// TOML configuration file (relay/pg-outbox-relay.example.toml lists every setting).
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
    /// librdkafka settings, `key=value`, repeatable; override the defaults. Also
    /// PG_OUTBOX_KAFKA_<NAME>=value and PG_OUTBOX_KAFKA_<NAME>_FILE=path (NAME upper-cased, dots
    /// as underscores: PG_OUTBOX_KAFKA_SASL_PASSWORD_FILE).
    #[arg(long = "kafka", value_parser = parse_key_value, help_heading = "Kafka")]
    pub librdkafka: Vec<(String, String)>,
}

/// The file form: the same groups, plus `[kafka]` as a table.
#[derive(Default)]
struct FileSettings {
    kafka: BTreeMap<String, toml::Value>,
    pg: PgSettings,
    broker: KafkaSettings,
    source: SourceSettings,
    ingest: IngestSettings,
    telemetry: TelemetrySettings,
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
    /// What was given but not applied (libpq keywords of `pg_url` the relay does without), one
    /// line each, for the log once logging is set up.
    pub warnings: Vec<String>,
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
        let postgres = PgConfig::resolve(given(self.pg.over(file.pg))?)?;
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
        settings.extend(kafka_from_env(std::env::vars())?);
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
            warnings: postgres.ignored.clone(),
            postgres,
        })
    }
}

/// The PostgreSQL settings as the connection layer takes them, the password read from its file.
fn given(s: PgSettings) -> Result<Given, RelayError> {
    let password = match (s.pg_password, s.pg_password_file) {
        (Some(_), Some(_)) => {
            return Err(RelayError::config(
                "pg_password and pg_password_file are both set: keep one \
                 (PG_OUTBOX_PG_PASSWORD, PG_OUTBOX_PG_PASSWORD_FILE)",
            ))
        }
        (Some(p), None) => Some(p),
        (None, Some(file)) => Some(read_secret(
            &file,
            "pg_password_file (PG_OUTBOX_PG_PASSWORD_FILE)",
        )?),
        (None, None) => None,
    };
    Ok(Given {
        url: s.pg_url,
        host: s.pg_host,
        port: s.pg_port,
        user: s.pg_user,
        password,
        database: s.pg_database,
        sslmode: s.pg_sslmode,
        sslrootcert: s.pg_sslrootcert,
        sslcert: s.pg_sslcert,
        sslkey: s.pg_sslkey,
    })
}

/// A secret kept in a file: its content without one trailing newline (what `echo` and editors
/// add). `what` names the setting or variable in the error; the content is never shown.
pub fn read_secret(path: &Path, what: &str) -> Result<String, RelayError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        RelayError::config(format!("{what}: cannot read {}", path.display())).caused_by(e)
    })?;
    let text = text
        .strip_suffix("\r\n")
        .or_else(|| text.strip_suffix('\n'))
        .unwrap_or(&text);
    Ok(text.to_string())
}

/// librdkafka settings from the environment, between the file and `--kafka`:
/// `PG_OUTBOX_KAFKA_SASL_PASSWORD=…` is `sasl.password` (the name upper-cased, dots as
/// underscores), so that credentials need neither a command line nor a file; and
/// `PG_OUTBOX_KAFKA_SASL_PASSWORD_FILE=/run/secrets/kafka` reads `sasl.password` from that file.
fn kafka_from_env(
    vars: impl Iterator<Item = (String, String)>,
) -> Result<Vec<(String, String)>, RelayError> {
    let mut out = Vec::new();
    for (name, value) in vars {
        let Some(key) = name.strip_prefix("PG_OUTBOX_KAFKA_") else {
            continue;
        };
        let (key, value) = match key.strip_suffix("_FILE") {
            Some(key) => (key, read_secret(Path::new(&value), &name)?),
            None => (key, value),
        };
        if !key.is_empty() {
            out.push((key.to_ascii_lowercase().replace('_', "."), value));
        }
    }
    Ok(out)
}

/// Reads the TOML file: each setting into its group, so that a wrong type or an unknown name is
/// reported with the setting's name and its line.
fn read_file(path: &Path) -> Result<FileSettings, RelayError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        RelayError::config(format!("cannot read config file {}", path.display())).caused_by(e)
    })?;
    let at = |what: String| RelayError::config(format!("config file {}: {what}", path.display()));
    let spans = toml::from_str::<BTreeMap<String, toml::Spanned<toml::Value>>>(&text)
        .map_err(|e| at(e.message().to_string()).caused_by(e))?;
    let mut file = FileSettings::default();
    for (key, value) in spans {
        let line = text[..value.span().start].matches('\n').count() + 1;
        let bad = |what: &str| at(format!("line {line}: {what}"));
        let value = value.into_inner();
        if key == "kafka" {
            match value {
                toml::Value::Table(t) => file.kafka = t.into_iter().collect(),
                _ => {
                    return Err(bad(
                        "`kafka` must be a table: [kafka] then \"name\" = value lines",
                    ))
                }
            }
            continue;
        }
        let one = toml::Value::Table(toml::Table::from_iter([(key.clone(), value)]));
        let wrong =
            |e: toml::de::Error| bad(&format!("setting `{key}`: {}", e.message().trim_end()));
        if PgSettings::NAMES.contains(&key.as_str()) {
            file.pg = one.try_into::<PgSettings>().map_err(wrong)?.over(file.pg);
        } else if KafkaSettings::NAMES.contains(&key.as_str()) {
            file.broker = one
                .try_into::<KafkaSettings>()
                .map_err(wrong)?
                .over(file.broker);
        } else if SourceSettings::NAMES.contains(&key.as_str()) {
            file.source = one
                .try_into::<SourceSettings>()
                .map_err(wrong)?
                .over(file.source);
        } else if IngestSettings::NAMES.contains(&key.as_str()) {
            file.ingest = one
                .try_into::<IngestSettings>()
                .map_err(wrong)?
                .over(file.ingest);
        } else if TelemetrySettings::NAMES.contains(&key.as_str()) {
            file.telemetry = one
                .try_into::<TelemetrySettings>()
                .map_err(wrong)?
                .over(file.telemetry);
        } else {
            return Err(bad(&format!("unknown setting `{key}`")));
        }
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
    let record_format = match s.record_format.as_deref() {
        None | Some("pg_outbox") => RecordFormat::PgOutbox,
        Some("cloudevents") => RecordFormat::CloudEvents,
        Some("debezium") => RecordFormat::Debezium,
        Some(other) => {
            return Err(RelayError::config(format!(
                "record_format {other:?} is unknown: use \"pg_outbox\", \"cloudevents\" or \"debezium\" (PG_OUTBOX_RECORD_FORMAT)"
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
        record_format,
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
            record_format: RecordFormat::PgOutbox,
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
        let got = kafka_from_env(vars.into_iter()).unwrap();
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

    fn example_path() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("pg-outbox-relay.example.toml")
    }

    #[test]
    fn the_example_file_loads_with_production_values() {
        let file = read_file(&example_path()).unwrap();
        assert_eq!(file.pg.pg_user.as_deref(), Some("pg_outbox_relay"));
        assert_eq!(file.pg.pg_sslmode.as_deref(), Some("verify-full"));
        assert_eq!(file.pg.pg_port.as_deref(), Some("5432,5432"));
        assert!(file.pg.pg_password.is_none(), "no secret in the file");
        assert!(file.pg.pg_password_file.is_some());
        assert_eq!(file.source.create_slot, Some(false));
        assert_eq!(file.telemetry.log_json, Some(true));
        assert!(file.kafka.contains_key("sasl.mechanism"));
        assert!(
            !file.kafka.contains_key("sasl.password"),
            "no secret in the file"
        );
        // and it resolves, with the files it names replaced by this machine's
        let dir = std::env::temp_dir().join(format!("relay-example-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let secret = dir.join("pg_password");
        std::fs::write(&secret, "s3cret\n").unwrap();
        let Ok(bundle) = super::super::postgres::config::system_bundle_for_tests() else {
            return; // no CA bundle on this machine: the file was still parsed above
        };
        let c = Settings {
            config: Some(example_path()),
            pg: PgSettings {
                pg_password_file: Some(secret),
                pg_sslrootcert: Some(bundle),
                ..Default::default()
            },
            ..Default::default()
        }
        .resolve(Mode::Run)
        .unwrap();
        assert_eq!(c.postgres.servers(), "db1.internal:5432,db2.internal:5432");
        assert_eq!(c.postgres.endpoints[1].password, "s3cret");
        assert_eq!(c.postgres.user, "pg_outbox_relay");
        assert!(!c.source.create_slot);
        assert_eq!(c.kafka.settings.get("linger.ms").unwrap(), "5");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn every_setting_of_the_command_line_is_in_the_example_file() {
        use clap::CommandFactory;
        let text = std::fs::read_to_string(example_path()).unwrap();
        let cli = Cli::command();
        let mut missing = Vec::new();
        for sub in ["run", "ingest", "check", "status"] {
            let sub = cli.find_subcommand(sub).unwrap();
            for arg in sub.get_arguments() {
                let Some(long) = arg.get_long() else { continue };
                let name = long.replace('-', "_");
                let found = match name.as_str() {
                    "help" | "config" | "json" => true,
                    "kafka" => text.contains("\n[kafka]\n"),
                    _ => text.lines().any(|l| {
                        l.trim_start_matches(['#', ' '])
                            .starts_with(&format!("{name} = "))
                    }),
                };
                if !found && !missing.contains(&name) {
                    missing.push(name);
                }
            }
        }
        assert!(missing.is_empty(), "not in the example file: {missing:?}");
    }

    #[test]
    fn a_wrong_type_in_the_file_names_the_setting_and_its_line() {
        let dir = std::env::temp_dir().join(format!("relay-types-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("relay.toml");
        for (text, says) in [
            (
                "brokers = \"k:9092\"\nslot = \"s\"\npg_port = \"x\"\n",
                "line 3: setting `pg_port`",
            ),
            (
                "brokers = \"k:9092\"\n\n\nmax_in_flight = \"many\"\n",
                "line 4: setting `max_in_flight`: invalid type: string \"many\"",
            ),
            ("# c\nlog_json = \"yes\"\n", "line 2: setting `log_json`"),
            (
                "brokers = \"k\"\nbrokerz = \"x\"\n",
                "line 2: unknown setting `brokerz`",
            ),
            ("kafka = 1\n", "line 1: `kafka` must be a table"),
        ] {
            std::fs::write(&path, text).unwrap();
            let err = Settings {
                config: Some(path.clone()),
                ..Default::default()
            }
            .resolve(Mode::Run)
            .unwrap_err();
            assert!(err.to_string().contains(says), "{text:?}: {err}");
            assert_eq!(err.exit_code(), crate::error::CONFIG_ERROR);
        }
        // a port list, from the file as a string or one number
        std::fs::write(
            &path,
            "brokers = \"k\"\npg_host = \"a,b\"\npg_port = \"5432,5433\"\n",
        )
        .unwrap();
        let c = Settings {
            config: Some(path.clone()),
            ..Default::default()
        }
        .resolve(Mode::Run)
        .unwrap();
        assert_eq!(c.postgres.servers(), "a:5432,b:5433");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn ports_per_host_and_plain_boolean_flags_on_the_command_line() {
        let cli = Cli::try_parse_from([
            "pg-outbox-relay",
            "run",
            "--brokers",
            "k:9092",
            "--pg-host",
            "a,b",
            "--pg-port",
            "5432,5433",
            "--log-json",
            "--create-slot",
            "false",
        ])
        .unwrap();
        let Job::Relay(mode, settings, _) = cli.command.into_job() else {
            panic!("run is a relay job")
        };
        let c = settings.resolve(mode).unwrap();
        assert_eq!(c.postgres.servers(), "a:5432,b:5433");
        assert!(c.telemetry.log_json);
        assert!(!c.source.create_slot);
        let cli = Cli::try_parse_from(["pg-outbox-relay", "check", "--json", "--create-slot"]);
        let Job::Relay(_, settings, json) = cli.unwrap().command.into_job() else {
            panic!("check is a relay job")
        };
        assert!(json);
        assert_eq!(settings.source.create_slot, Some(true));
    }

    #[test]
    fn the_default_login_is_no_superuser() {
        // (PGUSER, when the environment has it, comes first, as in libpq)
        if std::env::var_os("PGUSER").is_none() {
            let c = settings().resolve(Mode::Run).unwrap();
            assert_eq!(c.postgres.user, "pg_outbox_relay");
        }
        assert_ne!(crate::postgres::config::DEFAULT_USER, "postgres");
    }

    #[test]
    fn secrets_from_files() {
        let dir = std::env::temp_dir().join(format!("relay-secrets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("pw");
        std::fs::write(&file, "pa ss\n\n").unwrap();
        assert_eq!(
            read_secret(&file, "x").unwrap(),
            "pa ss\n",
            "one newline trimmed"
        );
        std::fs::write(&file, "pw\r\n").unwrap();
        assert_eq!(read_secret(&file, "x").unwrap(), "pw");
        let mut s = settings();
        s.pg.pg_password_file = Some(file.clone());
        let c = s.resolve(Mode::Run).unwrap();
        assert_eq!(c.postgres.endpoints[0].password, "pw");
        let mut s = settings();
        s.pg.pg_password_file = Some(file.clone());
        s.pg.pg_password = Some("also".into());
        assert!(run_error(s).contains("both set"));
        let mut s = settings();
        s.pg.pg_password_file = Some(dir.join("missing"));
        let err = run_error(s);
        assert!(err.contains("PG_OUTBOX_PG_PASSWORD_FILE"), "{err}");
        let vars = [(
            "PG_OUTBOX_KAFKA_SASL_PASSWORD_FILE".to_string(),
            file.display().to_string(),
        )];
        assert_eq!(
            kafka_from_env(vars.into_iter()).unwrap(),
            [("sasl.password".to_string(), "pw".to_string())]
        );
        let vars = [(
            "PG_OUTBOX_KAFKA_SASL_PASSWORD_FILE".to_string(),
            "/nonexistent/kafka".to_string(),
        )];
        let err = kafka_from_env(vars.into_iter()).unwrap_err().to_string();
        assert!(err.contains("PG_OUTBOX_KAFKA_SASL_PASSWORD_FILE"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_kubernetes_config_map_loads() {
        // deploy/kubernetes/configmap.yaml carries a relay.toml: the loader must take it
        let yaml = std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/configmap.yaml"),
        )
        .unwrap();
        let toml: String = yaml
            .split_once("relay.toml: |\n")
            .unwrap()
            .1
            .lines()
            .map(|l| l.strip_prefix("    ").unwrap_or(l.trim()))
            .collect::<Vec<_>>()
            .join("\n");
        let dir = std::env::temp_dir().join(format!("relay-k8s-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("relay.toml");
        std::fs::write(&path, toml).unwrap();
        let file = read_file(&path).unwrap();
        assert_eq!(file.pg.pg_user.as_deref(), Some("pg_outbox_relay"));
        assert_eq!(file.telemetry.metrics_addr.as_deref(), Some("0.0.0.0:9187"));
        assert!(file.pg.pg_password.is_none());
        assert!(file.kafka.contains_key("sasl.username"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
