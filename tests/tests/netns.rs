//! relay::netns: a target resolves to the namespace it names, code run in
//! it reaches what only that namespace can reach, and a target that cannot
//! be resolved is named in the error.
//!
//! Containers come from the Docker harness (busybox httpd bound to the
//! container's own 127.0.0.1:8080, which the host cannot reach); `ip netns`
//! names from [`NetNs`].

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use relay::netns::{Netns, NetnsError, Target, resolve};
use relay_tests::docker::{self, Container, HTTPD_PORT};
use relay_tests::netns::NetNs;
use relay_tests::tempdir::TempDir;
use relay_tests::{http, peers, require_docker, require_root};

/// What the container serves, at the address every container has.
const HTTPD: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), HTTPD_PORT);

/// Resolve `text` on a throwaway runtime (the tests themselves are sync).
fn resolve_text(text: &str) -> Result<Result<Netns, NetnsError>> {
    let target: Target = text.parse()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building a tokio runtime")?;
    Ok(runtime.block_on(resolve(&target)))
}

fn resolve_ok(text: &str) -> Result<Netns> {
    resolve_text(text)?.with_context(|| format!("resolving {text}"))
}

fn still_current(ns: &Netns) -> Result<bool> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building a tokio runtime")?;
    Ok(runtime.block_on(ns.still_current())?)
}

/// The nsfs inode of a namespace file, as `ls -iL` shows it.
fn inode(path: &str) -> Result<u64> {
    Ok(std::fs::metadata(path)
        .with_context(|| format!("stat {path}"))?
        .ino())
}

/// `ns` is the container's namespace: same inode as its init process's,
/// and a connect made in it reaches the httpd that the host cannot reach.
fn is_the_containers_namespace(ns: &Netns, container: &Container) -> Result<()> {
    let pid = container.pid()?;
    let expected = inode(&format!("/proc/{pid}/ns/net"))?;
    ensure!(
        ns.id().ino == expected,
        "{}: expected the inode of /proc/{pid}/ns/net ({expected}), got {}",
        ns.target().spec(),
        ns.id()
    );

    let stream = ns
        .run(|| TcpStream::connect(HTTPD))?
        .with_context(|| format!("connecting to {HTTPD} inside {}", ns.label()))?;
    peers::set_io_timeouts(&stream)?;
    let response = http::get(stream, "localhost", "/index.html")?;
    let body = String::from_utf8_lossy(&response.body);
    ensure!(
        response.status == 200 && body == container.httpd_body(),
        "GET {HTTPD} inside {}: expected 200 {:?}, got {} {body:?}",
        ns.label(),
        container.httpd_body(),
        response.status
    );

    // From the host, the same address must not lead to the container (it
    // may lead to something else another test runs on the host).
    if let Ok(stream) = TcpStream::connect_timeout(&HTTPD, Duration::from_secs(2)) {
        peers::set_io_timeouts(&stream)?;
        if let Ok(response) = http::get(stream, "localhost", "/index.html") {
            ensure!(
                response.body != container.httpd_body().as_bytes(),
                "the host reached the container's {HTTPD}: its namespace is not separate"
            );
        }
    }
    Ok(())
}

/// Resolve a container-backed target and check it from every side.
fn container_target_reaches_its_httpd(target: impl Fn(&Container) -> Result<String>) -> Result<()> {
    let container = Container::httpd()?;
    let text = target(&container)?;
    let ns = resolve_ok(&text)?;
    is_the_containers_namespace(&ns, &container)?;
    ensure!(
        ns.label() == container.name(),
        "{text}: expected the label {:?}, got {:?}",
        container.name(),
        ns.label()
    );
    ensure!(
        ns.pid() == Some(container.pid()?),
        "{text}: expected pid {:?}, got {:?}",
        container.pid()?,
        ns.pid()
    );
    Ok(())
}

#[test]
fn container_name_resolves_to_the_containers_namespace() -> Result<()> {
    require_docker!();
    container_target_reaches_its_httpd(|c| Ok(format!("container:{}", c.name())))?;
    Ok(())
}

#[test]
fn container_id_resolves_and_is_labelled_by_name() -> Result<()> {
    require_docker!();
    container_target_reaches_its_httpd(|c| Ok(format!("container:{}", &c.id()[..12])))?;
    Ok(())
}

#[test]
fn pid_resolves_to_the_processs_namespace() -> Result<()> {
    require_docker!();
    let container = Container::httpd()?;
    let text = format!("pid:{}", container.pid()?);
    let ns = resolve_ok(&text)?;
    is_the_containers_namespace(&ns, &container)?;
    ensure!(
        ns.label() == text,
        "expected the label {text:?}, got {:?}",
        ns.label()
    );
    Ok(())
}

