//! `cargo xtask fuzz [--seconds N] [TARGET...]`: builds the fuzz targets
//! of `fuzz/` with libFuzzer's coverage instrumentation and runs each for
//! N seconds, starting from its committed corpus.
//!
//! Stable Rust only: cargo-fuzz's sanitizer-coverage flags are plain
//! codegen options (`-Cpasses=sancov-module`, `-Cllvm-args=...`), so xtask
//! passes them itself instead of needing cargo-fuzz or a nightly
//! toolchain. `--target` is given explicitly so the flags reach only the
//! fuzzed code, not build scripts and proc macros (which would not link
//! without libFuzzer's hooks).
//!
//! The committed corpus (`fuzz/corpus/<target>/`) is read, never written:
//! libFuzzer grows a scratch copy under `target/fuzz/corpus/<target>/`, and a
//! crash lands in `target/fuzz/artifacts/<target>/` and fails the run (the
//! input that crashed is then a unit test next to the code it broke).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{cmd, workspace};

/// Every fuzz target (`fuzz/fuzz_targets/<name>.rs`), with what it feeds.
pub const TARGETS: &[(&str, &str)] = &[
    ("addr", "the address grammar, socat and URL forms"),
    ("config", "the config file parser and validation"),
    (
        "filter",
        "the capture filter front end (libpcap, then translation)",
    ),
    (
        "cbpf",
        "the classic-to-eBPF translator on arbitrary programs",
    ),
    ("pcapng", "the pcapng writer, read back by pcap-parser"),
    ("metrics_http", "the /metrics and /healthz request path"),
];

/// The host triple the instrumented build targets.
const TRIPLE: &str = "x86_64-unknown-linux-gnu";

/// What cargo-fuzz passes for `--sanitizer none`, plus debug assertions and
/// overflow checks (so arithmetic slips crash instead of wrapping).
const RUSTFLAGS: &str = "-Cpasses=sancov-module \
    -Cllvm-args=-sanitizer-coverage-level=4 \
    -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
    -Cllvm-args=-sanitizer-coverage-pc-table \
    -Cllvm-args=-sanitizer-coverage-trace-compares \
    --cfg fuzzing -Cdebug-assertions -Coverflow-checks";

pub struct Options {
    pub seconds: u64,
    pub targets: Vec<&'static str>,
}

impl Options {
    pub fn parse(args: &[String]) -> Result<Self> {
        let mut seconds = 60;
        let mut targets = Vec::new();
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--seconds" => {
                    let value = args.next().context("--seconds needs a number of seconds")?;
                    seconds = value
                        .parse()
                        .with_context(|| format!("--seconds {value}: not a whole number"))?;
                }
                name => match TARGETS.iter().find(|(t, _)| *t == name) {
                    Some((t, _)) => targets.push(*t),
                    None => bail!(
                        "no fuzz target `{name}`; the targets are: {}",
                        TARGETS
                            .iter()
                            .map(|(t, _)| *t)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                },
            }
        }
        if targets.is_empty() {
            targets = TARGETS.iter().map(|(t, _)| *t).collect();
        }
        Ok(Options { seconds, targets })
    }
}

/// Builds every target, then runs each in turn; stops at the first crash.
pub fn run(opts: &Options) -> Result<()> {
    let root = workspace::root();
    let target_dir = workspace::target_dir().join("fuzz");
    build(&root, &target_dir)?;
    for target in &opts.targets {
        run_one(&root, &target_dir, target, opts.seconds)?;
    }
    Ok(())
}

fn build(root: &Path, target_dir: &Path) -> Result<()> {
    let mut cargo = workspace::cargo();
    cargo
        .current_dir(root.join("fuzz"))
        .args([
            "build",
            "--release",
            "--locked",
            "--bins",
            "--target",
            TRIPLE,
        ])
        .arg("--target-dir")
        .arg(target_dir)
        .env("RUSTFLAGS", RUSTFLAGS);
    cmd::run_streaming(&mut cargo).context("building the fuzz targets")
}

fn run_one(root: &Path, target_dir: &Path, target: &str, seconds: u64) -> Result<()> {
    let committed = root.join("fuzz/corpus").join(target);
    let scratch = target_dir.join("corpus").join(target);
    let artifacts = target_dir.join("artifacts").join(target);
    for dir in [&scratch, &artifacts] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let bin: PathBuf = target_dir.join(TRIPLE).join("release").join(target);
    let mut fuzz = Command::new(&bin);
    fuzz.arg(format!("-max_total_time={seconds}"))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        // Inputs past 64 KiB only slow the search for these parsers.
        .arg("-max_len=65536")
        // libFuzzer writes new inputs into its first directory only.
        .arg(&scratch);
    if committed.is_dir() {
        fuzz.arg(&committed);
    }
    println!("xtask: fuzz {target} for {seconds} s");
    cmd::run_streaming(&mut fuzz).with_context(|| {
        format!(
            "fuzz target `{target}` crashed or failed: the input is in {}; reproduce with `{} <file>` and make it a unit test",
            artifacts.display(),
            bin.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A target added under fuzz/fuzz_targets/ but not to TARGETS would
    /// never run in `cargo xtask test`; one in TARGETS without a file or a
    /// [[bin]] would fail the build.
    #[test]
    fn every_fuzz_target_file_is_listed_and_declared() {
        let root = workspace::root().join("fuzz");
        let manifest = std::fs::read_to_string(root.join("Cargo.toml")).expect("fuzz/Cargo.toml");
        let mut files: Vec<String> = std::fs::read_dir(root.join("fuzz_targets"))
            .expect("fuzz/fuzz_targets")
            .map(|e| e.expect("a directory entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "rs"))
            .map(|p| {
                p.file_stem()
                    .expect("a file name")
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        files.sort();
        let mut listed: Vec<String> = TARGETS.iter().map(|(t, _)| t.to_string()).collect();
        listed.sort();
        assert_eq!(
            files, listed,
            "fuzz/fuzz_targets/*.rs and fuzz::TARGETS differ"
        );
        for target in &listed {
            assert!(
                manifest.contains(&format!(
                    "name = \"{target}\"\npath = \"fuzz_targets/{target}.rs\""
                )),
                "fuzz/Cargo.toml has no [[bin]] for {target}"
            );
        }
    }
}
