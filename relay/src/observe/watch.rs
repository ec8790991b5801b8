//! `relay observe --watch`: a table of rates per interface and direction,
//! and the top flows, redrawn every second on the terminal. Rendering is a
//! pure function of two snapshots; only [`draw`] touches the terminal.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::time::Duration;

use super::Snapshot;
use super::attach::Interface;
use super::maps::Direction;

fn rate(now: u64, before: u64, elapsed: Duration) -> f64 {
    now.saturating_sub(before) as f64 / elapsed.as_secs_f64().max(1e-9)
}

fn human_bits(bytes_per_second: f64) -> String {
    let bits = bytes_per_second * 8.0;
    match bits {
        b if b >= 1e9 => format!("{:.2} Gbit/s", b / 1e9),
        b if b >= 1e6 => format!("{:.2} Mbit/s", b / 1e6),
        b if b >= 1e3 => format!("{:.1} kbit/s", b / 1e3),
        b => format!("{b:.0} bit/s"),
    }
}

/// Totals per (interface index, direction): packets, bytes.
fn per_interface(snapshot: &Snapshot) -> BTreeMap<(u32, Direction), (u64, u64)> {
    let mut out = BTreeMap::new();
    for ((ifindex, direction, _, _), c) in &snapshot.traffic {
        let entry: &mut (u64, u64) = out.entry((*ifindex, *direction)).or_default();
        entry.0 += c.packets;
        entry.1 += c.bytes;
    }
    out
}

pub fn render(
    target: &str,
    interfaces: &[Interface],
    before: &Snapshot,
    now: &Snapshot,
    elapsed: Duration,
    top: usize,
) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "relay observe {target}   (Ctrl-C to stop)\n");
    let _ = writeln!(
        out,
        "{:<16} {:<8} {:>12} {:>16} {:>14}",
        "INTERFACE", "DIR", "PACKETS/S", "RATE", "TOTAL PACKETS"
    );
    let previous = per_interface(before);
    for ((ifindex, direction), (packets, bytes)) in per_interface(now) {
        let (p0, b0) = previous
            .get(&(ifindex, direction))
            .copied()
            .unwrap_or_default();
        let name = interfaces
            .iter()
            .find(|i| i.index == ifindex)
            .map_or_else(|| ifindex.to_string(), |i| i.name.clone());
        let _ = writeln!(
            out,
            "{:<16} {:<8} {:>12.0} {:>16} {:>14}",
            name,
            direction.as_str(),
            rate(packets, p0, elapsed),
            human_bits(rate(bytes, b0, elapsed)),
            packets
        );
    }
    let _ = writeln!(
        out,
        "\n{:<6} {:<6} {:<46} {:<46} {:>12}",
        "RANK", "PROTO", "SOURCE", "DESTINATION", "BYTES"
    );
    for (rank, (flow, counter)) in now.flows.iter().take(top).enumerate() {
        let _ = writeln!(
            out,
            "{:<6} {:<6} {:<46} {:<46} {:>12}",
            rank + 1,
            flow.proto_name(),
            format!("{}:{}", flow.source(), flow.sport),
            format!("{}:{}", flow.destination(), flow.dport),
            counter.bytes
        );
    }
    out
}

/// Clears the terminal and prints `table`.
pub fn draw(table: &str) -> std::io::Result<()> {
    use crossterm::{
        cursor::MoveTo,
        execute,
        terminal::{Clear, ClearType},
    };
    let mut stdout = std::io::stdout().lock();
    execute!(stdout, Clear(ClearType::All), MoveTo(0, 0))?;
    stdout.write_all(table.as_bytes())?;
    stdout.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::maps::{Counter, FlowKey};

    #[test]
    fn shows_rates_between_snapshots_and_top_flows() {
        let eth0 = Interface {
            index: 2,
            name: "eth0".into(),
            l2_len: 14,
        };
        let mut before = Snapshot::default();
        before.traffic.insert(
            (2, Direction::Ingress, "tcp", 4),
            Counter {
                packets: 100,
                bytes: 10_000,
            },
        );
        let mut now = Snapshot::default();
        now.traffic.insert(
            (2, Direction::Ingress, "tcp", 4),
            Counter {
                packets: 300,
                bytes: 135_000,
            },
        );
        let flow = FlowKey {
            saddr: [u32::from_ne_bytes([10, 0, 0, 1]), 0, 0, 0],
            daddr: [u32::from_ne_bytes([10, 0, 0, 2]), 0, 0, 0],
            sport: 40000,
            dport: 80,
            family: 4,
            proto: 6,
            _pad: 0,
            ifindex: 2,
        };
        now.flows.push((
            flow,
            Counter {
                packets: 3,
                bytes: 777,
            },
        ));
        let table = render(
            "container:web",
            &[eth0],
            &before,
            &now,
            Duration::from_secs(2),
            10,
        );
        assert!(table.contains("eth0"), "{table}");
        assert!(
            table.contains("100"),
            "200 packets over 2 s is 100/s:\n{table}"
        );
        assert!(
            table.contains("500.0 kbit/s"),
            "125000 bytes over 2 s:\n{table}"
        );
        assert!(
            table.contains("10.0.0.1:40000") && table.contains("777"),
            "{table}"
        );
    }
}
