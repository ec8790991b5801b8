//! `cargo xtask bench`: relay beside direct and the real peers (socat,
//! HAProxy plain and with splice, nginx stream, docker-proxy, stunnel for
//! TLS) on loopback, in one run, the order rotated from round to round.
//!
//! Each section (throughput, connection rate, latency, memory, TLS, many
//! routes, data paths, the observer's cost, socat's UDP and UNIX forms)
//! lives in its own module and
//! hands back a `report::SectionReport`; this module installs missing
//! peers, builds relay, runs the sections in order, prints the markdown
//! table and writes `target/bench/results.json`. A target missed is
//! reported, not an error; a measurement that could not be taken makes the
//! command fail after everything else has run.

mod capture;
mod connrate;
mod datapath;
mod latency;
mod observe;
mod peers;
mod procs;
mod reload;
mod report;
mod routes;
mod rss;
mod socat_forms;
mod throughput;
mod tls;
mod via;

use std::path::PathBuf;

use anyhow::{Context, Result, bail};

use crate::{packages, workspace};
use via::Via;

pub struct Options {
    pub quick: bool,
    /// Section names to run (all when empty), for development.
    pub only: Vec<String>,
    /// Rounds per measurement (None: 3, or 1 with --quick).
    pub rounds: Option<usize>,
    /// Peers to run beside direct and relay (None: all).
    pub peers: Option<Vec<Via>>,
}

impl Options {
    pub fn parse(args: &[String]) -> Result<Options> {
        let mut opts = Options {
            quick: false,
            only: Vec::new(),
            rounds: None,
            peers: None,
        };
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--quick" => opts.quick = true,
                "--only" => {
                    let list = args
                        .next()
                        .context("--only needs a section list, e.g. `--only latency,rss`")?;
                    for name in list.split(',') {
                        if !SECTIONS.iter().any(|(known, _)| *known == name) {
                            bail!(
                                "unknown bench section `{name}` (sections: {})",
                                section_names()
                            );
                        }
                        opts.only.push(name.to_string());
                    }
                }
                "--rounds" => {
                    let n = args
                        .next()
                        .context("--rounds needs a number, e.g. `--rounds 1`")?;
                    let n: usize = n.parse().ok().filter(|n| *n > 0).with_context(|| {
                        format!("--rounds `{n}`: expected a number of rounds, 1 or more")
                    })?;
                    opts.rounds = Some(n);
                }
                "--peers" => {
                    let list = args
                        .next()
                        .context("--peers needs a list, e.g. `--peers haproxy,nginx`")?;
                    let mut peers = Vec::new();
                    for name in list.split(',').filter(|n| !n.is_empty()) {
                        match Via::from_name(name) {
                            Some(via) if via.is_peer() => peers.push(via),
                            _ => bail!(
                                "unknown peer `{name}` (peers: {}; direct and relay always run)",
                                peer_names()
                            ),
                        }
                    }
                    opts.peers = Some(peers);
                }
                other => bail!(
                    "unknown bench argument `{other}` (expected: --quick, --rounds N, --only SECTION[,SECTION], --peers PEER[,PEER])"
                ),
            }
        }
        Ok(opts)
    }
}

fn peer_names() -> String {
    Via::ALL
        .iter()
        .filter(|v| v.is_peer())
        .map(|v| v.name())
        .collect::<Vec<_>>()
        .join(", ")
}

