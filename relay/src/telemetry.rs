//! Logs (`tracing`, text or JSON), counters, and the `/metrics` (Prometheus text) and `/healthz`
//! endpoints. Payloads and credentials are never logged.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

#[derive(Debug, Default)]
pub struct Metrics {
    pub published: AtomicU64,
    pub skipped: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub restarts: AtomicU64,
    pub ingested: AtomicU64,
    pub confirmed_lsn: AtomicU64,
    pub healthy: AtomicBool,
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
                "pg_outbox_relay_events_dead_lettered_total",
                "Events written to outbox.dead_letters.",
                &self.dead_lettered,
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
        out.push_str(&format!(
            "# HELP pg_outbox_relay_up 1 while streaming.\n# TYPE pg_outbox_relay_up gauge\npg_outbox_relay_up {}\n",
            u8::from(self.healthy.load(Ordering::Relaxed))
        ));
        out
    }
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

/// Serves `/metrics` and `/healthz` until shutdown. A tiny HTTP/1.0 responder is all this needs.
pub async fn serve(
    addr: String,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    info!(%addr, "serving /metrics and /healthz");
    loop {
        let (mut stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            accepted = listener.accept() => accepted?,
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let n = stream.read(&mut buf).await.unwrap_or(0);
            let request = String::from_utf8_lossy(&buf[..n]);
            let path = request.split_whitespace().nth(1).unwrap_or("/");
            let (status, body) = match path {
                "/metrics" => ("200 OK", metrics.render()),
                "/healthz" if metrics.healthy.load(Ordering::Relaxed) => {
                    ("200 OK", "ok\n".to_string())
                }
                "/healthz" => ("503 Service Unavailable", "not streaming\n".to_string()),
                _ => ("404 Not Found", "not found\n".to_string()),
            };
            let response = format!(
                "HTTP/1.0 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            if let Err(e) = stream.write_all(response.as_bytes()).await {
                warn!(error = %e, "metrics response failed");
            }
        });
    }
}
