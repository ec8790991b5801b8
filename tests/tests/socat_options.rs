//! socat address options that change what a route does, against real
//! peers: `range=` (a client from another network namespace is closed
//! before anything reaches the target, loopback is served),
//! `max-children=` (the route's connection limit) and `retry=`/`interval=`
//! (a target that starts listening late is still reached); socat's global
//! flags (`-d` sets the log level, `-u` / `-U` relay one way, the ones
//! relay does not do are refused by name with exit 2).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use relay_tests::child::ChildProc;
use relay_tests::payload::read_fingerprint;
use relay_tests::peers::{Backend, EchoServer, expect_close, round_trip};
use relay_tests::ports::free_port;
use relay_tests::relay_proc::relay_bin;
use relay_tests::tempdir::TempDir;
use relay_tests::wait::poll_until;
use relay_tests::{Fingerprint, NetNs, Payload, RelayCmd, require_root};

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
    relay.wait_outcome("denied", 1.0, METRIC_TIMEOUT)?;
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
    relay.wait_outcome("closed", 1.0, METRIC_TIMEOUT)?;
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
    relay.wait_outcome("limit", 1.0, METRIC_TIMEOUT)?;
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
    relay.wait_outcome("refused", 1.0, METRIC_TIMEOUT)?;
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
    relay.wait_outcome("denied", 1.0, METRIC_TIMEOUT)?;
    poll_until("the debug line of the denial", METRIC_TIMEOUT, || {
        Ok(relay.stderr().contains("outside range=").then_some(()))
    })?;
    ensure!(
        backend.accepted() == 0,
        "a denied client reached the target"
    );
    Ok(())
}

/// socat's `-u` reads the first address and writes the second, `-U` the
/// other way, whichever of the two is the listener: the source's bytes
/// arrive whole, and nothing the destination sends reaches the source
/// (relay reads and drops it), on every data path.
#[test]
fn one_way_flags_relay_only_from_the_address_they_name() -> Result<()> {
    let payload = Payload::new(14, 2 << 20);
    // Greets, then takes what comes until EOF: the greeting must not
    // reach the client.
    let sunk: Arc<Mutex<Vec<Fingerprint>>> = Arc::default();
    let sink = {
        let sunk = Arc::clone(&sunk);
        Backend::start(move |mut stream| {
            let _ = stream.write_all(b"greeting");
            if let Ok(fingerprint) = read_fingerprint(&mut stream) {
                sunk.lock().expect("sink lock").push(fingerprint);
            }
        })?
    };
    // Sends the payload and its EOF, then counts what comes back: nothing
    // may, and relay's close ends the count.
    let heard: Arc<Mutex<Vec<usize>>> = Arc::default();
    let source = {
        let heard = Arc::clone(&heard);
        Backend::start(move |mut stream| {
            if payload.write_to(&mut stream).is_ok() && stream.shutdown(Shutdown::Write).is_ok() {
                let mut back = Vec::new();
                let _ = stream.read_to_end(&mut back);
                heard.lock().expect("source lock").push(back.len());
            }
        })?
    };
    let port = free_port()?;
    let listen = format!("TCP-LISTEN:{port},fork,reuseaddr");
    let to_sink = format!("TCP:{}", sink.addr());
    let from_source = format!("TCP:{}", source.addr());
    let cases = [
        ("-u", &listen, &to_sink, true),
        ("-U", &to_sink, &listen, true),
        ("-U", &listen, &from_source, false),
        ("-u", &from_source, &listen, false),
    ];
    for (flag, addr1, addr2, to_target) in cases {
        let line = format!("relay {flag} {addr1} {addr2}");
        let relay = RelayCmd::socat(port, addr1, addr2).opts(&[flag]).spawn()?;
        let mut client = relay.connect()?;
        if to_target {
            payload.write_to(&mut client)?;
            client.shutdown(Shutdown::Write)?;
            let mut back = Vec::new();
            client
                .read_to_end(&mut back)
                .with_context(|| format!("{line}: the client's end"))?;
            ensure!(
                back.is_empty(),
                "{line}: the target's greeting must not reach the client, got {back:?}"
            );
            let got = poll_until("the target's whole payload", CLOSE_TIMEOUT, || {
                Ok(sunk.lock().expect("sink lock").pop())
            })?;
            ensure!(
                got == payload.fingerprint(),
                "{line}: the target got {got}, the client sent {}",
                payload.fingerprint()
            );
        } else {
            client.write_all(b"must not arrive")?;
            let got = read_fingerprint(&mut client)
                .with_context(|| format!("{line}: reading the target's payload"))?;
            ensure!(
                got == payload.fingerprint(),
                "{line}: the client got {got}, the target sent {}",
                payload.fingerprint()
            );
            drop(client);
            let back = poll_until(
                "the target's count of what came back",
                CLOSE_TIMEOUT,
                || Ok(heard.lock().expect("source lock").pop()),
            )?;
            ensure!(
                back == 0,
                "{line}: {back} bytes of the client reached the target"
            );
        }
        drop(relay);
    }
    Ok(())
}

