//! An in-process TLS client (rustls) whose every step a test controls:
//! which CA it trusts, which client certificate it shows, what certificate
//! the server presented, and how it hangs up (with or without close_notify).
//!
//! Real third-party TLS peers (openssl s_client/s_server, redis) live in
//! [`crate::openssl`] and [`crate::redis`]; this client is for the cases
//! where a test must see or steer the protocol itself.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

use crate::certs::{Ca, Issued};

/// How the server's side of a TLS connection ended, as the client read it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsClose {
    /// A close_notify alert, then EOF: the clean TLS close.
    CloseNotify,
    /// TCP EOF with no close_notify before it (a truncation in TLS terms).
    EofWithoutCloseNotify,
    /// ECONNRESET.
    Reset,
}

/// A TLS connection over TCP with its handshake completed.
pub struct TlsClient {
    stream: StreamOwned<ClientConnection, TcpStream>,
}

impl TlsClient {
    /// Connect to `addr`, trust only `ca`, verify the server's certificate
    /// for `addr`'s IP, present `identity` if given, and finish the handshake.
    pub fn connect(addr: SocketAddr, ca: &Ca, identity: Option<&Issued>) -> Result<Self> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from(ca.cert_der().to_vec()))
            .context("adding the test CA to the client's roots")?;
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("choosing TLS versions for the test client")?
            .with_root_certificates(roots);
        let config = match identity {
            Some(id) => builder
                .with_client_auth_cert(
                    vec![CertificateDer::from(id.cert_der.clone())],
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(id.key_der.clone())),
                )
                .with_context(|| format!("loading client certificate {}", id.cert.display()))?,
            None => builder.with_no_client_auth(),
        };
        let conn = ClientConnection::new(Arc::new(config), ServerName::from(addr.ip()))
            .context("creating a rustls client connection")?;
        let tcp = crate::peers::connect(addr)?;
        let mut stream = StreamOwned::new(conn, tcp);
        while stream.conn.is_handshaking() {
            stream
                .conn
                .complete_io(&mut stream.sock)
                .with_context(|| format!("TLS handshake with {addr}"))?;
        }
        Ok(Self { stream })
    }

    /// The end-entity certificate the server presented (DER).
    pub fn peer_cert_der(&self) -> Option<Vec<u8>> {
        self.stream
            .conn
            .peer_certificates()
            .and_then(|chain| chain.first())
            .map(|cert| cert.to_vec())
    }

    /// Send close_notify and FIN, then read until the server closes too.
    pub fn close_cleanly(mut self) -> Result<TlsClose> {
        self.stream.conn.send_close_notify();
        self.stream.flush().context("sending close_notify")?;
        self.stream
            .sock
            .shutdown(Shutdown::Write)
            .context("shutting down the client's write side")?;
        self.read_to_close()
    }

    /// Hang up at the TCP level (FIN) without sending close_notify, then
    /// read until the server closes too.
    pub fn close_without_close_notify(mut self) -> Result<TlsClose> {
        self.stream
            .sock
            .shutdown(Shutdown::Write)
            .context("shutting down the client's write side")?;
        self.read_to_close()
    }

    /// Read (and discard) application data until the server's side ends.
    fn read_to_close(&mut self) -> Result<TlsClose> {
        let mut buf = [0u8; 4096];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return Ok(TlsClose::CloseNotify),
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return Ok(TlsClose::EofWithoutCloseNotify);
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    return Ok(TlsClose::Reset);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => bail!("expected the server to close, got read error: {e}"),
            }
        }
    }
}

impl Read for TlsClient {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.read(buf)
    }
}

impl Write for TlsClient {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}
