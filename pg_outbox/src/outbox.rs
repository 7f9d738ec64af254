//! `outbox.enqueue*`: validate an event, then write it where `pg_outbox.mode` says.
//!
//! Invariants:
//! - An event exists iff the enqueuing (sub)transaction commits. In `wal` mode it is a
//!   *transactional* logical decoding message (decoded only if its transaction commits, dropped
//!   with a rolled-back savepoint); in `table` mode it is a row of `outbox.events`.
//! - In `wal` mode nothing is written unless `wal_level = logical` and the pg_outbox slot exists in
//!   this database and is consistent: a slot that is created only afterwards would not retain the
//!   event, which would be lost silently. Both conditions are checked before every write.
//! - Validation happens before any write, so a refused event leaves no trace, and it is the same in
//!   both modes (the envelope's limits, reserved header names).
//! - Only these functions can produce an event the relay publishes: a wal-mode message is sealed
//!   with the database's secret key and bound to its transaction (see the envelope crate), and a
//!   table-mode row is inserted as the table's owner (owner.rs); callers hold neither privilege.

use crate::error::{OrRaise, Refusal};
use crate::gucs::{self, Mode};
use crate::jsonb_text::JsonbText;
use crate::owner::as_owner;
use pg_outbox_envelope::{Event, AUTH_KEY_LEN, MESSAGE_PREFIX};
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::spi::OwnedPreparedStatement;
use pgrx::PgOid;
use std::cell::{Cell, OnceCell};
use std::ffi::CString;
use std::time::{SystemTime, UNIX_EPOCH};

#[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15", feature = "pg16"))]
unsafe extern "C-unwind" {
    // replication/message.h; pgrx 0.18.1 has no binding for it.
    fn LogLogicalMessage(
        prefix: *const std::ffi::c_char,
        message: *const std::ffi::c_char,
        size: usize,
        transactional: bool,
    ) -> pg_sys::XLogRecPtr;
}

#[cfg(any(feature = "pg17", feature = "pg18"))]
unsafe extern "C-unwind" {
    fn LogLogicalMessage(
        prefix: *const std::ffi::c_char,
        message: *const std::ffi::c_char,
        size: usize,
        transactional: bool,
        flush: bool,
    ) -> pg_sys::XLogRecPtr;
}

const PREFIX: &std::ffi::CStr = c"pg_outbox";
const _: () = assert!(PREFIX.to_bytes().len() == MESSAGE_PREFIX.len());

/// One event as the caller gave it.
pub struct NewEvent<'a> {
    pub topic: Option<&'a str>,
    pub key: Option<&'a str>,
    pub payload: &'a [u8],
    pub payload_is_json: bool,
}

fn invalid(message: impl Into<String>, hint: impl Into<String>) -> Refusal {
    Refusal::new(
        PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
        message,
        hint,
    )
}

fn check_topic(topic: Option<&str>) -> Result<&str, Refusal> {
    let topic = topic.ok_or_else(|| {
        Refusal::new(
            PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
            "pg_outbox: topic must not be NULL",
            "Pass the Kafka topic the event belongs to, e.g. 'orders'.",
        )
    })?;
    pg_outbox_envelope::validate_topic(topic).map_err(|e| {
        invalid(
            format!("pg_outbox: invalid topic: {e}"),
            "Topic names are 1 to 249 characters of [a-zA-Z0-9._-], as Kafka requires.",
        )
    })?;
    Ok(topic)
}

/// `pg_outbox.max_payload_bytes` bounds what becomes the Kafka record: payload, key, and the
/// headers' names and values (with the trace context), as the broker counts them.
fn check_record_size(payload: usize, key: usize, headers: usize) -> Result<(), Refusal> {
    let max = gucs::MAX_PAYLOAD_BYTES.get().max(0) as usize;
    let len = payload + key + headers;
    if len > max {
        return Err(Refusal::new(
            PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            format!(
                "pg_outbox: event is {len} bytes (payload {payload}, key {key}, headers {headers}), \
                 pg_outbox.max_payload_bytes allows {max}"
            ),
            "Send a smaller payload (e.g. a reference to the data), or have a superuser raise \
             pg_outbox.max_payload_bytes together with the broker's message.max.bytes.",
        ));
    }
    Ok(())
}

/// Header names the relay writes itself; no event may carry them (the relay and the ingest trust
/// only their own, and a copy would be mistaken for one).
pub const RESERVED_HEADER_PREFIX: &str = "pg_outbox-";

