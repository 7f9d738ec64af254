//! TLS to PostgreSQL, as libpq users know it: `sslmode` (`disable`, `prefer`, `require`,
//! `verify-ca`, `verify-full`), `sslrootcert`, `sslcert` and `sslkey`. The same settings serve the
//! relay's sessions (tokio-postgres over rustls) and its replication connection
//! (pgwire-replication). Certificates and keys are read once, when the settings are loaded, so that
//! a wrong path stops the relay at start with the setting's name.

use crate::error::RelayError;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

/// libpq's `sslmode` (`allow` is not offered: it only matters to servers that require plain text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    /// TLS if the server offers it, without verifying its certificate (libpq's default).
    Prefer,
    /// TLS, without verifying the certificate.
    Require,
    /// TLS, the certificate signed by `sslrootcert`; any host name.
    VerifyCa,
    /// TLS, the certificate signed by `sslrootcert` and issued for the host connected to.
    VerifyFull,
}

impl FromStr for SslMode {
    type Err = RelayError;
    fn from_str(s: &str) -> Result<SslMode, RelayError> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(RelayError::config(format!(
                    "pg_sslmode {other:?} is unknown: use disable, prefer, require, verify-ca or \
                     verify-full (PG_OUTBOX_PG_SSLMODE)"
                )))
            }
        })
    }
}

/// The TLS settings of the PostgreSQL connections, checked and loaded.
#[derive(Debug, Clone)]
pub struct PgTls {
    pub mode: SslMode,
    pub rootcert: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    client: Arc<ClientConfig>,
}

impl PgTls {
    pub fn new(
        mode: SslMode,
        rootcert: Option<PathBuf>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
    ) -> Result<PgTls, RelayError> {
        let verify = matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull);
        if verify && rootcert.is_none() {
            return Err(RelayError::config(
                "pg_sslmode verify-ca and verify-full need pg_sslrootcert, the CA certificate(s) \
                 that signed the server's (PG_OUTBOX_PG_SSLROOTCERT)",
            ));
        }
        if cert.is_some() != key.is_some() {
            return Err(RelayError::config(
                "pg_sslcert and pg_sslkey go together: set both for a client certificate, or neither",
            ));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| RelayError::config("TLS to PostgreSQL").caused_by(e))?;
        let mut roots = RootCertStore::empty();
        if let Some(path) = &rootcert {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| {
                    RelayError::config(format!("pg_sslrootcert {}: cannot read", path.display()))
                        .caused_by(e)
                })?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(RelayError::config(format!(
                    "pg_sslrootcert {}: no certificate in it",
                    path.display()
                )));
            }
        }
        let builder = match mode {
            SslMode::VerifyFull => builder.with_root_certificates(roots),
            SslMode::VerifyCa => {
                let chain =
                    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                        .build()
                        .map_err(|e| RelayError::config("pg_sslrootcert").caused_by(e))?;
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(Lenient {
                        chain: Some(chain),
                        provider,
                    }))
            }
            SslMode::Disable | SslMode::Prefer | SslMode::Require => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Lenient {
                    chain: None,
                    provider,
                })),
        };
        let client = match (&cert, &key) {
            (Some(cert), Some(key)) => {
                let chain = CertificateDer::pem_file_iter(cert)
                    .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| {
                        RelayError::config(format!("pg_sslcert {}: cannot read", cert.display()))
                            .caused_by(e)
                    })?;
                let private = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                    RelayError::config(format!("pg_sslkey {}: cannot read", key.display()))
                        .caused_by(e)
                })?;
                builder.with_client_auth_cert(chain, private).map_err(|e| {
                    RelayError::config("pg_sslcert and pg_sslkey do not make a client certificate")
                        .caused_by(e)
                })?
            }
            _ => builder.with_no_client_auth(),
        };
        Ok(PgTls {
            mode,
            rootcert,
            cert,
            key,
            client: Arc::new(client),
        })
    }

    /// The connector for tokio-postgres sessions.
    pub fn connector(&self) -> tokio_postgres_rustls::MakeRustlsConnect {
        tokio_postgres_rustls::MakeRustlsConnect::new((*self.client).clone())
    }

    pub fn session_mode(&self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as S;
        match self.mode {
            SslMode::Disable => S::Disable,
            SslMode::Prefer => S::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => S::Require,
        }
    }

    /// The same settings for the replication connection.
    pub fn replication(&self) -> pgwire_replication::TlsConfig {
        use pgwire_replication::config::SslMode as S;
        let mut tls = pgwire_replication::TlsConfig::disabled();
        tls.mode = match self.mode {
            SslMode::Disable => S::Disable,
            SslMode::Prefer => S::Prefer,
            SslMode::Require => S::Require,
            SslMode::VerifyCa => S::VerifyCa,
            SslMode::VerifyFull => S::VerifyFull,
        };
        tls.ca_pem_path = self.rootcert.clone();
        tls.client_cert_pem_path = self.cert.clone();
        tls.client_key_pem_path = self.key.clone();
        tls
    }
}

/// The verifier of the modes rustls does not have: `prefer` and `require` (no chain given: any
/// certificate, encryption without authentication of the server, as in libpq) and `verify-ca` (the
/// chain must lead to `sslrootcert`; any host name).
#[derive(Debug)]
struct Lenient {
    chain: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The TLS error behind a failed connection, if that is what failed: a certificate the settings
/// refuse will not change by retrying.
pub fn tls_failure<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut cause = Some(e);
    while let Some(e) = cause {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(tls) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(tls);
        }
        cause = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_modes_need_the_root_certificate_and_name_it() {
        let err = PgTls::new(SslMode::VerifyFull, None, None, None).unwrap_err();
        assert!(err.to_string().contains("pg_sslrootcert"), "{err}");
        let err = PgTls::new(SslMode::Require, None, Some("c.pem".into()), None).unwrap_err();
        assert!(err.to_string().contains("pg_sslkey"), "{err}");
        let err = PgTls::new(
            SslMode::VerifyCa,
            Some("/nonexistent/ca.pem".into()),
            None,
            None,
        )
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
        assert!("verify_full".parse::<SslMode>().is_err());
        assert_eq!(
            "verify-full".parse::<SslMode>().unwrap(),
            SslMode::VerifyFull
        );
    }

    #[test]
    fn a_tls_error_is_found_behind_an_io_error() {
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(CertificateError::NotValidForName),
        );
        assert!(tls_failure(&io).is_some());
        let plain = std::io::Error::other("reset");
        assert!(tls_failure(&plain).is_none());
    }
}
