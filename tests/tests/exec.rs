//! EXEC/SYSTEM targets: one child per connection, its stdin and stdout the
//! connection; children reaped when their connection closes, and none left
//! behind after relay exits, even one that ignores its EOF.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use nix::sys::signal::Signal;
use relay_tests::peers::{self, echo_payload};
use relay_tests::ports::free_port;
use relay_tests::wait::poll_until;
use relay_tests::{Payload, Relay, RelayCmd};

const CONNECTIONS: usize = 200;
/// How long children may take to go after their connections closed.
const REAP_TIMEOUT: Duration = Duration::from_secs(20);

/// The (pid, command name, state) of every process whose parent is `parent`.
fn children_of(parent: u32) -> Result<Vec<(u32, String, char)>> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc").context("listing /proc")? {
        let entry = entry?;
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // A process may exit while the list is read.
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat[open + 1..close].to_string();
        let mut rest = stat[close + 1..].split_whitespace();
        let state = rest.next().and_then(|s| s.chars().next()).unwrap_or('?');
        let ppid = rest.next().and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(parent) {
            children.push((pid, comm, state));
        }
    }
    Ok(children)
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
    })
}

fn exec_relay(target: &str, options: &[&str]) -> Result<Relay> {
    let port = free_port()?;
    RelayCmd::socat(
        port,
        format!("TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr"),
        target,
    )
    .opts(options)
    .with_metrics()
    .and_then(|cmd| cmd.spawn())
}

/// 200 clients at once through `EXEC:/bin/cat`: each gets its own payload
/// back whole; while they are open relay has 200 `cat` children, once they
/// close it has none (no zombie), and `relay_exec_children_total` counted
/// 200 clean exits.
#[test]
fn exec_cat_serves_200_concurrent_connections_and_leaves_no_children() -> Result<()> {
    let mut relay = exec_relay("EXEC:/bin/cat", &[])?;
    let addr = relay.addr();
    let clients: Vec<_> = (0..CONNECTIONS)
        .map(|i| -> Result<_> {
            let stream = peers::connect(addr)?;
            Ok((i, stream))
        })
        .collect::<Result<_>>()?;
    // Every client is connected: every child is started once relay has
    // accepted them all.
    poll_until("200 cat children", REAP_TIMEOUT, || {
        let cats = children_of(relay.pid())?
            .iter()
            .filter(|(_, comm, _)| comm == "cat")
            .count();
        Ok((cats == CONNECTIONS).then_some(()))
    })?;
    let cats: Vec<u32> = children_of(relay.pid())?
        .iter()
        .map(|(pid, _, _)| *pid)
        .collect();
    let workers: Vec<_> = clients
        .into_iter()
        .map(|(i, stream)| {
            std::thread::spawn(move || -> Result<()> {
                let payload = Payload::new(1000 + i as u64, 64 * 1024 + i as u64 * 101);
                let heard = echo_payload(stream, payload)?;
                ensure!(
                    heard == payload.fingerprint(),
                    "connection {i}: the echo through cat came back as {heard:?}, sent {:?}",
                    payload.fingerprint()
                );
                Ok(())
            })
        })
        .collect();
    for worker in workers {
        worker
            .join()
            .map_err(|_| anyhow::anyhow!("a client thread panicked"))??;
    }
    poll_until("relay to have no children left", REAP_TIMEOUT, || {
        Ok(children_of(relay.pid())?.is_empty().then_some(()))
    })
    .with_context(|| format!("children left: {:?}", children_of(relay.pid())))?;
    relay.wait_metric(
        "relay_exec_children_total",
        &[("exit", "success")],
        CONNECTIONS as f64,
        REAP_TIMEOUT,
    )?;
    relay.signal(Signal::SIGTERM)?;
    let status = relay.wait_exit(REAP_TIMEOUT)?;
    ensure!(status.success(), "relay exited with {status}");
    let left: Vec<u32> = cats.into_iter().filter(|pid| alive(*pid)).collect();
    ensure!(
        left.is_empty(),
        "cat processes still running after relay exited: {left:?}"
    );
    Ok(())
}

