//! One error type for the relay. Each error is classified where it is made: transient errors
//! (connection lost, broker unreachable) make the relay reconnect with backoff and resume from the
//! slot's confirmed position; permanent ones (bad configuration, missing or invalidated slot) stop
//! it with a message that says what to fix.

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("replication slot: {0}")]
    Slot(String),
    #[error("postgres: {0}")]
    Postgres(String),
    #[error("replication stream: {0}")]
    Replication(String),
    #[error("kafka: {0}")]
    Kafka(String),
}

impl RelayError {
    /// Retrying cannot help: stop and tell the operator.
    pub fn is_permanent(&self) -> bool {
        matches!(self, RelayError::Config(_) | RelayError::Slot(_))
    }
}

impl From<tokio_postgres::Error> for RelayError {
    fn from(e: tokio_postgres::Error) -> Self {
        match e.as_db_error() {
            Some(db) => {
                RelayError::Postgres(format!("{} (SQLSTATE {})", db.message(), db.code().code()))
            }
            None => RelayError::Postgres(e.to_string()),
        }
    }
}

impl From<rdkafka::error::KafkaError> for RelayError {
    fn from(e: rdkafka::error::KafkaError) -> Self {
        RelayError::Kafka(e.to_string())
    }
}

impl From<pgwire_replication::PgWireError> for RelayError {
    fn from(e: pgwire_replication::PgWireError) -> Self {
        let text = e.to_string();
        // The server says so when the slot is gone or unusable; re-creating it would skip events.
        if text.contains("replication slot")
            && (text.contains("does not exist")
                || text.contains("invalidated")
                || text.contains("can no longer"))
        {
            RelayError::Slot(format!(
                "{text}; the slot is missing or invalidated. Events it retained may be lost: \
                 compare the outbox with Kafka, then recreate it with CALL outbox.setup()"
            ))
        } else {
            RelayError::Replication(text)
        }
    }
}
