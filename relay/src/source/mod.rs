//! Where events come from: the WAL ([`wal`], `pg_outbox.mode = wal`) or the `outbox.events` table
//! ([`poll`], `pg_outbox.mode = table`).
pub mod poll;
pub mod wal;
