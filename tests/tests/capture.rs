//! `relay observe --pcap`: packets filtered and sampled in the kernel, read
//! back with tshark. Crafted packets (pnet) with known ids are sent on the
//! veth of a test namespace, so every filter primitive, the sampler, the
//! flow head, the snap length and the loss accounting are checked against
//! exact expected sets and counts; a Docker container's HTTP traffic is
//! decoded by tshark from the file relay wrote.
//!
//! IPv6 is switched off on the test veth (both ends): the only frames the
//! tests do not send themselves are then non-IP (none in practice), so
//! exact counts hold.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, ensure};
use nix::sys::signal::Signal;
use relay_tests::child::ChildProc;
use relay_tests::crafted::{Captured, Crafted, Sender, flags, pcap_ids, read_capture};
use relay_tests::docker::{Container, HTTPD_PORT};
use relay_tests::interactive::Interactive;
use relay_tests::ports::free_port;
use relay_tests::relay_proc::relay_bin;
use relay_tests::tempdir::TempDir;
use relay_tests::wait::poll_until;
use relay_tests::{NetNs, RelayCmd, Scrape, http, peers, require_root, require_tool};

const EXIT_TIMEOUT: Duration = Duration::from_secs(15);
const COUNT_TIMEOUT: Duration = Duration::from_secs(15);

/// A running `relay <args> --metrics 127.0.0.1:<port>`, ready once it
/// serves metrics (it attaches before it does); killed on drop.
struct Relay {
    proc: ChildProc,
    metrics: std::net::SocketAddr,
}

impl Relay {
    fn spawn(args: &[String]) -> Result<Self> {
        let metrics = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let mut cmd = Command::new(relay_bin()?);
        cmd.args(args).arg("--metrics").arg(metrics.to_string());
        let mut proc = ChildProc::spawn("relay", cmd)?;
        proc.wait_listening(metrics.port(), EXIT_TIMEOUT)?;
        Ok(Relay { proc, metrics })
    }

    fn scrape(&self) -> Result<Scrape> {
        let stream = peers::connect(self.metrics)?;
        let response = http::get(stream, &self.metrics.to_string(), "/metrics")?;
        Scrape::parse(&String::from_utf8_lossy(&response.body))
    }

    fn stderr(&self) -> String {
        self.proc.log()
    }
}

/// A test namespace with IPv6 off on its veth, and where captures go.
struct Lab {
    ns: NetNs,
    ns_if: String,
    host_if: String,
    dir: TempDir,
}

