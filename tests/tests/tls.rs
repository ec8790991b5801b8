//! relay with TLS on either leg (docs/TLS-CONTRACT.md), against real TLS
//! peers: redis-server with mutual TLS, openssl s_server / s_client, tshark
//! reading relay's key log, and an in-process rustls client where a test
//! must steer the protocol (close_notify, which certificate came).
//!
//! Every certificate is made at run time by [`relay_tests::certs`].

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use relay_tests::certs::{Ca, CertSpec, Issued};
use relay_tests::interactive::contains;
use relay_tests::openssl::{SServer, s_client};
use relay_tests::peers::{EchoServer, round_trip};
use relay_tests::ports::free_port;
use relay_tests::redis::{RedisTls, redis_cli};
use relay_tests::relay_proc::{json_field, json_log_lines};
use relay_tests::tls_client::{TlsClient, TlsClose};
use relay_tests::tshark::{Capture, decrypted_http_uris};
use relay_tests::wait::poll_until;
use relay_tests::{Payload, Relay, RelayCmd, http, require_root, require_tool};

/// Counters move a moment after the client sees the close.
const METRIC_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a TLS client may take to connect, talk and hang up.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

const HANDSHAKES: &str = "relay_tls_handshakes_total";
const CONNECTIONS: &str = "relay_connections_total";

/// One CA, a server certificate for 127.0.0.1, and two client certificates.
struct Pki {
    ca: Ca,
    server: Issued,
    alice: Issued,
    bob: Issued,
}

impl Pki {
    fn new() -> Result<Self> {
        let ca = Ca::new("relay-tests-ca")?;
        Ok(Self {
            server: ca.issue("server", &CertSpec::loopback_server())?,
            alice: ca.issue("alice", &CertSpec::client("alice"))?,
            bob: ca.issue("bob", &CertSpec::client("bob"))?,
            ca,
        })
    }

    fn ca_path(&self) -> String {
        path_arg(self.ca.cert_path())
    }
}

fn path_arg(path: &Path) -> String {
    path.display().to_string()
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// `relay forward tls://127.0.0.1:<free> <target> --tls-cert --tls-key
/// --metrics ...` with `server`'s certificate, plus `opts`.
fn tls_listener(server: &Issued, target: SocketAddr, opts: &[String]) -> Result<Relay> {
    RelayCmd::forward(loopback(free_port()?), target)
        .listen_scheme("tls")
        .opts(&["--tls-cert", &path_arg(&server.cert)])
        .opts(&["--tls-key", &path_arg(&server.key)])
        .opts(opts)
        .with_metrics()?
        .spawn()
}

/// Wait until `relay_tls_handshakes_total{role,outcome}` reaches `expected`.
fn wait_handshakes(relay: &Relay, role: &str, outcome: &str, expected: f64) -> Result<()> {
    relay
        .wait_metric(
            HANDSHAKES,
            &[("role", role), ("outcome", outcome)],
            expected,
            METRIC_TIMEOUT,
        )
        .map(drop)
}

/// Read until the peer closes, tolerating a reset; returns what came.
fn read_until_closed(stream: &mut TcpStream) -> Result<Vec<u8>> {
    stream
        .set_read_timeout(Some(CLIENT_TIMEOUT))
        .context("setting SO_RCVTIMEO")?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Ok(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(got),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => bail!("expected the relay to close the connection, got: {e}"),
        }
    }
}

// ---------------------------------------------------------------------------
// 1. Plain client -> relay -> redis-server that speaks only (mutual) TLS.

/// How relay is told to originate TLS.
#[derive(Clone, Copy, Debug)]
enum OriginForm {
    /// `relay forward <l> tls://host:port --tls-ca --tls-cert --tls-key`.
    Url,
    /// `relay TCP-LISTEN:<p>,fork,reuseaddr OPENSSL:host:port,cafile=,cert=,key=`.
    Socat,
}

