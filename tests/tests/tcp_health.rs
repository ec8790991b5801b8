//! TCP health of an observed namespace: the handshake latency histogram
//! measured in the kernel at TC, over a link with 25 ms added each way
//! (50 ms round trip, the userspace shaper: no `tc netem` here), and
//! retransmitted segments over a link losing 5% of packets, equal to the
//! kernel's own `TcpRetransSegs` of that namespace.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use relay_tests::peers::{self, Backend};
use relay_tests::relay_proc::Relay;
use relay_tests::shaper::ShapedLink;
use relay_tests::wait::poll_until;
use relay_tests::{RelayCmd, Scrape, require_root};

const HANDSHAKES: u64 = 20;
const WAIT: Duration = Duration::from_secs(30);
/// The tolerance on the median.
const MEDIAN_TOLERANCE: Duration = Duration::from_millis(5);

/// `relay observe netns:<link's namespace> --metrics`, once its handshake
/// series are there (attached).
fn observe(link: &ShapedLink) -> Result<Relay> {
    let target = format!("netns:{}", link.ns().name());
    let relay = RelayCmd::raw(&["observe", target.as_str()])
        .with_metrics()?
        .spawn()?;
    let name = link.ns().name();
    poll_until("relay to attach in the shaped namespace", WAIT, || {
        let scrape = relay.scrape()?;
        Ok(scrape
            .value(
                "relay_observe_tcp_handshake_seconds_count",
                &[("target", name), ("direction", "outbound")],
            )
            .is_some()
            .then_some(()))
    })?;
    Ok(relay)
}

