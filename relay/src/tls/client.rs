//! TLS origination: the relay as a TLS client of the target. Trust roots,
//! the SNI name, the name checked in the certificate (which may differ from
//! the SNI name, as socat's `commonname=` allows), client certificates.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsConnector;

use super::{Common, TlsError, pem};
use crate::addr::Host;

/// How the SNI extension is filled.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Sni {
    /// The target's host name (none for an IP address, as TLS requires).
    #[default]
    Host,
    Name(String),
    Off,
}

#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    /// Trust roots (file or directory); the system store when absent.
    pub ca: Option<PathBuf>,
    pub sni: Sni,
    /// The name the certificate must carry; defaults to the SNI name or host.
    pub name: Option<String>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// false only when the user turned verification off explicitly.
    pub verify: bool,
    pub common: Common,
}

/// Makes TLS client connections to one target.
pub struct Connector {
    connector: TlsConnector,
    server_name: ServerName<'static>,
}

fn server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(name.to_string())
        .map_err(|_| TlsError::Config(format!("`{name}` is not a valid TLS server name")))
}

impl Connector {
    pub fn new(options: &ClientOptions, host: &Host) -> Result<Self, TlsError> {
        let host_name = match host {
            Host::Ip(ip) => ip.to_string(),
            Host::Name(name) => name.clone(),
        };
        let sent = match &options.sni {
            Sni::Name(name) => name.clone(),
            Sni::Host | Sni::Off => host_name,
        };
        let checked = options.name.clone().unwrap_or_else(|| sent.clone());
        let verifier: Arc<dyn ServerCertVerifier> = if !options.verify {
            tracing::warn!(
                "TLS verification of the target is OFF (--tls-insecure / verify=0): anyone on the path can impersonate it"
            );
            Arc::new(NoVerification(super::provider()))
        } else {
            let roots = match &options.ca {
                Some(path) => pem::roots(path)?,
                None => pem::system_roots()?,
            };
            let webpki =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), super::provider())
                    .build()
                    .map_err(|e| {
                        TlsError::Config(format!("cannot build the certificate verifier: {e}"))
                    })?;
            if checked == sent {
                webpki
            } else {
                Arc::new(CheckName {
                    inner: webpki,
                    name: server_name(&checked)?,
                })
            }
        };
        let builder = ClientConfig::builder_with_provider(super::provider())
            .with_protocol_versions(options.common.versions())
            .map_err(|e| TlsError::Config(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match (&options.cert, &options.key) {
            (Some(cert), Some(key)) => {
                let chain = pem::certificates(cert)?;
                let key_der = pem::private_key(key)?;
                builder
                    .with_client_auth_cert(chain, key_der)
                    .map_err(|e| super::key_error(cert, key, e))?
            }
            (None, None) => builder.with_no_client_auth(),
            _ => {
                return Err(TlsError::Config(
                    "a client certificate needs both a certificate and a key file".into(),
                ));
            }
        };
        config.enable_sni = options.sni != Sni::Off;
        options.common.apply_client(&mut config);
        Ok(Connector {
            connector: TlsConnector::from(Arc::new(config)),
            server_name: server_name(&sent)?,
        })
    }

    pub async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        io: S,
    ) -> io::Result<tokio_rustls::client::TlsStream<S>> {
        self.connector.connect(self.server_name.clone(), io).await
    }
}

/// Verifies the chain as usual but checks a different name than the SNI one.
#[derive(Debug)]
struct CheckName {
    inner: Arc<WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl ServerCertVerifier for CheckName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _sent: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp, now)
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// `--tls-insecure`: accepts any certificate, but still checks that the
/// handshake signatures are made with the key of the certificate presented.
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
