//! The capture filter: a tcpdump expression (pcap-filter(7)), compiled by
//! libpcap itself for the link type of the interface it runs on, then
//! translated to eBPF ([`super::cbpf`]) for the kernel program's filter
//! stubs ([`super::stub`]).
//!
//! libpcap is the one authority on the language, so `--filter` accepts
//! exactly what `tcpdump` accepts and selects the packets tcpdump selects;
//! an expression libpcap refuses is refused with libpcap's own message.
//! The expression is compiled for Ethernet framing when it is parsed (what
//! veth, Ethernet and loopback devices carry at TC), so a mistake is a
//! usage error before anything is loaded, and again for raw IP when an
//! interface without a link-layer header (tun, WireGuard) is attached.
//!
//! `inbound` and `outbound` are libpcap's on Linux (the packet type a
//! packet socket sees; [`super::cbpf`] gives it from the direction at TC);
//! `--direction in|out` says the same as tcpdump's `-Q in|out`.

use thiserror::Error;

use super::cbpf::{self, EbpfInsn, Insn};

/// eBPF instructions a filter stub of the kernel program holds
/// (`RELAY_PCAP_FILTER_INSNS` + the stub's own `r0 = 1; exit`).
pub const MAX_EBPF_INSNS: usize = 4096 + 2;

/// How frames start on an interface, as libpcap's link types name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LinkType {
    /// DLT_EN10MB: an Ethernet header first (Ethernet, veth, loopback at TC).
    Ethernet,
    /// DLT_RAW: the IP header first (tun, WireGuard, ipip at TC).
    Raw,
}

impl LinkType {
    fn dlt(self) -> pcap::Linktype {
        match self {
            LinkType::Ethernet => pcap::Linktype::ETHERNET,
            // DLT_RAW is 12 on Linux (LINKTYPE_RAW, 101, is the file's name for it).
            LinkType::Raw => pcap::Linktype(12),
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            LinkType::Ethernet => "Ethernet framing (DLT_EN10MB)",
            LinkType::Raw => "raw IP without a link-layer header (DLT_RAW)",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FilterError {
    #[error(
        "invalid filter: it is empty; write an expression such as `tcp port 80`, or leave the filter out to keep every packet"
    )]
    Empty,
    #[error(
        "invalid filter `{text}`: {message} (libpcap's words; the language is tcpdump's, see pcap-filter(7))"
    )]
    Pcap { text: String, message: String },
    #[error("filter `{text}` for {}: {message} (libpcap's words; see pcap-filter(7))", .link.describe())]
    ForLink {
        text: String,
        link: LinkType,
        message: String,
    },
    #[error("filter `{text}`: {source}")]
    Translate {
        text: String,
        #[source]
        source: cbpf::TranslateError,
    },
    #[error(
        "filter `{text}` too long for the kernel program: it translates to {insns} eBPF instructions, at most {MAX_EBPF_INSNS} fit; use fewer alternatives, or capture wider and filter with `tcpdump -r`"
    )]
    TooLong { text: String, insns: usize },
}

/// A compiled filter: the expression, and its translation for Ethernet
/// framing (raw IP is compiled when needed, [`Filter::program`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    text: String,
    ethernet: Option<Vec<EbpfInsn>>,
}

impl Filter {
    /// Everything passes.
    pub fn all() -> Self {
        Filter::default()
    }

    pub fn parse(text: &str) -> Result<Self, FilterError> {
        let text = text.trim();
        // An empty --filter is almost always a shell variable that expanded
        // to nothing; capturing everything instead would be a silent surprise.
        if text.is_empty() {
            return Err(FilterError::Empty);
        }
        let ethernet = translate(text, LinkType::Ethernet)?;
        Ok(Filter {
            text: text.to_string(),
            ethernet: Some(ethernet),
        })
    }

    /// Whether this keeps every packet (no expression given).
    pub fn is_all(&self) -> bool {
        self.ethernet.is_none()
    }

