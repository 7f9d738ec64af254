//! The relay's PostgreSQL sessions: one way to open one, used by the sources, the dead letters,
//! ingest and `check`/`status`. (The WAL source's replication connection is pgwire-replication's;
//! it takes the same servers, credentials and TLS settings from [`PgConfig`].)

use super::config::{PgConfig, PgEndpoint};
use super::tls::{tls_failure, SslMode};
use crate::error::RelayError;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio_postgres::config::TargetSessionAttrs;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::{Client, Connection, Socket};
use tokio_postgres_rustls::MakeRustlsConnect;
use tracing::warn;

/// What this process's sessions call themselves (`application_name`), so that `status` and a
/// standing-by relay can say which relay is active: `pg_outbox_relay <pid>@<host>`.
pub fn application_name() -> &'static str {
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NAME.get_or_init(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default();
        let mut name = format!("pg_outbox_relay {}@{host}", std::process::id());
        // PostgreSQL keeps 63 bytes
        while name.len() > 63 {
            name.pop();
        }
        name
    })
}

/// Who holds this source's slot or lock, as `application_name (pid N from addr)`.
pub const HOLDER_SQL: &str = "pg_catalog.format('%s (pid %s%s)', \
     coalesce(nullif(a.application_name, ''), 'a client'), a.pid, \
     coalesce(' from ' || pg_catalog.host(a.client_addr), ''))";

/// What every session of the relay and the ingest resolves names with, whatever the login's or
/// the database's `search_path` says: a role that may create objects in a schema of that path
/// (`public`, often) could otherwise define a function or operator that matches a call better than
/// the built-in one, and have it run as the relay's role (CVE-2018-1058). `pg_temp` last, so that
/// no temporary object wins either. The relay's SQL names built-ins with `pg_catalog.` as well.
pub const SEARCH_PATH: &str = "pg_catalog, pg_temp";

/// The connection, not yet driven: for a caller that reads its notifications itself.
pub type Driver = Connection<
    Socket,
    <tokio_postgres_rustls::MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream,
>;

/// Opens a session (over TLS as `pg_sslmode` says) and hands back its connection to be driven.
pub async fn open(config: &PgConfig) -> Result<(Client, Driver), RelayError> {
    open_at(config)
        .await
        .map(|(client, driver, _)| (client, driver))
}

/// Opens a session with the first server that takes it (and accepts writes, unless
/// target_session_attrs is `any`), and says which server that is.
pub async fn open_at(config: &PgConfig) -> Result<(Client, Driver, &PgEndpoint), RelayError> {
    let mut failures = Vec::new();
    for at in &config.endpoints {
        match open_one(config, at).await {
            Ok((client, driver)) => return Ok((client, driver, at)),
            Err(e) if config.endpoints.len() == 1 => return Err(e),
            Err(e) => failures.push(e),
        }
    }
    // several servers: permanent only if every one refused for good
    let permanent = failures.iter().all(RelayError::is_permanent);
    let text: Vec<String> = failures.iter().map(ToString::to_string).collect();
    let context = format!("no server of {} took the session", config.servers());
    Err(if permanent {
        RelayError::permanent(format!("{context}: {}", text.join("; ")))
    } else {
        RelayError::transient(format!("{context}: {}", text.join("; ")))
    })
}

/// The settings of a session with server `at`, built directly from the resolved ones (nothing is
/// rendered to a connection string and parsed again).
pub fn session_config(config: &PgConfig, at: &PgEndpoint) -> tokio_postgres::Config {
    let mut pg = tokio_postgres::Config::new();
    // a host that starts with `/` is a Unix socket directory, as in libpq
    pg.host(&at.host)
        .port(at.port)
        .user(&config.user)
        .dbname(&config.database)
        .application_name(application_name())
        .ssl_mode(config.tls.session_mode())
        .connect_timeout(config.connect_timeout);
    if !at.password.is_empty() {
        pg.password(&at.password);
    }
    // a daemon's sessions are idle for long: the server must not end them (the poll source's lock
    // is held by one of them; see fence.rs). A setting sent at connect outranks ALTER ROLE and
    // ALTER DATABASE, so the pinned search_path holds from the session's first statement.
    pg.options(options(config));
    if config.read_write {
        pg.target_session_attrs(TargetSessionAttrs::ReadWrite);
    }
    pg
}

