//! DNS per container, parsed in the kernel at TC: Debian's dnsmasq in a
//! namespace of its own, busybox `nslookup` from a Docker container asking
//! it names with known answers, names it says do not exist, and names
//! whose upstream (a scripted responder in the namespace) fails. relay
//! observing the container counts the queries it sent and the answers it
//! got by rcode, exactly; relay observing dnsmasq's namespace counts the
//! same messages the other way round; both time every answer.

use std::net::UdpSocket;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use relay_tests::child::ChildProc;
use relay_tests::docker::{self, Container};
use relay_tests::fleet::{observe_containers, wait_attached};
use relay_tests::netns::NetNs;
use relay_tests::peers::ServfailDns;
use relay_tests::relay_proc::Relay;
use relay_tests::wait::poll_until;
use relay_tests::{RelayCmd, Scrape, require_docker, require_tool};

const WAIT: Duration = Duration::from_secs(30);
/// Lookups per answer: (name, rcode relay should count, what nslookup
/// prints, lookups). busybox nslookup asks again after a SERVFAIL, so the
/// queries are counted from dnsmasq's own log, not from the lookups.
const LOOKUPS: [(&str, &str, &str, usize); 3] = [
    ("known.test", "NOERROR", "10.1.2.3", 3),
    ("nope.test", "NXDOMAIN", "NXDOMAIN", 2),
    ("x.fail.test", "SERVFAIL", "SERVFAIL", 2),
];
/// Where dnsmasq sends `fail.test`, inside its namespace.
const UPSTREAM: &str = "127.0.0.1:5353";

/// dnsmasq in `ns` on its veth address: `known.test` is 10.1.2.3, any other
/// name under `test` does not exist, `fail.test` goes to a [`ServfailDns`] on `UPSTREAM`.
fn dnsmasq(ns: &NetNs) -> Result<ChildProc> {
    let mut cmd = ns.command("dnsmasq");
    cmd.args([
        "-k",
        "--conf-file=/dev/null",
        "--pid-file=",
        "-u",
        "root",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        &format!("--listen-address={}", ns.addr()),
        "--log-queries",
        "--log-facility=-",
        "--address=/known.test/10.1.2.3",
        "--local=/test/",
        &format!("--server=/fail.test/{}", UPSTREAM.replace(':', "#")),
    ]);
    let mut server = ChildProc::spawn("dnsmasq", cmd)?;
    poll_until("dnsmasq to listen", WAIT, || {
        server.ensure_running()?;
        let probe = UdpSocket::bind("0.0.0.0:0")?;
        probe.set_read_timeout(Some(Duration::from_millis(200)))?;
        // A bare header asking nothing: dnsmasq answers (FORMERR or similar).
        probe.send_to(&[0x12, 0x34, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0], (ns.addr(), 53))?;
        let mut buf = [0u8; 512];
        Ok(probe.recv_from(&mut buf).is_ok().then_some(()))
    })?;
    Ok(server)
}

/// `nslookup -type=a name server` in the container; its output.
fn nslookup(container: &Container, name: &str, server: &str) -> Result<String> {
    let output = Command::new("docker")
        .args([
            "exec",
            container.name(),
            "nslookup",
            "-type=a",
            name,
            server,
        ])
        .output()
        .context("docker exec nslookup")?;
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    ))
}

/// (queries of type A, responses per rcode, timed responses) for `target`'s `direction`.
fn dns_counts(scrape: &Scrape, target: &str, direction: &str) -> (f64, Vec<f64>, Option<f64>) {
    let labels = [("target", target), ("direction", direction)];
    let queries = scrape.counter(
        "relay_observe_dns_queries_total",
        &[labels[0], labels[1], ("qtype", "A")],
    );
    let responses = LOOKUPS
        .iter()
        .map(|(_, rcode, _, _)| {
            scrape.counter(
                "relay_observe_dns_responses_total",
                &[labels[0], labels[1], ("qtype", "A"), ("rcode", rcode)],
            )
        })
        .collect();
    let timed = scrape.value("relay_observe_dns_response_seconds_count", &labels);
    (queries, responses, timed)
}

