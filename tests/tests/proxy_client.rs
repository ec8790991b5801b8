//! Connect addresses through a proxy, against real proxy servers: SOCKS4
//! and SOCKS5-CONNECT through Dante, PROXY (HTTP CONNECT) through
//! Tinyproxy with Basic credentials (inline and from a file). Each proxy
//! allows one target port: a connection to another is refused by the
//! proxy, closed to the client and counted as outcome="refused". SOCKS4A,
//! which Dante does not speak, is checked against socat itself: relay's
//! request is byte for byte the one socat sends.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use relay_tests::peers::{Backend, EchoServer, expect_close, round_trip};
use relay_tests::ports::free_port;
use relay_tests::proxies::Proxy;
use relay_tests::relay_proc::relay_bin;
use relay_tests::{RelayCmd, require_root, require_tool};

const METRIC_TIMEOUT: Duration = Duration::from_secs(5);
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A fork listener in front of `target`, with metrics.
fn relay_to(target: String) -> Result<relay_tests::Relay> {
    let port = free_port()?;
    RelayCmd::socat(
        port,
        format!("TCP-LISTEN:{port},fork,reuseaddr,bind=127.0.0.1"),
        target,
    )
    .with_metrics()?
    .spawn()
}

/// A client of `relay`, whose target the proxy refuses, is closed and
/// counted as outcome="refused".
fn expect_refused_closes(relay: &relay_tests::Relay) -> Result<()> {
    let mut client = relay.connect()?;
    expect_close(&mut client, CLOSE_TIMEOUT)?;
    relay.wait_outcome("refused", 1.0, METRIC_TIMEOUT)?;
    Ok(())
}

#[test]
fn socks4_and_socks5_through_dante_reach_the_allowed_target_only() -> Result<()> {
    require_root!("danted switches to its privileged and unprivileged users");
    require_tool!("danted");
    let echo = EchoServer::start()?;
    let dante = Proxy::dante(echo.addr().port())?;
    let socks = dante.addr();
    for target in [
        format!(
            "SOCKS4:{}:{},socksport={},socksuser=relay-test",
            socks.ip(),
            echo.addr(),
            socks.port()
        ),
        format!(
            "SOCKS5-CONNECT:{}:{}:localhost:{}",
            socks.ip(),
            socks.port(),
            echo.addr().port()
        ),
    ] {
        let relay = relay_to(target.clone())?;
        let mut client = relay.connect()?;
        round_trip(&mut client, format!("through {target}").as_bytes())
            .with_context(|| format!("{target}\ndanted: {}", dante.log()))?;
        drop(client);
        relay.wait_outcome("closed", 1.0, METRIC_TIMEOUT)?;
    }
    // Dante's rules allow the echo's port only.
    let other = free_port()?;
    let relay = relay_to(format!(
        "SOCKS4:{}:127.0.0.1:{other},socksport={}",
        socks.ip(),
        socks.port()
    ))?;
    expect_refused_closes(&relay)?;
    ensure!(
        relay.stderr().contains("the SOCKS server refused"),
        "the log says the proxy refused:\n{}",
        relay.stderr()
    );
    Ok(())
}

#[test]
fn http_connect_through_tinyproxy_with_basic_credentials() -> Result<()> {
    require_root!("tinyproxy switches to its own user when started as root");
    require_tool!("tinyproxy");
    let echo = EchoServer::start()?;
    let proxy = Proxy::tinyproxy(echo.addr().port(), "relay", "s3cret")?;
    let credentials = proxy.file("proxy.cred");
    std::fs::write(&credentials, "relay:s3cret\n").context("writing the credentials file")?;
    let (ip, port) = (proxy.addr().ip(), proxy.addr().port());
    for target in [
        format!(
            "PROXY:{ip}:{}:{},proxyport={port},proxyauth=relay:s3cret",
            "localhost",
            echo.addr().port()
        ),
        format!(
            "PROXY:{ip}:{port}:{},proxy-authorization-file={}",
            echo.addr(),
            credentials.display()
        ),
    ] {
        let relay = relay_to(target.clone())?;
        let mut client = relay.connect()?;
        round_trip(&mut client, format!("through {target}").as_bytes())
            .with_context(|| format!("{target}\ntinyproxy: {}", proxy.log()))?;
    }
    let wrong = relay_to(format!(
        "PROXY:{ip}:{}:{},proxyport={port},proxyauth=relay:wrong",
        "127.0.0.1",
        echo.addr().port()
    ))?;
    expect_refused_closes(&wrong)?;
    ensure!(
        wrong.stderr().contains("401"),
        "the log has the proxy's status:\n{}",
        wrong.stderr()
    );
    let other = free_port()?;
    let closed_port = relay_to(format!(
        "PROXY:{ip}:127.0.0.1:{other},proxyport={port},proxyauth=relay:s3cret"
    ))?;
    expect_refused_closes(&closed_port)?;
    Ok(())
}

