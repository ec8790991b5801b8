//! The ways a benchmark client reaches its server: directly, or through one
//! of the forwarders (socat, HAProxy plain and with splice, nginx stream,
//! docker-proxy, stunnel, relay). [`Hop::start`] puts a forwarder in front
//! of a server port and returns the port the client should dial; what each
//! peer is told is written by `peers.rs`, and every hop's configuration (or
//! command line, for tools that take no file) is kept in
//! `target/bench/<via>-<label>.conf` for anyone to check.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::peers::{self, Job, Route, TlsSide};
use super::procs::{self, Proc};
use crate::{cmd, packages, workspace};

/// One way from client to server. The order is the table's column order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Via {
    Direct,
    Socat,
    Haproxy,
    HaproxySplice,
    Nginx,
    DockerProxy,
    Stunnel,
    Relay,
}

impl Via {
    pub const ALL: [Via; 8] = [
        Via::Direct,
        Via::Socat,
        Via::Haproxy,
        Via::HaproxySplice,
        Via::Nginx,
        Via::DockerProxy,
        Via::Stunnel,
        Via::Relay,
    ];
    /// Everything that forwards plain TCP, one route per process.
    pub const PLAIN: &[Via] = &[
        Via::Direct,
        Via::Socat,
        Via::Haproxy,
        Via::HaproxySplice,
        Via::Nginx,
        Via::DockerProxy,
        Via::Relay,
    ];
    /// Everything that terminates and originates TLS (splice cannot apply
    /// to TLS, so HAProxy runs once).
    pub const TLS: &[Via] = &[
        Via::Direct,
        Via::Socat,
        Via::Stunnel,
        Via::Haproxy,
        Via::Nginx,
        Via::Relay,
    ];
    /// Everything that serves many routes from one process.
    pub const MULTI_ROUTE: &[Via] = &[
        Via::Direct,
        Via::Haproxy,
        Via::HaproxySplice,
        Via::Nginx,
        Via::Relay,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Via::Direct => "direct",
            Via::Socat => "socat",
            Via::Haproxy => "haproxy",
            Via::HaproxySplice => "haproxy-splice",
            Via::Nginx => "nginx",
            Via::DockerProxy => "docker-proxy",
            Via::Stunnel => "stunnel",
            Via::Relay => "relay",
        }
    }

    pub fn from_name(name: &str) -> Option<Via> {
        Via::ALL.into_iter().find(|v| v.name() == name)
    }

    /// A forwarder relay is compared with (not direct, not relay itself).
    pub fn is_peer(self) -> bool {
        !matches!(self, Via::Direct | Via::Relay)
    }

    /// Whether its processes are several (socat's forks, nginx's workers),
    /// so memory is the group's summed Pss rather than one VmRSS.
    pub fn multi_process(self) -> bool {
        matches!(self, Via::Socat | Via::Nginx | Via::Stunnel)
    }
}

/// Per-forwarder knobs a section needs.
#[derive(Clone, Copy, Debug, Default)]
pub struct HopOptions {
    /// socat: set TCP_NODELAY on both legs (relay and the others always do).
    pub nodelay: bool,
    /// Connections the forwarder must hold at once (relay:
    /// `--max-connections`; None: relay's default; the peers' limits are
    /// set well above it either way).
    pub max_connections: Option<usize>,
    /// relay: `--data-path` (None: relay's default, auto).
    pub data_path: Option<&'static str>,
}

/// A running forwarder (or none, for `Direct`) and the ports to dial.
pub struct Hop {
    /// The first (usually only) route's port.
    pub port: u16,
    /// Every route's port, in the order of the targets given.
    pub ports: Vec<u16>,
    pub proc: Option<Proc>,
}

impl Hop {
    /// Put `via` in front of 127.0.0.1:`target_port`; returns once the
    /// forwarder listens (polled in /proc/net/tcp, so no test connection
    /// reaches the server). `label` names the log and configuration files.
    pub fn start(
        via: Via,
        target_port: u16,
        relay_bin: &Path,
        label: &str,
        opts: HopOptions,
    ) -> Result<Hop> {
        Hop::start_job(via, &[target_port], None, relay_bin, label, opts)
    }

    /// [`Hop::start`] with TLS on one side.
    pub fn start_tls(
        via: Via,
        target_port: u16,
        tls: TlsSide,
        relay_bin: &Path,
        label: &str,
        opts: HopOptions,
    ) -> Result<Hop> {
        Hop::start_job(via, &[target_port], Some(tls), relay_bin, label, opts)
    }

