//! relay forward: what a client and a target see through the relay.
//!
//! Bytes arrive whole (SHA-256 over sizes and both directions, and across
//! 1000 concurrent connections), half-close and reset travel to the other
//! side, and a target that refuses, never answers, or goes quiet ends the
//! client's connection the way the contract says, counted by outcome.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use relay_tests::netns::NetNs;
use relay_tests::payload::read_fingerprint;
use relay_tests::peers::{self, Backend, Closed, EchoServer, expect_close, round_trip};
use relay_tests::ports::free_port;
use relay_tests::{Fingerprint, Payload, RelayCmd, require_root};

/// Generous bound for peers to report back over a channel.
const REPORT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long metric counters may lag behind the close a client saw.
const METRIC_TIMEOUT: Duration = Duration::from_secs(5);

const CONNECTIONS_TOTAL: &str = "relay_connections_total";

/// Receive what a backend handler reported, or fail saying what was awaited.
fn report<T>(rx: &mpsc::Receiver<Result<T, String>>, what: &str) -> Result<T> {
    rx.recv_timeout(REPORT_TIMEOUT)
        .map_err(|e| anyhow!("no report from the backend about {what}: {e}"))?
        .map_err(|e| anyhow!("backend failed while {what}: {e}"))
}

// ---------------------------------------------------------------- integrity

/// Which way the payload travels.
#[derive(Clone, Copy, Debug)]
enum Direction {
    /// Client writes, target reads.
    ToTarget,
    /// Target writes, client reads.
    ToClient,
}

/// Send `len` bytes one way through the relay; the receiving end's SHA-256
/// must equal the sender's.
fn payload_arrives_intact(direction: Direction, len: u64) -> Result<()> {
    let payload = Payload::new(0x5eed ^ len, len);
    let (tx, rx) = mpsc::channel();
    let backend = Backend::start(move |mut conn| {
        let seen = match direction {
            Direction::ToTarget => read_fingerprint(&mut conn),
            Direction::ToClient => payload.write_to(&mut conn),
        };
        let _ = tx.send(seen.map_err(|e| e.to_string()));
    })?;
    let relay = RelayCmd::loopback_to(backend.addr())?.spawn()?;
    let mut client = relay.connect()?;
    let (sent, received) = match direction {
        Direction::ToTarget => {
            let sent = payload
                .write_to(&mut client)
                .context("client sending the payload")?;
            client.shutdown(Shutdown::Write)?;
            (sent, report(&rx, "reading the payload")?)
        }
        Direction::ToClient => {
            let received = read_fingerprint(&mut client).context("client reading the payload")?;
            (report(&rx, "sending the payload")?, received)
        }
    };
    ensure!(
        received == sent,
        "{direction:?}: expected the receiver to get what was sent ({sent}), got {received}"
    );
    Ok(())
}

macro_rules! integrity_tests {
    ($($name:ident: $direction:ident, $len:expr;)*) => {$(
        #[test]
        fn $name() -> Result<()> {
            payload_arrives_intact(Direction::$direction, $len)
        }
    )*};
}

integrity_tests! {
    one_byte_to_target_arrives_intact: ToTarget, 1;
    one_byte_to_client_arrives_intact: ToClient, 1;
    one_kib_to_target_arrives_intact: ToTarget, 1024;
    one_kib_to_client_arrives_intact: ToClient, 1024;
    sixty_four_kib_plus_one_to_target_arrives_intact: ToTarget, 64 * 1024 + 1;
    sixty_four_kib_plus_one_to_client_arrives_intact: ToClient, 64 * 1024 + 1;
    one_mib_to_target_arrives_intact: ToTarget, 1 << 20;
    one_mib_to_client_arrives_intact: ToClient, 1 << 20;
    hundred_mib_to_target_arrives_intact: ToTarget, 100 << 20;
    hundred_mib_to_client_arrives_intact: ToClient, 100 << 20;
}

// -------------------------------------------------------------- concurrency

