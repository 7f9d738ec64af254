//! Reconnecting after a transient error: exponential backoff from 200 ms up to a maximum, reset once
//! a session has lasted 30 s. Permanent errors end the process; shutdown ends the wait. A relay
//! that stands by (another holds the source) looks again every second, so that it takes over
//! within about a second of the active relay's end.

use crate::error::RelayError;
use crate::telemetry::Metrics;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

const FIRST: Duration = Duration::from_millis(200);
/// How often a standby looks whether the source is free.
pub const STANDBY_POLL: Duration = Duration::from_secs(1);

pub struct Retry {
    backoff: Duration,
    max: Duration,
}

impl Retry {
    pub fn new(max: Duration) -> Retry {
        Retry {
            backoff: FIRST,
            max,
        }
    }

    /// Decides what follows a session that began at `started`: Ok(false) to stop (clean end or
    /// shutdown), Ok(true) to start another after the backoff, Err for a permanent error.
    pub async fn after(
        &mut self,
        result: Result<(), RelayError>,
        started: Instant,
        shutdown: &CancellationToken,
        metrics: &Metrics,
    ) -> Result<bool, RelayError> {
        match result {
            Ok(()) => return Ok(false),
            Err(e) if e.is_permanent() => return Err(e),
            Err(e) if e.standby_holder().is_some() => {
                let holder = e.standby_holder().unwrap_or_default().to_string();
                if metrics.set_standby(Some(holder.clone())) {
                    info!(%holder, "standing by: another relay holds the source");
                }
                metrics.healthy.store(false, Ordering::Relaxed);
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(false),
                    _ = tokio::time::sleep(STANDBY_POLL) => {}
                }
                return Ok(true);
            }
            Err(e) => {
                metrics.set_standby(None);
                metrics.restarts.inc();
                metrics.healthy.store(false, Ordering::Relaxed);
                warn!(error = %e, backoff_ms = self.backoff.as_millis() as u64, "session ended; reconnecting");
            }
        }
        if started.elapsed() > Duration::from_secs(30) {
            self.backoff = FIRST;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(false),
            _ = tokio::time::sleep(self.backoff) => {}
        }
        self.backoff = (self.backoff * 2).min(self.max);
        Ok(true)
    }
}
