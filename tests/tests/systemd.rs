//! relay as a systemd service (issue 13): socket activation and `Type=notify`
//! readiness, against the real thing where this machine has it.
//!
//! Sockets are passed by Debian's `systemd-socket-activate`, which listens,
//! waits for the first connection, then execs relay with the listening
//! sockets as `LISTEN_FDS`/`LISTEN_FDNAMES`, exactly as a `.socket` unit
//! does. Notifications go to a unix datagram socket the test binds and
//! names in `NOTIFY_SOCKET`, read as systemd reads them.
//!
//! Not here: a real transient unit (`systemd-run`). It needs systemd as
//! PID 1, which these test machines do not run; `deploy.rs` checks the
//! units with `systemd-analyze verify` instead.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use nix::sys::signal::Signal;
use relay_tests::notify::NotifySocket;
use relay_tests::peers::{self, EchoServer, echo_payload, round_trip};
use relay_tests::ports::{free_port, listeners_on, wait_listening};
use relay_tests::relay_proc::relay_bin;
use relay_tests::tempdir::TempDir;
use relay_tests::{Payload, Relay, RelayCmd, require_tool};

const TIMEOUT: Duration = Duration::from_secs(10);

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// A config file with one route `web` from `listen` to `target`, taking
/// the passed socket `socket` when given.
fn write_route(
    path: &Path,
    listen: SocketAddr,
    socket: Option<&str>,
    target: SocketAddr,
) -> Result<()> {
    let socket = socket.map_or(String::new(), |s| format!("socket = \"{s}\"\n"));
    std::fs::write(
        path,
        format!(
            "[[route]]\nname = \"web\"\nlisten = \"{listen}\"\n{socket}target = \"{target}\"\n"
        ),
    )
    .with_context(|| format!("writing {}", path.display()))
}

fn run_command(file: &Path) -> RelayCmd {
    RelayCmd::raw(&["run", "-c", &file.to_string_lossy()])
}

/// The program `pid` runs now.
fn program(pid: u32) -> Result<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .with_context(|| format!("reading /proc/{pid}/exe"))
}

/// A relay under `systemd-socket-activate` with the `web` socket at
/// `listen` (and `spare`, which no route takes, at a second port), not yet
/// started: only the activator listens.
fn activated(file: &Path, listen: SocketAddr, spare: SocketAddr) -> Result<Relay> {
    let relay = run_command(file)
        .with_metrics()?
        .socket_activated(&[(listen, "web"), (spare, "spare")])
        .spawn()?;
    let waiting = program(relay.pid())?;
    ensure!(
        waiting.ends_with("systemd-socket-activate"),
        "before the first connection the activator should wait, not relay; pid {} runs {}",
        relay.pid(),
        waiting.display()
    );
    Ok(relay)
}

/// Socket activation's point: a client that connects before relay even
/// runs is held in the passed socket's backlog and served once relay
/// starts, its bytes intact.
#[test]
fn a_connection_made_before_relay_runs_is_queued_and_served_whole() -> Result<()> {
    require_tool!("systemd-socket-activate");
    let echo = EchoServer::start()?;
    let dir = TempDir::new("socket-activation")?;
    let file = dir.join("relay.toml");
    let (listen, spare) = (loopback(free_port()?), loopback(free_port()?));
    write_route(&file, listen, Some("web"), echo.addr())?;
    let relay = activated(&file, listen, spare)?;

    // relay is not running yet (checked above): this connection waits in
    // the backlog of the socket the activator made.
    let client = peers::connect(listen)?;
    let payload = Payload::new(2024, 4 << 20);
    let heard = echo_payload(client, payload)?;
    ensure!(
        heard == payload.fingerprint(),
        "through a passed socket: expected {}, got {heard}",
        payload.fingerprint()
    );
    let running = program(relay.pid())?;
    ensure!(
        running == relay_bin()?.canonicalize()?,
        "the activator should have become relay; pid {} runs {}",
        relay.pid(),
        running.display()
    );
    // relay took the socket instead of binding one beside it.
    let listeners = listeners_on(relay.pid(), listen.port())?;
    ensure!(
        listeners.len() == 1,
        "expected the one passed socket on port {}, found {listeners:?}",
        listen.port()
    );
    let metrics = relay.metrics_addr().context("started with metrics")?;
    wait_listening(relay.pid(), metrics.port(), TIMEOUT)?;
    let log = relay.stderr();
    ensure!(
        log.contains("systemd passed socket `spare`, but no route takes it"),
        "a passed socket no route takes should be logged; log:\n{log}"
    );
    Ok(())
}

/// A reload that changes the route keeps the passed socket: the change
/// applies to new connections (on the same socket; a bind beside
/// the activator's would fail and refuse the reload) while one opened
/// before it goes on.
#[test]
fn a_reload_keeps_the_passed_socket() -> Result<()> {
    require_tool!("systemd-socket-activate");
    let (old_target, new_target) = (EchoServer::start()?, EchoServer::start()?);
    let dir = TempDir::new("socket-reload")?;
    let file = dir.join("relay.toml");
    let (listen, spare) = (loopback(free_port()?), loopback(free_port()?));
    write_route(&file, listen, Some("web"), old_target.addr())?;
    let relay = activated(&file, listen, spare)?;
    let mut before = peers::connect(listen)?;
    round_trip(&mut before, b"before the reload")?;
    let metrics = relay.metrics_addr().context("started with metrics")?;
    wait_listening(relay.pid(), metrics.port(), TIMEOUT)?;

    write_route(&file, listen, Some("web"), new_target.addr())?;
    relay.signal(Signal::SIGHUP)?;
    relay.wait_metric(
        "relay_config_reloads_total",
        &[("outcome", "ok")],
        1.0,
        TIMEOUT,
    )?;
    let scrape = relay.scrape()?;
    ensure!(
        scrape.counter("relay_config_reloads_total", &[("outcome", "bind_failed")]) == 0.0,
        "the reload should take the passed socket, not bind:\n{}",
        scrape.text
    );

    let mut after = peers::connect(listen)?;
    round_trip(&mut after, b"after the reload")?;
    ensure!(
        new_target.accepted() == 1,
        "a new connection after the reload should reach the new target (it saw {})",
        new_target.accepted()
    );
    round_trip(&mut before, b"the connection from before goes on")?;
    let listeners = listeners_on(relay.pid(), listen.port())?;
    ensure!(
        listeners.len() == 1,
        "expected the one passed socket on port {} after the reload, found {listeners:?}",
        listen.port()
    );
    Ok(())
}

