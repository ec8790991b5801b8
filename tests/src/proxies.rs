//! Real proxy servers from Debian for relay's proxied connect addresses:
//! Dante (`danted`, SOCKS 4 and 5) and Tinyproxy (HTTP CONNECT), each with
//! its own config in a temp dir, on 127.0.0.1, allowing CONNECT to one
//! port only so that a refusal can be provoked.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::child::ChildProc;
use crate::ports::free_port;
use crate::tempdir::TempDir;

/// How long a proxy may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A proxy server process and the port it listens on.
pub struct Proxy {
    // Dropped first: stop the server before removing its directory.
    proc: ChildProc,
    addr: SocketAddr,
    dir: TempDir,
}

impl Proxy {
    /// Dante, SOCKS 4 and 5 without authentication, letting clients from
    /// loopback connect to 127.0.0.1:`allowed_port` only.
    pub fn dante(allowed_port: u16) -> Result<Self> {
        let dir = TempDir::new("danted")?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let conf = dir.join("danted.conf");
        std::fs::write(
            &conf,
            format!(
                "logoutput: stderr\ninternal: 127.0.0.1 port = {port}\nexternal: 127.0.0.1\n\
                 clientmethod: none\nsocksmethod: none\nuser.privileged: root\nuser.unprivileged: nobody\n\
                 client pass {{\n  from: 127.0.0.0/8 to: 0.0.0.0/0\n}}\n\
                 socks pass {{\n  from: 127.0.0.0/8 to: 127.0.0.1/32 port = {allowed_port}\n  command: connect\n}}\n\
                 socks block {{\n  from: 0.0.0.0/0 to: 0.0.0.0/0\n  log: connect error\n}}\n",
                port = addr.port()
            ),
        )
        .context("writing danted.conf")?;
        let mut cmd = Command::new("danted");
        cmd.arg("-f")
            .arg(&conf)
            .arg("-p")
            .arg(dir.join("danted.pid"));
        Self::start("danted", cmd, addr, dir)
    }

    /// Tinyproxy with Basic credentials `user`:`password`, allowing
    /// CONNECT to `allowed_port` only.
    pub fn tinyproxy(allowed_port: u16, user: &str, password: &str) -> Result<Self> {
        let dir = TempDir::new("tinyproxy")?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let conf = dir.join("tinyproxy.conf");
        std::fs::write(
            &conf,
            format!(
                "Port {port}\nListen 127.0.0.1\nTimeout 60\nLogLevel Info\nMaxClients 64\n\
                 Allow 127.0.0.1\nConnectPort {allowed_port}\nBasicAuth {user} {password}\n",
                port = addr.port()
            ),
        )
        .context("writing tinyproxy.conf")?;
        let mut cmd = Command::new("tinyproxy");
        cmd.arg("-d").arg("-c").arg(&conf);
        Self::start("tinyproxy", cmd, addr, dir)
    }

    fn start(label: &str, cmd: Command, addr: SocketAddr, dir: TempDir) -> Result<Self> {
        let mut proc = ChildProc::spawn(label, cmd)?;
        proc.wait_listening(addr.port(), START_TIMEOUT)?;
        Ok(Self { proc, addr, dir })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server's log so far (for failure messages).
    pub fn log(&self) -> String {
        self.proc.log()
    }

    /// A file in the proxy's temp dir (for credentials files).
    pub fn file(&self, name: &str) -> std::path::PathBuf {
        self.dir.join(name)
    }
}
