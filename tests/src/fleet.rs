//! `relay observe containers` as the tests see it: started with a
//! selection, polled until a container's info series and interface
//! appear or go, the TCX links it holds counted, and its counters
//! compared with the kernel's across some HTTP traffic.
//!
//! Shared by the Docker tests and those of the other discovery sources
//! (containerd, netns, auto), which differ only in how the containers are
//! started.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

use crate::namespaced::Subject;
use crate::observed::{agree_since, settle};
use crate::relay_proc::Relay;
use crate::wait::poll_until;
use crate::{RelayCmd, Scrape, http, peers};

/// For what has no deadline of its own (a restart, a daemon coming back).
pub const FOLLOW_TIMEOUT: Duration = Duration::from_secs(30);
/// HTTP requests per [`counts_match`].
pub const REQUESTS: u64 = 10;

/// `relay observe containers <extra> --metrics PORT`, ready once it serves metrics.
pub fn observe_containers(extra: &[&str]) -> Result<Relay> {
    let mut args = vec!["observe".to_string(), "containers".to_string()];
    args.extend(extra.iter().map(|a| a.to_string()));
    RelayCmd::raw(&args).with_metrics()?.spawn()
}

/// The info series of container `name`, if relay shows one.
pub fn info(scrape: &Scrape, name: &str) -> Option<BTreeMap<String, String>> {
    scrape
        .matching("relay_observe_container_info", &[("container", name)])
        .next()
        .map(|s| s.labels.clone())
}

/// Attached: the info series says network="own" and an interface is attached.
pub fn is_attached(scrape: &Scrape, name: &str) -> bool {
    info(scrape, name).is_some_and(|l| l.get("network").map(String::as_str) == Some("own"))
        && scrape.counter("relay_observe_attached", &[("container", name)]) >= 1.0
}

/// Poll until `name` is attached; how long that took from the call.
pub fn wait_attached(relay: &Relay, name: &str, timeout: Duration) -> Result<Duration> {
    let start = Instant::now();
    let mut last = String::new();
    poll_until(&format!("container {name} to be attached"), timeout, || {
        let scrape = relay.scrape()?;
        let attached = is_attached(&scrape, name);
        last = scrape.text;
        Ok(attached.then(|| start.elapsed()))
    })
    .with_context(|| format!("last scrape:\n{last}"))
}

/// Poll until relay shows nothing of container `name`.
pub fn wait_detached(relay: &Relay, name: &str) -> Result<()> {
    poll_until(
        &format!("container {name}'s series to go"),
        FOLLOW_TIMEOUT,
        || {
            let scrape = relay.scrape()?;
            let gone = info(&scrape, name).is_none()
                && scrape
                    .value("relay_observe_attached", &[("container", name)])
                    .is_none()
                && scrape
                    .value("relay_observe_packets_total", &[("container", name)])
                    .is_none();
            Ok(gone.then_some(()))
        },
    )
}

/// TCX links relay holds open (each is one program on one hook of one interface).
pub fn tcx_links(relay: &Relay) -> Result<usize> {
    let dir = format!("/proc/{}/fdinfo", relay.pid());
    let mut links = 0;
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let text = std::fs::read_to_string(entry?.path()).unwrap_or_default();
        if text
            .lines()
            .any(|l| l.starts_with("link_type:") && l.contains("tcx"))
        {
            links += 1;
        }
    }
    Ok(links)
}

/// Poll until relay holds exactly `want` TCX links.
pub fn wait_tcx_links(relay: &Relay, want: usize) -> Result<()> {
    let mut held = 0;
    poll_until(
        &format!("relay to hold {want} TCX links"),
        FOLLOW_TIMEOUT,
        || {
            held = tcx_links(relay)?;
            Ok((held == want).then_some(()))
        },
    )
    .with_context(|| format!("it holds {held}"))
}

/// GET / `n` times over new connections; every answer must be the subject's.
pub fn fetch(subject: &Subject, n: u64) -> Result<()> {
    let addr = subject.http_addr()?;
    for i in 0..n {
        let response = http::get(peers::connect(addr)?, "observed", "/index.html")?;
        ensure!(
            response.status == 200 && String::from_utf8_lossy(&response.body) == subject.body(),
            "request {i} to {addr}: expected 200 {:?}, got {}",
            subject.body(),
            response.status
        );
    }
    Ok(())
}

/// Traffic to `subject` is counted, per direction, exactly as its
/// interface's kernel counters grew (the series named by its label).
pub fn counts_match(
    relay: &Relay,
    subject: &Subject,
    traffic: impl FnOnce() -> Result<()>,
) -> Result<()> {
    let iface = subject.iface()?;
    let base = settle(relay, subject, &iface, None, |_| true)?;
    traffic()?;
    let end = agree_since(relay, subject, &iface, &base)?;
    let (kernel, _) = end.growth_since(&base);
    ensure!(
        kernel.rx_packets >= 4 * REQUESTS && kernel.tx_packets >= 4 * REQUESTS,
        "{REQUESTS} HTTP exchanges should move at least 4 packets each way apiece; the kernel counted {kernel:?}"
    );
    Ok(())
}

/// Poll until `relay_observe_discovery_up{source}` is there and says `up`
/// (a missing series is not "down"); the scrape that said so.
pub fn wait_discovery(relay: &Relay, source: &str, up: bool) -> Result<Scrape> {
    let want = if up { 1.0 } else { 0.0 };
    let mut last = String::new();
    poll_until(
        &format!("relay_observe_discovery_up{{source=\"{source}\"}} {want}"),
        FOLLOW_TIMEOUT,
        || {
            let scrape = relay.scrape()?;
            let now = scrape.value("relay_observe_discovery_up", &[("source", source)]);
            last = scrape.text.clone();
            Ok((now == Some(want)).then_some(scrape))
        },
    )
    .with_context(|| format!("last scrape:\n{last}"))
}