/// The startup `options` of every session, the replication connection's too: the user's (from
/// `pg_url`) first, then the relay's own, which win because a later `-c` of the same setting does.
pub fn options(config: &PgConfig) -> String {
    let own = format!(
        "-c idle_session_timeout=0 -c search_path={}",
        SEARCH_PATH.replace(' ', "")
    );
    match &config.options {
        Some(theirs) => format!("{theirs} {own}"),
        None => own,
    }
}

async fn open_one(config: &PgConfig, at: &PgEndpoint) -> Result<(Client, Driver), RelayError> {
    let pg = session_config(config, at);
    let tls = Arc::new(AtomicBool::new(false));
    let connector = Tracked {
        inner: config.tls.connector(),
        tls: tls.clone(),
    };
    let session = pg
        .connect(connector)
        .await
        .map_err(|e| connect_error(config, at, e))?;
    if config.tls.mode == SslMode::Prefer && !at.password.is_empty() && !tls.load(Ordering::Relaxed)
    {
        warn_cleartext_password(at);
    }
    Ok(session)
}

/// With `sslmode=prefer` (the default, as in libpq) a server, or whoever answers at its address,
/// may decline TLS; a configured password then goes out unencrypted whenever that server asks for
/// it (in the clear, or as an exchange that can be attacked offline). Said once per process: every
/// session of a relay goes to the same servers.
fn warn_cleartext_password(at: &PgEndpoint) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if !WARNED.swap(true, Ordering::Relaxed) {
        warn!(
            server = %format!("{}:{}", at.host, at.port),
            "postgres session without TLS (pg_sslmode = prefer and the server offered none) for a \
             login with a password: the password goes unencrypted to whoever answers at that \
             address. Set pg_sslmode = verify-full (with pg_sslrootcert) in production"
        );
    }
}

/// The rustls connector, noting whether the server took TLS: tokio-postgres hands the socket to
/// the TLS connector only after the server accepted TLS.
struct Tracked {
    inner: MakeRustlsConnect,
    tls: Arc<AtomicBool>,
}

type RustlsConnect = <MakeRustlsConnect as MakeTlsConnect<Socket>>::TlsConnect;

struct TrackedConnect {
    inner: RustlsConnect,
    tls: Arc<AtomicBool>,
}

impl MakeTlsConnect<Socket> for Tracked {
    type Stream = <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream;
    type TlsConnect = TrackedConnect;
    type Error = <MakeRustlsConnect as MakeTlsConnect<Socket>>::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<TrackedConnect, Self::Error> {
        Ok(TrackedConnect {
            inner: MakeTlsConnect::<Socket>::make_tls_connect(&mut self.inner, domain)?,
            tls: self.tls.clone(),
        })
    }
}

impl TlsConnect<Socket> for TrackedConnect {
    type Stream = <RustlsConnect as TlsConnect<Socket>>::Stream;
    type Error = <RustlsConnect as TlsConnect<Socket>>::Error;
    type Future = <RustlsConnect as TlsConnect<Socket>>::Future;

    fn connect(self, stream: Socket) -> Self::Future {
        self.tls.store(true, Ordering::Relaxed);
        self.inner.connect(stream)
    }
}