    /// One process forwarding a port of its own to each of `targets`.
    pub fn start_routes(
        via: Via,
        targets: &[u16],
        relay_bin: &Path,
        label: &str,
        opts: HopOptions,
    ) -> Result<Hop> {
        Hop::start_job(via, targets, None, relay_bin, label, opts)
    }

    fn start_job(
        via: Via,
        targets: &[u16],
        tls: Option<TlsSide>,
        relay_bin: &Path,
        label: &str,
        opts: HopOptions,
    ) -> Result<Hop> {
        if via == Via::Direct {
            if tls.is_some() {
                bail!("invariant: direct runs start no TLS hop");
            }
            return Ok(Hop {
                port: targets.first().copied().context("a hop needs a target")?,
                ports: targets.to_vec(),
                proc: None,
            });
        }
        let routes = targets
            .iter()
            .map(|&target| {
                Ok(Route {
                    listen: procs::free_port()?,
                    target,
                })
            })
            .collect::<Result<Vec<Route>>>()?;
        let name = format!("{}-{label}", via.name());
        let run_dir = workspace::bench_dir().join("run").join(&name);
        // A previous run's pid file or log must not be taken for this one's.
        let _ = std::fs::remove_dir_all(&run_dir);
        std::fs::create_dir_all(&run_dir)
            .with_context(|| format!("cannot create {}", run_dir.display()))?;
        let job = Job {
            routes: &routes,
            tls,
            max_connections: opts.max_connections.unwrap_or(10_000),
            splice: via == Via::HaproxySplice,
            run_dir: &run_dir,
            fd_limit: peers::fd_hard_limit(),
        };
        let conf_path = workspace::bench_dir().join(format!("{name}.conf"));
        let (mut command, conf) = command(via, &job, &conf_path, relay_bin, opts)
            .with_context(|| format!("{} cannot do this job", via.name()))?;
        let conf = match conf {
            Some(text) => text,
            None => format!(
                "# {} takes no configuration file; its command line:\n{}\n",
                via.name(),
                cmd::render(&command)
            ),
        };
        std::fs::write(&conf_path, conf)
            .with_context(|| format!("cannot write {}", conf_path.display()))?;

        let ready = (via == Via::DockerProxy)
            .then(|| fd3_readiness(&mut command))
            .transpose()?;
        let mut proc = Proc::spawn(&name, command)?;
        if let Some(reader) = ready {
            wait_fd3(reader, &mut proc).with_context(|| format!("{name} did not come up"))?;
        }
        let ports: Vec<u16> = routes.iter().map(|r| r.listen).collect();
        procs::wait_all_listening(&ports, &mut proc, Duration::from_secs(30))
            .with_context(|| format!("{name} did not come up (see {})", conf_path.display()))?;
        Ok(Hop {
            port: ports[0],
            ports,
            proc: Some(proc),
        })
    }

    /// Err when the forwarder died during a measurement (its stderr says why).
    pub fn check_alive(&mut self) -> Result<()> {
        match &mut self.proc {
            Some(proc) => proc.check_alive(),
            None => Ok(()),
        }
    }

    /// The forwarder's process group (None for direct).
    pub fn pgid(&self) -> Option<i32> {
        self.proc.as_ref().map(Proc::pid)
    }
}

