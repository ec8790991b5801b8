//! New connections per second spread over 200 routes served by one
//! process: relay `run -c` with 200 routes, HAProxy with 200 frontends
//! (plain and with splice), nginx with 200 stream `server` blocks, each
//! route to the same nginx serving a small file. socat and docker-proxy
//! forward one port per process, so they are n/a here. Direct is the same
//! client against the file server's one port: the ceiling on this machine.
//!
//! wrk dials one address, so the client is here: threads that each open a
//! connection to the next route (round-robin over all 200), send one
//! `Connection: close` request, read the response to the server's close,
//! and go on, as wrk does with `-H 'Connection: close'`.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::json;

use super::Ctx;
use super::connrate::Nginx;
use super::report::{Better, PerVia, SectionReport, median_by};
use super::via::{Hop, Via};

const ROUTES: usize = 200;
/// Client threads, each with one connection in flight (wrk's -c32 on
/// blocking threads would spend the two cores switching between them).
const THREADS: usize = 16;
const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n";

/// What the client saw in one run.
#[derive(Clone, Debug, Default)]
struct Tally {
    ok: u64,
    errors: u64,
    first_error: Option<String>,
    seconds: f64,
}

impl Tally {
    fn per_s(&self) -> f64 {
        self.ok as f64 / self.seconds.max(1e-9)
    }
}

pub fn run(ctx: &Ctx) -> SectionReport {
    let (secs, rounds) = (ctx.secs(), ctx.rounds());
    let vias = ctx.vias(Via::MULTI_ROUTE);
    println!(
        "xtask: bench: new connections/s over {ROUTES} routes in one process, {THREADS} client threads, \
         Connection: close, {secs} s, median of {rounds} rotating round(s) (direct: the file server's one port)"
    );
    let samples = match Nginx::start() {
        Err(err) => PerVia::all_failed(&vias, &err.context("cannot start nginx")),
        Ok(mut nginx) => PerVia::measure_rounds(&vias, rounds, |via| {
            let targets = if via == Via::Direct {
                vec![nginx.port]
            } else {
                vec![nginx.port; ROUTES]
            };
            let mut hop =
                Hop::start_routes(via, &targets, &ctx.relay_bin, "routes", ctx.hop_options())?;
            let tally = spread(&hop.ports, THREADS, Duration::from_secs(secs))?;
            hop.check_alive()?;
            nginx.proc.check_alive()?;
            println!(
                "xtask:   {:<14} {:.0} conn/s ({} ok, {} failed{})",
                via.name(),
                tally.per_s(),
                tally.ok,
                tally.errors,
                tally
                    .first_error
                    .as_ref()
                    .map_or(String::new(), |e| format!("; first: {e}"))
            );
            // A forwarder that fails connections fast would look fast.
            if tally.ok == 0 || tally.errors > tally.ok / 100 {
                bail!(
                    "{} of {} connections failed (first: {})",
                    tally.errors,
                    tally.ok + tally.errors,
                    tally.first_error.as_deref().unwrap_or("?")
                );
            }
            Ok(tally)
        }),
    };
    let runs = samples.map(|s| median_by(s, Tally::per_s));
    let rate = runs.map(Tally::per_s);
    let row = rate.row(
        format!("new connections over {ROUTES} routes, one process (conn/s, Connection: close)"),
        0,
        Better::Higher,
    );
    SectionReport {
        key: "routes",
        json: json!({
            "tool": format!(
                "{THREADS} client threads here, round-robin over {ROUTES} routes to one nginx (static file), \
                 one Connection: close request per connection, {secs} s, median of {rounds}; \
                 configurations in target/bench/<tool>-routes.conf"
            ),
            "connections_per_s": rate.to_json(|v| json!(v)),
            "samples_connections_per_s": samples.to_json(|s| json!(s.iter().map(Tally::per_s).collect::<Vec<_>>())),
            "failed": runs.to_json(|t| json!(t.errors)),
            "relay_vs_best_peer": rate.relay_vs_best_peer(Better::Higher),
        }),
        errors: rate.errors(),
        rows: vec![row],
    }
}

/// Connections from `threads` threads for `duration`, each to the next of
/// `ports` in turn.
fn spread(ports: &[u16], threads: usize, duration: Duration) -> Result<Tally> {
    if ports.is_empty() {
        bail!("invariant: at least one port to dial");
    }
    let ports: Arc<Vec<u16>> = Arc::new(ports.to_vec());
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let deadline = start + duration;
    let handles = (0..threads)
        .map(|i| {
            let (ports, next) = (ports.clone(), next.clone());
            std::thread::Builder::new()
                .name(format!("routes-client-{i}"))
                .spawn(move || {
                    let mut tally = Tally::default();
                    while Instant::now() < deadline {
                        let port = ports[next.fetch_add(1, Ordering::Relaxed) % ports.len()];
                        match request(port) {
                            Ok(()) => tally.ok += 1,
                            Err(err) => {
                                tally.errors += 1;
                                tally
                                    .first_error
                                    .get_or_insert_with(|| format!("port {port}: {err:#}"));
                                // Don't spin on a dead port.
                                std::thread::sleep(Duration::from_millis(10));
                            }
                        }
                    }
                    tally
                })
                .context("cannot start a client thread")
        })
        .collect::<Result<Vec<_>>>()?;
    let mut total = Tally::default();
    for handle in handles {
        let t = handle
            .join()
            .map_err(|_| anyhow!("a client thread panicked"))?;
        total.ok += t.ok;
        total.errors += t.errors;
        total.first_error = total.first_error.take().or(t.first_error);
    }
    total.seconds = start.elapsed().as_secs_f64();
    Ok(total)
}

/// One connection, one request, the whole response; Err unless it is a 200.
fn request(port: u16) -> Result<()> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut sock = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).context("connect")?;
    sock.set_read_timeout(Some(Duration::from_secs(5)))
        .context("SO_RCVTIMEO")?;
    sock.write_all(REQUEST).context("write")?;
    let mut response = Vec::with_capacity(512);
    sock.read_to_end(&mut response).context("read")?;
    if !response.starts_with(b"HTTP/1.1 200 ") {
        let head = String::from_utf8_lossy(&response[..response.len().min(40)]).into_owned();
        bail!("expected `HTTP/1.1 200`, got `{head}`");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A server that answers every connection with a 200 or a 404 by port.
    fn serve(status: &'static str) -> u16 {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for mut sock in listener.incoming().flatten() {
                let mut buf = [0u8; 512];
                let _ = sock.read(&mut buf);
                let _ = write!(sock, "HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
            }
        });
        port
    }

    #[test]
    fn spreads_over_every_port_and_counts_non_200_as_failed() {
        let good = [serve("200 OK"), serve("200 OK")];
        let tally = spread(&good, 2, Duration::from_millis(200)).unwrap();
        assert!(tally.ok > 0 && tally.errors == 0, "{tally:?}");
        let bad = serve("404 Not Found");
        let tally = spread(&[good[0], bad], 1, Duration::from_millis(200)).unwrap();
        assert!(tally.ok > 0 && tally.errors > 0, "{tally:?}");
        assert!(tally.first_error.unwrap().contains("404"));
    }
}