const CONCURRENT: usize = 1000;

#[test]
fn thousand_concurrent_connections_each_get_their_own_bytes_back() -> Result<()> {
    let echo = EchoServer::start()?;
    let relay = RelayCmd::loopback_to(echo.addr())?.spawn()?;
    let addr = relay.addr();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // All connections echo their payload, then wait together (so all 1000
    // are open at once, which the gauge must show), then close.
    let echoed = std::sync::Arc::new(tokio::sync::Barrier::new(CONCURRENT + 1));
    let release = std::sync::Arc::new(tokio::sync::Barrier::new(CONCURRENT + 1));
    let results = runtime.block_on(async {
        let tasks: Vec<_> = (0..CONCURRENT)
            .map(|i| {
                let (echoed, release) = (echoed.clone(), release.clone());
                tokio::spawn(async move {
                    let payload = Payload::new(i as u64, 100 + (i as u64 * 97) % 8000);
                    let opened =
                        tokio::time::timeout(REPORT_TIMEOUT, echo_once(addr, payload)).await;
                    echoed.wait().await;
                    release.wait().await;
                    let stream = match opened {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(e)) => return Err(format!("connection {i}: {e}")),
                        Err(_) => {
                            return Err(format!(
                                "connection {i}: no echo within {REPORT_TIMEOUT:?}"
                            ));
                        }
                    };
                    close_after_echo(stream)
                        .await
                        .map_err(|e| format!("connection {i}: {e}"))
                })
            })
            .collect();
        echoed.wait().await;
        let relay = &relay;
        let active = tokio::task::block_in_place(|| {
            relay.wait_metric(
                "relay_active_connections",
                &[],
                CONCURRENT as f64,
                METRIC_TIMEOUT,
            )
        });
        release.wait().await;
        let mut results = Vec::new();
        for task in tasks {
            results.push(
                task.await
                    .map_err(|e| format!("task panicked: {e}"))
                    .and_then(|r| r),
            );
        }
        (active, results)
    });
    let (active, results) = results;
    let failures: Vec<String> = results.into_iter().filter_map(Result::err).collect();
    ensure!(
        failures.is_empty(),
        "expected all {CONCURRENT} connections to echo intact, {} failed; first ones:\n{}",
        failures.len(),
        failures
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    active.context("while all connections were open")?;
    relay.wait_outcome("closed", CONCURRENT as f64, METRIC_TIMEOUT)?;
    Ok(())
}

/// Connect, send the payload, read back exactly as many bytes, compare.
async fn echo_once(addr: SocketAddr, payload: Payload) -> Result<tokio::net::TcpStream> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .context("connect")?;
    let sent = payload.to_vec();
    let (mut reader, mut writer) = stream.split();
    let mut back = vec![0u8; sent.len()];
    let (written, read) = tokio::join!(writer.write_all(&sent), reader.read_exact(&mut back));
    written.context("write")?;
    read.context("read echo")?;
    let (expected, got) = (Fingerprint::of(&sent), Fingerprint::of(&back));
    ensure!(
        got == expected,
        "expected the echo to be {expected}, got {got}"
    );
    Ok(stream)
}

/// Half-close, then expect EOF with no stray bytes.
async fn close_after_echo(mut stream: tokio::net::TcpStream) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.shutdown().await.context("shutdown(write)")?;
    let mut rest = Vec::new();
    tokio::time::timeout(REPORT_TIMEOUT, stream.read_to_end(&mut rest))
        .await
        .context("no EOF after half-close")?
        .context("reading to EOF")?;
    ensure!(
        rest.is_empty(),
        "expected EOF after the echo, got {} more bytes",
        rest.len()
    );
    Ok(())
}

// --------------------------------------------------------------- half-close

/// Which side half-closes first (and then waits for the other's big reply).
#[derive(Clone, Copy, Debug)]
enum FirstCloser {
    Client,
    Target,
}

