//! pcapng blocks, encoded into a byte buffer: the section header, interface
//! descriptions, enhanced packets, interface statistics and decryption
//! secrets (a TLS key log Wireshark decrypts with).
//!
//! Encoding only: where the bytes go (a file, stdout, rotation, a disk that
//! fills) is `observe::sink`'s concern. Every function appends one whole
//! block to `out`, so a writer that writes whole buffers never leaves half
//! a block behind. Little-endian throughout; timestamps are nanoseconds
//! since the Unix epoch, and every interface block says so (`if_tsresol` 9).
//!
//! Written here rather than with the `pcap-file` crate: pcap-file 2.0 has no
//! Decryption Secrets Block, and a writer of five block types is short.
//! Format: <https://www.ietf.org/archive/id/draft-ietf-opsawg-pcapng-02.html>.

const SHB: u32 = 0x0A0D_0D0A;
const IDB: u32 = 0x0000_0001;
const ISB: u32 = 0x0000_0005;
const EPB: u32 = 0x0000_0006;
const DSB: u32 = 0x0000_000A;
const BYTE_ORDER_MAGIC: u32 = 0x1A2B_3C4D;
/// Decryption Secrets Block type for an NSS key log (`TLSK`).
const SECRETS_TLS_KEY_LOG: u32 = 0x544c_534b;

const OPT_END: u16 = 0;
const OPT_COMMENT: u16 = 1;
const SHB_HARDWARE: u16 = 2;
const SHB_OS: u16 = 3;
const SHB_USERAPPL: u16 = 4;
const IF_NAME: u16 = 2;
const IF_DESCRIPTION: u16 = 3;
const IF_TSRESOL: u16 = 9;
const EPB_FLAGS: u16 = 2;
const ISB_STARTTIME: u16 = 2;
const ISB_ENDTIME: u16 = 3;
const ISB_IFRECV: u16 = 4;
const ISB_IFDROP: u16 = 5;
const ISB_FILTERACCEPT: u16 = 6;
const ISB_USRDELIV: u16 = 8;

/// Link types (LINKTYPE_*) relay writes.
pub const LINKTYPE_ETHERNET: u16 = 1;
/// Packets that start with the IP header (devices with no link layer).
pub const LINKTYPE_RAW: u16 = 101;

/// What the section header says about the capture.
#[derive(Debug, Clone, Default)]
pub struct Section {
    pub hardware: String,
    pub os: String,
    pub application: String,
    pub comment: String,
}

/// One interface: the `interface` number of later blocks is its position
/// among the interface blocks of the section, from 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub description: String,
    pub linktype: u16,
    pub snaplen: u32,
}

/// Which way a packet went, for the EPB flags word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Inbound,
    Outbound,
}

/// One captured packet.
#[derive(Debug, Clone, Copy)]
pub struct Packet<'a> {
    pub interface: u32,
    /// Nanoseconds since the Unix epoch.
    pub timestamp_ns: u64,
    /// Length on the wire; `data` may be shorter (the snap length).
    pub original_len: u32,
    pub data: &'a [u8],
    pub direction: Direction,
}

/// An interface's counts since the start of the capture.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Statistics {
    pub interface: u32,
    pub timestamp_ns: u64,
    pub start_ns: u64,
    /// Packets the capture looked at.
    pub received: u64,
    /// Packets lost for lack of room (the ring buffer was full).
    pub dropped: u64,
    /// Packets that passed the filter.
    pub filter_accept: u64,
    /// Packets written.
    pub delivered: u64,
}

/// Appends a block: type, total length, `body` padded to 4 bytes, options,
/// total length again.
fn block(out: &mut Vec<u8>, kind: u32, body: &[u8], options: &[u8]) {
    let padded = body.len().next_multiple_of(4);
    let total = 12 + padded + options.len();
    let total = u32::try_from(total)
        .expect("invariant: a block holds at most a snap length (256 KiB) plus options");
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&total.to_le_bytes());
    out.extend_from_slice(body);
    out.resize(out.len() + (padded - body.len()), 0);
    out.extend_from_slice(options);
    out.extend_from_slice(&total.to_le_bytes());
}

/// Options as they are encoded: code, length, value padded to 4 bytes;
/// `end` closes the list.
#[derive(Default)]
struct Options(Vec<u8>);

