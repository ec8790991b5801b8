//! Docker for tests: the daemon, a busybox image, and throwaway containers.
//!
//! - [`ensure_daemon`]: make sure dockerd answers on [`SOCKET`]; when it does
//!   not, start `dockerd --iptables=false --ip6tables=false` (log in
//!   `$TMPDIR/relay-tests-dockerd.log`) and poll `GET /_ping` until it
//!   answers. The daemon is shared by every test and left running.
//! - [`image`]: `relay-tests/busybox`, built once per test process `FROM
//!   scratch` with the host's static busybox (no registry is reachable).
//! - [`Container`]: `docker run -d --name relay-t-<pid>-<n>`, removed with
//!   `docker rm -f` on drop; [`Container::httpd`] serves a file on the
//!   container's own `127.0.0.1:8080`, out of the host's reach.
//!
//! The harness drives the `docker` CLI; relay's own API client is what the
//! tests exercise, so the harness stays independent of it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use nix::fcntl::{Flock, FlockArg};

use crate::ports::wait_listening;
use crate::tempdir::TempDir;
use crate::wait::poll_until;

/// Where dockerd listens.
pub const SOCKET: &str = "/var/run/docker.sock";
/// The test image's tag; rebuilt (from cache) by every test process.
pub const IMAGE: &str = "relay-tests/busybox:latest";
/// Where [`Container::httpd`] listens, inside its own namespace only.
pub const HTTPD_PORT: u16 = 8080;

/// Prefix of every container this harness creates.
const NAME_PREFIX: &str = "relay-t-";
/// dockerd's first start initialises its storage; later ones are quicker.
const DAEMON_START_TIMEOUT: Duration = Duration::from_secs(60);
/// From `docker run` returning to the server listening.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(30);

static NEXT: AtomicU32 = AtomicU32::new(0);
static DAEMON: OnceLock<Result<(), String>> = OnceLock::new();
static IMAGE_BUILT: OnceLock<Result<(), String>> = OnceLock::new();

/// Return `Ok(())` from the calling test unless Docker tests can run here:
/// root, `dockerd` and `docker` installed, and a static busybox to build
/// the image from.
#[macro_export]
macro_rules! require_docker {
    () => {
        $crate::require_root!("runs dockerd and enters container namespaces");
        $crate::require_tool!("dockerd");
        $crate::require_tool!("docker");
        if $crate::docker::static_busybox().is_none() {
            $crate::gate::report_skip(
                "needs a static busybox to build the test image FROM scratch \
                 (Debian package busybox-static)",
            );
            return Ok(());
        }
    };
}

