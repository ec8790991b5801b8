//! TLS on either leg of a route, with rustls: origination ([`client`]),
//! termination ([`server`]), the files they read ([`pem`], [`x509`]), the
//! key log ([`keylog`]) and the naming of handshake failures ([`outcome`]).
//!
//! Verification is on by default; turning it off is explicit and logged.

pub mod client;
pub mod keylog;
pub mod outcome;
pub mod pem;
pub mod server;
pub mod settings;
pub mod x509;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;

pub use client::{ClientOptions, Connector, Sni};
pub use outcome::HandshakeOutcome;
pub use server::{Acceptor, ServerOptions};

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("{}: {problem}", path.display())]
    File { path: PathBuf, problem: String },
    #[error("the private key in {} does not match the certificate in {}", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("no trust roots found in the system store; give --tls-ca <file|dir> (or cafile=)")]
    NoSystemRoots,
    #[error("{0}")]
    Config(String),
}

/// Settings both roles share.
#[derive(Clone, Default)]
pub struct Common {
    pub alpn: Vec<String>,
    /// Refuse TLS 1.2 (the floor is 1.2 otherwise).
    pub tls13_only: bool,
    pub keylog: Option<Arc<dyn rustls::KeyLog>>,
}

impl std::fmt::Debug for Common {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Common")
            .field("alpn", &self.alpn)
            .field("tls13_only", &self.tls13_only)
            .field("keylog", &self.keylog.is_some())
            .finish()
    }
}

impl Common {
    fn versions(&self) -> &'static [&'static rustls::SupportedProtocolVersion] {
        static TLS13_ONLY: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
        if self.tls13_only {
            &TLS13_ONLY
        } else {
            rustls::DEFAULT_VERSIONS
        }
    }

    fn alpn(&self) -> Vec<Vec<u8>> {
        self.alpn.iter().map(|p| p.as_bytes().to_vec()).collect()
    }

    fn apply_client(&self, config: &mut rustls::ClientConfig) {
        config.alpn_protocols = self.alpn();
        if let Some(keylog) = &self.keylog {
            config.key_log = keylog.clone();
        }
    }

    fn apply_server(&self, config: &mut rustls::ServerConfig) {
        config.alpn_protocols = self.alpn();
        if let Some(keylog) = &self.keylog {
            config.key_log = keylog.clone();
        }
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn key_error(cert: &Path, key: &Path, err: rustls::Error) -> TlsError {
    match err {
        rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
        },
        other => TlsError::File {
            path: key.to_path_buf(),
            problem: format!("unusable private key: {other}"),
        },
    }
}
