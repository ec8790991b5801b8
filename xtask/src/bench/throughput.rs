//! Single-stream throughput: iperf3 client to iperf3 server, directly and
//! through each forwarder. iperf3 opens a control and a data connection;
//! both go through the forwarder. Targets: relay >= 3x socat and >= 0.95x
//! direct. Also 8 parallel streams (target: >= 1.1x the best peer), and the
//! forwarder's CPU time per GiB relayed (utime + stime of every process in
//! its group: socat's forks, nginx's workers; target: <= 0.8x the best
//! peer's), and the whole host's.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{Value, json};

use super::Ctx;
use super::procs::{self, Proc};
use super::report::{Better, PerVia, SectionReport, Target, median_by};
use super::via::{Hop, Via};

const TARGET_VS_SOCAT: f64 = 3.0;
/// Issue 18's targets: one stream near direct, 8 streams and CPU ahead of
/// the best peer.
const TARGET_1_VS_DIRECT: f64 = 0.95;
const TARGET_8_VS_BEST: f64 = 1.1;
const TARGET_CPU_VS_BEST: f64 = 0.8;

/// Parallel streams of the multi-stream row.
const MANY_STREAMS: usize = 8;

/// One iperf3 run: the rate, and the CPU time the forwarder spent per GiB.
#[derive(Clone, Debug)]
struct Run {
    gbps: f64,
    /// None for direct (no forwarder).
    cpu_s_per_gib: Option<f64>,
    /// The whole machine's busy CPU time per GiB: client, server,
    /// forwarder, softirq and kernel workers (where sockmap's work runs).
    host_cpu_s_per_gib: f64,
}

pub fn run(ctx: &Ctx) -> SectionReport {
    let (secs, rounds) = (ctx.secs(), ctx.rounds());
    let vias = ctx.vias(Via::PLAIN);
    let mut rows = Vec::new();
    let mut json = serde_json::Map::new();
    let mut errors = Vec::new();
    for streams in [1, MANY_STREAMS] {
        println!(
            "xtask: bench: throughput, {streams} stream(s), iperf3 -P {streams} -t {secs}, median of {rounds} rotating round(s)"
        );
        let samples = PerVia::measure_rounds(&vias, rounds, |via| {
            let run = measure(ctx, via, secs, streams)?;
            let cpu = run
                .cpu_s_per_gib
                .map_or(String::new(), |c| format!(", {c:.3} CPU s/GiB"));
            let cpu = format!("{cpu}, host {:.3} CPU s/GiB", run.host_cpu_s_per_gib);
            println!("xtask:   {:<14} {:.2} Gbit/s{cpu}", via.name(), run.gbps);
            Ok(run)
        });
        let runs = samples.map(|s| median_by(s, |r| r.gbps));
        let gbps = runs.map(|r| r.gbps);
        let metric = format!(
            "throughput, {streams} stream{} (Gbit/s)",
            if streams == 1 { "" } else { "s" }
        );
        let row = gbps.row(metric, 2, Better::Higher);
        rows.push(if streams == 1 {
            row.target(Target::at_least(&gbps, Via::Socat, TARGET_VS_SOCAT))
                .target(Target::at_least(&gbps, Via::Direct, TARGET_1_VS_DIRECT))
        } else {
            row.target(Target::vs_best_peer(
                &gbps,
                Better::Higher,
                TARGET_8_VS_BEST,
            ))
        });
        if streams == 1 {
            let cpu = runs.map(|r| r.cpu_s_per_gib.unwrap_or(f64::NAN));
            rows.push(
                cpu.row(
                    "forwarder CPU per GiB relayed, 1 stream, all its processes (s)",
                    3,
                    Better::Lower,
                )
                .target(Target::vs_best_peer(
                    &cpu,
                    Better::Lower,
                    TARGET_CPU_VS_BEST,
                )),
            );
            json.insert(
                "cpu_s_per_gib".into(),
                cpu.to_json(|v| json!(v.is_finite().then_some(*v))),
            );
            let host = runs.map(|r| r.host_cpu_s_per_gib);
            rows.push(host.row(
                "host CPU per GiB relayed, 1 stream, all processes and kernel (s)",
                3,
                Better::Lower,
            ));
            json.insert(
                "host_cpu_s_per_gib".into(),
                host.to_json(|v| json!(v.is_finite().then_some(*v))),
            );
            json.insert("relay_vs_socat".into(), json!(gbps.relay_vs(Via::Socat)));
        }
        json.insert(
            format!("streams_{streams}"),
            json!({
                "tool": format!("iperf3 -P {streams} -t {secs} (end.sum_received.bits_per_second), median of {rounds}"),
                "gbit_per_s": gbps.to_json(|v| json!(v)),
                "samples_gbit_per_s": samples.to_json(|v| json!(v.iter().map(|r| r.gbps).collect::<Vec<_>>())),
                "relay_vs_best_peer": gbps.relay_vs_best_peer(Better::Higher),
            }),
        );
        errors.extend(gbps.errors());
    }
    json.insert("data_path".into(), json!(ctx.data_path.unwrap_or("auto")));
    SectionReport {
        key: "throughput",
        json: Value::Object(json),
        errors,
        rows,
    }
}

