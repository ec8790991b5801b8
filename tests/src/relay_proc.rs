//! The relay under test: finding the binary, spawning it, and talking to it
//! from outside (signals, exit status, stderr, `/metrics`).
//!
//! The binary is `$RELAY_BIN` when set (`cargo xtask test` sets it), else the
//! harness runs `cargo build --release -p relay` once per test process and
//! uses the executable cargo reports.
//!
//! A spawned relay is "ready" when its listen socket (and metrics socket, if
//! any) shows up as LISTEN in `/proc/<pid>/net/tcp{,6}`; the harness never
//! connects to probe, because every connection is counted in the metrics.
//! A [`Relay`] is killed on drop and its stderr printed (libtest shows it
//! only for failing tests).

use std::fmt::Display;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, ExitStatus};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use nix::sys::signal::Signal;

use crate::child::ChildProc;
use crate::metrics::{Scrape, Selector};
use crate::ports::{free_port, is_listening};
use crate::wait::poll_until;

/// The switch without which relay refuses `--data-path sockmap`.
pub const EXPERIMENTAL_SOCKMAP: &str = "--experimental-sockmap";

/// How long a relay may take to start listening.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Path of the relay binary (built on first use unless `$RELAY_BIN` is set).
pub fn relay_bin() -> Result<PathBuf> {
    static BIN: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| locate_or_build().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!("no relay binary: {e}"))
}

fn locate_or_build() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("RELAY_BIN") {
        let bin = PathBuf::from(bin);
        if !bin.is_file() {
            bail!("RELAY_BIN={} is not a file", bin.display());
        }
        return Ok(bin);
    }
    let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("invariant: tests/ sits inside the workspace root")
        .to_path_buf();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(&cargo)
        .args([
            "build",
            "--release",
            "-p",
            "relay",
            "--message-format=json-render-diagnostics",
        ])
        .current_dir(&workspace)
        .output()
        .with_context(|| {
            format!(
                "running {} build --release -p relay",
                cargo.to_string_lossy()
            )
        })?;
    if !out.status.success() {
        bail!(
            "cargo build --release -p relay failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The last compiler-artifact message for the `relay` bin names its path.
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|msg| msg["reason"] == "compiler-artifact" && msg["target"]["name"] == "relay")
        .filter_map(|msg| msg["executable"].as_str().map(PathBuf::from))
        .next_back()
        .context("cargo built the relay package but reported no `relay` executable; is [[bin]] relay still declared?")
}

/// How the relay is invoked: `relay forward L T [opts]` or `relay [opts] A1 A2`.
#[derive(Clone, Debug)]
enum Form {
    Forward { listen: String, target: String },
    Socat { addr1: String, addr2: String },
    Raw(Vec<String>),
}

/// Builder for a relay process.
#[derive(Clone, Debug)]
pub struct RelayCmd {
    form: Form,
    options: Vec<String>,
    listen_port: Option<u16>,
    metrics: Option<SocketAddr>,
    nofile: Option<u64>,
    /// Address-space limit in bytes (`prlimit --as`).
    memory: Option<u64>,
    /// Run with an empty capability bounding set (root without privileges).
    unprivileged: bool,
    /// Run under `systemd-socket-activate`, which listens on these
    /// addresses, passes them by these names, and starts relay at the
    /// first connection.
    activated: Vec<(SocketAddr, String)>,
    env: Vec<(String, std::ffi::OsString)>,
}

impl RelayCmd {
    /// `relay forward <listen> <target>`; ready once `listen`'s port listens.
    pub fn forward(listen: SocketAddr, target: impl Display) -> Self {
        Self::new(
            Form::Forward {
                listen: listen.to_string(),
                target: target.to_string(),
            },
            Some(listen.port()),
        )
    }

