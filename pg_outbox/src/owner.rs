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
    let owner = Spi::get_one::<pg_sys::Oid>(
        "SELECT relowner FROM pg_catalog.pg_class WHERE oid = 'outbox.events'::pg_catalog.regclass",
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

/// Runs `f` as the owner of `outbox.events`.
pub fn as_owner<R>(f: impl FnOnce() -> R) -> R {
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
