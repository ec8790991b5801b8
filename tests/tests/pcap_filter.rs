//! `--filter` is tcpdump's language, compiled by libpcap and run in the
//! kernel: for each expression users type every day (issue 16), the
//! packets relay captures with it are exactly the packets
//! `tcpdump -r all.pcapng '<expr>'` selects from relay's unfiltered
//! capture of the same traffic, compared by content (tcpdump's hex dump of
//! every frame). One unfiltered relay and one relay per expression watch
//! the same namespace at once, so every one of them sees the same frames.
//!
//! The frames are built by hand and sent both ways through the test
//! namespace's veth: ARP, VLAN-tagged, GRE, ICMP echo and unreachable,
//! TCP SYN and HTTP with and without data, UDP large and small, IPv6,
//! loopback and 10/8 addresses, one chosen source MAC.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use nix::sys::signal::Signal;
use relay_tests::child::{ChildProc, output_of};
use relay_tests::crafted::Sender;
use relay_tests::ports::free_port;
use relay_tests::relay_proc::relay_bin;
use relay_tests::tempdir::TempDir;
use relay_tests::wait::poll_until;
use relay_tests::{NetNs, RelayCmd, Scrape, http, peers, require_root, require_tool};

const TIMEOUT: Duration = Duration::from_secs(20);

/// The expressions of issue 16, and how many of the sent frames (of
/// [`frames`], each sent in and out) tcpdump's reading must select at
/// least, so that no comparison is vacuous.
const EXPRESSIONS: &[&str] = &[
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
];

const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const BROADCAST: [u8; 6] = [0xff; 6];

fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend(dst);
    f.extend(src);
    f.extend(ethertype.to_be_bytes());
    f.extend(payload);
    f
}

fn ipv4(id: u16, src: [u8; 4], dst: [u8; 4], proto: u8, payload: &[u8]) -> Vec<u8> {
    let total = u16::try_from(20 + payload.len()).expect("test frames are small");
    let mut p = vec![0x45, 0];
    p.extend(total.to_be_bytes());
    p.extend(id.to_be_bytes());
    p.extend([0x40, 0, 64, proto, 0, 0]);
    p.extend(src);
    p.extend(dst);
    p.extend(payload);
    p
}

fn ipv6(next: u8, payload: &[u8]) -> Vec<u8> {
    let len = u16::try_from(payload.len()).expect("test frames are small");
    let mut p = vec![0x60, 0, 0, 0];
    p.extend(len.to_be_bytes());
    p.extend([next, 64]);
    p.extend([0x20, 0x01, 0x0d, 0xb8].iter().chain(&[0; 11]).chain(&[1]));
    p.extend([0x20, 0x01, 0x0d, 0xb8].iter().chain(&[0; 11]).chain(&[2]));
    p.extend(payload);
    p
}

fn tcp(sport: u16, dport: u16, flags: u8, data: &[u8]) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend(sport.to_be_bytes());
    t.extend(dport.to_be_bytes());
    t.extend([0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    t.extend(data);
    t
}

fn udp(sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
    let len = u16::try_from(8 + data.len()).expect("test frames are small");
    let mut u = Vec::new();
    u.extend(sport.to_be_bytes());
    u.extend(dport.to_be_bytes());
    u.extend(len.to_be_bytes());
    u.extend([0, 0]);
    u.extend(data);
    u
}

fn icmp(kind: u8, code: u8) -> Vec<u8> {
    vec![kind, code, 0, 0, 0, 1, 0, 1, 0xab, 0xcd]
}

fn arp(sender: [u8; 4], target: [u8; 4]) -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4, 0, 1];
    a.extend(MAC_B);
    a.extend(sender);
    a.extend([0; 6]);
    a.extend(target);
    a
}