/// `-u` over a veth pair into a namespace (real segment boundaries, which
/// loopback's GRO hides): 8 MiB written at once and then half-closed reach
/// a target that does not read for a while, whole, on every data path;
/// the target's greeting never reaches the client.
#[test]
fn one_way_carries_a_large_write_over_a_veth_to_a_target_slow_to_read() -> Result<()> {
    require_root!("creates a network namespace for the target");
    let ns = NetNs::create()?;
    let payload = Payload::new(15, 8 << 20);
    let sunk: Arc<Mutex<Vec<Fingerprint>>> = Arc::default();
    let sink = {
        let sunk = Arc::clone(&sunk);
        Backend::on(
            ns.tcp_listen(SocketAddr::from((ns.addr(), 7000)))?,
            move |mut stream| {
                let _ = stream.write_all(b"greeting");
                // Not reading: relay must hold the rest back, not drop it.
                std::thread::sleep(Duration::from_millis(500));
                if let Ok(fingerprint) = read_fingerprint(&mut stream) {
                    sunk.lock().expect("sink lock").push(fingerprint);
                }
            },
        )?
    };
    for path in ["copy", "splice", "sockmap"] {
        let port = free_port()?;
        let mut cmd = RelayCmd::socat(
            port,
            format!("TCP-LISTEN:{port},fork,reuseaddr"),
            format!("TCP:{}", sink.addr()),
        )
        .opts(&["-u", "--data-path", path]);
        if path == "sockmap" {
            cmd = cmd.opts(&["--experimental-sockmap"]);
        }
        let relay = cmd.spawn()?;
        let mut client = relay.connect()?;
        payload.write_to(&mut client)?;
        client.shutdown(Shutdown::Write)?;
        let mut back = Vec::new();
        client
            .read_to_end(&mut back)
            .with_context(|| format!("{path}: the client's end"))?;
        ensure!(
            back.is_empty(),
            "{path}: the greeting reached the client: {back:?}"
        );
        let got = poll_until("the whole payload at the target", CLOSE_TIMEOUT, || {
            Ok(sunk.lock().expect("sink lock").pop())
        })?;
        ensure!(
            got == payload.fingerprint(),
            "{path}: the target got {got}, the client sent {}",
            payload.fingerprint()
        );
    }
    Ok(())
}

