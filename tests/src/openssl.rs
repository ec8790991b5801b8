//! openssl(1) as a real TLS peer: `s_server` as a TLS target for relay,
//! `s_client` as a TLS client of relay's listener.
//!
//! Both run in test-owned process groups (see [`crate::child`]); the server
//! is waited for by polling its LISTEN socket, the client is driven through
//! stdin/stdout (see [`crate::interactive`]).

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use anyhow::Result;

use crate::certs::Issued;
use crate::child::ChildProc;
use crate::interactive::Interactive;

/// How long a peer may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// `openssl s_server -www`: answers every `GET` with an HTTP 200 status
/// page, one connection after another, until dropped.
pub struct SServer {
    proc: ChildProc,
    addr: SocketAddr,
}

impl SServer {
    /// Serve on `addr` with `identity`'s certificate and key.
    pub fn www(addr: SocketAddr, identity: &Issued) -> Result<Self> {
        let mut cmd = Command::new("openssl");
        cmd.arg("s_server")
            .arg("-accept")
            .arg(addr.to_string())
            .arg("-cert")
            .arg(&identity.cert)
            .arg("-key")
            .arg(&identity.key)
            .arg("-www");
        let mut proc = ChildProc::spawn("openssl-s_server", cmd)?;
        proc.wait_listening(addr.port(), START_TIMEOUT)?;
        Ok(Self { proc, addr })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What s_server logged so far.
    pub fn log(&self) -> String {
        self.proc.log()
    }
}

/// `openssl s_client` connected to `addr`, trusting `ca_file`, verifying the
/// server's certificate for `addr`'s IP (failing the handshake otherwise),
/// presenting `identity` when given. `-brief`: stdout carries only the
/// application data; closing stdin makes it send close_notify and exit.
pub fn s_client(
    addr: SocketAddr,
    ca_file: &std::path::Path,
    identity: Option<&Issued>,
) -> Result<Interactive> {
    let mut cmd = Command::new("openssl");
    cmd.arg("s_client")
        .arg("-connect")
        .arg(addr.to_string())
        .arg("-CAfile")
        .arg(ca_file)
        .arg("-verify_ip")
        .arg(addr.ip().to_string())
        .args(["-verify_return_error", "-brief"]);
    if let Some(id) = identity {
        cmd.arg("-cert").arg(&id.cert).arg("-key").arg(&id.key);
    }
    Interactive::spawn("openssl-s_client", cmd)
}