    /// `relay forward 127.0.0.1:<free port> <target> --metrics 127.0.0.1:<free port>`:
    /// the common shape of a test relay.
    pub fn loopback_to(target: impl Display) -> Result<Self> {
        Self::forward(
            SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?)),
            target,
        )
        .with_metrics()
    }

    /// The socat drop-in form `relay [options] <addr1> <addr2>`; ready once
    /// `listen_port` listens.
    pub fn socat(listen_port: u16, addr1: impl Display, addr2: impl Display) -> Self {
        Self::new(
            Form::Socat {
                addr1: addr1.to_string(),
                addr2: addr2.to_string(),
            },
            Some(listen_port),
        )
    }

    /// Exactly these arguments, for invocations that must fail.
    pub fn raw<S: AsRef<str>>(args: &[S]) -> Self {
        Self::new(
            Form::Raw(args.iter().map(|a| a.as_ref().to_string()).collect()),
            None,
        )
    }

    fn new(form: Form, listen_port: Option<u16>) -> Self {
        Self {
            form,
            options: Vec::new(),
            listen_port,
            metrics: None,
            nofile: None,
            memory: None,
            unprivileged: false,
            activated: Vec::new(),
            env: Vec::new(),
        }
    }

    /// Write the forward form's listen address as `<scheme>://host:port`
    /// (e.g. `tls`); other forms are left alone.
    pub fn listen_scheme(mut self, scheme: &str) -> Self {
        if let Form::Forward { listen, .. } = &mut self.form {
            *listen = format!("{scheme}://{listen}");
        }
        self
    }

    /// Add options (placed where the form wants them).
    pub fn opts<S: AsRef<str>>(mut self, options: &[S]) -> Self {
        self.options
            .extend(options.iter().map(|o| o.as_ref().to_string()));
        self
    }

    /// Serve metrics on 127.0.0.1 at a free port (`--metrics 127.0.0.1:<p>`).
    pub fn with_metrics(self) -> Result<Self> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        Ok(self.with_metrics_on(addr))
    }

    /// Serve metrics at `addr` (`--metrics <addr>`): the relay that
    /// replaces another in an upgrade asks for its predecessor's.
    pub fn with_metrics_on(mut self, addr: SocketAddr) -> Self {
        self.options
            .extend(["--metrics".to_string(), addr.to_string()]);
        self.metrics = Some(addr);
        self
    }

    /// Run under `prlimit --nofile=<n>:<n>` (soft and hard: relay raises
    /// its soft limit to the hard one).
    pub fn nofile(mut self, limit: u64) -> Self {
        self.nofile = Some(limit);
        self
    }

    /// Run under `prlimit --as=<bytes>`: a relay that would exhaust memory
    /// fails to allocate (and aborts) instead of taking the test host's.
    pub fn memory(mut self, bytes: u64) -> Self {
        self.memory = Some(bytes);
        self
    }

    /// Run under `setpriv --bounding-set=-all`: even as root, relay then has
    /// no capability (no CAP_BPF, no CAP_NET_ADMIN), as an unprivileged user.
    pub fn unprivileged(mut self) -> Self {
        self.unprivileged = true;
        self
    }

    /// Start relay as systemd would for a `.socket` unit with these
    /// `ListenStream=` and `FileDescriptorName=`: through
    /// `systemd-socket-activate`, which listens at once and starts relay
    /// (same pid) at the first connection. [`RelayCmd::spawn`] then waits
    /// for those sockets only: relay itself runs after that connection.
    pub fn socket_activated(mut self, sockets: &[(SocketAddr, &str)]) -> Self {
        self.activated = sockets
            .iter()
            .map(|(addr, name)| (*addr, name.to_string()))
            .collect();
        self.listen_port = sockets.first().map(|(addr, _)| addr.port());
        self
    }

    /// Set an environment variable for relay.
    pub fn env(mut self, key: &str, value: impl Into<std::ffi::OsString>) -> Self {
        self.env.push((key.to_string(), value.into()));
        self
    }

    /// The full argument list after `relay`. The forward and socat forms run
    /// on the data path named by `RELAY_DATA_PATH` when it is set (and the
    /// test did not choose one), so one test suite covers every data path
    /// (`cargo xtask test` runs it per path).
    pub fn args(&self) -> Vec<String> {
        let chosen = self.options.iter().any(|o| o == "--data-path");
        let data_path = std::env::var("RELAY_DATA_PATH")
            .ok()
            .filter(|p| !p.is_empty() && !chosen);
        // sockmap is experimental: a suite run on it opts in, or relay refuses.
        let data_path: Vec<String> = match data_path {
            Some(p) if p == "sockmap" => vec![
                "--data-path".to_string(),
                p,
                EXPERIMENTAL_SOCKMAP.to_string(),
            ],
            Some(p) => vec!["--data-path".to_string(), p],
            None => Vec::new(),
        };
        match &self.form {
            Form::Forward { listen, target } => {
                let mut args = vec!["forward".to_string(), listen.clone(), target.clone()];
                args.extend(self.options.iter().cloned());
                args.extend(data_path);
                args
            }
            Form::Socat { addr1, addr2 } => {
                let mut args = self.options.clone();
                args.extend(data_path);
                args.extend([addr1.clone(), addr2.clone()]);
                args
            }
            Form::Raw(args) => args.iter().chain(&self.options).cloned().collect(),
        }
    }

    fn command(&self) -> Result<Command> {
        let bin = relay_bin()?;
        let mut line: Vec<std::ffi::OsString> = Vec::new();
        if self.nofile.is_some() || self.memory.is_some() {
            line.push("prlimit".into());
            if let Some(n) = self.nofile {
                line.push(format!("--nofile={n}:{n}").into());
            }
            if let Some(bytes) = self.memory {
                line.push(format!("--as={bytes}:{bytes}").into());
            }
            line.push("--".into());
        }
        if self.unprivileged {
            line.extend(
                ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--"].map(Into::into),
            );
        }
        if !self.activated.is_empty() {
            line.push("systemd-socket-activate".into());
            for (addr, _) in &self.activated {
                line.push(format!("--listen={addr}").into());
            }
            let names: Vec<&str> = self.activated.iter().map(|(_, n)| n.as_str()).collect();
            line.push(format!("--fdname={}", names.join(":")).into());
        }
        line.push(bin.into());
        let mut cmd = Command::new(&line[0]);
        cmd.args(&line[1..]).args(self.args());
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        Ok(cmd)
    }

    /// Start the relay and wait until it listens (and serves metrics).
    ///
    /// A raw command line with metrics (`relay observe ...`, or a listener
    /// inside another namespace, which `/proc/<relay>/net/tcp` does not
    /// show) is ready once it serves metrics: relay binds its listener and
    /// attaches its observer before it serves them.
    pub fn spawn(self) -> Result<Relay> {
        let ready: Vec<u16> = if self.activated.is_empty() {
            self.listen_port
                .into_iter()
                .chain(self.metrics.map(|m| m.port()))
                .collect()
        } else {
            self.activated.iter().map(|(addr, _)| addr.port()).collect()
        };
        if ready.is_empty() {
            bail!(
                "RelayCmd::raw without with_metrics() has no port to wait for; \
                 use run_to_exit() for command lines that must fail"
            );
        }
        let mut proc = ChildProc::spawn("relay", self.command()?)?;
        for port in ready {
            proc.wait_listening(port, START_TIMEOUT)?;
        }
        let listen = self.listen_port.map(|listen_port| {
            // The socat form listens on 0.0.0.0 (or bind=); loopback reaches it.
            let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, listen_port));
            match &self.form {
                _ if !self.activated.is_empty() => self.activated[0].0,
                Form::Forward { listen, .. } => listen
                    .rsplit_once("://")
                    .map_or(listen.as_str(), |(_, addr)| addr)
                    .parse()
                    .unwrap_or(loopback),
                _ => loopback,
            }
        });
        Ok(Relay {
            proc,
            listen,
            metrics: self.metrics,
        })
    }

    /// `relay publish <target> <port>:<host-port>` (listening on the
    /// host's 127.0.0.1:<host-port>), with metrics.
    pub fn publish(target: &str, port: u16, host_port: u16) -> Result<Self> {
        Self::new(
            Form::Raw(vec![
                "publish".to_string(),
                target.to_string(),
                format!("{port}:{host_port}"),
            ]),
            Some(host_port),
        )
        .with_metrics()
    }

    /// Run the relay expecting it to exit by itself within `timeout`.
    pub fn run_to_exit(self, timeout: Duration) -> Result<Exited> {
        let mut relay = Relay {
            proc: ChildProc::spawn("relay", self.command()?)?,
            listen: None,
            metrics: None,
        };
        let status = relay.wait_exit(timeout)?;
        Ok(Exited {
            status,
            stderr: relay.stderr(),
        })
    }

    /// Run a command line relay must refuse as a usage error: exit 2 within
    /// `timeout`, and an error line that contains every one of `names`.
    pub fn expect_usage_error(self, timeout: Duration, names: &[&str]) -> Result<Exited> {
        let line = self.args().join(" ");
        let exited = self.run_to_exit(timeout)?;
        let error_line = exited
            .stderr
            .lines()
            .find(|l| l.contains("error"))
            .unwrap_or_default();
        if exited.status.code() != Some(2) || !names.iter().all(|n| error_line.contains(n)) {
            bail!(
                "relay {line}: expected exit 2 and an error line naming {names:?}, got {} with stderr:\n{}",
                exited.status,
                exited.stderr
            );
        }
        Ok(exited)
    }
}

