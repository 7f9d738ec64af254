//! Every user mistake ends here as an `ERROR` with a real SQLSTATE, a message that says what is wrong
//! and a hint that says what to do. The codes are listed in docs/sql-api.md ("Errors").

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;

/// A refusal: SQLSTATE, message and hint.
pub struct Refusal {
    pub code: PgSqlErrorCode,
    pub message: String,
    pub hint: String,
}

impl Refusal {
    pub fn new(code: PgSqlErrorCode, message: impl Into<String>, hint: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
            hint: hint.into(),
        }
    }

    /// Raises the error; PostgreSQL aborts the statement (or rolls back to the enclosing savepoint).
    pub fn raise(self) -> ! {
        ErrorReport::new(self.code, self.message, "pg_outbox")
            .set_hint(self.hint)
            .report(PgLogLevel::ERROR);
        unreachable!("ERROR does not return")
    }
}

/// Raises the refusal if there is one.
pub trait OrRaise<T> {
    fn or_raise(self) -> T;
}

impl<T> OrRaise<T> for Result<T, Refusal> {
    fn or_raise(self) -> T {
        match self {
            Ok(v) => v,
            Err(refusal) => refusal.raise(),
        }
    }
}
