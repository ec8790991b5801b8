//! What `relay observe` exported for one interface, next to what the
//! kernel's own interface counters say, read at moments when nothing is
//! crossing the interface so the two can be compared exactly.
//!
//! The observer counts a frame at TC (ingress after the veth's receive
//! counter moved, egress before its transmit counter moves), so a reading
//! taken while a frame is in flight can differ by that frame. [`settle`]
//! therefore takes a reading only when the kernel's counters did not move
//! across the scrape and both sides read the same twice in a row.
//!
//! Observed traffic is expressed as [`LinkStats`]: ingress is `rx`, egress
//! is `tx`, summed over protocols, as the kernel counts a link.

use std::time::Duration;

use anyhow::{Result, anyhow};

use crate::Scrape;
use crate::namespaced::{LinkStats, Subject};
use crate::relay_proc::Relay;
use crate::wait::poll_until;

/// How long traffic may take to settle, and relay's counters to agree.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(15);

/// relay's packet and byte counters of `iface`, summed over protocols.
pub fn observed(scrape: &Scrape, target: &str, iface: &str) -> LinkStats {
    let count = |name: &str, direction: &str| {
        scrape.counter(
            name,
            &[
                ("target", target),
                ("iface", iface),
                ("direction", direction),
            ],
        ) as u64
    };
    LinkStats {
        rx_packets: count("relay_observe_packets_total", "ingress"),
        rx_bytes: count("relay_observe_bytes_total", "ingress"),
        tx_packets: count("relay_observe_packets_total", "egress"),
        tx_bytes: count("relay_observe_bytes_total", "egress"),
    }
}

/// relay's count of TCP segments with `flag` (syn, synack, fin, rst).
pub fn tcp_flag(scrape: &Scrape, target: &str, iface: &str, direction: &str, flag: &str) -> u64 {
    scrape.counter(
        "relay_observe_tcp_flags_total",
        &[
            ("target", target),
            ("iface", iface),
            ("direction", direction),
            ("flag", flag),
        ],
    ) as u64
}

/// One reading of both sides, taken while the interface was quiet.
#[derive(Clone, Debug)]
pub struct Settled {
    pub kernel: LinkStats,
    pub observed: LinkStats,
    pub scrape: Scrape,
}

impl Settled {
    /// Kernel and observer growth since `base`: (kernel, observed).
    pub fn growth_since(&self, base: &Settled) -> (LinkStats, LinkStats) {
        (
            self.kernel.since(&base.kernel),
            self.observed.since(&base.observed),
        )
    }
}

/// Poll until a quiet reading of `iface` satisfies `accept`; on timeout
/// the error shows the last quiet reading (and the growth since `base`).
pub fn settle(
    relay: &Relay,
    subject: &Subject,
    iface: &str,
    base: Option<&Settled>,
    accept: impl Fn(&Settled) -> bool,
) -> Result<Settled> {
    let target = subject.label()?;
    let mut previous: Option<(LinkStats, LinkStats)> = None;
    let mut last: Option<Settled> = None;
    poll_until(
        &format!("a quiet moment on {iface} in {target} that passes the check"),
        SETTLE_TIMEOUT,
        || {
            let before = subject.link_stats(iface)?;
            let scrape = relay.scrape()?;
            let after = subject.link_stats(iface)?;
            let reading = (after, observed(&scrape, &target, iface));
            let quiet = before == after && previous == Some(reading);
            previous = Some(reading);
            if !quiet {
                return Ok(None);
            }
            let settled = Settled {
                kernel: reading.0,
                observed: reading.1,
                scrape,
            };
            if accept(&settled) {
                return Ok(Some(settled));
            }
            last = Some(settled);
            Ok(None)
        },
    )
    .map_err(|e| match (last, base) {
        (Some(last), Some(base)) => {
            let (kernel, observed) = last.growth_since(base);
            anyhow!(
                "{e}\nlast quiet reading of {iface}: kernel grew by {kernel:?}, \
                 relay observed {observed:?}\nlast scrape:\n{}",
                last.scrape.text
            )
        }
        (Some(last), None) => anyhow!("{e}\nlast quiet reading: {last:?}"),
        (None, _) => e,
    })
}

/// Bytes per frame that the kernel's counters of `iface` leave out but TC
/// (and so relay) counts: loopback counts a frame in `loopback_xmit` after
/// `eth_type_trans` has pulled its 14-byte Ethernet header, where a veth
/// counts the whole frame.
fn uncounted_header(iface: &str) -> u64 {
    if iface == "lo" { 14 } else { 0 }
}

/// Wait until relay's counters of `iface` grew exactly as the kernel's
/// did since `base` (allowing for [`uncounted_header`]); returns that reading.
pub fn agree_since(
    relay: &Relay,
    subject: &Subject,
    iface: &str,
    base: &Settled,
) -> Result<Settled> {
    let header = uncounted_header(iface);
    settle(relay, subject, iface, Some(base), |now| {
        let (kernel, observed) = now.growth_since(base);
        kernel
            == LinkStats {
                rx_bytes: observed.rx_bytes - header * observed.rx_packets,
                tx_bytes: observed.tx_bytes - header * observed.tx_packets,
                ..observed
            }
    })
}
