//! Logs (`tracing`, text or JSON), the metrics, and the `/metrics` (OpenMetrics text) and
//! `/healthz` endpoints ([`endpoint`]). Payloads and credentials are never logged.
//!
//! The metrics live in one [`prometheus_client`] registry per process (no global one), owned by
//! [`Metrics`], which the loops receive explicitly. What the database knows (slot lag, retained WAL,
//! the outbox table's backlog, dead letters and gaps) is sampled on a session of its own every
//! [`database::EVERY`] ([`database`]), never on the loop's connection.
//!
//! Cardinality: series per topic *and partition* exist only for the four relay counters (sent,
//! published, skipped, dead-lettered) and the ingest's lag, and only for partitions an event went
//! to (or that the ingest reads); everything else is per topic or unlabelled. A topic of 3,000
//! partitions that every event reaches costs 4 x 3,000 relay series.
//!
//! The state behind `/healthz` (streaming, standing by, degraded, stalled) is kept in atomics
//! that the loops set; the gauges that show it are set from them when `/metrics` is rendered, so
//! `/metrics` and `/healthz` never disagree.

pub mod database;
pub mod endpoint;

pub use endpoint::serve;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Metric, Registry};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A Kafka topic and partition. `partition` is -1 for an event dead-lettered before it had one
/// (undecodable, an invalid or forbidden topic, a topic that never appeared).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabels {
    pub topic: String,
    pub partition: i32,
}

