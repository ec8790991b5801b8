//! Crafted packets for the capture tests: frames with chosen addresses,
//! ports and TCP flags, built with pnet and sent on one end of a veth, so
//! that what the capture should hold is known packet by packet.
//!
//! Every packet carries its own id where a capture shows it: the IPv4
//! identification field, or the IPv6 flow label. [`pcap_ids`] reads the
//! ids back out of a capture with tshark.

use std::net::IpAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use pnet_datalink::{Channel, DataLinkSender, NetworkInterface};
use pnet_packet::MutablePacket;
use pnet_packet::ethernet::{EtherTypes, MutableEthernetPacket};
use pnet_packet::icmp::{IcmpTypes, MutableIcmpPacket};
use pnet_packet::ip::{IpNextHeaderProtocol, IpNextHeaderProtocols};
use pnet_packet::ipv4::{self, MutableIpv4Packet};
use pnet_packet::ipv6::MutableIpv6Packet;
use pnet_packet::tcp::{MutableTcpPacket, TcpFlags};
use pnet_packet::udp::MutableUdpPacket;

use crate::interactive::Interactive;

/// The transport of a crafted packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// TCP with these flags (`TcpFlags::SYN | TcpFlags::ACK`, ...).
    Tcp(u8),
    Udp,
    /// ICMP echo request (ICMPv6 header layout for IPv6 is not needed:
    /// the tests only count it).
    Icmp,
}

/// One packet to send; `id` comes back in the capture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Crafted {
    pub id: u16,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub transport: Transport,
    pub sport: u16,
    pub dport: u16,
    /// Bytes after the transport header.
    pub payload: usize,
}

impl Crafted {
    pub fn tcp(id: u16, src: &str, dst: &str, sport: u16, dport: u16, flags: u8) -> Self {
        Self::new(id, src, dst, Transport::Tcp(flags), sport, dport)
    }

    pub fn udp(id: u16, src: &str, dst: &str, sport: u16, dport: u16) -> Self {
        Self::new(id, src, dst, Transport::Udp, sport, dport)
    }

    pub fn icmp(id: u16, src: &str, dst: &str) -> Self {
        Self::new(id, src, dst, Transport::Icmp, 0, 0)
    }

    fn new(id: u16, src: &str, dst: &str, transport: Transport, sport: u16, dport: u16) -> Self {
        Crafted {
            id,
            src: src
                .parse()
                .expect("invariant: tests pass literal addresses"),
            dst: dst
                .parse()
                .expect("invariant: tests pass literal addresses"),
            transport,
            sport,
            dport,
            payload: 16,
        }
    }

    pub fn with_payload(mut self, bytes: usize) -> Self {
        self.payload = bytes;
        self
    }

    fn transport_len(&self) -> usize {
        match self.transport {
            Transport::Tcp(_) => 20,
            Transport::Udp | Transport::Icmp => 8,
        }
    }

    fn next_header(&self) -> IpNextHeaderProtocol {
        match (self.transport, self.src) {
            (Transport::Tcp(_), _) => IpNextHeaderProtocols::Tcp,
            (Transport::Udp, _) => IpNextHeaderProtocols::Udp,
            (Transport::Icmp, IpAddr::V4(_)) => IpNextHeaderProtocols::Icmp,
            (Transport::Icmp, IpAddr::V6(_)) => IpNextHeaderProtocols::Icmpv6,
        }
    }

    /// The whole Ethernet frame.
    pub fn frame(&self) -> Vec<u8> {
        let l4_len = self.transport_len() + self.payload;
        let ip_len = match self.src {
            IpAddr::V4(_) => 20,
            IpAddr::V6(_) => 40,
        };
        let mut frame = vec![0u8; 14 + ip_len + l4_len];
        {
            let mut eth = MutableEthernetPacket::new(&mut frame).expect("invariant: sized above");
            eth.set_destination(pnet_datalink::MacAddr::broadcast());
            eth.set_source(pnet_datalink::MacAddr::new(
                0x02, 0x72, 0x65, 0x6c, 0x61, 0x79,
            ));
            eth.set_ethertype(if self.src.is_ipv4() {
                EtherTypes::Ipv4
            } else {
                EtherTypes::Ipv6
            });
        }
        let (ip, l4) = frame[14..].split_at_mut(ip_len);
        self.fill_transport(l4);
        match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                let mut p = MutableIpv4Packet::new(ip).expect("invariant: sized above");
                p.set_version(4);
                p.set_header_length(5);
                p.set_total_length(u16::try_from(ip_len + l4_len).expect("small packets"));
                p.set_identification(self.id);
                p.set_ttl(64);
                p.set_next_level_protocol(self.next_header());
                p.set_source(src);
                p.set_destination(dst);
                let checksum = ipv4::checksum(&p.to_immutable());
                p.set_checksum(checksum);
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                let mut p = MutableIpv6Packet::new(ip).expect("invariant: sized above");
                p.set_version(6);
                p.set_flow_label(u32::from(self.id));
                p.set_payload_length(u16::try_from(l4_len).expect("small packets"));
                p.set_next_header(self.next_header());
                p.set_hop_limit(64);
                p.set_source(src);
                p.set_destination(dst);
            }
            _ => panic!("invariant: a crafted packet's addresses are of one family"),
        }
        frame
    }

    fn fill_transport(&self, l4: &mut [u8]) {
        match self.transport {
            Transport::Tcp(flags) => {
                let mut p = MutableTcpPacket::new(l4).expect("invariant: sized");
                p.set_source(self.sport);
                p.set_destination(self.dport);
                p.set_sequence(u32::from(self.id));
                p.set_data_offset(5);
                p.set_flags(flags);
                p.set_window(65535);
            }
            Transport::Udp => {
                let len = u16::try_from(l4.len()).expect("small packets");
                let mut p = MutableUdpPacket::new(l4).expect("invariant: sized");
                p.set_source(self.sport);
                p.set_destination(self.dport);
                p.set_length(len);
            }
            Transport::Icmp => {
                let mut p = MutableIcmpPacket::new(l4).expect("invariant: sized");
                p.set_icmp_type(IcmpTypes::EchoRequest);
                p.payload_mut().fill(0);
            }
        }
    }
}

