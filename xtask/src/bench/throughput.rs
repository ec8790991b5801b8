//! Single-stream throughput: iperf3 client to iperf3 server, directly and
//! through each forwarder. iperf3 opens a control and a data connection;
//! both go through the forwarder. Target: relay >= 3x socat.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{Value, json};

use super::Ctx;
use super::procs::{self, Proc};
use super::report::{PerVia, Row, SectionReport, Target, cell, median_by, ratio};
use super::via::{Hop, HopOptions, Via};

const TARGET_VS_SOCAT: f64 = 3.0;

pub fn run(ctx: &Ctx) -> SectionReport {
    let (secs, rounds) = if ctx.quick { (2, 1) } else { (5, 3) };
    println!(
        "xtask: bench: throughput, 1 stream, iperf3 -t {secs}, median of {rounds} rotating round(s)"
    );
    let samples = PerVia::measure_rounds(rounds, |via| {
        let gbps = measure(ctx, via, secs)?;
        println!("xtask:   {:<6} {gbps:.2} Gbit/s", via.name());
        Ok(gbps)
    });
    let gbps = samples.map(|s| median_by(s, |g| *g));

    let relay_vs_socat = match (&gbps.relay, &gbps.socat) {
        (Ok(r), Ok(s)) if *s > 0.0 => Some(r / s),
        _ => None,
    };
    let row = Row {
        metric: "throughput, 1 stream (Gbit/s)".to_string(),
        values: [
            cell(&gbps.direct, 2),
            cell(&gbps.socat, 2),
            cell(&gbps.relay, 2),
        ],
        vs_socat: ratio(gbps.relay.clone().ok(), gbps.socat.clone().ok()),
        vs_direct: ratio(gbps.relay.clone().ok(), gbps.direct.clone().ok()),
        target: Some(Target {
            text: format!(">= {TARGET_VS_SOCAT}x socat"),
            pass: relay_vs_socat.map(|r| r >= TARGET_VS_SOCAT),
        }),
    };
    SectionReport {
        key: "throughput",
        json: json!({
            "tool": format!("iperf3 -t {secs} (end.sum_received.bits_per_second), median of {rounds}"),
            "gbit_per_s": gbps.to_json(|v| json!(v)),
            "samples_gbit_per_s": samples.to_json(|v| json!(v)),
            "relay_vs_socat": relay_vs_socat,
        }),
        errors: gbps.errors(),
        rows: vec![row],
    }
}

/// One iperf3 run through `via`, with a fresh server so a failed run
/// cannot leave it busy for the next one.
fn measure(ctx: &Ctx, via: Via, secs: u64) -> Result<f64> {
    let (server_port, _server) = iperf3_server(via.name())?;
    let mut hop = Hop::start(
        via,
        server_port,
        &ctx.relay_bin,
        "throughput",
        HopOptions::default(),
    )?;
    let gbps = iperf3_client(hop.port, secs, via.name());
    hop.check_alive()?;
    gbps
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

/// `iperf3 -c 127.0.0.1 -p port -t secs`: the received rate in Gbit/s.
pub(super) fn iperf3_client(port: u16, secs: u64, label: &str) -> Result<f64> {
    iperf3_client_with(Command::new("iperf3"), "127.0.0.1", port, secs, label)
}

/// `<iperf3> -c host -p port -t secs`, where `cmd` runs iperf3 (maybe under
/// `ip netns exec`): the received rate in Gbit/s.
pub(super) fn iperf3_client_with(
    mut cmd: Command,
    host: &str,
    port: u16,
    secs: u64,
    label: &str,
) -> Result<f64> {
    cmd.args([
        "-c",
        host,
        "-p",
        &port.to_string(),
        "-t",
        &secs.to_string(),
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
