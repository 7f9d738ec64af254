//! pg_outbox: a transactional outbox and a deduplicating inbox, as SQL.
//!
//! - `outbox.enqueue*` (outbox.rs) writes an event inside the caller's transaction, as a
//!   transactional logical decoding message (`wal` mode) or an `outbox.events` row (`table` mode).
//! - The inbox (inbox.rs, sql/inbox.sql) records received message ids and consumer offsets in the
//!   consumer's own transaction, and queues ingested messages for workers.
//! - Tables and roles (sql/bootstrap.sql), the SQL functions of each schema (sql/outbox.sql,
//!   sql/inbox.sql), the dump marks and the unprivileged owner of what enqueue acts on (sql/extension.sql, C
//!   only) and the grants (sql/grants.sql) are plain SQL.
//!
//! Order of the generated extension script: bootstrap.sql first, then the Rust functions, each SQL
//! file after what it `requires`, and grants.sql last, when every function it grants exists.

use pgrx::prelude::*;

mod error;
mod gucs;
mod inbox;
mod jsonb_text;
mod outbox;
mod owner;

::pgrx::pg_module_magic!(name, version);

extension_sql_file!("../sql/bootstrap.sql", bootstrap);
extension_sql_file!(
    "../sql/outbox.sql",
    requires = [
        outbox::enqueue,
        outbox::enqueue_without_headers,
        outbox::_enqueue_batch_json,
        outbox::_slot_name
    ]
);
extension_sql_file!(
    "../sql/inbox.sql",
    requires = ["outbox", inbox::_dedup_window_seconds, inbox::_max_attempts]
);
// extension.sql grants outbox._auth_keys_changed to outbox_owner: it must come after it
extension_sql_file!(
    "../sql/extension.sql",
    requires = ["outbox", "inbox", outbox::_auth_keys_changed]
);
extension_sql_file!(
    "../sql/grants.sql",
    requires = ["outbox", "inbox"],
    finalize
);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    gucs::init();
    outbox::register_key_invalidation();
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