fn redis_round_trips_through_relay(form: OriginForm) -> Result<()> {
    require_tool!("redis-server");
    require_tool!("redis-cli");
    let pki = Pki::new()?;
    let redis = RedisTls::start(loopback(free_port()?), &pki.ca, &pki.server)?;
    let cmd = match form {
        OriginForm::Url => RelayCmd::loopback_to(format!("tls://{}", redis.addr()))?.opts(&[
            "--tls-ca".to_string(),
            pki.ca_path(),
            "--tls-cert".to_string(),
            path_arg(&pki.alice.cert),
            "--tls-key".to_string(),
            path_arg(&pki.alice.key),
        ]),
        OriginForm::Socat => {
            let port = free_port()?;
            RelayCmd::socat(
                port,
                format!("TCP-LISTEN:{port},fork,reuseaddr"),
                format!(
                    "OPENSSL:{}:{},cafile={},cert={},key={}",
                    redis.addr().ip(),
                    redis.addr().port(),
                    pki.ca_path(),
                    path_arg(&pki.alice.cert),
                    path_arg(&pki.alice.key)
                ),
            )
            .with_metrics()?
        }
    };
    let relay = cmd.spawn()?;

    let expect = |args: &[&str], value: Option<&[u8]>, want: &[u8]| -> Result<()> {
        let got = redis_cli(relay.addr(), args, value)?;
        ensure!(
            got == want,
            "redis-cli {args:?} through relay ({form:?}): expected {:?}, got {:?}",
            preview(want),
            preview(&got)
        );
        Ok(())
    };
    expect(&["SET", "greeting", "hello over tls"], None, b"OK\n")?;
    expect(&["GET", "greeting"], None, b"hello over tls\n")?;
    // 1 MiB of printable bytes: several TLS records and TCP windows.
    let big: Vec<u8> = Payload::new(0x0072_6564_6973, 1 << 20)
        .to_vec()
        .iter()
        .map(|b| b'a' + b % 26)
        .collect();
    expect(&["SET", "big"], Some(&big), b"OK\n")?;
    let mut big_line = big.clone();
    big_line.push(b'\n');
    expect(&["GET", "big"], None, &big_line)?;
    wait_handshakes(&relay, "client", "ok", 4.0)
}

/// At most 80 characters of `bytes`, for messages about big values.
fn preview(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    if text.len() <= 80 {
        return text.into_owned();
    }
    format!(
        "{}... ({} bytes)",
        text.chars().take(80).collect::<String>(),
        bytes.len()
    )
}

#[test]
fn redis_cli_reaches_tls_only_redis_through_tls_url_target() -> Result<()> {
    redis_round_trips_through_relay(OriginForm::Url)
}

#[test]
fn redis_cli_reaches_tls_only_redis_through_socat_openssl_address() -> Result<()> {
    redis_round_trips_through_relay(OriginForm::Socat)
}

// ---------------------------------------------------------------------------
// 2. openssl s_client -> relay's TLS listener -> plain echo backend.

/// Who the s_client is and what relay's listener demands.
struct ListenerCase {
    /// `--tls-client-ca` given.
    client_ca: bool,
    /// `--tls-allow-name` values.
    allow: &'static [&'static str],
    /// The client certificate s_client presents, by CN.
    client: Option<&'static str>,
    /// The handshake outcome relay must count for it.
    outcome: &'static str,
}

fn s_client_through_tls_listener(case: &ListenerCase) -> Result<()> {
    require_tool!("openssl");
    let pki = Pki::new()?;
    let echo = EchoServer::start()?;
    let mut opts = Vec::new();
    if case.client_ca {
        opts.extend(["--tls-client-ca".to_string(), pki.ca_path()]);
    }
    for name in case.allow {
        opts.extend(["--tls-allow-name".to_string(), name.to_string()]);
    }
    let relay = tls_listener(&pki.server, echo.addr(), &opts)?;
    let identity = match case.client {
        Some("alice") => Some(&pki.alice),
        Some("bob") => Some(&pki.bob),
        Some(other) => bail!("no client certificate for {other} in the test PKI"),
        None => None,
    };
    let mut client = s_client(relay.addr(), pki.ca.cert_path(), identity)?;
    let marker = format!("tls-listener-marker-{}\n", std::process::id());
    let accepted = case.outcome == "ok";
    if accepted {
        client.send(marker.as_bytes())?;
        client.wait_for_output(marker.as_bytes(), CLIENT_TIMEOUT)?;
        // EOF on its input: s_client sends close_notify and exits.
        client.close_stdin();
        let status = client.wait_exit(CLIENT_TIMEOUT)?;
        ensure!(
            status.success(),
            "s_client with {:?}: expected exit 0 after its echo, got {status}\nstderr:\n{}",
            case.client,
            client.stderr()
        );
    } else {
        // s_client may already have exited on the alert; EPIPE then. Its
        // stdin stays open: it must end because relay refused it.
        let _ = client.send(marker.as_bytes());
        let status = client.wait_exit(CLIENT_TIMEOUT)?;
        ensure!(
            !status.success() && !contains(&client.stdout(), marker.as_bytes()),
            "s_client with {:?}: expected refusal (no echo, non-zero exit), got {status} and stdout {:?}\nstderr:\n{}",
            case.client,
            String::from_utf8_lossy(&client.stdout()),
            client.stderr()
        );
        ensure!(
            echo.accepted() == 0,
            "a refused TLS client must not reach the backend; backend accepted {}",
            echo.accepted()
        );
        relay.wait_metric(
            CONNECTIONS,
            &[("outcome", "tls_error")],
            1.0,
            METRIC_TIMEOUT,
        )?;
    }
    wait_handshakes(&relay, "server", case.outcome, 1.0)
}

