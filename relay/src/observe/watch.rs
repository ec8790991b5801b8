//! `relay observe --watch`: a table of rates per interface and direction
//! (every attached interface, idle ones at zero), and the top flows,
//! redrawn every second on the terminal; for `observe containers` one such
//! block per container, the busiest first. Rendering is a pure function of
//! two snapshots per namespace; only [`draw`] touches the terminal.

use std::collections::{BTreeMap, BTreeSet};
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

/// One observed namespace as `--watch` draws it: two snapshots of it.
pub struct View<'a> {
    pub name: &'a str,
    pub interfaces: &'a [Interface],
    pub before: &'a Snapshot,
    pub now: &'a Snapshot,
}

impl View<'_> {
    /// Bytes per second over all its interfaces, to sort by.
    fn byte_rate(&self, elapsed: Duration) -> f64 {
        let total = |s: &Snapshot| per_interface(s).values().map(|(_, b)| b).sum::<u64>();
        rate(total(self.now), total(self.before), elapsed)
    }
}

/// The table of one namespace: every attached interface in both
/// directions (idle ones too, at zero), then its top flows.
fn block(out: &mut String, view: &View, elapsed: Duration, top: usize) {
    let _ = writeln!(
        out,
        "{:<16} {:<8} {:>12} {:>16} {:>14}",
        "INTERFACE", "DIR", "PACKETS/S", "RATE", "TOTAL PACKETS"
    );
    let (previous, now) = (per_interface(view.before), per_interface(view.now));
    let indexes: BTreeSet<u32> = view
        .interfaces
        .iter()
        .map(|i| i.index)
        .chain(now.keys().map(|(index, _)| *index))
        .collect();
    for ifindex in indexes {
        let name = view
            .interfaces
            .iter()
            .find(|i| i.index == ifindex)
            .map_or_else(|| ifindex.to_string(), |i| i.name.clone());
        for direction in [Direction::Ingress, Direction::Egress] {
            let (packets, bytes) = now.get(&(ifindex, direction)).copied().unwrap_or_default();
            let (p0, b0) = previous
                .get(&(ifindex, direction))
                .copied()
                .unwrap_or_default();
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
    }
    if view.now.flows.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "\n{:<6} {:<6} {:<46} {:<46} {:>12}",
        "RANK", "PROTO", "SOURCE", "DESTINATION", "BYTES"
    );
    for (rank, (flow, counter)) in view.now.flows.iter().take(top).enumerate() {
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
}

/// `relay observe <target> --watch`: one namespace.
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
    let view = View {
        name: target,
        interfaces,
        before,
        now,
    };
    block(&mut out, &view, elapsed, top);
    out
}

/// `relay observe containers --watch`: one block per attached container,
/// the busiest (bytes per second) first, then by name.
pub fn render_fleet(views: Vec<View>, elapsed: Duration, top: usize) -> String {
    let mut rated: Vec<(f64, View)> = views
        .into_iter()
        .map(|view| (view.byte_rate(elapsed), view))
        .collect();
    rated.sort_by(|(a_rate, a), (b_rate, b)| {
        b_rate.total_cmp(a_rate).then_with(|| a.name.cmp(b.name))
    });
    let mut out = String::new();
    let _ = writeln!(
        out,
        "relay observe containers: {} attached   (Ctrl-C to stop)",
        rated.len()
    );
    for (byte_rate, view) in &rated {
        let _ = writeln!(out, "\n== {}   {}", view.name, human_bits(*byte_rate));
        block(&mut out, view, elapsed, top);
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

    fn iface(index: u32, name: &str) -> Interface {
        Interface {
            index,
            name: name.into(),
            l2_len: 14,
        }
    }

    fn with_bytes(ifindex: u32, bytes: u64) -> Snapshot {
        let mut snapshot = Snapshot::default();
        snapshot.traffic.insert(
            (ifindex, Direction::Egress, "tcp", 4),
            Counter { packets: 1, bytes },
        );
        snapshot
    }

    #[test]
    fn idle_interfaces_are_listed_and_containers_sorted_by_traffic() {
        let (quiet_if, busy_if) = ([iface(2, "eth0"), iface(3, "eth1")], [iface(2, "eth0")]);
        let idle = Snapshot::default();
        let (busy_before, busy_now) = (with_bytes(2, 0), with_bytes(2, 1_000_000));
        let views = vec![
            View {
                name: "aaa-quiet",
                interfaces: &quiet_if,
                before: &idle,
                now: &idle,
            },
            View {
                name: "zzz-busy",
                interfaces: &busy_if,
                before: &busy_before,
                now: &busy_now,
            },
        ];
        let table = render_fleet(views, Duration::from_secs(1), 10);
        let busy = table.find("== zzz-busy").expect("a block for the busy one");
        let quiet = table
            .find("== aaa-quiet")
            .expect("a block for the quiet one");
        assert!(busy < quiet, "the busiest first:\n{table}");
        assert!(
            table.starts_with("relay observe containers: 2 attached"),
            "{table}"
        );
        let quiet_block = &table[quiet..];
        for name in ["eth0", "eth1"] {
            assert_eq!(
                quiet_block.lines().filter(|l| l.starts_with(name)).count(),
                2,
                "{name} idle, shown in both directions:\n{table}"
            );
        }
        assert!(table[busy..quiet].contains("8.00 Mbit/s"), "{table}");
    }
}
