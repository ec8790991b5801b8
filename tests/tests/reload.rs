//! Reloading a running `relay run -c`: a diff, never a restart (issue 13).
//! Unchanged routes keep their socket and connections, a changed route
//! serves new connections with its new settings while open ones finish,
//! a removed route drains and its port refuses; an invalid file or a bind
//! conflict changes nothing and says why in `relay_config_reloads_total`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, ensure};
use nix::sys::signal::Signal;
use relay_tests::config_file::write_routes;
use relay_tests::load::Load;
use relay_tests::peers::{self, Backend, EchoServer, round_trip};
use relay_tests::ports::{free_ports as ports, loopback, refuses};
use relay_tests::tempdir::TempDir;
use relay_tests::{Payload, Relay, RelayCmd};

const METRIC_TIMEOUT: Duration = Duration::from_secs(10);

fn run(path: &Path) -> Result<Relay> {
    RelayCmd::raw(&["run", "-c", &path.to_string_lossy()])
        .with_metrics()?
        .spawn()
}

fn reloaded(relay: &Relay, outcome: &str, count: f64) -> Result<()> {
    relay
        .wait_metric(
            "relay_config_reloads_total",
            &[("outcome", outcome)],
            count,
            METRIC_TIMEOUT,
        )
        .map(drop)
}

/// SIGHUP with a changed file: the changed route's new connections reach
/// its new target while a transfer begun before the reload arrives whole;
/// the removed route's port refuses and its series are gone; the added
/// route serves.
#[test]
fn sighup_applies_a_changed_file_as_a_diff() -> Result<()> {
    let (old_target, new_target) = (EchoServer::start()?, EchoServer::start()?);
    let slow = Payload::new(77, 8 << 20);
    let sender = Backend::start(move |mut conn| {
        let _ = slow.write_paced(&mut conn, Some(Duration::from_millis(5)));
    })?;
    let dir = TempDir::new("relay-reload")?;
    let file = dir.join("relay.toml");
    let [a, b, c, long] = ports(4)?[..] else {
        unreachable!("ports(4) returns four ports")
    };
    write_routes(
        &file,
        &[
            ("a", a, old_target.addr().to_string()),
            ("b", b, old_target.addr().to_string()),
            ("long", long, sender.addr().to_string()),
        ],
        "",
    )?;
    let relay = run(&file)?;
    let mut before = peers::connect(loopback(a))?;
    round_trip(&mut before, b"before the reload")?;
    // A transfer in flight on a route that changes.
    let mut transfer = peers::connect(loopback(long))?;
    transfer.set_read_timeout(Some(Duration::from_secs(30)))?;
    let reader = std::thread::spawn(move || relay_tests::payload::read_fingerprint(&mut transfer));

    write_routes(
        &file,
        &[
            ("a", a, new_target.addr().to_string()),
            ("c", c, old_target.addr().to_string()),
            ("long", long, sender.addr().to_string()),
        ],
        "idle-timeout = \"5m\"",
    )?;
    relay.signal(Signal::SIGHUP)?;
    reloaded(&relay, "ok", 1.0)?;

    let accepted = new_target.accepted();
    let mut after = peers::connect(loopback(a))?;
    round_trip(&mut after, b"after the reload")?;
    ensure!(
        new_target.accepted() == accepted + 1,
        "a changed route: expected a new connection to reach the new target"
    );
    round_trip(&mut before, b"the old connection still works")?;
    let mut added = peers::connect(loopback(c))?;
    round_trip(&mut added, b"an added route")?;
    relay_tests::wait::poll_until("the removed route's port to refuse", METRIC_TIMEOUT, || {
        Ok(refuses(b).then_some(()))
    })?;
    let heard = reader
        .join()
        .map_err(|_| anyhow!("the long transfer's reader panicked"))?
        .context("the transfer in flight across the reload")?;
    ensure!(
        heard == slow.fingerprint(),
        "a transfer in flight across the reload: expected {}, got {heard}",
        slow.fingerprint()
    );
    let scrape = relay.scrape()?;
    ensure!(
        scrape
            .matching("relay_connections_total", &[("route", "b")])
            .count()
            == 0,
        "a removed route's series should be gone"
    );
    ensure!(
        scrape.matching("relay_config_info", &[]).count() == 1,
        "expected one relay_config_info series"
    );
    Ok(())
}