impl Lab {
    fn new(label: &str) -> Result<Self> {
        let ns = NetNs::create()?;
        let out = ns
            .command("ip")
            .args(["-o", "link", "show"])
            .output()
            .context("ip link show in the test namespace")?;
        let links = String::from_utf8_lossy(&out.stdout).into_owned();
        // "3: rt01234n@if4: <...>": the namespace's end of the veth.
        let ns_if = links
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|name| name.split('@').next().unwrap_or(name).to_string())
            .find(|name| name != "lo")
            .with_context(|| format!("no veth in the test namespace: {links}"))?;
        let host_if = format!("{}h", ns_if.trim_end_matches('n'));
        ns.run("sysctl", &["-qw", "net.ipv6.conf.all.disable_ipv6=1"])?;
        ns.run("sysctl", &["-qw", "net.ipv6.conf.default.disable_ipv6=1"])?;
        let host_v6 = format!("/proc/sys/net/ipv6/conf/{host_if}/disable_ipv6");
        if Path::new(&host_v6).exists() {
            std::fs::write(&host_v6, "1").with_context(|| format!("writing {host_v6}"))?;
        }
        Ok(Lab {
            ns,
            ns_if,
            host_if,
            dir: TempDir::new(label)?,
        })
    }

    fn target(&self) -> String {
        format!("netns:{}", self.ns.name())
    }

    /// How relay names the namespace's interface in the capture.
    fn pcap_iface(&self) -> String {
        format!("{}@{}", self.ns_if, self.ns.name())
    }

    /// `relay observe netns:<ns> --pcap <file> <extra>`, attached.
    fn capture(&self, file: &Path, extra: &[&str]) -> Result<Relay> {
        let mut args = vec![
            "observe".to_string(),
            self.target(),
            "--pcap".to_string(),
            file.display().to_string(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        Relay::spawn(&args)
    }

    /// Sends `packets` into the namespace (ingress of its veth end).
    fn send_in(&self, packets: &[Crafted]) -> Result<()> {
        Sender::open(&self.host_if)
            .with_context(|| format!("opening a packet socket on {}", self.host_if))?
            .send_all(packets)
    }

    /// Sends `packets` out of the namespace (egress of its veth end).
    fn send_out(&self, packets: &[Crafted]) -> Result<()> {
        let iface = self.ns_if.clone();
        let mut sender = self.ns.enter(move || Sender::open(&iface))?;
        sender.send_all(packets)
    }

    fn labels(&self) -> [(&str, &str); 1] {
        [("iface", self.ns_if.as_str())]
    }
}

/// SIGINT, then a clean exit: the file is complete.
fn stop(relay: Relay) -> Result<String> {
    stop_with(relay, Signal::SIGINT)
}

/// `signal`, then a clean exit: the file is complete.
fn stop_with(mut relay: Relay, signal: Signal) -> Result<String> {
    relay.proc.signal(signal)?;
    let status = relay.proc.wait_exit(EXIT_TIMEOUT)?.with_context(|| {
        format!(
            "relay still runs {EXIT_TIMEOUT:?} after {signal}:\n{}",
            relay.stderr()
        )
    })?;
    ensure!(
        status.success(),
        "relay exited with {status} after {signal}; stderr:\n{}",
        relay.stderr()
    );
    Ok(relay.stderr())
}

/// Polls /metrics until `samples_total + drops{reason in reasons}` for the
/// lab's interface reaches `total`; returns that scrape.
fn wait_accounted(relay: &Relay, lab: &Lab, reasons: &[&str], total: f64) -> Result<Scrape> {
    let mut last = None;
    poll_until(
        &format!("samples + drops{reasons:?} == {total}"),
        COUNT_TIMEOUT,
        || {
            let scrape = relay.scrape()?;
            let mut sum = scrape.counter("relay_observe_samples_total", &lab.labels());
            for reason in reasons {
                let labels = [("iface", lab.ns_if.as_str()), ("reason", *reason)];
                sum += scrape.counter("relay_observe_sample_drops_total", &labels);
            }
            let done = sum == total;
            last = Some(scrape.clone());
            Ok(done.then_some(scrape))
        },
    )
    .with_context(|| {
        format!(
            "last scrape:\n{}",
            last.map(|s: Scrape| s.text).unwrap_or_default()
        )
    })
}

// ------------------------------------------------------------ crafted sets

/// Packets sent into the namespace, ids 1-11.
fn inbound_set() -> Vec<Crafted> {
    vec![
        Crafted::tcp(1, "198.18.0.1", "198.19.0.2", 40000, 80, flags::SYN),
        Crafted::tcp(2, "198.19.0.2", "198.18.0.1", 80, 40000, flags::SYNACK),
        Crafted::tcp(3, "198.18.0.1", "198.19.0.2", 40000, 80, flags::ACK),
        Crafted::tcp(4, "198.18.0.1", "198.19.0.2", 40000, 80, flags::PSHACK),
        Crafted::tcp(5, "198.18.0.1", "198.19.0.2", 40000, 80, flags::FINACK),
        Crafted::tcp(6, "198.18.0.5", "198.19.0.2", 40001, 8080, flags::RST),
        Crafted::udp(7, "198.18.0.1", "198.19.0.9", 5353, 53),
        Crafted::udp(8, "198.18.0.7", "198.19.1.1", 6000, 8050),
        Crafted::icmp(9, "198.18.0.1", "198.19.0.2"),
        Crafted::tcp(10, "2001:db8::1", "2001:db8:1::2", 443, 50000, flags::ACK),
        Crafted::udp(11, "2001:db8::1", "2001:db8:1::2", 5353, 53),
    ]
}

/// Packets sent out of the namespace, ids 20-22.
fn outbound_set() -> Vec<Crafted> {
    vec![
        Crafted::udp(20, "198.19.0.2", "198.18.0.1", 53, 5353),
        Crafted::tcp(21, "198.19.0.2", "198.18.0.1", 80, 40000, flags::SYNACK),
        Crafted::icmp(22, "198.19.0.2", "198.18.0.1"),
    ]
}

/// Each filter and exactly the ids it must select from both sets.
const FILTERS: &[(&str, &[u16])] = &[
    ("tcp", &[1, 2, 3, 4, 5, 6, 10, 21]),
    ("udp", &[7, 8, 11, 20]),
    ("icmp", &[9, 22]),
    ("ip6", &[10, 11]),
    ("host 198.18.0.1", &[1, 2, 3, 4, 5, 7, 9, 20, 21, 22]),
    ("src host 198.18.0.1", &[1, 3, 4, 5, 7, 9]),
    ("dst net 198.19.0.0/24", &[1, 3, 4, 5, 6, 7, 9]),
    ("net 2001:db8:1::/48", &[10, 11]),
    ("port 80", &[1, 2, 3, 4, 5, 21]),
    ("src port 5353", &[7, 11]),
    ("dst portrange 8000-8099", &[6, 8]),
    ("inbound and ip", &[1, 2, 3, 4, 5, 6, 7, 8, 9]),
    ("outbound", &[20, 21, 22]),
    ("tcp and not port 80", &[6, 10]),
    ("(udp or icmp) and src net 198.18.0.0/24", &[7, 8, 9]),
];

fn ids_of(captured: &[Captured]) -> Vec<u16> {
    pcap_ids(captured)
}

#[test]
fn each_filter_primitive_and_combination_selects_exactly_the_crafted_packets() -> Result<()> {
    require_root!("creates network namespaces and attaches eBPF programs");
    require_tool!("tshark");
    let lab = Lab::new("capture-filters")?;
    let inbound = inbound_set();
    let outbound = outbound_set();
    for (n, (filter, expected)) in FILTERS.iter().enumerate() {
        let file = lab.dir.join(&format!("filter-{n}.pcapng"));
        let relay = lab.capture(&file, &["--filter", filter])?;
        lab.send_in(&inbound)?;
        lab.send_out(&outbound)?;
        let scrape = wait_accounted(&relay, &lab, &[], expected.len() as f64)
            .with_context(|| format!("filter {filter:?}"))?;
        if n == 0 {
            // The counters see every crafted TCP flag exactly once, whatever the filter.
            for (direction, flag, count) in [
                ("ingress", "syn", 1.0),
                ("ingress", "synack", 1.0),
                ("ingress", "fin", 1.0),
                ("ingress", "rst", 1.0),
                ("egress", "synack", 1.0),
                ("egress", "syn", 0.0),
            ] {
                let labels = [
                    ("iface", lab.ns_if.as_str()),
                    ("direction", direction),
                    ("flag", flag),
                ];
                let got = scrape.counter("relay_observe_tcp_flags_total", &labels);
                ensure!(
                    got == count,
                    "relay_observe_tcp_flags_total{labels:?}: expected {count}, got {got}"
                );
            }
        }
        stop(relay)?;
        let captured = read_capture(&file)?;
        ensure!(
            ids_of(&captured) == expected.to_vec(),
            "filter {filter:?}: expected packets {expected:?}, the capture holds {:?}",
            ids_of(&captured)
        );
        for packet in &captured {
            let id = packet.id.unwrap_or_default();
            let direction = if id >= 20 { 2 } else { 1 };
            ensure!(
                packet.direction == direction && packet.interface == lab.pcap_iface(),
                "filter {filter:?}, packet {id}: expected direction {direction} on {}, got {packet:?}",
                lab.pcap_iface()
            );
        }
    }
    Ok(())
}

#[test]
fn sampling_keeps_one_in_n_and_counts_the_rest() -> Result<()> {
    require_root!("creates network namespaces and attaches eBPF programs");
    require_tool!("tshark");
    const SENT: u16 = 1000;
    const N: u16 = 10;
    let lab = Lab::new("capture-sample")?;
    let file = lab.dir.join("sample.pcapng");
    let relay = lab.capture(
        &file,
        &["--filter", "udp and dst port 9", "--sample", "1/10"],
    )?;
    let packets: Vec<Crafted> = (1..=SENT)
        .map(|id| Crafted::udp(id, "198.18.0.1", "198.19.0.2", 7000, 9))
        .collect();
    lab.send_in(&packets)?;
    let scrape = wait_accounted(&relay, &lab, &["sampled"], f64::from(SENT))?;
    let kept = scrape.counter("relay_observe_samples_total", &lab.labels());
    stop(relay)?;
    let captured = read_capture(&file)?;
    ensure!(
        captured.len() as f64 == kept,
        "the file holds {} packets, relay_observe_samples_total says {kept}",
        captured.len()
    );
    // The sampler counts per CPU: each CPU keeps its first packet and every
    // N-th after it, so the total is SENT/N plus at most one per CPU.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let low = usize::from(SENT / N);
    ensure!(
        (low..=low + cpus).contains(&captured.len()),
        "--sample 1/{N} of {SENT}: expected {low} to {} packets, got {}",
        low + cpus,
        captured.len()
    );
    Ok(())
}

#[test]
fn flow_head_keeps_the_first_packets_and_every_syn_fin_rst_of_each_flow() -> Result<()> {
    require_root!("creates network namespaces and attaches eBPF programs");
    require_tool!("tshark");
    let lab = Lab::new("capture-flowhead")?;
    let file = lab.dir.join("head.pcapng");
    let relay = lab.capture(
        &file,
        &["--filter", "tcp", "--sample", "none", "--flow-head", "3"],
    )?;
    let mut packets = Vec::new();
    let mut expected = Vec::new();
    for flow in 0..4u16 {
        let client = format!("198.18.0.{}", flow + 1);
        let (c, s) = (client.as_str(), "198.19.0.2");
        let port = 40000 + flow;
        let base = flow * 100;
        let mut conversation = vec![
            Crafted::tcp(base + 1, c, s, port, 80, flags::SYN),
            Crafted::tcp(base + 2, s, c, 80, port, flags::SYNACK),
            Crafted::tcp(base + 3, c, s, port, 80, flags::ACK),
        ];
        conversation.extend((4..14).map(|i| Crafted::tcp(base + i, c, s, port, 80, flags::PSHACK)));
        conversation.push(Crafted::tcp(base + 14, c, s, port, 80, flags::FINACK));
        conversation.push(Crafted::tcp(base + 15, s, c, 80, port, flags::FINACK));
        conversation.push(Crafted::tcp(base + 16, c, s, port, 80, flags::ACK));
        if flow == 3 {
            conversation.push(Crafted::tcp(base + 17, s, c, 80, port, flags::RST));
        }
        // Kept: the first three of the flow (both directions count), then
        // only the FINs and the RST.
        expected.extend([base + 1, base + 2, base + 3, base + 14, base + 15]);
        if flow == 3 {
            expected.push(base + 17);
        }
        packets.extend(conversation);
    }
    lab.send_in(&packets)?;
    wait_accounted(&relay, &lab, &["sampled"], packets.len() as f64)?;
    // SIGTERM finishes the file as SIGINT does.
    stop_with(relay, Signal::SIGTERM)?;
    expected.sort_unstable();
    let got = ids_of(&read_capture(&file)?);
    ensure!(
        got == expected,
        "--flow-head 3 --sample none: expected {expected:?}, got {got:?}"
    );
    Ok(())
}

/// Interface statistics blocks of `file`: (received, dropped) per block, read by tshark.
fn statistics_blocks(file: &Path) -> Result<Vec<(u64, u64)>> {
    let mut cmd = Command::new("tshark");
    cmd.arg("-r").arg(file).args([
        "-X",
        "read_format:MIME Files Format",
        "-T",
        "fields",
        "-E",
        "separator=|",
        "-e",
        "pcapng.options.option.data.interface.received",
        "-e",
        "pcapng.options.option.data.interface.dropped",
    ]);
    let out = Interactive::run("tshark-isb", cmd, b"", Duration::from_secs(60))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .filter(|l| !l.trim().is_empty() && *l != "|")
        .map(|l| -> Result<Vec<(u64, u64)>> {
            // Several blocks in one line: `r1,r2|d1,d2`.
            let (received, dropped) = l.split_once('|').context("two fields")?;
            let numbers = |list: &str| -> Result<Vec<u64>> {
                list.split(',')
                    .map(|n| n.trim().parse().with_context(|| format!("{l:?}")))
                    .collect()
            };
            Ok(numbers(received)?
                .into_iter()
                .zip(numbers(dropped)?)
                .collect())
        })
        .collect::<Result<Vec<_>>>()
        .map(|lines| lines.into_iter().flatten().collect())
}

#[test]
fn a_tiny_ring_buffer_loses_samples_but_accounts_for_every_one() -> Result<()> {
    require_root!("creates network namespaces and attaches eBPF programs");
    require_tool!("tshark");
    const SENT: u16 = 20_000;
    let lab = Lab::new("capture-loss")?;
    let file = lab.dir.join("loss.pcapng");
    let relay = lab.capture(
        &file,
        &["--filter", "udp and dst port 9", "--ring-size", "4K"],
    )?;
    let packets: Vec<Crafted> = (1..=SENT)
        .map(|id| Crafted::udp(id, "198.18.0.1", "198.19.0.2", 7000, 9).with_payload(1000))
        .collect();
    lab.send_in(&packets)?;
    let scrape = wait_accounted(&relay, &lab, &["ring_full"], f64::from(SENT))?;
    let lost = scrape.counter(
        "relay_observe_sample_drops_total",
        &[("iface", lab.ns_if.as_str()), ("reason", "ring_full")],
    );
    stop(relay)?;
    let written = read_capture(&file)?.len() as f64;
    ensure!(
        lost > 0.0,
        "a 4 KiB ring buffer under a flood of {SENT} should lose samples; none lost"
    );
    ensure!(
        written + lost == f64::from(SENT),
        "written {written} + lost {lost} != matched {SENT}"
    );
    let blocks = statistics_blocks(&file)?;
    ensure!(
        blocks.iter().any(|(_, dropped)| *dropped as f64 == lost),
        "expected an interface statistics block with {lost} dropped, got (received, dropped) {blocks:?}"
    );
    Ok(())
}

#[test]
fn timestamps_are_wall_clock_and_snaplen_cuts_are_counted() -> Result<()> {
    require_root!("creates network namespaces and attaches eBPF programs");
    require_tool!("tshark");
    let lab = Lab::new("capture-time")?;
    let file = lab.dir.join("time.pcapng");
    let relay = lab.capture(&file, &["--filter", "udp", "--snaplen", "64"])?;
    let mut sender = Sender::open(&lab.host_if)?;
    let mut sent_at = Vec::new();
    for id in 1..=5u16 {
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs_f64();
        sender.send(&Crafted::udp(id, "198.18.0.1", "198.19.0.2", 7000, 9).with_payload(500))?;
        sent_at.push(now);
        std::thread::sleep(Duration::from_millis(50));
    }
    let scrape = wait_accounted(&relay, &lab, &[], 5.0)?;
    let truncated = scrape.counter(
        "relay_observe_sample_drops_total",
        &[("iface", lab.ns_if.as_str()), ("reason", "truncated")],
    );
    ensure!(
        truncated == 5.0,
        "expected 5 samples cut to 64 bytes, metrics say {truncated}"
    );
    stop(relay)?;
    let captured = read_capture(&file)?;
    ensure!(captured.len() == 5, "expected 5 packets, got {captured:?}");
    for (packet, sent) in captured.iter().zip(&sent_at) {
        let skew_ms = (packet.epoch - sent) * 1000.0;
        ensure!(
            (-1.0..5.0).contains(&skew_ms),
            "packet {:?}: timestamp {:.6} is {skew_ms:.3} ms from the wall clock at sending ({sent:.6})",
            packet.id,
            packet.epoch
        );
        ensure!(
            packet.caplen == 64 && packet.len == 14 + 20 + 8 + 500,
            "packet {:?}: expected 64 of 542 bytes, got {} of {}",
            packet.id,
            packet.caplen,
            packet.len
        );
    }
    Ok(())
}

#[test]
fn invalid_filter_and_unwritable_path_are_refused_at_startup() -> Result<()> {
    let dir = TempDir::new("capture-bad")?;
    let file = dir.join("x.pcapng");
    let file = file.display().to_string();
    let cases: [(Vec<&str>, &str); 6] = [
        (
            vec![
                "observe",
                "host",
                "--pcap",
                &file,
                "--filter",
                "tcp and bogus",
            ],
            "syntax error in filter expression",
        ),
        (
            vec![
                "observe",
                "host",
                "--pcap",
                &file,
                "--filter",
                "net 10.0.0.1/8",
            ],
            "non-network bits set in \"10.0.0.1/8\"",
        ),
        (
            vec!["observe", "host", "--pcap", &file, "--sample", "1/0"],
            "`1/0`",
        ),
        (
            vec![
                "observe",
                "host",
                "--pcap",
                "/nonexistent-relay-dir/x.pcapng",
            ],
            "/nonexistent-relay-dir/x.pcapng",
        ),
        (
            vec!["observe", "host", "--pcap", "-", "--watch"],
            "--watch draws on the terminal",
        ),
        (
            vec!["observe", "host", "--pcap", &file, "--pcap-embed-keys"],
            "--pcap-embed-keys needs a TLS route",
        ),
    ];
    for (args, says) in cases {
        let exited = RelayCmd::raw(&args).run_to_exit(EXIT_TIMEOUT)?;
        ensure!(
            exited.status.code() == Some(2) && exited.stderr.contains(says),
            "relay {args:?}: expected exit 2 naming {says:?}, got {} with:\n{}",
            exited.status,
            exited.stderr
        );
    }
    Ok(())
}

/// Filters that once took gigabytes or overflowed the stack (issue 12),
/// and one too long for the kernel program: each is refused as a usage
/// error that names the limit, before relay needs any privilege, in
/// bounded memory (the address space is capped so a regression aborts here
/// instead of exhausting the test host). libpcap's parser bounds its own
/// stack ("memory exhausted").
#[test]
fn filters_too_large_too_deep_or_empty_are_refused_naming_the_limit() -> Result<()> {
    const MEMORY: u64 = 1 << 30;
    let dir = TempDir::new("capture-filter-limits")?;
    let file = dir.join("x.pcapng").display().to_string();
    let bytes = (0..600)
        .map(|i| format!("ether[{i}] = 1"))
        .collect::<Vec<_>>()
        .join(" or ");
    let parens = |n: usize| format!("{}tcp{}", "(".repeat(n), ")".repeat(n));
    let cases: [(&str, String, &[&str]); 5] = [
        (
            "600 byte tests",
            bytes,
            &["too long for the kernel program", "at most 4098"],
        ),
        (
            "10,000 nested parentheses",
            parens(10_000),
            &["memory exhausted", "pcap-filter(7)"],
        ),
        (
            "30,000 nots",
            format!("{}tcp", "not ".repeat(30_000)),
            &["memory exhausted", "pcap-filter(7)"],
        ),
        ("an empty filter", String::new(), &["empty"]),
        ("a blank filter", " \t ".to_string(), &["empty"]),
    ];
    for (what, filter, names) in cases {
        let args = ["observe", "host", "--pcap", &file, "--filter", &filter];
        RelayCmd::raw(&args)
            .memory(MEMORY)
            .expect_usage_error(EXIT_TIMEOUT, names)
            .with_context(|| format!("--filter with {what}"))?;
    }
    Ok(())
}

// ------------------------------------------------------ real peers, outputs

#[test]
fn a_containers_http_is_decoded_by_tshark_and_matches_the_counters() -> Result<()> {
    relay_tests::require_docker!();
    require_tool!("tshark");
    let container = Container::httpd_on(std::net::Ipv4Addr::UNSPECIFIED)?;
    let dir = TempDir::new("capture-docker")?;
    let file = dir.join("web.pcapng");
    let relay = Relay::spawn(&[
        "observe".to_string(),
        format!("container:{}", container.name()),
        "--pcap".to_string(),
        file.display().to_string(),
        "--filter".to_string(),
        "tcp".to_string(),
    ])?;
    let addr = std::net::SocketAddr::from((container.ip()?, HTTPD_PORT));
    let uris: Vec<String> = (1..=5).map(|i| format!("/relay-capture-{i}")).collect();
    for uri in &uris {
        let stream = peers::connect(addr)?;
        http::get(stream, "web", uri)?;
    }
    // Every TCP packet the counters saw on eth0 is a sample: wait until the
    // two agree and stay put (the last ACKs of a close arrive a moment later).
    let eth0 = [("iface", "eth0"), ("proto", "tcp")];
    let mut previous = None;
    let counted = poll_until(
        "the counters and samples to agree and settle",
        COUNT_TIMEOUT,
        || {
            let scrape = relay.scrape()?;
            let packets = scrape.counter("relay_observe_packets_total", &eth0);
            let samples = scrape.counter("relay_observe_samples_total", &[("iface", "eth0")]);
            let settled = packets == samples && packets > 0.0 && previous == Some(packets);
            previous = Some(packets);
            std::thread::sleep(Duration::from_millis(200));
            Ok(settled.then_some(packets))
        },
    )?;
    stop(relay)?;
    let captured = read_capture(&file)?;
    ensure!(
        captured.len() as f64 == counted,
        "the file holds {} packets, relay_observe_packets_total{{iface=eth0,proto=tcp}} says {counted}",
        captured.len()
    );
    let name = format!("eth0@{}", container.name());
    ensure!(
        captured.iter().all(|p| p.interface == name),
        "every packet should be on {name}: {:?}",
        captured
            .iter()
            .map(|p| &p.interface)
            .collect::<BTreeSet<_>>()
    );
    let mut cmd = Command::new("tshark");
    cmd.arg("-r").arg(&file).args([
        "-Y",
        "http.request",
        "-T",
        "fields",
        "-e",
        "http.request.uri",
    ]);
    let out = Interactive::run("tshark-http", cmd, b"", Duration::from_secs(60))?;
    let got: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    ensure!(
        got == uris,
        "tshark decoded the URIs {got:?}, expected {uris:?}"
    );
    // The interface block says which container it belongs to.
    let mut cmd = Command::new("tshark");
    cmd.arg("-r").arg(&file).args([
        "-c",
        "1",
        "-T",
        "fields",
        "-e",
        "frame.interface_description",
    ]);
    let out = Interactive::run("tshark-idb", cmd, b"", Duration::from_secs(60))?;
    let description = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let expected = format!(
        "eth0 in container:{} (network namespace net:[",
        container.name()
    );
    ensure!(
        description.starts_with(&expected),
        "interface description {description:?}, expected it to start with {expected:?}"
    );
    Ok(())
}

/// A child process killed on drop (for pipelines the harness does not build).
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn pcap_to_stdout_is_read_live_by_tshark() -> Result<()> {
    require_root!("creates network namespaces and attaches eBPF programs");
    require_tool!("tshark");
    use std::io::BufRead;
    use std::process::Stdio;
    let lab = Lab::new("capture-stdout")?;
    let metrics = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let log = lab.dir.join("relay.log");
    let mut relay = Killed(
        Command::new(relay_bin()?)
            .args(["observe", &lab.target(), "--pcap", "-", "--filter", "udp"])
            .arg("--metrics")
            .arg(metrics.to_string())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("spawning relay")?,
    );
    let stream = relay.0.stdout.take().context("relay's stdout")?;
    let mut tshark = Killed(
        Command::new("tshark")
            .args(["-r", "-", "-l", "-T", "fields", "-e", "ip.id"])
            .stdin(stream)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning tshark -r -")?,
    );
    let out = tshark.0.stdout.take().context("tshark's stdout")?;
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    relay_tests::ports::wait_listening(relay.0.id(), metrics.port(), EXIT_TIMEOUT)
        .with_context(|| std::fs::read_to_string(&log).unwrap_or_default())?;
    let mut sender = Sender::open(&lab.host_if)?;
    for id in 1..=5u16 {
        sender.send(&Crafted::udp(id, "198.18.0.1", "198.19.0.2", 7000, 9))?;
        // Seen by tshark while relay keeps running: the stream is live.
        let line = lines_rx
            .recv_timeout(Duration::from_secs(5))
            .with_context(|| format!("tshark -r - printed nothing within 5 s of packet {id}"))?;
        ensure!(
            line.trim() == format!("0x{id:04x}") || line.trim() == id.to_string(),
            "tshark -r - printed {line:?} for packet {id}"
        );
        ensure!(
            relay.0.try_wait()?.is_none(),
            "relay exited: {}",
            std::fs::read_to_string(&log)?
        );
    }
    Ok(())
}

#[test]
fn rotation_splits_into_valid_files_without_loss_or_duplicates() -> Result<()> {
    require_root!("creates network namespaces and attaches eBPF programs");
    require_tool!("tshark");
    const SENT: u16 = 300;
    let lab = Lab::new("capture-rotate")?;
    let packets: Vec<Crafted> = (1..=SENT)
        .map(|id| Crafted::udp(id, "198.18.0.1", "198.19.0.2", 7000, 9).with_payload(500))
        .collect();
    for keep in [None, Some(3usize)] {
        let sub = lab.dir.join(&format!("keep-{keep:?}"));
        std::fs::create_dir_all(&sub)?;
        let mut extra = vec!["--filter", "udp", "--rotate-size", "20K"];
        let count = keep.map(|k| k.to_string());
        if let Some(count) = &count {
            extra.extend(["--rotate-count", count]);
        }
        let relay = lab.capture(&sub.join("rot.pcapng"), &extra)?;
        lab.send_in(&packets)?;
        wait_accounted(&relay, &lab, &[], f64::from(SENT))?;
        stop(relay)?;
        let mut files: Vec<PathBuf> = std::fs::read_dir(&sub)?
            .map(|e| e.map(|e| e.path()))
            .collect::<std::io::Result<_>>()?;
        files.sort();
        let mut ids = Vec::new();
        for file in &files {
            let name = file.file_name().map(|n| n.to_string_lossy().into_owned());
            let name = name.unwrap_or_default();
            ensure!(
                name.starts_with("rot-") && name.ends_with(".pcapng"),
                "unexpected file {name}"
            );
            let size = std::fs::metadata(file)?.len();
            ensure!(
                size <= 20 * 1024,
                "{name} is {size} bytes, over --rotate-size 20K"
            );
            // Each file opens on its own, with its statistics block.
            let captured = read_capture(file).with_context(|| format!("reading {name}"))?;
            ensure!(!captured.is_empty(), "{name} holds no packet");
            ensure!(
                !statistics_blocks(file)?.is_empty(),
                "{name} has no interface statistics block"
            );
            ids.extend(pcap_ids(&captured));
        }
        let unique: BTreeSet<u16> = ids.iter().copied().collect();
        ensure!(
            unique.len() == ids.len(),
            "duplicated packets across {} files",
            files.len()
        );
        match keep {
            None => {
                ensure!(
                    files.len() > 3,
                    "300 packets of 542 bytes in 20K files: expected more than 3 files, got {}",
                    files.len()
                );
                ensure!(
                    ids == (1..=SENT).collect::<Vec<_>>(),
                    "the {} files should hold packets 1-{SENT} once each; missing {:?}",
                    files.len(),
                    (1..=SENT)
                        .filter(|i| !unique.contains(i))
                        .collect::<Vec<_>>()
                );
            }
            Some(k) => {
                ensure!(
                    files.len() == k,
                    "--rotate-count {k}: {} files left",
                    files.len()
                );
                // The newest files, contiguous up to the last packet.
                let first = *ids.first().context("no packets")?;
                ensure!(
                    ids == (first..=SENT).collect::<Vec<_>>(),
                    "--rotate-count {k}: the files kept should hold the last packets, got {ids:?}"
                );
            }
        }
    }
    Ok(())
}

/// A small tmpfs, unmounted on drop.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(at: PathBuf, size: &str) -> Result<Self> {
        std::fs::create_dir_all(&at)?;
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "relay-test-full",
            ])
            .arg(&at)
            .status()?;
        ensure!(status.success(), "mount tmpfs on {} failed", at.display());
        Ok(SmallDisk(at))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_stops_the_capture_with_a_clear_error_and_a_valid_file() -> Result<()> {
    require_root!("creates network namespaces, mounts a tmpfs");
    require_tool!("tshark");
    let lab = Lab::new("capture-full")?;
    let disk = SmallDisk::mount(lab.dir.join("disk"), "64k")?;
    let file = disk.0.join("full.pcapng");
    let mut relay = lab.capture(&file, &["--filter", "udp"])?;
    let packets: Vec<Crafted> = (1..=200u16)
        .map(|id| Crafted::udp(id, "198.18.0.1", "198.19.0.2", 7000, 9).with_payload(1000))
        .collect();
    lab.send_in(&packets)?;
    let status = relay
        .proc
        .wait_exit(EXIT_TIMEOUT)?
        .with_context(|| format!("relay kept running on a full disk:\n{}", relay.stderr()))?;
    let stderr = relay.stderr();
    ensure!(
        status.code() == Some(1)
            && stderr.contains("capture stopped")
            && stderr.contains("No space left on device")
            && stderr.contains(&file.display().to_string()),
        "expected exit 1 naming the file and the full disk, got {status}:\n{stderr}"
    );
    let captured = read_capture(&file)?;
    ensure!(
        !captured.is_empty() && captured.len() < packets.len(),
        "expected the packets that fitted in 64 KiB, got {}",
        captured.len()
    );
    Ok(())
}

