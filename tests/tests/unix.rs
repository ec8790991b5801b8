//! UNIX stream sockets on either side of a route, and STDIO: the Docker
//! API through `TCP-LISTEN -> UNIX-CONNECT` against a real dockerd, mutual
//! TLS in front of a UNIX socket, `UNIX-LISTEN -> TCP` with socat as the
//! client, the socket file's life (stale files, mode=, unlink-close), and
//! `relay - TCP:...` with a half-closed pipe.

use std::fs::File;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use nix::sys::signal::Signal;
use relay_tests::certs::{Ca, CertSpec};
use relay_tests::child::{ChildProc, output_of, status_and_text};
use relay_tests::payload::read_fingerprint;
use relay_tests::peers::{Backend, EchoServer, UnixEchoServer, round_trip};
use relay_tests::ports::free_port;
use relay_tests::relay_proc::relay_bin;
use relay_tests::tempdir::TempDir;
use relay_tests::tls_client::TlsClient;
use relay_tests::{Payload, Relay, RelayCmd, docker, require_root, require_tool};

/// How long relay may take to exit by itself.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// A relay in the socat form whose listener is a UNIX socket: ready once it
/// serves metrics (it binds its listener before).
fn unix_relay(addr1: &str, addr2: &str) -> Result<Relay> {
    unix_relay_on(addr1, addr2, "auto")
}

fn unix_relay_on(addr1: &str, addr2: &str, data_path: &str) -> Result<Relay> {
    RelayCmd::raw(&[addr1, addr2])
        .opts(&["--data-path", data_path])
        .with_metrics()?
        .spawn()
}

#[test]
fn docker_api_through_tcp_listen_to_the_docker_socket() -> Result<()> {
    require_root!("starts dockerd");
    require_tool!("docker");
    docker::ensure_daemon()?;
    let port = free_port()?;
    let _relay = RelayCmd::socat(
        port,
        format!("TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr"),
        "UNIX-CONNECT:/var/run/docker.sock",
    )
    .spawn()?;
    let version = |host: Option<String>| -> Result<String> {
        let mut cmd = Command::new("docker");
        if let Some(host) = host {
            cmd.args(["-H", &host]);
        }
        cmd.args([
            "version",
            "--format",
            "{{.Server.Version}} {{.Server.APIVersion}}",
        ]);
        Ok(output_of(cmd)?.trim().to_string())
    };
    let direct = version(None)?;
    let relayed = version(Some(format!("tcp://127.0.0.1:{port}")))?;
    ensure!(
        !direct.is_empty() && relayed == direct,
        "docker version through relay said {relayed:?}; over the socket directly {direct:?}"
    );
    Ok(())
}

#[test]
fn mutual_tls_in_front_of_a_unix_socket_refuses_clients_without_a_certificate() -> Result<()> {
    let dir = TempDir::new("unix-mtls")?;
    let echo = UnixEchoServer::start(&dir.join("echo.sock"))?;
    let ca = Ca::new("relay-tests-ca")?;
    let server = ca.issue("server", &CertSpec::loopback_server())?;
    let alice = ca.issue("alice", &CertSpec::client("alice"))?;
    let port = free_port()?;
    let relay = RelayCmd::socat(
        port,
        format!(
            "OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,cert={},key={},cafile={},verify=1",
            server.cert.display(),
            server.key.display(),
            ca.cert_path().display()
        ),
        format!("UNIX-CONNECT:{}", echo.path().display()),
    )
    .with_metrics()?
    .spawn()?;

    let mut client = TlsClient::connect(relay.addr(), &ca, Some(&alice))?;
    let payload = Payload::new(7, 256 * 1024).to_vec();
    round_trip(&mut client, &payload).context("an echo through TLS to the UNIX socket")?;
    ensure!(
        echo.accepted() == 1,
        "the UNIX echo server accepted {} connections, expected 1",
        echo.accepted()
    );

    // TLS 1.3 finishes the client's side of the handshake before the
    // server checks the certificate: the refusal shows on the first read.
    let refused = TlsClient::connect(relay.addr(), &ca, None)
        .and_then(|mut c| round_trip(&mut c, b"let me in"));
    ensure!(
        refused.is_err(),
        "a client without a certificate got an echo back through OPENSSL-LISTEN,verify=1"
    );
    relay.wait_metric(
        "relay_tls_handshakes_total",
        &[("role", "server"), ("outcome", "ok")],
        1.0,
        EXIT_TIMEOUT,
    )?;
    relay.wait_metric(
        "relay_connections_total",
        &[("outcome", "tls_error")],
        1.0,
        EXIT_TIMEOUT,
    )?;
    ensure!(
        echo.accepted() == 1,
        "the refused client reached the UNIX socket ({} connections there)",
        echo.accepted()
    );
    Ok(())
}

