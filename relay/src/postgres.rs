//! The relay's PostgreSQL connections: one way to open a session, used by the sources, the dead
//! letters, ingest and `check`/`status`. (The WAL source's replication connection is separate.)

use crate::config::PgConfig;
use crate::error::RelayError;
use tokio_postgres::{Client, Connection, Socket};
use tracing::warn;

/// The connection, not yet driven: for a caller that reads its notifications itself.
pub type Driver = Connection<Socket, tokio_postgres::tls::NoTlsStream>;

/// Opens a session and hands back its connection to be driven.
pub async fn open(config: &PgConfig) -> Result<(Client, Driver), RelayError> {
    tokio_postgres::connect(&config.conninfo(), tokio_postgres::NoTls)
        .await
        .map_err(|e| connect_error(config, e))
}

/// A refused login or a missing database will not fix itself: the relay stops and names the
/// setting. A server that is unreachable or starting up is worth retrying.
fn connect_error(config: &PgConfig, e: tokio_postgres::Error) -> RelayError {
    let code = e.code().map(|c| c.code().to_string()).unwrap_or_default();
    let context = match code.as_str() {
        c if c.starts_with("28") => Some(format!(
            "postgres {}:{} refused the login of role {:?}: check pg_user and pg_password",
            config.host, config.port, config.user
        )),
        "3D000" => Some(format!(
            "postgres {}:{} has no database {:?}: check pg_database",
            config.host, config.port, config.database
        )),
        _ => None,
    };
    match context {
        Some(context) => RelayError::permanent(context).caused_by(e),
        None => RelayError::transient(format!(
            "postgres {}:{} database {:?}",
            config.host, config.port, config.database
        ))
        .caused_by(e),
    }
}

/// Opens a session; its connection task ends (and logs why) when the session is lost.
pub async fn connect(config: &PgConfig) -> Result<Client, RelayError> {
    let (client, connection) = open(config).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            warn!(error = %e, "postgres connection closed");
        }
    });
    Ok(client)
}
