//! The pcapng writer: any sequence of blocks relay may write is read back
//! by an independent reader (the `pcap-parser` crate) block for block, with
//! the same interfaces, packets, timestamps, directions and secrets.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pcap_parser::pcapng::Block as Parsed;
use pcap_parser::{PcapError, parse_block_le};
use relay::pcapng::{self, Direction, Interface, Packet, Section, Statistics};

#[derive(Debug, Arbitrary)]
enum Written {
    Interface {
        name: String,
        description: String,
        raw: bool,
        snaplen: u32,
    },
    Packet {
        interface: u8,
        timestamp_ns: u64,
        extra: u16,
        data: Vec<u8>,
        inbound: bool,
    },
    Statistics {
        interface: u8,
        timestamp_ns: u64,
        received: u64,
        dropped: u64,
        comment: String,
    },
    Secrets {
        key_log: Vec<u8>,
    },
}

#[derive(Debug, Arbitrary)]
struct Capture {
    section: (String, String, String, String),
    blocks: Vec<Written>,
}

fuzz_target!(|capture: Capture| {
    let (hardware, os, application, comment) = capture.section;
    let mut out = Vec::new();
    pcapng::section_header(
        &mut out,
        &Section {
            hardware,
            os,
            application,
            comment: comment.clone(),
        },
    );
    let mut interfaces = 0u32;
    let mut expected = Vec::new();
    for block in &capture.blocks {
        match block {
            Written::Interface {
                name,
                description,
                raw,
                snaplen,
            } => {
                let linktype = if *raw {
                    pcapng::LINKTYPE_RAW
                } else {
                    pcapng::LINKTYPE_ETHERNET
                };
                pcapng::interface_description(
                    &mut out,
                    &Interface {
                        name: name.clone(),
                        description: description.clone(),
                        linktype,
                        snaplen: *snaplen,
                    },
                );
                interfaces += 1;
                expected.push(block);
            }
            // Blocks naming an interface come after its description, as the sink writes them.
            Written::Packet {
                interface,
                timestamp_ns,
                extra,
                data,
                inbound,
            } if u32::from(*interface) < interfaces => {
                let data = &data[..data.len().min(65_535)];
                pcapng::enhanced_packet(
                    &mut out,
                    &Packet {
                        interface: u32::from(*interface),
                        timestamp_ns: *timestamp_ns,
                        original_len: data.len() as u32 + u32::from(*extra),
                        data,
                        direction: if *inbound {
                            Direction::Inbound
                        } else {
                            Direction::Outbound
                        },
                    },
                );
                expected.push(block);
            }
            Written::Statistics {
                interface,
                timestamp_ns,
                received,
                dropped,
                comment,
            } if u32::from(*interface) < interfaces => {
                let stats = Statistics {
                    interface: u32::from(*interface),
                    timestamp_ns: *timestamp_ns,
                    start_ns: 0,
                    received: *received,
                    dropped: *dropped,
                    filter_accept: 0,
                    delivered: 0,
                };
                pcapng::interface_statistics(&mut out, &stats, comment);
                expected.push(block);
            }
            Written::Secrets { key_log } => {
                pcapng::tls_key_log(&mut out, key_log);
                expected.push(block);
            }
            _ => {}
        }
    }

    let mut rest: &[u8] = &out;
    let (next, first) = parse_block_le(rest).expect("the section header parses");
    rest = next;
    let Parsed::SectionHeader(shb) = first else {
        panic!("the file does not start with a section header: {first:?}")
    };
    assert_eq!(shb.section_len, -1);
    for want in expected {
        let (next, got) = match parse_block_le(rest) {
            Ok(parsed) => parsed,
            Err(e) => panic!(
                "block {want:?} does not parse back: {:?}",
                e.map(|e: PcapError<&[u8]>| format!("{e:?}"))
            ),
        };
        rest = next;
        match (want, got) {
            (Written::Interface { raw, snaplen, .. }, Parsed::InterfaceDescription(idb)) => {
                let linktype = if *raw {
                    pcapng::LINKTYPE_RAW
                } else {
                    pcapng::LINKTYPE_ETHERNET
                };
                assert_eq!(idb.linktype.0, i32::from(linktype));
                assert_eq!(idb.snaplen, *snaplen);
                assert_eq!(idb.if_tsresol, 9);
            }
            (
                Written::Packet {
                    interface,
                    timestamp_ns,
                    extra,
                    data,
                    inbound,
                },
                Parsed::EnhancedPacket(epb),
            ) => {
                let data = &data[..data.len().min(65_535)];
                assert_eq!(epb.if_id, u32::from(*interface));
                assert_eq!(
                    (u64::from(epb.ts_high) << 32) | u64::from(epb.ts_low),
                    *timestamp_ns
                );
                assert_eq!(epb.caplen as usize, data.len());
                assert_eq!(epb.origlen, data.len() as u32 + u32::from(*extra));
                assert_eq!(&epb.data[..data.len()], data);
                let flags = epb
                    .options
                    .iter()
                    .find(|o| o.code.0 == 2)
                    .expect("an epb_flags option");
                let flags =
                    u32::from_le_bytes(flags.value[..4].try_into().expect("4 bytes of flags"));
                assert_eq!(flags & 3, if *inbound { 1 } else { 2 });
            }
            (
                Written::Statistics {
                    interface,
                    timestamp_ns,
                    ..
                },
                Parsed::InterfaceStatistics(isb),
            ) => {
                assert_eq!(isb.if_id, u32::from(*interface));
                assert_eq!(
                    (u64::from(isb.ts_high) << 32) | u64::from(isb.ts_low),
                    *timestamp_ns
                );
            }
            (Written::Secrets { key_log }, Parsed::DecryptionSecrets(dsb)) => {
                assert_eq!(dsb.secrets_len as usize, key_log.len());
                // The reader hands the secrets over with their padding.
                assert_eq!(&dsb.data[..key_log.len()], &key_log[..]);
                assert!(dsb.data[key_log.len()..].iter().all(|b| *b == 0));
            }
            (want, got) => panic!("wrote {want:?}, read back {got:?}"),
        }
    }
    assert!(rest.is_empty(), "{} bytes after the last block", rest.len());
});