/// One iperf3 run through `via`, with a fresh server so a failed run
/// cannot leave it busy for the next one.
fn measure(ctx: &Ctx, via: Via, secs: u64, streams: usize) -> Result<Run> {
    let (server_port, _server) = iperf3_server(via.name())?;
    let mut hop = Hop::start(
        via,
        server_port,
        &ctx.relay_bin,
        "throughput",
        ctx.hop_options(),
    )?;
    let pgid = hop.pgid();
    let cpu_before = pgid.map(procs::group_cpu_seconds).transpose()?;
    let host_before = procs::host_busy_seconds()?;
    let gbps = iperf3_client(hop.port, secs, streams, via.name())?;
    let host_after = procs::host_busy_seconds()?;
    hop.check_alive()?;
    // socat's children are counted once reaped: give it a moment to reap.
    std::thread::sleep(Duration::from_millis(200));
    let cpu_after = pgid.map(procs::group_cpu_seconds).transpose()?;
    let gib = gbps * 1e9 * secs as f64 / 8.0 / f64::from(1u32 << 30);
    let cpu_s_per_gib = match (cpu_before, cpu_after) {
        (Some(before), Some(after)) if gib > 0.0 => Some((after - before) / gib),
        _ => None,
    };
    Ok(Run {
        gbps,
        cpu_s_per_gib,
        host_cpu_s_per_gib: if gib > 0.0 {
            (host_after - host_before) / gib
        } else {
            f64::NAN
        },
    })
}

/// A fresh iperf3 server on a free loopback port, once it listens.
pub(super) fn iperf3_server(label: &str) -> Result<(u16, Proc)> {
    let port = procs::free_port()?;
    let mut cmd = Command::new("iperf3");
    cmd.args(["-s", "-B", "127.0.0.1", "-p", &port.to_string()]);
    let mut server = Proc::spawn(&format!("iperf3-server-{label}"), cmd)?;
    procs::wait_listening(port, &mut server, Duration::from_secs(10))?;
    Ok((port, server))
}

/// `iperf3 -c 127.0.0.1 -p port -t secs -P streams`: the received rate
/// (all streams) in Gbit/s.
pub(super) fn iperf3_client(port: u16, secs: u64, streams: usize, label: &str) -> Result<f64> {
    iperf3_client_with(
        Command::new("iperf3"),
        "127.0.0.1",
        port,
        secs,
        streams,
        label,
    )
}

/// `<iperf3> -c host -p port -t secs -P streams`, where `cmd` runs iperf3
/// (maybe under `ip netns exec`): the received rate in Gbit/s.
pub(super) fn iperf3_client_with(
    mut cmd: Command,
    host: &str,
    port: u16,
    secs: u64,
    streams: usize,
    label: &str,
) -> Result<f64> {
    cmd.args([
        "-c",
        host,
        "-p",
        &port.to_string(),
        "-t",
        &secs.to_string(),
        "-P",
        &streams.to_string(),
        "-J",
    ]);
    let client = Proc::spawn(&format!("iperf3-client-{label}"), cmd)?;
    parse_gbps(&client.wait_output(Duration::from_secs(secs + 30))?)
}

fn parse_gbps(json_text: &str) -> Result<f64> {
    let doc: Value =
        serde_json::from_str(json_text).context("iperf3 -J printed something that is not JSON")?;
    if let Some(err) = doc.get("error").and_then(Value::as_str) {
        anyhow::bail!("iperf3 reported: {err}");
    }
    let bps = doc
        .pointer("/end/sum_received/bits_per_second")
        .and_then(Value::as_f64)
        .context("iperf3 JSON has no end.sum_received.bits_per_second")?;
    Ok(bps / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_received_rate_and_errors() {
        let ok = r#"{"end":{"sum_received":{"bits_per_second":12.5e9}}}"#;
        assert!((parse_gbps(ok).unwrap() - 12.5).abs() < 1e-9);
        let err = r#"{"start":{},"error":"unable to connect to server"}"#;
        assert!(format!("{:#}", parse_gbps(err).unwrap_err()).contains("unable to connect"));
    }
}