/// The header a trace context travels in.
const TRACE_HEADER: &str = "traceparent";

/// The headers argument, parsed once: the canonical jsonb text (for table mode's row) and its pairs.
///
/// Header values become bytes by one rule, shared with the SQL edition and the relay's poll source
/// (`jsonb_each_text`): a string is its UTF-8, a number or boolean its jsonb text, exactly as given
/// (`1.50` stays `1.50`). Pairs are in byte order of their names (`ORDER BY name COLLATE "C"`).
pub struct Headers<'t> {
    /// The object's canonical text, `{}` when there are no headers.
    pub text: &'t [u8],
    values: std::collections::BTreeMap<String, &'t serde_json::value::RawValue>,
}

impl<'t> Headers<'t> {
    /// Parses `headers` (SQL NULL and JSON null are no headers). Nesting deeper than serde_json
    /// reads (128 levels) is refused like any other structured value.
    pub fn parse(headers: Option<&'t JsonbText>) -> Result<Headers<'t>, Refusal> {
        let text = match headers {
            Some(text) if text.0 != b"null" => text.0.as_slice(),
            _ => {
                return Ok(Headers {
                    text: b"{}",
                    values: Default::default(),
                })
            }
        };
        if text.first() != Some(&b'{') {
            let kind = match text.first() {
                Some(b'[') => "an array",
                Some(b'"') => "a string",
                Some(b't' | b'f') => "a boolean",
                _ => "a number",
            };
            return Err(invalid(
                format!("pg_outbox: headers must be a JSON object, got {kind}"),
                "Pass headers as '{\"name\": \"value\"}'::jsonb.",
            ));
        }
        let values: std::collections::BTreeMap<String, &serde_json::value::RawValue> =
            serde_json::from_slice(text).map_err(|e| {
                invalid(
                    format!("pg_outbox: headers cannot be read: {e}"),
                    "Pass headers as a flat object, '{\"name\": \"value\"}'::jsonb; \
                     header values must be strings, numbers or booleans.",
                )
            })?;
        for name in values.keys() {
            if name
                .get(..RESERVED_HEADER_PREFIX.len())
                .is_some_and(|p| p.eq_ignore_ascii_case(RESERVED_HEADER_PREFIX))
            {
                return Err(invalid(
                    format!("pg_outbox: header \"{name}\" is reserved for the relay"),
                    "Header names beginning with pg_outbox- are written by the relay only; \
                     rename the header (for example x-original-id when forwarding one).",
                ));
            }
        }
        Ok(Headers { text, values })
    }

    /// Header values in the envelope are bytes: strings as their UTF-8, numbers and booleans as
    /// their jsonb text.
    pub fn pairs(&self) -> Result<Vec<(&str, Vec<u8>)>, Refusal> {
        self.values
            .iter()
            .map(|(name, value)| {
                let raw = value.get();
                let bytes = match raw.as_bytes().first() {
                    Some(b'"') => serde_json::from_str::<String>(raw)
                        .map_err(|e| {
                            invalid(
                                format!("pg_outbox: header \"{name}\" cannot be read: {e}"),
                                "Pass header values as strings, numbers or booleans.",
                            )
                        })?
                        .into_bytes(),
                    Some(b't' | b'f' | b'-' | b'0'..=b'9') => raw.as_bytes().to_vec(),
                    first => {
                        let kind = match first {
                            Some(b'[') => "an array",
                            Some(b'{') => "an object",
                            _ => "null",
                        };
                        return Err(invalid(
                            format!(
                                "pg_outbox: header \"{name}\" is {kind}; header values must be strings, numbers or booleans"
                            ),
                            "Encode structured values as a JSON string.",
                        ));
                    }
                };
                Ok((name.as_str(), bytes))
            })
            .collect()
    }
}

fn trace_context() -> Option<String> {
    gucs::TRACE_CONTEXT
        .get()
        .map(|c| c.to_string_lossy().into_owned())
        .filter(|s| !s.is_empty())
}

/// Refuses a `wal`-mode write that could not be retained and decoded.
fn check_wal_ready() -> Result<(), Refusal> {
    // SAFETY: wal_level is a plain int set at server start.
    if unsafe { pg_sys::wal_level } < pg_sys::WalLevel::WAL_LEVEL_LOGICAL as i32 {
        return Err(Refusal::new(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "pg_outbox: wal mode needs wal_level = logical",
            "Set wal_level = logical in postgresql.conf and restart PostgreSQL, \
             or use SET pg_outbox.mode = 'table'.",
        ));
    }
    let name = gucs::SLOT_NAME
        .get()
        .unwrap_or_else(|| CString::from(c"pg_outbox"));
    let missing = || {
        Refusal::new(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!(
                "pg_outbox: replication slot \"{}\" does not exist in this database, so a wal-mode event would not be retained",
                name.to_string_lossy()
            ),
            "Run CALL outbox.setup(); (or start the relay, which sets it up), \
             or use SET pg_outbox.mode = 'table'. A slot that existed before and was dropped is \
             re-created only by SELECT * FROM outbox.recreate_slot('<why>').",
        )
    };
    // SAFETY: SearchNamedReplicationSlot takes ReplicationSlotControlLock itself (need_lock) and
    // returns a pointer into shared memory that stays valid; the fields read below are plain values.
    unsafe {
        let slot = pg_sys::SearchNamedReplicationSlot(name.as_ptr(), true);
        if slot.is_null() {
            return Err(missing());
        }
        let data = &(*slot).data;
        if !(*slot).in_use || data.database != pg_sys::MyDatabaseId {
            return Err(missing());
        }
        // A slot still building its snapshot (confirmed_flush unset) might skip this transaction;
        // an invalidated slot has lost its restart_lsn.
        if data.restart_lsn == 0 || data.confirmed_flush == 0 {
            return Err(Refusal::new(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!(
                    "pg_outbox: replication slot \"{}\" is not usable (being created or invalidated)",
                    name.to_string_lossy()
                ),
                "Wait for slot creation to finish. An invalidated slot: check which events were not \
                 yet published, then SELECT * FROM outbox.recreate_slot('<why>').",
            ));
        }
    }
    Ok(())
}

fn write_wal_message(envelope: &[u8]) {
    // SAFETY: both pointers are valid for the call; LogLogicalMessage copies the bytes into WAL.
    // The boundary guard turns a PostgreSQL ERROR inside it into a Rust panic and back.
    unsafe {
        pg_sys::ffi::pg_guard_ffi_boundary(|| {
            #[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15", feature = "pg16"))]
            LogLogicalMessage(
                PREFIX.as_ptr(),
                envelope.as_ptr().cast(),
                envelope.len(),
                true,
            );
            #[cfg(any(feature = "pg17", feature = "pg18"))]
            LogLogicalMessage(
                PREFIX.as_ptr(),
                envelope.as_ptr().cast(),
                envelope.len(),
                true,
                false,
            );
        })
    }
}

thread_local! {
    static INSERT_EVENT: OnceCell<OwnedPreparedStatement> = const { OnceCell::new() };
}

const INSERT_SQL: &str = "INSERT INTO outbox.events \
     (id, topic, key, headers, payload, payload_is_json, trace_context) \
     VALUES ($1, $2, $3, $4::pg_catalog.jsonb, $5, $6, $7)";

fn insert_row(
    id: pgrx::Uuid,
    topic: &str,
    event: &NewEvent,
    headers: &Headers,
    trace: Option<&str>,
) {
    let headers = std::str::from_utf8(headers.text).unwrap_or("{}");
    as_owner(|| {
        Spi::connect_mut(|client| {
            INSERT_EVENT.with(|cell| {
                let plan = match cell.get() {
                    Some(plan) => plan,
                    None => {
                        let types = [
                            PgOid::from(pg_sys::UUIDOID),
                            PgOid::from(pg_sys::TEXTOID),
                            PgOid::from(pg_sys::TEXTOID),
                            PgOid::from(pg_sys::TEXTOID),
                            PgOid::from(pg_sys::BYTEAOID),
                            PgOid::from(pg_sys::BOOLOID),
                            PgOid::from(pg_sys::TEXTOID),
                        ];
                        let plan = client
                            .prepare_mut(INSERT_SQL, &types)
                            .unwrap_or_else(|e| error!("pg_outbox: cannot prepare insert: {e}"))
                            .keep();
                        let _ = cell.set(plan);
                        cell.get().expect("just set")
                    }
                };
                let args: [DatumWithOid; 7] = [
                    id.into(),
                    topic.into(),
                    event.key.into(),
                    headers.into(),
                    event.payload.into(),
                    event.payload_is_json.into(),
                    trace.into(),
                ];
                client
                    .update(plan, None, &args)
                    .unwrap_or_else(|e| error!("pg_outbox: cannot insert into outbox.events: {e}"));
            })
        })
    });
}

/// A sealing key: its id (`outbox.auth_key.key_id`) and the key.
#[derive(Clone, Copy)]
struct SealKey {
    id: u16,
    key: [u8; AUTH_KEY_LEN],
}

thread_local! {
    /// This database's newest sealing key, read once per backend (as the owner: writers cannot read
    /// it), with the oid of the `outbox.auth_key` it was read from. Dropped by [`forget_auth_key`]
    /// when that table's relation cache entry is invalidated: `outbox.rotate_auth_key()` sends one.
    static AUTH_KEY: Cell<Option<(pg_sys::Oid, SealKey)>> = const { Cell::new(None) };
}

/// Drops the cached key when `outbox.auth_key` (or every relation) is invalidated: a rotation
/// committed. The backend takes invalidations at the start of each transaction, so every
/// transaction that starts after the rotation commits seals with the new key.
#[pg_guard]
unsafe extern "C-unwind" fn forget_auth_key(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    if let Some((cached, _)) = AUTH_KEY.get() {
        if relid == pg_sys::InvalidOid || relid == cached {
            AUTH_KEY.set(None);
        }
    }
}

/// Registers [`forget_auth_key`] (once per backend, from `_PG_init`).
pub fn register_key_invalidation() {
    // SAFETY: called once per backend at library load; the callback only touches a thread-local.
    unsafe { pg_sys::CacheRegisterRelcacheCallback(Some(forget_auth_key), pg_sys::Datum::from(0)) }
}

/// The oid of `outbox.auth_key` now. DROP and CREATE EXTENSION make a new table with a new key, so
/// a key cached from another oid is stale: read again, instead of sealing with the old key (the
/// relay would dead-letter every such event and the writer would be told nothing). Two syscache
/// lookups, no name resolution through the caller's path.
fn auth_key_table() -> pg_sys::Oid {
    // SAFETY: both take a NUL-terminated name and only read the catalog caches.
    unsafe {
        let schema = pg_sys::get_namespace_oid(c"outbox".as_ptr(), true);
        if schema == pg_sys::InvalidOid {
            return pg_sys::InvalidOid;
        }
        pg_sys::get_relname_relid(c"auth_key".as_ptr(), schema)
    }
}

fn auth_key() -> SealKey {
    let table = auth_key_table();
    if let Some((cached_table, key)) = AUTH_KEY.get() {
        if cached_table == table {
            return key;
        }
    }
    let key = as_owner(|| {
        Spi::get_two::<i32, Vec<u8>>(
            "SELECT k.key_id, k.key FROM outbox.auth_key k ORDER BY k.key_id DESC LIMIT 1",
        )
        .unwrap_or_else(|e| error!("pg_outbox: cannot read outbox.auth_key: {e}"))
    });
    let key = match key {
        (Some(id), Some(key)) => u16::try_from(id)
            .ok()
            .zip(<[u8; AUTH_KEY_LEN]>::try_from(key).ok())
            .map(|(id, key)| SealKey { id, key }),
        _ => None,
    }
    .unwrap_or_else(|| error!("pg_outbox: outbox.auth_key holds no key of {AUTH_KEY_LEN} bytes"));
    AUTH_KEY.set(Some((table, key)));
    key
}

fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

thread_local! {
    /// The last event id of this backend: (Unix ms, its 10 bytes after the timestamp).
    static LAST_ID: std::cell::Cell<(u64, [u8; 10])> = const { std::cell::Cell::new((0, [0; 10])) };
}

/// A UUIDv7: the Unix time in milliseconds, then 74 random bits from PostgreSQL's strong random
/// source (with OpenSSL, a generator in user space: no system call per id, unlike the uuid crate's).
/// Ids of one backend increase: within one millisecond (or if the clock steps back) the previous
/// id's random part is counted up instead (RFC 9562, method 2). `now_micros` is the event's time.
fn new_event_id(now_micros: i64) -> uuid::Uuid {
    let now = (now_micros / 1000).max(0) as u64;
    let (last_ms, last_random) = LAST_ID.get();
    let (millis, random) = if now > last_ms {
        let mut random = [0u8; 10];
        // SAFETY: the buffer is valid for its length.
        if !unsafe { pg_sys::pg_strong_random(random.as_mut_ptr().cast(), random.len()) } {
            error!("pg_outbox: could not generate random bytes for an event id");
        }
        // leave headroom in the low 32 bits so that counting up within a millisecond never wraps
        random[6] &= 0x7f;
        (now, random)
    } else {
        let mut random = last_random;
        let low = u32::from_be_bytes([random[6], random[7], random[8], random[9]]).wrapping_add(1);
        random[6..].copy_from_slice(&low.to_be_bytes());
        (last_ms, random)
    };
    LAST_ID.set((millis, random));
    uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid()
}

/// The envelope of one event (borrowing everything; encoding validates it again).
fn as_envelope<'e>(
    id: &uuid::Uuid,
    created_at_micros: i64,
    topic: &'e str,
    event: &NewEvent<'e>,
    headers: &[(&'e str, &'e [u8])],
    trace: Option<&'e str>,
) -> Event<'e> {
    Event {
        id: *id.as_bytes(),
        created_at_micros,
        topic,
        key: event.key,
        headers: headers.to_vec(),
        trace_context: trace,
        payload_is_json: event.payload_is_json,
        payload: event.payload,
    }
}