#[test]
fn restarted_container_is_detected_and_resolved_anew() -> Result<()> {
    require_docker!();
    let container = Container::httpd()?;
    let text = format!("container:{}", container.name());
    let before = resolve_ok(&text)?;
    ensure!(
        still_current(&before)?,
        "{text}: just resolved, yet not current"
    );

    container.restart()?;
    container.wait_listening(HTTPD_PORT)?;
    ensure!(
        !still_current(&before)?,
        "{text}: after a restart, the old namespace {} still counts as current",
        before.id()
    );
    let after = resolve_ok(&text)?;
    ensure!(
        after.id() != before.id(),
        "{text}: a restart should give a new namespace, got {} again",
        after.id()
    );
    ensure!(
        after.container_id() == before.container_id(),
        "{text}: a restart keeps the container id"
    );
    is_the_containers_namespace(&after, &container)
}

#[test]
fn ip_netns_name_and_path_resolve_to_that_namespace() -> Result<()> {
    require_root!("creates a network namespace");
    let host_ns = NetNs::create()?;
    let path = format!("/var/run/netns/{}", host_ns.name());
    for text in [format!("netns:{}", host_ns.name()), format!("netns:{path}")] {
        let ns = resolve_ok(&text)?;
        let expected = inode(&path)?;
        ensure!(
            ns.id().ino == expected,
            "{text}: expected the inode of {path} ({expected}), got {}",
            ns.id()
        );

        // A listener on the namespace's own loopback: reachable from a
        // connect made via run, not from the host.
        let listener = host_ns.tcp_listen(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
        let addr = listener.local_addr()?;
        let client = ns
            .run(move || TcpStream::connect(addr))?
            .with_context(|| format!("connecting to {addr} inside {text}"))?;
        let (_, peer) = listener
            .accept()
            .context("accepting the connect made inside")?;
        ensure!(
            peer == client.local_addr()?,
            "{text}: the listener inside accepted {peer}, not the client {}",
            client.local_addr()?
        );

        let _ = TcpStream::connect_timeout(&addr, Duration::from_secs(2));
        listener.set_nonblocking(true)?;
        match listener.accept() {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Ok((_, peer)) => {
                bail!("{text}: a connect from the host reached {addr} inside ({peer})")
            }
            Err(e) => return Err(e).context("polling the listener inside"),
        }
    }
    Ok(())
}

// ------------------------------------------------------------------ errors

/// Resolving `text` fails with an error `is_kind` accepts, whose message
/// starts with the target and contains `says`.
fn fails_naming_the_target(text: &str, is_kind: fn(&NetnsError) -> bool, says: &str) -> Result<()> {
    let err = match resolve_text(text)? {
        Ok(ns) => bail!("{text}: expected an error, resolved to {}", ns.id()),
        Err(e) => e,
    };
    ensure!(is_kind(&err), "{text}: unexpected kind of error: {err:?}");
    let msg = err.to_string();
    ensure!(
        msg.starts_with(&format!("{text}: ")),
        "{text}: the error should start with the target, got: {msg}"
    );
    ensure!(
        msg.contains(says),
        "{text}: expected the error to say {says:?}, got: {msg}"
    );
    Ok(())
}

#[test]
fn unknown_container_is_named() -> Result<()> {
    require_docker!();
    docker::ensure_daemon()?;
    let text = format!("container:relay-t-{}-no-such-container", std::process::id());
    fails_naming_the_target(
        &text,
        |e| matches!(e, NetnsError::UnknownContainer { .. }),
        "no such container",
    )
}

#[test]
fn stopped_container_is_named_as_not_running() -> Result<()> {
    require_docker!();
    let container = Container::httpd()?;
    container.stop()?;
    fails_naming_the_target(
        &format!("container:{}", container.name()),
        |e| matches!(e, NetnsError::ContainerNotRunning { .. }),
        "is not running (status exited)",
    )
}

#[test]
fn nonexistent_pid_is_named() -> Result<()> {
    let pid_max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")?
        .trim()
        .parse()
        .map_err(|e| anyhow!("reading pid_max: {e}"))?;
    fails_naming_the_target(
        &format!("pid:{}", pid_max + 1),
        |e| matches!(e, NetnsError::NoSuchPid { .. }),
        "no such process",
    )
}

#[test]
fn regular_file_is_not_a_network_namespace() -> Result<()> {
    let dir = TempDir::new("netns-file")?;
    let path = dir.join("not-a-netns");
    std::fs::write(&path, "plain text\n")?;
    fails_naming_the_target(
        &format!("netns:{}", path.display()),
        |e| matches!(e, NetnsError::NotNetns { .. }),
        "is not a network namespace (a regular file)",
    )
}
