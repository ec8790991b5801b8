//! What `relay observe --pcap` captures, next to tcpdump in the same run:
//! iperf3 between two network namespaces over a veth pair (the observe
//! section's), capturing every packet of the receiving namespace at snap
//! length 128 into a file, once
//! with relay and once with `tcpdump -s 128 -w` on the same interface, and
//! once with nothing (rounds alternate the order; medians).
//!
//! Reported per tool: packets written per second, the drops the tool itself
//! reports (relay: relay_observe_sample_drops_total{reason="ring_full"} and
//! the file's statistics block; tcpdump: "dropped by kernel"), and
//! throughput against the unobserved run. Target: relay writes no fewer
//! packets per second than tcpdump, and every packet it saw is either in
//! the file or counted as dropped.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;

use super::Ctx;
use super::observe::NetnsPair;
use super::procs::{self, Proc, TempDir};
use super::report::{Row, SectionReport, Target, median_by};
use super::via::Via;
use crate::workspace;

const SNAPLEN: &str = "128";

/// One capturing run.
#[derive(Debug, Clone, Copy, Default)]
struct Run {
    gbps: f64,
    /// Packets in the file.
    written: u64,
    /// Packets the tool says it lost.
    dropped: u64,
    /// relay only: packets its programs saw (matched, with no filter).
    seen: u64,
    secs: f64,
}

impl Run {
    fn per_second(&self) -> f64 {
        self.written as f64 / self.secs
    }
}

pub fn run(ctx: &Ctx) -> SectionReport {
    let (secs, rounds) = if ctx.quick { (2, 1) } else { (5, 3) };
    println!(
        "xtask: bench: capture, iperf3 -t {secs} between two netns over veth: unobserved, \
         relay observe --pcap --snaplen {SNAPLEN}, tcpdump -s {SNAPLEN} -w; median of {rounds} round(s)"
    );
    match measure_all(ctx, secs, rounds) {
        Ok(report) => report,
        Err(err) => SectionReport {
            key: "capture",
            rows: rows(None, None, None),
            json: json!({ "error": format!("{err:#}") }),
            errors: vec![format!("{err:#}")],
        },
    }
}

fn measure_all(ctx: &Ctx, secs: u64, rounds: usize) -> Result<SectionReport> {
    if !nix::unistd::geteuid().is_root() {
        bail!("needs root (network namespaces, eBPF, tcpdump)");
    }
    let pair = NetnsPair::create()?;
    let mut server = pair.iperf3_server()?;
    let dir = TempDir::new("capture")?;
    let (mut bare, mut relay, mut tcpdump) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        for turn in 0..3 {
            match (round + turn) % 3 {
                0 => {
                    let gbps = pair.iperf3_client(secs)?;
                    println!("xtask:   unobserved {gbps:.2} Gbit/s");
                    bare.push(gbps);
                }
                1 => {
                    let run = with_relay(ctx, &pair, secs, &dir.path().join("relay.pcapng"))?;
                    println!(
                        "xtask:   relay      {:.2} Gbit/s, {} written, {} dropped (of {} seen)",
                        run.gbps, run.written, run.dropped, run.seen
                    );
                    relay.push(run);
                }
                _ => {
                    let run = with_tcpdump(&pair, secs, &dir.path().join("tcpdump.pcap"))?;
                    println!(
                        "xtask:   tcpdump    {:.2} Gbit/s, {} written, {} dropped",
                        run.gbps, run.written, run.dropped
                    );
                    tcpdump.push(run);
                }
            }
        }
        server.check_alive()?;
    }
    let bare_gbps = median_by(&bare, |g| *g);
    let relay_run = *median_run(&relay);
    let tcpdump_run = *median_run(&tcpdump);
    Ok(SectionReport {
        key: "capture",
        rows: rows(Some(bare_gbps), Some(relay_run), Some(tcpdump_run)),
        json: json!({
            "tool": format!("iperf3 -t {secs} netns to netns over veth; capture of the receiving netns at snaplen {SNAPLEN}; median of {rounds} (by packets per second)"),
            "unobserved_gbit_per_s": bare_gbps,
            "relay": run_json(&relay_run, bare_gbps),
            "tcpdump": run_json(&tcpdump_run, bare_gbps),
            "samples_relay": relay.iter().map(|r| run_json(r, bare_gbps)).collect::<Vec<_>>(),
            "samples_tcpdump": tcpdump.iter().map(|r| run_json(r, bare_gbps)).collect::<Vec<_>>(),
        }),
        errors: Vec::new(),
    })
}