/// A relay that exited by itself.
#[derive(Debug)]
pub struct Exited {
    pub status: ExitStatus,
    pub stderr: String,
}

/// A running relay process; killed on drop.
#[derive(Debug)]
pub struct Relay {
    proc: ChildProc,
    listen: Option<SocketAddr>,
    metrics: Option<SocketAddr>,
}

impl Relay {
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Where clients connect (a listen address of 0.0.0.0 is reached at 127.0.0.1).
    pub fn addr(&self) -> SocketAddr {
        let addr = self
            .listen
            .expect("invariant: asked only of relays spawned with a listen port");
        if addr.ip().is_unspecified() {
            SocketAddr::from((Ipv4Addr::LOCALHOST, addr.port()))
        } else {
            addr
        }
    }

    /// A client connection to the relay's listen address.
    pub fn connect(&self) -> Result<std::net::TcpStream> {
        crate::peers::connect(self.addr())
    }

    /// True while the listen socket exists.
    pub fn is_listening(&self) -> Result<bool> {
        is_listening(self.pid(), self.addr().port())
    }

    /// How many file descriptors the relay has open now.
    pub fn open_fds(&self) -> Result<usize> {
        let dir = format!("/proc/{}/fd", self.pid());
        Ok(std::fs::read_dir(&dir)
            .with_context(|| format!("listing {dir}"))?
            .count())
    }

