//! redis-server as a TLS-only target (mutual TLS, no plaintext port) and
//! redis-cli as a plaintext client, for relay's TLS origination.
//!
//! The server is test-local: its own directory, no persistence, bound to
//! 127.0.0.1, killed on drop.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use anyhow::{Result, bail};

use crate::certs::{Ca, Issued};
use crate::child::ChildProc;
use crate::interactive::Interactive;
use crate::tempdir::TempDir;

/// How long redis may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one redis-cli command may take (a 1 MiB value included).
const CLI_TIMEOUT: Duration = Duration::from_secs(30);

/// `redis-server --port 0 --tls-port <p> --tls-auth-clients yes`.
pub struct RedisTls {
    // Dropped first: kill redis before removing its directory.
    proc: ChildProc,
    addr: SocketAddr,
    _dir: TempDir,
}

impl RedisTls {
    /// Listen for TLS only on `addr`, with `identity` as server certificate,
    /// demanding client certificates signed by `ca`.
    pub fn start(addr: SocketAddr, ca: &Ca, identity: &Issued) -> Result<Self> {
        let dir = TempDir::new("redis")?;
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", "0", "--tls-port"])
            .arg(addr.port().to_string())
            .arg("--bind")
            .arg(addr.ip().to_string())
            .arg("--tls-cert-file")
            .arg(&identity.cert)
            .arg("--tls-key-file")
            .arg(&identity.key)
            .arg("--tls-ca-cert-file")
            .arg(ca.cert_path())
            .args(["--tls-auth-clients", "yes"])
            .arg("--dir")
            .arg(dir.path())
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"]);
        let mut proc = ChildProc::spawn("redis-server", cmd)?;
        proc.wait_listening(addr.port(), START_TIMEOUT)?;
        Ok(Self {
            proc,
            addr,
            _dir: dir,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }
}

/// `redis-cli -h <ip> -p <port> <args>` in plaintext; with `stdin_arg`,
/// `-x` makes those bytes the command's last argument. Returns stdout.
pub fn redis_cli(addr: SocketAddr, args: &[&str], stdin_arg: Option<&[u8]>) -> Result<Vec<u8>> {
    let mut cmd = Command::new("redis-cli");
    cmd.arg("-h")
        .arg(addr.ip().to_string())
        .arg("-p")
        .arg(addr.port().to_string());
    if stdin_arg.is_some() {
        cmd.arg("-x");
    }
    cmd.args(args);
    let out = Interactive::run("redis-cli", cmd, stdin_arg.unwrap_or_default(), CLI_TIMEOUT)?;
    if !out.status.success() {
        bail!(
            "redis-cli {args:?}: expected exit 0, got {}\nstdout: {:?}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            out.stderr
        );
    }
    Ok(out.stdout)
}
