//! The inbox (schema `inbox`): deduplicated receipt, consumer offsets and the queue of ingested
//! messages, for consumers in any language.
//!
//! The rules live in SQL (sql/inbox.sql), where every caller, the relay's ingest included, goes
//! through the same functions; this module only hands the settings they need to SQL.
//!
//! Invariants (kept by that SQL):
//! - `inbox.try_receive` is true exactly once per (consumer, message id) among committed
//!   transactions; `inbox.messages` holds a (consumer, message id) at most once, so a redelivered
//!   message is recorded once.
//! - A message becomes a row of `inbox.messages` by one rule (`inbox._queue_messages`): `pending`,
//!   or `dead` with its reason; `inbox.deliver` (one message) and `inbox.deliver_batch` (the
//!   relay's ingest) both go through it. `deliver_batch` stores each partition's next offset in the
//!   same statement, so a batch's messages and offsets commit together or not at all.
//! - A consumer's stored next offset per topic/partition only moves forward (unless forced), in the
//!   caller's transaction, so it commits together with the messages it covers.
//! - `inbox.purge` never removes a record dedup may still need: nothing younger than
//!   `pg_outbox.inbox_dedup_window`, and no ingested message at or above its stored offset.

use pgrx::prelude::*;

#[pg_schema]
mod inbox {
    use pgrx::prelude::*;

    /// `inbox._dedup_window_seconds()`: the current `pg_outbox.inbox_dedup_window`.
    #[pg_extern(stable, parallel_safe)]
    #[search_path(pg_catalog, pg_temp)]
    fn _dedup_window_seconds() -> i32 {
        crate::gucs::INBOX_DEDUP_WINDOW.get()
    }

    /// `inbox._max_attempts()`: the current `pg_outbox.inbox_max_attempts`.
    #[pg_extern(stable, parallel_safe)]
    #[search_path(pg_catalog, pg_temp)]
    fn _max_attempts() -> i32 {
        crate::gucs::INBOX_MAX_ATTEMPTS.get()
    }
}
