//! relay's life as a process: bad command lines, a busy address, running
//! out of file descriptors, and shutting down on a signal (drain, drain
//! timeout, second signal).

use std::io::Read;
use std::net::{Ipv4Addr, TcpListener};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use nix::sys::signal::Signal;
use relay_tests::payload::read_fingerprint;
use relay_tests::peers::{Backend, EchoServer, expect_close, round_trip};
use relay_tests::ports::{free_port, wait_not_listening};
use relay_tests::relay_proc::json_log_lines_with;
use relay_tests::wait::poll_until;
use relay_tests::{Payload, RelayCmd};

/// How long a relay that should exit by itself may take.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// "At once" for closing the listener after a signal: instant in practice,
/// with room for a loaded 2-core machine.
const LISTENER_CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

// ---------------------------------------------------------- command line

/// A command line relay must refuse: the exit code and a token stderr names.
struct Refusal {
    args: Vec<String>,
    code: i32,
    names: String,
}

fn refusal<S: ToString>(args: &[S], code: i32, names: impl ToString) -> Refusal {
    Refusal {
        args: args.iter().map(S::to_string).collect(),
        code,
        names: names.to_string(),
    }
}

/// Run every case (relay must exit by itself); fail listing all mismatches.
fn expect_refusals(cases: &[Refusal]) -> Result<()> {
    let mut failures = Vec::new();
    for case in cases {
        let exited = RelayCmd::raw(&case.args).run_to_exit(EXIT_TIMEOUT)?;
        let code = exited.status.code();
        if code != Some(case.code) || !exited.stderr.contains(&case.names) {
            failures.push(format!(
                "relay {}: expected exit code {} and stderr naming {:?}; got {code:?} and stderr:\n{}",
                case.args.join(" "),
                case.code,
                case.names,
                exited.stderr.trim_end()
            ));
        }
    }
    ensure!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
    Ok(())
}

#[test]
fn malformed_arguments_exit_2_naming_the_offending_token() -> Result<()> {
    let listen = format!("127.0.0.1:{}", free_port()?);
    let socat_listen = format!("TCP-LISTEN:{},bind=127.0.0.1", free_port()?);
    expect_refusals(&[
        refusal(&["TCP-LISTEN:notaport", "TCP:127.0.0.1:1"], 2, "notaport"),
        refusal(&[&socat_listen, "TCP:host"], 2, "TCP:host"),
        refusal(&["TCP-LISTEN:80,bogus=1", "TCP:127.0.0.1:1"], 2, "bogus"),
        refusal(
            &[&socat_listen, "TCP:127.0.0.1:1,frobnicate"],
            2,
            "frobnicate",
        ),
        refusal(&["forward", "foo://x:1", "127.0.0.1:1"], 2, "foo://x:1"),
        refusal(&["forward", "[::1:80", "127.0.0.1:1"], 2, "[::1:80"),
        refusal(&["forward", "127.0.0.1:70000", "127.0.0.1:1"], 2, "70000"),
        refusal(
            &[
                "forward",
                &listen,
                "127.0.0.1:1",
                "--idle-timeout",
                "banana",
            ],
            2,
            "banana",
        ),
        refusal(
            &["forward", &listen, "127.0.0.1:1", "--bogus-flag"],
            2,
            "--bogus-flag",
        ),
        refusal(
            &["TCP-LISTEN:80,,fork", "TCP:127.0.0.1:1"],
            2,
            "an empty option",
        ),
        refusal(&[&socat_listen, "TCP:127.0.0.1:1,"], 2, "an empty option"),
        // A listen address is an address of this host, never a DNS lookup.
        refusal(
            &["TCP-LISTEN:80,bind=notanip", "TCP:127.0.0.1:1"],
            2,
            "`bind=notanip`",
        ),
        refusal(
            &["forward", "notanip.invalid:80", "127.0.0.1:1"],
            2,
            "notanip.invalid:80",
        ),
        refusal(
            &[
                "forward",
                &listen,
                "127.0.0.1:1",
                "--drain-timeout",
                "18446744073709551616",
            ],
            2,
            "`18446744073709551616` is too long",
        ),
        refusal(
            &["forward", &listen, "127.0.0.1:1", "--idle-timeout", "0"],
            2,
            "write `none`",
        ),
    ])
}

