//! UDP routes with real peers: DNS through `UDP-LISTEN,fork -> UDP` with
//! `dig` against Debian's `dnsmasq` (1,000 queries, every one answered,
//! sessions expiring after the idle timeout), datagram boundaries kept both
//! ways (1, 1,400 and 60,000 bytes), socat as a client, the session cap
//! counted as `limited`, and mixed UDP/stream pairs refused with exit 2.

use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use relay_tests::child::{ChildProc, output_of};
use relay_tests::ports::{free_port, free_udp_port, loopback};
use relay_tests::wait::poll_until;
use relay_tests::{Relay, RelayCmd, require_tool};

/// What dnsmasq answers for the test name.
const ANSWER: &str = "10.1.2.3";
/// How long a test waits for a metric or a reply (not a measured time).
const WAIT: Duration = Duration::from_secs(20);

/// dnsmasq in the foreground on 127.0.0.1:`port`, answering `example.test`
/// with [`ANSWER`] and nothing else (no upstream, no hosts file, no config).
fn dnsmasq(port: u16) -> Result<ChildProc> {
    let mut cmd = Command::new("dnsmasq");
    cmd.args([
        "-k",
        &format!("--port={port}"),
        "--listen-address=127.0.0.1",
        "--bind-interfaces",
        "--no-resolv",
        "--no-hosts",
        "--address=/example.test/10.1.2.3",
        "--conf-file=/dev/null",
        "--pid-file=",
        "-u",
        "root",
    ]);
    let server = ChildProc::spawn("dnsmasq", cmd)?;
    // Ready once it answers directly.
    poll_until("dnsmasq to answer", WAIT, || {
        Ok((dig(port, &["+tries=1", "+time=1"])?.trim() == ANSWER).then_some(()))
    })?;
    Ok(server)
}

/// `dig @127.0.0.1 -p <port> example.test +short` with `extra` options.
fn dig(port: u16, extra: &[&str]) -> Result<String> {
    dig_with(port, &["example.test"], extra)
}

/// `dig @127.0.0.1 -p <port> +short` with `args` (a name, or `-f <file>`).
fn dig_with(port: u16, args: &[&str], extra: &[&str]) -> Result<String> {
    let mut cmd = Command::new("dig");
    cmd.args(["@127.0.0.1", "-p", &port.to_string(), "+short"])
        .args(args)
        .args(extra);
    output_of(cmd)
}

/// A relay in the socat form on UDP 127.0.0.1:`port`, ready once it
/// serves metrics (it binds its UDP socket before).
fn udp_relay(port: u16, target: &str, options: &[&str]) -> Result<Relay> {
    RelayCmd::raw(&[
        format!("UDP-LISTEN:{port},fork,bind=127.0.0.1"),
        target.to_string(),
    ])
    .opts(options)
    .with_metrics()?
    .spawn()
}

fn sum(relay: &Relay, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
    Ok(relay.scrape()?.counter(name, labels))
}