    /// The eBPF body of the stub for `link`; None when every packet passes.
    pub fn program(&self, link: LinkType) -> Result<Option<Vec<EbpfInsn>>, FilterError> {
        match (&self.ethernet, link) {
            (None, _) => Ok(None),
            (Some(ethernet), LinkType::Ethernet) => Ok(Some(ethernet.clone())),
            (Some(_), LinkType::Raw) => translate(&self.text, link).map(Some),
        }
    }

    /// The filter as the user wrote it ("" for everything).
    pub fn text(&self) -> &str {
        &self.text
    }
}

impl std::str::FromStr for Filter {
    type Err = FilterError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Filter::parse(text)
    }
}

/// libpcap's classic program for `text` on `link`, optimized as tcpdump does.
pub fn compile(text: &str, link: LinkType) -> Result<Vec<Insn>, FilterError> {
    let refused = |message: String| match link {
        LinkType::Ethernet => FilterError::Pcap {
            text: text.to_string(),
            message,
        },
        LinkType::Raw => FilterError::ForLink {
            text: text.to_string(),
            link,
            message,
        },
    };
    let dead = pcap::Capture::dead(link.dlt()).map_err(|e| refused(e.to_string()))?;
    let program = dead.compile(text, true).map_err(|e| match e {
        pcap::Error::PcapError(message) => refused(message),
        other => refused(other.to_string()),
    })?;
    program
        .get_instructions()
        .iter()
        .map(|i| {
            parse_insn(&i.to_string())
                .ok_or_else(|| refused(format!("unreadable instruction `{i}`")))
        })
        .collect()
}

/// The pcap crate shows an instruction as `code jt jf k` (its fields are
/// private); that text is the one stable way to read them.
fn parse_insn(shown: &str) -> Option<Insn> {
    let mut fields = shown.split_whitespace();
    let mut next = || fields.next();
    let insn = Insn::new(
        next()?.parse().ok()?,
        next()?.parse().ok()?,
        next()?.parse().ok()?,
        next()?.parse().ok()?,
    );
    next().is_none().then_some(insn)
}