fn run_json(run: &Run, bare_gbps: f64) -> serde_json::Value {
    json!({
        "gbit_per_s": run.gbps,
        "vs_unobserved": run.gbps / bare_gbps,
        "packets_written": run.written,
        "packets_per_s": run.per_second(),
        "dropped_reported": run.dropped,
        "seen": run.seen,
    })
}

fn median_run(runs: &[Run]) -> &Run {
    let mut sorted: Vec<&Run> = runs.iter().collect();
    sorted.sort_by(|a, b| a.per_second().total_cmp(&b.per_second()));
    sorted[sorted.len() / 2]
}

/// `relay observe netns:<b> --pcap <file> --snaplen 128` around one iperf3 run.
fn with_relay(ctx: &Ctx, pair: &NetnsPair, secs: u64, file: &Path) -> Result<Run> {
    let port = procs::free_port()?;
    let mut cmd = Command::new(&ctx.relay_bin);
    cmd.args(["observe", &format!("netns:{}", pair.b_name()), "--pcap"])
        .arg(file)
        .args(["--snaplen", SNAPLEN, "--metrics"])
        .arg(format!("127.0.0.1:{port}"));
    let mut relay = Proc::spawn("capture-relay", cmd)?;
    procs::wait_listening(port, &mut relay, Duration::from_secs(10))?;
    let gbps = pair.iperf3_client(secs)?;
    interrupt(&relay)?;
    relay.wait_output(Duration::from_secs(30))?;
    let (written, dropped, seen) = pcapng_counts(file)?;
    if written + dropped != seen {
        bail!(
            "relay's accounting does not add up: {written} written + {dropped} dropped != {seen} seen"
        );
    }
    Ok(Run {
        gbps,
        written,
        dropped,
        seen,
        secs: secs as f64,
    })
}

/// `tcpdump -i <veth> -s 128 -w <file>` inside the receiving namespace.
fn with_tcpdump(pair: &NetnsPair, secs: u64, file: &Path) -> Result<Run> {
    let name = "capture-tcpdump";
    let mut cmd = pair.exec(pair.b_name(), "tcpdump");
    cmd.args(["-i", &pair.veth_b(), "-s", SNAPLEN, "-w"])
        .arg(file);
    let mut tcpdump = Proc::spawn(name, cmd)?;
    let err_log = workspace::bench_dir()
        .join("logs")
        .join(format!("{name}.err"));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&err_log)
        .unwrap_or_default()
        .contains("listening on")
    {
        tcpdump.check_alive()?;
        if std::time::Instant::now() > deadline {
            bail!("tcpdump did not start listening within 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let gbps = pair.iperf3_client(secs)?;
    interrupt(&tcpdump)?;
    tcpdump.wait_output(Duration::from_secs(30))?;
    let stderr = std::fs::read_to_string(&err_log)
        .with_context(|| format!("cannot read {}", err_log.display()))?;
    let count = |what: &str| -> Result<u64> {
        stderr
            .lines()
            .find(|l| l.ends_with(what))
            .and_then(|l| l.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("no `N {what}` line in tcpdump's stderr:\n{stderr}"))
    };
    Ok(Run {
        gbps,
        written: count("packets captured")?,
        dropped: count("packets dropped by kernel")?,
        seen: count("packets received by filter")?,
        secs: secs as f64,
    })
}

fn interrupt(proc: &Proc) -> Result<()> {
    kill(Pid::from_raw(proc.pid()), Signal::SIGINT).context("cannot signal the capture")
}

/// Packets in a relay pcapng file, and the dropped and accepted counts of
/// its last statistics block per interface, summed: (written, dropped, seen).
fn pcapng_counts(file: &Path) -> Result<(u64, u64, u64)> {
    let data = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?))
    };
    let (mut packets, mut stats) = (0u64, std::collections::HashMap::new());
    let mut at = 0;
    while at + 12 <= data.len() {
        let (Some(kind), Some(len)) = (u32_at(at), u32_at(at + 4)) else {
            break;
        };
        let len = len as usize;
        if len < 12 || at + len > data.len() {
            bail!("{}: a block at {at} runs past the end", file.display());
        }
        match kind {
            6 => packets += 1,
            5 => {
                // Interface statistics: id, timestamp, then options.
                let id = u32_at(at + 8).unwrap_or(0);
                let (mut opt, end) = (at + 20, at + len - 4);
                let (mut dropped, mut accepted) = (0, 0);
                while opt + 4 <= end {
                    let code = u16::from_le_bytes([data[opt], data[opt + 1]]);
                    let size = usize::from(u16::from_le_bytes([data[opt + 2], data[opt + 3]]));
                    let value = data
                        .get(opt + 4..opt + 4 + size.min(8))
                        .and_then(|v| v.try_into().ok())
                        .map(u64::from_le_bytes);
                    match (code, value) {
                        (0, _) => break,
                        (5, Some(v)) => dropped = v,
                        (6, Some(v)) => accepted = v,
                        _ => {}
                    }
                    opt += 4 + size.next_multiple_of(4);
                }
                stats.insert(id, (dropped, accepted));
            }
            _ => {}
        }
        at += len;
    }
    let (dropped, seen) = stats
        .values()
        .fold((0, 0), |acc, (d, a)| (acc.0 + d, acc.1 + a));
    if stats.is_empty() {
        bail!(
            "{}: no interface statistics block (did relay exit cleanly?)",
            file.display()
        );
    }
    Ok((packets, dropped, seen))
}

