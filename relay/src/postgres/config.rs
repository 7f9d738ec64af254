//! A PostgreSQL connection's settings, resolved once, as libpq users know them: the relay's own
//! settings first, then its connection string (`pg_url`, [`super::conninfo`]), then libpq's
//! variables (`PGHOST`, `PGSSLMODE`, ...) and password file ([`super::pgpass`]), then the defaults.
//! The result is typed ([`PgConfig`]); each session's `tokio_postgres::Config` is built from it
//! directly ([`super::session`]).

use super::conninfo;
use super::pgpass;
use super::tls::{PgTls, SslMode};
use crate::error::RelayError;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// The relay's own connection settings (flags, environment, file), each set or not; what they
/// leave unset comes from `url`, then libpq's variables, then the defaults.
#[derive(Debug, Default, Clone)]
pub struct Given {
    /// A libpq connection string: a URL or key-value pairs.
    pub url: Option<String>,
    /// Host names, comma-separated.
    pub host: Option<String>,
    /// Ports, comma-separated: one for every host, or one per host.
    pub port: Option<String>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub database: Option<String>,
    pub sslmode: Option<String>,
    pub sslrootcert: Option<PathBuf>,
    pub sslcert: Option<PathBuf>,
    pub sslkey: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct PgConfig {
    /// The servers, tried in order (libpq's multiple hosts).
    pub endpoints: Vec<PgEndpoint>,
    pub user: String,
    pub database: String,
    pub tls: PgTls,
    /// Only a server that accepts writes will do (target_session_attrs read-write, the default):
    /// a standby is passed over.
    pub read_write: bool,
    /// How long one server may take to accept a session (connect_timeout, default 10 s).
    pub connect_timeout: Duration,
    /// libpq's `options` from `pg_url` (`-c name=value ...`), sent before the relay's own (which
    /// therefore win: `search_path`, `idle_session_timeout`).
    pub options: Option<String>,
    /// What `pg_url` set that the relay does without, one line per keyword, for the log.
    pub ignored: Vec<String>,
}

/// The login role when none is given (libpq would take the OS user's name): the role the
/// documented setup creates (README, docs/operations.md), never a superuser by default.
pub const DEFAULT_USER: &str = "pg_outbox_relay";

/// Where OpenSSL finds the operating system's CA certificates, for `sslrootcert=system` (libpq
/// 16's spelling): `SSL_CERT_FILE` if set, else the first bundle that exists.
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// One server of [`PgConfig::endpoints`], with the password for it.
#[derive(Debug, Clone)]
pub struct PgEndpoint {
    pub host: String,
    pub port: u16,
    pub password: String,
}

impl PgConfig {
    /// The connection settings from `given`, then libpq's variables of this process.
    pub fn resolve(given: Given) -> Result<PgConfig, RelayError> {
        PgConfig::resolve_with(given, &|name| {
            std::env::var(name).ok().filter(|v| !v.is_empty())
        })
    }

