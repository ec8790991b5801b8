//! What `relay observe` costs: iperf3 between two network namespaces over a
//! veth pair, without the observer and with `relay observe` attached in
//! both namespaces, in the same run (rounds alternate which goes first);
//! median of the rounds. Target: observed >= 0.97 of unobserved.
//!
//! A separate observed run with `--bpf-stats` reads the programs' own run
//! time from the kernel's BPF statistics (run_time / runs over both
//! programs of both observers: ns per packet). It is kept out of the ratio
//! because the statistics themselves add two clock reads per run.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::json;

use super::Ctx;
use super::procs::{self, Proc};
use super::report::{Row, SectionReport, Target, median_by};
use super::throughput::iperf3_client_with;
use super::via::Via;

const TARGET_RATIO: f64 = 0.97;
const IPERF_PORT: u16 = 5201;
/// The two ends of the veth pair, inside their namespaces only.
const ADDR_A: &str = "10.233.0.1";
const ADDR_B: &str = "10.233.0.2";
/// Prefix of the namespaces this section makes; stale ones are swept.
const NS_PREFIX: &str = "relay-bench-";

pub fn run(ctx: &Ctx) -> SectionReport {
    let (secs, rounds) = if ctx.quick { (2, 1) } else { (5, 3) };
    println!(
        "xtask: bench: observe, iperf3 -t {secs} between two netns over veth, \
         without and with relay observe on both ends, median of {rounds} round(s)"
    );
    match measure_all(ctx, secs, rounds) {
        Ok(report) => report,
        Err(err) => SectionReport {
            key: "observe",
            rows: vec![throughput_row(None, None), cost_row(None)],
            json: json!({ "error": format!("{err:#}") }),
            errors: vec![format!("{err:#}")],
        },
    }
}

fn measure_all(ctx: &Ctx, secs: u64, rounds: usize) -> Result<SectionReport> {
    if !nix::unistd::geteuid().is_root() {
        bail!("needs root (network namespaces, eBPF)");
    }
    let pair = NetnsPair::create()?;
    let mut server = pair.iperf3_server()?;
    let (mut unobserved, mut observed) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        // Alternate which goes first, so neither always runs on a warm path.
        for with_observer in [round % 2 == 1, round % 2 == 0] {
            let gbps = if with_observer {
                let observers = pair.observe(ctx, false)?;
                let gbps = pair.iperf3_client(secs)?;
                observers.check_saw_traffic()?;
                gbps
            } else {
                pair.iperf3_client(secs)?
            };
            let name = if with_observer {
                "observed"
            } else {
                "unobserved"
            };
            println!("xtask:   {name:<10} {gbps:.2} Gbit/s");
            if with_observer {
                observed.push(gbps);
            } else {
                unobserved.push(gbps);
            }
        }
        server.check_alive()?;
    }
    let unobserved_gbps = median_by(&unobserved, |g| *g);
    let observed_gbps = median_by(&observed, |g| *g);

    let observers = pair.observe(ctx, true)?;
    let stats_gbps = pair.iperf3_client(secs)?;
    let cost = observers.cost()?;
    println!(
        "xtask:   with --bpf-stats {stats_gbps:.2} Gbit/s; {} runs, {:.1} ns per packet",
        cost.runs,
        cost.ns_per_packet()
    );

    let ratio = observed_gbps / unobserved_gbps;
    Ok(SectionReport {
        key: "observe",
        rows: vec![
            throughput_row(Some(unobserved_gbps), Some(observed_gbps)),
            cost_row(Some(cost.ns_per_packet())),
        ],
        json: json!({
            "tool": format!("iperf3 -t {secs} between two netns over a veth pair (end.sum_received.bits_per_second), median of {rounds}"),
            "unobserved_gbit_per_s": unobserved_gbps,
            "observed_gbit_per_s": observed_gbps,
            "samples_unobserved_gbit_per_s": unobserved,
            "samples_observed_gbit_per_s": observed,
            "observed_vs_unobserved": ratio,
            "bpf_stats": {
                "gbit_per_s": stats_gbps,
                "program_runs": cost.runs,
                "program_run_seconds": cost.seconds,
                "ns_per_packet": cost.ns_per_packet(),
            },
        }),
        errors: Vec::new(),
    })
}

