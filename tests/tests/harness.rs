//! The harness checked on its own, without relay: namespaces, peers and
//! their cleanup. When these fail, the relay tests' failures mean little.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use relay_tests::netns::NetNs;
use relay_tests::peers::{self, Backend, EchoServer, round_trip};
use relay_tests::ports::free_port;
use relay_tests::tools::{Nginx, Socat};
use relay_tests::{Payload, ShapedLink, http, require_root, require_tool};

#[test]
fn namespace_socket_is_reachable_at_namespace_address_and_removed_on_drop() -> Result<()> {
    require_root!("creates network namespaces");
    let ns = NetNs::create()?;
    let name = ns.name().to_string();
    let listener = ns.tcp_listen(SocketAddr::from((ns.addr(), 7000)))?;
    let echo = EchoServer::on(listener)?;
    let mut client = peers::connect(echo.addr())?;
    round_trip(&mut client, b"hello from the host")?;
    // A socket made inside stays inside: the namespace reaches the host side.
    let backend = Backend::on(
        ns.tcp_listen(SocketAddr::from((ns.addr(), 7001)))?,
        |mut s| {
            let _ = s.write_all(b"hi");
        },
    )?;
    let mut inside = ns.tcp_connect(backend.addr())?;
    let mut got = Vec::new();
    inside.read_to_end(&mut got)?;
    ensure!(
        got == b"hi",
        "expected b\"hi\" over a connection made inside the netns, got {got:?}"
    );
    drop((client, inside, echo, backend));
    drop(ns);
    let list = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()?;
    let list = String::from_utf8_lossy(&list.stdout);
    ensure!(
        !list.contains(&name),
        "expected netns {name} to be gone after drop, `ip netns list` shows:\n{list}"
    );
    Ok(())
}

#[test]
fn silenced_namespace_leaves_connect_hanging() -> Result<()> {
    require_root!("creates network namespaces");
    let ns = NetNs::create()?;
    ns.silence()?;
    let target = SocketAddr::from((ns.addr(), 80));
    match std::net::TcpStream::connect_timeout(&target, Duration::from_millis(1500)) {
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Ok(()),
        other => anyhow::bail!("expected connect to {target} to time out, got {other:?}"),
    }
}

#[test]
fn socat_echo_peer_echoes() -> Result<()> {
    require_tool!("socat");
    let socat = Socat::echo(None, SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?)))?;
    let mut client = peers::connect(socat.addr())?;
    round_trip(&mut client, b"ping through socat")
}

#[test]
fn nginx_peer_serves_its_file() -> Result<()> {
    require_tool!("nginx");
    let nginx = Nginx::start(None, SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?)))?;
    let response = http::get(peers::connect(nginx.addr())?, "localhost", Nginx::FILE_PATH)?;
    ensure!(
        response.status == 200,
        "expected 200, got {}",
        response.head
    );
    let got = relay_tests::Fingerprint::of(&response.body);
    ensure!(got == nginx.file(), "expected {}, got {got}", nginx.file());
    Ok(())
}

#[test]
fn promtool_check_rejects_a_broken_exposition() -> Result<()> {
    require_tool!("promtool");
    let verdict = relay_tests::tools::promtool_check("# TYPE foo counter\nfoo{a=\"b\" 1\n")?;
    ensure!(
        verdict.is_err(),
        "expected promtool to reject an unterminated label, it accepted it"
    );
    Ok(())
}

/// The shaped link adds its delay to every packet each way (a TCP
/// handshake and an echo round trip each take at least twice the delay),
/// drops packets at its loss rate, and leaves no TUN device or namespace
/// behind.
#[test]
fn shaped_link_delays_and_drops_packets_and_is_removed_on_drop() -> Result<()> {
    require_root!("creates network namespaces and TUN devices");
    const DELAY: Duration = Duration::from_millis(25);
    let link = ShapedLink::new(DELAY, 0.0)?;
    let echo = EchoServer::on(
        link.ns()
            .tcp_listen(SocketAddr::from((link.addr(), 7000)))?,
    )?;
    let started = Instant::now();
    let mut client = peers::connect(echo.addr())?;
    let handshake = started.elapsed();
    let started = Instant::now();
    round_trip(&mut client, b"through the shaper")?;
    let echoed = started.elapsed();
    for (what, took) in [("connect", handshake), ("echo round trip", echoed)] {
        ensure!(
            took >= 2 * DELAY && took < 2 * DELAY + Duration::from_millis(500),
            "{what} over a link with {DELAY:?} each way: expected about {:?}, took {took:?}",
            2 * DELAY
        );
    }
    let (name, host_if) = (link.ns().name().to_string(), link.host_if().to_string());
    drop((client, echo, link));
    let shown = std::process::Command::new("ip")
        .args(["link", "show", &host_if])
        .output()?;
    ensure!(
        !shown.status.success(),
        "expected TUN device {host_if} gone after drop, it is still there"
    );
    let list = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()?;
    ensure!(
        !String::from_utf8_lossy(&list.stdout).contains(&name),
        "expected netns {name} gone after drop"
    );

    let lossy = ShapedLink::new(Duration::from_millis(2), 0.05)?;
    let echo = EchoServer::on(
        lossy
            .ns()
            .tcp_listen(SocketAddr::from((lossy.addr(), 7000)))?,
    )?;
    let payload = Payload::new(81, 1 << 20);
    let heard = peers::echo_payload(peers::connect(echo.addr())?, payload)?;
    ensure!(
        heard == payload.fingerprint(),
        "1 MiB echoed over a 5% lossy link: got {heard}, expected {}",
        payload.fingerprint()
    );
    let stats = lossy.stats();
    let rate = stats.dropped() as f64 / (stats.dropped() + stats.delivered()) as f64;
    ensure!(
        (0.02..0.10).contains(&rate),
        "a link losing 5% of packets dropped {rate:.3} of them: {stats:?}"
    );
    Ok(())
}
