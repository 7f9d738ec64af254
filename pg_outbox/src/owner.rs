//! Acting as the extension's owner for the two things a writer must not do directly: insert into
//! `outbox.events` (table mode) and read the key that seals wal-mode messages.
//!
//! Invariants:
//! - `outbox_writer` has no privilege on `outbox.events` or `outbox.auth_key`; `outbox.enqueue*`
//!   validates an event and then performs exactly one fixed, schema-qualified statement as the
//!   owner of `outbox.events` (the role that ran `CREATE EXTENSION`, which need not be a superuser).
//! - The switch is `SetUserIdAndSecContext` with `SECURITY_LOCAL_USERID_CHANGE`, the mechanism of
//!   SECURITY DEFINER functions, scoped to that one statement: a guard restores the caller's
//!   identity on return and on unwind, and PostgreSQL's (sub)transaction abort restores it too.
//! - Nothing that runs as the owner, or that chooses the owner, resolves a name through the
//!   caller's `search_path` (CVE-2018-1058): `search_path` is pinned to `pg_catalog, pg_temp` for
//!   the duration, as a `SET search_path` clause would, and the statements name every type,
//!   operator and table with its schema besides. A temporary domain named `jsonb` or an `=` operator
//!   in a schema the caller owns is never looked at.
//! - The owner is the NOLOGIN role `outbox_owner` (sql/extension.sql), which owns `outbox.events` and
//!   `outbox.auth_key` and nothing else: even a hole in the above is not a superuser hole.

use pgrx::prelude::*;
use std::cell::Cell;

thread_local! {
    static OWNER: Cell<pg_sys::Oid> = const { Cell::new(pg_sys::InvalidOid) };
}

/// The role that owns `outbox.events`, looked up once per backend.
fn owner() -> pg_sys::Oid {
    let cached = OWNER.get();
    if cached != pg_sys::InvalidOid {
        return cached;
    }
    // called only inside as_owner's pinned search_path, before the switch
    let owner = Spi::get_one::<pg_sys::Oid>(
        "SELECT c.relowner FROM pg_catalog.pg_class c \
          WHERE c.oid OPERATOR(pg_catalog.=) 'outbox.events'::pg_catalog.regclass",
    )
    .unwrap_or_else(|e| error!("pg_outbox: cannot find the owner of outbox.events: {e}"))
    .unwrap_or_else(|| error!("pg_outbox: outbox.events has no owner"));
    OWNER.set(owner);
    owner
}

/// Restores the caller's identity when dropped.
struct Restore {
    user: pg_sys::Oid,
    context: i32,
}

impl Drop for Restore {
    fn drop(&mut self) {
        // SAFETY: restores exactly what GetUserIdAndSecContext returned.
        unsafe { pg_sys::SetUserIdAndSecContext(self.user, self.context) }
    }
}

/// Ends the pinned `search_path` of [`with_pinned_search_path`] when dropped on the normal path. On
/// an error (a PostgreSQL ERROR unwinding as a panic) the (sub)transaction's abort pops the GUC
/// nest level, as it does for a SECURITY DEFINER function's `SET` clause.
struct PinnedPath {
    nest_level: i32,
}

impl Drop for PinnedPath {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            // SAFETY: pops exactly the nest level NewGUCNestLevel gave, restoring the caller's path.
            unsafe { pg_sys::AtEOXact_GUC(true, self.nest_level) }
        }
    }
}

/// Runs `f` with `search_path = pg_catalog, pg_temp` (pg_temp last: nothing temporary shadows a
/// catalog type or relation, and functions and operators are never looked up there).
fn with_pinned_search_path<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: the same calls as fmgr_security_definer's for a function's SET clause; the value is
    // a constant that is always valid, and `_pin` restores the previous value.
    let _pin = unsafe {
        let nest_level = pg_sys::NewGUCNestLevel();
        pg_sys::set_config_option(
            c"search_path".as_ptr(),
            c"pg_catalog, pg_temp".as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SAVE,
            true,
            PgLogLevel::ERROR as i32,
            false,
        );
        PinnedPath { nest_level }
    };
    f()
}

/// Runs `f` as the owner of `outbox.events`, with `search_path` pinned.
pub fn as_owner<R>(f: impl FnOnce() -> R) -> R {
    with_pinned_search_path(|| switch_to_owner(f))
}

fn switch_to_owner<R>(f: impl FnOnce() -> R) -> R {
    let owner = owner();
    let mut restore = Restore {
        user: pg_sys::InvalidOid,
        context: 0,
    };
    // SAFETY: plain reads and writes of the backend's current user; `restore` puts them back.
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut restore.user, &mut restore.context);
        pg_sys::SetUserIdAndSecContext(
            owner,
            restore.context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32,
        );
    }
    let result = f();
    drop(restore);
    result
}