/// The command that starts `via` on `job`, and its configuration file's
/// text when it takes one (written to `conf_path` before it starts).
fn command(
    via: Via,
    job: &Job,
    conf_path: &Path,
    relay_bin: &Path,
    opts: HopOptions,
) -> Result<(Command, Option<String>)> {
    Ok(match via {
        Via::Direct => bail!("invariant: direct starts no process"),
        Via::Socat => {
            let [route] = job.routes else {
                bail!("socat serves one route per process");
            };
            let nodelay = if opts.nodelay { ",nodelay" } else { "" };
            // socat's default backlog is 5; give it relay's, so that a burst
            // of connects is not what separates them.
            let listen_opts = format!(
                "fork,reuseaddr,bind=127.0.0.1,backlog={}{nodelay}",
                peers::BACKLOG
            );
            let (listen, connect) = match &job.tls {
                None => (
                    format!("TCP-LISTEN:{},{listen_opts}", route.listen),
                    format!("TCP:127.0.0.1:{}{nodelay}", route.target),
                ),
                Some(tls @ TlsSide::Terminate(_)) => {
                    let (cert, key, _, _) = tls_files(tls);
                    (
                        format!(
                            "OPENSSL-LISTEN:{},{listen_opts},cert={},key={},verify=0",
                            route.listen,
                            cert.display(),
                            key.display()
                        ),
                        format!("TCP:127.0.0.1:{}{nodelay}", route.target),
                    )
                }
                Some(tls @ TlsSide::Originate(_)) => {
                    let (_, _, ca, name) = tls_files(tls);
                    (
                        format!("TCP-LISTEN:{},{listen_opts}", route.listen),
                        format!(
                            "OPENSSL:127.0.0.1:{},cafile={},commonname={name}{nodelay}",
                            route.target,
                            ca.display()
                        ),
                    )
                }
            };
            let mut cmd = Command::new("socat");
            cmd.arg(listen).arg(connect);
            (cmd, None)
        }
        Via::Haproxy | Via::HaproxySplice => {
            let bin = find("haproxy", "haproxy")?;
            let mut cmd = Command::new(bin);
            // -db: foreground, no daemon, one process (its 2 threads).
            cmd.arg("-db").arg("-f").arg(conf_path);
            (cmd, Some(peers::haproxy(job)?))
        }
        Via::Nginx => {
            let bin = find("nginx", "nginx-light")?;
            let module = nginx_stream_module(&bin)?;
            let mut cmd = Command::new(bin);
            cmd.arg("-p")
                .arg(job.run_dir)
                .arg("-c")
                .arg(conf_path)
                .arg("-e")
                .arg(job.run_dir.join("error.log"));
            (cmd, Some(peers::nginx(job, module.as_deref())?))
        }
        Via::DockerProxy => {
            let bin = find("docker-proxy", "docker.io")?;
            let mut cmd = Command::new(bin);
            cmd.args(peers::docker_proxy_args(job)?);
            (cmd, None)
        }
        Via::Stunnel => {
            let bin = find("stunnel4", "stunnel4").or_else(|_| find("stunnel", "stunnel4"))?;
            let mut cmd = Command::new(bin);
            cmd.arg(conf_path);
            (cmd, Some(peers::stunnel(job)?))
        }
        Via::Relay => relay_command(job, conf_path, relay_bin, opts)?,
    })
}

/// (cert, key, CA, name) of a TLS side.
fn tls_files(tls: &TlsSide) -> (PathBuf, PathBuf, PathBuf, &'static str) {
    match tls {
        TlsSide::Terminate(f) | TlsSide::Originate(f) => {
            (f.cert.clone(), f.key.clone(), f.ca.clone(), f.name)
        }
    }
}

/// relay: `relay forward` for one route, `relay run -c` for several.
fn relay_command(
    job: &Job,
    conf_path: &Path,
    relay_bin: &Path,
    opts: HopOptions,
) -> Result<(Command, Option<String>)> {
    let mut cmd = Command::new(relay_bin);
    if let [route] = job.routes {
        let (listen, target) = (
            format!("127.0.0.1:{}", route.listen),
            format!("127.0.0.1:{}", route.target),
        );
        cmd.arg("forward");
        match &job.tls {
            None => {
                cmd.arg(listen).arg(target);
            }
            Some(tls @ TlsSide::Terminate(_)) => {
                let (cert, key, _, _) = tls_files(tls);
                cmd.arg(format!("tls://{listen}"))
                    .arg(target)
                    .arg("--tls-cert")
                    .arg(cert)
                    .arg("--tls-key")
                    .arg(key);
            }
            Some(tls @ TlsSide::Originate(_)) => {
                let (_, _, ca, name) = tls_files(tls);
                cmd.arg(listen)
                    .arg(format!("tls://{target}"))
                    .arg("--tls-ca")
                    .arg(ca)
                    .args(["--tls-name", name]);
            }
        }
        if let Some(max) = opts.max_connections {
            cmd.arg("--max-connections").arg(max.to_string());
        }
        if let Some(path) = opts.data_path {
            cmd.arg("--data-path").arg(path);
            if path == "sockmap" {
                // Experimental (known defects); the bench still measures it.
                cmd.arg("--experimental-sockmap");
            }
        }
        return Ok((cmd, None));
    }
    if job.tls.is_some() {
        bail!("invariant: the multi-route row is plain TCP");
    }
    let mut text =
        String::from("# relay with one route per port, written by `cargo xtask bench`.\n");
    for (i, route) in job.routes.iter().enumerate() {
        text.push_str(&format!(
            "\n[[route]]\nname = \"r{i}\"\nlisten = \"127.0.0.1:{}\"\ntarget = \"127.0.0.1:{}\"\n",
            route.listen, route.target
        ));
        if let Some(path) = opts.data_path {
            text.push_str(&format!("data-path = \"{path}\"\n"));
        }
    }
    cmd.arg("run").arg("-c").arg(conf_path).arg("-q");
    Ok((cmd, Some(text)))
}

