//! Logs (`tracing`, text or JSON), counters, and the `/metrics` (Prometheus text) and `/healthz`
//! endpoints. Payloads and credentials are never logged.
//!
//! The endpoints answer anyone who can reach them: at most [`MAX_CONNECTIONS`] at a time, each
//! for at most [`REQUEST_TIMEOUT`]; a failed `accept()` (out of file descriptors, a connection
//! reset before it was taken) is logged and the endpoint goes on; and `/healthz` names no host or
//! address.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

#[derive(Debug, Default)]
pub struct Metrics {
    pub published: AtomicU64,
    pub skipped: AtomicU64,
    /// Records read back by the restart dedup that claim this source without proof (sink/dedup.rs).
    pub foreign_records: AtomicU64,
    /// pg_outbox messages in the WAL that nothing proves `outbox.enqueue` wrote (pipeline.rs).
    pub unproven_messages: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub restarts: AtomicU64,
    pub ingested: AtomicU64,
    pub confirmed_lsn: AtomicU64,
    pub healthy: AtomicBool,
    /// Streaming, but held by an event that cannot be published yet (retried, then dead-lettered).
    pub degraded: AtomicBool,
    /// Records sent and not yet acknowledged.
    pub in_flight: AtomicU64,
    /// When a record was last acknowledged (or the first of a new flight sent), Unix ms.
    pub last_progress_ms: AtomicU64,
    /// From an event's commit (wal) or its transaction's start (poll) to Kafka's acknowledgement.
    pub latency: Histogram,
    /// Another relay holds the source: which one (this relay stands by).
    pub standby: std::sync::Mutex<Option<String>>,
    /// Pauses of the whole process (see fence.rs).
    pub pause: Arc<crate::fence::PauseClock>,
}

/// Upper bounds of the latency buckets, in microseconds (Prometheus `le`, in seconds when shown).
const LATENCY_BUCKETS_US: [u64; 24] = [
    1_000, 2_000, 3_000, 4_000, 5_000, 6_000, 7_000, 8_000, 9_000, 10_000, 12_500, 15_000, 17_500,
    20_000, 25_000, 30_000, 40_000, 50_000, 75_000, 100_000, 250_000, 500_000, 1_000_000,
    5_000_000,
];

/// A fixed-bucket histogram that many tasks can record into without locks.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Per bucket (the last one is +Inf), observations at or below its bound and above the previous.
    buckets: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, micros: u64) {
        let i = LATENCY_BUCKETS_US.partition_point(|&b| b < micros);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(micros, Ordering::Relaxed);
    }

    /// Prometheus text exposition (cumulative buckets).
    fn render(&self, name: &str, help: &str, out: &mut String) {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} histogram\n"));
        let mut cumulative = 0;
        for (i, bucket) in self.buckets.iter().enumerate() {
            cumulative += bucket.load(Ordering::Relaxed);
            let le = LATENCY_BUCKETS_US
                .get(i)
                .map_or("+Inf".to_string(), |us| format!("{}", *us as f64 / 1e6));
            out.push_str(&format!("{name}_bucket{{le=\"{le}\"}} {cumulative}\n"));
        }
        out.push_str(&format!(
            "{name}_sum {}\n{name}_count {cumulative}\n",
            self.sum_us.load(Ordering::Relaxed) as f64 / 1e6
        ));
    }
}

/// Microseconds from `unix_micros` (a PostgreSQL server's clock) until now (this host's clock).
pub fn micros_since(unix_micros: i64) -> u64 {
    unix_micros_now().saturating_sub(unix_micros).max(0) as u64
}

/// Now, in Unix µs.
pub fn unix_micros_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