/// Frames that the expressions tell apart; each is unique by its IPv4 id
/// or its bytes.
fn frames() -> Vec<Vec<u8>> {
    const A: [u8; 4] = [198, 18, 0, 1];
    const B: [u8; 4] = [198, 19, 0, 2];
    const TEN: [u8; 4] = [10, 1, 2, 3];
    const LO: [u8; 4] = [127, 0, 0, 1];
    let v4 = |id, src, dst, proto, payload: &[u8]| {
        ethernet(MAC_B, MAC_B, 0x0800, &ipv4(id, src, dst, proto, payload))
    };
    const SYN: u8 = 0x02;
    const SYNACK: u8 = 0x12;
    const PSHACK: u8 = 0x18;
    const ACK: u8 = 0x10;
    let mut vlan = vec![0x00, 0x05, 0x08, 0x00];
    vlan.extend(ipv4(30, A, B, 17, &udp(4000, 53, b"tagged")));
    vec![
        v4(1, A, B, 6, &tcp(40000, 80, SYN, &[])),
        v4(2, B, A, 6, &tcp(80, 40000, SYNACK, &[])),
        v4(3, A, B, 6, &tcp(40000, 80, ACK, &[])),
        v4(
            4,
            A,
            B,
            6,
            &tcp(40000, 80, PSHACK, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
        ),
        v4(
            5,
            B,
            A,
            6,
            &tcp(80, 40000, PSHACK, b"HTTP/1.1 200 OK\r\n\r\n"),
        ),
        v4(6, A, B, 6, &tcp(40001, 8080, PSHACK, b"not http")),
        v4(7, A, B, 17, &udp(5353, 53, b"query")),
        v4(8, A, B, 17, &udp(6000, 6001, &[0x5a; 1100])),
        v4(9, A, B, 1, &icmp(8, 0)),
        v4(10, B, A, 1, &icmp(0, 0)),
        v4(11, B, A, 1, &icmp(3, 3)),
        v4(12, A, B, 47, &[0, 0, 0x08, 0x00, 0x45, 0]),
        v4(13, LO, LO, 6, &tcp(50000, 6379, PSHACK, b"PING\r\n")),
        v4(14, TEN, B, 17, &udp(7000, 53, b"ten")),
        v4(15, B, TEN, 6, &tcp(443, 7001, ACK, &[])),
        ethernet(
            MAC_B,
            MAC_A,
            0x0800,
            &ipv4(16, A, B, 17, &udp(1, 2, b"from mac a")),
        ),
        ethernet(
            MAC_A,
            MAC_B,
            0x0800,
            &ipv4(17, B, A, 17, &udp(2, 1, b"to mac a")),
        ),
        ethernet(BROADCAST, MAC_B, 0x0806, &arp(TEN, [10, 9, 9, 9])),
        ethernet(BROADCAST, MAC_B, 0x0806, &arp(A, B)),
        ethernet(MAC_B, MAC_B, 0x8100, &vlan),
        ethernet(MAC_B, MAC_B, 0x86dd, &ipv6(17, &udp(5000, 5001, b"v6"))),
        ethernet(MAC_B, MAC_B, 0x86dd, &ipv6(58, &icmp(128, 0))),
        ethernet(MAC_B, MAC_B, 0x86dd, &ipv6(6, &tcp(40002, 80, SYN, &[]))),
    ]
}

/// A running `relay observe` writing `file`, attached once it serves metrics.
struct Observer {
    proc: ChildProc,
    metrics: std::net::SocketAddr,
    file: PathBuf,
}

impl Observer {
    fn spawn(ns: &NetNs, file: PathBuf, filter: Option<&str>) -> Result<Self> {
        let metrics = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let mut cmd = Command::new(relay_bin()?);
        cmd.args(["observe", &format!("netns:{}", ns.name()), "--pcap"])
            .arg(&file)
            .args(["--ring-size", "1M", "--metrics", &metrics.to_string()]);
        if let Some(filter) = filter {
            cmd.args(["--filter", filter]);
        }
        let mut proc = ChildProc::spawn("relay", cmd)?;
        proc.wait_listening(metrics.port(), TIMEOUT)?;
        Ok(Observer {
            proc,
            metrics,
            file,
        })
    }

    /// Packets the filter has decided on so far (kept or refused).
    fn decided(&self) -> Result<f64> {
        let stream = peers::connect(self.metrics)?;
        let response = http::get(stream, &self.metrics.to_string(), "/metrics")?;
        let scrape = Scrape::parse(&String::from_utf8_lossy(&response.body))?;
        Ok(scrape.counter("relay_observe_samples_total", &[])
            + scrape.counter("relay_observe_sample_drops_total", &[("reason", "filter")]))
    }

    fn stop(mut self) -> Result<PathBuf> {
        self.proc.signal(Signal::SIGINT)?;
        let status = self
            .proc
            .wait_exit(TIMEOUT)?
            .with_context(|| format!("relay still runs after SIGINT:\n{}", self.proc.log()))?;
        ensure!(
            status.success(),
            "relay exited with {status}:\n{}",
            self.proc.log()
        );
        Ok(self.file)
    }
}

/// Every frame of `file` that `expr` selects, as tcpdump's hex, counted.
fn tcpdump_frames(file: &Path, expr: Option<&str>) -> Result<BTreeMap<String, usize>> {
    let mut cmd = Command::new("tcpdump");
    cmd.args(["-r"]).arg(file).args(["-n", "-xx"]);
    if let Some(expr) = expr {
        cmd.arg(expr);
    }
    let text = output_of(cmd)?;
    let mut frames = BTreeMap::new();
    let mut current = String::new();
    for line in text.lines() {
        if let Some(hex) = line
            .trim_start()
            .strip_prefix("0x")
            .and_then(|l| l.split_once(':'))
        {
            current.extend(hex.1.split_whitespace());
        } else if !current.is_empty() {
            *frames.entry(std::mem::take(&mut current)).or_insert(0) += 1;
        }
    }
    if !current.is_empty() {
        *frames.entry(current).or_insert(0) += 1;
    }
    Ok(frames)
}

#[test]
fn each_tcpdump_expression_captures_exactly_what_tcpdump_selects() -> Result<()> {
    require_root!("creates network namespaces and attaches eBPF programs");
    require_tool!("tcpdump");
    let ns = NetNs::create()?;
    let dir = TempDir::new("pcap-filter")?;
    // Only the frames sent here cross the veth: no IPv6 autoconfiguration.
    ns.run("sysctl", &["-qw", "net.ipv6.conf.all.disable_ipv6=1"])?;
    let host_v6 = format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", ns.host_if());
    if Path::new(&host_v6).exists() {
        std::fs::write(&host_v6, "1").with_context(|| format!("writing {host_v6}"))?;
    }
    let all = Observer::spawn(&ns, dir.join("all.pcapng"), None)?;
    let mut filtered = Vec::new();
    for (n, expr) in EXPRESSIONS.iter().enumerate() {
        filtered.push((
            *expr,
            Observer::spawn(&ns, dir.join(&format!("expr-{n}.pcapng")), Some(expr))?,
        ));
    }
    let frames = frames();
    let mut sender = Sender::open(ns.host_if())?;
    frames.iter().try_for_each(|f| sender.send_frame(f))?;
    // A packet socket keeps the namespace it was opened in.
    let ns_if = ns.ns_if().to_string();
    let mut sender = ns.enter(move || Sender::open(&ns_if))?;
    frames.iter().try_for_each(|f| sender.send_frame(f))?;
    let sent = (2 * frames.len()) as f64;
    for observer in std::iter::once(&all).chain(filtered.iter().map(|(_, o)| o)) {
        poll_until("every frame sent decided by the filter", TIMEOUT, || {
            Ok((observer.decided()? >= sent).then_some(()))
        })?;
    }
    let all = all.stop()?;
    let everything = tcpdump_frames(&all, None)?;
    ensure!(
        everything.values().sum::<usize>() >= 2 * frames.len(),
        "the unfiltered capture holds {} frames, {} were sent",
        everything.values().sum::<usize>(),
        2 * frames.len()
    );
    for (expr, observer) in filtered {
        let file = observer.stop()?;
        let expected = tcpdump_frames(&all, Some(expr))?;
        let got = tcpdump_frames(&file, None)?;
        ensure!(
            !expected.is_empty(),
            "`{expr}`: tcpdump selects no frame; the test traffic must exercise it"
        );
        ensure!(
            expected.len() < everything.len(),
            "`{expr}`: tcpdump selects every frame; the test traffic must exercise it"
        );
        ensure!(
            got == expected,
            "`{expr}`: relay captured {} frames, tcpdump selects {}; only relay: {:?}; only tcpdump: {:?}",
            got.values().sum::<usize>(),
            expected.values().sum::<usize>(),
            got.keys()
                .filter(|k| !expected.contains_key(*k))
                .collect::<Vec<_>>(),
            expected
                .keys()
                .filter(|k| !got.contains_key(*k))
                .collect::<Vec<_>>()
        );
    }
    Ok(())
}

#[test]
fn an_expression_libpcap_refuses_is_a_usage_error_with_libpcaps_words() -> Result<()> {
    let dir = TempDir::new("pcap-filter-bad")?;
    let file = dir.join("x.pcapng").display().to_string();
    for (expr, says) in [
        ("tcp and bogus", "syntax error in filter expression"),
        ("port 99999", "illegal port number 99999 > 65535"),
        ("net 10.0.0.1/8", "non-network bits set in \"10.0.0.1/8\""),
        ("tcp[", "syntax error"),
    ] {
        let args = ["observe", "host", "--pcap", &file, "--filter", expr];
        RelayCmd::raw(&args)
            .expect_usage_error(TIMEOUT, &[says, "pcap-filter(7)"])
            .with_context(|| format!("--filter {expr:?}"))?;
    }
    // The config file's filter goes through libpcap too: `relay check` says where.
    let config = dir.join("relay.toml");
    std::fs::write(
        &config,
        "[[observe]]\ntarget = \"host\"\n[observe.capture]\npcap = \"/tmp/x.pcapng\"\nfilter = \"tcp and bogus\"\n",
    )?;
    let config = config.display().to_string();
    RelayCmd::raw(&["check", "-c", &config]).expect_usage_error(
        TIMEOUT,
        &[
            "relay.toml:5:",
            "observe[0].capture.filter",
            "syntax error in filter expression",
        ],
    )?;
    Ok(())
}