fn unencodable(e: pg_outbox_envelope::EncodeError) -> Refusal {
    invalid(
        format!("pg_outbox: event cannot be encoded: {e}"),
        "See docs/sql-api.md, \"Envelope format\", for the limits.",
    )
}

/// Validates every event (the same rules in both modes), then writes them all. Returns the new
/// event ids in input order.
pub fn enqueue_events(events: &[NewEvent], headers: Option<&JsonbText>) -> Vec<pgrx::Uuid> {
    let headers = Headers::parse(headers).or_raise();
    let pairs = headers.pairs().or_raise();
    let pairs: Vec<(&str, &[u8])> = pairs.iter().map(|(n, v)| (*n, v.as_slice())).collect();
    let trace = trace_context();
    let envelope = |id: &uuid::Uuid, created_at_micros, topic, event| {
        as_envelope(
            id,
            created_at_micros,
            topic,
            event,
            &pairs,
            trace.as_deref(),
        )
    };
    let header_bytes = pairs.iter().map(|(n, v)| n.len() + v.len()).sum::<usize>()
        + trace.as_deref().map_or(0, |t| TRACE_HEADER.len() + t.len());
    let mut topics = Vec::with_capacity(events.len());
    for event in events {
        let topic = check_topic(event.topic).or_raise();
        check_record_size(
            event.payload.len(),
            event.key.map_or(0, str::len),
            header_bytes,
        )
        .or_raise();
        envelope(&uuid::Uuid::nil(), 0, topic, event)
            .validate()
            .map_err(unencodable)
            .or_raise();
        topics.push(topic);
    }
    let mode = gucs::MODE.get();
    // wal mode: the key and the transaction every message is sealed with
    let seal = (mode == Mode::Wal).then(|| {
        check_wal_ready().or_raise();
        // SAFETY: assigns the top-level transaction id if there is none yet, as the transactional
        // logical message written below would. The full id (epoch and xid): see the envelope's seal.
        let xid = unsafe { pg_sys::GetTopFullTransactionId() }.value;
        (auth_key(), xid)
    });
    let mut ids = Vec::with_capacity(events.len());
    let mut buf = Vec::new();
    for (event, topic) in events.iter().zip(topics) {
        let created_at_micros = now_micros();
        let id = new_event_id(created_at_micros);
        let pg_id = pgrx::Uuid::from_bytes(*id.as_bytes());
        match &seal {
            Some((key, xid)) => {
                buf.clear();
                envelope(&id, created_at_micros, topic, event)
                    .encode_into(&mut buf)
                    .map_err(unencodable)
                    .or_raise();
                pg_outbox_envelope::seal(&mut buf, 0, key.id, &key.key, *xid);
                write_wal_message(&buf);
            }
            None => insert_row(pg_id, topic, event, &headers, trace.as_deref()),
        }
        ids.push(pg_id);
    }
    ids
}