const REQUEST_LEN: u64 = 1000;
const REPLY_LEN: u64 = 4 << 20;
/// The answering side waits this long after the EOF before replying: long
/// enough for a relay that wrongly ends a half-closed connection to do so.
const REPLY_DELAY: Duration = Duration::from_millis(700);

/// Write a request, half-close, read the reply to EOF.
fn ask(stream: &mut TcpStream, request: Payload) -> std::io::Result<Fingerprint> {
    request.write_to(stream)?;
    stream.shutdown(Shutdown::Write)?;
    read_fingerprint(stream)
}

/// Read the request to EOF, wait, send a large reply in paced chunks, close.
fn answer_late(stream: &mut TcpStream, reply: Payload) -> std::io::Result<Fingerprint> {
    let request = read_fingerprint(stream)?;
    std::thread::sleep(REPLY_DELAY);
    reply.write_paced(stream, Some(Duration::from_millis(2)))?;
    stream.shutdown(Shutdown::Write)?;
    Ok(request)
}

/// The side that half-closed first still receives the other side's reply,
/// whole; and the request arrived whole too.
fn half_closed_side_still_receives_reply(first: FirstCloser) -> Result<()> {
    let request = Payload::new(1, REQUEST_LEN);
    let reply = Payload::new(2, REPLY_LEN);
    let (tx, rx) = mpsc::channel();
    let backend = Backend::start(move |mut conn| {
        let seen = match first {
            FirstCloser::Client => answer_late(&mut conn, reply),
            FirstCloser::Target => ask(&mut conn, request),
        };
        let _ = tx.send(seen.map_err(|e| e.to_string()));
    })?;
    let relay = RelayCmd::loopback_to(backend.addr())?.spawn()?;
    let mut client = relay.connect()?;
    let (request_seen, reply_seen) = match first {
        FirstCloser::Client => {
            let reply_seen = ask(&mut client, request).context("client asking")?;
            (report(&rx, "answering")?, reply_seen)
        }
        FirstCloser::Target => {
            let request_seen = answer_late(&mut client, reply).context("client answering")?;
            (request_seen, report(&rx, "asking")?)
        }
    };
    ensure!(
        request_seen == request.fingerprint(),
        "{first:?} closed first: expected the request ({}) to arrive whole, got {request_seen}",
        request.fingerprint()
    );
    ensure!(
        reply_seen == reply.fingerprint(),
        "{first:?} closed first: expected the late reply ({}) to arrive whole, got {reply_seen}",
        reply.fingerprint()
    );
    relay.wait_outcome("closed", 1.0, METRIC_TIMEOUT)?;
    Ok(())
}

#[test]
fn half_close_reply_arrives_whole() -> Result<()> {
    half_closed_side_still_receives_reply(FirstCloser::Client)
}

#[test]
fn target_half_close_still_lets_client_data_arrive_whole() -> Result<()> {
    half_closed_side_still_receives_reply(FirstCloser::Target)
}

// -------------------------------------------------------------------- reset

/// Which side aborts the connection with RST.
#[derive(Clone, Copy, Debug)]
enum Resetter {
    Client,
    Target,
}

