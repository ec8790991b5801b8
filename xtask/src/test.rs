//! `cargo xtask test`: the whole check that CI runs, as an ordered list of
//! steps. New checks (e.g. "committed eBPF objects match a fresh build")
//! go into `STEPS` at the place they belong.

use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::{cmd, fuzz, packages, workspace};

/// What the steps share: set by earlier steps, read by later ones.
struct Ctx<'a> {
    /// Arguments after `test`, passed to `cargo test` as given.
    cargo_test_args: &'a [String],
    /// Set by the build step; handed to the tests as RELAY_BIN.
    relay_bin: Option<PathBuf>,
}

struct Step {
    name: &'static str,
    run: fn(&mut Ctx) -> Result<()>,
}

const STEPS: &[Step] = &[
    // First, since clippy builds relay, which links libpcap (libpcap-dev).
    Step {
        name: "Debian packages for real peers and libraries",
        run: ensure_packages,
    },
    // Then: they take seconds and fail for reasons a reader fixes at once.
    Step {
        name: "cargo fmt --all --check",
        run: fmt_check,
    },
    Step {
        name: "cargo clippy --workspace --all-targets -- -D warnings",
        run: clippy,
    },
    // Before anything is built: relay embeds these objects.
    Step {
        name: "committed eBPF objects match a fresh build",
        run: ebpf_fresh,
    },
    Step {
        name: "build relay (release)",
        run: build_relay,
    },
    Step {
        name: "cargo test --workspace --release",
        run: cargo_test,
    },
    Step {
        name: "the forwarder's suite once more on each data path (copy, splice, sockmap)",
        run: per_data_path,
    },
    Step {
        name: "every fuzz target for 20 s",
        run: fuzz_briefly,
    },
    // Alone, after everything else: it restarts the host's dockerd, which
    // stops every container (the other Docker tests' too).
    Step {
        name: "observing containers survives a dockerd restart",
        run: dockerd_restart,
    },
];

/// The test files whose every test runs once per data path.
const PER_DATA_PATH_TESTS: &[&str] = &["forward", "lifecycle", "metrics"];
/// sockmap is experimental; the harness adds `--experimental-sockmap` when
/// RELAY_DATA_PATH=sockmap (`RelayCmd::args`), so what it does right stays tested.
const DATA_PATHS: &[&str] = &["copy", "splice", "sockmap"];

pub fn run(args: &[String]) -> Result<()> {
    let mut ctx = Ctx {
        cargo_test_args: args,
        relay_bin: None,
    };
    for (i, step) in STEPS.iter().enumerate() {
        println!("xtask: [{}/{}] {}", i + 1, STEPS.len(), step.name);
        (step.run)(&mut ctx).with_context(|| format!("step `{}` failed", step.name))?;
    }
    println!("xtask: all {} steps passed", STEPS.len());
    Ok(())
}

fn fmt_check(_: &mut Ctx) -> Result<()> {
    cmd::run_streaming(workspace::cargo().args(["fmt", "--all", "--check"]))
        .context("code is not formatted: run `cargo fmt --all` and commit the result")?;
    // fuzz/ is a workspace of its own, which `--all` does not reach.
    cmd::run_streaming(workspace::cargo().args([
        "fmt",
        "--all",
        "--check",
        "--manifest-path",
        "fuzz/Cargo.toml",
    ]))
    .context(
        "the fuzz targets are not formatted: run `cargo fmt --all --manifest-path fuzz/Cargo.toml`",
    )
}

fn clippy(_: &mut Ctx) -> Result<()> {
    cmd::run_streaming(workspace::cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--release",
        "--",
        "-D",
        "warnings",
    ]))
    .context("clippy found warnings: fix them (the test run treats every warning as an error)")
}

fn ensure_packages(_: &mut Ctx) -> Result<()> {
    packages::ensure()?;
    packages::ensure_python();
    Ok(())
}

fn ebpf_fresh(_: &mut Ctx) -> Result<()> {
    crate::ebpf::check_fresh()
}

fn build_relay(ctx: &mut Ctx) -> Result<()> {
    let bin = workspace::build_relay()?;
    println!("xtask: RELAY_BIN={}", bin.display());
    ctx.relay_bin = Some(bin);
    Ok(())
}

fn cargo_test(ctx: &mut Ctx) -> Result<()> {
    let relay_bin = ctx
        .relay_bin
        .as_ref()
        .expect("invariant: the build step runs before the test step");
    // Release: the integrity tests push 100 MiB through the relay.
    cmd::run_streaming(
        workspace::cargo()
            .args(["test", "--workspace", "--release"])
            .args(ctx.cargo_test_args)
            .env("RELAY_BIN", relay_bin),
    )
}

/// The relay binary, for a step that runs only when the whole suite does
/// (no test arguments were given).
fn whole_run<'a>(ctx: &'a Ctx) -> Option<&'a PathBuf> {
    if !ctx.cargo_test_args.is_empty() {
        return None;
    }
    Some(
        ctx.relay_bin
            .as_ref()
            .expect("invariant: the build step runs before the test step"),
    )
}

/// The relay under test takes `--data-path $RELAY_DATA_PATH` (see the
/// harness's `RelayCmd::args`): one suite, parametrized by the variable.
/// Skipped when the caller filtered the run (ARGS given).
fn per_data_path(ctx: &mut Ctx) -> Result<()> {
    let Some(relay_bin) = whole_run(ctx) else {
        println!("xtask: skipped: test arguments were given, so only that selection runs");
        return Ok(());
    };
    for path in DATA_PATHS {
        println!("xtask: RELAY_DATA_PATH={path}");
        let mut cmd = workspace::cargo();
        cmd.args(["test", "--release", "-p", "relay-tests"]);
        for test in PER_DATA_PATH_TESTS {
            cmd.args(["--test", test]);
        }
        cmd.env("RELAY_BIN", relay_bin).env("RELAY_DATA_PATH", path);
        cmd::run_streaming(&mut cmd).with_context(|| format!("on data path {path}"))?;
    }
    Ok(())
}

/// Each fuzz target for 20 s from its committed corpus: what a change
/// breaks in a parser shows here, not only in a long local run.
/// Skipped when the caller filtered the run (ARGS given).
fn fuzz_briefly(ctx: &mut Ctx) -> Result<()> {
    if whole_run(ctx).is_none() {
        println!("xtask: skipped: test arguments were given, so only that selection runs");
        return Ok(());
    }
    fuzz::run(&fuzz::Options {
        seconds: 20,
        targets: fuzz::TARGETS.iter().map(|(t, _)| *t).collect(),
    })
}

/// The containers test that restarts dockerd, which skips unless asked
/// (`RELAY_TESTS_RESTART_DOCKERD=1`): run here, when no other test runs.
/// Skipped when the caller filtered the run (ARGS given).
fn dockerd_restart(ctx: &mut Ctx) -> Result<()> {
    let Some(relay_bin) = whole_run(ctx) else {
        println!("xtask: skipped: test arguments were given, so only that selection runs");
        return Ok(());
    };
    cmd::run_streaming(
        workspace::cargo()
            .args([
                "test",
                "--release",
                "-p",
                "relay-tests",
                "--test",
                "containers",
            ])
            .arg("a_dockerd_restart_is_survived")
            .env("RELAY_BIN", relay_bin)
            .env("RELAY_TESTS_RESTART_DOCKERD", "1"),
    )
}