/// A refused login or a missing database will not fix itself: the relay stops and names the
/// setting. A server that is unreachable, starting up or a standby is worth retrying.
fn connect_error(config: &PgConfig, at: &PgEndpoint, e: tokio_postgres::Error) -> RelayError {
    let code = e.code().map(|c| c.code().to_string()).unwrap_or_default();
    let server = format!("postgres {}:{}", at.host, at.port);
    if let Some(tls) = tls_failure(&e) {
        return RelayError::permanent(format!(
            "{server}: TLS failed ({tls}): check pg_sslmode, pg_sslrootcert and pg_host \
             (verify-full checks pg_host against the server's certificate)"
        ))
        .caused_by(e);
    }
    if read_only(&e) {
        return RelayError::transient(format!(
            "{server} does not accept writes (a standby, or default_transaction_read_only): the \
             relay needs the primary; list every server in pg_host (or pg_url) to follow a failover"
        ));
    }
    let context = match code.as_str() {
        c if c.starts_with("28") => Some(format!(
            "{server} refused the login of role {:?}: check pg_user, pg_password and \
             pg_sslmode (a server may accept some roles over TLS only)",
            config.user
        )),
        "3D000" => Some(format!(
            "{server} has no database {:?}: check pg_database",
            config.database
        )),
        _ => None,
    };
    match context {
        Some(context) => RelayError::permanent(context).caused_by(e),
        None => {
            RelayError::transient(format!("{server} database {:?}", config.database)).caused_by(e)
        }
    }
}

/// tokio-postgres' refusal of a read-only server under target_session_attrs=read-write.
fn read_only(e: &tokio_postgres::Error) -> bool {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .is_some_and(|io| {
            io.kind() == std::io::ErrorKind::PermissionDenied
                && io.to_string().contains("does not allow writes")
        })
}

/// Opens a session; its connection task ends (and logs why) when the session is lost.
pub async fn connect(config: &PgConfig) -> Result<Client, RelayError> {
    connect_at(config).await.map(|(client, _)| client)
}

/// [`connect`], and which server took the session.
pub async fn connect_at(config: &PgConfig) -> Result<(Client, &PgEndpoint), RelayError> {
    let (client, connection, at) = open_at(config).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            warn!(error = %e, "postgres connection closed");
        }
    });
    Ok((client, at))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postgres::config::Given;
    use tokio_postgres::config::{Host, SslMode as S};

    #[test]
    fn session_settings_are_taken_as_given() {
        let given = Given {
            url: Some(
                "postgres://a:5433,b:5434/x?target_session_attrs=read-write&connect_timeout=3"
                    .into(),
            ),
            user: Some("o'neil \\ relay".into()),
            password: Some(r"it's a \secret".into()),
            database: Some("my db".into()),
            sslmode: Some("require".into()),
            ..Default::default()
        };
        let pg = PgConfig::resolve_with(given, &|_: &str| None).unwrap();
        let second = session_config(&pg, &pg.endpoints[1]);
        assert_eq!(second.get_hosts(), [Host::Tcp("b".into())]);
        assert_eq!(second.get_ports(), [5434]);
        assert_eq!(second.get_user(), Some("o'neil \\ relay"));
        assert_eq!(second.get_password(), Some(&br"it's a \secret"[..]));
        assert_eq!(second.get_dbname(), Some("my db"));
        assert_eq!(second.get_application_name(), Some(application_name()));
        assert_eq!(second.get_ssl_mode(), S::Require);
        assert_eq!(
            second.get_connect_timeout(),
            Some(&std::time::Duration::from_secs(3))
        );
        assert_eq!(
            second.get_options(),
            Some("-c idle_session_timeout=0 -c search_path=pg_catalog,pg_temp")
        );
        assert_eq!(
            second.get_target_session_attrs(),
            TargetSessionAttrs::ReadWrite
        );
        // no password: none sent (the server may not ask); a Unix socket directory is a path
        let given = Given {
            host: Some("/run/postgresql".into()),
            ..Default::default()
        };
        let pg = PgConfig::resolve_with(given, &|_: &str| None).unwrap();
        let one = session_config(&pg, &pg.endpoints[0]);
        assert_eq!(one.get_password(), None);
        assert_eq!(one.get_hosts(), [Host::Unix("/run/postgresql".into())]);
        assert_eq!(one.get_ssl_mode(), S::Prefer);
        assert_eq!(
            one.get_target_session_attrs(),
            TargetSessionAttrs::ReadWrite
        );
    }
}