#[pg_schema]
mod outbox {
    use super::{enqueue_events, NewEvent};
    use pgrx::prelude::*;

    // The enqueue functions are the hot path and, unlike every other function of the extension,
    // do not pin search_path with a SET clause: wal mode resolves no names, and table mode's
    // INSERT (schema-qualified, typed, prepared once) runs as the owner under a search_path that
    // owner.rs pins for that statement only. A SET clause would cost every call a GUC save and
    // restore and the caller a search-path recomputation. For the same reason `enqueue` comes as two
    // overloads instead of a DEFAULT for headers, which PostgreSQL would expand on every call.

    /// `outbox.enqueue_bytes(topic, key, payload bytea, headers)`: an opaque-bytes event.
    #[pg_extern(volatile, parallel_unsafe)]
    fn enqueue_bytes(
        topic: Option<&str>,
        key: Option<&str>,
        payload: Option<&[u8]>,
        headers: default!(Option<super::JsonbText>, "'{}'"),
    ) -> pgrx::Uuid {
        let event = NewEvent {
            topic,
            key,
            payload: payload.unwrap_or_else(|| super::null_payload()),
            payload_is_json: false,
        };
        enqueue_events(&[event], headers.as_ref())[0]
    }

    /// `outbox._auth_keys_changed()`: tells every backend, when this transaction commits, to drop
    /// its cached sealing key (a relation cache invalidation of `outbox.auth_key`, taking no lock:
    /// writers holding the key table open do not hold up a rotation). Called by
    /// `outbox.rotate_auth_key()`.
    #[pg_extern(volatile, parallel_unsafe)]
    #[search_path(pg_catalog, pg_temp)]
    fn _auth_keys_changed() {
        let table = super::auth_key_table();
        if table != pg_sys::InvalidOid {
            // SAFETY: registers a transactional invalidation message for an existing relation oid
            unsafe { pg_sys::CacheInvalidateRelcacheByRelid(table) };
        }
    }

