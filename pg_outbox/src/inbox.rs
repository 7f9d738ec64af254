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
