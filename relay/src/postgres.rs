//! The relay's PostgreSQL connections: one way to open a session, used by the sources, the dead
//! letters, ingest and `check`/`status`. (The WAL source's replication connection is separate.)

use crate::config::PgConfig;
use crate::error::RelayError;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{Client, Connection, Socket};
use tracing::warn;

/// The connection, not yet driven: for a caller that reads its notifications itself.
pub type Driver = Connection<
    Socket,
    <tokio_postgres_rustls::MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream,
>;

/// Opens a session (over TLS as `pg_sslmode` says) and hands back its connection to be driven.
pub async fn open(config: &PgConfig) -> Result<(Client, Driver), RelayError> {
    let mut pg: tokio_postgres::Config = config
        .conninfo()
        .parse()
        .map_err(|e| RelayError::config("PostgreSQL connection settings").caused_by(e))?;
    pg.ssl_mode(config.tls.session_mode());
    pg.connect(config.tls.connector())
        .await
        .map_err(|e| connect_error(config, e))
}

/// A refused login or a missing database will not fix itself: the relay stops and names the
/// setting. A server that is unreachable or starting up is worth retrying.
fn connect_error(config: &PgConfig, e: tokio_postgres::Error) -> RelayError {
    let code = e.code().map(|c| c.code().to_string()).unwrap_or_default();
    if let Some(tls) = crate::tls::tls_failure(&e) {
        return RelayError::permanent(format!(
            "postgres {}:{}: TLS failed ({tls}): check pg_sslmode, pg_sslrootcert and pg_host \
             (verify-full checks pg_host against the server's certificate)",
            config.host, config.port
        ))
        .caused_by(e);
    }
    let context = match code.as_str() {
        c if c.starts_with("28") => Some(format!(
            "postgres {}:{} refused the login of role {:?}: check pg_user, pg_password and \
             pg_sslmode (a server may accept some roles over TLS only)",
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
