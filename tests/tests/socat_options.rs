//! socat address options that change what a route does, against real
//! peers: `range=` (a client from another network namespace is closed
//! before anything reaches the target, loopback is served),
//! `max-children=` (the route's connection limit) and `retry=`/`interval=`
//! (a target that starts listening late is still reached); socat's global
//! flags (`-d` sets the log level, the ones relay does not do are refused
//! by name with exit 2).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use relay_tests::peers::{Backend, EchoServer, expect_close, round_trip};
use relay_tests::ports::free_port;
use relay_tests::relay_proc::relay_bin;
use relay_tests::wait::poll_until;
use relay_tests::{NetNs, RelayCmd, require_root};

/// How long a counter may take to move after the client saw the effect.
const METRIC_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection may take to close once relay decided to close it.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECTIONS_TOTAL: &str = "relay_connections_total";
const RETRIES_TOTAL: &str = "relay_upstream_connect_retries_total";

/// How long a refused command line may take to exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// A backend that echoes and counts what it accepts.
fn echo_backend() -> Result<Backend> {
    Backend::start(|mut stream| {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stream.read(&mut buf) {
            if n == 0 || stream.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    })
}

#[test]
fn range_closes_clients_from_elsewhere_before_the_target_sees_them() -> Result<()> {
    require_root!("creates a network namespace for the client outside range=");
    let ns = NetNs::create()?;
    let backend = echo_backend()?;
    let port = free_port()?;
    let relay = RelayCmd::socat(
        port,
        format!("TCP-LISTEN:{port},fork,reuseaddr,range=127.0.0.0/8"),
        format!("TCP:{}", backend.addr()),
    )
    .with_metrics()?
    .spawn()?;

    // From the namespace, over the veth pair to the host's side of it.
    let host = SocketAddr::from((ns.host_addr(), port));
    let mut outsider = ns
        .enter(move || {
            let stream = TcpStream::connect(host)?;
            // Whatever the client manages to send must never reach the target.
            let _ = (&stream).write_all(b"let me in");
            Ok(stream)
        })
        .context("connecting from the namespace")?;
    expect_close(&mut outsider, CLOSE_TIMEOUT).context("the client outside range=")?;
    relay.wait_metric(
        CONNECTIONS_TOTAL,
        &[("outcome", "denied")],
        1.0,
        METRIC_TIMEOUT,
    )?;
    ensure!(
        backend.accepted() == 0,
        "a denied client must not be connected to the target, yet it accepted {}",
        backend.accepted()
    );

    // Loopback is inside the range and served.
    let mut insider = relay.connect()?;
    round_trip(&mut insider, b"hello from loopback")?;
    ensure!(
        backend.accepted() == 1,
        "the loopback client reached the target once"
    );
    drop(insider);
    relay.wait_metric(
        CONNECTIONS_TOTAL,
        &[("outcome", "closed")],
        1.0,
        METRIC_TIMEOUT,
    )?;
    let denied = relay
        .scrape()?
        .counter(CONNECTIONS_TOTAL, &[("outcome", "denied")]);
    ensure!(
        denied == 1.0,
        "only the outsider was denied, counted {denied}"
    );
    Ok(())
}

#[test]
fn max_children_holds_further_clients_until_one_closes() -> Result<()> {
    let echo = EchoServer::start()?;
    let port = free_port()?;
    let relay = RelayCmd::socat(
        port,
        format!("TCP-LISTEN:{port},fork,reuseaddr,max-children=1"),
        format!("TCP:{}", echo.addr()),
    )
    .with_metrics()?
    .spawn()?;

    let mut first = relay.connect()?;
    round_trip(&mut first, b"first")?;
    // The second client's SYN is answered by the kernel's backlog, but
    // relay does not accept it while the one slot is taken.
    let mut second = relay.connect()?;
    second
        .write_all(b"second")
        .context("writing from the second client")?;
    relay.wait_metric(
        CONNECTIONS_TOTAL,
        &[("outcome", "limit")],
        1.0,
        METRIC_TIMEOUT,
    )?;
    ensure!(
        echo.accepted() == 1,
        "only one client may be relayed at a time, the target accepted {}",
        echo.accepted()
    );
    drop(first);
    let mut back = [0u8; 6];
    second
        .read_exact(&mut back)
        .context("the second client is served once the first closed")?;
    ensure!(&back == b"second", "echo mismatch: {back:?}");
    ensure!(echo.accepted() == 2, "the second client reached the target");
    Ok(())
}

#[test]
fn retry_reaches_a_target_that_starts_listening_late() -> Result<()> {
    let target_port = free_port()?;
    let port = free_port()?;
    let relay = RelayCmd::socat(
        port,
        format!("TCP-LISTEN:{port},fork,reuseaddr"),
        format!("TCP:127.0.0.1:{target_port},retry=1000,interval=0.05"),
    )
    .with_metrics()?
    .spawn()?;

    let mut client = relay.connect()?;
    client
        .write_all(b"early bird")
        .context("writing before the target exists")?;
    // The target is down: relay retries, counted.
    poll_until("a counted connect retry", METRIC_TIMEOUT, || {
        Ok((relay.scrape()?.counter(RETRIES_TOTAL, &[]) >= 1.0).then_some(()))
    })?;
    let echo = EchoServer::on(
        TcpListener::bind((Ipv4Addr::LOCALHOST, target_port)).context("binding the late target")?,
    )?;
    let mut back = [0u8; 10];
    client
        .read_exact(&mut back)
        .context("the bytes sent early reach the late target and come back")?;
    ensure!(&back == b"early bird", "echo mismatch: {back:?}");
    ensure!(echo.accepted() == 1, "one connection to the target");
    Ok(())
}

#[test]
fn retries_run_out_and_the_client_is_told() -> Result<()> {
    let target_port = free_port()?;
    let port = free_port()?;
    let relay = RelayCmd::socat(
        port,
        format!("TCP-LISTEN:{port},fork,reuseaddr"),
        format!("TCP:127.0.0.1:{target_port},retry=2,interval=0.01"),
    )
    .with_metrics()?
    .spawn()?;
    let mut client = relay.connect()?;
    expect_close(&mut client, CLOSE_TIMEOUT)?;
    relay.wait_metric(
        CONNECTIONS_TOTAL,
        &[("outcome", "refused")],
        1.0,
        METRIC_TIMEOUT,
    )?;
    let retries = relay.scrape()?.counter(RETRIES_TOTAL, &[]);
    ensure!(
        retries == 2.0,
        "retry=2 tries twice more, counted {retries}"
    );
    Ok(())
}

#[test]
fn d_flags_set_the_log_level_as_socat() -> Result<()> {
    let backend = echo_backend()?;
    let port = free_port()?;
    // Loopback is outside this range: the denial is logged at debug.
    let relay = RelayCmd::socat(
        port,
        format!("TCP-LISTEN:{port},fork,reuseaddr,range=10.0.0.0/8"),
        format!("TCP:{}", backend.addr()),
    )
    .opts(&["-d", "-d", "-dd"])
    .with_metrics()?
    .spawn()?;
    let mut client = relay.connect()?;
    expect_close(&mut client, CLOSE_TIMEOUT)?;
    relay.wait_metric(
        CONNECTIONS_TOTAL,
        &[("outcome", "denied")],
        1.0,
        METRIC_TIMEOUT,
    )?;
    poll_until("the debug line of the denial", METRIC_TIMEOUT, || {
        Ok(relay.stderr().contains("outside range=").then_some(()))
    })?;
    ensure!(
        backend.accepted() == 0,
        "a denied client reached the target"
    );
    Ok(())
}

#[test]
fn socat_flags_and_options_relay_does_not_do_are_refused_by_name() -> Result<()> {
    let cases: [(&[&str], &[&str]); 5] = [
        (
            &["-v", "TCP-LISTEN:1", "TCP:127.0.0.1:1"],
            &["`-v`", "--pcap"],
        ),
        (&["-u", "TCP-LISTEN:1", "TCP:127.0.0.1:1"], &["`-u`"]),
        (
            &["-lf", "/tmp/x", "TCP-LISTEN:1", "TCP:127.0.0.1:1"],
            &["`-lf`"],
        ),
        (
            &["TCP-LISTEN:1,fork,su=nobody", "TCP:127.0.0.1:1"],
            &["`su`", "User="],
        ),
        (&["TCP-LISTEN:1,fork", "TCP:127.0.0.1:1,crlf"], &["`crlf`"]),
    ];
    for (line, names) in cases {
        RelayCmd::raw(line).expect_usage_error(EXIT_TIMEOUT, names)?;
    }
    Ok(())
}

#[test]
fn explain_prints_what_relay_will_do_or_refuses_as_a_run_would() -> Result<()> {
    let explain = |addr1: &str| -> Result<std::process::Output> {
        std::process::Command::new(relay_bin()?)
            .args(["--explain", addr1, "TCP:127.0.0.1:1,retry=3"])
            .output()
            .context("running relay --explain")
    };
    let out = explain("TCP-LISTEN:1,fork,range=10.0.0.0/8")?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.code() == Some(0), "exit 0 expected: {out:?}");
    ensure!(
        text.contains("range=10.0.0.0/8: admit only clients") && text.contains("retry=3: repeat"),
        "each option explained: {text}"
    );
    let out = explain("TCP-LISTEN:1,fork,crlf")?;
    ensure!(
        out.status.code() == Some(2),
        "a refused option exits 2: {out:?}"
    );
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("socat option `crlf`"),
        "the refusal names the option: {out:?}"
    );
    Ok(())
}
