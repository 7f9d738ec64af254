//! An in-memory source for the pipeline's unit tests: hands over a script of steps, a batch at a
//! time, and records what it is told to confirm.

use crate::error::RelayError;
use crate::event::Position;
use crate::source::{Identity, Source, Step};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

pub struct MemorySource {
    script: VecDeque<Step<u64>>,
    /// Confirmed tokens, in order.
    pub confirmed: Arc<Mutex<Vec<u64>>>,
    /// Called with each token as it is confirmed.
    pub on_confirm: Option<Arc<dyn Fn(u64) + Send + Sync>>,
    /// Set by a graceful close.
    pub closed: Arc<AtomicBool>,
    pub identity: Identity,
    /// If set, each call waits this long, then hands over one step: a database writing slowly.
    pub pace: Option<std::time::Duration>,
}

impl MemorySource {
    pub fn new(script: impl IntoIterator<Item = Step<u64>>) -> MemorySource {
        MemorySource {
            script: script.into_iter().collect(),
            confirmed: Arc::default(),
            on_confirm: None,
            closed: Arc::default(),
            identity: Identity {
                name: "test".into(),
                source: "slot:test".into(),
                ceiling: Position::new(u64::MAX, 0),
                recover: "start over".into(),
                key: Default::default(),
                older_keys: Vec::new(),
            },
            pace: None,
        }
    }
}

impl Source for MemorySource {
    type Ack = u64;

    async fn next(&mut self, room: usize, out: &mut Vec<Step<u64>>) -> Result<(), RelayError> {
        if self.script.is_empty() {
            // the script is done: wait like a quiet database
            std::future::pending::<()>().await;
        }
        if let Some(pace) = self.pace {
            tokio::time::sleep(pace).await;
            out.extend(self.script.pop_front());
            return Ok(());
        }
        let mut events = 0;
        while let Some(step) = self.script.front() {
            if matches!(step, Step::Event(_)) {
                if events == room {
                    break;
                }
                events += 1;
            }
            out.push(self.script.pop_front().expect("front exists"));
        }
        Ok(())
    }

    async fn confirm(&mut self, ack: u64) -> Result<(), RelayError> {
        if let Some(f) = &self.on_confirm {
            f(ack);
        }
        let mut confirmed = self.confirmed.lock().unwrap();
        assert!(
            confirmed.last().is_none_or(|&last| last <= ack),
            "confirmations go forward"
        );
        confirmed.push(ack);
        Ok(())
    }

    fn identity(&self) -> &Identity {
        &self.identity
    }

    async fn close(&mut self) -> Result<(), RelayError> {
        self.closed.store(true, Ordering::Relaxed);
        Ok(())
    }
}