/// socat as the client of `UNIX-LISTEN`: a payload goes to a TCP echo
/// server and back, whole; socat's EOF on stdin arrives as a half-close,
/// and the echo still comes back after it. On copy and on splice (which
/// moves bytes between a UNIX and a TCP socket in the kernel).
#[test]
fn unix_listen_to_tcp_carries_a_payload_both_ways_with_half_close() -> Result<()> {
    require_tool!("socat");
    for data_path in ["copy", "splice"] {
        unix_listen_echo(data_path).with_context(|| format!("--data-path {data_path}"))?;
    }
    Ok(())
}

fn unix_listen_echo(data_path: &str) -> Result<()> {
    let dir = TempDir::new("unix-listen")?;
    let echo = EchoServer::start()?;
    let path = dir.join("relay.sock");
    let relay = unix_relay_on(
        &format!("UNIX-LISTEN:{},fork,mode=600", path.display()),
        &format!("TCP:{}", echo.addr()),
        data_path,
    )?;
    let running = relay
        .scrape()?
        .counter("relay_data_path", &[("path", data_path)]);
    ensure!(
        running == 1.0,
        "relay_data_path{{path={data_path}}} is {running}, expected 1"
    );
    let mode = std::fs::metadata(&path)?.permissions().mode();
    ensure!(
        mode & 0o7777 == 0o600,
        "mode=600: the socket file has mode {:o}",
        mode & 0o7777
    );

    let payload = Payload::new(42, 4 * 1024 * 1024);
    let input = dir.join("input");
    let sent = payload.write_to(&mut File::create(&input)?)?;
    let output = dir.join("output");
    let status = Command::new("socat")
        // Wait for the echo after stdin's EOF (socat's default is 0.5 s).
        .args(["-t", "60", "-", &format!("UNIX-CONNECT:{}", path.display())])
        .stdin(File::open(&input)?)
        .stdout(File::create(&output)?)
        .stderr(Stdio::inherit())
        .status()
        .context("running socat as the client")?;
    ensure!(
        status.success(),
        "socat - UNIX-CONNECT exited with {status}"
    );
    let heard = read_fingerprint(&mut File::open(&output)?)?;
    ensure!(
        heard == sent,
        "the echo through UNIX-LISTEN came back as {heard:?}; sent {sent:?}"
    );
    relay.wait_metric(
        "relay_connections_total",
        &[("outcome", "closed")],
        1.0,
        EXIT_TIMEOUT,
    )?;
    let scrape = relay.scrape()?;
    for direction in ["to_target", "to_client"] {
        let bytes = scrape.counter("relay_bytes_total", &[("direction", direction)]);
        ensure!(
            bytes == payload.len as f64,
            "relay_bytes_total{{direction={direction}}} is {bytes}, expected {}",
            payload.len
        );
    }
    Ok(())
}

/// A socket file left by a process that exited: relay refuses it (exit 2,
/// naming unlink-early) as socat does, and takes it over with unlink-early.
/// A file that is not a socket is never removed.
#[test]
fn a_stale_socket_file_needs_unlink_early_and_other_files_are_left_alone() -> Result<()> {
    let dir = TempDir::new("unix-stale")?;
    let echo = EchoServer::start()?;
    let target = format!("TCP:{}", echo.addr());
    let path = dir.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&path)?);
    ensure!(path.exists(), "a dropped listener leaves its socket file");

    RelayCmd::raw(&[
        format!("UNIX-LISTEN:{},fork", path.display()),
        target.clone(),
    ])
    .expect_usage_error(EXIT_TIMEOUT, &["stale.sock", "unlink-early"])?;

    let relay = unix_relay(
        &format!("UNIX-LISTEN:{},fork,unlink-early", path.display()),
        &target,
    )?;
    let mut client = std::os::unix::net::UnixStream::connect(&path)?;
    round_trip(&mut client, b"over the socket that replaced the stale one")?;
    drop(relay);

    let plain = dir.join("plain.file");
    std::fs::write(&plain, b"keep me")?;
    RelayCmd::raw(&[
        format!("UNIX-LISTEN:{},unlink-early", plain.display()),
        target,
    ])
    .expect_usage_error(EXIT_TIMEOUT, &["plain.file", "not a socket"])?;
    ensure!(
        std::fs::read(&plain)? == b"keep me",
        "relay changed a file that is not a socket"
    );
    Ok(())
}

