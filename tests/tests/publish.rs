//! Forwarding across namespaces: `relay publish` makes a server that
//! listens only on its namespace's own 127.0.0.1 reachable from the host,
//! follows a restarted container, counts a stopped one; the reverse
//! (`tcp://127.0.0.1:<p>@<target>` as listen address) gives a process in
//! the namespace a host-local redis; `--observe` counts the published
//! traffic on the container's `lo`.
//!
//! Targets come from [`Subject`] (busybox httpd in a Docker container, an
//! `ip netns` namespace, or a pid's namespace); one body runs per kind.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use relay_tests::child::ChildProc;
use relay_tests::docker::HTTPD_PORT;
use relay_tests::namespaced::{Bind, Kind, Subject, missing_pid};
use relay_tests::observed::{agree_since, settle, tcp_flag};
use relay_tests::ports::{free_port, wait_listening};
use relay_tests::relay_proc::Relay;
use relay_tests::tempdir::TempDir;
use relay_tests::{RelayCmd, http, peers, require_kind, test_per_kind};

/// How long a relayed request may take end to end.
const METRIC_TIMEOUT: Duration = Duration::from_secs(10);
/// How long redis, or relay's listener inside a namespace, may take to listen.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);
/// A client in a namespace gets this long before it is taken as hung.
const CLIENT_TIMEOUT_SECS: &str = "20";

/// The data path these tests relay on: `$RELAY_DATA_PATH` when set (so a
/// run per data path covers namespaced routes too), else `copy`, so that
/// what they check does not move when `auto`'s choice does. (They found the
/// sockmap path's lone-FIN bug; tests/tests/data_path.rs guards its fix.)
fn data_path() -> [String; 2] {
    let path = std::env::var("RELAY_DATA_PATH")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "copy".to_string());
    ["--data-path".to_string(), path]
}

/// `relay publish <subject> 8080:<free port>` with metrics.
fn publish(subject: &Subject, extra: &[&str]) -> Result<Relay> {
    RelayCmd::publish(&subject.target()?, HTTPD_PORT, free_port()?)?
        .opts(extra)
        .opts(&data_path())
        .spawn()
}

/// GET / through the relay: must be the subject's own page.
fn get_through(relay: &Relay, subject: &Subject) -> Result<()> {
    let response = http::get(relay.connect()?, "published", "/index.html")?;
    let body = String::from_utf8_lossy(&response.body);
    ensure!(
        response.status == 200 && body == subject.body(),
        "GET through relay {}: expected 200 {:?} from {}, got {} {body:?}",
        relay.addr(),
        subject.body(),
        subject.target()?,
        response.status
    );
    Ok(())
}

/// Wait until relay counted `n` connections closed normally.
fn closed(relay: &Relay, n: f64) -> Result<()> {
    relay
        .wait_metric(
            "relay_connections_total",
            &[("outcome", "closed")],
            n,
            METRIC_TIMEOUT,
        )
        .map(drop)
}

/// Publishing a server bound only to the namespace's 127.0.0.1: the host
/// cannot reach it at the namespace's own address, relay can.
fn publish_reaches_a_localhost_only_server(kind: Kind) -> Result<()> {
    let subject = Subject::httpd(kind, Bind::Loopback)?;
    let direct = SocketAddr::from((subject.ip()?, HTTPD_PORT));
    match TcpStream::connect_timeout(&direct, Duration::from_secs(2)) {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
        other => bail!(
            "expected {direct} (the namespace's own address) to refuse: the httpd \
             listens on its 127.0.0.1 only; got {other:?}"
        ),
    }
    let relay = publish(&subject, &[])?;
    get_through(&relay, &subject)?;
    closed(&relay, 1.0)?;
    Ok(())
}

test_per_kind!(publish_reaches_a_localhost_only_server =>
    publish_reaches_a_container_port_bound_to_its_localhost,
    publish_reaches_an_ip_netns_port_bound_to_its_localhost,
    publish_reaches_a_pids_port_bound_to_its_localhost);