/// socat's `-v`, `-x` and `-v -x`: relay's dump on stderr is socat's, byte
/// for byte but for the timestamps, for the same exchange (a request with
/// control characters, a reply of several lines), with the address to
/// connect written first or second.
#[test]
fn dump_flags_print_the_traffic_as_socat_does() -> Result<()> {
    const REQUEST: &[u8] = b"GET / HTTP/1.0\r\nX: \x01\x07\x08\x0b\x0c\\\xff\t\r\n\r\n";
    const REPLY: &[u8] =
        b"HTTP/1.0 200 OK\r\n\r\nline one\na line longer than sixteen bytes\n\x00\x7f end";
    // Replies once the request has ended, so each direction is one block.
    let server = Backend::start(|mut stream| {
        let mut request = Vec::new();
        if stream.read_to_end(&mut request).is_ok() {
            let _ = stream.write_all(REPLY);
        }
    })?;
    let connect = format!("TCP:{}", server.addr());
    let dump = |program: &str, args: Vec<&str>| -> Result<String> {
        let mut cmd = std::process::Command::new(program);
        cmd.args(&args);
        let (mut proc, mut stdin, mut stdout) = ChildProc::spawn_piped(program, cmd)?;
        stdin.write_all(REQUEST)?;
        drop(stdin);
        let mut reply = Vec::new();
        stdout.read_to_end(&mut reply)?;
        proc.wait_exit(CLOSE_TIMEOUT)?
            .with_context(|| format!("{program} {args:?} did not exit"))?;
        ensure!(reply == REPLY, "{program} {args:?}: stdout {reply:?}");
        Ok(without_timestamps(&proc.log()))
    };
    let relay = relay_bin()?;
    let relay = relay.to_str().context("relay's path")?;
    for flags in [&["-v"][..], &["-x"], &["-v", "-x"]] {
        for order in [["-", connect.as_str()], [connect.as_str(), "-"]] {
            let args: Vec<&str> = flags.iter().chain(&order).copied().collect();
            let socat = dump("socat", args.clone())?;
            let ours = dump(relay, [&["-q"][..], &args].concat())?;
            ensure!(
                ours == socat,
                "relay {args:?} dumps\n{ours}\nwhere socat dumps\n{socat}"
            );
        }
    }
    Ok(())
}

/// socat's `-t`: once the client has closed, a target that neither sends
/// nor closes is given that long, then both are closed; the log line says
/// the half-close timeout ended it.
#[test]
fn t_ends_a_half_closed_connection_after_its_timeout() -> Result<()> {
    // Reads to EOF, then holds the connection open, silent.
    let silent = Backend::start(|mut stream| {
        let _ = stream.read_to_end(&mut Vec::new());
        std::thread::sleep(Duration::from_secs(30));
    })?;
    let port = free_port()?;
    let relay = RelayCmd::socat(
        port,
        format!("TCP-LISTEN:{port},fork,reuseaddr"),
        format!("TCP:{}", silent.addr()),
    )
    .opts(&["-t", "0.3"])
    .with_metrics()?
    .spawn()?;
    let mut client = relay.connect()?;
    client.write_all(b"request")?;
    client.shutdown(Shutdown::Write)?;
    expect_close(&mut client, CLOSE_TIMEOUT).context("the half-close timeout closes the client")?;
    relay.wait_outcome("closed", 1.0, METRIC_TIMEOUT)?;
    poll_until(
        "the log line naming the half-close timeout",
        METRIC_TIMEOUT,
        || {
            Ok(relay
                .stderr()
                .contains("half-close timeout (-t)")
                .then_some(()))
        },
    )?;
    Ok(())
}