/// The socket file goes when relay stops (socat's unlink-close default),
/// and stays with unlink-close=0.
#[test]
fn the_socket_file_is_removed_at_exit_unless_unlink_close_is_off() -> Result<()> {
    let dir = TempDir::new("unix-close")?;
    let echo = EchoServer::start()?;
    let target = format!("TCP:{}", echo.addr());
    for (options, kept) in [("fork", false), ("fork,unlink-close=0", true)] {
        let path = dir.join("relay.sock");
        let mut relay = unix_relay(
            &format!("UNIX-LISTEN:{},{options}", path.display()),
            &target,
        )?;
        let is_socket = std::fs::symlink_metadata(&path)?.file_type().is_socket();
        ensure!(is_socket, "{options}: no socket at {}", path.display());
        relay.signal(Signal::SIGTERM)?;
        let status = relay.wait_exit(EXIT_TIMEOUT)?;
        ensure!(status.success(), "{options}: relay exited with {status}");
        ensure!(
            path.exists() == kept,
            "{options}: after exit the socket file {}",
            if kept { "is gone" } else { "is still there" }
        );
        if kept {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// `printf data | relay - TCP:...`: stdin's EOF reaches the server as a
/// half-close, and its reply, sent only after that EOF, still comes out on
/// stdout; relay exits 0. A server that closes first ends it even while
/// stdin stays open. With nothing listening, relay exits 1 as socat does.
#[test]
fn stdio_half_closes_and_prints_the_reply_then_exits_like_socat() -> Result<()> {
    let server = Backend::start(|mut stream| {
        use std::io::{Read, Write};
        let mut request = Vec::new();
        if stream.read_to_end(&mut request).is_ok() {
            let reply = format!(
                "got {} bytes: {}",
                request.len(),
                String::from_utf8_lossy(&request)
            );
            let _ = stream.write_all(reply.as_bytes());
        }
    })?;
    for args in [
        vec!["-".to_string(), format!("TCP:{}", server.addr())],
        vec![format!("TCP:{}", server.addr()), "STDIO".to_string()],
    ] {
        let mut cmd = Command::new(relay_bin()?);
        cmd.args(&args).args(["-q"]);
        let (mut proc, mut stdin, mut stdout) = ChildProc::spawn_piped("relay", cmd)?;
        {
            use std::io::Write;
            stdin.write_all(b"data")?;
        }
        drop(stdin);
        let status = proc.wait_exit(EXIT_TIMEOUT)?.with_context(|| {
            format!(
                "relay {args:?} did not exit after the reply; log:\n{}",
                proc.log()
            )
        })?;
        let mut reply = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut reply)?;
        ensure!(
            status.success() && reply == "got 4 bytes: data",
            "relay {args:?}: exit {status}, stdout {reply:?}; log:\n{}",
            proc.log()
        );
    }

    // A server that speaks first and closes: relay exits once the greeting
    // is out, though stdin (held open here) never ends, as socat does.
    let greeter = Backend::start(|mut stream| {
        use std::io::Write;
        let _ = stream.write_all(b"hello and goodbye");
    })?;
    let mut cmd = Command::new(relay_bin()?);
    cmd.args(["-q", "-", &format!("TCP:{}", greeter.addr())]);
    let (mut proc, stdin, mut stdout) = ChildProc::spawn_piped("relay", cmd)?;
    let status = proc.wait_exit(EXIT_TIMEOUT)?.with_context(|| {
        format!(
            "relay - TCP:<greeter> did not exit after the server closed; log:\n{}",
            proc.log()
        )
    })?;
    let mut greeting = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut greeting)?;
    ensure!(
        status.success() && greeting == "hello and goodbye",
        "relay - TCP:<greeter>: exit {status}, stdout {greeting:?}"
    );
    drop(stdin);

    let closed = free_port()?;
    let mut cmd = Command::new(relay_bin()?);
    cmd.args(["-", &format!("TCP:127.0.0.1:{closed}")]);
    let (status, text) = status_and_text(cmd)?;
    if status.code() != Some(1) {
        bail!("relay - TCP:<closed port>: expected exit 1, got {status}; output:\n{text}");
    }
    Ok(())
}

/// A reload matches a UNIX route's socket by its path: a changed route's
/// successor takes the socket over (same file, open connections keep
/// flowing, new ones reach the new target), and a removed route takes its
/// socket file away.
#[test]
fn reload_hands_a_unix_socket_over_and_removing_the_route_removes_its_file() -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let dir = TempDir::new("unix-reload")?;
    let (old_target, new_target, other) = (
        EchoServer::start()?,
        EchoServer::start()?,
        EchoServer::start()?,
    );
    let path = dir.join("route.sock");
    let config = dir.join("relay.toml");
    let other_port = free_port()?;
    let write = |unix_target: Option<std::net::SocketAddr>| -> Result<()> {
        let mut text = format!(
            "[[route]]\nname = \"tcp\"\nlisten = \"127.0.0.1:{other_port}\"\ntarget = \"{}\"\n",
            other.addr()
        );
        if let Some(target) = unix_target {
            text.push_str(&format!(
                "[[route]]\nname = \"sock\"\nlisten = \"UNIX-LISTEN:{},fork,mode=660\"\ntarget = \"{target}\"\n",
                path.display()
            ));
        }
        std::fs::write(&config, text).context("writing the config file")
    };
    write(Some(old_target.addr()))?;
    let relay = RelayCmd::raw(&["run", "-c", &config.to_string_lossy()])
        .with_metrics()?
        .spawn()?;
    let inode = std::fs::metadata(&path)?.ino();
    let mut open = std::os::unix::net::UnixStream::connect(&path)?;
    round_trip(&mut open, b"before the reload")?;

    write(Some(new_target.addr()))?;
    relay.signal(Signal::SIGHUP)?;
    relay.wait_metric(
        "relay_config_reloads_total",
        &[("outcome", "ok")],
        1.0,
        EXIT_TIMEOUT,
    )?;
    ensure!(
        std::fs::metadata(&path)?.ino() == inode,
        "the changed route bound a new socket file instead of taking the old one over"
    );
    let mut fresh = std::os::unix::net::UnixStream::connect(&path)?;
    round_trip(&mut fresh, b"after the reload")?;
    round_trip(&mut open, b"still open")?;
    ensure!(
        (old_target.accepted(), new_target.accepted()) == (1, 1),
        "expected one connection at each target, got old {} new {}",
        old_target.accepted(),
        new_target.accepted()
    );
    drop((open, fresh));

    write(None)?;
    relay.signal(Signal::SIGHUP)?;
    relay.wait_metric(
        "relay_config_reloads_total",
        &[("outcome", "ok")],
        2.0,
        EXIT_TIMEOUT,
    )?;
    relay_tests::wait::poll_until(
        "the removed route's socket file to go",
        EXIT_TIMEOUT,
        || Ok((!path.exists()).then_some(())),
    )?;
    Ok(())
}