/// Throughput row: "direct" is the unobserved run, "relay" the observed one.
fn throughput_row(unobserved: Option<f64>, observed: Option<f64>) -> Row {
    let value = |v: Option<f64>| v.map_or_else(|| "error".to_string(), |v| format!("{v:.2}"));
    let ratio = match (observed, unobserved) {
        (Some(o), Some(u)) if u > 0.0 => Some(o / u),
        _ => None,
    };
    let mut row = Row::cells(
        "observe: netns-to-netns throughput, direct = unobserved, relay = observed both ends (Gbit/s)",
        &[
            (Via::Direct, value(unobserved)),
            (Via::Relay, value(observed)),
        ],
    )
    .target(Target {
        text: format!(">= {TARGET_RATIO}x unobserved"),
        pass: ratio.map(|r| r >= TARGET_RATIO),
    });
    row.vs_direct = ratio.map_or_else(|| "-".to_string(), |r| format!("{r:.3}x"));
    row
}

fn cost_row(ns_per_packet: Option<f64>) -> Row {
    Row::cells(
        "observe: eBPF program run time per packet (ns, --bpf-stats)",
        &[(
            Via::Relay,
            ns_per_packet.map_or_else(|| "error".to_string(), |v| format!("{v:.1}")),
        )],
    )
}

/// Namespaces `a` and `b` joined by a veth pair; deleted on drop. The
/// capture section uses it too.
pub(super) struct NetnsPair {
    a: String,
    b: String,
}