#[test]
fn s_client_data_round_trips_through_tls_listener() -> Result<()> {
    s_client_through_tls_listener(&ListenerCase {
        client_ca: false,
        allow: &[],
        client: None,
        outcome: "ok",
    })
}

#[test]
fn tls_listener_with_client_ca_accepts_client_with_cert() -> Result<()> {
    s_client_through_tls_listener(&ListenerCase {
        client_ca: true,
        allow: &[],
        client: Some("alice"),
        outcome: "ok",
    })
}

#[test]
fn tls_listener_with_client_ca_refuses_client_without_cert() -> Result<()> {
    s_client_through_tls_listener(&ListenerCase {
        client_ca: true,
        allow: &[],
        client: None,
        outcome: "no_client_cert",
    })
}

#[test]
fn tls_listener_allow_name_accepts_listed_cn() -> Result<()> {
    s_client_through_tls_listener(&ListenerCase {
        client_ca: true,
        allow: &["alice"],
        client: Some("alice"),
        outcome: "ok",
    })
}

#[test]
fn tls_listener_allow_name_refuses_other_cn() -> Result<()> {
    s_client_through_tls_listener(&ListenerCase {
        client_ca: true,
        allow: &["alice"],
        client: Some("bob"),
        outcome: "not_allowed",
    })
}

// ---------------------------------------------------------------------------
// 3. Handshake failures are counted by name, and the relay keeps serving.

/// What is wrong with the certificate the TLS target presents.
#[derive(Clone, Copy, Debug)]
enum BadTargetCert {
    /// Issued by a CA relay does not trust.
    UnknownCa,
    /// For `other.example`, while relay checks 127.0.0.1.
    WrongName,
    /// `not_after` in the past.
    Expired,
}

/// GET / through `relay`; `Ok(Some(status))` if an HTTP response came.
fn get_through(relay: &Relay, path: &str) -> Result<Option<u16>> {
    let mut stream = relay.connect()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: relay-test\r\n\r\n")
        .context("sending a GET through relay")?;
    let got = read_until_closed(&mut stream)?;
    if got.is_empty() {
        return Ok(None);
    }
    let head = String::from_utf8_lossy(&got);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no HTTP status in {:?}", preview(&got)))?;
    Ok(Some(status))
}

fn target_cert_failure_is_counted_then_relay_serves_good_target(
    bad: BadTargetCert,
    outcome: &str,
) -> Result<()> {
    require_tool!("openssl");
    let pki = Pki::new()?;
    let other_ca = Ca::new("untrusted-ca")?;
    let bad_cert = match bad {
        BadTargetCert::UnknownCa => other_ca.issue("server", &CertSpec::loopback_server())?,
        BadTargetCert::WrongName => pki
            .ca
            .issue("other", &CertSpec::server(&["other.example"]))?,
        BadTargetCert::Expired => pki
            .ca
            .issue("expired", &CertSpec::loopback_server().expired())?,
    };
    let target = loopback(free_port()?);
    let relay = RelayCmd::loopback_to(format!("tls://{target}"))?
        .opts(&["--tls-ca".to_string(), pki.ca_path()])
        .spawn()?;

    let bad_server = SServer::www(target, &bad_cert)?;
    let got = get_through(&relay, "/bad")?;
    ensure!(
        got.is_none(),
        "target with {bad:?} certificate: expected the connection closed without a response, got HTTP {got:?}"
    );
    wait_handshakes(&relay, "client", outcome, 1.0)?;
    relay.wait_metric(
        CONNECTIONS,
        &[("outcome", "tls_error")],
        1.0,
        METRIC_TIMEOUT,
    )?;
    drop(bad_server);

    let _good_server = SServer::www(target, &pki.server)?;
    let got = get_through(&relay, "/good")?;
    ensure!(
        got == Some(200),
        "after a {bad:?} failure, a good target: expected HTTP 200 through relay, got {got:?}"
    );
    wait_handshakes(&relay, "client", "ok", 1.0)
}