/// An abstract socket belongs to a network namespace: `ABSTRACT-CONNECT`
/// with `netns=` reaches a server bound inside it, a name the host's own
/// namespace does not have.
#[test]
fn abstract_connect_reaches_a_socket_inside_a_network_namespace() -> Result<()> {
    require_root!("creates a network namespace");
    use std::os::linux::net::SocketAddrExt;
    let ns = relay_tests::NetNs::create()?;
    let name = format!("relay-test-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    let listener = {
        let addr = addr.clone();
        ns.enter(move || std::os::unix::net::UnixListener::bind_addr(&addr))?
    };
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                if let Ok(mut reader) = stream.try_clone() {
                    let _ = std::io::copy(&mut reader, &mut stream);
                }
            });
        }
    });
    ensure!(
        std::os::unix::net::UnixStream::connect_addr(&addr).is_err(),
        "the host's namespace reached @{name}, which was bound inside {}",
        ns.name()
    );
    let port = free_port()?;
    let relay = RelayCmd::socat(
        port,
        format!("TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr"),
        format!("ABSTRACT-CONNECT:{name},netns={}", ns.name()),
    )
    .spawn()?;
    let mut client = relay.connect()?;
    round_trip(&mut client, b"into the namespace's abstract socket")?;
    Ok(())
}

