//! Ping-pong latency with 1-byte messages: an echo server and a client,
//! both here, TCP_NODELAY everywhere (socat gets `nodelay` on both legs;
//! relay and the other peers set it themselves). Reports p50/p99 round
//! trip; targets: relay adds at most 50 us at p99 over direct, and its p99
//! is at most the best peer's.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::json;

use super::Ctx;
use super::report::{Better, PerVia, SectionReport, Target};
use super::via::{Hop, HopOptions, Via};

const TARGET_ADDED_P99_US: f64 = 50.0;

#[derive(Clone, Copy, Debug)]
struct Percentiles {
    p50_us: f64,
    p99_us: f64,
}

/// Round trips are taken in this many blocks, the routes' turns rotating
/// from block to block, so that load from elsewhere on the machine falls
/// on all alike instead of on whichever ran at the wrong moment.
const BLOCKS: usize = 10;

pub fn run(ctx: &Ctx) -> SectionReport {
    let (warmup, iterations) = if ctx.quick {
        (500, 5_000)
    } else {
        (2_000, 20_000)
    };
    println!(
        "xtask: bench: ping-pong latency, 1 byte, {iterations} round trips per route after {warmup} warm-up, interleaved"
    );
    let vias = ctx.vias(Via::PLAIN);
    let lat = match EchoServer::start() {
        Err(err) => PerVia::all_failed(&vias, &err.context("cannot start the echo server")),
        Ok(server) => {
            let mut lanes: Vec<Result<Lane>> = vias
                .iter()
                .map(|&via| Lane::open(ctx, via, server.port, warmup))
                .collect();
            for block in 0..BLOCKS {
                for turn in 0..lanes.len() {
                    let i = (block + turn) % lanes.len();
                    if let Ok(lane) = &mut lanes[i]
                        && let Err(err) = lane.round_trips(iterations / BLOCKS)
                    {
                        lanes[i] = Err(err);
                    }
                }
            }
            let mut lanes = lanes.into_iter();
            PerVia::measure(&vias, |via| {
                let mut lane = lanes
                    .next()
                    .expect("invariant: one lane per route, in the order of vias")?;
                lane.hop.check_alive()?;
                let p = percentiles(&mut lane.samples);
                println!(
                    "xtask:   {:<14} p50 {:.1} us, p99 {:.1} us",
                    via.name(),
                    p.p50_us,
                    p.p99_us
                );
                Ok(p)
            })
        }
    };

    let p50 = lat.map(|p| p.p50_us);
    let p99 = lat.map(|p| p.p99_us);
    let added = |v: Via| match (p99.ok(v), p99.ok(Via::Direct)) {
        (Some(x), Some(d)) => Some(x - d),
        _ => None,
    };
    let relay_added = added(Via::Relay);
    let added_text = |a: Option<f64>| a.map_or("-".to_string(), |a| format!("{a:+.1} us"));
    let mut p50_row = p50.row("latency p50, 1-byte ping-pong (us)", 1, Better::Lower);
    p50_row.vs_direct = added_text(match (p50.ok(Via::Relay), p50.ok(Via::Direct)) {
        (Some(r), Some(d)) => Some(r - d),
        _ => None,
    });
    let mut p99_row = p99
        .row("latency p99, 1-byte ping-pong (us)", 1, Better::Lower)
        .target(Target {
            text: format!("<= +{TARGET_ADDED_P99_US} us p99 over direct"),
            pass: relay_added.map(|a| a <= TARGET_ADDED_P99_US),
        })
        .target(Target::vs_best_peer(&p99, Better::Lower, 1.0));
    p99_row.vs_direct = added_text(relay_added);
    let added_json: serde_json::Map<String, serde_json::Value> = vias
        .iter()
        .filter(|v| **v != Via::Direct)
        .map(|v| (v.name().to_string(), json!(added(*v))))
        .collect();
    SectionReport {
        key: "latency",
        json: json!({
            "method": format!("1-byte write, 1-byte read, TCP_NODELAY, {iterations} round trips after {warmup} warm-up"),
            "round_trip_us": lat.to_json(|p| json!({ "p50": p.p50_us, "p99": p.p99_us })),
            "added_p99_us_over_direct": added_json,
            "relay_p99_vs_best_peer": p99.relay_vs_best_peer(Better::Lower),
        }),
        errors: lat.errors(),
        rows: vec![p50_row, p99_row],
    }
}