/// Make sure dockerd answers on [`SOCKET`], starting it if needed.
///
/// Checked once per test process. A file lock keeps parallel test processes
/// from starting two daemons.
pub fn ensure_daemon() -> Result<()> {
    DAEMON
        .get_or_init(|| start_daemon_unless_running().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

fn start_daemon_unless_running() -> Result<()> {
    if ping() {
        return Ok(());
    }
    let lock_path = std::env::temp_dir().join("relay-tests-dockerd.lock");
    let lock_file =
        File::create(&lock_path).with_context(|| format!("creating {}", lock_path.display()))?;
    let _lock = Flock::lock(lock_file, FlockArg::LockExclusive)
        .map_err(|(_, errno)| anyhow!("locking {}: {errno}", lock_path.display()))?;
    // Another test process may have started it while this one waited.
    if ping() {
        return Ok(());
    }
    let log_path = std::env::temp_dir().join("relay-tests-dockerd.log");
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let log_err = log.try_clone().context("duplicating a log file handle")?;
    // Its own process group: the daemon outlives this test process, and a
    // test's Ctrl-C does not reach it.
    let mut daemon = Command::new("dockerd")
        .args(["--iptables=false", "--ip6tables=false"])
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .process_group(0)
        .spawn()
        .context("spawning dockerd")?;
    poll_until(
        &format!("dockerd to answer GET /_ping on {SOCKET}"),
        DAEMON_START_TIMEOUT,
        || {
            if let Some(status) = daemon.try_wait().context("checking on dockerd")? {
                bail!(
                    "dockerd exited with {status}; its log ({}) ends with:\n{}",
                    log_path.display(),
                    tail(&log_path, 20)
                );
            }
            Ok(ping().then_some(()))
        },
    )
    .with_context(|| format!("dockerd's log is {}", log_path.display()))
}

/// Stop the running dockerd (SIGTERM to the pid in `/var/run/docker.pid`)
/// and wait until it is gone, for tests of what survives a daemon restart.
/// Every container of the host stops with it; [`start_daemon`] brings the
/// daemon back.
pub fn stop_daemon() -> Result<()> {
    let pid_file = "/var/run/docker.pid";
    let pid: i32 = std::fs::read_to_string(pid_file)
        .with_context(|| format!("reading {pid_file}"))?
        .trim()
        .parse()
        .with_context(|| format!("{pid_file} does not hold a pid"))?;
    let pid = nix::unistd::Pid::from_raw(pid);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)
        .with_context(|| format!("signalling dockerd ({pid})"))?;
    poll_until("dockerd to exit", DAEMON_START_TIMEOUT, || {
        // dockerd removes its pid file last (a zombie would still take signals).
        Ok((!Path::new(pid_file).exists() && !ping()).then_some(()))
    })
}

/// Start dockerd again after [`stop_daemon`] (as [`ensure_daemon`] would).
pub fn start_daemon() -> Result<()> {
    start_daemon_unless_running()
}

/// True when the daemon answers `GET /_ping` with 200.
pub fn ping() -> bool {
    let answer = || -> std::io::Result<Vec<u8>> {
        let mut stream = UnixStream::connect(SOCKET)?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        stream.set_write_timeout(Some(Duration::from_secs(2)))?;
        stream.write_all(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw)?;
        Ok(raw)
    };
    answer().is_ok_and(|raw| raw.starts_with(b"HTTP/1.0 200") || raw.starts_with(b"HTTP/1.1 200"))
}

/// The last `lines` lines of a log file, for error messages.
fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A statically linked busybox on this host (it must run alone in a
/// `FROM scratch` image), if there is one.
pub fn static_busybox() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    ["/bin", "/usr/bin"]
        .iter()
        .map(PathBuf::from)
        .chain(on_path)
        .map(|dir| dir.join("busybox"))
        .find(|path| is_static_elf(path))
}

/// An x86-64/aarch64 (64-bit little-endian) ELF with no PT_INTERP header,
/// i.e. one that needs no dynamic loader.
fn is_static_elf(path: &Path) -> bool {
    const PT_INTERP: u32 = 3;
    let Ok(data) = std::fs::read(path) else {
        return false;
    };
    if data.len() < 64 || !data.starts_with(b"\x7fELF\x02\x01") {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([data[o], data[o + 1]]) as usize;
    let Ok(phoff) = usize::try_from(u64::from_le_bytes(
        data[0x20..0x28]
            .try_into()
            .expect("invariant: an 8-byte slice"),
    )) else {
        return false;
    };
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    (0..phnum).all(|i| {
        let at = phoff + i * phentsize;
        data.get(at..at + 4)
            .is_some_and(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) != PT_INTERP)
    })
}

/// Build [`IMAGE`] (once per test process) and return its tag.
///
/// `FROM scratch`, busybox at `/bin/busybox`, its applets linked into
/// `/bin` by `busybox --install`. The legacy builder is used because the
/// CLI may come without buildx.
pub fn image() -> Result<&'static str> {
    IMAGE_BUILT
        .get_or_init(|| build_image().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))?;
    Ok(IMAGE)
}

fn build_image() -> Result<()> {
    ensure_daemon()?;
    let busybox = static_busybox().context("no static busybox (install busybox-static)")?;
    let context = TempDir::new("docker-image")?;
    std::fs::copy(&busybox, context.join("busybox"))
        .with_context(|| format!("copying {} into the build context", busybox.display()))?;
    std::fs::write(
        context.join("Dockerfile"),
        "FROM scratch\n\
         COPY busybox /bin/busybox\n\
         RUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n",
    )
    .context("writing the Dockerfile")?;
    let mut cmd = Command::new("docker");
    cmd.env("DOCKER_BUILDKIT", "0")
        .args(["build", "--quiet", "--tag", IMAGE])
        .arg(context.path());
    run(cmd).map(drop)
}

/// Run a `docker` command; its trimmed stdout, or an error with its stderr.
pub fn docker(args: &[&str]) -> Result<String> {
    let mut cmd = Command::new("docker");
    cmd.args(args);
    run(cmd)
}

fn run(cmd: Command) -> Result<String> {
    crate::child::output_of(cmd).map(|out| out.trim().to_string())
}

/// A container from [`image`], removed (`docker rm -f`) on drop.
#[derive(Debug)]
pub struct Container {
    name: String,
    id: String,
}

impl Container {
    /// `docker run -d --name relay-t-<pid>-<n> <image> <command...>`.
    pub fn run(command: &[&str]) -> Result<Self> {
        Self::run_named(next_name(), command)
    }

    /// [`Self::run`] with `docker run` options before the image
    /// (`--label k=v`, `--network host`).
    pub fn run_with(options: &[&str], command: &[&str]) -> Result<Self> {
        Self::run_named_with(next_name(), options, command)
    }

    fn run_named(name: String, command: &[&str]) -> Result<Self> {
        Self::run_named_with(name, &[], command)
    }

