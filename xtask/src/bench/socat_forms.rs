//! The socat drop-in's other address kinds against socat itself, in the
//! same run: UDP datagrams per second through `UDP-LISTEN:<port>,fork
//! UDP:<server>` (four clients, each a ping-pong of 64-byte datagrams
//! against an echo server), and one stream's throughput from a UNIX
//! socket to a TCP server (`UNIX-LISTEN:<path>,fork TCP:<server>`), with
//! relay on its default path and on splice (which works between a UNIX
//! and a TCP socket too). Both sides run the same command line, so the
//! numbers compare the tools, not their configurations.
//!
//! The clients and servers are this module's own threads: iperf3 and the
//! other tools speak neither UNIX sockets nor a datagram echo. Targets:
//! relay at least socat's rate on both.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::Ctx;
use super::procs::{Proc, TempDir};
use super::report::{Better, PerVia, Row, SectionReport, Target, median_by};
use super::via::Via;

/// UDP clients at once, each its own socket (so a session of its own).
const UDP_CLIENTS: usize = 4;
const DATAGRAM: usize = 64;
/// A datagram not answered within this is sent again (socat's fork loses
/// the ones that arrive while it hands a client over to a child).
const UDP_RETRY: Duration = Duration::from_millis(200);
/// Writes of the UNIX stream.
const CHUNK: usize = 256 * 1024;
const TARGET_VS_SOCAT: f64 = 1.0;

pub fn run(ctx: &Ctx) -> SectionReport {
    let (secs, rounds) = (ctx.secs(), ctx.rounds());
    let vias: Vec<Via> = ctx.vias(&[Via::Direct, Via::Socat, Via::Relay]);
    let mut rows = Vec::new();
    let mut json = serde_json::Map::new();
    let mut errors = Vec::new();

    println!(
        "xtask: bench: UDP-LISTEN,fork -> UDP, {UDP_CLIENTS} ping-pong clients, {secs} s, median of {rounds}"
    );
    let udp = match UdpEcho::start() {
        Ok(echo) => PerVia::measure_rounds(&vias, rounds, |via| {
            let rate = udp_rate(ctx, via, echo.addr, secs)?;
            println!("xtask:   {:<14} {rate:.0} datagrams/s", via.name());
            Ok(rate)
        })
        .map(|s| median_by(s, |v| *v)),
        Err(err) => PerVia::all_failed(&vias, &err),
    };
    rows.push(
        udp.row(
            "UDP datagrams per second, UDP-LISTEN,fork (4 clients, ping-pong)",
            0,
            Better::Higher,
        )
        .target(Target::at_least(&udp, Via::Socat, TARGET_VS_SOCAT)),
    );
    json.insert(
        "udp_datagrams_per_s".into(),
        json!({
            "clients": UDP_CLIENTS,
            "bytes": DATAGRAM,
            "values": udp.to_json(|v| json!(v)),
            "relay_vs_socat": udp.relay_vs(Via::Socat),
        }),
    );
    errors.extend(udp.errors());

    println!("xtask: bench: UNIX-LISTEN,fork -> TCP, 1 stream, {secs} s, median of {rounds}");
    let unix = match TcpSink::start() {
        Ok(sink) => {
            let per = PerVia::measure_rounds(&vias, rounds, |via| {
                let gbps = unix_to_tcp(ctx, via, &sink, secs, None)?;
                println!("xtask:   {:<14} {gbps:.2} Gbit/s", via.name());
                Ok(gbps)
            })
            .map(|s| median_by(s, |v| *v));
            let splice = (0..rounds)
                .map(|_| unix_to_tcp(ctx, Via::Relay, &sink, secs, Some("splice")))
                .collect::<Result<Vec<f64>>>()
                .map(|s| median_by(&s, |v| *v));
            if let Ok(gbps) = &splice {
                println!("xtask:   relay (splice)  {gbps:.2} Gbit/s");
            }
            (per, splice.map_err(|e| format!("{e:#}")))
        }
        Err(err) => (PerVia::all_failed(&vias, &err), Err(format!("{err:#}"))),
    };
    let (unix, splice) = unix;
    rows.push(
        unix.row(
            "UNIX -> TCP throughput, 1 stream (Gbit/s; direct: TCP to TCP)",
            2,
            Better::Higher,
        )
        .target(Target::at_least(&unix, Via::Socat, TARGET_VS_SOCAT)),
    );
    rows.push(Row::cells(
        "UNIX -> TCP throughput, 1 stream, relay --data-path splice (Gbit/s)",
        &[(
            Via::Relay,
            splice
                .as_ref()
                .map_or("error".to_string(), |g| format!("{g:.2}")),
        )],
    ));
    json.insert(
        "unix_to_tcp_gbit_per_s".into(),
        json!({
            "values": unix.to_json(|v| json!(v)),
            "relay_splice": splice.as_ref().ok(),
            "relay_vs_socat": unix.relay_vs(Via::Socat),
        }),
    );
    errors.extend(unix.errors());
    if let Err(err) = splice {
        errors.push(format!("relay --data-path splice: {err}"));
    }
    SectionReport {
        key: "socat",
        rows,
        json: Value::Object(json),
        errors,
    }
}