#[test]
fn publish_follows_a_restarted_container_without_a_relay_restart() -> Result<()> {
    require_kind!(Kind::Container);
    let subject = Subject::httpd(Kind::Container, Bind::Loopback)?;
    let relay = publish(&subject, &[])?;
    get_through(&relay, &subject)?;
    let (pid, ns) = (subject.pid()?, std::fs::read_link(subject.ns_path()?)?);

    subject.restart()?;
    let (new_pid, new_ns) = (subject.pid()?, std::fs::read_link(subject.ns_path()?)?);
    ensure!(
        new_pid != pid && new_ns != ns,
        "docker restart should give a new process and namespace, still pid {pid} {ns:?}"
    );
    // The first connection after the restart already reaches the new
    // namespace (relay re-checks at once after a refused connect), and so
    // does every one after it.
    for _ in 0..3 {
        get_through(&relay, &subject)
            .context("after docker restart (new pid and namespace), relay still running")?;
    }
    closed(&relay, 4.0)?;
    Ok(())
}

#[test]
fn stopped_container_fails_fast_and_is_counted_as_namespace_unavailable() -> Result<()> {
    require_kind!(Kind::Container);
    let subject = Subject::httpd(Kind::Container, Bind::Loopback)?;
    let relay = publish(&subject, &[])?;
    get_through(&relay, &subject)?;
    subject.stop()?;

    let mut client = relay.connect()?;
    let (_, took) = peers::expect_close(&mut client, Duration::from_secs(5))
        .context("a connection to a stopped container should be closed at once")?;
    ensure!(
        took < Duration::from_secs(3),
        "a connection to a stopped container took {took:?} to close; expected it to fail fast"
    );
    relay.wait_metric(
        "relay_connections_total",
        &[("outcome", "namespace_unavailable")],
        1.0,
        METRIC_TIMEOUT,
    )?;
    ensure!(
        relay.is_listening()?,
        "relay should keep listening after a connection to a stopped container failed"
    );
    Ok(())
}

#[test]
fn publish_observe_counts_the_published_traffic_on_the_containers_lo() -> Result<()> {
    require_kind!(Kind::Container);
    const REQUESTS: u64 = 10;
    let subject = Subject::httpd(Kind::Container, Bind::Loopback)?;
    let relay = publish(&subject, &["--observe"])?;
    let (target, lo) = (subject.label()?, "lo");
    let base = settle(&relay, &subject, lo, None, |_| true)?;
    for _ in 0..REQUESTS {
        get_through(&relay, &subject)?;
    }
    let end = agree_since(&relay, &subject, lo, &base)?;
    // On lo every segment leaves (egress) and arrives (ingress): relay's
    // connects from inside the container are the SYNs, httpd's answers the SYN-ACKs.
    for direction in ["ingress", "egress"] {
        for (flag, expected) in [
            ("syn", REQUESTS),
            ("synack", REQUESTS),
            ("fin", 2 * REQUESTS),
        ] {
            let got = tcp_flag(&end.scrape, &target, lo, direction, flag)
                - tcp_flag(&base.scrape, &target, lo, direction, flag);
            ensure!(
                got == expected,
                "{REQUESTS} published requests: expected {expected} {flag} {direction} on {target}'s lo, \
                 relay counted {got}\nscrape:\n{}",
                end.scrape.text
            );
        }
    }
    closed(&relay, REQUESTS as f64)?;
    Ok(())
}

/// redis-server on the host's 127.0.0.1, plaintext, no persistence.
struct HostRedis {
    // Dropped first: kill redis before removing its directory.
    _proc: ChildProc,
    addr: SocketAddr,
    _dir: TempDir,
}

impl HostRedis {
    fn start() -> Result<Self> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let dir = TempDir::new("redis")?;
        let mut cmd = Command::new("redis-server");
        cmd.args([
            "--port",
            &addr.port().to_string(),
            "--bind",
            "127.0.0.1",
            "--dir",
        ])
        .arg(dir.path())
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"]);
        let mut proc = ChildProc::spawn("redis-server", cmd)?;
        proc.wait_listening(addr.port(), LISTEN_TIMEOUT)?;
        Ok(HostRedis {
            _proc: proc,
            addr,
            _dir: dir,
        })
    }
}

