//! systemd's readiness protocol (`Type=notify`, sd_notify(3)): when `NOTIFY_SOCKET` names a Unix
//! datagram socket (a path, or `@name` for an abstract one), the relay tells the service manager
//!
//! - `READY=1` once it streams (or ingests) or stands by behind another relay: the unit is then
//!   "active", and units ordered after it start;
//! - `STATUS=...` whenever its state changes (`streaming`, `standby behind <holder>`,
//!   `reconnecting`, `stalled: ...`), shown by `systemctl status`;
//! - `STOPPING=1` when shutdown begins.
//!
//! The state is read from [`Metrics`] (what `/healthz` answers from) every [`POLL`], so the loops
//! need no hook of their own. Without `NOTIFY_SOCKET` nothing is sent. A failed send is logged
//! once and never stops the relay: readiness is a courtesy to the supervisor, not a dependency.

use crate::telemetry::Metrics;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// How often the state is looked at: READY=1 follows the first session within this.
pub const POLL: Duration = Duration::from_millis(200);

/// What the relay is doing, as systemd is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Before the first session.
    Starting,
    /// Streaming (run) or ingesting (ingest).
    Active,
    /// Another relay holds the source; this one waits.
    Standby(String),
    /// A session ended; the next one starts after the backoff.
    Reconnecting,
    /// Records in flight and none acknowledged for longer than the stall timeout.
    Stalled(u64),
}

impl State {
    /// The state of the relay behind `metrics`.
    pub fn of(metrics: &Metrics, stall: Duration) -> State {
        let standby = metrics
            .standby
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if metrics.stalled(stall).is_some() {
            State::Stalled(metrics.in_flight.load(Ordering::Relaxed))
        } else if metrics.healthy.load(Ordering::Relaxed) {
            State::Active
        } else if let Some(holder) = standby {
            State::Standby(holder)
        } else if metrics.restarts.get() > 0 {
            State::Reconnecting
        } else {
            State::Starting
        }
    }

    /// Whether the service is up: it does its job, or waits as a standby by design.
    pub fn ready(&self) -> bool {
        matches!(self, State::Active | State::Standby(_))
    }

    /// The `STATUS=` text; `active` says what streaming means for this subcommand.
    pub fn status(&self, active: &str) -> String {
        match self {
            State::Starting => "starting".into(),
            State::Active => active.into(),
            State::Standby(holder) => format!("standby behind {holder}"),
            State::Reconnecting => "reconnecting".into(),
            State::Stalled(n) => format!("stalled: {n} record(s) unacknowledged"),
        }
    }
}

/// The connection to the service manager, or nothing when the relay runs without one.
#[derive(Clone, Default)]
pub struct Notifier {
    target: Option<Arc<Target>>,
}

struct Target {
    socket: UnixDatagram,
    addr: SocketAddr,
    failed: AtomicBool,
    stopping: AtomicBool,
}

impl Notifier {
    /// From `NOTIFY_SOCKET`, as systemd sets it for a `Type=notify` service.
    pub fn from_env() -> Notifier {
        match std::env::var("NOTIFY_SOCKET") {
            Ok(name) if !name.is_empty() => Notifier::to(&name).unwrap_or_else(|e| {
                warn!(socket = %name, error = %e, "NOTIFY_SOCKET cannot be used; systemd is not told when the relay is ready");
                Notifier::default()
            }),
            _ => Notifier::default(),
        }
    }