#[test]
fn target_cert_from_unknown_ca_is_counted_unknown_ca() -> Result<()> {
    target_cert_failure_is_counted_then_relay_serves_good_target(
        BadTargetCert::UnknownCa,
        "unknown_ca",
    )
}

#[test]
fn target_cert_for_other_name_is_counted_bad_name() -> Result<()> {
    target_cert_failure_is_counted_then_relay_serves_good_target(
        BadTargetCert::WrongName,
        "bad_name",
    )
}

#[test]
fn target_cert_expired_is_counted_expired() -> Result<()> {
    target_cert_failure_is_counted_then_relay_serves_good_target(BadTargetCert::Expired, "expired")
}

/// How relay is told whom to trust and what name to check, for a target
/// whose certificate is fine under that configuration.
#[derive(Clone, Copy, Debug)]
enum TrustSetting {
    /// `--tls-ca <dir>` holding `ca.crt` (Docker's `certs.d/<host:port>/`).
    CaDirectory,
    /// Certificate for `other.example`, target 127.0.0.1, `--tls-name other.example`.
    TlsName,
}

fn target_trusted_by(setting: TrustSetting) -> Result<()> {
    require_tool!("openssl");
    let pki = Pki::new()?;
    let target = loopback(free_port()?);
    let (cert, opts) = match setting {
        TrustSetting::CaDirectory => {
            let dir = pki.ca.dir().join(format!("certs.d/{target}"));
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            std::fs::copy(pki.ca.cert_path(), dir.join("ca.crt"))
                .context("copying the CA into the certs.d directory")?;
            (
                pki.server.clone(),
                vec!["--tls-ca".to_string(), path_arg(&dir)],
            )
        }
        TrustSetting::TlsName => (
            pki.ca
                .issue("other", &CertSpec::server(&["other.example"]))?,
            vec![
                "--tls-ca".to_string(),
                pki.ca_path(),
                "--tls-name".to_string(),
                "other.example".to_string(),
            ],
        ),
    };
    let _server = SServer::www(target, &cert)?;
    let relay = RelayCmd::loopback_to(format!("tls://{target}"))?
        .opts(&opts)
        .spawn()?;
    let got = get_through(&relay, "/trusted")?;
    ensure!(
        got == Some(200),
        "target trusted via {setting:?}: expected HTTP 200 through relay, got {got:?}"
    );
    wait_handshakes(&relay, "client", "ok", 1.0)
}

#[test]
fn tls_ca_directory_of_crt_files_is_trusted() -> Result<()> {
    target_trusted_by(TrustSetting::CaDirectory)
}

#[test]
fn tls_name_overrides_the_name_checked_in_target_cert() -> Result<()> {
    target_trusted_by(TrustSetting::TlsName)
}

#[test]
fn plaintext_to_tls_listener_is_counted_protocol_then_tls_client_served() -> Result<()> {
    let pki = Pki::new()?;
    let echo = EchoServer::start()?;
    let relay = tls_listener(&pki.server, echo.addr(), &[])?;

    let plaintext = b"PING this is not TLS\r\n";
    let mut stream = relay.connect()?;
    stream
        .write_all(plaintext)
        .context("sending plaintext to the TLS listener")?;
    let got = read_until_closed(&mut stream)?;
    ensure!(
        !contains(&got, plaintext),
        "plaintext to a TLS listener: expected no echo, got {:?}",
        preview(&got)
    );
    wait_handshakes(&relay, "server", "protocol", 1.0)?;
    relay.wait_metric(
        CONNECTIONS,
        &[("outcome", "tls_error")],
        1.0,
        METRIC_TIMEOUT,
    )?;
    ensure!(
        echo.accepted() == 0,
        "a failed handshake must not reach the backend; backend accepted {}",
        echo.accepted()
    );

    let mut client = TlsClient::connect(relay.addr(), &pki.ca, None)?;
    round_trip(&mut client, b"after the plaintext, a TLS client")?;
    wait_handshakes(&relay, "server", "ok", 1.0)
}