/// A route naming a socket that systemd did not pass fails the start
/// (exit 1), saying which name it wanted and which were passed.
#[test]
fn a_route_naming_a_socket_not_passed_exits_1_saying_what_was() -> Result<()> {
    require_tool!("systemd-socket-activate");
    let echo = EchoServer::start()?;
    let dir = TempDir::new("socket-missing")?;
    let file = dir.join("relay.toml");
    let listen = loopback(free_port()?);
    write_route(&file, listen, Some("web"), echo.addr())?;
    let mut relay = run_command(&file)
        .socket_activated(&[(listen, "admin")])
        .spawn()?;
    // Starts relay; what becomes of this connection does not matter.
    let _trigger = peers::connect(listen)?;
    let status = relay.wait_exit(TIMEOUT)?;
    let log = relay.stderr();
    ensure!(
        status.code() == Some(1),
        "expected exit 1, got {status}; log:\n{log}"
    );
    ensure!(
        log.contains("route web takes socket `web`, which was not passed (passed: `admin`)"),
        "the error should name the socket asked for and those passed; log:\n{log}"
    );

    // Not started by systemd at all: the error says nothing was passed.
    let exited = run_command(&file).run_to_exit(TIMEOUT)?;
    ensure!(
        exited.status.code() == Some(1)
            && exited
                .stderr
                .contains("no sockets were passed: LISTEN_FDS is unset"),
        "without LISTEN_FDS: expected exit 1 saying so, got {}:\n{}",
        exited.status,
        exited.stderr
    );
    Ok(())
}

/// CLOCK_MONOTONIC in microseconds, as MONOTONIC_USEC= carries it.
fn monotonic_usec() -> Result<u64> {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec for the call to fill.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    ensure!(
        rc == 0,
        "clock_gettime: {}",
        std::io::Error::last_os_error()
    );
    Ok(now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1_000)
}

/// `Type=notify`: READY=1 once the route listens; RELOADING=1 (with
/// MONOTONIC_USEC=) then READY=1 around each SIGHUP, with STATUS= saying
/// how it went (a refused reload too); STOPPING=1 when SIGTERM begins the
/// drain.
#[test]
fn notify_says_ready_reloading_ready_and_stopping() -> Result<()> {
    let notify = NotifySocket::bind()?;
    let echo = EchoServer::start()?;
    let dir = TempDir::new("notify")?;
    let file = dir.join("relay.toml");
    let listen = loopback(free_port()?);
    write_route(&file, listen, None, echo.addr())?;
    let mut relay = run_command(&file)
        .with_metrics()?
        .env("NOTIFY_SOCKET", notify.path())
        .spawn()?;

    let ready = notify.expect("READY", "1")?;
    ensure!(
        ready.get("STATUS") == Some("serving 1 routes, 0 observers"),
        "READY=1 should say what serves: {:?}",
        ready.0
    );
    round_trip(&mut peers::connect(listen)?, b"ready means serving")?;

    let asked = monotonic_usec()?;
    relay.signal(Signal::SIGHUP)?;
    let reloading = notify.expect("RELOADING", "1")?;
    let stamp: u64 = reloading
        .get("MONOTONIC_USEC")
        .with_context(|| format!("RELOADING=1 without MONOTONIC_USEC=: {:?}", reloading.0))?
        .parse()
        .context("MONOTONIC_USEC= is not a number")?;
    let heard = monotonic_usec()?;
    ensure!(
        asked <= stamp && stamp <= heard,
        "MONOTONIC_USEC={stamp} should be the monotonic clock between SIGHUP ({asked}) and its notification ({heard})"
    );
    let reloaded = notify.expect("READY", "1")?;
    ensure!(
        reloaded.get("STATUS") == Some("reloaded; serving 1 routes, 0 observers"),
        "READY=1 after a reload should say it reloaded: {:?}",
        reloaded.0
    );

    std::fs::write(&file, "[[route]]\nlisten = \"nowhere\"\n")?;
    relay.signal(Signal::SIGHUP)?;
    notify.expect("RELOADING", "1")?;
    let refused = notify.expect("READY", "1")?;
    ensure!(
        refused
            .get("STATUS")
            .is_some_and(|s| s.starts_with("reload refused: the file is invalid")),
        "READY=1 after a refused reload should say so: {:?}",
        refused.0
    );
    round_trip(&mut peers::connect(listen)?, b"the running config stays")?;

    relay.signal(Signal::SIGTERM)?;
    let stopping = notify.expect("STOPPING", "1")?;
    ensure!(
        stopping.get("STATUS") == Some("SIGTERM: draining open connections"),
        "STOPPING=1 should say why: {:?}",
        stopping.0
    );
    let status = relay.wait_exit(TIMEOUT)?;
    ensure!(status.success(), "a drained relay exits 0, got {status}");
    Ok(())
}
