//! Settings (`pg_outbox.*`), registered when the library loads.
//!
//! `mode` and `trace_context` are per session/role/database (USERSET); the limits and the slot name
//! guard against silent data loss, so only a superuser may change them (SUSET), typically with
//! `ALTER DATABASE ... SET` or in `postgresql.conf`.

use pgrx::prelude::*;
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};
use std::ffi::CString;

/// Where `outbox.enqueue` writes an event.
#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    /// A transactional logical decoding message; needs `wal_level = logical` and a slot.
    #[name = c"wal"]
    Wal,
    /// A row in `outbox.events`, read by the relay's poll source.
    #[name = c"table"]
    Table,
}

pub static MODE: GucSetting<Mode> = GucSetting::<Mode>::new(Mode::Wal);
pub static MAX_PAYLOAD_BYTES: GucSetting<i32> =
    GucSetting::<i32>::new(pg_outbox_envelope::DEFAULT_MAX_EVENT_BYTES as i32);
pub static SLOT_NAME: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"pg_outbox"));
pub static TRACE_CONTEXT: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static INBOX_DEDUP_WINDOW: GucSetting<i32> = GucSetting::<i32>::new(7 * 24 * 3600);
pub static INBOX_MAX_ATTEMPTS: GucSetting<i32> = GucSetting::<i32>::new(5);

pub fn init() {
    GucRegistry::define_enum_guc(
        c"pg_outbox.mode",
        c"Where outbox.enqueue writes events: 'wal' (logical decoding message) or 'table' (outbox.events).",
        c"wal needs wal_level=logical and a pg_outbox replication slot; table works everywhere.",
        &MODE,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_outbox.max_payload_bytes",
        c"Largest event (payload, key and headers) outbox.enqueue accepts, in bytes.",
        c"The relay adds 1024 bytes for its own headers: keep it at or below the relay's max_record_bytes minus 1024 (the defaults match).",
        &MAX_PAYLOAD_BYTES,
        0,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_BYTE,
    );
    GucRegistry::define_string_guc(
        c"pg_outbox.slot_name",
        c"Logical replication slot (and publication) that retains pg_outbox events in wal mode.",
        c"outbox.enqueue refuses to write a WAL event when this slot does not exist in the current database.",
        &SLOT_NAME,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"pg_outbox.trace_context",
        c"W3C traceparent attached to events enqueued while it is set (SET LOCAL it per transaction).",
        c"",
        &TRACE_CONTEXT,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_outbox.inbox_dedup_window",
        c"How long inbox dedup records are kept at least; inbox.purge never removes younger ones.",
        c"",
        &INBOX_DEDUP_WINDOW,
        0,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"pg_outbox.inbox_max_attempts",
        c"Deliveries of an inbox message before it is dead-lettered.",
        c"",
        &INBOX_MAX_ATTEMPTS,
        1,
        1_000_000,
        GucContext::Suset,
        GucFlags::default(),
    );
}