impl NetnsPair {
    pub(super) fn create() -> Result<NetnsPair> {
        sweep_stale();
        let id = std::process::id();
        let pair = NetnsPair {
            a: format!("{NS_PREFIX}{id}-a"),
            b: format!("{NS_PREFIX}{id}-b"),
        };
        ip(&["netns", "add", &pair.a])?;
        ip(&["netns", "add", &pair.b])?;
        let (veth_a, veth_b) = (format!("rb{id}a"), pair.veth_b());
        ip(&[
            "link", "add", &veth_a, "netns", &pair.a, "type", "veth", "peer", "name", &veth_b,
            "netns", &pair.b,
        ])?;
        for (ns, veth, addr) in [(&pair.a, &veth_a, ADDR_A), (&pair.b, &veth_b, ADDR_B)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/30"), "dev", veth])?;
            ip(&["-n", ns, "link", "set", veth, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(pair)
    }

    /// The receiving namespace (the iperf3 server's).
    pub(super) fn b_name(&self) -> &str {
        &self.b
    }

    /// `b`'s end of the veth pair.
    pub(super) fn veth_b(&self) -> String {
        format!("rb{}b", std::process::id())
    }

    pub(super) fn exec(&self, ns: &str, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, program]);
        cmd
    }

    pub(super) fn iperf3_server(&self) -> Result<Proc> {
        let mut cmd = self.exec(&self.b, "iperf3");
        cmd.args(["-s", "-B", ADDR_B, "-p", &IPERF_PORT.to_string()]);
        // `ip netns exec` execs: the process is iperf3, inside b.
        let mut server = Proc::spawn("observe-iperf3-server", cmd)?;
        procs::wait_listening_in_own_netns(IPERF_PORT, &mut server, Duration::from_secs(10))?;
        Ok(server)
    }

    pub(super) fn iperf3_client(&self, secs: u64) -> Result<f64> {
        let cmd = self.exec(&self.a, "iperf3");
        iperf3_client_with(cmd, ADDR_B, IPERF_PORT, secs, 1, "observe-iperf3-client")
    }

    /// `relay observe` in both namespaces, each with its own /metrics.
    fn observe(&self, ctx: &Ctx, bpf_stats: bool) -> Result<Observers> {
        let mut running = Vec::new();
        for ns in [&self.a, &self.b] {
            let port = procs::free_port()?;
            let mut cmd = Command::new(&ctx.relay_bin);
            cmd.args(["observe", &format!("netns:{ns}"), "--metrics"])
                .arg(format!("127.0.0.1:{port}"));
            if bpf_stats {
                cmd.arg("--bpf-stats");
            }
            let mut proc = Proc::spawn(&format!("observe-relay-{}", &ns[ns.len() - 1..]), cmd)?;
            // relay serves metrics only once its programs are attached.
            procs::wait_listening(port, &mut proc, Duration::from_secs(10))?;
            running.push((proc, port));
        }
        Ok(Observers { running })
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        // Deleting a namespace destroys its veth end, and so the pair.
        for ns in [&self.a, &self.b] {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

/// Delete `relay-bench-<pid>-*` namespaces whose bench process is gone
/// (an interrupted run cannot run destructors).
fn sweep_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let pid = name
            .strip_prefix(NS_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        if let Some(pid) = pid
            && !std::path::Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = ip(&["netns", "del", name]);
        }
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .with_context(|| format!("cannot run ip {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The observers of one run; killed on drop.
struct Observers {
    running: Vec<(Proc, u16)>,
}

/// The programs' cost, summed over both observers and both programs.
struct Cost {
    runs: u64,
    seconds: f64,
}

impl Cost {
    fn ns_per_packet(&self) -> f64 {
        if self.runs == 0 {
            return f64::NAN;
        }
        self.seconds * 1e9 / self.runs as f64
    }
}

impl Observers {
    /// Sum of a metric family over every observer.
    fn total(&self, family: &str) -> Result<f64> {
        let mut sum = 0.0;
        for (_, port) in &self.running {
            sum += sum_family(&scrape(*port)?, family);
        }
        Ok(sum)
    }

    /// A measurement the observers did not see is no measurement.
    fn check_saw_traffic(&self) -> Result<()> {
        for (proc, port) in &self.running {
            let packets = sum_family(&scrape(*port)?, "relay_observe_packets_total");
            if packets < 1000.0 {
                bail!(
                    "relay observe (pid {}) counted {packets} packets during an iperf3 run",
                    proc.pid()
                );
            }
        }
        Ok(())
    }

    fn cost(&self) -> Result<Cost> {
        let runs = self.total("relay_observe_program_runs_total")?;
        let seconds = self.total("relay_observe_program_run_seconds_total")?;
        if runs < 1.0 {
            bail!("--bpf-stats reported no program runs");
        }
        Ok(Cost {
            runs: runs as u64,
            seconds,
        })
    }
}

/// GET /metrics from a relay on 127.0.0.1:`port`.
pub(super) fn scrape(port: u16) -> Result<String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("cannot connect to relay's /metrics at {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET /metrics HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut body = String::new();
    stream
        .read_to_string(&mut body)
        .with_context(|| format!("cannot read /metrics from {addr}"))?;
    Ok(body)
}

/// Sum of every sample of `family` (name followed by labels or a space).
pub(super) fn sum_family(text: &str, family: &str) -> f64 {
    text.lines()
        .filter(|line| {
            line.strip_prefix(family)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_a_family_and_not_its_prefix_relatives() {
        let text = "# HELP relay_observe_program_runs_total Runs.\n\
                    relay_observe_program_runs_total{program=\"observe_ingress\",target=\"a\"} 10\n\
                    relay_observe_program_runs_total{program=\"observe_egress\",target=\"a\"} 5\n\
                    relay_observe_program_runs_total_other 99\n";
        assert_eq!(sum_family(text, "relay_observe_program_runs_total"), 15.0);
    }

    #[test]
    fn cost_is_run_time_over_runs() {
        let cost = Cost {
            runs: 1_000,
            seconds: 50e-6,
        };
        assert!((cost.ns_per_packet() - 50.0).abs() < 1e-9);
    }
}