impl Options {
    fn raw(mut self, code: u16, value: &[u8]) -> Self {
        // Longer values are cut: the length field is 16 bits.
        let value = &value[..value.len().min(usize::from(u16::MAX) - 3)];
        let len = u16::try_from(value.len()).expect("invariant: cut to fit 16 bits above");
        self.0.extend_from_slice(&code.to_le_bytes());
        self.0.extend_from_slice(&len.to_le_bytes());
        self.0.extend_from_slice(value);
        self.0.resize(
            self.0.len() + (value.len().next_multiple_of(4) - value.len()),
            0,
        );
        self
    }

    /// A string option; empty strings are left out.
    fn text(self, code: u16, value: &str) -> Self {
        if value.is_empty() {
            self
        } else {
            self.raw(code, value.as_bytes())
        }
    }

    fn u64(self, code: u16, value: u64) -> Self {
        self.raw(code, &value.to_le_bytes())
    }

    /// A timestamp: high 32 bits first, each half little-endian.
    fn timestamp(self, code: u16, ns: u64) -> Self {
        let mut value = [0u8; 8];
        value[..4].copy_from_slice(&((ns >> 32) as u32).to_le_bytes());
        value[4..].copy_from_slice(&(ns as u32).to_le_bytes());
        self.raw(code, &value)
    }

    fn end(self) -> Vec<u8> {
        let mut bytes = self.0;
        if !bytes.is_empty() {
            bytes.extend_from_slice(&OPT_END.to_le_bytes());
            bytes.extend_from_slice(&0u16.to_le_bytes());
        }
        bytes
    }
}

/// A section header block (section length unknown: -1, as a stream needs).
pub fn section_header(out: &mut Vec<u8>, section: &Section) {
    let mut body = Vec::with_capacity(16);
    body.extend_from_slice(&BYTE_ORDER_MAGIC.to_le_bytes());
    body.extend_from_slice(&1u16.to_le_bytes());
    body.extend_from_slice(&0u16.to_le_bytes());
    body.extend_from_slice(&(-1i64).to_le_bytes());
    let options = Options::default()
        .text(OPT_COMMENT, &section.comment)
        .text(SHB_HARDWARE, &section.hardware)
        .text(SHB_OS, &section.os)
        .text(SHB_USERAPPL, &section.application)
        .end();
    block(out, SHB, &body, &options);
}

/// An interface description block with nanosecond timestamps.
pub fn interface_description(out: &mut Vec<u8>, interface: &Interface) {
    let mut body = Vec::with_capacity(8);
    body.extend_from_slice(&interface.linktype.to_le_bytes());
    body.extend_from_slice(&0u16.to_le_bytes());
    body.extend_from_slice(&interface.snaplen.to_le_bytes());
    let options = Options::default()
        .text(IF_NAME, &interface.name)
        .text(IF_DESCRIPTION, &interface.description)
        .raw(IF_TSRESOL, &[9])
        .end();
    block(out, IDB, &body, &options);
}

/// An enhanced packet block carrying the direction in its flags word.
pub fn enhanced_packet(out: &mut Vec<u8>, packet: &Packet<'_>) {
    let captured = u32::try_from(packet.data.len()).unwrap_or(u32::MAX);
    let mut header = [0u8; 20];
    header[..4].copy_from_slice(&packet.interface.to_le_bytes());
    header[4..8].copy_from_slice(&((packet.timestamp_ns >> 32) as u32).to_le_bytes());
    header[8..12].copy_from_slice(&(packet.timestamp_ns as u32).to_le_bytes());
    header[12..16].copy_from_slice(&captured.to_le_bytes());
    header[16..20].copy_from_slice(&packet.original_len.max(captured).to_le_bytes());
    // Flags bits 0-1: 01 inbound, 10 outbound.
    let flags: u32 = match packet.direction {
        Direction::Inbound => 1,
        Direction::Outbound => 2,
    };
    let options = Options::default()
        .raw(EPB_FLAGS, &flags.to_le_bytes())
        .end();
    let start = out.len();
    out.extend_from_slice(&EPB.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes()); // total length, below
    out.extend_from_slice(&header);
    out.extend_from_slice(packet.data);
    out.resize(
        out.len() + (packet.data.len().next_multiple_of(4) - packet.data.len()),
        0,
    );
    out.extend_from_slice(&options);
    let total = u32::try_from(out.len() - start + 4)
        .expect("invariant: a packet block holds at most a snap length (256 KiB)");
    out[start + 4..start + 8].copy_from_slice(&total.to_le_bytes());
    out.extend_from_slice(&total.to_le_bytes());
}