#[test]
fn dig_through_udp_listen_fork_to_dnsmasq_answers_every_query_and_sessions_expire() -> Result<()> {
    require_tool!("dnsmasq");
    require_tool!("dig");
    let dns_port = free_udp_port()?;
    let _server = dnsmasq(dns_port)?;
    let port = free_udp_port()?;
    let relay = udp_relay(
        port,
        &format!("UDP:127.0.0.1:{dns_port}"),
        &["--idle-timeout", "1s", "--max-sessions", "4096"],
    )?;
    // 1,000 queries: four digs in parallel, 250 each in batch mode (every
    // query from a socket of its own, so a session each).
    let batch = (0..250).map(|_| "example.test\n").collect::<String>();
    let dir = relay_tests::tempdir::TempDir::new("udp-dig")?;
    let file = dir.join("queries");
    std::fs::write(&file, batch)?;
    let answers: Vec<Result<String>> = thread::scope(|scope| {
        let digs: Vec<_> = (0..4)
            .map(|_| {
                let file = file.display().to_string();
                scope.spawn(move || dig_with(port, &["-f", &file], &[]))
            })
            .collect();
        digs.into_iter()
            .map(|d| d.join().unwrap_or_else(|_| bail!("a dig thread panicked")))
            .collect()
    });
    // Every line an answer: a dig timeout (";; communications error") or a
    // reply for another query (";; Warning: ID mismatch") fails the test.
    let mut answered = 0;
    for answer in answers {
        let answer = answer?;
        for line in answer.lines() {
            ensure!(
                line == ANSWER,
                "dig through relay answered {line:?}, expected {ANSWER}"
            );
            answered += 1;
        }
    }
    ensure!(
        answered == 1000,
        "{answered} of 1,000 queries answered through relay"
    );
    let scrape = relay.scrape()?;
    let to_client = scrape.counter("relay_udp_datagrams_total", &[("direction", "to_client")]);
    ensure!(
        to_client >= 1000.0,
        "relay counted {to_client} datagrams to clients, expected at least 1,000"
    );
    ensure!(
        scrape.counter("relay_bytes_total", &[("direction", "to_target")]) > 0.0,
        "relay_bytes_total counts UDP payload bytes too"
    );
    // After the idle timeout every session has ended, as expired.
    relay.wait_metric("relay_udp_sessions_active", &[], 0.0, WAIT)?;
    let sent = sum(
        &relay,
        "relay_udp_datagrams_total",
        &[("direction", "to_target")],
    )?;
    let expired = sum(
        &relay,
        "relay_udp_sessions_total",
        &[("outcome", "expired")],
    )?;
    // A session per dig socket (fewer than the queries when a port was
    // reused within the idle timeout), each ended by expiry.
    ensure!(
        expired >= 1.0 && expired <= sent,
        "expected the sessions to expire (between 1 and one per query datagram, {sent}), got {expired}"
    );
    for outcome in ["limited", "error", "drained"] {
        let n = sum(&relay, "relay_udp_sessions_total", &[("outcome", outcome)])?;
        ensure!(n == 0.0, "{n} sessions ended as {outcome}");
    }
    ensure!(
        sum(
            &relay,
            "relay_connections_total",
            &[("outcome", "idle_timeout")]
        )? == expired,
        "the route's connection outcomes count the expired sessions as idle_timeout"
    );
    // And a new query after expiry gets a fresh session.
    ensure!(
        dig(port, &[])?.trim() == ANSWER,
        "a query after the sessions expired"
    );
    Ok(())
}

/// Echoes every datagram back to its sender, as it came.
fn udp_echo() -> Result<SocketAddr> {
    udp_echo_tagged("")
}

/// Echoes every datagram back to its sender after `tag`, so a test sees
/// which peer answered.
fn udp_echo_tagged(tag: &'static str) -> Result<SocketAddr> {
    let socket = UdpSocket::bind("127.0.0.1:0").context("binding the UDP echo peer")?;
    let addr = socket.local_addr()?;
    thread::spawn(move || {
        let mut buf = vec![0u8; 65_535];
        while let Ok((n, peer)) = socket.recv_from(&mut buf) {
            let mut reply = tag.as_bytes().to_vec();
            reply.extend_from_slice(&buf[..n]);
            let _ = socket.send_to(&reply, peer);
        }
    });
    Ok(addr)
}

