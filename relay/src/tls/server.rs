//! TLS termination: the relay as a TLS server for its clients. The
//! certificate is re-read when its files change on disk (checked at most
//! once a second, on handshakes), so a renewed certificate is served
//! without a restart and open connections are untouched.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsAcceptor;

use super::outcome::HandshakeOutcome;
use super::{Common, TlsError, pem, x509};

#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Require client certificates signed by these roots.
    pub client_ca: Option<PathBuf>,
    /// Accept only client certificates carrying one of these names (CN or DNS SAN).
    pub allow_names: Vec<String>,
    pub common: Common,
}

/// Accepts TLS connections for one listener.
pub struct Acceptor {
    acceptor: TlsAcceptor,
    allow_names: Vec<String>,
}

/// A handshake that failed, with its class and a one-line reason.
#[derive(Debug)]
pub struct Refused {
    pub outcome: HandshakeOutcome,
    pub reason: String,
}

impl Refused {
    /// A failed handshake as tokio-rustls reported it.
    pub fn of(err: &std::io::Error) -> Self {
        Refused {
            outcome: HandshakeOutcome::of(err),
            reason: err.to_string(),
        }
    }
}

impl Acceptor {
    pub fn new(options: &ServerOptions) -> Result<Self, TlsError> {
        let resolver = Reloading::new(&options.cert, &options.key)?;
        let builder = ServerConfig::builder_with_provider(super::provider())
            .with_protocol_versions(options.common.versions())
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let builder = match &options.client_ca {
            Some(ca) => builder.with_client_cert_verifier(
                WebPkiClientVerifier::builder_with_provider(
                    Arc::new(pem::roots(ca)?),
                    super::provider(),
                )
                .build()
                .map_err(|e| {
                    TlsError::Config(format!(
                        "cannot verify client certificates with {}: {e}",
                        ca.display()
                    ))
                })?,
            ),
            None if !options.allow_names.is_empty() => {
                return Err(TlsError::Config("--tls-allow-name needs --tls-client-ca (client certificates must be verified first)".into()));
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(Arc::new(resolver));
        options.common.apply_server(&mut config);
        Ok(Acceptor {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            allow_names: options.allow_names.clone(),
        })
    }

    /// The handshake over any byte stream (TCP, or whatever a listener
    /// accepted).
    pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        io: S,
    ) -> Result<tokio_rustls::server::TlsStream<S>, Refused> {
        let stream = self
            .acceptor
            .accept(io)
            .await
            .map_err(|e| Refused::of(&e))?;
        if !self.allow_names.is_empty() {
            let names = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|cert| x509::names(cert))
                .unwrap_or_default();
            if !names.iter().any(|n| self.allow_names.contains(n)) {
                return Err(Refused {
                    outcome: HandshakeOutcome::NotAllowed,
                    reason: format!(
                        "client certificate names {names:?} are not in --tls-allow-name"
                    ),
                });
            }
        }
        Ok(stream)
    }
}

/// Loads a certificate chain and its key, checking that they belong
/// together and that the certificate has not expired.
fn load(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = pem::certificates(cert)?;
    if let Some(when) = x509::expired(&chain[0]) {
        return Err(TlsError::File {
            path: cert.to_path_buf(),
            problem: format!("certificate expired on {when}"),
        });
    }
    let key_der = pem::private_key(key)?;
    CertifiedKey::from_der(chain, key_der, &super::provider())
        .map(Arc::new)
        .map_err(|e| super::key_error(cert, key, e))
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

const RELOAD_CHECK: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct Reloading {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<(Arc<CertifiedKey>, [Option<SystemTime>; 2])>,
    next_check: Mutex<Instant>,
}

impl Reloading {
    fn new(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let loaded = load(cert, key)?;
        Ok(Reloading {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            current: RwLock::new((loaded, [modified(cert), modified(key)])),
            next_check: Mutex::new(Instant::now() + RELOAD_CHECK),
        })
    }

    fn reload_if_changed(&self) {
        {
            let mut next = self.next_check.lock().unwrap_or_else(|p| p.into_inner());
            if Instant::now() < *next {
                return;
            }
            *next = Instant::now() + RELOAD_CHECK;
        }
        let stamps = [modified(&self.cert), modified(&self.key)];
        if self.current.read().unwrap_or_else(|p| p.into_inner()).1 == stamps {
            return;
        }
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        match load(&self.cert, &self.key) {
            Ok(loaded) => {
                tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
                *current = (loaded, stamps);
            }
            // Half-written files during a renewal land here; the next change
            // (the second file written) is tried again.
            Err(err) => {
                tracing::warn!(error = %err, "TLS certificate changed on disk but cannot be loaded; serving the previous one");
                current.1 = stamps;
            }
        }
    }
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.reload_if_changed();
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .0
                .clone(),
        )
    }
}
