//! Zero-downtime binary upgrade (issue 13): `relay run --upgrade-from
//! SOCKET` takes the listening sockets of the running relay over its
//! handover socket; the old relay stops accepting, drains and exits 0. No
//! connection is refused or reset across the handover, a transfer in
//! flight arrives whole, and a new relay that fails to start leaves the
//! old one serving as before.

use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, ensure};
use nix::sys::signal::Signal;
use relay_tests::config_file::routes_toml;
use relay_tests::load::Load;
use relay_tests::peers::{self, Backend, EchoServer, round_trip};
use relay_tests::ports::{free_port, free_ports, loopback};
use relay_tests::tempdir::TempDir;
use relay_tests::{Payload, Relay, RelayCmd};

/// Long enough for an old relay to drain a transfer paced over seconds.
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

/// A `relay run` config: the handover socket at `socket`, and `routes`.
fn write_config(path: &Path, socket: &Path, routes: &[(&str, u16, String)]) -> Result<()> {
    let text = format!(
        "[upgrade]\nsocket = \"{}\"\n\n{}",
        socket.display(),
        routes_toml(routes, "")
    );
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// `relay run -c <file>` serving metrics at `metrics`, replacing the relay
/// on `from` when given.
fn start(file: &Path, metrics: SocketAddr, from: Option<&Path>) -> Result<Relay> {
    let mut args = vec![
        "run".to_string(),
        "-c".to_string(),
        file.display().to_string(),
    ];
    if let Some(from) = from {
        args.extend(["--upgrade-from".to_string(), from.display().to_string()]);
    }
    RelayCmd::raw(&args).with_metrics_on(metrics).spawn()
}

/// The (device, inode) of the socket file at `path`: which relay's it is.
fn socket_file(path: &Path) -> Result<(u64, u64)> {
    let meta = std::fs::symlink_metadata(path)
        .with_context(|| format!("no file at {}", path.display()))?;
    ensure!(
        meta.file_type().is_socket(),
        "{} is not a socket",
        path.display()
    );
    Ok((meta.dev(), meta.ino()))
}

/// Waits for `old` to exit after a handover, and checks it exited 0.
fn drained_and_exited(old: &mut Relay, generation: usize) -> Result<()> {
    let status = old.wait_exit(EXIT_TIMEOUT)?;
    ensure!(
        status.success(),
        "generation {generation}: the old relay should exit 0 after draining, got {status}; stderr:\n{}",
        old.stderr()
    );
    ensure!(
        old.stderr().contains("the new relay serves"),
        "generation {generation}: the old relay should log the handover; stderr:\n{}",
        old.stderr()
    );
    Ok(())
}

/// Under about 1,000 connections a second through two routes, with a
/// paced transfer in flight on a third, the relay is replaced twice (the
/// same binary standing in for a new one): nothing is refused or reset,
/// the transfer arrives whole through the relay that drains it, each old
/// relay exits 0, and the last one serves routes, metrics and the
/// handover socket at the same path.
#[test]
fn an_upgrade_under_load_refuses_and_resets_nothing() -> Result<()> {
    let echo = EchoServer::start()?;
    let slow = Payload::new(13, 8 << 20);
    let sender = Backend::start(move |mut conn| {
        let _ = slow.write_paced(&mut conn, Some(Duration::from_millis(15)));
    })?;
    let dir = TempDir::new("relay-upgrade")?;
    let (file, socket) = (dir.join("relay.toml"), dir.join("upgrade.sock"));
    let [a, b, long] = free_ports(3)?[..] else {
        unreachable!("free_ports(3) returns three ports")
    };
    write_config(
        &file,
        &socket,
        &[
            ("a", a, echo.addr().to_string()),
            ("b", b, echo.addr().to_string()),
            ("long", long, sender.addr().to_string()),
        ],
    )?;
    let metrics = loopback(free_port()?);
    let mut running = start(&file, metrics, None)?;
    let first_socket = socket_file(&socket)?;

    // A transfer in flight through the first relay, which must drain it.
    let mut transfer = peers::connect(loopback(long))?;
    transfer.set_read_timeout(Some(Duration::from_secs(60)))?;
    let reader = std::thread::spawn(move || relay_tests::payload::read_fingerprint(&mut transfer));
    let load = Load::start(&[a, b], 1000)?;
    for generation in 1..=2 {
        // Pacing only: let the load run on the relay about to be replaced.
        std::thread::sleep(Duration::from_millis(300));
        let next = start(&file, metrics, Some(&socket))?;
        let mut old = std::mem::replace(&mut running, next);
        drained_and_exited(&mut old, generation)?;
    }
    std::thread::sleep(Duration::from_millis(300));
    let report = load.stop()?;
    eprintln!(
        "{} connections in {:?} ({:.0}/s) across two upgrades",
        report.tally.served,
        report.elapsed,
        report.per_second()
    );
    report.ensure_clean("two upgrades")?;

    let heard = reader
        .join()
        .map_err(|_| anyhow!("the long transfer's reader panicked"))?
        .context("the transfer in flight across the upgrade")?;
    ensure!(
        heard == slow.fingerprint(),
        "a transfer in flight across the upgrade: expected {}, got {heard}",
        slow.fingerprint()
    );

    // The last relay serves: routes, metrics, and a handover socket of its
    // own at the same path (the first relay's is gone).
    let mut client = peers::connect(loopback(a))?;
    round_trip(&mut client, b"through the relay that took over")?;
    drop(client);
    let served = running
        .scrape()?
        .counter("relay_connections_total", &[("route", "a")]);
    ensure!(
        served > 0.0,
        "the last relay's /metrics should count the connections it served on route a, got {served}"
    );
    let last_socket = socket_file(&socket)?;
    ensure!(
        last_socket != first_socket,
        "the handover socket at {} should be the new relay's, not the first one's",
        socket.display()
    );
    let beside = PathBuf::from(format!("{}.new", socket.display()));
    ensure!(
        !beside.exists(),
        "the new relay's socket should have moved from {} onto the path",
        beside.display()
    );
    running.signal(Signal::SIGTERM)?;
    let status = running.wait_exit(EXIT_TIMEOUT)?;
    ensure!(
        status.success(),
        "the last relay: expected exit 0, got {status}"
    );
    ensure!(
        !socket.exists(),
        "the handover socket should be removed when the relay exits"
    );
    Ok(())
}

/// A new relay with a bad config file exits 2 before touching anything; one
/// that cannot bind a route after receiving the sockets exits 1. Either way
/// the old relay keeps serving with the same handover socket, and a later
/// upgrade still works.
#[test]
fn a_new_relay_that_fails_leaves_the_old_one_serving() -> Result<()> {
    let echo = EchoServer::start()?;
    let dir = TempDir::new("relay-upgrade")?;
    let (file, socket) = (dir.join("relay.toml"), dir.join("upgrade.sock"));
    let [a, taken_port] = free_ports(2)?[..] else {
        unreachable!("free_ports(2) returns two ports")
    };
    write_config(&file, &socket, &[("a", a, echo.addr().to_string())])?;
    let metrics = loopback(free_port()?);
    let mut old = start(&file, metrics, None)?;
    let served_by_old = socket_file(&socket)?;
    let load = Load::start(&[a], 500)?;

    let bad: PathBuf = dir.join("bad.toml");
    std::fs::write(&bad, "[[route]]\nlisten = \"127.0.0.1:1\"\n")?;
    let socket_arg = socket.display().to_string();
    RelayCmd::raw(&[
        "run",
        "-c",
        &bad.display().to_string(),
        "--upgrade-from",
        &socket_arg,
    ])
    .expect_usage_error(EXIT_TIMEOUT, &["bad.toml", "target"])?;

    // A valid file with a route on a port another process holds: the new
    // relay receives the sockets, fails to bind, and exits.
    let holder = TcpListener::bind(loopback(taken_port))?;
    let conflict = dir.join("conflict.toml");
    write_config(
        &conflict,
        &socket,
        &[
            ("a", a, echo.addr().to_string()),
            ("taken", taken_port, echo.addr().to_string()),
        ],
    )?;
    let exited = RelayCmd::raw(&[
        "run",
        "-c",
        &conflict.display().to_string(),
        "--upgrade-from",
        &socket_arg,
        "--metrics",
        &metrics.to_string(),
    ])
    .run_to_exit(EXIT_TIMEOUT)?;
    ensure!(
        exited.status.code() == Some(1) && exited.stderr.contains("cannot listen on"),
        "a new relay that cannot bind: expected exit 1 naming the bind, got {} with stderr:\n{}",
        exited.status,
        exited.stderr
    );
    drop(holder);
    relay_tests::wait::poll_until(
        "the old relay to log the abandoned upgrade",
        Duration::from_secs(10),
        || Ok(old.stderr().contains("upgrade abandoned").then_some(())),
    )?;

    // Untouched: still running, still serving, its handover socket the same.
    ensure!(
        old.wait_exit(Duration::ZERO).is_err(),
        "the old relay must keep running after failed upgrades"
    );
    let mut client = peers::connect(loopback(a))?;
    round_trip(&mut client, b"the old relay still serves")?;
    drop(client);
    ensure!(
        socket_file(&socket)? == served_by_old,
        "the old relay's handover socket should be untouched"
    );
    ensure!(old.scrape().is_ok(), "the old relay still serves /metrics");

    // And it can still be upgraded.
    let mut new = start(&file, metrics, Some(&socket))?;
    drained_and_exited(&mut old, 1)?;
    let report = load.stop()?;
    report.ensure_clean("two failed upgrades and a good one")?;
    new.signal(Signal::SIGTERM)?;
    ensure!(
        new.wait_exit(EXIT_TIMEOUT)?.success(),
        "the new relay: exit 0"
    );
    Ok(())
}