fn translate(text: &str, link: LinkType) -> Result<Vec<EbpfInsn>, FilterError> {
    let classic = compile(text, link)?;
    let ebpf = cbpf::translate(&classic).map_err(|source| FilterError::Translate {
        text: text.to_string(),
        source,
    })?;
    if ebpf.len() > MAX_EBPF_INSNS {
        return Err(FilterError::TooLong {
            text: text.to_string(),
            insns: ebpf.len(),
        });
    }
    Ok(ebpf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::cbpf::EbpfInsn;
    use crate::observe::cbpf::tests::{libpcap, run, run_as};

    /// The expressions of issue 16, which tcpdump users type every day.
    pub const EXPRESSIONS: [&str; 13] = [
        "tcp[tcpflags] & tcp-syn != 0",
        "greater 1000",
        "icmp[icmptype] != icmp-echo",
        "arp",
        "ether host 02:00:00:00:00:01",
        "vlan",
        "ip proto 47",
        "port http",
        "host 127.0.0.1",
        "tcp port 80 and (((ip[2:2] - ((ip[0]&0xf)<<2)) - ((tcp[12]&0xf0)>>2)) != 0)",
        "icmp",
        "net 10.0.0.0/8",
        "ip6 and udp portrange 5000-5010 or not ip",
    ];

    /// A deterministic generator (xorshift), so a failure repeats.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn byte(&mut self) -> u8 {
            self.next() as u8
        }

        fn pick<T: Copy>(&mut self, of: &[T]) -> T {
            of[(self.next() % of.len() as u64) as usize]
        }
    }

    /// Frames that exercise the expressions: Ethernet (sometimes VLAN
    /// tagged) with IPv4, IPv6 or ARP, TCP/UDP/ICMP/GRE with ports and
    /// flags drawn from the values the filters test, random payloads,
    /// truncated at random; and some wholly random bytes.
    pub fn frames(seed: u64, count: usize) -> Vec<Vec<u8>> {
        let mut rng = Rng(seed);
        (0..count)
            .map(|_| {
                let mut f = Vec::new();
                let macs: [[u8; 6]; 3] = [[2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2], [0; 6]];
                f.extend(rng.pick(&macs));
                f.extend(rng.pick(&macs));
                if rng.next().is_multiple_of(8) {
                    f.extend([0x81, 0x00, 0x00, rng.byte()]);
                }
                let addrs: [[u8; 4]; 4] = [
                    [127, 0, 0, 1],
                    [10, 1, 2, 3],
                    [192, 168, 0, 1],
                    [11, 0, 0, 1],
                ];
                let ports = [80u16, 443, 5000, 5005, 5011, 53, 40000];
                let protos = [6u8, 17, 1, 47, 58];
                match rng.next() % 10 {
                    0 => {
                        f.extend([0x08, 0x06]);
                        f.extend([0, 1, 8, 0, 6, 4, 0, 1]);
                        f.extend(rng.pick(&macs));
                        f.extend(rng.pick(&addrs));
                        f.extend([0; 6]);
                        f.extend(rng.pick(&addrs));
                    }
                    1 | 2 => {
                        f.extend([0x86, 0xdd]);
                        let proto = rng.pick(&protos);
                        f.extend([0x60, 0, 0, 0, 0, 20, proto, 64]);
                        f.extend((0..32).map(|_| rng.byte() & 3));
                        f.extend(rng.pick(&ports).to_be_bytes());
                        f.extend(rng.pick(&ports).to_be_bytes());
                    }
                    3 => f.extend((0..rng.next() % 80).map(|_| rng.byte())),
                    _ => {
                        f.extend([0x08, 0x00]);
                        let ihl = rng.pick(&[5u8, 5, 6]);
                        let proto = rng.pick(&protos);
                        let total = rng.pick(&[40u16, 52, 60, 1100]);
                        f.extend([0x40 | ihl, 0]);
                        f.extend(total.to_be_bytes());
                        f.extend([0, 1, 0, 0, 64, proto, 0, 0]);
                        f.extend(rng.pick(&addrs));
                        f.extend(rng.pick(&addrs));
                        if ihl == 6 {
                            f.extend([1, 1, 1, 0]);
                        }
                        match proto {
                            1 => f.extend([rng.pick(&[0u8, 8, 3]), 0, 0, 0]),
                            _ => {
                                f.extend(rng.pick(&ports).to_be_bytes());
                                f.extend(rng.pick(&ports).to_be_bytes());
                                f.extend([0, 0, 0, 1, 0, 0, 0, 0]);
                                f.push(rng.pick(&[0x50u8, 0x80]));
                                f.push(rng.pick(&[0x02u8, 0x10, 0x12, 0x18]));
                            }
                        }
                        f.extend([0u8; 6]);
                        let pad = rng.pick(&[0usize, 0, 20, 1100]);
                        f.extend((0..pad).map(|_| rng.byte()));
                    }
                }
                if rng.next().is_multiple_of(6) && !f.is_empty() {
                    let keep = (rng.next() % f.len() as u64) as usize;
                    f.truncate(keep.max(14));
                }
                f
            })
            .collect()
    }

    #[test]
    fn the_translation_selects_what_libpcap_selects() {
        let frames = frames(0x5eed, 3000);
        for text in EXPRESSIONS {
            let classic = compile(text, LinkType::Ethernet).unwrap_or_else(|e| panic!("{e}"));
            let filter = Filter::parse(text).unwrap_or_else(|e| panic!("{e}"));
            let ebpf = filter.program(LinkType::Ethernet).unwrap().unwrap();
            let mut matched = 0;
            for frame in &frames {
                let theirs = libpcap(&classic, frame) != 0;
                let ours = run(&ebpf, frame) != 0;
                assert_eq!(ours, theirs, "`{text}` on {frame:02x?}");
                matched += usize::from(ours);
            }
            // The traffic exercises the filter both ways.
            assert!(
                matched > 0 && matched < frames.len(),
                "`{text}` matched {matched} of {}",
                frames.len()
            );
        }
    }

    /// The same check with the kernel running the translation: each
    /// program loaded as a TC classifier (the verifier must accept it) and
    /// run on every frame with BPF_PROG_TEST_RUN.
    #[test]
    fn the_kernel_runs_the_translation_as_libpcap_does() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!(
                "SKIP the_kernel_runs_the_translation_as_libpcap_does: needs root (BPF_PROG_LOAD)"
            );
            return;
        }
        // The kernel runs a classifier on 14 bytes at least (an Ethernet header).
        let frames: Vec<Vec<u8>> = frames(0xbee5, 600)
            .into_iter()
            .filter(|f| f.len() >= 14)
            .collect();
        for text in EXPRESSIONS {
            let classic = compile(text, LinkType::Ethernet).unwrap();
            let ebpf = Filter::parse(text)
                .unwrap()
                .program(LinkType::Ethernet)
                .unwrap()
                .unwrap();
            // A classifier starts with r1 only: the stub's direction argument (ingress) first.
            let ebpf: Vec<EbpfInsn> = std::iter::once(EbpfInsn {
                code: 0xb4,
                dst: 2,
                src: 0,
                off: 0,
                imm: 0,
            })
            .chain(ebpf)
            .collect();
            let prog = kernel::load(&ebpf)
                .unwrap_or_else(|log| panic!("`{text}` refused by the verifier:\n{log}"));
            let mut ran = 0;
            for frame in &frames {
                // The kernel refuses to test-run some malformed frames (EINVAL).
                let Some(ours) = kernel::run(&prog, frame) else {
                    continue;
                };
                ran += 1;
                let ours = ours != 0;
                let theirs = libpcap(&classic, frame) != 0;
                assert_eq!(
                    ours, theirs,
                    "`{text}` on {frame:02x?}: kernel {ours}, libpcap {theirs}"
                );
            }
            assert!(
                ran > frames.len() * 9 / 10,
                "`{text}`: the kernel ran {ran} of {} frames",
                frames.len()
            );
        }
    }

    /// bpf(2) for the test above: aya 0.14 loads programs from objects only.
    mod kernel {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

        use crate::observe::cbpf::EbpfInsn;

        const BPF_PROG_LOAD: libc::c_long = 5;
        const BPF_PROG_TEST_RUN: libc::c_long = 10;
        const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;

        #[repr(C)]
        struct Load {
            prog_type: u32,
            insn_cnt: u32,
            insns: u64,
            license: u64,
            log_level: u32,
            log_size: u32,
            log_buf: u64,
            rest: [u8; 96],
        }

        #[repr(C)]
        struct TestRun {
            prog_fd: u32,
            retval: u32,
            data_size_in: u32,
            data_size_out: u32,
            data_in: u64,
            data_out: u64,
            repeat: u32,
            duration: u32,
            rest: [u8; 64],
        }

        fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> libc::c_long {
            // SAFETY: attr is a #[repr(C)] prefix of union bpf_attr, zero
            // beyond what is set, and lives across the call; every pointer
            // in it points to memory that outlives the call.
            unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>()) }
        }

        /// The program's fd, or the verifier's log.
        pub fn load(program: &[EbpfInsn]) -> Result<OwnedFd, String> {
            let insns: Vec<[u8; 8]> = program.iter().map(|i| i.to_bytes()).collect();
            let license = c"GPL";
            let mut log = vec![0u8; 1 << 20];
            let mut attr = Load {
                prog_type: BPF_PROG_TYPE_SCHED_CLS,
                insn_cnt: insns.len() as u32,
                insns: insns.as_ptr() as u64,
                license: license.as_ptr() as u64,
                log_level: 1,
                log_size: log.len() as u32,
                log_buf: log.as_mut_ptr() as u64,
                rest: [0; 96],
            };
            let fd = bpf(BPF_PROG_LOAD, &mut attr);
            if fd < 0 {
                let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
                return Err(format!(
                    "{}\n{}",
                    std::io::Error::last_os_error(),
                    String::from_utf8_lossy(&log[..end])
                ));
            }
            // SAFETY: the kernel just returned this fd, and nothing else owns it.
            Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
        }

        /// What the program returns for `frame`, or None when the kernel
        /// refuses to run it on that frame.
        pub fn run(prog: &OwnedFd, frame: &[u8]) -> Option<u32> {
            let mut attr = TestRun {
                prog_fd: prog.as_raw_fd() as u32,
                retval: 0,
                data_size_in: frame.len() as u32,
                data_size_out: 0,
                data_in: frame.as_ptr() as u64,
                data_out: 0,
                repeat: 1,
                duration: 0,
                rest: [0; 64],
            };
            let rc = bpf(BPF_PROG_TEST_RUN, &mut attr);
            let err = std::io::Error::last_os_error();
            if rc != 0 && err.raw_os_error() == Some(libc::EINVAL) {
                return None;
            }
            assert!(rc == 0, "BPF_PROG_TEST_RUN: {err}");
            Some(attr.retval)
        }
    }

    #[test]
    fn raw_ip_interfaces_get_their_own_program() {
        let filter = Filter::parse("tcp port 80").unwrap();
        let raw = filter.program(LinkType::Raw).unwrap().unwrap();
        let mut packet = vec![
            0x45, 0, 0, 40, 0, 0, 0, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        packet.extend([0x9c, 0x40, 0, 80]);
        packet.extend([0u8; 16]);
        assert_ne!(run(&raw, &packet), 0);
        packet[23] = 81;
        assert_eq!(run(&raw, &packet), 0);
        // Ethernet words have no meaning there: libpcap says so, naming the link type.
        let err = Filter::parse("ether host 02:00:00:00:00:01")
            .unwrap()
            .program(LinkType::Raw)
            .unwrap_err();
        assert!(matches!(err, FilterError::ForLink { .. }), "{err}");
        assert!(err.to_string().contains("DLT_RAW"), "{err}");
        assert_eq!(Filter::all().program(LinkType::Raw), Ok(None));
    }

    #[test]
    fn inbound_and_outbound_are_the_direction() {
        let frame = frames(1, 1).remove(0);
        for (text, ingress, egress) in [
            ("inbound", 1, 0),
            ("outbound", 0, 1),
            ("inbound or outbound", 1, 1),
        ] {
            let ebpf = Filter::parse(text)
                .unwrap()
                .program(LinkType::Ethernet)
                .unwrap()
                .unwrap();
            assert_eq!(
                (
                    run_as(&ebpf, &frame, 0).min(1),
                    run_as(&ebpf, &frame, 1).min(1)
                ),
                (ingress, egress),
                "{text}"
            );
        }
    }

    #[test]
    fn libpcap_refusals_keep_libpcap_words() {
        for (text, says) in [
            ("tcp and bogus", "bogus"),
            ("port 70000", "port"),
            ("host 10.0.0.300", "10.0.0.300"),
            ("tcp and", "syntax error"),
            ("(tcp", "syntax error"),
            ("ether proto bogus", "bogus"),
        ] {
            let err = Filter::parse(text).unwrap_err();
            let shown = err.to_string();
            assert!(matches!(err, FilterError::Pcap { .. }), "{text}: {shown}");
            assert!(
                shown.contains(says) && shown.contains(text),
                "{text}: {shown}"
            );
        }
        for text in ["", " ", "\t\n  "] {
            assert_eq!(Filter::parse(text), Err(FilterError::Empty), "{text:?}");
        }
    }

    #[test]
    fn a_filter_too_long_for_the_stub_is_refused_naming_the_limit() {
        // One byte load and test each: about 10 eBPF instructions apiece.
        let bytes: Vec<String> = (0..500).map(|i| format!("ether[{i}] = 1")).collect();
        let Err(err) = Filter::parse(&bytes.join(" or ")) else {
            panic!("500 byte tests fit the stub: make the test filter longer");
        };
        assert!(matches!(err, FilterError::TooLong { .. }), "{err}");
        assert!(err.to_string().contains("at most 4098"), "{err}");
    }
}
