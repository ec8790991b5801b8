//! Memory per idle relayed connection. A holding server here accepts
//! connections, reads the one byte each client sends (so the whole path is
//! really up) and keeps them open. relay (one process) is measured by
//! VmRSS growth over 10,000 connections; socat (a process per connection)
//! by the growth of the summed Pss of all its processes over fewer
//! connections, Pss so that shared pages are not counted 500 times.
//! Target: relay <= 40 KiB per connection.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::json;

use super::Ctx;
use super::report::{Row, SectionReport, Target};
use super::via::{Hop, HopOptions, Via};

const TARGET_KIB_PER_CONN: f64 = 40.0;

/// Connection counts for relay and socat.
pub fn counts(quick: bool) -> (usize, usize) {
    if quick { (2_000, 200) } else { (10_000, 500) }
}

/// How one forwarder's memory grew.
struct Growth {
    connections: usize,
    before_kib: u64,
    after_kib: u64,
    measure: &'static str,
}

impl Growth {
    fn per_conn_kib(&self) -> f64 {
        (self.after_kib as f64 - self.before_kib as f64) / self.connections as f64
    }
}

pub fn run(ctx: &Ctx) -> SectionReport {
    let (n_relay, n_socat) = counts(ctx.quick);
    let n_relay = n_relay.min(ctx.max_held_connections);
    println!(
        "xtask: bench: memory per idle connection, relay x{n_relay} (VmRSS), socat x{n_socat} (sum of Pss)"
    );
    let one = |via: Via, n: usize| {
        measure(ctx, via, n)
            .inspect(|g| {
                println!(
                    "xtask:   {:<6} {:.1} KiB/conn ({}: {} -> {} KiB over {} connections)",
                    via.name(),
                    g.per_conn_kib(),
                    g.measure,
                    g.before_kib,
                    g.after_kib,
                    g.connections
                );
            })
            .map_err(|err| {
                let text = format!("{err:#}");
                eprintln!("xtask: bench: {} failed: {text}", via.name());
                text
            })
    };
    let socat = one(Via::Socat, n_socat);
    let relay = one(Via::Relay, n_relay);

    let value = |g: &Result<Growth, String>| match g {
        Ok(g) => format!(
            "{:.1} ({}, {} conns)",
            g.per_conn_kib(),
            g.measure,
            g.connections
        ),
        Err(_) => "error".to_string(),
    };
    let relay_kib = relay.as_ref().ok().map(Growth::per_conn_kib);
    let row = Row {
        metric: "memory per idle connection (KiB)".to_string(),
        values: ["-".to_string(), value(&socat), value(&relay)],
        vs_socat: super::report::ratio(relay_kib, socat.as_ref().ok().map(Growth::per_conn_kib)),
        vs_direct: "-".to_string(),
        target: Some(Target {
            text: format!("<= {TARGET_KIB_PER_CONN} KiB/conn"),
            pass: relay_kib.map(|k| k <= TARGET_KIB_PER_CONN),
        }),
    };
    let to_json = |g: &Result<Growth, String>| match g {
        Ok(g) => json!({
            "kib_per_connection": g.per_conn_kib(),
            "connections": g.connections,
            "measure": g.measure,
            "before_kib": g.before_kib,
            "after_kib": g.after_kib,
        }),
        Err(err) => json!({ "error": err }),
    };
    let errors = [(Via::Socat, &socat), (Via::Relay, &relay)]
        .into_iter()
        .filter_map(|(via, g)| g.as_ref().err().map(|e| format!("{}: {e}", via.name())))
        .collect();
    SectionReport {
        key: "memory_per_connection",
        json: json!({
            "method": "idle connections held open after 1 byte each reached the server",
            "socat": to_json(&socat),
            "relay": to_json(&relay),
        }),
        errors,
        rows: vec![row],
    }
}

fn measure(ctx: &Ctx, via: Via, n: usize) -> Result<Growth> {
    let holder = Holder::start()?;
    // Headroom over n so the bench measures memory, not the limit.
    let opts = HopOptions {
        max_connections: Some(n + 1000),
        ..HopOptions::default()
    };
    let mut hop = Hop::start(via, holder.port, &ctx.relay_bin, "rss", opts)?;
    let pid = hop
        .proc
        .as_ref()
        .map(|p| p.pid())
        .context("rss is measured on a forwarder process")?;
    let read = |pid: i32| -> Result<u64> {
        match via {
            Via::Relay => vm_rss_kib(pid),
            _ => group_pss_kib(pid),
        }
    };
    let before_kib = read(pid)?;
    let clients =
        open_held(hop.port, n, &holder).with_context(|| format!("through {}", via.name()))?;
    hop.check_alive()?;
    let after_kib = settled(|| read(pid))?;
    drop(clients);
    Ok(Growth {
        connections: n,
        before_kib,
        after_kib,
        measure: if via == Via::Relay {
            "VmRSS"
        } else {
            "sum of Pss"
        },
    })
}

/// Sample until two readings 200 ms apart agree within 1% (at most 3 s):
/// freshly opened connections may still be settling their buffers.
fn settled(mut read: impl FnMut() -> Result<u64>) -> Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut last = read()?;
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let now = read()?;
        if now.abs_diff(last) * 100 <= last || Instant::now() > deadline {
            return Ok(now.max(last));
        }
        last = now;
    }
}