/// socat's `crlf` on the connect address: what stdin sends goes out with
/// CR NL line ends, and the server's CRs are dropped on the way to stdout,
/// byte for byte as socat converts them.
#[test]
fn crlf_converts_line_ends_as_socat_does() -> Result<()> {
    const SENT: &[u8] = b"HELO relay\nMAIL FROM:<a@b>\n";
    const REPLY: &[u8] = b"250 ok\r\n250 2.1.0 ok\r\nlone\rcr";
    let heard: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let server = {
        let heard = Arc::clone(&heard);
        Backend::start(move |mut stream| {
            let mut got = Vec::new();
            if stream.read_to_end(&mut got).is_ok() {
                heard.lock().expect("heard lock").push(got);
                let _ = stream.write_all(REPLY);
            }
        })?
    };
    let relay = relay_bin()?;
    let relay = relay.to_str().context("relay's path")?;
    let connect = format!("TCP:{},crlf", server.addr());
    let mut outputs = Vec::new();
    for program in ["socat", relay] {
        let mut cmd = std::process::Command::new(program);
        if program == relay {
            cmd.arg("-q");
        }
        cmd.args(["-", &connect]);
        let (mut proc, mut stdin, mut stdout) = ChildProc::spawn_piped(program, cmd)?;
        stdin.write_all(SENT)?;
        drop(stdin);
        let mut out = Vec::new();
        stdout.read_to_end(&mut out)?;
        proc.wait_exit(CLOSE_TIMEOUT)?
            .with_context(|| format!("{program} did not exit"))?;
        let got = heard.lock().expect("heard lock").pop().unwrap_or_default();
        outputs.push((program, got, out));
    }
    let (_, socat_sent, socat_out) = &outputs[0];
    let (_, relay_sent, relay_out) = &outputs[1];
    ensure!(
        socat_sent.as_slice() == b"HELO relay\r\nMAIL FROM:<a@b>\r\n"
            && relay_sent == socat_sent
            && relay_out == socat_out,
        "socat sent {:?} and printed {:?}; relay sent {:?} and printed {:?}",
        String::from_utf8_lossy(socat_sent),
        String::from_utf8_lossy(socat_out),
        String::from_utf8_lossy(relay_sent),
        String::from_utf8_lossy(relay_out)
    );
    Ok(())
}

/// socat's `-b`: no block relayed is larger than the size given, as the
/// hex dump's block headers show, and every byte still arrives.
#[test]
fn b_caps_the_block_size() -> Result<()> {
    let payload = Payload::new(33, 200_000);
    let sunk: Arc<Mutex<Vec<Fingerprint>>> = Arc::default();
    let sink = {
        let sunk = Arc::clone(&sunk);
        Backend::start(move |mut stream| {
            if let Ok(fingerprint) = read_fingerprint(&mut stream) {
                sunk.lock().expect("sink lock").push(fingerprint);
            }
        })?
    };
    let mut cmd = std::process::Command::new(relay_bin()?);
    cmd.args([
        "-q",
        "-u",
        "-x",
        "-b",
        "1000",
        "-",
        &format!("TCP:{}", sink.addr()),
    ]);
    let (mut proc, mut stdin, _stdout) = ChildProc::spawn_piped("relay", cmd)?;
    payload.write_to(&mut stdin)?;
    drop(stdin);
    proc.wait_exit(CLOSE_TIMEOUT)?
        .context("relay -b did not exit")?;
    let got = poll_until("the payload at the sink", CLOSE_TIMEOUT, || {
        Ok(sunk.lock().expect("sink lock").pop())
    })?;
    ensure!(got == payload.fingerprint(), "the sink got {got}");
    let log = proc.log();
    let lengths: Vec<u64> = log
        .split("length=")
        .skip(1)
        .filter_map(|rest| rest.split(' ').next()?.parse().ok())
        .collect();
    ensure!(
        lengths.iter().sum::<u64>() == 200_000 && lengths.iter().all(|n| *n <= 1000),
        "blocks of at most 1000 bytes adding up to the payload: {} blocks, largest {:?}",
        lengths.len(),
        lengths.iter().max()
    );
    Ok(())
}

/// A dump with each block header's timestamp replaced by `TIME`: the
/// header is `> 2026/12/03 10:32:21.000972  length=...`, and in socat's
/// text dump it may follow the last byte of the block before it.
fn without_timestamps(dump: &str) -> String {
    let parts: Vec<&str> = dump.split("  length=").collect();
    let mut out = String::new();
    for (i, part) in parts.iter().enumerate() {
        if i + 1 == parts.len() {
            out.push_str(part);
        } else {
            let head = part.trim_end_matches(|c: char| c.is_ascii_digit() || "/:. ".contains(c));
            out.push_str(head);
            out.push_str(" TIME  length=");
        }
    }
    out
}