#[test]
fn embedded_tls_keys_let_tshark_decrypt_the_capture_without_a_key_log_file() -> Result<()> {
    require_root!("creates network namespaces and attaches eBPF programs");
    require_tool!("tshark");
    require_tool!("openssl");
    let (lab, ca, _s_server) = tls_lab("capture-keys")?;
    let addr = lab.ns.addr().to_string();

    let file = lab.dir.join("tls.pcapng");
    let listen = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let mut relay = RelayCmd::forward(listen, format!("tls://{addr}:4433"))
        .opts(&[
            "--tls-ca",
            &ca.cert_path().display().to_string(),
            "--observe",
            &lab.target(),
            "--pcap",
            &file.display().to_string(),
            "--filter",
            "tcp port 4433",
            "--pcap-embed-keys",
        ])
        .spawn()?;
    let uri = "/decrypted-from-the-embedded-keys";
    let response = http::get(peers::connect(listen)?, "server", uri)?;
    ensure!(
        response.status == 200,
        "GET through relay to s_server -www: status {}",
        response.status
    );
    relay.signal(Signal::SIGINT)?;
    let status = relay.wait_exit(EXIT_TIMEOUT)?;
    ensure!(
        status.success(),
        "relay exited with {status}:\n{}",
        relay.stderr()
    );

    let (uris, stderr) = decrypted_uris(&file)?;
    ensure!(
        uris == uri,
        "tshark should decrypt the request with the embedded keys and show {uri:?}, got {uris:?} (stderr: {stderr})",
    );
    Ok(())
}

