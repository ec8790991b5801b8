//! Rust mirrors of the structs in relay-ebpf/include/observe.h, and reading
//! the observe program's maps into plain totals (summed over CPUs).
//!
//! Who writes what: the eBPF program writes `traffic`, `tcp_flags`,
//! `flows`, `capture_stats` and the `samples` ring buffer; relay writes
//! `l2_len` once per interface at attach time, seeds `capture_stats` with
//! zeros, and sets `capture_ctl`.

use std::collections::HashMap;
use std::net::IpAddr;

use aya::maps::{MapData, PerCpuHashMap, PerCpuValues};

/// `enum relay_direction`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    fn from_raw(raw: u8) -> Option<Self> {
        match raw {
            0 => Some(Direction::Ingress),
            1 => Some(Direction::Egress),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

/// `struct relay_traffic_key`
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TrafficKey {
    pub ifindex: u32,
    pub direction: u8,
    pub proto: u8,
    pub family: u8,
    pub _pad: u8,
}

/// `struct relay_counter`
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// `struct relay_flag_key`
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlagKey {
    pub ifindex: u32,
    pub direction: u8,
    pub flag: u8,
    pub _pad: u16,
}

/// `struct relay_flow_key`
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub family: u8,
    pub proto: u8,
    pub _pad: u16,
    pub ifindex: u32,
}

/// `struct relay_capture_key`
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CaptureKey {
    pub ifindex: u32,
    pub stat: u32,
}

/// `struct relay_sample`: the header of a ring buffer record.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SampleHeader {
    pub ts_ns: u64,
    pub ifindex: u32,
    pub len: u32,
    pub caplen: u32,
    pub direction: u8,
    pub _pad: [u8; 3],
}

/// `enum relay_capture_stat`, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CaptureStat {
    Matched,
    Filtered,
    Sampled,
    RingFull,
    Sent,
    Truncated,
}

impl CaptureStat {
    pub const ALL: [CaptureStat; 6] = [
        CaptureStat::Matched,
        CaptureStat::Filtered,
        CaptureStat::Sampled,
        CaptureStat::RingFull,
        CaptureStat::Sent,
        CaptureStat::Truncated,
    ];

    pub fn raw(self) -> u32 {
        self as u32
    }
}

/// Capture counts per (ifindex, counter), summed over CPUs.
pub type CaptureStats = HashMap<(u32, CaptureStat), u64>;

// SAFETY: plain #[repr(C)] integers with explicit padding fields, so every
// bit pattern is valid and there are no implicit padding bytes.
unsafe impl aya::Pod for TrafficKey {}
// SAFETY: as above.
unsafe impl aya::Pod for Counter {}
// SAFETY: as above.
unsafe impl aya::Pod for FlagKey {}
// SAFETY: as above.
unsafe impl aya::Pod for FlowKey {}
// SAFETY: as above.
unsafe impl aya::Pod for CaptureKey {}

pub const PROTOS: [&str; 4] = ["tcp", "udp", "icmp", "other"];
pub const FLAGS: [&str; 4] = ["syn", "synack", "fin", "rst"];

impl FlowKey {
    fn addr(&self, words: &[u32; 4]) -> IpAddr {
        if self.family == 6 {
            let mut bytes = [0u8; 16];
            for (chunk, word) in bytes.chunks_exact_mut(4).zip(words) {
                chunk.copy_from_slice(&word.to_ne_bytes());
            }
            IpAddr::from(bytes)
        } else {
            IpAddr::from(words[0].to_ne_bytes())
        }
    }

    pub fn source(&self) -> IpAddr {
        self.addr(&self.saddr)
    }

    pub fn destination(&self) -> IpAddr {
        self.addr(&self.daddr)
    }

    pub fn proto_name(&self) -> &'static str {
        match self.proto {
            6 => "tcp",
            17 => "udp",
            1 | 58 => "icmp",
            _ => "other",
        }
    }
}

