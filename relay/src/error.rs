//! One error type for the relay, classified where it is made.
//!
//! - [`Kind::Transient`]: the session ends, the relay reconnects with backoff and resumes from the
//!   durable position (connection lost, broker unreachable, a server error retrying can fix).
//! - [`Kind::Permanent`]: retrying cannot help (bad configuration, a missing or invalidated slot);
//!   the relay stops with a message that says what to fix.
//! - [`Kind::Event`]: this one event can never be published (a record the broker refuses as too
//!   large, an undecodable envelope); it is dead-lettered and the stream goes on.
//!
//! Causes are kept as sources, never flattened into strings.

use std::fmt;

/// What the relay does about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Transient,
    Permanent,
    Event,
}

type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug)]
pub struct RelayError {
    kind: Kind,
    context: String,
    source: Option<Cause>,
    /// Another relay holds the source (its slot or its lock): this one stands by.
    standby: Option<String>,
    /// The row of `outbox.sources` whose incarnation must stay stopped (see [`RelayError::verdict`]).
    verdict: Option<String>,
    /// For a verdict that Kafka is ahead of the database: the major part of the highest position
    /// found, checked again against the database before the verdict is stored.
    ahead: Option<u64>,
    /// A bad setting ([`RelayError::config`]).
    config: bool,
}

/// Exit status of a configuration error (a bad or missing setting; clap's usage errors too).
pub const CONFIG_ERROR: u8 = 2;
/// Exit status when an operator must act: retrying cannot help (a lost slot, Kafka ahead of the
/// database, a wrong identity, a refused login, a missing database). systemd's
/// `RestartPreventExitStatus=3` keeps a restart policy from looping on it.
pub const OPERATOR_MUST_ACT: u8 = 3;

/// The context, then every cause in the chain (a client library's error often says only "db
/// error" and keeps the server's message in its own source).
impl fmt::Display for RelayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.context)?;
        let mut cause: Option<&(dyn std::error::Error + 'static)> = self
            .source
            .as_deref()
            .map(|c| c as &(dyn std::error::Error + 'static));
        while let Some(c) = cause {
            write!(f, ": {c}")?;
            cause = c.source();
        }
        Ok(())
    }
}

impl std::error::Error for RelayError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|c| c as &(dyn std::error::Error + 'static))
    }
}

impl RelayError {
    pub fn new(kind: Kind, context: impl Into<String>) -> RelayError {
        RelayError {
            kind,
            context: context.into(),
            source: None,
            standby: None,
            verdict: None,
            ahead: None,
            config: false,
        }
    }

    /// The process's exit status for this error: [`CONFIG_ERROR`] for a bad setting,
    /// [`OPERATOR_MUST_ACT`] for any other permanent error, 1 for the rest.
    pub fn exit_code(&self) -> u8 {
        match self.kind {
            Kind::Permanent if self.config => CONFIG_ERROR,
            Kind::Permanent => OPERATOR_MUST_ACT,
            Kind::Transient | Kind::Event => 1,
        }
    }

    /// Permanent, and a verdict about the source `source` (a row of `outbox.sources`): the relay
    /// records it there before it stops, and every relay refuses that incarnation from then on.
    pub fn verdict(source: impl Into<String>, context: impl Into<String>) -> RelayError {
        RelayError {
            verdict: Some(source.into()),
            ..RelayError::permanent(context)
        }
    }

    /// A verdict that Kafka holds records of `source` at positions up to `major`, beyond anything
    /// the database had committed when the session opened. Before it is stored, the relay asks the
    /// database again ([`RelayError::ahead_of`]): a session that was paused or superseded meanwhile
    /// opened long ago, and another relay's records written since are no sign of a database that
    /// went back in time.
    pub fn ahead(source: impl Into<String>, major: u64, context: impl Into<String>) -> RelayError {
        RelayError {
            ahead: Some(major),
            ..RelayError::verdict(source, context)
        }
    }

    /// The highest position's major part of an [`RelayError::ahead`] verdict.
    pub fn ahead_of(&self) -> Option<u64> {
        self.ahead
    }

    /// The source this error is a stored verdict about, if it is one.
    pub fn verdict_source(&self) -> Option<&str> {
        self.verdict.as_deref()
    }

    /// Another relay holds the source; `holder` says which (for logs, `/healthz` and `status`).
    pub fn standby(holder: impl Into<String>) -> RelayError {
        let holder = holder.into();
        RelayError {
            standby: Some(holder.clone()),
            ..RelayError::transient(format!("standing by: {holder}"))
        }
    }

    /// Who holds the source, when this relay stands by.
    pub fn standby_holder(&self) -> Option<&str> {
        self.standby.as_deref()
    }

    /// A bad setting: names the setting and what to do.
    pub fn config(context: impl Into<String>) -> RelayError {
        RelayError {
            config: true,
            ..RelayError::new(
                Kind::Permanent,
                format!("configuration: {}", context.into()),
            )
        }
    }

    pub fn transient(context: impl Into<String>) -> RelayError {
        RelayError::new(Kind::Transient, context)
    }

    pub fn permanent(context: impl Into<String>) -> RelayError {
        RelayError::new(Kind::Permanent, context)
    }