/// Starts `via` (socat or relay, same command line) between `addr1` and
/// `addr2`; `None` for direct.
fn forwarder(
    ctx: &Ctx,
    via: Via,
    label: &str,
    addr1: &str,
    addr2: &str,
    data_path: Option<&str>,
) -> Result<Option<Proc>> {
    let mut cmd = match via {
        Via::Direct => return Ok(None),
        Via::Socat => Command::new("socat"),
        Via::Relay => {
            let mut cmd = Command::new(&ctx.relay_bin);
            cmd.args(["-q", "--idle-timeout", "none"]);
            if let Some(path) = data_path {
                cmd.args(["--data-path", path]);
            }
            cmd
        }
        other => bail!("{} does not take socat's addresses", other.name()),
    };
    cmd.args([addr1, addr2]);
    let name = format!("{}-{label}", via.name());
    let dir = crate::workspace::bench_dir();
    std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(dir.join(format!("{name}.conf")), crate::cmd::render(&cmd)))
        .with_context(|| format!("writing {name}'s command line in {}", dir.display()))?;
    Proc::spawn(&name, cmd).map(Some)
}

/// A UDP echo server on 127.0.0.1, answering each datagram to its sender.
struct UdpEcho {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl UdpEcho {
    fn start() -> Result<Self> {
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).context("binding the UDP echo")?;
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        let addr = socket.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stopped.load(Ordering::Relaxed) {
                if let Ok((n, from)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(&buf[..n], from);
                }
            }
        });
        Ok(UdpEcho { addr, stop })
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Datagrams answered per second, all clients together.
fn udp_rate(ctx: &Ctx, via: Via, echo: SocketAddr, secs: u64) -> Result<f64> {
    let port = super::procs::free_port()?;
    let mut hop = forwarder(
        ctx,
        via,
        "udp",
        &format!("UDP-LISTEN:{port},fork,reuseaddr"),
        &format!("UDP:{echo}"),
        None,
    )?;
    let dial = match via {
        Via::Direct => echo,
        _ => SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
    };
    // Each client's first answer: the route is up and its session open.
    let clients: Vec<UdpSocket> = (0..UDP_CLIENTS)
        .map(|_| udp_client(dial, hop.as_mut()))
        .collect::<Result<_>>()?;
    let answered = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs(secs);
    let threads: Vec<_> = clients
        .into_iter()
        .map(|socket| {
            let answered = Arc::clone(&answered);
            std::thread::spawn(move || ping_pong(&socket, until, &answered))
        })
        .collect();
    for thread in threads {
        thread
            .join()
            .map_err(|_| anyhow::anyhow!("a UDP client panicked"))??;
    }
    if let Some(hop) = hop.as_mut() {
        hop.check_alive()?;
    }
    Ok(answered.load(Ordering::Relaxed) as f64 / secs as f64)
}