impl PartitionLabels {
    pub fn new(topic: &str, partition: i32) -> PartitionLabels {
        PartitionLabels {
            topic: topic.to_string(),
            partition,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TopicLabels {
    pub topic: String,
}

/// What this process is: `run` with its source id, or `ingest` with its consumer name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InfoLabels {
    mode: String,
    source: String,
    version: String,
}

/// A histogram per topic, all with the same buckets.
pub type TopicHistograms = Family<TopicLabels, Histogram, fn() -> Histogram>;

/// Upper bounds of the latency buckets, in seconds: fine below 25 ms, where the relay usually is.
const LATENCY_BUCKETS: [f64; 24] = [
    0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.007, 0.008, 0.009, 0.01, 0.0125, 0.015, 0.0175,
    0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// Upper bounds for delays a consumer adds (an inbox waiting for a worker): 5 ms to 1 h.
const DELAY_BUCKETS: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

/// Upper bounds for a topic's read-back after a restart: 1 ms to 5 min.
const READBACK_BUCKETS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0,
];

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

fn delay_histogram() -> Histogram {
    Histogram::new(DELAY_BUCKETS)
}

fn readback_histogram() -> Histogram {
    Histogram::new(READBACK_BUCKETS)
}

/// Registers `metric` under `name`, and notes the sample names it shows.
fn add(
    registry: &mut Registry,
    names: &mut Vec<String>,
    name: &str,
    help: &str,
    metric: impl Metric,
) {
    let suffixes: &[&str] = match metric.metric_type() {
        MetricType::Counter => &["_total"],
        MetricType::Histogram => &["_bucket", "_sum", "_count"],
        _ => &[""],
    };
    names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
    registry.register(name, help, metric);
}

/// The process's metrics and the state `/healthz` reports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    names: Vec<String>,
    /// Records handed to the producer, per topic and partition.
    pub sent: Family<PartitionLabels, Counter>,
    /// Records Kafka acknowledged, per topic and partition.
    pub published: Family<PartitionLabels, Counter>,
    /// Replayed events the restart dedup found in Kafka, per topic and partition.
    pub skipped: Family<PartitionLabels, Counter>,
    /// Events written to `outbox.dead_letters` by this process, per topic and partition.
    pub dead_lettered: Family<PartitionLabels, Counter>,
    /// Records read back by the restart dedup that claim this source without proof (sink/dedup.rs).
    pub foreign_records: Counter,
    /// pg_outbox messages in the WAL that nothing proves `outbox.enqueue` wrote (pipeline.rs).
    pub unproven_messages: Counter,
    pub restarts: Counter,
    /// From an event's commit (wal) or its transaction's start (poll) to Kafka's acknowledgement.
    pub latency: Histogram,
    /// How long the restart dedup took to read a topic's partitions back, per topic.
    pub readback: TopicHistograms,
    /// The source's figures in the database, sampled (see [`database`]).
    pub slot_confirmed_lag_bytes: Gauge,
    pub slot_retained_bytes: Gauge,
    pub table_backlog: Gauge,
    pub dead_letters_stored: Gauge,
    pub gaps_stored: Gauge,
    /// When the database figures were last read (Unix s).
    pub sampled_at: Gauge,
    /// Ingest: messages written to the inbox (with their offsets), per topic.
    pub ingested: Family<TopicLabels, Counter>,
    /// Ingest: of those, written in the `dead` state (poison input), per topic.
    pub ingested_dead: Family<TopicLabels, Counter>,
    /// Ingest: the partition's high watermark minus the consumer's next offset stored in
    /// `inbox.offsets`, per topic and partition.
    pub ingest_lag: Family<PartitionLabels, Gauge>,
    /// Ingest: from a record's Kafka timestamp to the commit of the inbox transaction that holds it.
    pub ingest_delay: Histogram,
    /// Ingest: from a message's arrival in the inbox (`received_at`) to `inbox.complete`
    /// (`completed_at`), sampled from the newest messages.
    pub inbox_done_delay: Histogram,
    info: Family<InfoLabels, Gauge>,
    // shown from the atomics below when rendered
    up: Gauge,
    standby_gauge: Gauge,
    degraded_gauge: Gauge,
    stalled_gauge: Gauge,
    in_flight_gauge: Gauge,
    confirmed_lsn_gauge: Gauge<u64, AtomicU64>,
    pub confirmed_lsn: AtomicU64,
    pub healthy: AtomicBool,
    /// Streaming, but held by an event that cannot be published yet (retried, then dead-lettered).
    pub degraded: AtomicBool,
    /// Records sent and not yet acknowledged.
    pub in_flight: AtomicU64,
    /// When a record was last acknowledged (or the first of a new flight sent), Unix ms.
    pub last_progress_ms: AtomicU64,
    /// Another relay holds the source: which one (this relay stands by).
    pub standby: std::sync::Mutex<Option<String>>,
    /// Pauses of the whole process (see fence.rs).
    pub pause: Arc<crate::fence::PauseClock>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        let mut m = Metrics {
            registry: Registry::default(),
            names: Vec::new(),
            sent: Family::default(),
            published: Family::default(),
            skipped: Family::default(),
            dead_lettered: Family::default(),
            foreign_records: Counter::default(),
            unproven_messages: Counter::default(),
            restarts: Counter::default(),
            latency: latency_histogram(),
            readback: Family::new_with_constructor(readback_histogram),
            slot_confirmed_lag_bytes: Gauge::default(),
            slot_retained_bytes: Gauge::default(),
            table_backlog: Gauge::default(),
            dead_letters_stored: Gauge::default(),
            gaps_stored: Gauge::default(),
            sampled_at: Gauge::default(),
            ingested: Family::default(),
            ingested_dead: Family::default(),
            ingest_lag: Family::default(),
            ingest_delay: delay_histogram(),
            inbox_done_delay: delay_histogram(),
            info: Family::default(),
            up: Gauge::default(),
            standby_gauge: Gauge::default(),
            degraded_gauge: Gauge::default(),
            stalled_gauge: Gauge::default(),
            in_flight_gauge: Gauge::default(),
            confirmed_lsn_gauge: Gauge::default(),
            confirmed_lsn: AtomicU64::default(),
            healthy: AtomicBool::default(),
            degraded: AtomicBool::default(),
            in_flight: AtomicU64::default(),
            last_progress_ms: AtomicU64::default(),
            standby: std::sync::Mutex::default(),
            pause: Arc::default(),
        };
        m.register();
        m
    }
}

