//! Dead letters: events that can never be published (an undecodable envelope, a record the broker
//! refuses as too large, an invalid routed topic). Each is recorded durably, with its reason and
//! whole payload, in `outbox.dead_letters`, exactly once per (source, position); only then does the
//! checkpoint count it as done, so the stream goes on without losing it.

use crate::error::RelayError;
use crate::event::Position;
use tokio_postgres::Client;
use tracing::warn;

/// An event that will not reach Kafka, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub position: Position,
    pub event_id: Option<uuid::Uuid>,
    pub topic: Option<String>,
    pub key: Option<String>,
    /// User headers, values as (lossy) text.
    pub headers: Vec<(String, String)>,
    pub payload: Vec<u8>,
    pub reason: String,
}

impl DeadLetter {
    /// A dead letter with nothing known but the raw content.
    pub fn raw(position: Position, content: &[u8], reason: impl Into<String>) -> DeadLetter {
        DeadLetter {
            position,
            event_id: None,
            topic: None,
            key: None,
            headers: Vec::new(),
            payload: content.to_vec(),
            reason: reason.into(),
        }
    }

    /// A decoded event that will not be published.
    pub fn of_event(
        position: Position,
        event: &pg_outbox_envelope::Event<'_>,
        reason: impl Into<String>,
    ) -> DeadLetter {
        DeadLetter {
            position,
            event_id: Some(uuid::Uuid::from_bytes(event.id)),
            topic: Some(event.topic.to_string()),
            key: event.key.map(str::to_string),
            headers: event
                .headers
                .iter()
                .map(|(n, v)| (n.to_string(), String::from_utf8_lossy(v).into_owned()))
                .collect(),
            payload: event.payload.to_vec(),
            reason: reason.into(),
        }
    }
}

/// Where dead letters are kept.
pub trait DeadLetters {
    /// Durably records `letter`; recording the same position twice keeps the first.
    fn record(
        &mut self,
        letter: DeadLetter,
    ) -> impl std::future::Future<Output = Result<(), RelayError>>;
}

/// `outbox.dead_letters` of the source's database.
pub struct PgDeadLetters {
    pg: Client,
    source_id: String,
}

impl PgDeadLetters {
    pub fn new(pg: Client, source_id: &str) -> PgDeadLetters {
        PgDeadLetters {
            pg,
            source_id: source_id.to_string(),
        }
    }
}

impl DeadLetters for PgDeadLetters {
    async fn record(&mut self, letter: DeadLetter) -> Result<(), RelayError> {
        let headers: serde_json::Map<String, serde_json::Value> = letter
            .headers
            .into_iter()
            .map(|(n, v)| (n, v.into()))
            .collect();
        self.pg
            .execute(
                "INSERT INTO outbox.dead_letters (source, position, event_id, topic, key, headers, payload, reason) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (source, position) DO NOTHING",
                &[
                    &self.source_id,
                    &letter.position.to_string(),
                    &letter.event_id,
                    &letter.topic,
                    &letter.key,
                    &serde_json::Value::Object(headers),
                    &letter.payload,
                    &letter.reason,
                ],
            )
            .await?;
        warn!(position = %letter.position, event_id = ?letter.event_id, reason = %letter.reason,
              "event dead-lettered to outbox.dead_letters");
        Ok(())
    }
}

/// In memory, for the pipeline's unit tests.
#[cfg(test)]
pub mod memory {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Default, Clone)]
    pub struct MemoryDeadLetters {
        pub letters: Arc<Mutex<Vec<DeadLetter>>>,
        /// Called with each position recorded (e.g. to log it next to acknowledgements).
        pub on_record: Option<Arc<dyn Fn(Position) + Send + Sync>>,
    }

    impl DeadLetters for MemoryDeadLetters {
        async fn record(&mut self, letter: DeadLetter) -> Result<(), RelayError> {
            if let Some(f) = &self.on_record {
                f(letter.position);
            }
            let mut letters = self.letters.lock().unwrap();
            if !letters.iter().any(|l| l.position == letter.position) {
                letters.push(letter);
            }
            Ok(())
        }
    }
}
