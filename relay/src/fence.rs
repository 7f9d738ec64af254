//! Fencing a relay that was paused (SIGSTOP, a VM paused, a stall of the whole process) while
//! another took its source over.
//!
//! A paused relay keeps records in its producer's queue; if it resumed after a successor read the
//! partitions back, it would append them after the successor's copies (duplicates, and per key an
//! older record after newer ones). Two bounds close that:
//! - Every record has a lifetime `fence_timeout_ms` (librdkafka's `message.timeout.ms`, with the
//!   gapless guarantee): after it, the record is never sent. A successor gets the slot only after
//!   `wal_sender_timeout` without a word from the paused relay, and waits `fence_timeout_ms + 1 s -
//!   wal_sender_timeout` (at least `restart_grace_ms`) more before it reads the partitions back:
//!   by then every record of the paused relay has landed or will never be sent (the second is how
//!   late librdkafka may expire a record).
//! - A relay that finds it was paused for half of `wal_sender_timeout` or more (the [`PauseClock`]
//!   below) assumes it was replaced: it withdraws what its producer still holds (queued, and in
//!   flight: a request that was on the wire at the pause must not be retried) and ends the session;
//!   the next one starts from the durable position, or stands by. The clock's ticker withdraws the
//!   moment it runs after the resume, before librdkafka's own timeout scan could retry a request
//!   (it runs at most once a second, and a retry waits `retry.backoff.ms` more); the relay loop
//!   checks again before each record it hands over.
//!
//! A relay that is not paused but lost its source (its walsender or lock session terminated,
//! PostgreSQL restarted, any error that ends a session) is live: its producer would go on
//! delivering what it held (for up to `linger.ms`, retries, `fence_timeout_ms`) while a standby
//! takes the source within a second or two. So every session that ends in an error withdraws what
//! its producer holds and destroys the producer at once, which closes its broker connections (a
//! request half written to a socket is never completed); the next session, of this relay or a
//! successor, waits `restart_grace_ms` for what was already whole in the sockets to land before it
//! reads the partitions back (`tests/tests/takeover.rs`).
//!
//! The poll source's lock is held by a session of the paused relay, which the kernel keeps alive
//! (the relay turns `idle_session_timeout` off for its sessions): no one takes over while it is
//! paused, and it goes on when it resumes.
//!
//! What is left: a produce request partly written to its socket when the pause began, which
//! librdkafka's thread completes the moment the process resumes, before the ticker runs (a socket
//! cannot take half a request back; seen once, under a full test run's load); a pause that falls
//! between the pause check and the hand-over of that one record to the producer (microseconds);
//! librdkafka's threads winning the race against the ticker after a resume in other ways (they
//! would need to notice a dead connection, reconnect and send within the ticker's first run); a
//! poll relay whose lock session is ended by an operator (`pg_terminate_backend`) or by the network
//! while it is paused, and that resumes within `fence_timeout_ms`; a live relay cut off from
//! PostgreSQL by the network (not told its session ended) that hands records it had already read
//! to its producer more than a status interval (0.5 s) after its last word reached the server.
//!

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
// tokio's clock is the monotonic clock (which runs on while the process is stopped); in unit tests
// it can be paused and moved forward, which is how they make a pause without sleeping
use tokio::time::Instant;

/// How often the clock ticks.
const TICK: Duration = Duration::from_millis(100);

/// What the ticker does the moment it sees a pause beyond the armed limit: withdraw what the
/// producer holds (see [`PauseClock::arm`]).
pub type OnPause = Box<dyn Fn() + Send + Sync>;

/// Notices pauses of the whole process: a task ticks every 100 ms on a monotonic clock (which runs
/// on while the process is stopped); a tick that comes late, or no tick for long, is a pause.
pub struct PauseClock {
    origin: Instant,
    /// Milliseconds since `origin` at the last tick; 0 while no ticker runs.
    last_tick_ms: AtomicU64,
    /// The longest gap between ticks since the last [`PauseClock::reset`].
    longest_ms: AtomicU64,
    /// The pause limit of the current session, and what to do when a tick finds it exceeded.
    armed: Mutex<Option<(Duration, OnPause)>>,
}

impl std::fmt::Debug for PauseClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PauseClock")
            .field("last_tick_ms", &self.last_tick_ms)
            .field("longest_ms", &self.longest_ms)
            .finish_non_exhaustive()
    }
}

impl Default for PauseClock {
    fn default() -> Self {
        PauseClock {
            origin: Instant::now(),
            last_tick_ms: AtomicU64::new(0),
            longest_ms: AtomicU64::new(0),
            armed: Mutex::new(None),
        }
    }
}

impl PauseClock {
    fn now_ms(&self) -> u64 {
        (self.origin.elapsed().as_millis() as u64).max(1)
    }