#[test]
fn datagram_boundaries_are_kept_both_ways() -> Result<()> {
    let echo = udp_echo()?;
    let port = free_udp_port()?;
    let relay = udp_relay(port, &format!("UDP:{echo}"), &[])?;
    let client = UdpSocket::bind("127.0.0.1:0")?;
    client.set_read_timeout(Some(WAIT))?;
    client.connect(loopback(port))?;
    let sizes = [1usize, 1_400, 60_000];
    // All three first, then the replies: each must come back in a datagram
    // of its own, in its size, with its bytes.
    for (i, size) in sizes.iter().enumerate() {
        let datagram: Vec<u8> = (0..*size)
            .map(|b| (b as u8).wrapping_add(i as u8))
            .collect();
        client.send(&datagram)?;
    }
    let mut buf = vec![0u8; 65_536];
    let mut got = Vec::new();
    for _ in sizes {
        let n = client.recv(&mut buf).context("a reply through relay")?;
        got.push(buf[..n].to_vec());
    }
    got.sort_by_key(Vec::len);
    for (i, size) in sizes.iter().enumerate() {
        let expected: Vec<u8> = (0..*size)
            .map(|b| (b as u8).wrapping_add(i as u8))
            .collect();
        ensure!(
            got[i] == expected,
            "the {size}-byte datagram came back as {} bytes (or with other bytes)",
            got[i].len()
        );
    }
    relay.wait_metric(
        "relay_udp_datagrams_total",
        &[("direction", "to_client")],
        3.0,
        WAIT,
    )?;
    relay.wait_metric(
        "relay_bytes_total",
        &[("direction", "to_client")],
        (1 + 1_400 + 60_000) as f64,
        WAIT,
    )?;
    Ok(())
}

#[test]
fn socat_as_the_client_gets_its_datagram_back() -> Result<()> {
    require_tool!("socat");
    let echo = udp_echo()?;
    let port = free_udp_port()?;
    let _relay = udp_relay(port, &format!("UDP:{echo}"), &[])?;
    let out = output_of({
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            &format!("printf 'hello over udp' | socat -t 5 - UDP:127.0.0.1:{port}"),
        ]);
        cmd
    })?;
    ensure!(out == "hello over udp", "socat through relay got {out:?}");
    Ok(())
}

#[test]
fn a_client_beyond_max_sessions_is_counted_as_limited() -> Result<()> {
    let echo = udp_echo()?;
    let port = free_udp_port()?;
    let relay = udp_relay(port, &format!("UDP:{echo}"), &["--max-sessions", "1"])?;
    let ask = |client: &UdpSocket, bytes: &[u8]| -> Result<Vec<u8>> {
        client.send_to(bytes, loopback(port))?;
        let mut buf = [0u8; 64];
        let (n, _) = client.recv_from(&mut buf)?;
        Ok(buf[..n].to_vec())
    };
    let first = UdpSocket::bind("127.0.0.1:0")?;
    first.set_read_timeout(Some(WAIT))?;
    ensure!(ask(&first, b"one")? == b"one", "the first client is served");
    let second = UdpSocket::bind("127.0.0.1:0")?;
    second.send_to(b"two", loopback(port))?;
    relay.wait_metric(
        "relay_udp_sessions_total",
        &[("outcome", "limited")],
        1.0,
        WAIT,
    )?;
    relay.wait_metric(
        "relay_connections_total",
        &[("outcome", "limit")],
        1.0,
        WAIT,
    )?;
    ensure!(
        ask(&first, b"again")? == b"again",
        "the open session goes on"
    );
    ensure!(
        sum(&relay, "relay_udp_sessions_active", &[])? == 1.0,
        "one session open, the limited client's never made"
    );
    Ok(())
}