/// A file that does not validate, and one whose new listener cannot bind:
/// everything keeps running as it was, and the outcome says why.
#[test]
fn an_invalid_file_or_a_bind_conflict_changes_nothing() -> Result<()> {
    let echo = EchoServer::start()?;
    let dir = TempDir::new("relay-reload")?;
    let file = dir.join("relay.toml");
    let [a, b] = ports(2)?[..] else {
        unreachable!("ports(2) returns two ports")
    };
    write_routes(&file, &[("a", a, echo.addr().to_string())], "")?;
    let relay = run(&file)?;
    let hash = |relay: &Relay| -> Result<String> {
        let scrape = relay.scrape()?;
        scrape
            .matching("relay_config_info", &[])
            .next()
            .and_then(|s| s.labels.get("hash").cloned())
            .context("no relay_config_info")
    };
    let running = hash(&relay)?;

    std::fs::write(&file, "[[route]]\nlisten = \"127.0.0.1:1\"\n")?;
    relay.signal(Signal::SIGHUP)?;
    reloaded(&relay, "invalid", 1.0)?;

    // Another process holds b: the new route cannot bind, so route a's
    // change (a new target) must not happen either.
    let taken = TcpListener::bind(loopback(b))?;
    let other = EchoServer::start()?;
    write_routes(
        &file,
        &[
            ("a", a, other.addr().to_string()),
            ("b", b, echo.addr().to_string()),
        ],
        "",
    )?;
    relay.signal(Signal::SIGHUP)?;
    reloaded(&relay, "bind_failed", 1.0)?;
    drop(taken);

    let mut client = peers::connect(loopback(a))?;
    round_trip(&mut client, b"still the old route")?;
    ensure!(
        other.accepted() == 0 && echo.accepted() == 1,
        "after a failed reload route a must still go to its old target"
    );
    ensure!(
        hash(&relay)? == running,
        "after failed reloads relay_config_info must still name the running file"
    );
    ensure!(
        relay.stderr().contains("route[0].target: missing field")
            || relay.stderr().contains("missing field `target`"),
        "the invalid reload should be logged with its place:\n{}",
        relay.stderr()
    );
    Ok(())
}

/// Reloads under load: while clients keep opening connections through a
/// route that stays and one that changes, and 1 GiB is echoed through the
/// one that changes, 20 reloads add, change and remove routes; not one
/// connection is refused or reset, and the long transfer arrives intact
/// (it finishes on the settings it started with).
#[test]
fn twenty_reloads_under_load_refuse_and_reset_nothing() -> Result<()> {
    let (echo, other) = (EchoServer::start()?, EchoServer::start()?);
    let dir = TempDir::new("relay-reload")?;
    let file = dir.join("relay.toml");
    let [stays, changes, comes_and_goes] = ports(3)?[..] else {
        unreachable!("ports(3) returns three ports")
    };
    // "stays" is the same in every round; "changes" gets another target
    // and connect timeout each round; "comes-and-goes" is added and removed.
    let spec = |round: usize| -> Vec<(&'static str, u16, String)> {
        let target = if round.is_multiple_of(2) {
            echo.addr()
        } else {
            other.addr()
        };
        let mut routes = vec![
            ("stays", stays, echo.addr().to_string()),
            (
                "changes",
                changes,
                format!("TCP:{target},connect-timeout={}", 5 + round),
            ),
        ];
        if round % 3 == 1 {
            routes.push(("comes-and-goes", comes_and_goes, echo.addr().to_string()));
        }
        routes
    };
    write_routes(&file, &spec(0), "")?;
    let relay = run(&file)?;

    // Paced so that it spans the reloads (1 GiB in 16,389 chunks, about
    // 0.5 ms each at the least): it must still be in flight after the first.
    let long = Payload::new(20, 1 << 30);
    let expected = long.fingerprint();
    let reloads_done = Arc::new(AtomicU64::new(0));
    let transfer = {
        let client = peers::connect(loopback(changes))?;
        let reloads_done = reloads_done.clone();
        std::thread::spawn(move || -> Result<(relay_tests::Fingerprint, u64)> {
            let heard = peers::echo_payload_paced(client, long, Some(Duration::from_micros(300)))
                .context("the 1 GiB transfer through the changing route")?;
            Ok((heard, reloads_done.load(Ordering::SeqCst)))
        })
    };

    // About 1,000 connections a second through the two routes that exist
    // throughout, each with a checked payload.
    let load = Load::start(&[stays, changes], 1000)?;
    for round in 1..=20 {
        std::thread::sleep(Duration::from_millis(150));
        write_routes(&file, &spec(round), "")?;
        relay.signal(Signal::SIGHUP)?;
        reloaded(&relay, "ok", round as f64)?;
        reloads_done.store(round as u64, Ordering::SeqCst);
    }
    std::thread::sleep(Duration::from_millis(200));
    let report = load.stop()?;
    eprintln!(
        "{} connections in {:?} ({:.0}/s) across 20 reloads",
        report.tally.served,
        report.elapsed,
        report.per_second()
    );
    report.ensure_clean("20 reloads")?;
    let (heard, reloads_before_end) = transfer
        .join()
        .map_err(|_| anyhow!("the long transfer's thread panicked"))??;
    ensure!(
        heard == expected,
        "the 1 GiB echoed through the changing route came back as {heard:?}, expected {expected:?}"
    );
    ensure!(
        reloads_before_end >= 1,
        "the long transfer finished before the first reload, so it tested nothing; pace it slower"
    );
    eprintln!(
        "the 1 GiB transfer stayed in flight across {reloads_before_end} reloads and arrived intact"
    );
    // Round 20 has no comes-and-goes (20 % 3 == 2): its port refuses.
    relay_tests::wait::poll_until("the removed route's port to refuse", METRIC_TIMEOUT, || {
        Ok(refuses(comes_and_goes).then_some(()))
    })?;
    Ok(())
}