impl Metrics {
    pub fn render(&self) -> String {
        let counters = [
            (
                "pg_outbox_relay_events_published_total",
                "Events acknowledged by Kafka.",
                &self.published,
            ),
            (
                "pg_outbox_relay_events_skipped_total",
                "Replayed events found already in Kafka and skipped.",
                &self.skipped,
            ),
            (
                "pg_outbox_relay_foreign_records_total",
                "Records read back after a restart that carry this source's headers without a valid \
                 pg_outbox-mac: ignored by the dedup.",
                &self.foreign_records,
            ),
            (
                "pg_outbox_relay_unproven_messages_total",
                "pg_outbox messages in the WAL without a valid seal (written with \
                 pg_logical_emit_message, or copied): passed over, never published.",
                &self.unproven_messages,
            ),
            (
                "pg_outbox_relay_events_dead_lettered_total",
                "Events written to outbox.dead_letters.",
                &self.dead_lettered,
            ),
            (
                "pg_outbox_relay_messages_ingested_total",
                "Kafka messages written to the inbox by `ingest` (with their offsets).",
                &self.ingested,
            ),
            (
                "pg_outbox_relay_restarts_total",
                "Sessions ended by an error and restarted.",
                &self.restarts,
            ),
        ];
        let mut out = String::new();
        for (name, help, value) in counters {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}\n",
                value.load(Ordering::Relaxed)
            ));
        }
        out.push_str(&format!(
            "# HELP pg_outbox_relay_confirmed_lsn Last LSN confirmed to the slot.\n# TYPE pg_outbox_relay_confirmed_lsn gauge\npg_outbox_relay_confirmed_lsn {}\n",
            self.confirmed_lsn.load(Ordering::Relaxed)
        ));
        self.latency.render(
            "pg_outbox_relay_event_latency_seconds",
            "From an event's commit (wal source) or its transaction's start (poll source) to Kafka's \
             acknowledgement; both clocks must agree.",
            &mut out,
        );
        out.push_str(&format!(
            "# HELP pg_outbox_relay_degraded 1 while an event that cannot be published yet is retried.\n# TYPE pg_outbox_relay_degraded gauge\npg_outbox_relay_degraded {}\n",
            u8::from(self.degraded.load(Ordering::Relaxed))
        ));
        out.push_str(&format!(
            "# HELP pg_outbox_relay_in_flight Records sent and not yet acknowledged.\n# TYPE pg_outbox_relay_in_flight gauge\npg_outbox_relay_in_flight {}\n",
            self.in_flight.load(Ordering::Relaxed)
        ));
        out.push_str(&format!(
            "# HELP pg_outbox_relay_standby 1 while another relay holds the source and this one waits.\n# TYPE pg_outbox_relay_standby gauge\npg_outbox_relay_standby {}\n",
            u8::from(self.standby_holder().is_some())
        ));
        out.push_str(&format!(
            "# HELP pg_outbox_relay_up 1 while streaming.\n# TYPE pg_outbox_relay_up gauge\npg_outbox_relay_up {}\n",
            u8::from(self.healthy.load(Ordering::Relaxed))
        ));
        out
    }
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

/// A client gets this long to send its request and take the answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections served at once; more wait in the listen backlog until one ends.
const MAX_CONNECTIONS: usize = 32;

/// The pause after a failed `accept()`: an error such as "too many open files" repeats at once.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

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

/// Serves `/metrics` and `/healthz` until shutdown. A tiny HTTP/1.0 responder is all this needs.
pub async fn serve(
    addr: String,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    stall: Duration,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    info!(%addr, "serving /metrics and /healthz");
    answer(listener, metrics, shutdown, stall).await;
    Ok(())
}

/// Where connections come from: a TCP listener, or a test's.
trait Incoming {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept(&mut self) -> impl Future<Output = std::io::Result<Self::Stream>> + Send;
}

impl Incoming for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept(&mut self) -> std::io::Result<tokio::net::TcpStream> {
        tokio::net::TcpListener::accept(self)
            .await
            .map(|(stream, _)| stream)
    }
}