fn rows(bare: Option<f64>, relay: Option<Run>, tcpdump: Option<Run>) -> Vec<Row> {
    let fmt = |v: Option<f64>, digits: usize| {
        v.map_or_else(|| "error".to_string(), |v| format!("{v:.digits$}"))
    };
    let pps = |r: Option<Run>| r.map(|r| r.per_second());
    let ratio = match (relay, tcpdump) {
        (Some(r), Some(t)) if t.per_second() > 0.0 => Some(r.per_second() / t.per_second()),
        _ => None,
    };
    let vs_bare = |r: Option<Run>| match (r, bare) {
        (Some(r), Some(b)) if b > 0.0 => format!("{:.3}x", r.gbps / b),
        _ => "-".to_string(),
    };
    let mut written = Row::cells(
        format!(
            "capture: packets written per second at snaplen {SNAPLEN} (direct = tcpdump -w, relay = observe --pcap)"
        ),
        &[
            (Via::Direct, fmt(pps(tcpdump), 0)),
            (Via::Relay, fmt(pps(relay), 0)),
        ],
    )
    .target(Target {
        text: ">= 1x tcpdump".to_string(),
        pass: ratio.map(|r| r >= 1.0),
    });
    written.vs_direct = ratio.map_or_else(|| "-".to_string(), |r| format!("{r:.2}x"));
    let dropped = Row::cells(
        "capture: packets dropped, as each tool reports it (direct = tcpdump, relay = relay)",
        &[
            (Via::Direct, fmt(tcpdump.map(|r| r.dropped as f64), 0)),
            (Via::Relay, fmt(relay.map(|r| r.dropped as f64), 0)),
        ],
    )
    .target(Target {
        text: "every drop reported (relay: written + dropped = seen)".to_string(),
        // with_relay fails the run when relay's counts do not add up.
        pass: relay.map(|_| true),
    });
    let mut during = Row::cells(
        "capture: iperf3 throughput while capturing, vs unobserved (direct = tcpdump, socat = unobserved, relay = relay) (Gbit/s)",
        &[
            (Via::Direct, fmt(tcpdump.map(|r| r.gbps), 2)),
            (Via::Socat, fmt(bare, 2)),
            (Via::Relay, fmt(relay.map(|r| r.gbps), 2)),
        ],
    );
    during.vs_best_peer = format!("tcpdump {}", vs_bare(tcpdump));
    during.vs_direct = format!("relay {}", vs_bare(relay));
    vec![written, dropped, during]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_packets_and_the_statistics_of_a_relay_file() {
        // SHB-less is fine for the counter: two EPBs and one ISB with
        // ifdrop 3 and filteraccept 5.
        let mut data = Vec::new();
        for _ in 0..2 {
            data.extend_from_slice(&6u32.to_le_bytes());
            data.extend_from_slice(&32u32.to_le_bytes());
            data.extend_from_slice(&[0u8; 20]);
            data.extend_from_slice(&32u32.to_le_bytes());
        }
        let mut isb = Vec::new();
        isb.extend_from_slice(&0u32.to_le_bytes());
        isb.extend_from_slice(&[0u8; 8]);
        for (code, value) in [(5u16, 3u64), (6, 5)] {
            isb.extend_from_slice(&code.to_le_bytes());
            isb.extend_from_slice(&8u16.to_le_bytes());
            isb.extend_from_slice(&value.to_le_bytes());
        }
        isb.extend_from_slice(&[0u8; 4]);
        let total = (12 + isb.len()) as u32;
        data.extend_from_slice(&5u32.to_le_bytes());
        data.extend_from_slice(&total.to_le_bytes());
        data.extend_from_slice(&isb);
        data.extend_from_slice(&total.to_le_bytes());
        let dir = std::env::temp_dir().join(format!("xtask-capture-{}", std::process::id()));
        std::fs::write(&dir, &data).unwrap();
        let counts = pcapng_counts(&dir);
        let _ = std::fs::remove_file(&dir);
        assert_eq!(counts.unwrap(), (2, 3, 5));
    }
}