/// Open `n` connections to `port`, each sending one byte, and wait until
/// the holder has read the byte of every one. Pacing keeps at most a few
/// hundred in flight, so no SYN queue overflows into 1 s retransmits.
fn open_held(port: u16, n: usize, holder: &Holder) -> Result<Vec<TcpStream>> {
    const IN_FLIGHT: usize = 256;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut clients = Vec::with_capacity(n);
    for i in 0..n {
        while clients.len() - holder.done() > IN_FLIGHT {
            holder.check(deadline, n)?;
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .with_context(|| format!("connection {} of {n} to {addr} failed", i + 1))?;
        stream
            .write_all(&[1])
            .with_context(|| format!("connection {} of {n}: write failed", i + 1))?;
        clients.push(stream);
    }
    while holder.accepted.load(Ordering::SeqCst) < n {
        holder.check(deadline, n)?;
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(clients)
}

/// Accepts, reads one byte per connection, and keeps the sockets open.
struct Holder {
    port: u16,
    accepted: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Holder {
    fn start() -> Result<Holder> {
        let listener = listen_loopback(4096)?;
        let port = listener.local_addr().context("holder address")?.port();
        listener
            .set_nonblocking(true)
            .context("holder: O_NONBLOCK")?;
        let accepted = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (acc, fail, stop_flag) = (accepted.clone(), failed.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("holder".into())
            .spawn(move || {
                let mut held = Vec::new();
                while !stop_flag.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => match read_one(&stream) {
                            Ok(()) => {
                                held.push(stream);
                                acc.fetch_add(1, Ordering::SeqCst);
                            }
                            Err(err) => {
                                if fail.fetch_add(1, Ordering::SeqCst) == 0 {
                                    eprintln!("xtask: holder: first failed connection: {err}");
                                }
                            }
                        },
                        Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        Err(err) => {
                            // EMFILE would spin; count it and back off.
                            if fail.fetch_add(1, Ordering::SeqCst) == 0 {
                                eprintln!("xtask: holder: accept failed: {err}");
                            }
                            std::thread::sleep(Duration::from_millis(10));
                        }
                    }
                }
            })
            .context("cannot start the holder thread")?;
        Ok(Holder {
            port,
            accepted,
            failed,
            stop,
            thread: Some(thread),
        })
    }

    fn done(&self) -> usize {
        self.accepted.load(Ordering::SeqCst) + self.failed.load(Ordering::SeqCst)
    }

    fn check(&self, deadline: Instant, n: usize) -> Result<()> {
        let failed = self.failed.load(Ordering::SeqCst);
        if failed > 0 {
            bail!(
                "{failed} connection(s) reached the server without their byte (see the holder error above)"
            );
        }
        if Instant::now() > deadline {
            bail!(
                "only {} of {n} connections reached the server in time",
                self.accepted.load(Ordering::SeqCst)
            );
        }
        Ok(())
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn read_one(stream: &TcpStream) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut byte = [0u8; 1];
    (&*stream).read_exact(&mut byte)
}

/// A 127.0.0.1 listener with a deep backlog (std's is 128).
fn listen_loopback(backlog: i32) -> Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).context("socket()")?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    socket.bind(&addr.into()).context("bind 127.0.0.1:0")?;
    socket.listen(backlog).context("listen()")?;
    Ok(socket.into())
}

/// VmRSS of one process, in KiB.
pub(super) fn vm_rss_kib(pid: i32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    kib_field(&text, "VmRSS:").with_context(|| format!("no VmRSS line in {path}"))
}

/// Sum of Pss over every process in process group `pgid`, in KiB.
fn group_pss_kib(pgid: i32) -> Result<u64> {
    let mut total = 0;
    for pid in group_members(pgid)? {
        // A member may exit between listing and reading; skip it.
        if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) {
            total += kib_field(&text, "Pss:")
                .with_context(|| format!("no Pss line in /proc/{pid}/smaps_rollup"))?;
        }
    }
    Ok(total)
}

fn group_members(pgid: i32) -> Result<Vec<i32>> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").context("cannot list /proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid pgrp ...": comm may hold spaces or ')'.
        let after_comm = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        if after_comm
            .split_whitespace()
            .nth(2)
            .and_then(|s| s.parse::<i32>().ok())
            == Some(pgid)
        {
            pids.push(pid);
        }
    }
    Ok(pids)
}

/// `Field:   1234 kB` -> 1234.
fn kib_field(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_kib_fields() {
        let status = "Name:\trelay\nVmHWM:\t  9000 kB\nVmRSS:\t  8123 kB\n";
        assert_eq!(kib_field(status, "VmRSS:"), Some(8123));
        assert_eq!(kib_field(status, "Pss:"), None);
        assert!(vm_rss_kib(std::process::id() as i32).unwrap() > 0);
    }

    #[test]
    fn holder_counts_connections_that_sent_a_byte() {
        let holder = Holder::start().unwrap();
        let clients = open_held(holder.port, 50, &holder).unwrap();
        assert_eq!(clients.len(), 50);
        assert_eq!(holder.accepted.load(Ordering::SeqCst), 50);
    }
}
