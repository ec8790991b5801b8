//! relay's /metrics: counters that match the traffic exactly, labels as the
//! contract names them, and an exposition promtool accepts.

use std::io::Write;
use std::net::{Ipv4Addr, Shutdown, SocketAddr};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, ensure};
use relay_tests::payload::read_fingerprint;
use relay_tests::peers::{Backend, expect_close};
use relay_tests::ports::free_port;
use relay_tests::tools::promtool_check;
use relay_tests::{Payload, RelayCmd, require_tool};

/// A sample that must have an exact value: (name, labels, value).
type Expectation<'a> = (&'a str, Vec<(&'a str, &'a str)>, f64);

const METRIC_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECTIONS: u64 = 20;

/// Bytes the client of connection `i` sends.
fn request_len(i: u64) -> u64 {
    1 + i * 1000 + i * i * 7
}

/// Bytes the backend answers to a request of `len` bytes.
fn reply_len(len: u64) -> u64 {
    3 * len + 5
}

/// A backend that reads a request to EOF, then answers `reply_len` bytes.
fn sized_reply_backend() -> Result<(Backend, mpsc::Receiver<Result<u64, String>>)> {
    let (tx, rx) = mpsc::channel();
    let backend = Backend::start(move |mut conn| {
        let answered = read_fingerprint(&mut conn).and_then(|request| {
            Payload::new(request.len, reply_len(request.len)).write_to(&mut conn)?;
            Ok(request.len)
        });
        let _ = tx.send(answered.map_err(|e| e.to_string()));
    })?;
    Ok((backend, rx))
}

/// One request/reply through the relay; returns the reply length seen.
fn exchange(relay: &relay_tests::Relay, i: u64) -> Result<u64> {
    let mut client = relay.connect()?;
    Payload::new(i, request_len(i)).write_to(&mut client)?;
    client.shutdown(Shutdown::Write)?;
    Ok(read_fingerprint(&mut client)?.len)
}

#[test]
fn byte_and_connection_counters_match_traffic_exactly() -> Result<()> {
    let (backend, rx) = sized_reply_backend()?;
    let relay = RelayCmd::loopback_to(backend.addr())?
        .opts(&["--name", "exact"])
        .spawn()?;
    for i in 0..CONNECTIONS {
        let got = exchange(&relay, i)?;
        ensure!(
            got == reply_len(request_len(i)),
            "connection {i}: expected a {} byte reply, got {got}",
            reply_len(request_len(i))
        );
        let seen = rx
            .recv_timeout(METRIC_TIMEOUT)
            .map_err(|e| anyhow!("backend report {i}: {e}"))?;
        ensure!(
            seen == Ok(request_len(i)),
            "connection {i}: expected the backend to read {} bytes, got {seen:?}",
            request_len(i)
        );
    }
    let route = [("route", "exact")];
    let closed = [("route", "exact"), ("outcome", "closed")];
    let scrape = relay.wait_metric(
        "relay_connections_total",
        &closed,
        CONNECTIONS as f64,
        METRIC_TIMEOUT,
    )?;

    let to_target: u64 = (0..CONNECTIONS).map(request_len).sum();
    let to_client: u64 = (0..CONNECTIONS).map(|i| reply_len(request_len(i))).sum();
    let n = CONNECTIONS as f64;
    // (metric, labels, expected value)
    let expectations: [Expectation; 7] = [
        (
            "relay_bytes_total",
            vec![("route", "exact"), ("direction", "to_target")],
            to_target as f64,
        ),
        (
            "relay_bytes_total",
            vec![("route", "exact"), ("direction", "to_client")],
            to_client as f64,
        ),
        ("relay_connections_total", route.to_vec(), n),
        ("relay_active_connections", route.to_vec(), 0.0),
        (
            "relay_upstream_connect_duration_seconds_count",
            route.to_vec(),
            n,
        ),
        ("relay_connection_duration_seconds_count", route.to_vec(), n),
        ("relay_build_info", vec![], 1.0),
    ];
    let mismatches: Vec<String> = expectations
        .iter()
        .filter_map(|(name, labels, want)| {
            let got = scrape.value(name, labels);
            (got != Some(*want)).then(|| format!("{name}{labels:?}: expected {want}, got {got:?}"))
        })
        .collect();
    ensure!(
        mismatches.is_empty(),
        "{}\nscrape:\n{}",
        mismatches.join("\n"),
        scrape.text
    );
    Ok(())
}

#[test]
fn metrics_exposition_passes_promtool_check() -> Result<()> {
    require_tool!("promtool");
    let (backend, _rx) = sized_reply_backend()?;
    let relay = RelayCmd::loopback_to(backend.addr())?.spawn()?;
    exchange(&relay, 3)?;
    // A refused connection too, so more than one outcome is exposed.
    let refused_target = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
    let refusing = RelayCmd::loopback_to(refused_target)?.spawn()?;
    let mut client = refusing.connect()?;
    let _ = client.write_all(b"x");
    expect_close(&mut client, Duration::from_secs(5))?;
    refusing.wait_metric(
        "relay_connections_total",
        &[("outcome", "refused")],
        1.0,
        METRIC_TIMEOUT,
    )?;

    for (what, relay) in [
        ("after a closed connection", &relay),
        ("after a refused connection", &refusing),
    ] {
        let scrape = relay.wait_metric("relay_connections_total", &[], 1.0, METRIC_TIMEOUT)?;
        // The default route label is the listen address as written.
        let route = relay.addr().to_string();
        ensure!(
            scrape.value("relay_connections_total", &[("route", &route)]) == Some(1.0),
            "{what}: expected relay_connections_total{{route={route:?}}} == 1 (default route name), scrape:\n{}",
            scrape.text
        );
        promtool_check(&scrape.text)?
            .map_err(|complaints| {
                anyhow!(
                    "{what}: promtool rejects the exposition:\n{complaints}\nscrape:\n{}",
                    scrape.text
                )
            })
            .context("promtool check metrics")?;
    }
    Ok(())
}