    /// `outbox._slot_name()`: the current `pg_outbox.slot_name`. SQL functions read settings through
    /// this rather than `current_setting`, which also loads the library so the setting is defined.
    #[pg_extern(stable, parallel_safe)]
    #[search_path(pg_catalog, pg_temp)]
    fn _slot_name() -> String {
        crate::gucs::SLOT_NAME
            .get()
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_else(|| "pg_outbox".into())
    }

    /// `outbox.enqueue(topic, key, payload jsonb, headers jsonb)`: a JSON event, its payload the
    /// jsonb's text form. A C function rather than a SQL wrapper, which would be planned per call.
    #[pg_extern(volatile, parallel_unsafe)]
    fn enqueue(
        topic: Option<&str>,
        key: Option<&str>,
        payload: Option<super::JsonbText>,
        headers: Option<super::JsonbText>,
    ) -> pgrx::Uuid {
        let payload = payload.unwrap_or_else(|| super::null_payload());
        let event = NewEvent {
            topic,
            key,
            payload: &payload.0,
            payload_is_json: true,
        };
        enqueue_events(&[event], headers.as_ref())[0]
    }

    /// `outbox.enqueue(topic, key, payload jsonb)`: the same without headers.
    #[pg_extern(volatile, parallel_unsafe, name = "enqueue")]
    fn enqueue_without_headers(
        topic: Option<&str>,
        key: Option<&str>,
        payload: Option<super::JsonbText>,
    ) -> pgrx::Uuid {
        enqueue(topic, key, payload, None)
    }