/// Idle connections are closed after ten minutes unless told otherwise,
/// so that vanished clients cannot hold every connection slot for ever.
#[test]
fn idle_timeout_has_a_default_and_can_be_turned_off() -> Result<()> {
    let help = RelayCmd::raw(&["forward", "--help"]).run_to_exit(EXIT_TIMEOUT)?;
    // The harness logs stdout and stderr together.
    let line = help
        .stderr
        .lines()
        .skip_while(|l| !l.contains("--idle-timeout"))
        .take(5)
        .collect::<Vec<_>>()
        .join("\n");
    ensure!(
        line.contains("[default: 10m]") && line.contains("none"),
        "expected --idle-timeout to document its 10m default and `none`, got:\n{line}"
    );
    let echo = EchoServer::start()?;
    let relay = RelayCmd::loopback_to(echo.addr())?
        .opts(&["--idle-timeout", "none"])
        .spawn()?;
    let mut client = relay.connect()?;
    round_trip(&mut client, b"no idle timeout")?;
    Ok(())
}

/// socat address keywords relay does not implement are unknown keywords
/// (exit 2), not host names to resolve.
#[test]
fn unsupported_socat_keyword_exits_2_naming_it() -> Result<()> {
    let socat_listen = format!("TCP-LISTEN:{},bind=127.0.0.1", free_port()?);
    expect_refusals(&[
        refusal(&["SCTP-LISTEN:5353", "TCP:127.0.0.1:1"], 2, "SCTP-LISTEN"),
        refusal(&[&socat_listen, "SOCKS5-LISTEN:1080"], 2, "SOCKS5-LISTEN"),
        refusal(&[&socat_listen, "FD:3"], 2, "FD"),
        refusal(
            &[&socat_listen, "UNIX-SENDTO:/run/relay-test.sock"],
            2,
            "UNIX-SENDTO",
        ),
    ])
}

#[test]
fn busy_listen_address_exits_1_naming_the_address() -> Result<()> {
    let taken = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let addr = taken.local_addr()?;
    let socat_listen = format!("TCP-LISTEN:{},bind=127.0.0.1,fork,reuseaddr", addr.port());
    expect_refusals(&[
        refusal(&["forward", &addr.to_string(), "127.0.0.1:1"], 1, addr),
        refusal(&[socat_listen.as_str(), "TCP:127.0.0.1:1"], 1, addr),
    ])
}

// ------------------------------------------------------ descriptor exhaustion

/// The relay's descriptor limit in this test (soft = hard).
const NOFILE: u64 = 64;
/// Client connections opened at once: each needs two relay descriptors.
const FLOOD: usize = 150;

#[test]
fn relay_keeps_accepting_after_running_out_of_file_descriptors() -> Result<()> {
    let echo = EchoServer::start()?;
    let relay = RelayCmd::loopback_to(echo.addr())?.nofile(NOFILE).spawn()?;
    let limit = relay.nofile_limit()?;
    ensure!(
        limit == (NOFILE.to_string(), NOFILE.to_string()),
        "expected relay's RLIMIT_NOFILE to be {NOFILE}:{NOFILE} under prlimit, got {limit:?}"
    );
    let baseline = relay.open_fds()?;
    let flood: Vec<_> = (0..FLOOD).map(|_| relay.connect()).collect::<Result<_>>()?;
    // Proof that the relay did run out: its descriptor table is full.
    poll_until(
        &format!("relay to use ~all of its {NOFILE} descriptors"),
        Duration::from_secs(10),
        || Ok((relay.open_fds()? >= NOFILE as usize - 4).then_some(())),
    )?;
    drop(flood);
    // The flood's closed connections still sit in the backlog; relay works
    // through them (they may fail for lack of descriptors, which is fine).
    poll_until(
        &format!("relay back to its {baseline} descriptors after the flood"),
        Duration::from_secs(15),
        || Ok((relay.open_fds()? <= baseline + 2).then_some(())),
    )?;

    // A connection may still meet a descriptor-starved moment (reset);
    // one that never gets served means the accept loop is gone.
    let mut failures = Vec::new();
    poll_until(
        "a new connection to be served after the flood",
        Duration::from_secs(15),
        || {
            let attempt = relay.connect().and_then(|mut client| {
                client.set_read_timeout(Some(Duration::from_secs(3)))?;
                round_trip(&mut client, b"still serving")
            });
            Ok(match attempt {
                Ok(()) => Some(()),
                Err(e) => {
                    failures.push(format!("{e:#}"));
                    None
                }
            })
        },
    )
    .with_context(|| format!("attempts after the flood failed with: {failures:?}"))?;
    Ok(())
}

// ------------------------------------------------------------------ shutdown