    /// To the socket `name`: a path, or `@name` for an abstract socket (Linux).
    pub fn to(name: &str) -> std::io::Result<Notifier> {
        let addr = match name.strip_prefix('@') {
            Some(abstract_name) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(abstract_name.as_bytes())?
            }
            None if name.starts_with('/') => SocketAddr::from_pathname(name)?,
            None => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::Unsupported,
                    "not a Unix socket path or @abstract name",
                ))
            }
        };
        let socket = UnixDatagram::unbound()?;
        // a full socket buffer must not block the runtime; such a message is dropped
        socket.set_nonblocking(true)?;
        Ok(Notifier {
            target: Some(Arc::new(Target {
                socket,
                addr,
                failed: AtomicBool::new(false),
                stopping: AtomicBool::new(false),
            })),
        })
    }

    /// Sends one message (`KEY=value` lines).
    pub fn send(&self, message: &str) {
        let Some(t) = &self.target else { return };
        match t.socket.send_to_addr(message.as_bytes(), &t.addr) {
            Ok(_) => debug!(message, "told systemd"),
            Err(e) if !t.failed.swap(true, Ordering::Relaxed) => {
                warn!(error = %e, "cannot tell systemd the relay's state (NOTIFY_SOCKET)")
            }
            Err(_) => {}
        }
    }

    /// `STOPPING=1`, once.
    pub fn stopping(&self) {
        if let Some(t) = &self.target {
            if !t.stopping.swap(true, Ordering::Relaxed) {
                self.send("STOPPING=1\nSTATUS=stopping");
            }
        }
    }

    /// Watches `metrics` until shutdown: READY=1 the first time the relay is ready, STATUS= on
    /// every change, STOPPING=1 when shutdown begins. `active` names streaming (`streaming`,
    /// `ingesting`).
    pub fn watch(
        &self,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
        stall: Duration,
        active: &'static str,
    ) {
        if self.target.is_none() {
            return;
        }
        let notifier = self.clone();
        tokio::spawn(async move {
            let mut last: Option<State> = None;
            let mut ready = false;
            loop {
                let state = State::of(&metrics, stall);
                if last.as_ref() != Some(&state) {
                    let mut message = format!("STATUS={}", state.status(active));
                    if !ready && state.ready() {
                        ready = true;
                        message = format!("READY=1\n{message}");
                    }
                    notifier.send(&message);
                    last = Some(state);
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(POLL) => {}
                }
            }
            notifier.stopping();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receive(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).to_string()
    }

    #[test]
    fn the_state_follows_the_metrics() {
        let m = Metrics::default();
        let stall = Duration::from_secs(60);
        assert_eq!(State::of(&m, stall), State::Starting);
        m.set_standby(Some("slot \"s\" is streamed by pg_outbox_relay 7@h".into()));
        let standby = State::of(&m, stall);
        assert!(standby.ready());
        assert_eq!(
            standby.status("streaming"),
            "standby behind slot \"s\" is streamed by pg_outbox_relay 7@h"
        );
        m.set_standby(None);
        m.restarts.inc();
        assert_eq!(State::of(&m, stall), State::Reconnecting);
        assert!(!State::Reconnecting.ready());
        m.healthy.store(true, Ordering::Relaxed);
        assert_eq!(State::of(&m, stall).status("streaming"), "streaming");
    }

    #[test]
    fn messages_reach_a_path_and_an_abstract_socket() {
        let dir = std::env::temp_dir().join(format!("relay-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let server = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::to(path.to_str().unwrap()).unwrap();
        n.send("READY=1\nSTATUS=streaming");
        assert_eq!(receive(&server), "READY=1\nSTATUS=streaming");
        n.stopping();
        n.stopping();
        assert_eq!(receive(&server), "STOPPING=1\nSTATUS=stopping");
        server.set_nonblocking(true).unwrap();
        assert!(
            server.recv(&mut [0u8; 64]).is_err(),
            "STOPPING=1 is sent once"
        );
        std::fs::remove_dir_all(&dir).unwrap();

        use std::os::linux::net::SocketAddrExt;
        let name = format!("pg_outbox_notify_test_{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixDatagram::bind_addr(&addr).unwrap();
        Notifier::to(&format!("@{name}"))
            .unwrap()
            .send("STATUS=reconnecting");
        assert_eq!(receive(&server), "STATUS=reconnecting");
        assert!(Notifier::to("vsock:2:1").is_err());
    }
}