/// A lab whose namespace runs `openssl s_server -www` on port 4433 with a
/// certificate of `ca` for the namespace's address (relay originates TLS to
/// it across the veth).
fn tls_lab(name: &str) -> Result<(Lab, relay_tests::certs::Ca, ChildProc)> {
    use relay_tests::certs::{Ca, CertSpec};
    let lab = Lab::new(name)?;
    let ca = Ca::new(name)?;
    let addr = lab.ns.addr().to_string();
    let server = ca.issue("server", &CertSpec::server(&[addr.as_str()]))?;
    let mut cmd = lab.ns.command("openssl");
    cmd.args(["s_server", "-accept", "4433", "-www", "-cert"])
        .arg(&server.cert)
        .arg("-key")
        .arg(&server.key);
    let mut s_server = ChildProc::spawn("openssl-s_server", cmd)?;
    s_server.wait_listening(4433, EXIT_TIMEOUT)?;
    Ok((lab, ca, s_server))
}

/// The HTTP request URIs tshark decrypts from `file` with no key log file
/// (the secrets come from the file), one per line; and tshark's stderr.
fn decrypted_uris(file: &Path) -> Result<(String, String)> {
    let mut cmd = Command::new("tshark");
    cmd.arg("-r").arg(file).args([
        "-d",
        "tcp.port==4433,tls",
        "-Y",
        "http.request",
        "-T",
        "fields",
        "-e",
        "http.request.uri",
    ]);
    let out = Interactive::run("tshark-tls", cmd, b"", Duration::from_secs(60))?;
    let uris = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if uris.is_empty() {
        let mut cmd = Command::new("tshark");
        cmd.arg("-r").arg(file).args([
            "-X",
            "read_format:MIME Files Format",
            "-T",
            "fields",
            "-e",
            "pcapng.block.type",
        ]);
        let all = Interactive::run("tshark-all", cmd, b"", Duration::from_secs(60))?;
        eprintln!("the capture:\n{}", String::from_utf8_lossy(&all.stdout));
    }
    Ok((uris, out.stderr))
}