/// 20 MiB sent in ~320 chunks with a pause after each: about 2 s in flight.
const SLOW_TRANSFER: Payload = Payload {
    seed: 20,
    len: 20 << 20,
};
const SLOW_PAUSE: Duration = Duration::from_millis(6);

/// A signal closes the listener at once (new connects refused), the
/// transfer in flight completes whole, and the relay exits 0.
fn signal_drains_transfer_in_flight(signal: Signal) -> Result<()> {
    let (tx, rx) = mpsc::channel();
    let backend = Backend::start(move |mut conn| {
        let sent = SLOW_TRANSFER.write_paced(&mut conn, Some(SLOW_PAUSE));
        let _ = tx.send(
            sent.map(|fp| (fp, Instant::now()))
                .map_err(|e| e.to_string()),
        );
    })?;
    let mut relay = RelayCmd::loopback_to(backend.addr())?.spawn()?;
    let mut client = relay.connect()?;
    let mut head = vec![0u8; 64 * 1024];
    client
        .read_exact(&mut head)
        .context("the first 64 KiB of the slow transfer")?;

    let signalled = Instant::now();
    relay.signal(signal)?;
    wait_not_listening(relay.pid(), relay.addr().port(), LISTENER_CLOSE_TIMEOUT)
        .with_context(|| format!("after {signal}, the listener should close at once"))?;
    match std::net::TcpStream::connect_timeout(&relay.addr(), Duration::from_secs(2)) {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
        other => bail!("after {signal}: expected a new connect to be refused, got {other:?}"),
    }

    let received =
        read_fingerprint(&mut head.as_slice().chain(&mut client)).context("reading the rest")?;
    let (sent, finished) = rx
        .recv_timeout(Duration::from_secs(30))
        .map_err(|e| anyhow!("no report from the slow sender: {e}"))?
        .map_err(|e| anyhow!("slow sender failed: {e}"))?;
    ensure!(
        received == sent,
        "after {signal}: expected the transfer in flight ({sent}) to arrive whole, got {received}"
    );
    // The client is done too: its close ends the connection, which is
    // what lets the drain finish.
    drop(client);
    ensure!(
        finished > signalled,
        "the transfer ended before {signal} was sent, so nothing was in flight; make SLOW_TRANSFER slower"
    );
    let status = relay.wait_exit(EXIT_TIMEOUT)?;
    ensure!(
        status.code() == Some(0),
        "after {signal} and a completed drain: expected exit 0, got {status}"
    );
    Ok(())
}

#[test]
fn sigterm_refuses_new_connections_and_finishes_transfer_in_flight() -> Result<()> {
    signal_drains_transfer_in_flight(Signal::SIGTERM)
}

#[test]
fn sigint_refuses_new_connections_and_finishes_transfer_in_flight() -> Result<()> {
    signal_drains_transfer_in_flight(Signal::SIGINT)
}

#[test]
fn sigterm_on_idle_relay_exits_0_at_once() -> Result<()> {
    let echo = EchoServer::start()?;
    let mut relay = RelayCmd::loopback_to(echo.addr())?.spawn()?;
    let mut client = relay.connect()?;
    round_trip(&mut client, b"one finished connection")?;
    drop(client);
    relay.wait_metric("relay_active_connections", &[], 0.0, Duration::from_secs(5))?;
    relay.signal(Signal::SIGTERM)?;
    let (status, after) = relay.time_to_exit(EXIT_TIMEOUT)?;
    ensure!(
        status.code() == Some(0),
        "SIGTERM with nothing open: expected exit 0, got {status}"
    );
    ensure!(
        after < LISTENER_CLOSE_TIMEOUT,
        "SIGTERM with nothing open: expected an exit at once, took {after:?}"
    );
    Ok(())
}

#[test]
fn drain_timeout_closes_endless_connection_and_exits_0() -> Result<()> {
    let echo = EchoServer::start()?;
    let mut relay = RelayCmd::loopback_to(echo.addr())?
        .opts(&["--drain-timeout", "1s", "--log-format", "json"])
        .spawn()?;
    let mut client = relay.connect()?;
    round_trip(&mut client, b"never ending")?;

    let signalled = Instant::now();
    relay.signal(Signal::SIGTERM)?;
    let (closed, after) = expect_close(&mut client, Duration::from_secs(5))?;
    ensure!(
        (Duration::from_millis(900)..Duration::from_millis(2500)).contains(&after),
        "expected the open connection closed ~1s (the drain timeout) after SIGTERM, took {after:?} ({closed:?})"
    );
    let status = relay.wait_exit(EXIT_TIMEOUT)?;
    let exited_after = signalled.elapsed();
    ensure!(
        status.code() == Some(0),
        "after the drain timeout: expected exit 0, got {status}"
    );
    ensure!(
        exited_after < Duration::from_secs(3),
        "expected relay to exit ~1s after SIGTERM (drain timeout 1s), took {exited_after:?}"
    );
    // The process is gone, so /metrics cannot be scraped; the per-connection
    // log line carries the same outcome label.
    let log = relay.stderr();
    ensure!(
        json_log_lines_with(&log, "outcome", "drained") == 1,
        "expected one connection logged with outcome \"drained\", got {} in:\n{log}",
        json_log_lines_with(&log, "outcome", "drained")
    );
    Ok(())
}

