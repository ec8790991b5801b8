//! New connections per second: wrk against a real nginx with
//! `Connection: close`, so every request is a new TCP connection (and, for
//! socat, a new process). Targets: relay >= 4x socat, >= 1.2x the best
//! peer (issue 18: HAProxy and nginx lead here) and >= 0.5x direct.
//! The nginx serving the file is [`Nginx`], shared with `routes.rs`.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::json;

use super::Ctx;
use super::procs::{self, Proc, TempDir};
use super::report::{Better, PerVia, SectionReport, Target, median_by};
use super::via::{Hop, Via};

const TARGET_VS_SOCAT: f64 = 4.0;
const TARGET_VS_BEST: f64 = 1.2;
const TARGET_VS_DIRECT: f64 = 0.5;
const THREADS: u32 = 2;
const CONNECTIONS: u32 = 32;

/// What one wrk run reported.
#[derive(Clone, Debug, Default, PartialEq)]
struct WrkRun {
    requests_per_s: f64,
    requests: u64,
    socket_errors: u64,
    non_2xx: u64,
}

pub fn run(ctx: &Ctx) -> SectionReport {
    let (secs, rounds) = (ctx.secs(), ctx.rounds());
    let vias = ctx.vias(Via::PLAIN);
    println!(
        "xtask: bench: new connections/s, nginx + wrk -t{THREADS} -c{CONNECTIONS} -d{secs}s, Connection: close, \
         median of {rounds} rotating round(s)"
    );
    let samples = match Nginx::start() {
        Err(err) => PerVia::all_failed(&vias, &err.context("cannot start nginx")),
        Ok(mut nginx) => PerVia::measure_rounds(&vias, rounds, |via| {
            let mut hop = Hop::start(
                via,
                nginx.port,
                &ctx.relay_bin,
                "connrate",
                ctx.hop_options(),
            )?;
            let run = wrk(hop.port, secs, via.name())?;
            hop.check_alive()?;
            nginx.proc.check_alive()?;
            println!(
                "xtask:   {:<14} {:.0} req/s ({} requests, {} socket errors, {} non-2xx)",
                via.name(),
                run.requests_per_s,
                run.requests,
                run.socket_errors,
                run.non_2xx
            );
            // A forwarder that fails requests fast would look fast.
            if run.non_2xx + run.socket_errors > run.requests / 100 {
                bail!(
                    "{} of {} requests failed (socket errors {}, non-2xx {}); see target/bench/logs/wrk-{}.out",
                    run.non_2xx + run.socket_errors,
                    run.requests,
                    run.socket_errors,
                    run.non_2xx,
                    via.name()
                );
            }
            Ok(run)
        }),
    };

    let runs = samples.map(|s| median_by(s, |r| r.requests_per_s));
    let rps = runs.map(|r| r.requests_per_s);
    let row = rps
        .row(
            "new connections (req/s, Connection: close)",
            0,
            Better::Higher,
        )
        .target(Target::at_least(&rps, Via::Socat, TARGET_VS_SOCAT))
        .target(Target::vs_best_peer(&rps, Better::Higher, TARGET_VS_BEST))
        .target(Target::at_least(&rps, Via::Direct, TARGET_VS_DIRECT));
    SectionReport {
        key: "connection_rate",
        json: json!({
            "tool": format!(
                "wrk -t{THREADS} -c{CONNECTIONS} -d{secs}s -H 'Connection: close' (nginx, static file), median of {rounds}"
            ),
            "samples_requests_per_s": samples.to_json(|s| json!(s.iter().map(|r| r.requests_per_s).collect::<Vec<_>>())),
            "runs": runs.to_json(|r| json!({
                "requests_per_s": r.requests_per_s,
                "requests": r.requests,
                "socket_errors": r.socket_errors,
                "non_2xx": r.non_2xx,
            })),
            "relay_vs_socat": rps.relay_vs(Via::Socat),
            "relay_vs_best_peer": rps.relay_vs_best_peer(Better::Higher),
        }),
        errors: runs.errors(),
        rows: vec![row],
    }
}