/// After one byte has crossed (so both legs exist), `resetter` closes with
/// SO_LINGER 0; the other side's read must fail with ECONNRESET.
fn reset_reaches_other_side(resetter: Resetter) -> Result<()> {
    let (tx, rx) = mpsc::channel::<Result<&'static str, String>>();
    let backend = Backend::start(move |mut conn| {
        let mut byte = [0u8; 1];
        if let Err(e) = conn.read_exact(&mut byte) {
            let _ = tx.send(Err(format!("reading the first byte: {e}")));
            return;
        }
        let outcome = match resetter {
            Resetter::Target => peers::reset(conn)
                .map(|()| "reset sent")
                .map_err(|e| format!("{e:#}")),
            Resetter::Client => {
                let _ = tx.send(Ok("got the byte"));
                match expect_close(&mut conn, Duration::from_secs(5)) {
                    Ok((Closed::Reset, _)) => Ok("saw reset"),
                    Ok((Closed::Eof, _)) => Err("expected ECONNRESET, got EOF (FIN)".to_string()),
                    Err(e) => Err(format!("{e:#}")),
                }
            }
        };
        let _ = tx.send(outcome);
    })?;
    let relay = RelayCmd::loopback_to(backend.addr())?.spawn()?;
    let mut client = relay.connect()?;
    client.write_all(b"x")?;
    match resetter {
        Resetter::Target => {
            report(&rx, "resetting")?;
            let (closed, _) = expect_close(&mut client, Duration::from_secs(5))?;
            ensure!(
                closed == Closed::Reset,
                "target sent RST: expected the client to see ECONNRESET, got {closed:?}"
            );
        }
        Resetter::Client => {
            report(&rx, "reading the first byte")?;
            peers::reset(client)?;
            let seen = report(&rx, "waiting for the reset")?;
            ensure!(
                seen == "saw reset",
                "expected the target to see ECONNRESET, got {seen}"
            );
        }
    }
    relay.wait_outcome("reset", 1.0, METRIC_TIMEOUT)?;
    Ok(())
}

#[test]
fn target_reset_reaches_client_as_connection_reset() -> Result<()> {
    reset_reaches_other_side(Resetter::Target)
}

#[test]
fn client_reset_reaches_target_as_connection_reset() -> Result<()> {
    reset_reaches_other_side(Resetter::Client)
}

// ------------------------------------------------- refused and unanswered targets

#[test]
fn refused_target_closes_client_promptly_and_relay_keeps_serving() -> Result<()> {
    let target = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
    let relay = RelayCmd::loopback_to(target)?.spawn()?;
    let mut client = relay.connect()?;
    let (closed, after) = expect_close(&mut client, Duration::from_secs(5))?;
    ensure!(
        after < Duration::from_secs(2),
        "expected the client's connection closed within 2s of a refused upstream, took {after:?} ({closed:?})"
    );
    relay.wait_outcome("refused", 1.0, METRIC_TIMEOUT)?;

    // The same relay serves the next connection once the target is up.
    let _echo = EchoServer::start_on(target)?;
    let mut client = relay.connect()?;
    round_trip(&mut client, b"served after a refusal")
        .context("second connection, target now up")?;
    Ok(())
}

/// How the connect timeout is given.
#[derive(Clone, Copy, Debug)]
enum ConnectTimeoutSpelling {
    /// `relay forward L T --connect-timeout 1s`
    Option,
    /// `relay TCP-LISTEN:..,fork TCP:host:port,connect-timeout=1`
    SocatAddressOption,
}

/// A target whose SYNs vanish: after the connect timeout the client's
/// connection closes, counted as `connect_timeout`.
fn unanswered_target_times_out(spelling: ConnectTimeoutSpelling) -> Result<()> {
    let ns = NetNs::create()?;
    ns.silence()?;
    let port = free_port()?;
    let cmd = match spelling {
        ConnectTimeoutSpelling::Option => RelayCmd::forward(
            SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            SocketAddr::from((ns.addr(), 80)),
        )
        .opts(&["--connect-timeout", "1s"]),
        ConnectTimeoutSpelling::SocatAddressOption => RelayCmd::socat(
            port,
            format!("TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr"),
            format!("TCP:{}:80,connect-timeout=1", ns.addr()),
        ),
    };
    let relay = cmd.with_metrics()?.spawn()?;
    let mut client = relay.connect()?;
    let (closed, after) = expect_close(&mut client, Duration::from_secs(8))?;
    ensure!(
        (Duration::from_millis(900)..Duration::from_millis(2500)).contains(&after),
        "{spelling:?}: expected the client closed ~1s after connecting (0.9..2.5s), took {after:?} ({closed:?})"
    );
    relay.wait_outcome("connect_timeout", 1.0, METRIC_TIMEOUT)?;
    Ok(())
}