/// socat's `-6` makes `TCP-LISTEN:` listen on IPv6 (`[::]`), `-4` on IPv4
/// only; `-lf` appends the log to a file and leaves stderr to the dump.
#[test]
fn family_and_log_file_flags_mean_what_they_mean_in_socat() -> Result<()> {
    let echo = EchoServer::start()?;
    let port = free_port()?;
    let dir = TempDir::new("socat-lf")?;
    let log = dir.join("relay.log");
    let log_arg = log.to_str().context("the log path")?;
    let listen = format!("TCP-LISTEN:{port},fork,reuseaddr");
    let target = format!("TCP:{}", echo.addr());

    let relay = RelayCmd::socat(port, &listen, &target)
        .opts(&["-6", "-lf", log_arg])
        .spawn()?;
    let mut v6 = relay_tests::peers::connect(SocketAddr::from((Ipv6Addr::LOCALHOST, port)))
        .context("-6: connecting over IPv6")?;
    round_trip(&mut v6, b"over IPv6")?;
    drop(v6);
    let written = poll_until("the log file's listening line", METRIC_TIMEOUT, || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        Ok(text
            .contains(&format!("listening on [::]:{port}"))
            .then_some(text))
    })?;
    ensure!(
        !relay.stderr().contains("listening on"),
        "-lf: log lines went to stderr too:\n{}\nfile:\n{written}",
        relay.stderr()
    );
    drop(relay);

    let relay = RelayCmd::socat(port, &listen, &target)
        .opts(&["-4"])
        .spawn()?;
    ensure!(
        TcpStream::connect((Ipv6Addr::LOCALHOST, port)).is_err(),
        "-4: the listener must not take IPv6 clients"
    );
    round_trip(&mut relay.connect()?, b"over IPv4")?;
    Ok(())
}

/// Two connect addresses (`relay TCP:a TCP:b`, socat's "connect both and
/// relay"): each server gets the other's bytes, and relay exits 0 once
/// both have closed. A program first (`relay EXEC:cmd TCP:b`) is one
/// program joined to one connection, reaped before relay exits; a first
/// address that cannot be reached is an exit 1 naming it.
#[test]
fn two_connect_addresses_are_joined_once() -> Result<()> {
    // Speaks, then keeps what it hears until EOF.
    let heard: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let speaker = |greeting: &'static [u8]| {
        let heard = Arc::clone(&heard);
        Backend::start(move |mut stream| {
            let _ = stream.write_all(greeting);
            let _ = stream.shutdown(Shutdown::Write);
            let mut got = Vec::new();
            let _ = stream.read_to_end(&mut got);
            heard.lock().expect("heard lock").push(got);
        })
    };
    let (a, b) = (speaker(b"hello from a")?, speaker(b"hello from b")?);
    let run = |args: &[String]| -> Result<std::process::ExitStatus> {
        let mut cmd = std::process::Command::new(relay_bin()?);
        cmd.args(args);
        let mut proc = ChildProc::spawn("relay", cmd)?;
        proc.wait_exit(CLOSE_TIMEOUT)?
            .with_context(|| format!("relay {args:?} did not exit; log:\n{}", proc.log()))
    };
    // What a server heard is stored once its read ends, which may be a
    // moment after relay has exited.
    let heard_both = |count: usize| {
        poll_until("the servers' reads to end", CLOSE_TIMEOUT, || {
            let got = heard.lock().expect("heard lock").clone();
            Ok((got.len() >= count).then_some(got))
        })
    };
    let status = run(&[format!("TCP:{}", a.addr()), format!("TCP:{}", b.addr())])?;
    ensure!(status.success(), "relay TCP:a TCP:b exited {status}");
    let mut got = heard_both(2)?;
    got.sort();
    ensure!(
        got == [b"hello from a".to_vec(), b"hello from b".to_vec()],
        "each server hears the other: {got:?}"
    );

    heard.lock().expect("heard lock").clear();
    let status = run(&[
        "EXEC:printf from-a-program".to_string(),
        format!("TCP:{}", b.addr()),
    ])?;
    ensure!(status.success(), "relay EXEC:... TCP:b exited {status}");
    let got = heard_both(1)?;
    ensure!(
        got == [b"from-a-program".to_vec()],
        "the server hears the program: {got:?}"
    );

    let closed = free_port()?;
    let mut cmd = std::process::Command::new(relay_bin()?);
    cmd.args([
        format!("TCP:127.0.0.1:{closed}"),
        format!("TCP:{}", b.addr()),
    ]);
    let (status, text) = relay_tests::child::status_and_text(cmd)?;
    ensure!(
        status.code() == Some(1) && text.contains("cannot reach the first address"),
        "an unreachable first address: exit {status}, output:\n{text}"
    );
    Ok(())
}