/// A client socket whose first datagram was answered (retried for 5 s).
fn udp_client(dial: SocketAddr, mut hop: Option<&mut Proc>) -> Result<UdpSocket> {
    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    socket.connect(dial)?;
    socket.set_read_timeout(Some(UDP_RETRY))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; DATAGRAM];
    while Instant::now() < deadline {
        if let Some(hop) = hop.as_mut() {
            hop.check_alive()?;
        }
        socket.send(&[0u8; DATAGRAM])?;
        if socket.recv(&mut buf).is_ok() {
            return Ok(socket);
        }
    }
    bail!("no answer through {dial} within 5 s")
}

/// Send, wait for the echo (resend after [`UDP_RETRY`]), count, until `until`.
fn ping_pong(socket: &UdpSocket, until: Instant, answered: &AtomicU64) -> Result<()> {
    let mut buf = [0u8; DATAGRAM];
    let mut seq: u64 = 0;
    while Instant::now() < until {
        seq += 1;
        let mut datagram = [0u8; DATAGRAM];
        datagram[..8].copy_from_slice(&seq.to_be_bytes());
        socket.send(&datagram)?;
        loop {
            match socket.recv(&mut buf) {
                // An answer to an earlier, resent datagram is not this one's.
                Ok(n) if n >= 8 && buf[..8] == seq.to_be_bytes() => {
                    answered.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Ok(_) => continue,
                Err(_) if Instant::now() >= until => return Ok(()),
                Err(_) => socket.send(&datagram).map(|_| ())?,
            }
        }
    }
    Ok(())
}

/// A TCP server on 127.0.0.1 that reads and counts, connection after
/// connection.
struct TcpSink {
    addr: SocketAddr,
    received: Arc<AtomicU64>,
}

impl TcpSink {
    fn start() -> Result<Self> {
        let listener =
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding the TCP sink")?;
        let addr = listener.local_addr()?;
        let received = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&received);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let counted = Arc::clone(&counted);
                std::thread::spawn(move || {
                    let mut stream = stream;
                    let mut buf = vec![0u8; CHUNK];
                    while let Ok(n) = stream.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        counted.fetch_add(n as u64, Ordering::Relaxed);
                    }
                });
            }
        });
        Ok(TcpSink { addr, received })
    }
}

/// One stream for `secs` into the sink, through `via` from a UNIX socket
/// (direct: a TCP connection to the sink); Gbit/s the sink received.
fn unix_to_tcp(
    ctx: &Ctx,
    via: Via,
    sink: &TcpSink,
    secs: u64,
    data_path: Option<&str>,
) -> Result<f64> {
    let dir = TempDir::new("unix-tcp")?;
    let path = dir.path().join("in.sock");
    let mut hop = forwarder(
        ctx,
        via,
        "unix-tcp",
        &format!("UNIX-LISTEN:{},fork", path.display()),
        &format!("TCP:{}", sink.addr),
        data_path,
    )?;
    let mut stream: Box<dyn Write> = match hop.as_mut() {
        None => Box::new(std::net::TcpStream::connect(sink.addr)?),
        Some(hop) => {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                hop.check_alive()?;
                match UnixStream::connect(&path) {
                    Ok(stream) => break Box::new(stream),
                    Err(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(err) => {
                        return Err(err)
                            .with_context(|| format!("connecting to {}", path.display()));
                    }
                }
            }
        }
    };
    let chunk = vec![0x5au8; CHUNK];
    // A first write reaches the sink before the clock starts.
    stream.write_all(&chunk)?;
    let start_bytes = sink.received.load(Ordering::Relaxed);
    let started = Instant::now();
    let until = started + Duration::from_secs(secs);
    while Instant::now() < until {
        stream.write_all(&chunk)?;
    }
    let bytes = sink.received.load(Ordering::Relaxed) - start_bytes;
    let elapsed = started.elapsed().as_secs_f64();
    drop(stream);
    if let Some(hop) = hop.as_mut() {
        hop.check_alive()?;
    }
    Ok(bytes as f64 * 8.0 / elapsed / 1e9)
}