fn wrk(port: u16, secs: u64, label: &str) -> Result<WrkRun> {
    let mut cmd = Command::new("wrk");
    cmd.arg(format!("-t{THREADS}"))
        .arg(format!("-c{CONNECTIONS}"))
        .arg(format!("-d{secs}s"))
        .args(["-H", "Connection: close"])
        .arg(format!("http://127.0.0.1:{port}/"));
    let out =
        Proc::spawn(&format!("wrk-{label}"), cmd)?.wait_output(Duration::from_secs(secs + 30))?;
    parse_wrk(&out)
}

/// Pull the numbers out of wrk's human-readable summary.
fn parse_wrk(out: &str) -> Result<WrkRun> {
    let mut run = WrkRun::default();
    let mut saw_rate = false;
    for line in out.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("Requests/sec:") {
            run.requests_per_s = rest
                .trim()
                .parse()
                .with_context(|| format!("bad wrk line `{line}`"))?;
            saw_rate = true;
        } else if let Some((count, _)) = line.split_once(" requests in ") {
            run.requests = count
                .trim()
                .parse()
                .with_context(|| format!("bad wrk line `{line}`"))?;
        } else if let Some(rest) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 12, write 0, timeout 0"
            run.socket_errors = rest
                .split(',')
                .filter_map(|part| part.split_whitespace().nth(1))
                .filter_map(|n| n.parse::<u64>().ok())
                .sum();
        } else if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
            run.non_2xx = rest
                .trim()
                .parse()
                .with_context(|| format!("bad wrk line `{line}`"))?;
        }
    }
    if !saw_rate {
        bail!("wrk printed no `Requests/sec:` line; output:\n{out}");
    }
    Ok(run)
}

/// A throwaway nginx serving one small static file from a temp dir.
pub(super) struct Nginx {
    pub(super) port: u16,
    // Field order matters: kill nginx before removing its directory.
    pub(super) proc: Proc,
    _dir: TempDir,
}

impl Nginx {
    pub(super) fn start() -> Result<Nginx> {
        let nginx = crate::packages::find_program("nginx").context(
            "nginx not found; run `cargo xtask test` once to install the Debian packages",
        )?;
        let dir = TempDir::new("nginx")?;
        let port = procs::free_port()?;
        let www = dir.path().join("www");
        std::fs::create_dir_all(&www)
            .with_context(|| format!("cannot create {}", www.display()))?;
        std::fs::write(
            www.join("index.html"),
            "hello from the relay benchmark\n".repeat(3),
        )
        .context("cannot write the nginx index file")?;
        let d = dir.path().display();
        let conf = format!(
            "daemon off;\n\
             worker_processes 1;\n\
             pid {d}/nginx.pid;\n\
             error_log {d}/error.log warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n\
             \x20 access_log off;\n\
             \x20 client_body_temp_path {d}/client_body;\n\
             \x20 proxy_temp_path {d}/proxy;\n\
             \x20 fastcgi_temp_path {d}/fastcgi;\n\
             \x20 uwsgi_temp_path {d}/uwsgi;\n\
             \x20 scgi_temp_path {d}/scgi;\n\
             \x20 server {{\n\
             \x20   listen 127.0.0.1:{port} backlog=4096;\n\
             \x20   root {d}/www;\n\
             \x20 }}\n\
             }}\n"
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf)
            .with_context(|| format!("cannot write {}", conf_path.display()))?;
        let mut cmd = Command::new(nginx);
        cmd.arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf_path)
            .arg("-e")
            .arg(dir.path().join("error.log"));
        let mut proc = Proc::spawn("nginx", cmd)?;
        procs::wait_listening(port, &mut proc, Duration::from_secs(10))?;
        Ok(Nginx {
            port,
            proc,
            _dir: dir,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk_summary() {
        let out = "Running 5s test @ http://127.0.0.1:1/\n  2 threads and 32 connections\n\
                   \x20 12345 requests in 5.00s, 3.45MB read\n\
                   \x20 Socket errors: connect 1, read 12, write 0, timeout 2\n\
                   \x20 Non-2xx or 3xx responses: 5\n\
                   Requests/sec:   2468.50\nTransfer/sec:    690.00KB\n";
        let run = parse_wrk(out).unwrap();
        assert_eq!(
            run,
            WrkRun {
                requests_per_s: 2468.5,
                requests: 12345,
                socket_errors: 15,
                non_2xx: 5
            }
        );
        assert!(parse_wrk("nothing").is_err());
    }
}
