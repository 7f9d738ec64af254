//! `JsonbText`: a `jsonb` argument of a `#[pg_extern]` function, received as its canonical text.
//!
//! Invariants:
//! - The bytes are exactly what `jsonb_out` prints for the datum (PostgreSQL's canonical form); they
//!   are never parsed into a serde value and printed again, so numbers keep their full precision and
//!   the text is the same as `jsonb::text` in SQL.
//! - Argument only (`arg_only`): SQL NULL arrives as `None` with `Option<JsonbText>`; a NULL for a
//!   non-`Option` argument raises an error instead of reaching the function.
//! - The text is copied out of PostgreSQL's memory and the palloc'd original freed at once, so the
//!   value lives as long as the Rust value, independent of memory contexts.

use pgrx::prelude::*;

/// A `jsonb` argument as its canonical text, straight from `jsonb_out`. (pgrx's `JsonB` would
/// parse that text into a serde value, which also loses numeric precision, and print it again.)
pub struct JsonbText(pub Vec<u8>);

impl FromDatum for JsonbText {
    unsafe fn from_polymorphic_datum(
        datum: pg_sys::Datum,
        is_null: bool,
        _: pg_sys::Oid,
    ) -> Option<JsonbText> {
        if is_null {
            return None;
        }
        // SAFETY: the datum is a jsonb (the SQL signature says so); jsonb_out detoasts it and
        // returns a palloc'd C string, which is copied and freed here.
        unsafe {
            let text =
                pgrx::direct_function_call::<&std::ffi::CStr>(pg_sys::jsonb_out, &[Some(datum)])?;
            let bytes = text.to_bytes().to_vec();
            pg_sys::pfree(text.as_ptr().cast_mut().cast());
            Some(JsonbText(bytes))
        }
    }
}

impl_sql_translatable!(JsonbText, arg_only = "jsonb");

// SAFETY: unboxed through FromDatum above, like pgrx's own JsonB.
unsafe impl<'fcx> pgrx::callconv::ArgAbi<'fcx> for JsonbText {
    unsafe fn unbox_arg_unchecked(arg: pgrx::callconv::Arg<'_, 'fcx>) -> Self {
        let index = arg.index();
        // SAFETY: the caller guarantees a non-null jsonb argument.
        unsafe { arg.unbox_arg_using_from_datum() }
            .unwrap_or_else(|| panic!("argument {index} must not be null"))
    }

    unsafe fn unbox_nullable_arg(
        arg: pgrx::callconv::Arg<'_, 'fcx>,
    ) -> pgrx::nullable::Nullable<Self> {
        // SAFETY: as above; a null argument gives None.
        unsafe { arg.unbox_arg_using_from_datum() }.into()
    }
}
