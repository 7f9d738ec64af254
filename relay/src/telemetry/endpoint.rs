//! The `/metrics` and `/healthz` endpoints: a tiny HTTP/1.0 responder, all they need.
//!
//! They answer anyone who can reach them: at most [`MAX_CONNECTIONS`] at a time, each for at most
//! [`REQUEST_TIMEOUT`]; a failed `accept()` (out of file descriptors, a connection reset before it
//! was taken) is logged and the endpoint goes on; and `/healthz` names no host or address.

use super::Metrics;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// `/metrics` is OpenMetrics text (what the client library writes; Prometheus reads it), the rest
/// plain text.
fn content_type(path: &str) -> &'static str {
    if path == "/metrics" {
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    } else {
        "text/plain; charset=utf-8"
    }
}

/// A client gets this long to send its request and take the answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections served at once; more wait in the listen backlog until one ends.
const MAX_CONNECTIONS: usize = 32;

/// The pause after a failed `accept()`: an error such as "too many open files" repeats at once.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

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
                    "/metrics" => ("200 OK", metrics.render(stall)),
                    "/healthz" => metrics.health(stall),
                    _ => ("404 Not Found", "not found\n".to_string()),
                };
                let response = format!(
                    "HTTP/1.0 {status}\r\ncontent-type: {}\r\ncontent-length: {}\r\n\r\n{body}",
                    content_type(path),
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
    use std::sync::atomic::{AtomicU64, Ordering};

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
}