    fn run_named_with(name: String, options: &[&str], command: &[&str]) -> Result<Self> {
        static SWEEP: std::sync::Once = std::sync::Once::new();
        let image = image()?;
        SWEEP.call_once(sweep_stale);
        let mut args = vec!["run", "--detach", "--name", &name];
        args.extend_from_slice(options);
        args.push(image);
        args.extend_from_slice(command);
        let id = match docker(&args) {
            Ok(id) => id,
            Err(e) => {
                // A container that was created but failed to start still exists.
                let _ = docker(&["rm", "--force", &name]);
                return Err(e);
            }
        };
        Ok(Self { name, id })
    }

    /// `busybox httpd` on the container's own `127.0.0.1:8080`, serving
    /// `/index.html` = [`Self::httpd_body`]; returns once it listens.
    pub fn httpd() -> Result<Self> {
        Self::httpd_on(std::net::Ipv4Addr::LOCALHOST)
    }

    /// [`Self::httpd`] bound to `bind` inside the container: `0.0.0.0`
    /// makes it reachable from the host at [`Self::ip`].
    pub fn httpd_on(bind: std::net::Ipv4Addr) -> Result<Self> {
        Self::httpd_with(bind, &[])
    }

    /// [`Self::httpd_on`] with `docker run` options (`--label k=v`).
    pub fn httpd_with(bind: std::net::Ipv4Addr, options: &[&str]) -> Result<Self> {
        let name = next_name();
        // The body is the container's name: no other container serves it.
        let script = format!(
            "mkdir -p /www && echo {name} > /www/index.html && \
             exec httpd -f -p {bind}:{HTTPD_PORT} -h /www"
        );
        let container = Self::run_named_with(name, options, &["sh", "-c", &script])?;
        container.wait_listening(HTTPD_PORT)?;
        Ok(container)
    }

    /// What [`Self::httpd`] serves at `/`: the container's name and a newline.
    pub fn httpd_body(&self) -> String {
        format!("{}\n", self.name)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The full id `docker run` printed.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// `docker inspect --format <format>` of this container.
    pub fn inspect(&self, format: &str) -> Result<String> {
        docker(&["inspect", "--format", format, &self.name])
    }

    /// The container's address on Docker's bridge (its `eth0`).
    pub fn ip(&self) -> Result<std::net::Ipv4Addr> {
        let ip = self.inspect("{{.NetworkSettings.IPAddress}}")?;
        ip.parse()
            .with_context(|| format!("container {}: IPAddress {ip:?} is not IPv4", self.name))
    }

    /// The container's init process on the host.
    pub fn pid(&self) -> Result<u32> {
        let pid = self.inspect("{{.State.Pid}}")?;
        match pid.parse::<u32>() {
            Ok(0) => bail!("container {} is not running (State.Pid is 0)", self.name),
            Ok(pid) => Ok(pid),
            Err(_) => bail!("container {}: State.Pid {pid:?} is not a pid", self.name),
        }
    }

    /// Poll until the container's namespace has a LISTEN socket on `port`.
    pub fn wait_listening(&self, port: u16) -> Result<()> {
        let pid = self.pid()?;
        wait_listening(pid, port, LISTEN_TIMEOUT).with_context(|| {
            let logs = docker(&["logs", &self.name]).unwrap_or_else(|e| format!("{e:#}"));
            format!("container {} never listened; its logs:\n{logs}", self.name)
        })
    }

    /// Kill the container and wait until Docker reports it stopped.
    pub fn stop(&self) -> Result<()> {
        docker(&["stop", "--time", "0", &self.name]).map(drop)
    }

    /// `docker rename` to this name plus `suffix` (still the harness's
    /// prefix, so the drop and the stale sweep find it).
    pub fn rename(&mut self, suffix: &str) -> Result<()> {
        let to = format!("{}{suffix}", self.name);
        docker(&["rename", &self.name, &to])?;
        self.name = to;
        Ok(())
    }

    /// Kill and start again (same id, new process, new network namespace).
    pub fn restart(&self) -> Result<()> {
        docker(&["restart", "--time", "0", &self.name]).map(drop)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if let Err(e) = docker(&["rm", "--force", &self.name]) {
            eprintln!("warning: could not remove container {}: {e:#}", self.name);
        }
    }
}

/// `relay-t-<pid>-<n>`, unique within this host while this process lives.
fn next_name() -> String {
    format!(
        "{NAME_PREFIX}{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Remove `relay-t-<pid>-*` containers whose test process no longer exists.
fn sweep_stale() {
    let Ok(names) = docker(&[
        "ps",
        "--all",
        "--filter",
        &format!("name=^{NAME_PREFIX}"),
        "--format",
        "{{.Names}}",
    ]) else {
        return;
    };
    for name in names.lines() {
        let Some(pid) = name
            .strip_prefix(NAME_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = docker(&["rm", "--force", name]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dynamic_executable_is_not_static() {
        // The test binary itself links libc dynamically.
        let me = std::env::current_exe().expect("the test binary's path");
        assert!(!is_static_elf(&me), "{} should need a loader", me.display());
        assert!(!is_static_elf(Path::new("/nonexistent")));
    }
}