    /// Ticks until the process ends.
    pub fn start(clock: Arc<PauseClock>) {
        clock.last_tick_ms.store(clock.now_ms(), Ordering::Relaxed);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(TICK).await;
                let now = clock.now_ms();
                let gap = now.saturating_sub(clock.last_tick_ms.swap(now, Ordering::Relaxed));
                clock.longest_ms.fetch_max(gap, Ordering::Relaxed);
                let pause = Duration::from_millis(gap).saturating_sub(TICK);
                if let Some((limit, on_pause)) =
                    &*clock.armed.lock().unwrap_or_else(|e| e.into_inner())
                {
                    if pause >= *limit {
                        on_pause();
                    }
                }
            }
        });
    }

    /// From now on, a tick that finds the process was paused for `limit` or more calls `on_pause`
    /// at once, before anything else of the relay runs: librdkafka's threads resume with the
    /// process and could send (or send again) a record of the paused relay within milliseconds,
    /// long before the relay loop checks [`PauseClock::paused`] at its next record.
    pub fn arm(&self, limit: Duration, on_pause: OnPause) {
        *self.armed.lock().unwrap_or_else(|e| e.into_inner()) = Some((limit, on_pause));
    }

    /// Forgets what [`PauseClock::arm`] set: the session ended, and the withdrawal it armed holds
    /// its producer, which must be free to close.
    pub fn disarm(&self) {
        *self.armed.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Forgets the pauses seen so far (a new session starts).
    pub fn reset(&self) {
        self.longest_ms.store(0, Ordering::Relaxed);
    }

    /// The longest pause since the last reset, counting one that is still going on (no tick yet
    /// after a resume). Zero when no ticker runs.
    pub fn paused(&self) -> Duration {
        let last = self.last_tick_ms.load(Ordering::Relaxed);
        if last == 0 {
            return Duration::ZERO;
        }
        let current = self.now_ms().saturating_sub(last);
        let longest = self.longest_ms.load(Ordering::Relaxed).max(current);
        // a tick is due every TICK: only what goes beyond is a pause
        Duration::from_millis(longest).saturating_sub(TICK)
    }
}

/// How late librdkafka may expire a record past its `message.timeout.ms`: it scans for timed-out
/// records once a second.
const EXPIRY_SCAN: Duration = Duration::from_secs(1);

/// How long a successor that just took the slot waits before reading Kafka back: long enough that
/// every record of a predecessor that stopped answering `replaced_after` ago has landed or expired.
/// A record lives `lifetime` plus at most [`EXPIRY_SCAN`]; what of that the server's timeout already
/// covered is not waited again, so with the defaults (30 s records, a 60 s `wal_sender_timeout`)
/// only `restart_grace` is left.
pub fn takeover_wait(
    restart_grace: Duration,
    lifetime: Duration,
    replaced_after: Duration,
) -> Duration {
    restart_grace.max((lifetime + EXPIRY_SCAN).saturating_sub(replaced_after))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The process stopped for `d`: the clock moves on, and no task ran meanwhile.
    async fn pause(d: Duration) {
        tokio::time::advance(d).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_thread_shows_as_a_pause() {
        let clock = Arc::new(PauseClock::default());
        assert_eq!(clock.paused(), Duration::ZERO, "no ticker: no pause");
        PauseClock::start(clock.clone());
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert_eq!(clock.paused(), Duration::ZERO, "ticks on time");
        pause(Duration::from_millis(800)).await;
        assert!(
            clock.paused() >= Duration::from_millis(650),
            "{:?}",
            clock.paused()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
        // the ticker ran again, but remembers the gap until a reset
        assert!(
            clock.paused() >= Duration::from_millis(650),
            "{:?}",
            clock.paused()
        );
        clock.reset();
        assert!(
            clock.paused() < Duration::from_millis(100),
            "{:?}",
            clock.paused()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_ticker_withdraws_the_moment_it_sees_a_pause_beyond_the_limit() {
        use std::sync::atomic::AtomicUsize;
        let clock = Arc::new(PauseClock::default());
        let withdrawn = Arc::new(AtomicUsize::new(0));
        let count = withdrawn.clone();
        clock.arm(
            Duration::from_millis(500),
            Box::new(move || {
                count.fetch_add(1, Ordering::Relaxed);
            }),
        );
        PauseClock::start(clock.clone());
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert_eq!(withdrawn.load(Ordering::Relaxed), 0, "no pause yet");
        // a pause shorter than the limit: nothing
        pause(Duration::from_millis(300)).await;
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(
            withdrawn.load(Ordering::Relaxed),
            0,
            "300 ms is below the limit"
        );
        // one beyond it: withdrawn once, by the first tick after it
        pause(Duration::from_millis(900)).await;
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(withdrawn.load(Ordering::Relaxed), 1);
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert_eq!(
            withdrawn.load(Ordering::Relaxed),
            1,
            "not again without a new pause"
        );
    }

    #[test]
    fn the_successor_waits_out_the_records_lifetime() {
        let s = Duration::from_secs;
        assert_eq!(takeover_wait(s(1), s(30), s(60)), s(1));
        assert_eq!(takeover_wait(s(1), s(5), s(3)), s(3));
        assert_eq!(takeover_wait(s(10), s(5), s(3)), s(10));
        // a record expires at most a second late (librdkafka's scan): that second is waited out only
        // where the server's timeout does not already cover it
        assert_eq!(takeover_wait(s(0), s(30), s(60)), s(0));
        assert_eq!(takeover_wait(s(0), s(30), s(30)), s(1));
        assert_eq!(
            takeover_wait(s(0), s(30), Duration::from_millis(30_500)),
            Duration::from_millis(500)
        );
    }
}
