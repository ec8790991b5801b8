//! Where the workspace is and how to build the relay binary in it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Result, ensure};

use crate::cmd;

/// The workspace root: the parent of this crate's manifest directory.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("invariant: xtask/ always sits inside the workspace root")
        .to_path_buf()
}

/// `cargo` as the one that runs us (cargo sets $CARGO), in the workspace root.
pub fn cargo() -> Command {
    let program = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(program);
    cmd.current_dir(root());
    cmd
}

/// `cargo build --release -p relay`; returns the path of the binary.
pub fn build_relay() -> Result<PathBuf> {
    cmd::run_streaming(cargo().args(["build", "--release", "-p", "relay"]))?;
    let bin = target_dir().join("release").join("relay");
    ensure!(
        bin.is_file(),
        "cargo built relay but {} does not exist; does relay/Cargo.toml still declare a [[bin]] named `relay`?",
        bin.display()
    );
    Ok(bin)
}

/// Cargo's target directory; CARGO_TARGET_DIR may move it, as for cargo.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|dir| {
            if dir.is_absolute() {
                dir
            } else {
                root().join(dir)
            }
        })
        .unwrap_or_else(|| root().join("target"))
}

/// Where benchmark results and logs go: `target/bench`.
pub fn bench_dir() -> PathBuf {
    target_dir().join("bench")
}