/// `keepalive`, `rcvbuf=` on a listener and `sndbuf=` on the connect
/// address reach the kernel's sockets, as `ss` shows them: the accepted
/// connection keeps alive with a receive buffer of twice the bytes asked
/// (the kernel doubles it), the target leg a send buffer of twice its.
#[test]
fn socket_options_reach_the_kernel_on_both_legs() -> Result<()> {
    let echo = EchoServer::start()?;
    let port = free_port()?;
    let relay = RelayCmd::socat(
        port,
        format!("TCP-LISTEN:{port},fork,reuseaddr,keepalive,rcvbuf=100000"),
        format!("TCP:{},sndbuf=30000", echo.addr()),
    )
    .spawn()?;
    let mut client = relay.connect()?;
    round_trip(&mut client, b"options")?;
    let filter = format!("( sport = :{port} or dport = :{} )", echo.addr().port());
    let out = std::process::Command::new("ss")
        .args(["-tmnoH", "state", "established", &filter])
        .output()
        .context("running ss")?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    // Each socket is a line and its skmem line below it.
    let sockets: Vec<String> = text
        .split("\n")
        .collect::<Vec<_>>()
        .chunks(2)
        .map(|pair| pair.join(" "))
        .collect();
    let accepted = sockets
        .iter()
        .find(|s| s.contains(&format!("127.0.0.1:{port} ")))
        .with_context(|| format!("the accepted connection in ss:\n{text}"))?;
    ensure!(
        accepted.contains("timer:(keepalive") && accepted.contains("rb200000"),
        "the accepted connection keeps alive with rcvbuf=100000: {accepted}"
    );
    let upstream = sockets
        .iter()
        .find(|s| s.contains(&format!("{} ", echo.addr())))
        .with_context(|| format!("the target leg in ss:\n{text}"))?;
    ensure!(
        upstream.contains("tb60000"),
        "the target leg has sndbuf=30000: {upstream}"
    );
    Ok(())
}

#[test]
fn socat_flags_and_options_relay_does_not_do_are_refused_by_name() -> Result<()> {
    let cases: [(&[&str], &[&str]); 3] = [
        (
            &["-L", "/run/relay.lock", "TCP-LISTEN:1", "TCP:127.0.0.1:1"],
            &["`-L`", "flock"],
        ),
        (
            &["TCP-LISTEN:1,fork,su=nobody", "TCP:127.0.0.1:1"],
            &["`su`", "User="],
        ),
        (
            &["TCP-LISTEN:1,fork", "UNIX-CONNECT:/run/x.sock,su-d=nobody"],
            &["`su-d`"],
        ),
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
    let out = explain("TCP-LISTEN:1,fork,su=nobody")?;
    ensure!(
        out.status.code() == Some(2),
        "a refused option exits 2: {out:?}"
    );
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("socat option `su`"),
        "the refusal names the option: {out:?}"
    );
    Ok(())
}
