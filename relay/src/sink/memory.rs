//! An in-memory sink for the pipeline's unit tests, with injected faults: each record's fate is
//! chosen by a plan (acknowledge after a delay, fail, reject, never answer), so deliveries can
//! complete out of order, fail in the middle of a batch, or still be in flight at shutdown.

use crate::deadletter::DeadLetter;
use crate::error::{Kind, RelayError};
use crate::event::Position;
use crate::sink::dedup::Tail;
use crate::sink::{Delivered, Delivery, Record, Sink};
use crate::source::Identity;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What happens to one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Stored and acknowledged after the delay.
    Ack(Duration),
    /// Not stored; the delivery fails (transiently) after the delay.
    Fail(Duration),
    /// Not stored; the broker refuses it for good after the delay.
    Reject(Duration),
    /// Stored, but the acknowledgement never arrives.
    Hang,
}

/// Chooses the fate of the n-th record sent (0-based).
pub type Plan = Box<dyn FnMut(usize, &Record<'_>) -> Fate + Send>;

/// What the sink saw, shared with the test.
#[derive(Debug, Default)]
pub struct Log {
    /// Positions stored in Kafka, in send order, with their (topic, partition) and event id.
    pub stored: Vec<(String, i32, Position, String)>,
    /// Positions acknowledged, in the order the acknowledgements completed.
    pub acked: Vec<Position>,
}

pub struct MemorySink {
    pub partitions: i32,
    /// Topics that do not exist: asking for their partitions fails for this event.
    pub missing_topics: Vec<String>,
    pub log: Arc<Mutex<Log>>,
    /// Called with each position as its acknowledgement completes.
    pub on_ack: Option<Arc<dyn Fn(Position) + Send + Sync>>,
    /// The partition count the broker reports from now on, if a test changed it.
    pub resized: Arc<Mutex<Option<i32>>>,
    /// Topics whose partition count was asked for, with the count given.
    asked: Vec<(String, i32)>,
    plan: Mutex<Plan>,
    sent: Mutex<usize>,
}

impl MemorySink {
    pub fn new(partitions: i32, plan: Plan) -> MemorySink {
        MemorySink {
            partitions,
            missing_topics: Vec::new(),
            log: Arc::default(),
            on_ack: None,
            resized: Arc::default(),
            asked: Vec::new(),
            plan: Mutex::new(plan),
            sent: Mutex::new(0),
        }
    }

    fn count_now(&self) -> i32 {
        self.resized.lock().unwrap().unwrap_or(self.partitions)
    }

    /// The positions stored, in send order.
    pub fn stored_positions(&self) -> Vec<Position> {
        self.log
            .lock()
            .unwrap()
            .stored
            .iter()
            .map(|s| s.2)
            .collect()
    }

    /// Every record acknowledged at once.
    pub fn acking() -> MemorySink {
        MemorySink::new(1, Box::new(|_, _| Fate::Ack(Duration::ZERO)))
    }
}

impl Sink for MemorySink {
    async fn partition_count(&mut self, topic: &str) -> Result<i32, RelayError> {
        if self.missing_topics.iter().any(|t| t == topic) {
            return Err(RelayError::new(
                Kind::Event,
                format!("topic {topic}: Broker: Unknown topic or partition"),
            ));
        }
        let now = self.count_now();
        if !self.asked.iter().any(|(t, _)| t == topic) {
            self.asked.push((topic.to_string(), now));
        }
        Ok(now)
    }

    async fn changed_partition_counts(&self) -> Vec<(String, i32, i32)> {
        let now = self.count_now();
        self.asked
            .iter()
            .filter(|(_, was)| *was != now)
            .map(|(t, was)| (t.clone(), *was, now))
            .collect()
    }

    fn forget_partition_counts(&mut self) {
        self.asked.clear();
    }

    async fn read_tails(
        &self,
        topic: &str,
        partitions: i32,
        _identity: &Identity,
        replay_from: Position,
    ) -> Result<Vec<Tail>, RelayError> {
        let log = self.log.lock().unwrap();
        let mut tails = vec![Tail::default(); partitions.max(0) as usize];
        for (t, p, position, id) in &log.stored {
            if let Some(tail) = tails.get_mut(*p as usize).filter(|_| t == topic) {
                tail.last = tail.last.max(Some(*position));
                if *position >= replay_from {
                    tail.seen.insert(*position, id.as_bytes().to_vec());
                }
            }
        }
        Ok(tails)
    }

    async fn send(&self, record: Record<'_>) -> Result<Delivery, RelayError> {
        let n = {
            let mut sent = self.sent.lock().unwrap();
            *sent += 1;
            *sent - 1
        };
        let fate = (self.plan.lock().unwrap())(n, &record);
        let position = record.position;
        if matches!(fate, Fate::Ack(_) | Fate::Hang) {
            self.log.lock().unwrap().stored.push((
                record.topic.to_string(),
                record.partition,
                position,
                record.event_id.to_string(),
            ));
        }
        let log = self.log.clone();
        let on_ack = self.on_ack.clone();
        let topic = record.topic.to_string();
        let payload = record.payload.to_vec();
        Ok(Box::pin(async move {
            match fate {
                Fate::Ack(delay) => {
                    tokio::time::sleep(delay).await;
                    log.lock().unwrap().acked.push(position);
                    if let Some(f) = on_ack {
                        f(position);
                    }
                    Delivered::Acked
                }
                Fate::Fail(delay) => {
                    tokio::time::sleep(delay).await;
                    Delivered::Failed(RelayError::transient(format!(
                        "injected delivery failure at {position}"
                    )))
                }
                Fate::Reject(delay) => {
                    tokio::time::sleep(delay).await;
                    let mut letter = DeadLetter::raw(position, &payload, "injected rejection");
                    letter.topic = Some(topic);
                    Delivered::Rejected(Box::new(letter))
                }
                Fate::Hang => std::future::pending().await,
            }
        }))
    }

    async fn flush(&self, _timeout: Duration) -> Result<(), RelayError> {
        // deliveries complete by themselves; the pipeline awaits them after a flush
        Ok(())
    }
}
