//! Memory per idle relayed connection. A holding server here accepts
//! connections, reads the one byte each client sends (so the whole path is
//! really up) and keeps them open. A forwarder that is one process (relay,
//! HAProxy, docker-proxy) is measured by VmRSS growth over 10,000
//! connections; one of several processes (nginx's workers, socat's process
//! per connection, over 500 only) by the growth of the summed Pss of all
//! of them, Pss so that shared pages are not counted once per process.
//! Targets: relay <= 40 KiB per connection, and <= the best peer's.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::json;

use super::Ctx;
use super::report::{Better, PerVia, SectionReport, Target};
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
    let (n_many, n_socat) = counts(ctx.quick);
    // Within what this process and every forwarder can hold (HAProxy
    // refuses to start when its maxconn does not fit the fd limit).
    let n_many = n_many
        .min(ctx.max_held_connections)
        .min(super::peers::max_forwarded(super::peers::fd_hard_limit()).saturating_sub(1000));
    let vias: Vec<Via> = ctx
        .vias(Via::PLAIN)
        .into_iter()
        .filter(|v| *v != Via::Direct)
        .collect();
    // docker-proxy relays with Go's io.Copy, which splices through a pipe
    // per direction, held while the connection idles: six descriptors per
    // connection. At EMFILE it stops accepting for good ("Stopping proxy"),
    // so it gets what its limit holds.
    let n_docker = n_many.min(
        usize::try_from(super::peers::fd_hard_limit().saturating_sub(1024) / 6)
            .unwrap_or(usize::MAX),
    );
    let count = |via: Via| match via {
        Via::Socat => n_socat,
        Via::DockerProxy => n_docker,
        _ => n_many,
    };
    println!(
        "xtask: bench: memory per idle connection, x{n_many} (socat x{n_socat}); one process: VmRSS, \
         several (socat's forks, nginx's workers): sum of Pss"
    );
    let growth = PerVia::measure(&vias, |via| {
        let g = measure(ctx, via, count(via))?;
        println!(
            "xtask:   {:<14} {:.1} KiB/conn ({}: {} -> {} KiB over {} connections)",
            via.name(),
            g.per_conn_kib(),
            g.measure,
            g.before_kib,
            g.after_kib,
            g.connections
        );
        Ok(g)
    });
    let kib = growth.map(Growth::per_conn_kib);
    let mut row = kib
        .row("memory per idle connection (KiB)", 1, Better::Lower)
        .target(Target {
            text: format!("<= {TARGET_KIB_PER_CONN} KiB/conn"),
            pass: kib.ok(Via::Relay).map(|k| *k <= TARGET_KIB_PER_CONN),
        })
        .target(Target::vs_best_peer(&kib, Better::Lower, 1.0));
    // Say how each was measured, in its cell.
    for via in growth.vias() {
        if let (Some(g), Some(cell)) = (growth.ok(via), row.cells.get_mut(&via)) {
            *cell = format!("{cell} ({}, {} conns)", g.measure, g.connections);
        }
    }
    SectionReport {
        key: "memory_per_connection",
        json: json!({
            "method": "idle connections held open after 1 byte each reached the server",
            "per_route": growth.to_json(|g| json!({
                "kib_per_connection": g.per_conn_kib(),
                "connections": g.connections,
                "measure": g.measure,
                "before_kib": g.before_kib,
                "after_kib": g.after_kib,
            })),
            "relay_vs_best_peer": kib.relay_vs_best_peer(Better::Lower),
        }),
        errors: growth.errors(),
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
        .pgid()
        .context("rss is measured on a forwarder process")?;
    let read = |pid: i32| -> Result<u64> {
        if via.multi_process() {
            group_pss_kib(pid)
        } else {
            vm_rss_kib(pid)
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
        measure: if via.multi_process() {
            "sum of Pss"
        } else {
            "VmRSS"
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
    for pid in super::procs::group_members(pgid)? {
        // A member may exit between listing and reading; skip it.
        if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) {
            total += kib_field(&text, "Pss:")
                .with_context(|| format!("no Pss line in /proc/{pid}/smaps_rollup"))?;
        }
    }
    Ok(total)
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
