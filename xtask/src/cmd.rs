//! Running external commands in the foreground: say what runs, stream its
//! output, and turn a non-zero exit into an error that carries the code.
//!
//! Background processes for benchmarks are not here: see `bench::procs`.

use std::fmt;
use std::process::{Command, ExitStatus};

use anyhow::{Context, Result};

/// A child command failed; xtask exits with the same code.
#[derive(Debug)]
pub struct ExitCodeError {
    what: String,
    status: ExitStatus,
}

impl ExitCodeError {
    /// The code for xtask's own exit: the child's, or 128+signal, never 0.
    pub fn code(&self) -> u8 {
        use std::os::unix::process::ExitStatusExt;
        match (self.status.code(), self.status.signal()) {
            (Some(code), _) => u8::try_from(code).ok().filter(|c| *c != 0).unwrap_or(1),
            (None, Some(sig)) => u8::try_from(128 + sig).unwrap_or(1),
            (None, None) => 1,
        }
    }
}

impl fmt::Display for ExitCodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` failed ({})", self.what, self.status)
    }
}

impl std::error::Error for ExitCodeError {}

/// Shell-like rendering of a command for messages (no quoting subtleties).
pub fn render(cmd: &Command) -> String {
    // Basename only: `cargo`, not the toolchain path cargo hands us.
    let program = std::path::Path::new(cmd.get_program());
    let program = program.file_name().unwrap_or(program.as_os_str());
    let mut parts = vec![program.to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| {
        let a = a.to_string_lossy();
        if a.is_empty() || a.contains(char::is_whitespace) {
            format!("'{a}'")
        } else {
            a.into_owned()
        }
    }));
    parts.join(" ")
}

/// Run `cmd` with inherited stdio; Err(ExitCodeError) when it exits non-zero.
pub fn run_streaming(cmd: &mut Command) -> Result<()> {
    let what = render(cmd);
    println!("xtask: $ {what}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{what}` (is it installed and on PATH?)"))?;
    if status.success() {
        Ok(())
    } else {
        Err(ExitCodeError { what, status }.into())
    }
}