/// A TLS route of a config file with an embedded-keys capture, changed by
/// a reload while its observer stays: connections after the reload are
/// decrypted from the same file too (their keys go where the running
/// capture reads them).
#[test]
fn a_changed_route_keeps_embedding_its_tls_keys_after_a_reload() -> Result<()> {
    require_root!("creates network namespaces and attaches eBPF programs");
    require_tool!("tshark");
    require_tool!("openssl");
    let (lab, ca, _s_server) = tls_lab("capture-keys-reload")?;
    let addr = lab.ns.addr().to_string();

    let file = lab.dir.join("tls.pcapng");
    let config = lab.dir.join("relay.toml");
    let (listen, metrics) = (free_port()?, free_port()?);
    let write = |connect_timeout: &str| {
        std::fs::write(
            &config,
            format!(
                "[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n\n[[route]]\nname = \"tls\"\nlisten = \"127.0.0.1:{listen}\"\ntarget = \"tls://{addr}:4433\"\nconnect-timeout = \"{connect_timeout}\"\nobserve = \"{}\"\n\n[route.tls]\nca = \"{}\"\n\n[route.capture]\npcap = \"{}\"\nfilter = \"tcp port 4433\"\nembed-keys = true\n",
                lab.target(),
                ca.cert_path().display(),
                file.display()
            ),
        )
    };
    write("5s")?;
    let mut cmd = Command::new(relay_bin()?);
    cmd.arg("run").arg("-c").arg(&config);
    let mut relay = ChildProc::spawn("relay", cmd)?;
    relay.wait_listening(listen, EXIT_TIMEOUT)?;
    let get = |uri: &str| -> Result<()> {
        let stream = peers::connect(std::net::SocketAddr::from(([127, 0, 0, 1], listen)))?;
        let response = http::get(stream, "server", uri)?;
        ensure!(
            response.status == 200,
            "GET {uri}: status {}",
            response.status
        );
        Ok(())
    };
    get("/before-the-reload")?;
    write("6s")?;
    relay.signal(Signal::SIGHUP)?;
    let metrics = std::net::SocketAddr::from(([127, 0, 0, 1], metrics));
    poll_until("the reload to be applied", EXIT_TIMEOUT, || {
        let response = http::get(peers::connect(metrics)?, "relay", "/metrics")?;
        let scrape = Scrape::parse(&String::from_utf8_lossy(&response.body))?;
        Ok(
            (scrape.value("relay_config_reloads_total", &[("outcome", "ok")]) == Some(1.0))
                .then_some(()),
        )
    })?;
    get("/after-the-reload")?;
    relay.signal(Signal::SIGINT)?;
    let status = relay.wait_exit(EXIT_TIMEOUT)?;
    ensure!(
        status.is_some_and(|s| s.success()),
        "relay exited with {status:?}:\n{}",
        relay.log()
    );
    let (uris, stderr) = decrypted_uris(&file)?;
    ensure!(
        uris == "/before-the-reload\n/after-the-reload",
        "tshark should decrypt both requests with the embedded keys, got {uris:?} (stderr: {stderr})"
    );
    Ok(())
}