/// A child that ignores its EOF (`sleep`) is ended when the drain timeout
/// runs out (SIGTERM, then SIGKILL), and relay exits with none left.
#[test]
fn a_child_that_ignores_eof_is_killed_at_the_drain_timeout() -> Result<()> {
    let mut relay = exec_relay("EXEC:/bin/sleep 1000", &["--drain-timeout", "1s"])?;
    let client = relay.connect()?;
    let sleeper = poll_until("the sleep child", REAP_TIMEOUT, || {
        Ok(children_of(relay.pid())?
            .into_iter()
            .find(|(_, comm, _)| comm == "sleep")
            .map(|(pid, _, _)| pid))
    })?;
    relay.signal(Signal::SIGTERM)?;
    let status = relay.wait_exit(REAP_TIMEOUT)?;
    ensure!(
        status.success(),
        "relay exited with {status}; log:\n{}",
        relay.stderr()
    );
    ensure!(
        !alive(sleeper),
        "the sleep child (pid {sleeper}) outlived relay; log:\n{}",
        relay.stderr()
    );
    ensure!(
        relay.stderr().contains("exit=\"killed\"") || relay.stderr().contains("exit=killed"),
        "no `child exited ... exit=killed` line in the log:\n{}",
        relay.stderr()
    );
    drop(client);
    Ok(())
}

/// relay killed outright (SIGKILL: no drain, no cleanup) takes its children
/// with it (PR_SET_PDEATHSIG).
#[test]
fn children_die_with_a_killed_relay() -> Result<()> {
    let relay = exec_relay("EXEC:/bin/sleep 1000", &[])?;
    let _client = relay.connect()?;
    let sleeper = poll_until("the sleep child", REAP_TIMEOUT, || {
        Ok(children_of(relay.pid())?
            .into_iter()
            .find(|(_, comm, _)| comm == "sleep")
            .map(|(pid, _, _)| pid))
    })?;
    relay.signal(Signal::SIGKILL)?;
    poll_until("the sleep child to die with relay", REAP_TIMEOUT, || {
        Ok((!alive(sleeper)).then_some(()))
    })?;
    Ok(())
}

/// `EXEC:...,pty`: the child runs on a terminal of its own (a program that
/// asks gets one), the client's half-close reaches it as the terminal's
/// end-of-file (a last line without newline included), its output comes
/// back as a terminal writes it (NL as CR NL), and it exits cleanly,
/// counted and reaped.
#[test]
fn exec_pty_runs_the_child_on_a_terminal_and_ends_it_with_eof() -> Result<()> {
    use std::io::{Read, Write};
    let asks = exec_relay(
        "SYSTEM:test -t 0 && test -t 1 && echo on a terminal,pty",
        &[],
    )?;
    let mut client = asks.connect()?;
    let mut told = String::new();
    client.read_to_string(&mut told)?;
    ensure!(told == "on a terminal\r\n", "the child said {told:?}");

    let cat = exec_relay("EXEC:/bin/cat,pty,echo=0", &[])?;
    let mut client = cat.connect()?;
    client.write_all(b"first line\nno newline")?;
    client.shutdown(std::net::Shutdown::Write)?;
    let mut back = Vec::new();
    client.read_to_end(&mut back)?;
    ensure!(
        back == b"first line\r\nno newline",
        "cat on a terminal gave back {:?}",
        String::from_utf8_lossy(&back)
    );
    cat.wait_metric(
        "relay_exec_children_total",
        &[("exit", "success")],
        1.0,
        REAP_TIMEOUT,
    )?;
    ensure!(
        children_of(cat.pid())?.is_empty(),
        "the child is reaped: {:?}",
        children_of(cat.pid())
    );
    Ok(())
}
