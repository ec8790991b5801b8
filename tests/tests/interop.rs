//! relay with real peers: as a drop-in for socat in front of nginx, and
//! between network namespaces (client in one, server in another, relay on
//! the host).

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use relay_tests::netns::NetNs;
use relay_tests::peers::round_trip;
use relay_tests::ports::free_port;
use relay_tests::tools::{Nginx, Socat};
use relay_tests::{Fingerprint, RelayCmd, http, require_root, require_tool};

/// GET nginx's file over `stream`; it must arrive with status 200, whole.
fn get_file_through(stream: TcpStream, nginx: &Nginx, what: &str) -> Result<()> {
    let response =
        http::get(stream, "relay-test", Nginx::FILE_PATH).with_context(|| what.to_string())?;
    ensure!(
        response.status == 200,
        "{what}: expected HTTP 200, got {}",
        response.head
    );
    let got = Fingerprint::of(&response.body);
    ensure!(
        got == nginx.file(),
        "{what}: expected the file ({}), got {got}",
        nginx.file()
    );
    Ok(())
}

/// `relay TCP-LISTEN:<p>[,fork],reuseaddr TCP:127.0.0.1:<nginx>`: with
/// `fork` every client is served; without, one is, then relay exits 0.
fn socat_form_serves_nginx(fork: bool) -> Result<()> {
    let nginx = Nginx::start(None, SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?)))?;
    let port = free_port()?;
    let listen = if fork {
        format!("TCP-LISTEN:{port},fork,reuseaddr")
    } else {
        format!("TCP-LISTEN:{port},reuseaddr")
    };
    let mut relay = RelayCmd::socat(
        port,
        listen,
        format!("TCP:127.0.0.1:{}", nginx.addr().port()),
    )
    .spawn()?;
    let clients = if fork { 3 } else { 1 };
    for i in 1..=clients {
        get_file_through(relay.connect()?, &nginx, &format!("GET #{i} through relay"))?;
    }
    if fork {
        ensure!(
            relay.is_listening()?,
            "with fork: expected relay still listening after {clients} clients"
        );
        return Ok(());
    }
    let status = relay.wait_exit(Duration::from_secs(5))?;
    ensure!(
        status.code() == Some(0),
        "without fork: expected exit 0 after the one connection, got {status}"
    );
    match TcpStream::connect_timeout(&relay.addr(), Duration::from_secs(2)) {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(()),
        other => {
            bail!("without fork, after the exit: expected a second connect refused, got {other:?}")
        }
    }
}

#[test]
fn socat_form_with_fork_serves_nginx_file_to_every_client() -> Result<()> {
    require_tool!("nginx");
    socat_form_serves_nginx(true)
}

#[test]
fn socat_form_without_fork_serves_one_client_then_exits_0() -> Result<()> {
    require_tool!("nginx");
    socat_form_serves_nginx(false)
}

/// Which real server runs in the server namespace.
#[derive(Clone, Copy, Debug)]
enum Server {
    Nginx,
    SocatEcho,
}

/// Client in netns A, server in netns B, relay on the host listening on
/// A's gateway address and targeting B's address.
fn relay_bridges_namespaces(server: Server) -> Result<()> {
    let client_ns = NetNs::create()?;
    let server_ns = NetNs::create()?;
    let server_addr = SocketAddr::from((server_ns.addr(), 8080));
    let listen = SocketAddr::from((client_ns.host_addr(), free_port()?));
    let check = |relay_addr: SocketAddr, nginx: Option<&Nginx>| -> Result<()> {
        let stream = client_ns.tcp_connect(relay_addr)?;
        match nginx {
            Some(nginx) => get_file_through(stream, nginx, "GET from netns A via relay"),
            None => {
                let mut stream = stream;
                round_trip(&mut stream, b"from netns A to netns B")
            }
        }
    };
    match server {
        Server::Nginx => {
            let nginx = Nginx::start(Some(&server_ns), server_addr)?;
            let relay = RelayCmd::forward(listen, server_addr).spawn()?;
            check(relay.addr(), Some(&nginx))
        }
        Server::SocatEcho => {
            let _socat = Socat::echo(Some(&server_ns), server_addr)?;
            let relay = RelayCmd::forward(listen, server_addr).spawn()?;
            check(relay.addr(), None)
        }
    }
}

#[test]
fn client_in_one_netns_gets_nginx_file_from_another_netns() -> Result<()> {
    require_root!("creates network namespaces");
    require_tool!("nginx");
    relay_bridges_namespaces(Server::Nginx)
}

#[test]
fn client_in_one_netns_echoes_with_socat_in_another_netns() -> Result<()> {
    require_root!("creates network namespaces");
    require_tool!("socat");
    relay_bridges_namespaces(Server::SocatEcho)
}