fn section_names() -> String {
    SECTIONS
        .iter()
        .map(|(name, _)| *name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// What every section needs.
/// File descriptors kept free for everything but the held connections
/// (stdio, listeners, epoll, logs) in this process and in relay. Relay's
/// own reserve (relay/src/limits.rs: 64, plus 65 for its metrics endpoint)
/// caps its `--max-connections` below what a smaller reserve would ask of it.
const FD_RESERVE: u64 = 129;

#[derive(Clone)]
pub struct Ctx {
    relay_bin: PathBuf,
    quick: bool,
    /// How many connections this process (client and server end each) and
    /// relay can hold, given RLIMIT_NOFILE.
    max_held_connections: usize,
    /// relay's `--data-path` in this section (None: its default, auto).
    data_path: Option<&'static str>,
    /// `--rounds` (None: the default for the run's length).
    rounds: Option<usize>,
    /// Peers to run beside direct and relay (None: every one that can do
    /// a section's job).
    peers: Option<Vec<Via>>,
}

impl Ctx {
    /// Rounds per measurement: `--rounds`, else 3 (1 with --quick).
    fn rounds(&self) -> usize {
        self.rounds.unwrap_or(if self.quick { 1 } else { 3 })
    }

    /// Seconds per timed client run.
    fn secs(&self) -> u64 {
        if self.quick { 2 } else { 5 }
    }

    /// Of the routes that can do a section's job (`candidates`), the ones
    /// this run measures: direct and relay always, peers as `--peers` says.
    fn vias(&self, candidates: &[Via]) -> Vec<Via> {
        candidates
            .iter()
            .copied()
            .filter(|via| !via.is_peer() || self.peers.as_ref().is_none_or(|p| p.contains(via)))
            .collect()
    }

    /// Forwarder options every section starts from.
    fn hop_options(&self) -> via::HopOptions {
        via::HopOptions {
            data_path: self.data_path,
            ..via::HopOptions::default()
        }
    }
}

type Section = fn(&Ctx) -> report::SectionReport;

/// The sections, in the order they run.
const SECTIONS: &[(&str, Section)] = &[
    ("throughput", throughput::run),
    ("connrate", connrate::run),
    ("latency", latency::run),
    ("rss", rss::run),
    ("tls", tls::run),
    ("routes", routes::run),
    ("datapath", datapath::run),
    ("observe", observe::run),
    ("capture", capture::run),
    ("reload", reload::run),
    ("socat", socat_forms::run),
];

pub fn run(opts: &Options) -> Result<()> {
    procs::install_signal_cleanup()?;
    packages::ensure()?;
    println!(
        "xtask: bench{}: building relay",
        if opts.quick { " --quick" } else { "" }
    );
    let relay_bin = workspace::build_relay()?;
    let logs = workspace::bench_dir().join("logs");
    let _ = std::fs::remove_dir_all(&logs);
    // The peers' configurations and run dirs are this run's, not a previous one's.
    let _ = std::fs::remove_dir_all(workspace::bench_dir().join("run"));
    if let Ok(entries) = std::fs::read_dir(workspace::bench_dir()) {
        for entry in entries.flatten() {
            if entry.path().extension().is_some_and(|e| e == "conf") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    // The RSS section holds both ends of every connection here, and relay
    // (which inherits this limit) holds two sockets per connection.
    let (want_conns, _) = rss::counts(opts.quick);
    let (nofile, hard) = procs::raise_nofile(2 * want_conns as u64 + FD_RESERVE)?;
    let max_held_connections = (nofile.saturating_sub(FD_RESERVE) / 2) as usize;
    if max_held_connections < want_conns {
        println!(
            "xtask: note: RLIMIT_NOFILE hard limit is {hard} and raising it needs CAP_SYS_RESOURCE; \
             the memory bench uses {max_held_connections} connections instead of {want_conns}"
        );
    }
    let ctx = Ctx {
        relay_bin,
        quick: opts.quick,
        max_held_connections,
        data_path: None,
        rounds: opts.rounds,
        peers: opts.peers.clone(),
    };
    let started = std::time::Instant::now();

    let sections: Vec<report::SectionReport> = SECTIONS
        .iter()
        .filter(|(name, _)| opts.only.is_empty() || opts.only.iter().any(|o| o == name))
        .map(|(_, section)| section(&ctx))
        .collect();

    let table = report::render_table(&sections);
    println!("\n{table}\n");
    let json_path = workspace::bench_dir().join("results.json");
    report::write_json(&json_path, opts.quick, opts.rounds, &sections)?;
    println!(
        "xtask: wrote {} in {:.0} s (process logs in {}, the peers' configurations in {})",
        json_path.display(),
        started.elapsed().as_secs_f64(),
        logs.display(),
        workspace::bench_dir().display()
    );

    let errors: Vec<String> = sections
        .iter()
        .flat_map(|s| s.errors.iter().map(|e| format!("{}: {e}", s.key)))
        .collect();
    if !errors.is_empty() {
        bail!(
            "{} measurement(s) could not be taken:\n  {}",
            errors.len(),
            errors.join("\n  ")
        );
    }
    Ok(())
}