// ---------------------------------------------------------------------------
// 4. Certificate reload.

#[test]
fn replaced_listener_cert_is_served_to_new_connections_old_ones_keep_working() -> Result<()> {
    let pki = Pki::new()?;
    let v1 = pki
        .ca
        .issue("listener", &CertSpec::loopback_server().cn("listener-v1"))?;
    let echo = EchoServer::start()?;
    let relay = tls_listener(&v1, echo.addr(), &[])?;

    let mut old = TlsClient::connect(relay.addr(), &pki.ca, None)?;
    ensure!(
        old.peer_cert_der().as_deref() == Some(&v1.cert_der[..]),
        "before the swap: expected relay to present {} (serial {})",
        v1.cn,
        v1.serial
    );
    round_trip(&mut old, b"before the swap")?;

    let v2 = pki.ca.issue(
        "listener-v2",
        &CertSpec::loopback_server().cn("listener-v2"),
    )?;
    v2.replace(&v1)?;
    let swapped = Instant::now();
    // Relay re-checks the files at most once per second, on handshakes.
    poll_until(
        &format!("a new connection to see {} (serial {})", v2.cn, v2.serial),
        Duration::from_secs(5),
        || {
            let client = TlsClient::connect(relay.addr(), &pki.ca, None)?;
            let presented = client.peer_cert_der();
            // Hang up properly: a probe is not a reset connection.
            client.close_cleanly()?;
            match presented {
                Some(der) if der == v2.cert_der => Ok(Some(())),
                Some(der) if der == v1.cert_der => Ok(None),
                other => bail!(
                    "expected relay to present {} or {}, got another certificate ({} bytes)",
                    v1.cn,
                    v2.cn,
                    other.map_or(0, |d| d.len())
                ),
            }
        },
    )
    .with_context(|| format!("relay stderr:\n{}", relay.stderr()))?;
    eprintln!(
        "new certificate served {:?} after the swap",
        swapped.elapsed()
    );

    round_trip(&mut old, b"after the swap, on the connection opened before")?;
    let mut new = TlsClient::connect(relay.addr(), &pki.ca, None)?;
    round_trip(&mut new, b"after the swap, on a new connection")
}

// ---------------------------------------------------------------------------
// 5. Key log: tshark decrypts relay's TLS leg with it.

