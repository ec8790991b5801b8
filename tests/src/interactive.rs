//! External clients driven through stdin and stdout (openssl s_client,
//! redis-cli): the test writes, then polls what came back on stdout.
//!
//! stdout is collected by a reader thread so that waiting for an answer is
//! a poll with a deadline, never a blocking read that could hang a test.
//! stderr goes to the process's log (see [`crate::child`]), printed on drop.

use std::io::{Read, Write};
use std::process::{ChildStdin, Command, ExitStatus};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::child::ChildProc;
use crate::wait::poll_until;

/// A running interactive client; killed (with its process group) on drop.
pub struct Interactive {
    proc: ChildProc,
    stdin: Option<ChildStdin>,
    stdout: Arc<Mutex<Vec<u8>>>,
}

impl Interactive {
    pub fn spawn(label: &str, cmd: Command) -> Result<Self> {
        let (proc, stdin, mut stdout) = ChildProc::spawn_piped(label, cmd)?;
        let collected = Arc::new(Mutex::new(Vec::new()));
        std::thread::Builder::new()
            .name(format!("{label}-stdout"))
            .spawn({
                let collected = Arc::clone(&collected);
                move || {
                    let mut buf = [0u8; 65536];
                    // Ends at EOF or error: the process exited or was killed.
                    while let Ok(n @ 1..) = stdout.read(&mut buf) {
                        match collected.lock() {
                            Ok(mut out) => out.extend_from_slice(&buf[..n]),
                            Err(_) => return,
                        }
                    }
                }
            })
            .with_context(|| format!("spawning the stdout reader of {label}"))?;
        Ok(Self {
            proc,
            stdin: Some(stdin),
            stdout: collected,
        })
    }

    /// Write `bytes` to the client's stdin.
    pub fn send(&mut self, bytes: &[u8]) -> Result<()> {
        let label = self.proc.label().to_string();
        let stdin = self
            .stdin
            .as_mut()
            .with_context(|| format!("{label}'s stdin is already closed"))?;
        stdin
            .write_all(bytes)
            .and_then(|()| stdin.flush())
            .with_context(|| format!("writing to {label}'s stdin"))
    }

    /// Close the client's stdin (EOF on its input).
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Everything the client wrote to stdout so far.
    pub fn stdout(&self) -> Vec<u8> {
        self.stdout
            .lock()
            .map(|out| out.clone())
            .unwrap_or_default()
    }

    /// The client's stderr so far.
    pub fn stderr(&self) -> String {
        self.proc.log()
    }

    /// Poll until stdout contains `needle`; fail if the client exits first.
    pub fn wait_for_output(&mut self, needle: &[u8], timeout: Duration) -> Result<()> {
        let what = format!(
            "{:?} on {}'s stdout",
            String::from_utf8_lossy(needle),
            self.proc.label()
        );
        let found = poll_until(&what, timeout, || {
            if contains(&self.stdout(), needle) {
                return Ok(Some(()));
            }
            self.proc.ensure_running()?;
            Ok(None)
        });
        found.with_context(|| {
            format!(
                "stdout so far: {:?}\nstderr so far:\n{}",
                String::from_utf8_lossy(&self.stdout()),
                self.stderr()
            )
        })
    }

    /// Wait for the client to exit by itself; stdin stays as it is (close
    /// it first for clients that end at EOF on their input).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        match self.proc.wait_exit(timeout)? {
            Some(status) => Ok(status),
            None => bail!(
                "expected {} to exit within {timeout:?}, it is still running\nstdout: {:?}\nstderr:\n{}",
                self.proc.label(),
                String::from_utf8_lossy(&self.stdout()),
                self.stderr()
            ),
        }
    }

    /// Run to completion: feed `input`, close stdin, wait for the exit, and
    /// return stdout once the reader has seen its end.
    pub fn run(label: &str, cmd: Command, input: &[u8], timeout: Duration) -> Result<Output> {
        let mut client = Self::spawn(label, cmd)?;
        client.send(input)?;
        client.close_stdin();
        let status = client.wait_exit(timeout)?;
        // The reader thread may still hold the last bytes; the pipe's EOF
        // comes with the exit, and the thread drops its handle when done.
        poll_until(
            &format!("{label}'s stdout to end"),
            Duration::from_secs(5),
            || Ok((Arc::strong_count(&client.stdout) == 1).then_some(())),
        )?;
        let stdout = client.stdout();
        Ok(Output {
            status,
            stdout,
            stderr: client.stderr(),
        })
    }
}

/// What a client that ran to completion left behind.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

/// True when `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}
