//! DNS over UDP as the observe program counts it: the `dns` map's key
//! (mirroring `struct relay_dns_key` of relay-ebpf/include/observe.h),
//! reading it summed over CPUs, and the bounded label values its fields
//! become (`qtype`: twelve common types by name, every other as `other`;
//! `rcode`: RFC 1035/2136/6895 names of 0..10, numbers for the rest, which
//! are at most 16 values). Query names never become labels.
//!
//! The kernel parses a datagram to port 53 as a query and one from port 53
//! as a response (its header, and the first question's type by walking up
//! to 32 labels of its name); DNS over TCP is not parsed. The response
//! latency is in the `dns_latency` histograms ([`super::latency`]).

use aya::maps::{MapData, PerCpuHashMap};

use super::latency::Direction;

/// `struct relay_dns_key`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DnsKey {
    pub qtype: u16,
    pub kind: u8,
    pub direction: u8,
    pub rcode: u8,
    pub _pad: [u8; 3],
}

// SAFETY: #[repr(C)] integers and padding bytes declared as fields: every
// bit pattern is valid.
unsafe impl aya::Pod for DnsKey {}

/// `RELAY_DNS_QUERY` / `RELAY_DNS_RESPONSE`.
const RESPONSE: u8 = 1;

/// One counted kind of message, with its count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsCount {
    pub direction: Direction,
    pub qtype: &'static str,
    /// `None` for queries.
    pub rcode: Option<String>,
    pub count: u64,
}

/// The `dns` map, summed over CPUs.
pub fn read(map: &PerCpuHashMap<&MapData, DnsKey, u64>) -> Vec<DnsCount> {
    let mut counts: Vec<DnsCount> = map
        .iter()
        .filter_map(Result::ok)
        .filter_map(|(key, per_cpu)| count_of(key, per_cpu.iter().sum()))
        .collect();
    counts.sort_by(|a, b| (a.direction, a.qtype, &a.rcode).cmp(&(b.direction, b.qtype, &b.rcode)));
    counts
}

fn count_of(key: DnsKey, count: u64) -> Option<DnsCount> {
    let direction = *Direction::ALL.get(usize::from(key.direction))?;
    Some(DnsCount {
        direction,
        qtype: qtype_name(key.qtype),
        rcode: (key.kind == RESPONSE).then(|| rcode_name(key.rcode)),
        count,
    })
}

/// The `qtype` label (the kernel keeps only these numbers, the rest as 0).
pub fn qtype_name(qtype: u16) -> &'static str {
    match qtype {
        1 => "A",
        2 => "NS",
        5 => "CNAME",
        6 => "SOA",
        12 => "PTR",
        15 => "MX",
        16 => "TXT",
        28 => "AAAA",
        33 => "SRV",
        64 => "SVCB",
        65 => "HTTPS",
        255 => "ANY",
        _ => "other",
    }
}

/// The `rcode` label: the header's 4-bit RCODE by its registered name.
pub fn rcode_name(rcode: u8) -> String {
    match rcode {
        0 => "NOERROR".into(),
        1 => "FORMERR".into(),
        2 => "SERVFAIL".into(),
        3 => "NXDOMAIN".into(),
        4 => "NOTIMP".into(),
        5 => "REFUSED".into(),
        6 => "YXDOMAIN".into(),
        7 => "YXRRSET".into(),
        8 => "NXRRSET".into(),
        9 => "NOTAUTH".into(),
        10 => "NOTZONE".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(kind: u8, direction: u8, qtype: u16, rcode: u8) -> DnsKey {
        DnsKey {
            qtype,
            kind,
            direction,
            rcode,
            _pad: [0; 3],
        }
    }

    #[test]
    fn the_key_has_the_c_layout() {
        assert_eq!(std::mem::size_of::<DnsKey>(), 8);
    }

    #[test]
    fn queries_have_no_rcode_and_responses_name_theirs() {
        let query = count_of(key(0, 0, 1, 0), 5).expect("outbound");
        assert_eq!(
            query,
            DnsCount {
                direction: Direction::Outbound,
                qtype: "A",
                rcode: None,
                count: 5
            }
        );
        let response = count_of(key(1, 1, 28, 3), 2).expect("inbound");
        assert_eq!(response.direction, Direction::Inbound);
        assert_eq!(response.qtype, "AAAA");
        assert_eq!(response.rcode.as_deref(), Some("NXDOMAIN"));
        assert_eq!(count_of(key(1, 0, 0, 2), 1).map(|c| c.qtype), Some("other"));
        assert_eq!(
            count_of(key(1, 0, 1, 2), 1).and_then(|c| c.rcode),
            Some("SERVFAIL".into())
        );
        assert_eq!(count_of(key(0, 7, 1, 0), 1), None, "an unknown direction");
    }

    #[test]
    fn labels_stay_bounded() {
        let qtypes: std::collections::BTreeSet<_> = (0..=u16::MAX).map(qtype_name).collect();
        assert_eq!(qtypes.len(), 13);
        let rcodes: std::collections::BTreeSet<_> = (0..16).map(rcode_name).collect();
        assert_eq!(rcodes.len(), 16);
        assert_eq!(rcode_name(15), "15");
    }
}