/// One client connection through one route, and its round-trip samples.
struct Lane {
    hop: Hop,
    stream: TcpStream,
    sent: usize,
    samples: Vec<Duration>,
}

impl Lane {
    /// Start the route's forwarder, connect through it and warm up.
    fn open(ctx: &Ctx, via: Via, server_port: u16, warmup: usize) -> Result<Lane> {
        let opts = HopOptions {
            nodelay: true,
            ..ctx.hop_options()
        };
        let hop = Hop::start(via, server_port, &ctx.relay_bin, "latency", opts)?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, hop.port));
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .with_context(|| format!("cannot connect to {addr}"))?;
        stream.set_nodelay(true).context("TCP_NODELAY")?;
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .context("SO_RCVTIMEO")?;
        let mut lane = Lane {
            hop,
            stream,
            sent: 0,
            samples: Vec::new(),
        };
        lane.round_trips(warmup)?;
        lane.samples.clear();
        Ok(lane)
    }

    /// Bounce one byte `count` times, recording each round trip.
    fn round_trips(&mut self, count: usize) -> Result<()> {
        let mut byte = [0u8; 1];
        for _ in 0..count {
            let i = self.sent;
            self.sent += 1;
            let sent = [(i % 251) as u8];
            let start = Instant::now();
            self.stream.write_all(&sent).context("ping write failed")?;
            self.stream.read_exact(&mut byte).with_context(|| {
                format!("no pong for round trip {i} (timeout 5s or connection closed)")
            })?;
            let rtt = start.elapsed();
            if byte != sent {
                bail!("round trip {i}: sent {:?}, got {:?} back", sent[0], byte[0]);
            }
            self.samples.push(rtt);
        }
        Ok(())
    }
}

fn percentiles(samples: &mut [Duration]) -> Percentiles {
    samples.sort_unstable();
    // Nearest rank: the smallest sample with at least p of them at or below.
    let rank = |p: f64| {
        let idx = ((p * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[idx].as_secs_f64() * 1e6
    };
    Percentiles {
        p50_us: rank(0.50),
        p99_us: rank(0.99),
    }
}

/// Echoes whatever each connection sends, a thread per connection.
struct EchoServer {
    port: u16,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl EchoServer {
    fn start() -> Result<EchoServer> {
        let listener =
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("cannot bind the echo server")?;
        let port = listener.local_addr().context("echo server address")?.port();
        // Nonblocking accept so that drop can stop the loop.
        listener
            .set_nonblocking(true)
            .context("echo server: O_NONBLOCK")?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = stop.clone();
        let acceptor = std::thread::Builder::new()
            .name("echo-accept".into())
            .spawn(move || {
                while !stop_flag.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let _ = std::thread::Builder::new()
                                .name("echo".into())
                                .spawn(move || echo(stream));
                        }
                        Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(2));
                        }
                        Err(err) => eprintln!("xtask: echo server: accept failed: {err}"),
                    }
                }
            })
            .context("cannot start the echo server thread")?;
        Ok(EchoServer {
            port,
            stop,
            acceptor: Some(acceptor),
        })
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

/// Echo until the peer closes; connection threads end with their socket.
fn echo(mut stream: TcpStream) {
    if stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_nodelay(true))
        .is_err()
    {
        return;
    }
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut samples: Vec<Duration> = (1..=100).rev().map(Duration::from_micros).collect();
        let p = percentiles(&mut samples);
        assert_eq!((p.p50_us.round(), p.p99_us.round()), (50.0, 99.0));
    }

    #[test]
    fn echo_server_round_trips_directly() {
        let server = EchoServer::start().unwrap();
        let ctx = Ctx {
            relay_bin: "/nonexistent".into(),
            quick: true,
            max_held_connections: 0,
            data_path: None,
            rounds: None,
            peers: None,
        };
        let mut lane = Lane::open(&ctx, Via::Direct, server.port, 10).unwrap();
        lane.round_trips(100).unwrap();
        let p = percentiles(&mut lane.samples);
        assert!(p.p50_us > 0.0 && p.p99_us >= p.p50_us);
    }
}