impl Metrics {
    /// Every metric under its public name (counters get `_total` from the client).
    fn register(&mut self) {
        let r = &mut self.registry;
        let names = &mut self.names;
        add(
            r,
            names,
            "pg_outbox_relay_events_sent",
            "Records handed to the Kafka producer, per topic and partition.",
            self.sent.clone(),
        );
        add(
            r,
            names,
            "pg_outbox_relay_events_published",
            "Events acknowledged by Kafka, per topic and partition.",
            self.published.clone(),
        );
        add(
            r,
            names,
            "pg_outbox_relay_events_skipped",
            "Replayed events the restart dedup found already in Kafka and skipped, per topic and partition.",
            self.skipped.clone(),
        );
        add(
            r,
            names,
            "pg_outbox_relay_events_dead_lettered",
            "Events this process wrote to outbox.dead_letters, per topic and partition \
             (partition -1: dead-lettered before it had one).",
            self.dead_lettered.clone(),
        );
        add(
            r,
            names,
            "pg_outbox_relay_foreign_records",
            "Records read back after a restart that carry this source's headers without a valid \
             pg_outbox-mac: ignored by the dedup.",
            self.foreign_records.clone(),
        );
        add(
            r,
            names,
            "pg_outbox_relay_unproven_messages",
            "pg_outbox messages in the WAL without a valid seal (written with \
             pg_logical_emit_message, or copied): passed over, never published.",
            self.unproven_messages.clone(),
        );
        add(
            r,
            names,
            "pg_outbox_relay_restarts",
            "Sessions ended by an error and restarted.",
            self.restarts.clone(),
        );
        add(
            r,
            names,
            "pg_outbox_relay_event_latency_seconds",
            "From an event's commit (wal source) or its transaction's start (poll source) to Kafka's \
             acknowledgement; both clocks must agree.",
            self.latency.clone(),
        );
        add(
            r,
            names,
            "pg_outbox_relay_readback_duration_seconds",
            "How long the restart dedup took to read back a topic's partitions, per topic (once per \
             topic and session).",
            self.readback.clone(),
        );
        add(
            r,
            names,
            "pg_outbox_relay_slot_confirmed_lag_bytes",
            "WAL bytes from the server's current position to the slot's confirmed_flush_lsn (sampled).",
            self.slot_confirmed_lag_bytes.clone(),
        );
        add(
            r,
            names,
            "pg_outbox_relay_slot_retained_wal_bytes",
            "WAL bytes the slot keeps on the server: from its restart_lsn to the current position (sampled).",
            self.slot_retained_bytes.clone(),
        );
        add(
            r,
            names,
            "pg_outbox_relay_table_backlog_events",
            "Rows in outbox.events (table mode): counted up to 100000, the planner's estimate beyond (sampled).",
            self.table_backlog.clone(),
        );
        add(
            r,
            names,
            "pg_outbox_relay_dead_letters_stored",
            "Rows in outbox.dead_letters for this source (sampled).",
            self.dead_letters_stored.clone(),
        );
        add(
            r,
            names,
            "pg_outbox_relay_gaps_stored",
            "Rows in outbox.gaps for this source: WAL ranges an operator accepted as possibly lost (sampled).",
            self.gaps_stored.clone(),
        );
        add(
            r,
            names,
            "pg_outbox_relay_database_sampled_timestamp_seconds",
            "When the database figures above were last read (Unix time); 0 before the first read.",
            self.sampled_at.clone(),
        );
        add(
            r,
            names,
            "pg_outbox_relay_messages_ingested",
            "Kafka messages written to the inbox by `ingest` (with their offsets), per topic.",
            self.ingested.clone(),
        );
        add(
            r,
            names,
            "pg_outbox_relay_messages_ingested_dead",
            "Of those, messages written in the dead state (poison input), per topic.",
            self.ingested_dead.clone(),
        );
        add(
            r,
            names,
            "pg_outbox_relay_ingest_lag_messages",
            "Ingest: the partition's high watermark minus the next offset stored in inbox.offsets, \
             per topic and partition (sampled).",
            self.ingest_lag.clone(),
        );
        add(
            r,
            names,
            "pg_outbox_relay_ingest_delay_seconds",
            "Ingest: from a record's Kafka timestamp (the event's enqueue time with the relay's \
             record_timestamp = enqueue) to the commit of the inbox transaction that holds it.",
            self.ingest_delay.clone(),
        );
        add(
            r,
            names,
            "pg_outbox_relay_inbox_done_delay_seconds",
            "Ingest: from a message's arrival in the inbox (received_at) to inbox.complete \
             (completed_at), sampled from the newest messages every 10 s.",
            self.inbox_done_delay.clone(),
        );
        add(
            r,
            names,
            "pg_outbox_relay_info",
            "1, labelled with what this process does: mode (run, ingest), source (source id or \
             consumer) and version.",
            self.info.clone(),
        );
        add(
            r,
            names,
            "pg_outbox_relay_up",
            "1 while streaming (run) or ingesting.",
            self.up.clone(),
        );
        add(
            r,
            names,
            "pg_outbox_relay_standby",
            "1 while another relay holds the source and this one waits.",
            self.standby_gauge.clone(),
        );
        add(
            r,
            names,
            "pg_outbox_relay_degraded",
            "1 while an event that cannot be published yet is retried.",
            self.degraded_gauge.clone(),
        );
        add(
            r,
            names,
            "pg_outbox_relay_stalled",
            "1 while records are in flight and none was acknowledged for stall_timeout.",
            self.stalled_gauge.clone(),
        );
        add(
            r,
            names,
            "pg_outbox_relay_in_flight",
            "Records sent and not yet acknowledged.",
            self.in_flight_gauge.clone(),
        );
        add(
            r,
            names,
            "pg_outbox_relay_confirmed_lsn",
            "Last LSN confirmed to the slot.",
            self.confirmed_lsn_gauge.clone(),
        );
    }