/// A scripted SOCKS 4 server: reads one request (through the user id's NUL
/// and, for 4A, the host name's), reports it, grants it and sends a
/// banner in the same write, then echoes.
fn socks4_recorder() -> Result<(Backend, mpsc::Receiver<Vec<u8>>)> {
    let (tx, rx) = mpsc::channel();
    let backend = Backend::start(move |mut stream: TcpStream| {
        let mut request = Vec::new();
        let mut byte = [0u8; 1];
        let complete = |r: &[u8]| {
            let nuls = r.iter().skip(8).filter(|b| **b == 0).count();
            let socks4a = r.len() >= 8 && r[4..7] == [0, 0, 0] && r[7] != 0;
            nuls == if socks4a { 2 } else { 1 }
        };
        while !complete(&request) {
            match stream.read(&mut byte) {
                Ok(1) => request.push(byte[0]),
                _ => return,
            }
        }
        let _ = tx.send(request);
        if stream
            .write_all(b"\x00\x5a\x00\x00\x00\x00\x00\x00banner\n")
            .is_err()
        {
            return;
        }
        let mut buf = [0u8; 4096];
        while let Ok(n) = stream.read(&mut buf) {
            if n == 0 || stream.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    })?;
    Ok((backend, rx))
}

/// What `program - <address>` sends a SOCKS 4 server and gets back.
fn through(
    program: &std::path::Path,
    address: &str,
    rx: &mpsc::Receiver<Vec<u8>>,
) -> Result<(Vec<u8>, String)> {
    let mut child = Command::new(program)
        .args(["-", address])
        .env("LOGNAME", "nobody")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    let request = rx
        .recv_timeout(Duration::from_secs(10))
        .context("no SOCKS request arrived")?;
    let mut stdin = child.stdin.take().context("stdin")?;
    stdin.write_all(b"after\n")?;
    std::thread::sleep(Duration::from_millis(200));
    drop(stdin);
    let out = child.wait_with_output()?;
    Ok((request, String::from_utf8_lossy(&out.stdout).into_owned()))
}

#[test]
fn socks4a_request_is_byte_for_byte_socats() -> Result<()> {
    require_tool!("socat");
    let (server, rx) = socks4_recorder()?;
    let relay = relay_bin()?;
    let socat = std::path::PathBuf::from("socat");
    for address in [
        format!(
            "SOCKS4A:127.0.0.1:db.internal:5432,socksport={}",
            server.addr().port()
        ),
        format!(
            "SOCKS4A:127.0.0.1:db.internal:5432,socksport={},socksuser=app",
            server.addr().port()
        ),
        format!(
            "SOCKS4:127.0.0.1:10.1.2.3:80,socksport={}",
            server.addr().port()
        ),
    ] {
        let (expected, socat_out) = through(&socat, &address, &rx)?;
        let (request, relay_out) = through(&relay, &address, &rx)?;
        ensure!(
            request == expected,
            "{address}: relay sent {request:?}, socat {expected:?}"
        );
        ensure!(
            socat_out == "banner\nafter\n",
            "{address}: socat printed {socat_out:?}"
        );
        ensure!(
            relay_out == socat_out,
            "{address}: relay printed {relay_out:?}, socat {socat_out:?}"
        );
    }
    Ok(())
}
