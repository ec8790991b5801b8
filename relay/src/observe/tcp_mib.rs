//! The observed namespace's own TCP counters: `RetransSegs` and `OutSegs`
//! from the kernel's per-namespace SNMP MIB (`/proc/net/snmp`, as `nstat`
//! and `netstat -s` read it), for `relay_observe_tcp_retransmits_total` and
//! `relay_observe_tcp_sent_segments_total` (the retransmit ratio's
//! denominator: segments, as the kernel counts them, not TC's packets,
//! which are GSO super-packets on a veth).
//!
//! Why the MIB and not a program: the kernel counts every retransmitted
//! segment there itself, per network namespace, exactly (data, SYN and
//! SYN-ACK retransmissions, by segment count for GSO), at no cost per
//! packet. Deriving it at TC would mean tracking sequence numbers per flow
//! on every egress segment, which the observe programs' cost budget
//! cannot afford, and would still miss SYN-ACKs the kernel retransmits
//! from request sockets. The file is opened once, on the thread that
//! entered the namespace (a proc net file stays bound to the namespace it
//! was opened in), and re-read from the start at each scrape.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};

/// Segments the namespace sent and retransmitted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpSegments {
    /// `OutSegs` (retransmissions not included, as the kernel counts it).
    pub sent: u64,
    /// `RetransSegs`.
    pub retransmitted: u64,
}

/// The namespace's `/proc/net/snmp`, opened inside it.
#[derive(Debug)]
pub struct TcpMib {
    file: File,
    /// The counts when observing began: the series count from attach, as
    /// the packet counters do.
    base: TcpSegments,
}

impl TcpMib {
    /// Opens the calling thread's namespace's MIB (call it inside the namespace).
    pub fn open_here() -> io::Result<Self> {
        let mut mib = TcpMib {
            file: File::open("/proc/thread-self/net/snmp")?,
            base: TcpSegments::default(),
        };
        mib.base = mib.totals()?;
        Ok(mib)
    }

    /// Segments sent and retransmitted in the namespace since [`Self::open_here`].
    pub fn since_open(&mut self) -> io::Result<TcpSegments> {
        let now = self.totals()?;
        Ok(TcpSegments {
            sent: now.sent.saturating_sub(self.base.sent),
            retransmitted: now.retransmitted.saturating_sub(self.base.retransmitted),
        })
    }

    fn totals(&mut self) -> io::Result<TcpSegments> {
        self.file.seek(SeekFrom::Start(0))?;
        let mut text = String::new();
        self.file.read_to_string(&mut text)?;
        let field = |name: &str| {
            tcp_field(&text, name).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("/proc/net/snmp has no Tcp {name}"),
                )
            })
        };
        Ok(TcpSegments {
            sent: field("OutSegs")?,
            retransmitted: field("RetransSegs")?,
        })
    }
}

/// Field `name` of the `Tcp:` rows: a header row of names, then a row of
/// values in the same order.
fn tcp_field(snmp: &str, name: &str) -> Option<u64> {
    let mut rows = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let names = rows.next()?.split_whitespace().skip(1);
    let values = rows.next()?.split_whitespace().skip(1);
    names
        .zip(values)
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SNMP: &str = "\
Ip: Forwarding DefaultTTL InReceives
Ip: 1 64 1234
Icmp: InMsgs InErrors
Icmp: 0 0
Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails EstabResets CurrEstab InSegs OutSegs RetransSegs InErrs OutRsts InCsumErrors
Tcp: 1 200 120000 -1 12 3 0 1 2 5000 6000 77 0 4 0
Udp: InDatagrams NoPorts
Udp: 10 0
";

    #[test]
    fn retransmitted_segments_are_read_from_the_tcp_rows() {
        assert_eq!(tcp_field(SNMP, "RetransSegs"), Some(77));
        assert_eq!(tcp_field(SNMP, "OutSegs"), Some(6000));
        assert_eq!(tcp_field(SNMP, "NoSuchField"), None);
        assert_eq!(tcp_field("Ip: a\nIp: 1\n", "RetransSegs"), None);
    }

    #[test]
    fn the_mib_of_this_namespace_is_readable_and_counts_from_opening() {
        let mut mib = TcpMib::open_here().expect("/proc/thread-self/net/snmp");
        // Nothing this test does retransmits; others may, so only its shape.
        let first = mib.since_open().expect("re-read from the start");
        let then = mib.since_open().expect("and again");
        assert!(then.sent >= first.sent && then.retransmitted >= first.retransmitted);
    }
}