/// An interface statistics block; `comment` says what the numbers do not.
pub fn interface_statistics(out: &mut Vec<u8>, stats: &Statistics, comment: &str) {
    let mut body = [0u8; 12];
    body[..4].copy_from_slice(&stats.interface.to_le_bytes());
    body[4..8].copy_from_slice(&((stats.timestamp_ns >> 32) as u32).to_le_bytes());
    body[8..12].copy_from_slice(&(stats.timestamp_ns as u32).to_le_bytes());
    let options = Options::default()
        .text(OPT_COMMENT, comment)
        .timestamp(ISB_STARTTIME, stats.start_ns)
        .timestamp(ISB_ENDTIME, stats.timestamp_ns)
        .u64(ISB_IFRECV, stats.received)
        .u64(ISB_IFDROP, stats.dropped)
        .u64(ISB_FILTERACCEPT, stats.filter_accept)
        .u64(ISB_USRDELIV, stats.delivered)
        .end();
    block(out, ISB, &body, &options);
}

/// A decryption secrets block holding NSS key log lines.
pub fn tls_key_log(out: &mut Vec<u8>, key_log: &[u8]) {
    let mut body = Vec::with_capacity(8 + key_log.len());
    body.extend_from_slice(&SECRETS_TLS_KEY_LOG.to_le_bytes());
    body.extend_from_slice(
        &u32::try_from(key_log.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    body.extend_from_slice(key_log);
    block(out, DSB, &body, &[]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u32_at(bytes: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
    }

    /// Every block's two length fields agree, are a multiple of 4 and add up to the buffer.
    fn blocks(bytes: &[u8]) -> Vec<(u32, usize)> {
        let mut at = 0;
        let mut found = Vec::new();
        while at < bytes.len() {
            let total = u32_at(bytes, at + 4) as usize;
            assert_eq!(
                total % 4,
                0,
                "block at {at}: length {total} not a multiple of 4"
            );
            assert_eq!(
                u32_at(bytes, at + total - 4) as usize,
                total,
                "block at {at}: trailer length"
            );
            found.push((u32_at(bytes, at), total));
            at += total;
        }
        assert_eq!(at, bytes.len());
        found
    }

    #[test]
    fn blocks_are_framed_and_padded() {
        let mut out = Vec::new();
        section_header(
            &mut out,
            &Section {
                application: "relay 0.1.0".into(),
                ..Section::default()
            },
        );
        interface_description(
            &mut out,
            &Interface {
                name: "eth0@web".into(),
                description: "container web".into(),
                linktype: LINKTYPE_ETHERNET,
                snaplen: 262144,
            },
        );
        enhanced_packet(
            &mut out,
            &Packet {
                interface: 0,
                timestamp_ns: 1_700_000_000_123_456_789,
                original_len: 1500,
                data: &[1, 2, 3, 4, 5],
                direction: Direction::Outbound,
            },
        );
        interface_statistics(&mut out, &Statistics::default(), "sampled out: 0");
        tls_key_log(&mut out, b"CLIENT_RANDOM 00 11\n");
        let kinds: Vec<u32> = blocks(&out).into_iter().map(|(k, _)| k).collect();
        assert_eq!(kinds, vec![SHB, IDB, EPB, ISB, DSB]);
    }

    #[test]
    fn packet_block_carries_lengths_time_and_direction() {
        let mut out = Vec::new();
        let ts = 1_700_000_000_123_456_789u64;
        enhanced_packet(
            &mut out,
            &Packet {
                interface: 3,
                timestamp_ns: ts,
                original_len: 1500,
                data: &[9; 7],
                direction: Direction::Inbound,
            },
        );
        assert_eq!(u32_at(&out, 8), 3);
        assert_eq!(
            ((u32_at(&out, 12) as u64) << 32) | u32_at(&out, 16) as u64,
            ts
        );
        assert_eq!(u32_at(&out, 20), 7, "captured length");
        assert_eq!(u32_at(&out, 24), 1500, "original length");
        // 7 bytes of data padded to 8, then the flags option.
        assert_eq!(&out[28..35], &[9; 7]);
        assert_eq!(u32_at(&out, 36), u32::from(EPB_FLAGS) | (4 << 16));
        assert_eq!(u32_at(&out, 40), 1, "inbound");
    }
}