    /// Backs `outbox.enqueue_batch`: one topic, aligned arrays of keys and JSON payloads.
    #[pg_extern(volatile, parallel_unsafe)]
    fn _enqueue_batch_json(
        topic: Option<&str>,
        keys: Option<Array<&str>>,
        payloads: Option<Array<&str>>,
        headers: Option<super::JsonbText>,
    ) -> Vec<pgrx::Uuid> {
        let Some(payloads) = payloads else {
            super::null_payload();
        };
        let payloads: Vec<Option<&str>> = payloads.iter().collect();
        let keys: Vec<Option<&str>> = match &keys {
            Some(keys) => keys.iter().collect(),
            None => vec![None; payloads.len()],
        };
        if keys.len() != payloads.len() {
            super::invalid(
                format!(
                    "pg_outbox: {} keys but {} payloads",
                    keys.len(),
                    payloads.len()
                ),
                "keys and payloads are matched by position; pass arrays of the same length (keys may be NULL).",
            )
            .raise();
        }
        let events: Vec<NewEvent> = keys
            .iter()
            .zip(&payloads)
            .map(|(key, payload)| NewEvent {
                topic,
                key: *key,
                payload: payload
                    .map(str::as_bytes)
                    .unwrap_or_else(|| super::null_payload()),
                payload_is_json: true,
            })
            .collect();
        enqueue_events(&events, headers.as_ref())
    }
}

fn null_payload() -> ! {
    Refusal::new(
        PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
        "pg_outbox: payload must not be NULL",
        "Pass an empty object '{}' (or '' for bytes) for an event without data.",
    )
    .raise()
}
