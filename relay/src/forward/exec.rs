//! EXEC/SYSTEM targets: one child process per connection, its stdin and
//! stdout one end of a UNIX socket pair whose other end is the
//! connection's upstream leg (socat's default), so every data path that
//! works on a UNIX socket works here, and a half-close reaches the child
//! as EOF on its stdin. With `pty` they are a new terminal instead, the
//! child's controlling one in a session of its own, and relay's leg is
//! the terminal's master side (`file::FileLeg`): a half-close reaches the
//! child as the terminal's end-of-file character.
//!
//! This module owns a child's whole life, so none is left behind:
//! - started with `PR_SET_PDEATHSIG` = SIGKILL, so it dies with relay
//!   even if relay is killed outright (the signal follows the thread that
//!   forked, a tokio worker, which lives as long as the runtime);
//! - [`Child::finish`], after the connection's end: the child has its EOF
//!   (relay closed its end of the pair) and a moment to exit; then SIGTERM,
//!   then SIGKILL; it is always waited for (no zombie), and how it ended is
//!   logged and counted (`relay_exec_children_total`);
//! - a child whose task is dropped before that (the runtime shutting down)
//!   is killed and reaped by tokio (`kill_on_drop`).

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::time::Duration;

use tokio::net::UnixStream;

use super::file::{FileLeg, eof_char, set_terminal};
use super::stream::Socket;
use crate::addr::ExecSpec;

/// How long a child may take to exit after its stdin closed, and again
/// after SIGTERM, before the next step.
const GRACE: Duration = Duration::from_secs(2);

/// A running child of one connection.
pub struct Child {
    child: tokio::process::Child,
    program: String,
}

/// How a child ended, for the log and the `exit` label.
pub struct Exit {
    pub label: &'static str,
    pub status: String,
}

/// Starts `spec` with its stdin and stdout (and, with `stderr`, its
/// stderr) on one end of a new socket pair, or with `pty` on a new
/// terminal; relay's end comes back as the connection's leg.
pub fn spawn(spec: &ExecSpec) -> io::Result<(Socket, Child)> {
    let program = spec
        .argv
        .first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no program to run"))?;
    let (ours, theirs): (Socket, OwnedFd) = if spec.pty {
        let pty = nix::pty::openpty(None, None)?;
        set_terminal(&pty.slave, spec.raw, spec.echo)?;
        let eof = eof_char(&pty.slave)?;
        (
            Socket::File(Box::new(FileLeg::master(pty.master, eof)?)),
            pty.slave,
        )
    } else {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
        ours.set_nonblocking(true)?;
        (Socket::Unix(UnixStream::from_std(ours)?), theirs.into())
    };
    let mut command = tokio::process::Command::new(program);
    command
        .args(&spec.argv[1..])
        .stdin(Stdio::from(theirs.try_clone()?))
        .stdout(Stdio::from(theirs.try_clone()?))
        .kill_on_drop(true);
    // On a terminal stderr goes where a terminal's does: onto it.
    if spec.stderr_to_peer || spec.pty {
        command.stderr(Stdio::from(theirs));
    } else {
        drop(theirs);
        command.stderr(Stdio::inherit());
    }
    let parent = nix::unistd::getpid();
    let pty = spec.pty;
    // SAFETY: the closure runs in the forked child before exec and calls
    // only prctl(2), getppid(2), setsid(2) and ioctl(2), all
    // async-signal-safe.
    unsafe {
        command.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(io::Error::from)?;
            // relay may have died between fork and prctl: then the parent
            // is no longer the one that forked, and nothing would kill us.
            if nix::unistd::getppid() != parent {
                return Err(io::Error::other("relay exited while starting the child"));
            }
            if pty {
                // A session of its own, the terminal (its stdin, fd 0) its
                // controlling one, so job control and ^C work as in a shell.
                nix::unistd::setsid().map_err(io::Error::from)?;
                if nix::libc::ioctl(0, nix::libc::TIOCSCTTY, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = command.spawn()?;
    // Dropping the Command closes the parent's copies of the child's end,
    // so the child's exit is EOF on ours.
    drop(command);
    Ok((
        ours,
        Child {
            child,
            program: program.clone(),
        },
    ))
}

impl Child {
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    pub fn program(&self) -> &str {
        &self.program
    }

    /// After the connection's end (relay's end of the pair closed): waits
    /// for the child to exit, sending SIGTERM and then SIGKILL if it takes
    /// longer than [`GRACE`] each time. Always reaps it.
    pub async fn finish(mut self) -> Exit {
        if let Ok(Ok(status)) = tokio::time::timeout(GRACE, self.child.wait()).await {
            return exit_of(status);
        }
        if let Some(pid) = self.child.id() {
            let pid = nix::unistd::Pid::from_raw(pid as i32);
            // It may have exited just now; the wait below says so.
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
        if let Ok(Ok(status)) = tokio::time::timeout(GRACE, self.child.wait()).await {
            return Exit {
                label: "killed",
                status: format!("{} after SIGTERM", describe(status)),
            };
        }
        // start_kill sends SIGKILL; wait reaps.
        let _ = self.child.start_kill();
        match self.child.wait().await {
            Ok(status) => Exit {
                label: "killed",
                status: format!("{} after SIGTERM and SIGKILL", describe(status)),
            },
            Err(err) => Exit {
                label: "killed",
                status: format!("cannot wait for it: {err}"),
            },
        }
    }
}

fn exit_of(status: std::process::ExitStatus) -> Exit {
    let label = match (status.code(), status.signal()) {
        (Some(0), _) => "success",
        (Some(_), _) => "failure",
        _ => "signal",
    };
    Exit {
        label,
        status: describe(status),
    }
}

fn describe(status: std::process::ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => status.to_string(),
    }
}
