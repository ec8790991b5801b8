//! Gates: skip a test, visibly, when the machine cannot run it.
//!
//! A skipped test returns `Ok(())` (so an unprivileged run stays green) after
//! writing `SKIP <test>: <reason>` straight to the process's stderr. The line
//! bypasses libtest's output capture on purpose: a skip must be seen even
//! when the test "passes".

use std::io::Write;
use std::process::{Command, Stdio};

/// True when the effective user is root (network namespaces, veth, tc).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// True when `program` can be found on `$PATH` and run with `--version`.
pub fn have_tool(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// The running test's name: libtest names each test's thread after it.
pub fn current_test_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("<unnamed test>")
        .to_string()
}

/// Write `SKIP <test>: <reason>` to the real stderr (not the captured one).
pub fn report_skip(reason: &str) {
    let line = format!("SKIP {}: {}\n", current_test_name(), reason);
    // A failed write to stderr has nowhere better to be reported.
    let _ = std::io::stderr().write_all(line.as_bytes());
}

/// Return `Ok(())` from the calling test unless running as root.
///
/// ```ignore
/// #[test]
/// fn needs_namespaces() -> anyhow::Result<()> {
///     relay_tests::require_root!("creates network namespaces");
///     Ok(())
/// }
/// ```
#[macro_export]
macro_rules! require_root {
    ($why:expr) => {
        if !$crate::gate::is_root() {
            $crate::gate::report_skip(&format!("needs root ({})", $why));
            return Ok(());
        }
    };
}

/// Return `Ok(())` from the calling test unless `program` is installed.
#[macro_export]
macro_rules! require_tool {
    ($program:expr) => {
        if !$crate::gate::have_tool($program) {
            $crate::gate::report_skip(&format!(
                "needs `{}` on PATH (Debian package; `cargo xtask test` installs it)",
                $program
            ));
            return Ok(());
        }
    };
}
