//! The harness checked on its own, without relay: namespaces, peers and
//! their cleanup. When these fail, the relay tests' failures mean little.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Result, ensure};
use relay_tests::netns::NetNs;
use relay_tests::peers::{self, Backend, EchoServer, round_trip};
use relay_tests::ports::free_port;
use relay_tests::tools::{Nginx, Socat};
use relay_tests::{http, require_root, require_tool};

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