    /// Every sample name `/metrics` can show (`_total` of counters; `_bucket`, `_sum` and
    /// `_count` of histograms), whether or not anything was counted yet: what the dashboard and
    /// the alert rules may use (tests/tests/deploy.rs checks them against it).
    pub fn exported_names(&self) -> &[String] {
        &self.names
    }

    /// Says what this process does (`pg_outbox_relay_info`).
    pub fn describe(&self, mode: &str, source: &str) {
        self.info.clear();
        self.info
            .get_or_create(&InfoLabels {
                mode: mode.to_string(),
                source: source.to_string(),
                version: env!("CARGO_PKG_VERSION").to_string(),
            })
            .set(1);
    }

    /// The OpenMetrics text exposition; `stall` is the stall timeout `/healthz` uses.
    pub fn render(&self, stall: Duration) -> String {
        self.up.set(i64::from(self.healthy.load(Ordering::Relaxed)));
        self.standby_gauge
            .set(i64::from(self.standby_holder().is_some()));
        self.degraded_gauge
            .set(i64::from(self.degraded.load(Ordering::Relaxed)));
        self.stalled_gauge
            .set(i64::from(self.stalled(stall).is_some()));
        self.in_flight_gauge
            .set(self.in_flight.load(Ordering::Relaxed) as i64);
        self.confirmed_lsn_gauge
            .set(self.confirmed_lsn.load(Ordering::Relaxed));
        let mut out = String::new();
        // writing into a String cannot fail
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// The sum of every sample of `name` (all label sets), from the text exposition: what the
    /// unit tests read.
    #[cfg(test)]
    pub fn sum(&self, name: &str) -> f64 {
        self.render(Duration::MAX)
            .lines()
            .filter_map(|l| {
                let rest = l.strip_prefix(name)?;
                let value = match rest.strip_prefix('{') {
                    Some(labelled) => labelled.split_once("} ")?.1,
                    None => rest.strip_prefix(' ')?,
                };
                value.parse::<f64>().ok()
            })
            .sum()
    }
}

/// Microseconds from `unix_micros` (a PostgreSQL server's clock) until now (this host's clock).
pub fn micros_since(unix_micros: i64) -> u64 {
    unix_micros_now().saturating_sub(unix_micros).max(0) as u64
}

/// Seconds from `unix_micros` until now, never negative (clocks of two hosts may disagree).
pub fn seconds_since(unix_micros: i64) -> f64 {
    micros_since(unix_micros) as f64 / 1e6
}

/// Now, in Unix µs.
pub fn unix_micros_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

impl Metrics {
    /// Records whether this relay stands by, and behind whom; true when that changed.
    pub fn set_standby(&self, holder: Option<String>) -> bool {
        let mut standby = self.standby.lock().unwrap_or_else(|e| e.into_inner());
        let changed = *standby != holder;
        *standby = holder;
        changed
    }