    /// Keeps `cause` as the source of this error.
    pub fn caused_by(
        mut self,
        cause: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> RelayError {
        self.source = Some(cause.into());
        self
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Retrying cannot help: stop and tell the operator.
    pub fn is_permanent(&self) -> bool {
        self.kind == Kind::Permanent
    }

    /// The SQLSTATE of the PostgreSQL error behind this one, if any.
    pub fn sqlstate(&self) -> Option<String> {
        let cause = self.source.as_deref()?;
        if let Some(e) = cause.downcast_ref::<tokio_postgres::Error>() {
            return e.code().map(|c| c.code().to_string());
        }
        if let Some(e) = cause.downcast_ref::<pgwire_replication::PgWireError>() {
            return wire_sqlstate(e).map(str::to_string);
        }
        None
    }
}

/// The SQLSTATE of a server error on the replication connection: pgwire-replication keeps only the
/// text, which ends in `(SQLSTATE XXXXX)`.
fn wire_sqlstate(e: &pgwire_replication::PgWireError) -> Option<&str> {
    let pgwire_replication::PgWireError::Server(text) = e else {
        return None;
    };
    let code = text.rsplit_once("(SQLSTATE ")?.1.strip_suffix(')')?;
    (code.len() == 5).then_some(code)
}

impl From<tokio_postgres::Error> for RelayError {
    fn from(e: tokio_postgres::Error) -> Self {
        RelayError::transient("postgres").caused_by(e)
    }
}

impl From<rdkafka::error::KafkaError> for RelayError {
    fn from(e: rdkafka::error::KafkaError) -> Self {
        RelayError::transient("kafka").caused_by(e)
    }
}

/// A refused login (class 28) or a missing database (`3D000`) stops the relay. Slot errors are
/// recognised by SQLSTATE: `42704` (the slot does not exist) and `55000` (it was
/// invalidated and can no longer stream). Re-creating the slot would skip events, so both stop the
/// relay. `55006` (the slot is held by another relay) makes this one stand by; anything else on
/// the replication connection is transient.
impl From<pgwire_replication::PgWireError> for RelayError {
    fn from(e: pgwire_replication::PgWireError) -> Self {
        if e.is_auth() {
            return RelayError::permanent(
                "the replication connection's login was refused: check pg_user and pg_password",
            )
            .caused_by(e);
        }
        if let pgwire_replication::PgWireError::Tls(_) = &e {
            return RelayError::permanent(
                "the replication connection's TLS failed: check pg_sslmode, pg_sslrootcert, \
                 pg_sslcert, pg_sslkey and pg_host",
            )
            .caused_by(e);
        }
        match wire_sqlstate(&e) {
            Some(code) if code.starts_with("28") || code == "3D000" => RelayError::permanent(
                "the replication connection was refused: check pg_user, pg_password and pg_database",
            )
            .caused_by(e),
            Some("42704") | Some("55000") => RelayError::permanent(
                "replication slot is missing or invalidated; events it retained may be lost: \
                 the relay stops, and says on its next start which WAL range and what to do",
            )
            .caused_by(e),
            // another relay took the slot between this one's look and its start
            Some("55006") => RelayError::standby(format!("the slot is in use ({e})")),
            _ => RelayError::transient("replication stream").caused_by(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgwire_replication::PgWireError;

    #[test]
    fn exit_codes_say_who_must_act() {
        assert_eq!(RelayError::config("x").exit_code(), CONFIG_ERROR);
        assert_eq!(
            RelayError::verdict("s", "ahead").exit_code(),
            OPERATOR_MUST_ACT
        );
        let gone = RelayError::from(PgWireError::Server(
            "replication slot \"x\" does not exist (SQLSTATE 42704)".into(),
        ));
        assert_eq!(gone.exit_code(), OPERATOR_MUST_ACT);
        let login = RelayError::from(PgWireError::Server(
            "password authentication failed (SQLSTATE 28P01)".into(),
        ));
        assert_eq!(login.exit_code(), OPERATOR_MUST_ACT);
        assert_eq!(RelayError::transient("x").exit_code(), 1);
        assert_eq!(RelayError::standby("h").exit_code(), 1);
    }

    #[test]
    fn slot_errors_are_recognised_by_sqlstate() {
        let gone = RelayError::from(PgWireError::Server(
            "replication slot \"x\" does not exist (SQLSTATE 42704)".into(),
        ));
        assert!(gone.is_permanent(), "{gone}");
        assert_eq!(gone.sqlstate().as_deref(), Some("42704"));
        let busy = RelayError::from(PgWireError::Server(
            "replication slot \"x\" is active for PID 7 (SQLSTATE 55006)".into(),
        ));
        assert_eq!(busy.kind(), Kind::Transient);
        assert!(
            busy.standby_holder().is_some_and(|h| h.contains("PID 7")),
            "{busy}"
        );
        // the text alone decides nothing
        let text = RelayError::from(PgWireError::Server(
            "replication slot does not exist".into(),
        ));
        assert_eq!(text.kind(), Kind::Transient);
        let io = RelayError::from(PgWireError::Protocol("eof".into()));
        assert_eq!(io.kind(), Kind::Transient);
        assert!(std::error::Error::source(&io).is_some(), "cause kept");
    }
}