#[test]
fn follow_adds_the_restarted_containers_interface_to_the_same_file() -> Result<()> {
    relay_tests::require_docker!();
    require_tool!("tshark");
    let container = Container::httpd_on(std::net::Ipv4Addr::UNSPECIFIED)?;
    let dir = TempDir::new("capture-follow")?;
    let file = dir.join("follow.pcapng");
    let relay = Relay::spawn(&[
        "observe".to_string(),
        format!("container:{}", container.name()),
        "--follow".to_string(),
        "--pcap".to_string(),
        file.display().to_string(),
        "--filter".to_string(),
        "tcp port 8080".to_string(),
    ])?;
    let get = |uri: &str| -> Result<()> {
        let addr = std::net::SocketAddr::from((container.ip()?, HTTPD_PORT));
        http::get(peers::connect(addr)?, "web", uri).map(drop)
    };
    get("/before-restart")?;
    container.restart()?;
    container.wait_listening(HTTPD_PORT)?;
    poll_until(
        "relay to attach to the new namespace",
        COUNT_TIMEOUT,
        || {
            Ok(relay
                .stderr()
                .contains("target is back: attached again")
                .then_some(()))
        },
    )?;
    get("/after-restart")?;
    std::thread::sleep(Duration::from_millis(200));
    stop(relay)?;

    let mut cmd = Command::new("tshark");
    cmd.arg("-r").arg(&file).args([
        "-Y",
        "http.request",
        "-T",
        "fields",
        "-E",
        "separator=|",
        "-e",
        "frame.interface_id",
        "-e",
        "http.request.uri",
    ]);
    let out = Interactive::run("tshark-follow", cmd, b"", Duration::from_secs(60))?;
    let got: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    // One interface block per namespace: the request after the restart is
    // on the new one.
    ensure!(
        got == ["0|/before-restart", "1|/after-restart"],
        "expected /before-restart on interface 0 and /after-restart on interface 1, got {got:?}"
    );
    let blocks = statistics_blocks(&file)?;
    ensure!(
        blocks.len() == 2,
        "expected a statistics block for each namespace's eth0, got {blocks:?}"
    );
    Ok(())
}
