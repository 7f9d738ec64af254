//! Where events come from: the [`Source`] seam, implemented by the WAL ([`wal`],
//! `pg_outbox.mode = wal`), the `outbox.events` table ([`poll`], `pg_outbox.mode = table`) and, for
//! unit tests, memory ([`memory`]).
//!
//! A source never calls the pipeline or the sink: it hands over [`Step`]s in its publishing order
//! and is told, through [`Source::confirm`], what it may make durable (the slot position, the rows
//! to delete). What may be confirmed is decided in one place, [`crate::checkpoint`].

#[cfg(any(test, feature = "testing"))]
pub mod memory;
pub mod poll;
pub mod wal;

use crate::error::RelayError;
use crate::event::SourceEvent;

/// What a source hands over, in order.
#[derive(Debug, Clone)]
pub enum Step<A> {
    /// An event of the open unit (a WAL transaction, a poll batch).
    Event(SourceEvent),
    /// The open unit ends; `A` may be confirmed once all of it and everything before is done.
    Close(A),
    /// Nothing is open or buffered before `A`: with nothing pending, `A` may be confirmed as it is.
    Idle(A),
}

#[allow(async_fn_in_trait)]
pub trait Source {
    /// What the source makes durable: an LSN, the last (xid, seq) of a poll batch.
    type Ack: Copy + std::fmt::Debug;

    /// Waits until there is something, then appends steps holding at most `room` events to `out`.
    /// Cancel-safe: dropped before it returns, it loses nothing.
    async fn next(&mut self, room: usize, out: &mut Vec<Step<Self::Ack>>)
        -> Result<(), RelayError>;

    /// Everything up to `ack` is in Kafka (or dead-lettered): make it durable.
    async fn confirm(&mut self, ack: Self::Ack) -> Result<(), RelayError>;

    /// Graceful end of the session, after the last confirmation.
    async fn close(&mut self) -> Result<(), RelayError>;
}