/// `--watch-config` reloads when the file changes, without a signal.
#[test]
fn watch_config_reloads_when_the_file_changes() -> Result<()> {
    let echo = EchoServer::start()?;
    let dir = TempDir::new("relay-reload")?;
    let file: PathBuf = dir.join("relay.toml");
    let [a, b] = ports(2)?[..] else {
        unreachable!("ports(2) returns two ports")
    };
    write_routes(&file, &[("a", a, echo.addr().to_string())], "")?;
    let relay = RelayCmd::raw(&["run", "-c", &file.to_string_lossy(), "--watch-config"])
        .with_metrics()?
        .spawn()?;
    // Modification times can be coarse: make the change visibly later.
    std::thread::sleep(Duration::from_millis(1100));
    write_routes(
        &file,
        &[
            ("a", a, echo.addr().to_string()),
            ("b", b, echo.addr().to_string()),
        ],
        "",
    )?;
    reloaded(&relay, "ok", 1.0)?;
    let mut client = peers::connect(loopback(b))?;
    round_trip(&mut client, b"a route added by editing the file")?;
    Ok(())
}

/// A route renamed on the same address takes the socket over (no bind
/// conflict with itself), and an observer whose options change is
/// re-attached without leaving `/healthz` waiting on the old one.
#[test]
fn a_renamed_route_and_a_changed_observer_reload_cleanly() -> Result<()> {
    relay_tests::require_root!("attaches an eBPF observer in a test namespace");
    let echo = EchoServer::start()?;
    let ns = relay_tests::NetNs::create()?;
    let dir = TempDir::new("relay-reload")?;
    let file = dir.join("relay.toml");
    let [a] = ports(1)?[..] else {
        unreachable!("ports(1) returns one port")
    };
    let observer = |top: usize| {
        format!(
            "[[observe]]\ntarget = \"netns:{}\"\ntop-flows = {top}\n",
            ns.name()
        )
    };
    write_routes(&file, &[("a", a, echo.addr().to_string())], "")?;
    std::fs::write(&file, std::fs::read_to_string(&file)? + &observer(10))?;
    let relay = run(&file)?;
    let healthz = |relay: &Relay| -> Result<u16> {
        let addr = relay.metrics_addr().context("metrics address")?;
        Ok(relay_tests::http::get(peers::connect(addr)?, &addr.to_string(), "/healthz")?.status)
    };
    ensure!(healthz(&relay)? == 200, "ready before the reload");

    write_routes(&file, &[("renamed", a, echo.addr().to_string())], "")?;
    std::fs::write(&file, std::fs::read_to_string(&file)? + &observer(11))?;
    relay.signal(Signal::SIGHUP)?;
    reloaded(&relay, "ok", 1.0)?;
    let mut client = peers::connect(loopback(a))?;
    round_trip(&mut client, b"through the renamed route")?;
    relay_tests::wait::poll_until(
        "/healthz to answer 200 after the reload",
        METRIC_TIMEOUT,
        || Ok((healthz(&relay)? == 200).then_some(())),
    )?;
    let scrape = relay.scrape()?;
    ensure!(
        scrape.value("relay_config_reloads_total", &[("outcome", "bind_failed")]) == Some(0.0),
        "renaming a route must not collide with its own socket"
    );
    Ok(())
}