#[test]
fn unanswered_target_closes_client_after_connect_timeout_option() -> Result<()> {
    require_root!("creates a network namespace that swallows SYNs");
    unanswered_target_times_out(ConnectTimeoutSpelling::Option)
}

#[test]
fn unanswered_target_closes_client_after_socat_connect_timeout() -> Result<()> {
    require_root!("creates a network namespace that swallows SYNs");
    unanswered_target_times_out(ConnectTimeoutSpelling::SocatAddressOption)
}

// --------------------------------------------------------------------- idle

/// The idle timeout of 1 s, spelled as given.
const IDLE_SPELLINGS: [&[&str]; 2] = [&["--idle-timeout", "1s"], &["-T", "1"]];

/// A connection with no traffic is closed ~1 s after its last byte.
fn idle_connection_closes(spelling: &[&str]) -> Result<()> {
    let echo = EchoServer::start()?;
    let relay = RelayCmd::loopback_to(echo.addr())?.opts(spelling).spawn()?;
    let mut client = relay.connect()?;
    round_trip(&mut client, b"last words")?;
    let (closed, after) = expect_close(&mut client, Duration::from_secs(5))?;
    ensure!(
        (Duration::from_millis(800)..Duration::from_millis(2500)).contains(&after),
        "{spelling:?}: expected an idle connection closed ~1s after its last byte (0.8..2.5s), took {after:?} ({closed:?})"
    );
    relay.wait_outcome("idle_timeout", 1.0, METRIC_TIMEOUT)?;
    Ok(())
}

#[test]
fn idle_connection_is_closed_after_idle_timeout() -> Result<()> {
    idle_connection_closes(IDLE_SPELLINGS[0])
}

#[test]
fn idle_connection_is_closed_after_socat_dash_t() -> Result<()> {
    idle_connection_closes(IDLE_SPELLINGS[1])
}

#[test]
fn traffic_every_300ms_keeps_connection_open_past_idle_timeout() -> Result<()> {
    let echo = EchoServer::start()?;
    let relay = RelayCmd::loopback_to(echo.addr())?
        .opts(IDLE_SPELLINGS[0])
        .spawn()?;
    let mut client = relay.connect()?;
    let start = Instant::now();
    let mut round = 0u8;
    while start.elapsed() < Duration::from_secs(3) {
        round_trip(&mut client, &[round]).with_context(|| {
            format!(
                "round {round} at {:?}: the connection should still be open",
                start.elapsed()
            )
        })?;
        round += 1;
        // The cadence is the behaviour under test, not a wait for readiness.
        std::thread::sleep(Duration::from_millis(300));
    }
    client.shutdown(Shutdown::Write)?;
    let (closed, _) = expect_close(&mut client, Duration::from_secs(5))?;
    ensure!(
        closed == Closed::Eof,
        "expected an orderly EOF after our half-close, got {closed:?}"
    );
    let scrape = relay.wait_outcome("closed", 1.0, METRIC_TIMEOUT)?;
    let idle = scrape.counter(CONNECTIONS_TOTAL, &[("outcome", "idle_timeout")]);
    if idle != 0.0 {
        bail!("expected no idle_timeout for a busy connection, got {idle}");
    }
    Ok(())
}

// --------------------------------------------------------------------- IPv6

#[test]
fn ipv6_loopback_listen_and_target_carry_bytes() -> Result<()> {
    let Ok(listener) = std::net::TcpListener::bind("[::1]:0") else {
        relay_tests::gate::report_skip("needs IPv6 on loopback (::1)");
        return Ok(());
    };
    let echo = EchoServer::on(listener)?;
    let listen: SocketAddr = format!("[::1]:{}", free_port()?).parse()?;
    let relay = RelayCmd::forward(listen, echo.addr()).spawn()?;
    let mut client = relay.connect()?;
    round_trip(&mut client, b"over v6")
}