#[test]
fn mixed_udp_and_stream_pairs_and_udp_with_tls_are_refused() -> Result<()> {
    let tcp = free_port()?;
    let udp = free_udp_port()?;
    let cases: [(&[String], &[&str]); 5] = [
        (
            &[
                format!("UDP-LISTEN:{udp},fork"),
                format!("TCP:127.0.0.1:{tcp}"),
            ],
            &["must be UDP too", "TCP-LISTEN"],
        ),
        (
            &[
                format!("TCP-LISTEN:{tcp},fork"),
                format!("UDP:127.0.0.1:{udp}"),
            ],
            &["must be UDP too", "UDP-LISTEN"],
        ),
        (
            &[
                format!("UDP-LISTEN:{udp},fork,cert=/x.pem"),
                format!("UDP:127.0.0.1:{udp}"),
            ],
            &["`cert` is a TLS option", "DTLS"],
        ),
        (
            &[
                format!("UDP-RECVFROM:{udp}"),
                format!("UDP:127.0.0.1:{udp}"),
            ],
            &["UDP-RECVFROM", "UDP-LISTEN:<port>,fork"],
        ),
        (
            &[
                "forward".to_string(),
                format!("udp://127.0.0.1:{udp}"),
                format!("127.0.0.1:{tcp}"),
            ],
            &["must be UDP too"],
        ),
    ];
    RelayCmd::raw(&[
        format!("UDP-LISTEN:{udp},fork"),
        format!("UDP:127.0.0.1:{udp}"),
        "--tls-cert".to_string(),
        "/nonexistent.pem".to_string(),
    ])
    .expect_usage_error(WAIT, &["TLS flag"])?;
    for (args, names) in cases {
        RelayCmd::raw(args).expect_usage_error(WAIT, names)?;
    }
    Ok(())
}

/// A changed UDP route takes its socket over on SIGHUP (every datagram from
/// then on reaches the new target, a client with an old session included),
/// and a removed one drains and takes its series with it.
#[test]
fn a_reload_hands_a_changed_udp_route_its_socket_and_removes_a_removed_one() -> Result<()> {
    let (old, new) = (udp_echo_tagged("old:")?, udp_echo_tagged("new:")?);
    let dir = relay_tests::tempdir::TempDir::new("udp-reload")?;
    let file = dir.join("relay.toml");
    let (port, other) = (free_udp_port()?, free_udp_port()?);
    let route = |name: &str, port: u16, target: SocketAddr| {
        format!(
            "[[route]]\nname = \"{name}\"\nlisten = \"udp://127.0.0.1:{port}\"\ntarget = \"udp://{target}\"\nidle-timeout = \"1s\"\ndrain-timeout = \"5s\"\n"
        )
    };
    std::fs::write(&file, route("dns", port, old))?;
    let relay = RelayCmd::raw(&["run", "-c", &file.to_string_lossy()])
        .with_metrics()?
        .spawn()?;
    let ask = |client: &UdpSocket, bytes: &[u8]| -> Result<Vec<u8>> {
        client.send_to(bytes, loopback(port))?;
        let mut buf = [0u8; 64];
        let (n, _) = client.recv_from(&mut buf)?;
        Ok(buf[..n].to_vec())
    };
    let a = UdpSocket::bind("127.0.0.1:0")?;
    a.set_read_timeout(Some(WAIT))?;
    ensure!(
        ask(&a, b"x")? == b"old:x",
        "before the reload, the old target"
    );
    std::fs::write(&file, route("dns", port, new))?;
    relay.signal(nix::sys::signal::Signal::SIGHUP)?;
    relay.wait_metric(
        "relay_config_reloads_total",
        &[("outcome", "ok")],
        1.0,
        WAIT,
    )?;
    ensure!(
        ask(&a, b"y")? == b"new:y",
        "after the reload, a client with an open session reaches the new target"
    );
    let b = UdpSocket::bind("127.0.0.1:0")?;
    b.set_read_timeout(Some(WAIT))?;
    ensure!(
        ask(&b, b"z")? == b"new:z",
        "after the reload, a new client reaches the new target"
    );
    std::fs::write(&file, route("other", other, new))?;
    relay.signal(nix::sys::signal::Signal::SIGHUP)?;
    relay.wait_metric(
        "relay_config_reloads_total",
        &[("outcome", "ok")],
        2.0,
        WAIT,
    )?;
    poll_until("the removed route's UDP series to go", WAIT, || {
        let scrape = relay.scrape()?;
        let gone = scrape
            .value("relay_udp_sessions_active", &[("route", "dns")])
            .is_none()
            && scrape
                .value("relay_udp_sessions_active", &[("route", "other")])
                .is_some();
        Ok(gone.then_some(()))
    })?;
    Ok(())
}