/// A program from PATH or sbin, or an error naming the Debian package.
fn find(program: &str, package: &str) -> Result<PathBuf> {
    packages::find_program(program).with_context(|| {
        format!("{program} not found; install the Debian package {package} (`cargo xtask bench` installs missing ones as root)")
    })
}

/// Asked once per run: is nginx's stream module built in or a `.so`?
fn nginx_stream_module(nginx: &Path) -> Result<Option<PathBuf>> {
    static MODULE: OnceLock<Result<Option<PathBuf>, String>> = OnceLock::new();
    MODULE
        .get_or_init(|| peers::nginx_stream_module(nginx).map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

/// docker-proxy reports readiness on fd 3 ("0\n", or "1\n<error>"), as
/// dockerd expects: hand it the write end of a pipe there.
fn fd3_readiness(cmd: &mut Command) -> Result<std::io::PipeReader> {
    let (reader, writer) = std::io::pipe().context("cannot make docker-proxy's readiness pipe")?;
    // SAFETY: between fork and exec only async-signal-safe calls are made
    // (dup2 and fcntl); nothing is allocated. The fd written to is 3, which
    // the child owns from here on, so the OwnedFd dup2_raw returns is leaked
    // on purpose rather than closed.
    unsafe {
        cmd.pre_exec(move || {
            let raw = writer.as_raw_fd();
            if raw == 3 {
                // Already there: only the close-on-exec flag must go.
                nix::fcntl::fcntl(
                    &writer,
                    nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
                )
                .map_err(std::io::Error::from)?;
            } else {
                std::mem::forget(nix::unistd::dup2_raw(&writer, 3).map_err(std::io::Error::from)?);
            }
            Ok(())
        });
    }
    Ok(reader)
}

/// Read docker-proxy's readiness report; Err with its message or stderr.
fn wait_fd3(reader: std::io::PipeReader, proc: &mut Proc) -> Result<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    // The child holds the only write end now (Proc::spawn consumed the
    // Command, and the writer in its pre_exec closure with it), so EOF
    // follows the report, or the child's death.
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = (&reader).take(4096).read_to_string(&mut text);
        let _ = tx.send(text);
    });
    let text = match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(text) => text,
        Err(_) => bail!("docker-proxy wrote nothing on fd 3 in 30 s"),
    };
    match text.split_once('\n') {
        Some(("0", _)) => Ok(()),
        Some(("1", err)) => bail!("docker-proxy reported on fd 3: {err}"),
        _ => {
            proc.check_alive()?;
            bail!("docker-proxy wrote `{text}` on fd 3 (expected `0\\n`)")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in for docker-proxy: writes `report` on fd 3 and closes it,
    /// then keeps running, as docker-proxy does.
    fn fake(report: &str) -> Result<()> {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!("printf '{report}' >&3; exec 3>&-; sleep 5"));
        let reader = fd3_readiness(&mut cmd)?;
        let mut proc = Proc::spawn("fd3-test", cmd)?;
        wait_fd3(reader, &mut proc)
    }

    #[test]
    fn fd3_readiness_passes_on_zero_and_reports_the_error_otherwise() {
        fake("0\\n").unwrap();
        let err = fake("1\\nlisten tcp 127.0.0.1:1: bind: permission denied").unwrap_err();
        assert!(
            format!("{err:#}").contains("bind: permission denied"),
            "{err:#}"
        );
        assert!(fake("").is_err());
    }

    #[test]
    fn peers_are_named_and_found_by_name() {
        for via in Via::ALL {
            assert_eq!(Via::from_name(via.name()), Some(via));
        }
        assert!(!Via::Direct.is_peer() && !Via::Relay.is_peer() && Via::Nginx.is_peer());
        assert!(!Via::PLAIN.contains(&Via::Stunnel) && !Via::TLS.contains(&Via::DockerProxy));
    }
}