/// The A queries for each of [`LOOKUPS`]' names dnsmasq logged receiving.
fn logged_queries(dnsmasq: &ChildProc) -> Vec<usize> {
    let log = dnsmasq.log();
    LOOKUPS
        .iter()
        .map(|(name, ..)| {
            let asked = format!("query[A] {name} from ");
            log.lines().filter(|l| l.contains(&asked)).count()
        })
        .collect()
}

/// Poll until `relay` counts for `target` in `direction` exactly what
/// dnsmasq logged: every query, each answered with its name's rcode, and
/// every answer timed.
fn wait_counted(
    relay: &Relay,
    dnsmasq: &ChildProc,
    target: &str,
    direction: &str,
) -> Result<Scrape> {
    let mut last = None;
    poll_until(
        &format!("{target}'s {direction} DNS counted as dnsmasq logged it"),
        WAIT,
        || {
            let logged = logged_queries(dnsmasq);
            let total: usize = logged.iter().sum();
            let want = (
                total as f64,
                logged.iter().map(|n| *n as f64).collect::<Vec<_>>(),
                Some(total as f64),
            );
            let scrape = relay.scrape()?;
            let got = dns_counts(&scrape, target, direction);
            let done = got == want && logged.iter().zip(LOOKUPS).all(|(n, l)| *n >= l.3);
            last = Some((want, got));
            Ok(done.then_some(scrape))
        },
    )
    .with_context(|| {
        format!("(queries, responses by rcode of {LOOKUPS:?}, timed): (dnsmasq's log, relay's) last {last:?}")
    })
}

#[test]
fn dns_queries_and_answers_are_counted_by_rcode_both_ways_and_timed() -> Result<()> {
    require_docker!();
    require_tool!("dnsmasq");
    docker::ensure_daemon()?;
    docker::image()?;
    let ns = NetNs::create()?;
    let _upstream = ServfailDns::on(ns.enter(|| UdpSocket::bind(UPSTREAM))?)?;
    let dnsmasq = dnsmasq(&ns)?;

    let tag = format!("relay.test=dns-{}", std::process::id());
    let fleet = observe_containers(&["--source", "docker", "--select", &format!("label={tag}")])?;
    let server_side = RelayCmd::raw(&["observe", &format!("netns:{}", ns.name())])
        .with_metrics()?
        .spawn()?;
    let client = Container::run_with(&["--label", &tag], &["sleep", "600"])?;
    wait_attached(&fleet, client.name(), WAIT)?;
    poll_until("relay to attach in dnsmasq's namespace", WAIT, || {
        let scrape = server_side.scrape()?;
        Ok(
            (scrape.counter("relay_observe_attached", &[("target", ns.name())]) >= 1.0)
                .then_some(()),
        )
    })?;

    let server = ns.addr().to_string();
    for (name, _, expect, times) in LOOKUPS {
        for _ in 0..times {
            let out = nslookup(&client, name, &server)?;
            ensure!(
                out.contains(expect),
                "nslookup {name} should print {expect:?}:\n{out}"
            );
        }
    }

    let asked = wait_counted(&fleet, &dnsmasq, client.name(), "outbound")?;
    wait_counted(&server_side, &dnsmasq, ns.name(), "inbound")?;
    eprintln!(
        "dnsmasq logged {:?} A queries for {:?}; relay counted the same on both sides",
        logged_queries(&dnsmasq),
        LOOKUPS.map(|l| l.0)
    );
    let sum = asked.counter(
        "relay_observe_dns_response_seconds_sum",
        &[("target", client.name()), ("direction", "outbound")],
    );
    let answers: usize = logged_queries(&dnsmasq).iter().sum();
    ensure!(
        sum > 0.0 && sum < answers as f64,
        "{answers} answers from a namespace on this host take well under a second each, the sum is {sum} s"
    );
    ensure!(
        asked.counter(
            "relay_observe_dns_queries_total",
            &[("target", client.name()), ("direction", "inbound")]
        ) == 0.0,
        "the container answered no query"
    );
    Ok(())
}