    fn standby_holder(&self) -> Option<String> {
        self.standby
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Records move: something was acknowledged, or a new flight starts.
    pub fn progress(&self) {
        self.last_progress_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// Records are in flight and none was acknowledged for longer than `stall`: how long.
    pub fn stalled(&self, stall: Duration) -> Option<Duration> {
        if self.in_flight.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let since = Duration::from_millis(
            now_ms().saturating_sub(self.last_progress_ms.load(Ordering::Relaxed)),
        );
        (since > stall).then_some(since)
    }

    /// `/healthz`: the status line and body.
    fn health(&self, stall: Duration) -> (&'static str, String) {
        const DOWN: &str = "503 Service Unavailable";
        if self.degraded.load(Ordering::Relaxed) {
            return (
                DOWN,
                "degraded: retrying an event that cannot be published yet\n".into(),
            );
        }
        if let Some(since) = self.stalled(stall) {
            return (
                DOWN,
                format!(
                    "stalled: {} record(s) unacknowledged, none acknowledged for {} s\n",
                    self.in_flight.load(Ordering::Relaxed),
                    since.as_secs()
                ),
            );
        }
        if self.healthy.load(Ordering::Relaxed) {
            ("200 OK", "ok: active\n".into())
        } else if let Some(holder) = self.standby_holder() {
            // waiting is this relay's job while another is active
            ("200 OK", format!("standby: {}\n", without_host(&holder)))
        } else {
            (DOWN, "not streaming\n".into())
        }
    }
}

/// Who holds the source, without where it runs: `status` (which needs a database login) and the
/// log say that; an endpoint anyone can reach does not. A holder reads `<application_name> (pid N
/// from <address>)`, and a relay's application name is `pg_outbox_relay <pid>@<host>`.
fn without_host(holder: &str) -> &str {
    let end = [holder.find('@'), holder.find(" (pid ")]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(holder.len());
    &holder[..end]
}

fn now_ms() -> u64 {
    (unix_micros_now() / 1000) as u64
}

pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rdkafka=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_in_flight_without_acknowledgement_are_a_stall() {
        let m = Metrics::default();
        m.healthy.store(true, Ordering::Relaxed);
        assert_eq!(m.health(Duration::from_secs(60)).0, "200 OK");
        m.in_flight.store(3, Ordering::Relaxed);
        m.last_progress_ms
            .store(now_ms() - 120_000, Ordering::Relaxed);
        let (status, body) = m.health(Duration::from_secs(60));
        assert_eq!(status, "503 Service Unavailable");
        assert!(body.starts_with("stalled: 3 record(s)"), "{body}");
        assert!(m
            .render(Duration::from_secs(60))
            .contains("\npg_outbox_relay_stalled 1\n"));
        m.progress();
        assert_eq!(m.health(Duration::from_secs(60)).0, "200 OK");
        assert!(m
            .render(Duration::from_secs(60))
            .contains("\npg_outbox_relay_stalled 0\n"));
        m.in_flight.store(0, Ordering::Relaxed);
        m.last_progress_ms.store(0, Ordering::Relaxed);
        assert_eq!(
            m.health(Duration::from_secs(60)).0,
            "200 OK",
            "idle is not stalled"
        );
    }

    #[test]
    fn healthz_names_the_holder_but_not_its_host_or_address() {
        let m = Metrics::default();
        for (holder, shown) in [
            (
                "slot \"s\" is streamed by pg_outbox_relay 4711@relay-host (pid 42 from 10.1.2.3)",
                "standby: slot \"s\" is streamed by pg_outbox_relay 4711\n",
            ),
            (
                "source \"s\" is polled by a client (pid 42 from 10.1.2.3)",
                "standby: source \"s\" is polled by a client\n",
            ),
            (
                "the slot is in use (PID 7)",
                "standby: the slot is in use (PID 7)\n",
            ),
        ] {
            m.set_standby(Some(holder.to_string()));
            assert_eq!(
                m.health(Duration::from_secs(60)),
                ("200 OK", shown.to_string())
            );
        }
        assert!(m
            .render(Duration::from_secs(60))
            .contains("\npg_outbox_relay_standby 1\n"));
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_bounds_inclusive() {
        let m = Metrics::default();
        for us in [500, 1_000, 1_001, 24_999, 25_000, 9_000_000] {
            m.latency.observe(us as f64 / 1e6);
        }
        let out = m.render(Duration::MAX);
        let name = "pg_outbox_relay_event_latency_seconds";
        assert!(
            out.contains(&format!("{name}_bucket{{le=\"0.001\"}} 2\n")),
            "{out}"
        );
        assert!(
            out.contains(&format!("{name}_bucket{{le=\"0.002\"}} 3\n")),
            "{out}"
        );
        assert!(
            out.contains(&format!("{name}_bucket{{le=\"0.025\"}} 5\n")),
            "{out}"
        );
        assert!(
            out.contains(&format!("{name}_bucket{{le=\"5.0\"}} 5\n")),
            "{out}"
        );
        assert!(
            out.contains(&format!("{name}_bucket{{le=\"+Inf\"}} 6\n")),
            "{out}"
        );
        assert!(out.contains(&format!("{name}_count 6\n")), "{out}");
    }

    #[test]
    fn counters_are_labelled_per_topic_and_partition_and_summed_without_labels() {
        let m = Metrics::default();
        m.published
            .get_or_create(&PartitionLabels::new("orders", 0))
            .inc_by(2);
        m.published
            .get_or_create(&PartitionLabels::new("orders", 7))
            .inc();
        m.ingested
            .get_or_create(&TopicLabels {
                topic: "orders".into(),
            })
            .inc_by(4);
        let out = m.render(Duration::MAX);
        assert!(
            out.contains(
                "pg_outbox_relay_events_published_total{topic=\"orders\",partition=\"0\"} 2\n"
            ),
            "{out}"
        );
        assert!(
            out.contains(
                "pg_outbox_relay_events_published_total{topic=\"orders\",partition=\"7\"} 1\n"
            ),
            "{out}"
        );
        assert!(out.contains("pg_outbox_relay_messages_ingested_total{topic=\"orders\"} 4\n"));
        assert!(out.ends_with("# EOF\n"), "{out}");
        assert_eq!(m.sum("pg_outbox_relay_events_published_total"), 3.0);
        assert_eq!(m.sum("pg_outbox_relay_events_skipped_total"), 0.0);
    }

    #[test]
    fn exported_names_are_what_the_text_shows() {
        let m = Metrics::default();
        m.published
            .get_or_create(&PartitionLabels::new("t", 0))
            .inc();
        let names = m.exported_names();
        assert!(names.contains(&"pg_outbox_relay_events_published_total".to_string()));
        assert!(names.contains(&"pg_outbox_relay_event_latency_seconds_bucket".to_string()));
        assert!(names.contains(&"pg_outbox_relay_up".to_string()));
        assert!(!names.iter().any(|n| n.ends_with("_total_total")));
        for sample in m
            .render(Duration::MAX)
            .lines()
            .filter(|l| !l.starts_with('#'))
        {
            let name = sample.split(['{', ' ']).next().unwrap();
            assert!(
                names.iter().any(|n| n == name),
                "{name} is not in exported_names"
            );
        }
    }

    #[test]
    fn info_names_the_mode_and_the_source() {
        let m = Metrics::default();
        m.describe("run", "orders-db");
        let out = m.render(Duration::MAX);
        assert!(
            out.contains(&format!(
                "pg_outbox_relay_info{{mode=\"run\",source=\"orders-db\",version=\"{}\"}} 1\n",
                env!("CARGO_PKG_VERSION")
            )),
            "{out}"
        );
    }
}