/// Totals per (ifindex, direction, protocol class, family).
pub type Traffic = HashMap<(u32, Direction, &'static str, u8), Counter>;
/// Totals per (ifindex, direction, flag name).
pub type Flags = HashMap<(u32, Direction, &'static str), u64>;

fn sum(values: &PerCpuValues<Counter>) -> Counter {
    values.iter().fold(Counter::default(), |acc, c| Counter {
        packets: acc.packets + c.packets,
        bytes: acc.bytes + c.bytes,
    })
}

pub fn read_traffic(map: &PerCpuHashMap<&MapData, TrafficKey, Counter>) -> Traffic {
    let mut out = Traffic::new();
    for (key, values) in map.iter().filter_map(Result::ok) {
        let (Some(direction), Some(proto)) = (
            Direction::from_raw(key.direction),
            PROTOS.get(key.proto as usize),
        ) else {
            continue;
        };
        out.insert((key.ifindex, direction, proto, key.family), sum(&values));
    }
    out
}

pub fn read_flags(map: &PerCpuHashMap<&MapData, FlagKey, u64>) -> Flags {
    let mut out = Flags::new();
    for (key, values) in map.iter().filter_map(Result::ok) {
        let (Some(direction), Some(flag)) = (
            Direction::from_raw(key.direction),
            FLAGS.get(key.flag as usize),
        ) else {
            continue;
        };
        out.insert((key.ifindex, direction, flag), values.iter().sum());
    }
    out
}

pub fn read_capture(map: &PerCpuHashMap<&MapData, CaptureKey, u64>) -> CaptureStats {
    let mut out = CaptureStats::new();
    for (key, values) in map.iter().filter_map(Result::ok) {
        if let Some(stat) = CaptureStat::ALL.get(key.stat as usize) {
            out.insert((key.ifindex, *stat), values.iter().sum());
        }
    }
    out
}

pub fn read_flows(map: &PerCpuHashMap<&MapData, FlowKey, Counter>) -> Vec<(FlowKey, Counter)> {
    map.iter()
        .filter_map(Result::ok)
        .map(|(key, values)| (key, sum(&values)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    /// Size and member offsets (bytes) of a struct, as the BTF of the
    /// committed object records them (`bpftool btf dump ... format raw`).
    fn btf_layout(dump: &str, name: &str) -> (usize, Vec<(String, usize)>) {
        let mut lines = dump
            .lines()
            .skip_while(|l| !l.contains(&format!("STRUCT '{name}' ")));
        let header = lines
            .next()
            .unwrap_or_else(|| panic!("struct {name} not in the object's BTF"));
        let size = header
            .split("size=")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .expect("size=");
        let members = lines
            .take_while(|l| l.starts_with('\t'))
            .map(|l| {
                let member = l
                    .trim()
                    .split('\'')
                    .nth(1)
                    .expect("member name")
                    .to_string();
                let bits: usize = l
                    .split("bits_offset=")
                    .nth(1)
                    .and_then(|n| n.trim().parse().ok())
                    .expect("bits_offset=");
                (member, bits / 8)
            })
            .collect();
        (size, members)
    }

    /// The Rust mirrors agree with what clang made of observe.h.
    #[test]
    fn layouts_match_the_compiled_object() {
        let object = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../relay-ebpf/obj/observe.bpf.o"
        );
        let dump = match std::process::Command::new("bpftool")
            .args(["btf", "dump", "file", object, "format", "raw"])
            .output()
        {
            Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).into_owned(),
            _ => {
                eprintln!(
                    "SKIP layouts_match_the_compiled_object: bpftool not available (apt-get install bpftool)"
                );
                return;
            }
        };
        /// A struct's name and size, and each field's name and offset.
        type Layout = (&'static str, usize, Vec<(&'static str, usize)>);
        let rust: [Layout; 6] = [
            (
                "relay_traffic_key",
                size_of::<TrafficKey>(),
                vec![
                    ("ifindex", offset_of!(TrafficKey, ifindex)),
                    ("direction", offset_of!(TrafficKey, direction)),
                    ("proto", offset_of!(TrafficKey, proto)),
                    ("family", offset_of!(TrafficKey, family)),
                    ("_pad", offset_of!(TrafficKey, _pad)),
                ],
            ),
            (
                "relay_counter",
                size_of::<Counter>(),
                vec![
                    ("packets", offset_of!(Counter, packets)),
                    ("bytes", offset_of!(Counter, bytes)),
                ],
            ),
            (
                "relay_flag_key",
                size_of::<FlagKey>(),
                vec![
                    ("ifindex", offset_of!(FlagKey, ifindex)),
                    ("direction", offset_of!(FlagKey, direction)),
                    ("flag", offset_of!(FlagKey, flag)),
                    ("_pad", offset_of!(FlagKey, _pad)),
                ],
            ),
            (
                "relay_flow_key",
                size_of::<FlowKey>(),
                vec![
                    ("saddr", offset_of!(FlowKey, saddr)),
                    ("daddr", offset_of!(FlowKey, daddr)),
                    ("sport", offset_of!(FlowKey, sport)),
                    ("dport", offset_of!(FlowKey, dport)),
                    ("family", offset_of!(FlowKey, family)),
                    ("proto", offset_of!(FlowKey, proto)),
                    ("_pad", offset_of!(FlowKey, _pad)),
                    ("ifindex", offset_of!(FlowKey, ifindex)),
                ],
            ),
            (
                "relay_capture_key",
                size_of::<CaptureKey>(),
                vec![
                    ("ifindex", offset_of!(CaptureKey, ifindex)),
                    ("stat", offset_of!(CaptureKey, stat)),
                ],
            ),
            (
                "relay_sample",
                size_of::<SampleHeader>(),
                vec![
                    ("ts_ns", offset_of!(SampleHeader, ts_ns)),
                    ("ifindex", offset_of!(SampleHeader, ifindex)),
                    ("len", offset_of!(SampleHeader, len)),
                    ("caplen", offset_of!(SampleHeader, caplen)),
                    ("direction", offset_of!(SampleHeader, direction)),
                    ("_pad", offset_of!(SampleHeader, _pad)),
                ],
            ),
        ];
        for (name, size, members) in rust {
            let (c_size, c_members) = btf_layout(&dump, name);
            assert_eq!(size, c_size, "size of {name}: Rust {size}, C {c_size}");
            let rust_members: Vec<(String, usize)> =
                members.iter().map(|(m, o)| (m.to_string(), *o)).collect();
            assert_eq!(
                rust_members, c_members,
                "members of {name} (name, byte offset): Rust vs C"
            );
        }
    }

    #[test]
    fn flow_addresses_decode_in_network_order() {
        let key = FlowKey {
            saddr: [u32::from_ne_bytes([10, 0, 0, 1]), 0, 0, 0],
            daddr: [u32::from_ne_bytes([10, 0, 0, 2]), 0, 0, 0],
            sport: 1234,
            dport: 80,
            family: 4,
            proto: 6,
            _pad: 0,
            ifindex: 2,
        };
        assert_eq!(key.source().to_string(), "10.0.0.1");
        assert_eq!(key.destination().to_string(), "10.0.0.2");
        assert_eq!(key.proto_name(), "tcp");
    }
}
