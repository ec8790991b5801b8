//! External processes owned by a test: logged to files, killed on drop.
//!
//! Each child runs in its own process group so that forking servers
//! (socat with `fork`, nginx's workers) die with it. Its stdout and stderr go
//! to one log file; the log is printed when the owner drops it, which libtest
//! shows only for failing tests.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::ports::is_listening;
use crate::tempdir::TempDir;
use crate::wait::{POLL_INTERVAL, poll_until};

/// A running external process and its log.
#[derive(Debug)]
pub struct ChildProc {
    label: String,
    command_line: String,
    child: Child,
    log_path: PathBuf,
    // Owns the log file's directory; declared last so it outlives the kill.
    _dir: TempDir,
}

impl ChildProc {
    /// Spawn `cmd` in a new process group, stdin closed, output to a log file.
    pub fn spawn(label: &str, cmd: Command) -> Result<Self> {
        Self::spawn_with(label, cmd, false)
    }

    /// Like [`Self::spawn`], but the caller drives stdin and reads stdout
    /// (an interactive client); only stderr goes to the log.
    pub fn spawn_piped(label: &str, cmd: Command) -> Result<(Self, ChildStdin, ChildStdout)> {
        let mut proc = Self::spawn_with(label, cmd, true)?;
        let stdin = proc.child.stdin.take();
        let stdout = proc.child.stdout.take();
        match (stdin, stdout) {
            (Some(stdin), Some(stdout)) => Ok((proc, stdin, stdout)),
            _ => anyhow::bail!("spawning {label}: no pipes to its stdin and stdout"),
        }
    }

    fn spawn_with(label: &str, mut cmd: Command, piped: bool) -> Result<Self> {
        let dir = TempDir::new(label)?;
        let log_path = dir.join("output.log");
        let log =
            File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let log_err = log.try_clone().context("duplicating a log file handle")?;
        let command_line = format!("{cmd:?}");
        let (stdin, stdout) = if piped {
            (Stdio::piped(), Stdio::piped())
        } else {
            (Stdio::null(), Stdio::from(log))
        };
        let child = cmd
            .stdin(stdin)
            .stdout(stdout)
            .stderr(Stdio::from(log_err))
            .process_group(0)
            .spawn()
            .with_context(|| format!("spawning {label}: {command_line}"))?;
        Ok(Self {
            label: label.to_string(),
            command_line,
            child,
            log_path,
            _dir: dir,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path)
            .unwrap_or_else(|e| format!("<could not read {}: {e}>", self.log_path.display()))
    }

    /// Fail (with the log) if the process has already exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait().context("checking a child's status")? {
            anyhow::bail!(
                "{} exited early with {status}\ncommand: {}\noutput:\n{}",
                self.label,
                self.command_line,
                self.log()
            );
        }
        Ok(())
    }

    /// Poll until the process listens on `port` in its own network namespace.
    pub fn wait_listening(&mut self, port: u16, timeout: Duration) -> Result<()> {
        let pid = self.pid();
        poll_until(
            &format!("{} to listen on port {port}", self.label),
            timeout,
            || {
                self.ensure_running()?;
                Ok(is_listening(pid, port)?.then_some(()))
            },
        )
        .with_context(|| {
            format!(
                "{} never listened; output so far:\n{}",
                self.label,
                self.log()
            )
        })
    }

    /// Send `signal` to the process (not its group).
    pub fn signal(&self, signal: Signal) -> Result<()> {
        nix::sys::signal::kill(self.nix_pid(), signal)
            .with_context(|| format!("sending {signal} to {} (pid {})", self.label, self.pid()))
    }

    /// Poll for the process's exit; `None` if it is still running at `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().context("waiting for a child")? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    fn nix_pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.pid()).expect("invariant: Linux pids fit in i32"))
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn command_line(&self) -> &str {
        &self.command_line
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        // The whole group: forked socat children and nginx workers too.
        let _ = killpg(self.nix_pid(), Signal::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
        eprintln!(
            "---- {} output ({}) ----\n{}---- end of {} output ----",
            self.label,
            self.command_line,
            self.log(),
            self.label
        );
    }
}

/// Run `cmd` to completion (stdin closed): its exit status and all it
/// printed, stdout then stderr, for checkers whose verdict is in the text
/// (promtool, systemd-analyze, kubernetes-validate).
pub fn status_and_text(mut cmd: Command) -> Result<(ExitStatus, String)> {
    let line = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {line}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status, text))
}

/// Run `cmd` to completion (stdin closed); its stdout, or an error naming
/// the command with its exit status and stderr.
pub fn output_of(mut cmd: Command) -> Result<String> {
    let line = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {line}"))?;
    if !out.status.success() {
        anyhow::bail!(
            "{line} exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
