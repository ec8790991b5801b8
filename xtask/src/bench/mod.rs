//! `cargo xtask bench`: direct vs socat vs relay on loopback, in one run.
//!
//! Each section (throughput, connection rate, latency, memory, TLS, the
//! observer's cost) lives in
//! its own module and hands back a `report::SectionReport`; this module
//! builds relay, runs the sections in order, prints the markdown table and
//! writes `target/bench/results.json`. A target missed is reported, not an
//! error; a measurement that could not be taken makes the command fail
//! after everything else has run.

mod capture;
mod connrate;
mod datapath;
mod latency;
mod observe;
mod procs;
mod reload;
mod report;
mod rss;
mod throughput;
mod tls;
mod via;

use std::path::PathBuf;

use anyhow::{Context, Result, bail};

use crate::workspace;

pub struct Options {
    pub quick: bool,
    /// Section names to run (all when empty), for development.
    pub only: Vec<String>,
}

impl Options {
    pub fn parse(args: &[String]) -> Result<Options> {
        let mut opts = Options {
            quick: false,
            only: Vec::new(),
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
                other => bail!(
                    "unknown bench argument `{other}` (expected: --quick, --only SECTION[,SECTION])"
                ),
            }
        }
        Ok(opts)
    }
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
}

impl Ctx {
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
    ("datapath", datapath::run),
    ("observe", observe::run),
    ("capture", capture::run),
    ("reload", reload::run),
];

pub fn run(opts: &Options) -> Result<()> {
    procs::install_signal_cleanup()?;
    println!(
        "xtask: bench{}: building relay",
        if opts.quick { " --quick" } else { "" }
    );
    let relay_bin = workspace::build_relay()?;
    let logs = workspace::bench_dir().join("logs");
    let _ = std::fs::remove_dir_all(&logs);

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
    };

    let sections: Vec<report::SectionReport> = SECTIONS
        .iter()
        .filter(|(name, _)| opts.only.is_empty() || opts.only.iter().any(|o| o == name))
        .map(|(_, section)| section(&ctx))
        .collect();

    let table = report::render_table(&sections);
    println!("\n{table}\n");
    let json_path = workspace::bench_dir().join("results.json");
    report::write_json(&json_path, opts.quick, &sections)?;
    println!(
        "xtask: wrote {} (process logs in {})",
        json_path.display(),
        logs.display()
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