/// Commonly used flag sets.
pub mod flags {
    use super::TcpFlags;
    pub const SYN: u8 = TcpFlags::SYN;
    pub const SYNACK: u8 = TcpFlags::SYN | TcpFlags::ACK;
    pub const ACK: u8 = TcpFlags::ACK;
    pub const PSHACK: u8 = TcpFlags::PSH | TcpFlags::ACK;
    pub const FINACK: u8 = TcpFlags::FIN | TcpFlags::ACK;
    pub const RST: u8 = TcpFlags::RST;
}

/// A raw sender on one interface.
pub struct Sender {
    tx: Box<dyn DataLinkSender>,
    iface: String,
}

impl Sender {
    /// Opens a packet socket on `iface` in the calling thread's namespace
    /// (call it inside [`crate::NetNs::enter`] for an interface in there).
    pub fn open(iface: &str) -> std::io::Result<Self> {
        let interface: NetworkInterface = pnet_datalink::interfaces()
            .into_iter()
            .find(|i| i.name == iface)
            .ok_or_else(|| std::io::Error::other(format!("no interface {iface}")))?;
        match pnet_datalink::channel(&interface, pnet_datalink::Config::default())? {
            Channel::Ethernet(tx, _rx) => Ok(Sender {
                tx,
                iface: iface.to_string(),
            }),
            _ => Err(std::io::Error::other("pnet: not an Ethernet channel")),
        }
    }

    pub fn send(&mut self, packet: &Crafted) -> Result<()> {
        let frame = packet.frame();
        match self.tx.send_to(&frame, None) {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => {
                Err(e).with_context(|| format!("sending packet {} on {}", packet.id, self.iface))
            }
            None => bail!("pnet could not send on {}", self.iface),
        }
    }

    /// Sends a frame built by hand (ARP, VLAN tags, GRE: what [`Crafted`] does not make).
    pub fn send_frame(&mut self, frame: &[u8]) -> Result<()> {
        match self.tx.send_to(frame, None) {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => Err(e)
                .with_context(|| format!("sending a {}-byte frame on {}", frame.len(), self.iface)),
            None => bail!("pnet could not send on {}", self.iface),
        }
    }

    pub fn send_all(&mut self, packets: &[Crafted]) -> Result<()> {
        packets.iter().try_for_each(|p| self.send(p))
    }
}

/// A packet of a capture, as tshark reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct Captured {
    /// The crafted id (IPv4 identification or IPv6 flow label), if IP.
    pub id: Option<u16>,
    pub interface: String,
    /// 1 inbound, 2 outbound (pcapng EPB flags), 0 unknown.
    pub direction: u8,
    pub len: u32,
    pub caplen: u32,
    pub epoch: f64,
}

fn number(text: &str) -> Option<u64> {
    let text = text.trim();
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

/// Every packet of `pcap` (a file, or `-` with `input` as stdin), via `tshark -r`.
pub fn read_capture(pcap: &Path) -> Result<Vec<Captured>> {
    let mut cmd = Command::new("tshark");
    cmd.arg("-r").arg(pcap).args([
        "-T",
        "fields",
        "-E",
        "separator=|",
        "-e",
        "ip.id",
        "-e",
        "ipv6.flow",
        "-e",
        "frame.interface_name",
        "-e",
        "frame.packet_flags_direction",
        "-e",
        "frame.len",
        "-e",
        "frame.cap_len",
        "-e",
        "frame.time_epoch",
    ]);
    let out = Interactive::run("tshark-read", cmd, b"", Duration::from_secs(60))?;
    let stderr = &out.stderr;
    if !out.status.success() || stderr.contains("appears to have been cut short") {
        bail!(
            "tshark -r {} failed ({}): {stderr}",
            pcap.display(),
            out.status
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split('|').collect();
            if f.len() < 7 {
                bail!("tshark line {line:?}: expected 7 fields");
            }
            let id = number(f[0])
                .or_else(|| number(f[1]))
                .and_then(|n| u16::try_from(n).ok());
            Ok(Captured {
                id,
                interface: f[2].to_string(),
                direction: number(f[3]).map_or(0, |d| d as u8),
                len: number(f[4]).unwrap_or(0) as u32,
                caplen: number(f[5]).unwrap_or(0) as u32,
                epoch: f[6].trim().parse().unwrap_or(0.0),
            })
        })
        .collect()
}

/// The crafted ids in a capture, sorted (duplicates kept, so they show).
pub fn pcap_ids(packets: &[Captured]) -> Vec<u16> {
    let mut ids: Vec<u16> = packets.iter().filter_map(|p| p.id).collect();
    ids.sort_unstable();
    ids
}
