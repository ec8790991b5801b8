//! What a reload of `relay run -c` costs (issue 13): the time from SIGHUP
//! until the new file is applied (`relay_config_reloads_total{outcome="ok"}`
//! moves), with 1, 100 and 1,000 routes, for a file whose routes are all
//! unchanged (the diff alone) and one whose routes all change (each gets a
//! new forwarder on its predecessor's socket); and relay's memory per idle
//! route (VmRSS with 1,000 routes against 1). No peer reloads this way,
//! so the rows carry figures and no ratio.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::json;

use super::Ctx;
use super::observe::{scrape, sum_family};
use super::procs::{self, Proc};
use super::report::{self, Row, SectionReport};
use super::rss::vm_rss_kib;
use super::via::Via;

const ROUTE_COUNTS: [usize; 3] = [1, 100, 1_000];
/// Reloads per measurement; the median is reported.
const ROUNDS: usize = 5;
const APPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// A file of `n` routes on ports the kernel picks, to a target nobody
/// needs to reach (no connection is made); `round` goes into every
/// route's connect timeout, so a new round changes every route.
fn write_file(path: &Path, n: usize, round: usize) -> Result<()> {
    let mut text = String::new();
    for i in 0..n {
        text.push_str(&format!(
            "[[route]]\nname = \"r{i}\"\nlisten = \"127.0.0.1:0\"\ntarget = \"127.0.0.1:9\"\nconnect-timeout = \"{}s\"\n\n",
            1 + round
        ));
    }
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// One relay with `n` routes.
struct Running {
    proc: Proc,
    metrics: u16,
}

fn start(ctx: &Ctx, file: &Path, n: usize) -> Result<Running> {
    let metrics = procs::free_port()?;
    let mut cmd = std::process::Command::new(&ctx.relay_bin);
    cmd.arg("run")
        .arg("-c")
        .arg(file)
        .args(["--metrics", &format!("127.0.0.1:{metrics}"), "-q"]);
    let mut proc = Proc::spawn(&format!("reload-{n}"), cmd)?;
    procs::wait_listening(metrics, &mut proc, Duration::from_secs(30))?;
    Ok(Running { proc, metrics })
}

fn reloads_ok(metrics: u16) -> Result<f64> {
    Ok(sum_family(
        &scrape(metrics)?
            .lines()
            .filter(|l| l.contains("outcome=\"ok\""))
            .collect::<Vec<_>>()
            .join("\n"),
        "relay_config_reloads_total",
    ))
}

/// Milliseconds from SIGHUP to the reload counted as applied.
fn time_reload(running: &mut Running) -> Result<f64> {
    let before = reloads_ok(running.metrics)?;
    let started = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(running.proc.pid()),
        nix::sys::signal::Signal::SIGHUP,
    )
    .context("cannot send SIGHUP to relay")?;
    while reloads_ok(running.metrics)? <= before {
        running.proc.check_alive()?;
        if started.elapsed() > APPLY_TIMEOUT {
            bail!("the reload was not applied within {APPLY_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    Ok(started.elapsed().as_secs_f64() * 1e3)
}

/// (unchanged ms, all changed ms, VmRSS KiB) with `n` routes.
fn measure(ctx: &Ctx, n: usize) -> Result<(f64, f64, u64)> {
    let dir = procs::TempDir::new("reload")?;
    let file = dir.path().join("relay.toml");
    write_file(&file, n, 0)?;
    let mut running = start(ctx, &file, n)?;
    let rss = vm_rss_kib(running.proc.pid())?;
    let mut unchanged = Vec::new();
    let mut changed = Vec::new();
    for round in 1..=ROUNDS {
        unchanged.push(time_reload(&mut running)?);
        write_file(&file, n, round)?;
        changed.push(time_reload(&mut running)?);
    }
    Ok((
        report::median_by(&unchanged, |v| *v),
        report::median_by(&changed, |v| *v),
        rss,
    ))
}

pub fn run(ctx: &Ctx) -> SectionReport {
    println!("xtask: bench: reload, {ROUTE_COUNTS:?} routes, {ROUNDS} rounds each");
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    let mut figures = serde_json::Map::new();
    let mut rss = Vec::new();
    for n in ROUTE_COUNTS {
        match measure(ctx, n) {
            Ok((unchanged, changed, kib)) => {
                for (what, ms) in [("unchanged", unchanged), ("all changed", changed)] {
                    rows.push(Row::cells(
                        format!("reload, {n} routes, {what} (ms)"),
                        &[(Via::Relay, format!("{ms:.2}"))],
                    ));
                }
                figures.insert(
                    format!("routes_{n}"),
                    json!({"unchanged_ms": unchanged, "all_changed_ms": changed, "vm_rss_kib": kib}),
                );
                rss.push((n, kib));
            }
            Err(err) => errors.push(format!("{n} routes: {err:#}")),
        }
    }
    if let (Some((few, few_kib)), Some((many, many_kib))) = (rss.first(), rss.last())
        && many > few
    {
        let per_route = (*many_kib as f64 - *few_kib as f64) / (*many - *few) as f64;
        rows.push(Row::cells(
            "memory per idle route (KiB, VmRSS)",
            &[(Via::Relay, format!("{per_route:.1}"))],
        ));
        figures.insert("kib_per_route".into(), json!(per_route));
    }
    SectionReport {
        key: "reload",
        rows,
        json: serde_json::Value::Object(figures),
        errors,
    }
}