/// sockmap pairs TCP sockets only: a route with a UNIX leg that asks for
/// it says so and copies (and still carries bytes).
#[test]
fn sockmap_on_a_unix_route_warns_and_copies() -> Result<()> {
    let dir = TempDir::new("unix-sockmap")?;
    let echo = EchoServer::start()?;
    let path = dir.join("relay.sock");
    let relay = RelayCmd::raw(&[
        format!("UNIX-LISTEN:{},fork", path.display()),
        format!("TCP:{}", echo.addr()),
    ])
    .opts(&["--data-path", "sockmap", "--experimental-sockmap"])
    .with_metrics()?
    .spawn()?;
    let mut client = std::os::unix::net::UnixStream::connect(&path)?;
    round_trip(&mut client, b"copied, not redirected")?;
    let copy = relay
        .scrape()?
        .counter("relay_data_path", &[("path", "copy")]);
    ensure!(
        copy == 1.0,
        "relay_data_path{{path=copy}} is {copy}, expected 1"
    );
    ensure!(
        relay.stderr().contains("sockmap pairs TCP sockets only"),
        "expected a warning that sockmap does not apply to a UNIX route, got:\n{}",
        relay.stderr()
    );
    Ok(())
}

/// `user=` and `group=` own the socket file (names resolved on this host).
#[test]
fn user_and_group_own_the_socket_file() -> Result<()> {
    require_root!("changes a file's owner");
    use std::os::unix::fs::MetadataExt;
    let dir = TempDir::new("unix-owner")?;
    let echo = EchoServer::start()?;
    let path = dir.join("owned.sock");
    let _relay = unix_relay(
        &format!(
            "UNIX-LISTEN:{},fork,user=nobody,group=65534,mode=660",
            path.display()
        ),
        &format!("TCP:{}", echo.addr()),
    )?;
    let nobody = nix::unistd::User::from_name("nobody")?.context("no user nobody on this host")?;
    let meta = std::fs::metadata(&path)?;
    ensure!(
        (meta.uid(), meta.gid(), meta.mode() & 0o7777) == (nobody.uid.as_raw(), 65534, 0o660),
        "the socket file is owned {}:{} mode {:o}; expected {}:65534 mode 660",
        meta.uid(),
        meta.gid(),
        meta.mode() & 0o7777,
        nobody.uid
    );
    Ok(())
}

/// A socket path inside a container is the container's own file: relay
/// reaches `/relay-app.sock` of the container through `/proc/<pid>/root`.
/// (The server is this test, bound at that path from the host side, so
/// the container image needs no UNIX-socket server.)
#[test]
fn unix_connect_with_container_reaches_the_path_inside_the_container() -> Result<()> {
    relay_tests::require_docker!();
    docker::ensure_daemon()?;
    let container = docker::Container::run(&["sleep", "3600"])?;
    let pid = container.pid()?;
    let inside = std::path::PathBuf::from(format!("/proc/{pid}/root/relay-app.sock"));
    let echo = UnixEchoServer::start(&inside)?;
    ensure!(
        !Path::new("/relay-app.sock").exists(),
        "the host has a /relay-app.sock of its own: the test would prove nothing"
    );
    let port = free_port()?;
    let relay = RelayCmd::socat(
        port,
        format!("TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr"),
        format!(
            "UNIX-CONNECT:/relay-app.sock,container={}",
            container.name()
        ),
    )
    .spawn()?;
    let mut client = relay.connect()?;
    round_trip(&mut client, b"into the container's /relay-app.sock")?;
    ensure!(
        echo.accepted() == 1,
        "the server inside the container saw {} connections",
        echo.accepted()
    );
    Ok(())
}
