//! pg_outbox: a transactional outbox and a deduplicating inbox, as SQL.
//!
//! - `outbox.enqueue*` (outbox.rs) writes an event inside the caller's transaction, as a
//!   transactional logical decoding message (`wal` mode) or an `outbox.events` row (`table` mode).
//! - The inbox (inbox.rs, sql/finalize.sql) records received message ids and consumer offsets in the
//!   consumer's own transaction, and queues ingested messages for workers.
//! - Tables, roles and grants are plain SQL (sql/bootstrap.sql, sql/finalize.sql).

use pgrx::prelude::*;

mod error;
mod gucs;
mod inbox;
mod jsonb_text;
mod outbox;

::pgrx::pg_module_magic!(name, version);

extension_sql_file!("../sql/bootstrap.sql", bootstrap);
extension_sql_file!("../sql/finalize.sql", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    gucs::init();
}

/// Required by `cargo pgrx test` when it is used.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec!["wal_level = logical"]
    }
}
