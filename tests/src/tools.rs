//! Real third-party peers and checkers from Debian packages: socat, nginx,
//! promtool. Each server runs in a test-owned process group (see
//! [`crate::child`]), on the host or inside a [`NetNs`], and is waited for by
//! polling its LISTEN socket.

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::child::ChildProc;
use crate::netns::NetNs;
use crate::payload::{Fingerprint, Payload};
use crate::tempdir::TempDir;

/// How long a peer may take to start listening.
const PEER_START_TIMEOUT: Duration = Duration::from_secs(10);

/// `program` on the host, or `ip netns exec <ns> program` inside `ns`.
fn command_in(ns: Option<&NetNs>, program: &str) -> Command {
    match ns {
        Some(ns) => ns.command(program),
        None => Command::new(program),
    }
}

/// A socat server: `socat TCP-LISTEN:<port>,bind=<ip>,fork,reuseaddr <right>`.
pub struct Socat {
    proc: ChildProc,
    addr: SocketAddr,
}

impl Socat {
    /// An echo server (`EXEC:cat` per connection).
    pub fn echo(ns: Option<&NetNs>, addr: SocketAddr) -> Result<Self> {
        Self::serve(ns, addr, "EXEC:cat")
    }

    /// Serve every connection with socat address `right`.
    pub fn serve(ns: Option<&NetNs>, addr: SocketAddr, right: &str) -> Result<Self> {
        let mut cmd = command_in(ns, "socat");
        cmd.arg(format!(
            "TCP-LISTEN:{},bind={},fork,reuseaddr",
            addr.port(),
            addr.ip()
        ))
        .arg(right);
        let mut proc = ChildProc::spawn("socat", cmd)?;
        proc.wait_listening(addr.port(), PEER_START_TIMEOUT)?;
        Ok(Self { proc, addr })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }
}

/// A test-local nginx (own config, root and logs in a temp dir, `daemon off`)
/// serving one file, [`Nginx::FILE_PATH`], with known content.
pub struct Nginx {
    // Dropped first: kill nginx before removing its directory.
    proc: ChildProc,
    addr: SocketAddr,
    file: Fingerprint,
    _dir: TempDir,
}

impl Nginx {
    /// The URL path of the served file.
    pub const FILE_PATH: &str = "/blob.bin";
    /// Its size: more than a few TCP windows, not a single segment.
    const FILE_LEN: u64 = 300_007;

    /// Start nginx listening on `addr`, on the host or inside `ns`.
    pub fn start(ns: Option<&NetNs>, addr: SocketAddr) -> Result<Self> {
        let dir = TempDir::new("nginx")?;
        let root = dir.join("www");
        std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        let payload = Payload::new(0x006e_6769_6e78, Self::FILE_LEN);
        let mut file =
            std::fs::File::create(root.join("blob.bin")).context("creating nginx's file")?;
        let fingerprint = payload
            .write_to(&mut file)
            .context("writing nginx's file")?;
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, Self::config(dir.path(), addr)).context("writing nginx.conf")?;

        let mut cmd = command_in(ns, "nginx");
        cmd.arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf)
            .args(["-e", "stderr"]);
        let mut proc = ChildProc::spawn("nginx", cmd)?;
        proc.wait_listening(addr.port(), PEER_START_TIMEOUT)?;
        Ok(Self {
            proc,
            addr,
            file: fingerprint,
            _dir: dir,
        })
    }

    fn config(dir: &std::path::Path, addr: SocketAddr) -> String {
        let d = dir.display();
        // As root, workers would switch to `nobody` and could not read the
        // temp dir; keep them root (the directive is ignored otherwise).
        let user = if crate::gate::is_root() {
            "user root;"
        } else {
            ""
        };
        format!(
            "daemon off;\nworker_processes 1;\n{user}\npid {d}/nginx.pid;\nerror_log stderr info;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n  access_log off;\n  default_type application/octet-stream;\n\
               client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n\
               uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
               server {{ listen {addr}; root {d}/www; }}\n}}\n"
        )
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Fingerprint of the file at [`Self::FILE_PATH`].
    pub fn file(&self) -> Fingerprint {
        self.file
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }
}

/// `promtool check metrics` on `text`: `Ok(())` or the complaints.
pub fn promtool_check(text: &str) -> Result<std::result::Result<(), String>> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning promtool check metrics")?;
    let mut stdin = child.stdin.take().context("promtool's stdin")?;
    stdin
        .write_all(text.as_bytes())
        .context("feeding metrics to promtool")?;
    drop(stdin);
    let out = child.wait_with_output().context("waiting for promtool")?;
    if out.status.success() {
        return Ok(Ok(()));
    }
    let report = format!(
        "promtool exited with {}:\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if report.trim().is_empty() {
        bail!("promtool failed without output");
    }
    Ok(Err(report))
}