/// A transfer still moving when the drain timeout runs out is cut: both
/// ends see a reset, never a clean EOF that would pass for the end of the
/// transfer; the log says so.
#[test]
fn drain_timeout_resets_both_sides_of_a_transfer_it_cuts() -> Result<()> {
    let (tx, rx) = mpsc::channel();
    let backend = Backend::start(move |mut conn| {
        let _ = tx.send(SLOW_TRANSFER.write_paced(&mut conn, Some(SLOW_PAUSE)));
    })?;
    let mut relay = RelayCmd::loopback_to(backend.addr())?
        .opts(&["--drain-timeout", "500ms", "--log-format", "json"])
        .spawn()?;
    let mut client = relay.connect()?;
    let mut head = vec![0u8; 64 * 1024];
    client
        .read_exact(&mut head)
        .context("the first 64 KiB of the slow transfer")?;
    relay.signal(Signal::SIGTERM)?;
    client.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut received = head.len();
    let mut buf = vec![0u8; 64 * 1024];
    let end = loop {
        match client.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => received += n,
            Err(e) => break Err(e),
        }
    };
    ensure!(
        received < SLOW_TRANSFER.len as usize,
        "the transfer ({} bytes) finished before the drain timeout; make SLOW_TRANSFER slower",
        SLOW_TRANSFER.len
    );
    match end {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => bail!(
            "a transfer cut by the drain timeout after {received} of {} bytes: expected the client to read a reset, got {other:?}",
            SLOW_TRANSFER.len
        ),
    }
    let sender = rx
        .recv_timeout(Duration::from_secs(30))
        .map_err(|e| anyhow!("no report from the slow sender: {e}"))?;
    ensure!(
        sender.is_err(),
        "the target side of a cut transfer: expected its writes to fail (reset), but it sent everything: {sender:?}"
    );
    let status = relay.wait_exit(EXIT_TIMEOUT)?;
    ensure!(
        status.code() == Some(0),
        "after the drain timeout: expected exit 0, got {status}"
    );
    let log = relay.stderr();
    ensure!(
        json_log_lines_with(
            &log,
            "reason",
            "drain timeout after shutdown signal: both sides reset"
        ) == 1,
        "expected one connection logged as reset by the drain timeout, in:\n{log}"
    );
    Ok(())
}

/// The idle timer closing a connection whose target stopped reading cuts
/// the bytes stuck on the way: the client sees a reset, not a clean close.
#[test]
fn idle_timeout_resets_a_connection_with_bytes_stuck_in_flight() -> Result<()> {
    let backend = Backend::start(|conn| {
        // Accept, never read; hold the socket until the relay gives up.
        std::thread::sleep(Duration::from_secs(15));
        drop(conn);
    })?;
    let relay = RelayCmd::loopback_to(backend.addr())?
        .opts(&["--idle-timeout", "1s"])
        .spawn()?;
    let mut client = relay.connect()?;
    client.set_nonblocking(true)?;
    // Fill every buffer on the way: the target's receive queue, relay's
    // buffer and sockets, the client's send queue.
    let chunk = vec![7u8; 64 * 1024];
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut quiet_since = Instant::now();
    while Instant::now() < deadline && quiet_since.elapsed() < Duration::from_millis(300) {
        match std::io::Write::write(&mut client, &chunk) {
            Ok(_) => quiet_since = Instant::now(),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => bail!("writing toward a target that does not read: {e}"),
        }
    }
    client.set_nonblocking(false)?;
    let (closed, after) = expect_close(&mut client, Duration::from_secs(5))?;
    ensure!(
        closed == relay_tests::peers::Closed::Reset,
        "idle timeout with bytes stuck toward the target: expected a reset, got {closed:?} after {after:?}"
    );
    relay.wait_metric(
        "relay_connections_total",
        &[("outcome", "idle_timeout")],
        1.0,
        Duration::from_secs(5),
    )?;
    ensure!(
        relay
            .stderr()
            .contains("bytes still in flight: both sides reset"),
        "expected the close logged as a reset with bytes in flight:\n{}",
        relay.stderr()
    );
    Ok(())
}