    /// The relay's RLIMIT_NOFILE as (soft, hard), from /proc/<pid>/limits.
    pub fn nofile_limit(&self) -> Result<(String, String)> {
        let path = format!("/proc/{}/limits", self.pid());
        let limits = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .with_context(|| format!("no `Max open files` line in {path}"))?;
        let mut cols = line["Max open files".len()..].split_whitespace();
        match (cols.next(), cols.next()) {
            (Some(soft), Some(hard)) => Ok((soft.to_string(), hard.to_string())),
            _ => bail!("cannot parse {line:?} in {path}"),
        }
    }

    /// Everything relay wrote to stderr (and stdout) so far.
    pub fn stderr(&self) -> String {
        self.proc.log()
    }

    pub fn signal(&self, signal: Signal) -> Result<()> {
        self.proc.signal(signal)
    }

    /// Wait for relay to exit; fail (with its stderr) if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        match self.proc.wait_exit(timeout)? {
            Some(status) => Ok(status),
            None => bail!(
                "expected relay to exit within {timeout:?}, it is still running; stderr:\n{}",
                self.stderr()
            ),
        }
    }

    /// GET /metrics and parse it.
    pub fn scrape(&self) -> Result<Scrape> {
        let addr = self
            .metrics
            .context("this relay was started without with_metrics()")?;
        let response =
            crate::http::get(crate::peers::connect(addr)?, &addr.to_string(), "/metrics")?;
        if response.status != 200 {
            bail!(
                "GET /metrics: expected status 200, got {}: {}",
                response.status,
                response.head
            );
        }
        let text = String::from_utf8(response.body).context("/metrics body is not UTF-8")?;
        Scrape::parse(&text)
    }

    /// Poll /metrics until the sum of `name{labels}` equals `expected`.
    ///
    /// Counters move when connections close, a moment after the client
    /// sees the close; hence polling rather than one scrape.
    /// [`Relay::wait_metric`] on `relay_connections_total{outcome}`: the
    /// count every test of a connection's end waits for.
    pub fn wait_outcome(&self, outcome: &str, count: f64, timeout: Duration) -> Result<Scrape> {
        self.wait_metric(
            "relay_connections_total",
            &[("outcome", outcome)],
            count,
            timeout,
        )
    }

    pub fn wait_metric(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        expected: f64,
        timeout: Duration,
    ) -> Result<Scrape> {
        let mut last: Option<Scrape> = None;
        let waited = poll_until(
            &format!("{} == {expected}", Selector(name, labels)),
            timeout,
            || {
                let scrape = self.scrape()?;
                let ok = scrape.counter(name, labels) == expected;
                let result = ok.then(|| scrape.clone());
                last = Some(scrape);
                Ok(result)
            },
        );
        waited.map_err(|e| {
            let got = last.as_ref().map(|s| s.counter(name, labels));
            anyhow!(
                "{e}: expected {} == {expected}, got {got:?}\nlast scrape:\n{}",
                Selector(name, labels),
                last.map(|s| s.text).unwrap_or_default()
            )
        })
    }

    /// The metrics address, if started with metrics.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics
    }

    /// Time from now until relay's exit; fails if longer than `timeout`.
    pub fn time_to_exit(&mut self, timeout: Duration) -> Result<(ExitStatus, Duration)> {
        let start = Instant::now();
        let status = self.wait_exit(timeout)?;
        Ok((status, start.elapsed()))
    }
}

/// How many JSON log lines (`--log-format json`) in `log` carry the field
/// `key` with string value `value`, at any depth (tracing nests fields).
pub fn json_log_lines_with(log: &str, key: &str, value: &str) -> usize {
    json_log_lines(log)
        .iter()
        .filter(|line| json_field(line, key) == Some(value))
        .count()
}

/// The JSON log lines (`--log-format json`) in `log`; other lines skipped.
pub fn json_log_lines(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .collect()
}

/// The string field `key` of a JSON log line, found at any depth (tracing
/// nests fields); the first one found wins.
pub fn json_field<'a>(line: &'a serde_json::Value, key: &str) -> Option<&'a str> {
    match line {
        serde_json::Value::Object(map) => map
            .get(key)
            .and_then(|found| found.as_str())
            .or_else(|| map.values().find_map(|inner| json_field(inner, key))),
        serde_json::Value::Array(items) => items.iter().find_map(|inner| json_field(inner, key)),
        _ => None,
    }
}