#[test]
fn keylog_lets_tshark_decrypt_the_target_leg() -> Result<()> {
    require_root!("captures on lo with tshark");
    require_tool!("tshark");
    require_tool!("openssl");
    let pki = Pki::new()?;
    let target = loopback(free_port()?);
    let _server = SServer::www(target, &pki.server)?;
    let keylog = pki.ca.dir().join("keys.txt");
    let relay = RelayCmd::loopback_to(format!("tls://{target}"))?
        .opts(&[
            "--tls-ca".to_string(),
            pki.ca_path(),
            "--tls-keylog".to_string(),
            path_arg(&keylog),
        ])
        .spawn()?;

    let capture = Capture::start(target.port(), &pki.ca.dir().join("tls-leg.pcapng"))?;
    let marker = format!("/relay-keylog-marker-{}", std::process::id());
    let response = http::get(relay.connect()?, "relay-test", &marker)?;
    ensure!(
        response.status == 200,
        "GET {marker} through relay to s_server: expected 200, got {}",
        response.head
    );
    // Both TLS-leg FINs: the whole exchange is in the file.
    let pcap = capture.stop_after_fins(2)?;

    let keys = std::fs::read_to_string(&keylog)
        .with_context(|| format!("reading relay's key log {}", keylog.display()))?;
    let uris = decrypted_http_uris(&pcap, &keylog, target.port())?;
    ensure!(
        uris.contains(&marker),
        "decrypting the TLS leg with relay's key log: expected request {marker}, got {uris:?}\nkey log:\n{keys}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// 6. Startup errors: exit 2, naming the file.

/// Relay must refuse to start, with exit 2 and a message naming one of `names`.
fn startup_fails_naming(args: &[String], names: &[&Path]) -> Result<()> {
    let exited = RelayCmd::raw(args).run_to_exit(Duration::from_secs(10))?;
    ensure!(
        exited.status.code() == Some(2),
        "relay {args:?}: expected exit 2, got {}\nstderr:\n{}",
        exited.status,
        exited.stderr
    );
    ensure!(
        names
            .iter()
            .any(|name| exited.stderr.contains(&path_arg(name))),
        "relay {args:?}: expected stderr naming {names:?}, got:\n{}",
        exited.stderr
    );
    Ok(())
}

/// `relay forward tls://127.0.0.1:<p> 127.0.0.1:<q> --tls-cert <cert> --tls-key <key>`.
fn tls_listener_args(cert: &Path, key: &Path) -> Result<Vec<String>> {
    Ok(vec![
        "forward".to_string(),
        format!("tls://127.0.0.1:{}", free_port()?),
        format!("127.0.0.1:{}", free_port()?),
        "--tls-cert".to_string(),
        path_arg(cert),
        "--tls-key".to_string(),
        path_arg(key),
    ])
}

/// Which file is wrong at startup.
#[derive(Clone, Copy, Debug)]
enum BadListenerFile {
    CertMissing,
    CertWithoutCertificate,
    KeyWithoutKey,
    KeyNotMatchingCert,
    CertExpired,
}

fn listener_startup_error(bad: BadListenerFile) -> Result<()> {
    let pki = Pki::new()?;
    let dir = pki.ca.dir();
    let server = &pki.server;
    let (cert, key): (PathBuf, PathBuf) = match bad {
        BadListenerFile::CertMissing => (dir.join("missing.pem"), server.key.clone()),
        BadListenerFile::CertWithoutCertificate => {
            // A PEM file holding only a private key.
            let only_key = dir.join("only-key.pem");
            std::fs::copy(&server.key, &only_key).context("copying a key PEM")?;
            (only_key, server.key.clone())
        }
        BadListenerFile::KeyWithoutKey => (server.cert.clone(), pki.alice.cert.clone()),
        BadListenerFile::KeyNotMatchingCert => (server.cert.clone(), pki.alice.key.clone()),
        BadListenerFile::CertExpired => {
            let expired = pki
                .ca
                .issue("expired", &CertSpec::loopback_server().expired())?;
            (expired.cert, expired.key)
        }
    };
    // Which file the message must name; for a mismatch either will do.
    let names: Vec<&Path> = match bad {
        BadListenerFile::KeyWithoutKey => vec![&key],
        BadListenerFile::KeyNotMatchingCert => vec![&cert, &key],
        _ => vec![&cert],
    };
    startup_fails_naming(&tls_listener_args(&cert, &key)?, &names)
        .with_context(|| format!("listener with {bad:?}"))
}

#[test]
fn missing_listener_cert_file_exits_2_naming_it() -> Result<()> {
    listener_startup_error(BadListenerFile::CertMissing)
}

#[test]
fn listener_cert_pem_without_certificate_exits_2_naming_it() -> Result<()> {
    listener_startup_error(BadListenerFile::CertWithoutCertificate)
}

#[test]
fn listener_key_file_without_key_exits_2_naming_it() -> Result<()> {
    listener_startup_error(BadListenerFile::KeyWithoutKey)
}

#[test]
fn listener_key_not_matching_cert_exits_2_naming_a_file() -> Result<()> {
    listener_startup_error(BadListenerFile::KeyNotMatchingCert)
}

#[test]
fn expired_listener_cert_exits_2_naming_it() -> Result<()> {
    listener_startup_error(BadListenerFile::CertExpired)
}

#[test]
fn listener_key_readable_by_others_is_warned_about_by_name() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let pki = Pki::new()?;
    std::fs::set_permissions(&pki.server.key, std::fs::Permissions::from_mode(0o644))
        .context("making the key world-readable")?;
    let echo = EchoServer::start()?;
    let relay = tls_listener(&pki.server, echo.addr(), &[])?;
    let key = path_arg(&pki.server.key);
    poll_until(&format!("a warning naming {key}"), METRIC_TIMEOUT, || {
        Ok(relay
            .stderr()
            .lines()
            .any(|l| l.contains("WARN") && l.contains(&key))
            .then_some(()))
    })
    .with_context(|| format!("relay stderr:\n{}", relay.stderr()))?;
    // A warning, not a refusal: the listener serves.
    let mut client = TlsClient::connect(relay.addr(), &pki.ca, None)?;
    round_trip(&mut client, b"served despite the loose key mode")
}

#[test]
fn openssl_listen_without_cafile_under_default_verify_exits_2() -> Result<()> {
    let pki = Pki::new()?;
    let port = free_port()?;
    let args = vec![
        format!(
            "OPENSSL-LISTEN:{port},reuseaddr,cert={},key={}",
            path_arg(&pki.server.cert),
            path_arg(&pki.server.key)
        ),
        format!("TCP:127.0.0.1:{}", free_port()?),
    ];
    let exited = RelayCmd::raw(&args).run_to_exit(Duration::from_secs(10))?;
    ensure!(
        exited.status.code() == Some(2),
        "relay {args:?} (verify=1 by default, no cafile/capath): expected exit 2, got {}\nstderr:\n{}",
        exited.status,
        exited.stderr
    );
    let lower = exited.stderr.to_lowercase();
    ensure!(
        ["cafile", "capath", "verify"]
            .iter()
            .any(|word| lower.contains(word)),
        "relay {args:?}: expected a message naming cafile/capath/verify, got:\n{}",
        exited.stderr
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// 7. close_notify.

/// How the TLS client hangs up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hangup {
    CloseNotify,
    TcpOnly,
}

/// The `connection closed` JSON log lines relay has written so far.
fn close_lines(relay: &Relay) -> Vec<serde_json::Value> {
    json_log_lines(&relay.stderr())
        .into_iter()
        .filter(|line| json_field(line, "message") == Some("connection closed"))
        .collect()
}

fn tls_client_hangup_is_logged(hangup: Hangup) -> Result<()> {
    let pki = Pki::new()?;
    let echo = EchoServer::start()?;
    let relay = tls_listener(
        &pki.server,
        echo.addr(),
        &["--log-format".to_string(), "json".to_string()],
    )?;
    let mut client = TlsClient::connect(relay.addr(), &pki.ca, None)?;
    round_trip(&mut client, b"before hanging up")?;
    let seen = match hangup {
        Hangup::CloseNotify => client.close_cleanly()?,
        Hangup::TcpOnly => client.close_without_close_notify()?,
    };
    ensure!(
        seen != TlsClose::Reset,
        "client hung up with {hangup:?}: expected relay to close in turn, got a reset"
    );
    let line = poll_until(
        "relay's `connection closed` log line",
        METRIC_TIMEOUT,
        || Ok(close_lines(&relay).into_iter().next()),
    )?;
    let outcome = json_field(&line, "outcome").unwrap_or("<none>");
    let reason = json_field(&line, "reason").unwrap_or("<none>");
    match hangup {
        Hangup::CloseNotify => {
            ensure!(
                seen == TlsClose::CloseNotify,
                "clean close: expected relay's close_notify back, got {seen:?}"
            );
            ensure!(
                outcome == "closed",
                "clean close: expected outcome closed, got {outcome} (reason {reason:?})\nline: {line}"
            );
        }
        Hangup::TcpOnly => {
            let logged = json_log_lines(&relay.stderr()).iter().any(|l| {
                json_field(l, "reason").is_some_and(|r| r.contains("without close_notify"))
            });
            ensure!(
                logged,
                "EOF without close_notify: expected a log line whose reason contains \
                 `without close_notify`, got close line {line}\nstderr:\n{}",
                relay.stderr()
            );
            ensure!(
                outcome != "reset",
                "EOF without close_notify: expected it treated as EOF, not reset; got outcome {outcome}\nline: {line}"
            );
        }
    }
    Ok(())
}

#[test]
fn tls_client_close_notify_is_logged_as_closed() -> Result<()> {
    tls_client_hangup_is_logged(Hangup::CloseNotify)
}

#[test]
fn tls_client_eof_without_close_notify_is_logged_not_reset() -> Result<()> {
    tls_client_hangup_is_logged(Hangup::TcpOnly)
}
