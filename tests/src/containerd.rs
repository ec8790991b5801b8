//! A private containerd for tests, driven with `ctr`, as on a Kubernetes
//! node without dockerd.
//!
//! [`Containerd::start`] (or [`Containerd::prepare`], then
//! [`Containerd::start_daemon`]) runs Debian's `containerd` with its own root,
//! state and socket under a scratch directory (the CRI plugin off, no TCP
//! listener), so it shares nothing with the host's containerd or dockerd's,
//! and each test has its own. [`Containerd::import_image`] loads the busybox
//! test image from `docker save` (no registry is reachable);
//! [`Containerd::run`] starts a container with labels and, as CNI would
//! arrange it, inside a given network namespace
//! (`--with-ns network:<path>`). Dropping it kills the containers it
//! started, stops the daemon and removes the directory.
//!
//! The harness drives the `ctr` CLI; relay's own gRPC client is what the
//! tests exercise.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;

use crate::child::{ChildProc, output_of};
use crate::docker;
use crate::tempdir::TempDir;
use crate::wait::poll_until;

/// The test image as containerd names it after the import.
pub const IMAGE: &str = "docker.io/relay-tests/busybox:latest";
/// containerd's first start initialises its storage.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Return `Ok(())` from the calling test unless containerd tests can run
/// here: Docker's (for `docker save` of the busybox image) plus
/// `containerd`, `ctr` and `runc`.
#[macro_export]
macro_rules! require_containerd {
    () => {
        $crate::require_docker!();
        $crate::require_tool!("containerd");
        $crate::require_tool!("ctr");
        $crate::require_tool!("runc");
    };
}

/// A running containerd of this test's own.
pub struct Containerd {
    daemon: Option<ChildProc>,
    socket: PathBuf,
    config: PathBuf,
    /// (namespace, id) of every container started, removed on drop.
    started: Vec<(String, String)>,
    // Declared last: removed after the daemon is gone.
    dir: TempDir,
}

impl Containerd {
    /// Starts containerd and waits until `ctr version` answers.
    pub fn start() -> Result<Self> {
        let mut containerd = Self::prepare()?;
        containerd.start_daemon()?;
        Ok(containerd)
    }

    /// Its directory and config only: [`Self::socket`] is known, nothing
    /// listens there until [`Self::start_daemon`].
    pub fn prepare() -> Result<Self> {
        let dir = TempDir::new("containerd")?;
        let socket = dir.join("containerd.sock");
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\n\
                 root = \"{root}\"\n\
                 state = \"{state}\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{sock}\"\n\
                 [ttrpc]\n  address = \"{sock}.ttrpc\"\n\
                 [debug]\n  address = \"\"\n\
                 [metrics]\n  address = \"\"\n",
                root = dir.join("root").display(),
                state = dir.join("state").display(),
                sock = socket.display(),
            ),
        )
        .context("writing containerd's config")?;
        Ok(Containerd {
            daemon: None,
            socket,
            config,
            started: Vec::new(),
            dir,
        })
    }

    /// The API socket relay is pointed at.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Starts the daemon (again, after [`Self::stop_daemon`]).
    pub fn start_daemon(&mut self) -> Result<()> {
        let mut cmd = Command::new("containerd");
        cmd.arg("--config").arg(&self.config);
        self.daemon = Some(ChildProc::spawn("containerd", cmd)?);
        poll_until("containerd to answer `ctr version`", START_TIMEOUT, || {
            if let Some(daemon) = self.daemon.as_mut() {
                daemon.ensure_running()?;
            }
            Ok(self.ctr("default", &["version"]).is_ok().then_some(()))
        })
    }

    /// Stops the daemon; its containers keep running (their shims are
    /// processes of their own), as across a real containerd restart.
    pub fn stop_daemon(&mut self) -> Result<()> {
        let Some(mut daemon) = self.daemon.take() else {
            return Ok(());
        };
        daemon.signal(Signal::SIGTERM)?;
        if daemon.wait_exit(START_TIMEOUT)?.is_none() {
            bail!("containerd did not exit within {START_TIMEOUT:?} of SIGTERM");
        }
        Ok(())
    }

    /// `ctr --address <socket> -n <namespace> <args>`; its trimmed stdout.
    pub fn ctr(&self, namespace: &str, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(&self.socket)
            .args(["--namespace", namespace])
            .args(args);
        output_of(cmd).map(|out| out.trim().to_string())
    }

    /// The busybox test image, from `docker save`, in `namespace`.
    pub fn import_image(&self, namespace: &str) -> Result<&'static str> {
        let tar = self.dir.join("busybox.tar");
        if !tar.exists() {
            let tag = docker::image()?;
            docker::docker(&["save", tag, "-o", &tar.display().to_string()])?;
        }
        self.ctr(namespace, &["images", "import", &tar.display().to_string()])?;
        Ok(IMAGE)
    }

    /// `ctr run -d` container `id` in `namespace` with `labels`, joining the
    /// network namespace at `netns` when given (else a namespace of its own
    /// with only loopback), running `command`. Returns its init pid.
    pub fn run(
        &mut self,
        namespace: &str,
        id: &str,
        labels: &[(&str, &str)],
        netns: Option<&Path>,
        command: &[&str],
    ) -> Result<u32> {
        let mut args: Vec<String> = vec!["run".into(), "-d".into()];
        for (key, value) in labels {
            args.extend(["--label".into(), format!("{key}={value}")]);
        }
        if let Some(path) = netns {
            args.extend(["--with-ns".into(), format!("network:{}", path.display())]);
        }
        args.extend([IMAGE.to_string(), id.to_string()]);
        args.extend(command.iter().map(|c| c.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        self.ctr(namespace, &refs)
            .with_context(|| format!("ctr run {id} in namespace {namespace}"))?;
        self.started.push((namespace.to_string(), id.to_string()));
        self.pid(namespace, id)
    }

    /// The init pid of container `id`'s task.
    pub fn pid(&self, namespace: &str, id: &str) -> Result<u32> {
        let listing = self.ctr(namespace, &["tasks", "ls"])?;
        listing
            .lines()
            .filter_map(|line| {
                let mut fields = line.split_whitespace();
                (fields.next()? == id).then(|| fields.next()?.parse().ok())?
            })
            .next()
            .with_context(|| format!("no task {id} in `ctr tasks ls`:\n{listing}"))
    }

    /// Kills container `id`'s task and removes the container.
    pub fn remove(&mut self, namespace: &str, id: &str) -> Result<()> {
        let _ = self.ctr(namespace, &["tasks", "kill", "-s", "SIGKILL", id]);
        poll_until(&format!("task {id} to stop"), START_TIMEOUT, || {
            Ok(self
                .ctr(namespace, &["tasks", "rm", id])
                .is_ok()
                .then_some(()))
        })?;
        self.ctr(namespace, &["containers", "rm", id])?;
        self.started
            .retain(|(ns, started)| !(ns == namespace && started == id));
        Ok(())
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if self.daemon.is_none() && !self.started.is_empty() && self.start_daemon().is_err() {
            eprintln!("warning: containerd would not start again to remove its containers");
        }
        for (namespace, id) in std::mem::take(&mut self.started) {
            if let Err(e) = self.remove(&namespace, &id) {
                eprintln!("warning: could not remove container {namespace}/{id}: {e:#}");
            }
        }
        if let Err(e) = self.stop_daemon() {
            eprintln!("warning: {e:#}");
        }
    }
}
