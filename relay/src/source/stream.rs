//! The slot's replication stream, read ahead by a task of its own into a buffer bounded in bytes.
//!
//! pgwire-replication buffers decoded messages by count. A count that is safe for the largest
//! message (about 33 of 1 MB in 32 MiB) starves the pipeline of small ones: it wakes up for a few
//! dozen events at a time while the server waits on a full socket. Here the client keeps a small
//! count ([`CLIENT_BUFFER`]), and a task moves its messages on into a queue bounded by bytes
//! (`max_in_flight_bytes`): thousands of small events ready at every turn of the pipeline, and
//! never more than the budget however large each one is (up to the stream limit, see `wal.rs`).
//!
//! The task owns the client; the source talks to it through commands (the confirmed position, a
//! clean stop). Dropping a [`Stream`] ends the task, which aborts the client: the server releases
//! the slot at once, for the next session or a standby.

use pgwire_replication::{
    Lsn, PgWireError, ReplicationClient, ReplicationConfig, ReplicationEvent,
};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

/// Decoded messages pgwire-replication may hold before the task takes them: each is at most the
/// stream limit (about 1 MB with the defaults), so this bounds the client's own buffer.
pub const CLIENT_BUFFER: usize = 16;

/// What a message weighs in the buffer beyond its bytes (the decoded event, the queue node).
const OVERHEAD: usize = 96;

type Item = Result<(ReplicationEvent, OwnedSemaphorePermit), PgWireError>;

enum Command {
    /// Everything up to this position is published: tell the server (monotonic).
    Applied(Lsn),
    /// Wait (up to `wait`) until the server has `confirmed`, then stop cleanly.
    Stop {
        confirmed: u64,
        wait: Duration,
        done: oneshot::Sender<Result<(), PgWireError>>,
    },
}

pub struct Stream {
    rx: mpsc::UnboundedReceiver<Item>,
    commands: mpsc::UnboundedSender<Command>,
}

/// The bytes a message holds while it waits in the buffer.
fn weight(event: &ReplicationEvent) -> usize {
    OVERHEAD
        + match event {
            ReplicationEvent::Message {
                prefix, content, ..
            } => prefix.len() + content.len(),
            ReplicationEvent::XLogData { data, .. } => data.len(),
            _ => 0,
        }
}

impl Stream {
    /// Connects, starts streaming, and starts the task that reads ahead up to `budget` bytes.
    pub async fn start(config: ReplicationConfig, budget: usize) -> Result<Stream, PgWireError> {
        let mut client = ReplicationClient::connect(config.with_buffer_size(CLIENT_BUFFER)).await?;
        client.wait_started().await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let (commands, command_rx) = mpsc::unbounded_channel();
        let budget = budget.max(1);
        tokio::spawn(read_ahead(client, budget, tx, command_rx));
        Ok(Stream { rx, commands })
    }

    /// The next message (cancel-safe: a channel receive). `None`: the stream ended.
    pub async fn recv(&mut self) -> Result<Option<ReplicationEvent>, PgWireError> {
        match self.rx.recv().await {
            Some(Ok((event, _permit))) => Ok(Some(event)),
            Some(Err(e)) => Err(e),
            None => Ok(None),
        }
    }

    /// The next message if one is buffered.
    pub fn try_recv(&mut self) -> Option<Result<Option<ReplicationEvent>, PgWireError>> {
        match self.rx.try_recv() {
            Ok(Ok((event, _permit))) => Some(Ok(Some(event))),
            Ok(Err(e)) => Some(Err(e)),
            Err(mpsc::error::TryRecvError::Empty) => None,
            Err(mpsc::error::TryRecvError::Disconnected) => Some(Ok(None)),
        }
    }

    /// Everything up to `lsn` is published (the client sends it every status interval).
    pub fn update_applied_lsn(&self, lsn: Lsn) {
        let _ = self.commands.send(Command::Applied(lsn));
    }

    /// Waits up to `wait` until the server has `confirmed`, then ends the stream cleanly.
    pub async fn shutdown(&mut self, confirmed: u64, wait: Duration) -> Result<(), PgWireError> {
        let (done, answer) = oneshot::channel();
        if self
            .commands
            .send(Command::Stop {
                confirmed,
                wait,
                done,
            })
            .is_err()
        {
            return Ok(());
        }
        answer.await.unwrap_or(Ok(()))
    }
}

/// The task: moves the client's messages into the byte-bounded queue, and carries out commands.
/// Ends when the stream ends (after handing over its error, if any), on a stop, or when the
/// [`Stream`] is dropped (then it aborts the client).
async fn read_ahead(
    mut client: ReplicationClient,
    budget: usize,
    tx: mpsc::UnboundedSender<Item>,
    mut commands: mpsc::UnboundedReceiver<Command>,
) {
    let room = Arc::new(Semaphore::new(budget));
    loop {
        let received = tokio::select! {
            biased;
            command = commands.recv() => {
                if !obey(&mut client, command).await {
                    return;
                }
                continue;
            }
            received = client.recv() => received,
        };
        let event = match received {
            Ok(Some(event)) => event,
            Ok(None) => return,
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        // a message larger than the whole budget takes all of it
        let bytes = u32::try_from(weight(&event).min(budget)).unwrap_or(u32::MAX);
        let permit = loop {
            tokio::select! {
                biased;
                command = commands.recv() => {
                    if !obey(&mut client, command).await {
                        return;
                    }
                }
                permit = room.clone().acquire_many_owned(bytes) => {
                    break permit.expect("the semaphore is never closed");
                }
            }
        };
        if tx.send(Ok((event, permit))).is_err() {
            client.abort();
            return;
        }
    }
}

/// Carries out one command; returns whether the task goes on.
async fn obey(client: &mut ReplicationClient, command: Option<Command>) -> bool {
    match command {
        Some(Command::Applied(lsn)) => {
            client.update_applied_lsn(lsn);
            true
        }
        Some(Command::Stop {
            confirmed,
            wait,
            done,
        }) => {
            // the client sends the applied position every status interval and, on stop, only
            // CopyDone: wait until the server has the last confirmation, so that the next session
            // does not replay (and read Kafka back for) what this one confirmed
            let deadline = Instant::now() + wait;
            while client.metrics().last_applied_lsn().as_u64() < confirmed
                && Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = done.send(client.shutdown().await);
            false
        }
        None => {
            // the source is gone (a failed session): release the slot at once
            client.abort();
            false
        }
    }
}