    /// The relay's own settings first, then its connection string (`pg_url`), then what libpq would
    /// use (`PG*` variables, the password file), then the defaults.
    pub fn resolve_with(
        s: Given,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<PgConfig, RelayError> {
        let (url, mut ignored) = match &s.url {
            Some(text) => conninfo::parse_with_ignored(text)?,
            None => (BTreeMap::new(), Vec::new()),
        };
        let pick = |own: Option<String>, keyword: &str, var: &str| {
            own.or_else(|| url.get(keyword).cloned().filter(|v| !v.is_empty()))
                .or_else(|| env(var))
        };
        let rootcert = pick(
            s.sslrootcert.map(|p| p.display().to_string()),
            "sslrootcert",
            "PGSSLROOTCERT",
        );
        let system = rootcert.as_deref() == Some("system");
        let mode = match pick(s.sslmode, "sslmode", "PGSSLMODE") {
            // libpq: the system's CAs make verify-full the default, and weaker modes an error
            None if system => SslMode::VerifyFull,
            None => SslMode::Prefer,
            Some(mode) => mode.parse()?,
        };
        if system && mode != SslMode::VerifyFull {
            return Err(RelayError::config(
                "pg_sslrootcert = system needs pg_sslmode verify-full (as in libpq): trusting any \
                 public CA without checking the host name would accept anyone's certificate",
            ));
        }
        let rootcert = match rootcert {
            Some(_) if system => Some(system_bundle(env)?),
            other => other.map(PathBuf::from),
        };
        let hostaddr = url.get("hostaddr").filter(|v| !v.is_empty());
        let hosts = match (pick(s.host, "host", "PGHOST"), hostaddr) {
            (Some(host), Some(_)) => {
                ignored.push(
                    "pg_url: hostaddr is ignored: host is set, and the relay connects to (and \
                     verifies) host"
                        .into(),
                );
                host
            }
            (Some(host), None) => host,
            (None, Some(addr)) => addr.clone(),
            (None, None) => "127.0.0.1".into(),
        };
        let hosts: Vec<&str> = hosts.split(',').map(str::trim).collect();
        if hosts.iter().any(|h| h.is_empty()) {
            return Err(RelayError::config(format!(
                "pg_host {:?} has an empty host name",
                hosts.join(",")
            )));
        }
        let ports = pick(s.port, "port", "PGPORT");
        let ports: Vec<u16> = match ports {
            None => vec![5432],
            Some(text) => text
                .split(',')
                .map(|p| match p.trim() {
                    "" => Ok(5432),
                    p => p.parse().map_err(|_| {
                        RelayError::config(format!(
                            "port {p:?} is not a port number (pg_port, pg_url or PGPORT)"
                        ))
                    }),
                })
                .collect::<Result<_, _>>()?,
        };
        if ports.len() != 1 && ports.len() != hosts.len() {
            return Err(RelayError::config(format!(
                "{} ports for {} hosts: give one port for all hosts or one per host (pg_port, pg_url \
                 or PGPORT)",
                ports.len(),
                hosts.len()
            )));
        }
        let user = pick(s.user, "user", "PGUSER").unwrap_or_else(|| DEFAULT_USER.into());
        let database =
            pick(s.database, "dbname", "PGDATABASE").unwrap_or_else(|| "postgres".into());
        let password = pick(s.password, "password", "PGPASSWORD");
        let passfile = url
            .get("passfile")
            .map(PathBuf::from)
            .or_else(|| pgpass::path(env));
        let endpoints = hosts
            .iter()
            .enumerate()
            .map(|(i, host)| {
                let port = ports[if ports.len() == 1 { 0 } else { i }];
                let password = password
                    .clone()
                    .or_else(|| {
                        passfile
                            .as_deref()
                            .and_then(|file| pgpass::password(file, host, port, &database, &user))
                    })
                    .unwrap_or_default();
                PgEndpoint {
                    host: host.to_string(),
                    port,
                    password,
                }
            })
            .collect();
        let read_write = match pick(None, "target_session_attrs", "PGTARGETSESSIONATTRS").as_deref()
        {
            None | Some("read-write") | Some("primary") => true,
            Some("any") => false,
            Some(other) => {
                return Err(RelayError::config(format!(
                    "target_session_attrs {other:?} is not supported: use read-write (the default; \
                     a standby is passed over) or any (pg_url or PGTARGETSESSIONATTRS)"
                )))
            }
        };
        let connect_timeout = match pick(None, "connect_timeout", "PGCONNECT_TIMEOUT") {
            None => Duration::from_secs(10),
            Some(t) => match t.trim().parse::<u64>() {
                Ok(secs) if secs > 0 => Duration::from_secs(secs.max(2)),
                _ => {
                    return Err(RelayError::config(format!(
                        "connect_timeout {t:?} must be a number of seconds, at least 1 (pg_url or \
                         PGCONNECT_TIMEOUT)"
                    )))
                }
            },
        };
        let path = |own: Option<PathBuf>, keyword: &str, var: &str| {
            pick(own.map(|p| p.display().to_string()), keyword, var).map(PathBuf::from)
        };
        let options = url.get("options").filter(|o| !o.trim().is_empty()).cloned();
        Ok(PgConfig {
            tls: PgTls::new(
                mode,
                rootcert,
                path(s.sslcert, "sslcert", "PGSSLCERT"),
                path(s.sslkey, "sslkey", "PGSSLKEY"),
            )?,
            endpoints,
            user,
            database,
            read_write,
            connect_timeout,
            options,
            ignored,
        })
    }

    /// The servers as `host:port,host:port`, for messages.
    pub fn servers(&self) -> String {
        let all: Vec<String> = self
            .endpoints
            .iter()
            .map(|e| format!("{}:{}", e.host, e.port))
            .collect();
        all.join(",")
    }
}

/// The operating system's CA bundle, for `sslrootcert=system`.
fn system_bundle(env: &dyn Fn(&str) -> Option<String>) -> Result<PathBuf, RelayError> {
    if let Some(file) = env("SSL_CERT_FILE") {
        return Ok(PathBuf::from(file));
    }
    SYSTEM_BUNDLES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or_else(|| {
            RelayError::config(format!(
                "pg_sslrootcert = system: no CA bundle of the operating system found (looked for {}; \
                 install ca-certificates or set SSL_CERT_FILE)",
                SYSTEM_BUNDLES.join(", ")
            ))
        })
}

/// The system's CA bundle, for tests elsewhere that need a real PEM file.
#[cfg(test)]
pub fn system_bundle_for_tests() -> Result<PathBuf, RelayError> {
    system_bundle(&|_: &str| None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_variables_fill_what_the_relay_settings_leave_unset() {
        let env = |k: &str| {
            match k {
                "PGHOST" => Some("db.internal"),
                "PGPORT" => Some("6543"),
                "PGUSER" => Some("relay"),
                "PGDATABASE" => Some("shop"),
                "PGPASSWORD" => Some("from-env"),
                "PGSSLMODE" => Some("require"),
                _ => None,
            }
            .map(str::to_string)
        };
        let pg = PgConfig::resolve_with(Given::default(), &env).unwrap();
        assert_eq!(
            (pg.servers(), pg.user.as_str(), pg.database.as_str()),
            ("db.internal:6543".to_string(), "relay", "shop")
        );
        assert_eq!(pg.endpoints[0].password, "from-env");
        assert_eq!(pg.tls.mode, SslMode::Require);
        let own = Given {
            host: Some("flag".into()),
            password: Some("flag-secret".into()),
            ..Default::default()
        };
        let pg = PgConfig::resolve_with(own, &env).unwrap();
        assert_eq!(
            (pg.servers(), pg.endpoints[0].password.as_str()),
            ("flag:6543".to_string(), "flag-secret")
        );
        let bad = |k: &str| (k == "PGPORT").then(|| "x".to_string());
        let err = PgConfig::resolve_with(Given::default(), &bad).unwrap_err();
        assert!(err.to_string().contains("PGPORT"), "{err}");
    }

    #[test]
    fn url_then_settings_then_libpq_variables() {
        let env = |k: &str| {
            match k {
                "PGUSER" => Some("env-user"),
                "PGDATABASE" => Some("env-db"),
                "PGPORT" => Some("7000"),
                _ => None,
            }
            .map(str::to_string)
        };
        let own = Given {
            url: Some(
                "postgres://url-user:url%20pw@a:5433,b:5434/url-db?sslmode=require\
                 &target_session_attrs=any&connect_timeout=3"
                    .into(),
            ),
            database: Some("own-db".into()),
            ..Default::default()
        };
        let pg = PgConfig::resolve_with(own, &env).unwrap();
        assert_eq!(pg.servers(), "a:5433,b:5434");
        assert_eq!(
            (pg.user.as_str(), pg.database.as_str()),
            ("url-user", "own-db")
        );
        assert!(pg.endpoints.iter().all(|e| e.password == "url pw"));
        assert_eq!(pg.tls.mode, SslMode::Require);
        assert!(!pg.read_write);
        assert_eq!(pg.connect_timeout, Duration::from_secs(3));
        // key-value form; one port for every host; the default session is read-write
        let own = Given {
            url: Some("host=x,y,z port=6000".into()),
            ..Default::default()
        };
        let pg = PgConfig::resolve_with(own, &env).unwrap();
        assert_eq!(pg.servers(), "x:6000,y:6000,z:6000");
        assert_eq!(pg.user, "env-user");
        assert!(pg.read_write);
        // PGHOST may list hosts too
        let hosts = |k: &str| (k == "PGHOST").then(|| "p,q".to_string());
        let pg = PgConfig::resolve_with(Given::default(), &hosts).unwrap();
        assert_eq!(pg.servers(), "p:5432,q:5432");
        for (url, says) in [
            ("host=a,b port=1,2,3", "3 ports for 2 hosts"),
            ("host=a,,b", "empty host name"),
            (
                "host=a target_session_attrs=standby",
                "target_session_attrs",
            ),
            ("host=a connect_timeout=soon", "connect_timeout"),
            (
                "host=a optoins=-cfoo",
                "\"optoins\" is not a libpq connection keyword",
            ),
        ] {
            let own = Given {
                url: Some(url.into()),
                ..Default::default()
            };
            let err = PgConfig::resolve_with(own, &|_: &str| None)
                .unwrap_err()
                .to_string();
            assert!(err.contains(says), "{url}: {err}");
        }
    }

    #[test]
    fn password_file_per_host() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("relay-pgpass-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("pgpass");
        std::fs::write(&file, "a:5432:*:relay:pw-a\nb:5432:*:relay:pw-b\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let own = Given {
            url: Some(format!("host=a,b user=relay passfile='{}'", file.display())),
            ..Default::default()
        };
        let pg = PgConfig::resolve_with(own, &|_: &str| None).unwrap();
        let pws: Vec<&str> = pg.endpoints.iter().map(|e| e.password.as_str()).collect();
        assert_eq!(pws, ["pw-a", "pw-b"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn system_roots_hostaddr_options_and_the_default_user() {
        let none = |_: &str| None;
        let given = |url: &str| Given {
            url: Some(url.into()),
            ..Default::default()
        };
        let Ok(bundle) = system_bundle_for_tests() else {
            return; // no CA bundle on this machine
        };
        let pg =
            PgConfig::resolve_with(given("host=db.example.com sslrootcert=system"), &none).unwrap();
        assert_eq!(pg.tls.mode, SslMode::VerifyFull, "as in libpq");
        assert_eq!(pg.tls.rootcert.as_deref(), Some(bundle.as_path()));
        let err = PgConfig::resolve_with(
            given("host=db.example.com sslrootcert=system sslmode=require"),
            &none,
        )
        .unwrap_err();
        assert!(err.to_string().contains("verify-full"), "{err}");
        let file = |k: &str| (k == "SSL_CERT_FILE").then(|| bundle.display().to_string());
        let pg = PgConfig::resolve_with(given("sslrootcert=system"), &file).unwrap();
        assert_eq!(pg.tls.rootcert.as_deref(), Some(bundle.as_path()));
        // hostaddr without host is where to connect; with host, host wins and the log says so
        let pg = PgConfig::resolve_with(given("hostaddr=10.1.2.3 port=6000"), &none).unwrap();
        assert_eq!(pg.servers(), "10.1.2.3:6000");
        assert!(pg.ignored.is_empty());
        let pg = PgConfig::resolve_with(given("host=h hostaddr=10.1.2.3"), &none).unwrap();
        assert_eq!(pg.servers(), "h:5432");
        assert!(pg.ignored[0].contains("hostaddr"), "{:?}", pg.ignored);
        // options go first, the relay's own settings after them (a later -c wins)
        let pg = PgConfig::resolve_with(
            given("postgres://h/d?options=-c%20search_path%3Dpublic&application_name=x"),
            &none,
        )
        .unwrap();
        let options = crate::postgres::session::options(&pg);
        assert!(
            options.starts_with("-c search_path=public ")
                && options.ends_with("-c search_path=pg_catalog,pg_temp"),
            "{options}"
        );
        assert_eq!(pg.ignored.len(), 1);
        assert!(pg.ignored[0].starts_with("pg_url: application_name is ignored"));
        assert_eq!(pg.user, DEFAULT_USER);
        // ports as the relay's own setting: a list
        let own = Given {
            host: Some("a,b".into()),
            port: Some("5432,5433".into()),
            ..Default::default()
        };
        let pg = PgConfig::resolve_with(own, &none).unwrap();
        assert_eq!(pg.servers(), "a:5432,b:5433");
    }
}