/// Answers connections until shutdown, [`MAX_CONNECTIONS`] at a time.
async fn answer<I: Incoming>(
    mut incoming: I,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    stall: Duration,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        // a slot first: beyond the limit, connections wait in the backlog, not in this process
        let slot = tokio::select! {
            _ = shutdown.cancelled() => return,
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
        };
        let mut stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = incoming.accept() => match accepted {
                Ok(stream) => stream,
                Err(e) => {
                    warn!(error = %e, "metrics endpoint: accept failed; going on");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                    }
                }
            },
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _slot = slot;
            // a client that sends nothing (or reads nothing) is dropped, never kept forever
            let answered = tokio::time::timeout(REQUEST_TIMEOUT, async {
                let mut buf = [0u8; 1024];
                let n = stream.read(&mut buf).await.unwrap_or(0);
                let request = String::from_utf8_lossy(&buf[..n]);
                let path = request.split_whitespace().nth(1).unwrap_or("/");
                let (status, body) = match path {
                    "/metrics" => ("200 OK", metrics.render()),
                    "/healthz" => metrics.health(stall),
                    _ => ("404 Not Found", "not found\n".to_string()),
                };
                let response = format!(
                    "HTTP/1.0 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                stream.write_all(response.as_bytes()).await
            })
            .await;
            // (debug: anyone who can connect could otherwise fill the log)
            match answered {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(error = %e, "metrics response failed"),
                Err(_) => debug!("metrics request timed out"),
            }
        });
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
        m.progress();
        assert_eq!(m.health(Duration::from_secs(60)).0, "200 OK");
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
    }

    /// Connections from a test: first `errors` failed accepts, then idle connections whose
    /// client ends are kept (or one that asks for `/healthz`), counting what was accepted.
    struct Scripted {
        errors: usize,
        accepted: Arc<AtomicU64>,
        clients: Arc<std::sync::Mutex<Vec<tokio::io::DuplexStream>>>,
    }

    impl Incoming for Scripted {
        type Stream = tokio::io::DuplexStream;
        async fn accept(&mut self) -> std::io::Result<tokio::io::DuplexStream> {
            if self.errors > 0 {
                self.errors -= 1;
                return Err(std::io::Error::from_raw_os_error(24)); // EMFILE
            }
            self.accepted.fetch_add(1, Ordering::SeqCst);
            let (client, server) = tokio::io::duplex(4096);
            self.clients.lock().unwrap().push(client);
            Ok(server)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_accept_does_not_end_the_endpoint() {
        let accepted = Arc::new(AtomicU64::new(0));
        let clients = Arc::default();
        let incoming = Scripted {
            errors: 5,
            accepted: accepted.clone(),
            clients: Arc::clone(&clients),
        };
        let m = Arc::new(Metrics::default());
        m.healthy.store(true, Ordering::Relaxed);
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(answer(
            incoming,
            m,
            shutdown.clone(),
            Duration::from_secs(60),
        ));
        while accepted.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut client = clients.lock().unwrap().remove(0);
        client
            .write_all(b"GET /healthz HTTP/1.0\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.0 200 OK"), "{answer}");
        assert!(answer.ends_with("ok: active\n"), "{answer}");
        shutdown.cancel();
        server.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn at_most_max_connections_are_served_at_once() {
        let accepted = Arc::new(AtomicU64::new(0));
        let clients = Arc::default();
        let incoming = Scripted {
            errors: 0,
            accepted: accepted.clone(),
            clients: Arc::clone(&clients),
        };
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(answer(
            incoming,
            Arc::default(),
            shutdown.clone(),
            Duration::from_secs(60),
        ));
        // clients that connect and send nothing: the limit, and no more, are taken
        tokio::time::sleep(REQUEST_TIMEOUT / 2).await;
        assert_eq!(accepted.load(Ordering::SeqCst), MAX_CONNECTIONS as u64);
        // each is dropped after the request timeout, which frees its place
        tokio::time::sleep(REQUEST_TIMEOUT).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2 * MAX_CONNECTIONS as u64);
        shutdown.cancel();
        server.await.unwrap();
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_bounds_inclusive() {
        let h = Histogram::default();
        for us in [500, 1_000, 1_001, 24_999, 25_000, 9_000_000] {
            h.observe(us);
        }
        let mut out = String::new();
        h.render("x", "help", &mut out);
        assert!(out.contains("x_bucket{le=\"0.001\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.002\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.025\"} 5\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"5\"} 5\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 6\n"), "{out}");
        assert!(out.contains("x_count 6\n"), "{out}");
    }
}