/// SIGHUP (a closing terminal, or a `kill -HUP` meant as a reload) is
/// logged and ignored: the relay keeps serving and still drains on SIGTERM.
#[test]
fn sighup_is_logged_and_ignored() -> Result<()> {
    let echo = EchoServer::start()?;
    let mut relay = RelayCmd::loopback_to(echo.addr())?.spawn()?;
    let mut client = relay.connect()?;
    round_trip(&mut client, b"before SIGHUP")?;
    relay.signal(Signal::SIGHUP)?;
    poll_until("relay to log the SIGHUP", Duration::from_secs(5), || {
        Ok(relay.stderr().contains("SIGHUP").then_some(()))
    })?;
    round_trip(&mut client, b"after SIGHUP, same connection")?;
    let mut fresh = relay.connect()?;
    round_trip(&mut fresh, b"after SIGHUP, new connection")?;
    drop((client, fresh));
    relay.signal(Signal::SIGTERM)?;
    let status = relay.wait_exit(EXIT_TIMEOUT)?;
    ensure!(
        status.code() == Some(0),
        "SIGTERM after SIGHUP: expected exit 0, got {status}"
    );
    Ok(())
}

// ------------------------------------------------------------------- logs

/// A route name with a newline (or any control character) cannot forge a
/// log line: each text log line starts with a timestamp and the name is
/// escaped; the JSON "listening on" line has each key once.
#[test]
fn names_from_outside_cannot_forge_log_lines() -> Result<()> {
    let echo = EchoServer::start()?;
    let forged = "x\n2026-01-01T00:00:00Z  INFO relay: forged\u{1b}[2J";
    let mut relay = RelayCmd::loopback_to(echo.addr())?
        .opts(&["--name", forged])
        .spawn()?;
    let mut client = relay.connect()?;
    round_trip(&mut client, b"logged")?;
    drop(client);
    relay.wait_metric("relay_active_connections", &[], 0.0, Duration::from_secs(5))?;
    relay.signal(Signal::SIGTERM)?;
    relay.wait_exit(EXIT_TIMEOUT)?;
    let log = relay.stderr();
    let forged_lines = log
        .lines()
        .filter(|l| l.starts_with("2026-01-01T00:00:00Z"))
        .count();
    ensure!(
        forged_lines == 0 && !log.contains('\u{1b}') && log.contains("route=x\\n2026-01-01T"),
        "expected the name escaped on one line (route=x\\n2026-01-01T...), no forged line, no raw escape character; got {forged_lines} forged lines in:\n{log}"
    );

    let mut relay = RelayCmd::loopback_to(echo.addr())?
        .opts(&["--log-format", "json"])
        .spawn()?;
    relay.signal(Signal::SIGTERM)?;
    relay.wait_exit(EXIT_TIMEOUT)?;
    let log = relay.stderr();
    let listening = log
        .lines()
        .find(|l| l.contains("listening on"))
        .with_context(|| format!("no \"listening on\" line in:\n{log}"))?;
    for key in ["\"target\":", "\"route\":", "\"upstream\":"] {
        ensure!(
            listening.matches(key).count() == 1,
            "expected the key {key} once in the JSON line {listening}"
        );
    }
    Ok(())
}

#[test]
fn second_signal_during_drain_exits_1_at_once() -> Result<()> {
    let echo = EchoServer::start()?;
    let mut relay = RelayCmd::loopback_to(echo.addr())?.spawn()?;
    let mut client = relay.connect()?;
    round_trip(&mut client, b"keeps the drain waiting")?;
    relay.signal(Signal::SIGTERM)?;
    // The listener closing shows the first signal was handled.
    wait_not_listening(relay.pid(), relay.addr().port(), LISTENER_CLOSE_TIMEOUT)?;
    relay.signal(Signal::SIGTERM)?;
    let (status, after) = relay.time_to_exit(Duration::from_secs(5))?;
    ensure!(
        status.code() == Some(1),
        "after a second SIGTERM: expected exit code 1, got {status}"
    );
    ensure!(
        after < Duration::from_secs(1),
        "after a second SIGTERM: expected an exit at once, took {after:?}"
    );
    drop(client);
    Ok(())
}