/// Run `busybox nc 127.0.0.1 <port>` inside the subject with `input`; its stdout.
fn nc_inside(subject: &Subject, port: u16, input: &[u8]) -> Result<String> {
    let mut cmd = Command::new("timeout");
    let inner = subject.exec("busybox")?;
    cmd.arg(CLIENT_TIMEOUT_SECS)
        .arg(inner.get_program())
        .args(inner.get_args())
        .args(["nc", "127.0.0.1", &port.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
    child
        .stdin
        .take()
        .context("nc's stdin")?
        .write_all(input)
        .context("writing to nc")?;
    let out = child.wait_with_output().context("waiting for nc")?;
    ensure!(
        out.status.success(),
        "{cmd:?} exited with {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A process inside the subject's namespace talks to the host's redis
/// through a listener relay made inside that namespace.
fn namespace_reaches_a_host_redis(kind: Kind) -> Result<()> {
    let subject = Subject::httpd(kind, Bind::Loopback)?;
    let redis = HostRedis::start()?;
    let inner_port = free_port()?;
    let listen = format!("tcp://127.0.0.1:{inner_port}@{}", subject.target()?);
    let relay = RelayCmd::raw(&["forward", &listen, &redis.addr.to_string()])
        .opts(&data_path())
        .with_metrics()?
        .spawn()?;
    wait_listening(subject.pid()?, inner_port, LISTEN_TIMEOUT)
        .context("relay's listener inside the target namespace")?;

    let value = subject.label()?;
    let reply = nc_inside(
        &subject,
        inner_port,
        format!("SET relayed {value}\r\nGET relayed\r\nQUIT\r\n").as_bytes(),
    )?;
    let expected = format!("+OK\r\n${}\r\n{value}\r\n+OK\r\n", value.len());
    ensure!(
        reply == expected,
        "redis through relay from inside {}: expected {expected:?}, got {reply:?}",
        subject.target()?
    );
    closed(&relay, 1.0)?;
    Ok(())
}

test_per_kind!(namespace_reaches_a_host_redis =>
    container_reaches_a_host_local_redis_through_relay,
    ip_netns_reaches_a_host_local_redis_through_relay,
    pid_namespace_reaches_a_host_local_redis_through_relay;
    requires "redis-server");

/// Namespaced addresses that name no container, process or namespace stop
/// relay at startup: exit 2, with a line naming the target and the cause.
#[test]
fn bad_namespaced_addresses_exit_2_naming_them() -> Result<()> {
    require_kind!(Kind::Container);
    let dir = TempDir::new("not-a-netns")?;
    let file = dir.join("plain-file");
    std::fs::write(&file, "not a namespace").context("writing a regular file")?;
    let stopped = Subject::httpd(Kind::Container, Bind::Loopback)?;
    stopped.stop()?;
    let (pid, port) = (missing_pid()?, free_port()?.to_string());
    let host = format!("127.0.0.1:{port}");
    let unknown = format!("relay-t-{}-no-such-container", std::process::id());
    let stopped_name = stopped.container()?.name().to_string();
    let file_spec = format!("netns:{}", file.display());
    for (args, names) in [
        (
            vec!["publish", unknown.as_str(), "8080:1"],
            [format!("container:{unknown}"), "no such container".into()],
        ),
        (
            vec!["publish", stopped_name.as_str(), "8080:1"],
            [format!("container:{stopped_name}"), "not running".into()],
        ),
        (
            vec![
                "forward",
                host.as_str(),
                &format!("tcp://127.0.0.1:80@pid:{pid}"),
            ],
            [format!("pid:{pid}"), "no such process".into()],
        ),
        (
            vec![
                "forward",
                &format!("tcp://127.0.0.1:{port}@{file_spec}"),
                "127.0.0.1:1",
            ],
            [file_spec.clone(), "not a network namespace".into()],
        ),
    ] {
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        RelayCmd::raw(&args).expect_usage_error(METRIC_TIMEOUT, &names)?;
    }
    Ok(())
}