/// (upper bound, cumulative count) of one histogram, by bound.
fn buckets(scrape: &Scrape, target: &str, direction: &str) -> Vec<(f64, f64)> {
    let mut buckets: Vec<(f64, f64)> = scrape
        .matching(
            "relay_observe_tcp_handshake_seconds_bucket",
            &[("target", target), ("direction", direction)],
        )
        .filter_map(|s| {
            let le = s.labels.get("le")?;
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((bound, s.value))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

/// The q-quantile as Prometheus's histogram_quantile computes it: linear
/// within the bucket the rank falls in.
fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(bound, count) in buckets {
        if count >= rank && count > lower.1 {
            if bound.is_infinite() {
                return Some(lower.0);
            }
            return Some(lower.0 + (bound - lower.0) * (rank - lower.1) / (count - lower.1));
        }
        lower = (bound, count);
    }
    None
}

#[test]
fn handshake_latency_is_the_links_round_trip_outbound_and_the_targets_answer_inbound() -> Result<()>
{
    require_root!("creates a network namespace and TUN devices");
    let delay = Duration::from_millis(25);
    let link = ShapedLink::new(delay, 0.0)?;
    let relay = observe(&link)?;
    let name = link.ns().name();

    // Outbound: the namespace connects to the host across the link.
    let host_server = Backend::on(
        std::net::TcpListener::bind((link.host_addr(), 0)).context("binding on the link")?,
        drop,
    )?;
    for _ in 0..HANDSHAKES {
        drop(link.ns().tcp_connect(host_server.addr())?);
    }
    // Inbound: the host connects into the namespace.
    let ns_server = Backend::on(
        link.ns()
            .tcp_listen(SocketAddr::from((link.addr(), 7100)))?,
        drop,
    )?;
    for _ in 0..HANDSHAKES {
        drop(peers::connect(ns_server.addr())?);
    }

    let count = |scrape: &Scrape, direction: &str| {
        scrape.value(
            "relay_observe_tcp_handshake_seconds_count",
            &[("target", name), ("direction", direction)],
        )
    };
    let want = HANDSHAKES as f64;
    let scrape = poll_until("every handshake counted", WAIT, || {
        let scrape = relay.scrape()?;
        Ok(
            (count(&scrape, "outbound") == Some(want) && count(&scrape, "inbound") == Some(want))
                .then_some(scrape),
        )
    })
    .with_context(|| format!("{HANDSHAKES} handshakes each way"))?;

    let round_trip = (2 * delay).as_secs_f64();
    let outbound = buckets(&scrape, name, "outbound");
    let median = quantile(&outbound, 0.5).context("no outbound buckets")?;
    let sum = scrape.counter(
        "relay_observe_tcp_handshake_seconds_sum",
        &[("target", name), ("direction", "outbound")],
    );
    let mean = sum / want;
    eprintln!(
        "outbound handshakes over {round_trip:.3} s round trip: median {median:.4} s, mean {mean:.4} s"
    );
    ensure!(
        (median - round_trip).abs() <= MEDIAN_TOLERANCE.as_secs_f64(),
        "the outbound median should be the link's round trip {round_trip} s within {MEDIAN_TOLERANCE:?}, got {median} s from {outbound:?}"
    );
    ensure!(
        mean >= round_trip && mean - round_trip <= MEDIAN_TOLERANCE.as_secs_f64(),
        "the outbound mean (exact: _sum / _count) should be just over {round_trip} s, got {mean} s"
    );
    // Inbound: the namespace answers a SYN at once; the delay is before it.
    let inbound = buckets(&scrape, name, "inbound");
    let under_5ms = inbound
        .iter()
        .find(|(bound, _)| *bound >= 0.005)
        .map_or(0.0, |b| b.1);
    ensure!(
        under_5ms == want,
        "every inbound handshake (SYN in, SYN-ACK out) should take under 5 ms here, {under_5ms} of {want} did: {inbound:?}"
    );
    Ok(())
}

/// The namespace's `TcpRetransSegs`, read by the kernel's own file in it.
fn kernel_retransmits(link: &ShapedLink) -> Result<u64> {
    let snmp = link
        .ns()
        .enter(|| std::fs::read_to_string("/proc/thread-self/net/snmp"))?;
    let mut rows = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let names = rows.next().context("no Tcp: header")?.split_whitespace();
    let values = rows.next().context("no Tcp: values")?.split_whitespace();
    names
        .zip(values)
        .find(|(n, _)| *n == "RetransSegs")
        .and_then(|(_, v)| v.parse().ok())
        .context("no RetransSegs in /proc/net/snmp")
}

#[test]
fn retransmitted_segments_over_a_lossy_link_are_the_kernels_count() -> Result<()> {
    require_root!("creates a network namespace and TUN devices");
    const BYTES: u64 = 4 << 20;
    let link = ShapedLink::new(Duration::from_millis(5), 0.05)?;
    let relay = observe(&link)?;
    let name = link.ns().name();
    let base = kernel_retransmits(&link)?;

    // 4 MiB from the namespace to a sink on the host, read whole.
    let received = Arc::new(AtomicU64::new(0));
    let sink = Backend::on(
        std::net::TcpListener::bind((link.host_addr(), 0)).context("binding on the link")?,
        {
            let received = Arc::clone(&received);
            move |mut stream: TcpStream| {
                let mut buf = vec![0; 65536];
                while let Ok(n @ 1..) = stream.read(&mut buf) {
                    received.fetch_add(n as u64, Ordering::SeqCst);
                }
            }
        },
    )?;
    let mut stream = link.ns().tcp_connect(sink.addr())?;
    stream.set_write_timeout(Some(WAIT))?;
    let chunk = vec![0x5a; 64 << 10];
    for _ in 0..BYTES / chunk.len() as u64 {
        stream.write_all(&chunk)?;
    }
    stream.shutdown(Shutdown::Write)?;
    poll_until(
        "the sink to read all 4 MiB",
        Duration::from_secs(120),
        || Ok((received.load(Ordering::SeqCst) == BYTES).then_some(())),
    )?;

    let mut last = (0, 0.0);
    poll_until("relay's count to equal the kernel's", WAIT, || {
        let before = kernel_retransmits(&link)? - base;
        let observed = relay
            .scrape()?
            .counter("relay_observe_tcp_retransmits_total", &[("target", name)]);
        let after = kernel_retransmits(&link)? - base;
        last = (after, observed);
        Ok((before == after && observed == after as f64).then_some(()))
    })
    .with_context(|| format!("last: kernel {} vs relay {}", last.0, last.1))?;
    eprintln!(
        "4 MiB over 5% loss: {} segments retransmitted (kernel and relay), link dropped {:?}",
        last.0,
        link.stats()
    );
    ensure!(
        last.0 > 0 && link.stats().dropped() > 0,
        "5% loss should make TCP retransmit: kernel {} retransmissions, link {:?}",
        last.0,
        link.stats()
    );
    drop(stream);
    Ok(())
}
