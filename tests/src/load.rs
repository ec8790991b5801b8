//! Connection load: client threads opening connections at a steady rate
//! through relay's routes to echo servers, each carrying its own payload
//! checked by SHA-256 on the way back, and counting how every connection
//! ended. The reload and upgrade tests run it across a change and assert
//! that nothing was refused or reset.
//!
//! The rate is a target, not a promise: a thread that falls behind
//! (a slow machine) opens its next connection at once, and the report
//! says what rate was reached.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, ensure};

use crate::payload::{Payload, read_fingerprint};

/// Bytes each connection sends and reads back.
const PAYLOAD: u64 = 2048;

/// Client threads per port.
const THREADS_PER_PORT: usize = 2;

/// How connections ended.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    /// Payload echoed whole.
    pub served: u64,
    /// connect(2) refused: nobody listened.
    pub refused: u64,
    /// ECONNRESET or EPIPE on an open connection.
    pub reset: u64,
    /// Anything else: early EOF, wrong bytes, timeouts.
    pub other: u64,
    /// The first few failures, as text.
    pub failures: Vec<String>,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.served += other.served;
        self.refused += other.refused;
        self.reset += other.reset;
        self.other += other.other;
        for failure in other.failures {
            if self.failures.len() < 10 {
                self.failures.push(failure);
            }
        }
    }

    fn failed(&mut self, port: u16, n: u64, err: &io::Error, during: &str) {
        match err.kind() {
            io::ErrorKind::ConnectionRefused => self.refused += 1,
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => self.reset += 1,
            _ => self.other += 1,
        }
        if self.failures.len() < 10 {
            self.failures
                .push(format!("port {port}, connection {n}, {during}: {err}"));
        }
    }
}

/// What a finished load saw.
#[derive(Debug)]
pub struct Report {
    pub tally: Tally,
    pub elapsed: Duration,
}

impl Report {
    pub fn per_second(&self) -> f64 {
        self.tally.served as f64 / self.elapsed.as_secs_f64()
    }

    /// Fails unless every connection was served, naming the first failures.
    pub fn ensure_clean(&self, across: &str) -> Result<()> {
        let t = &self.tally;
        ensure!(
            t.refused == 0 && t.reset == 0 && t.other == 0,
            "across {across}: expected every connection served, got {} served, {} refused, {} reset, {} other; first failures:\n{}",
            t.served,
            t.refused,
            t.reset,
            t.other,
            t.failures.join("\n")
        );
        ensure!(
            t.served > 0,
            "across {across}: no connection was served at all"
        );
        Ok(())
    }
}

/// Running client threads.
pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Tally>>,
    started: Instant,
}

impl Load {
    /// Opens about `per_second` connections a second in all, spread over
    /// `ports` on 127.0.0.1 (each an echo route).
    pub fn start(ports: &[u16], per_second: u32) -> Result<Self> {
        ensure!(!ports.is_empty(), "a load needs at least one port");
        let stop = Arc::new(AtomicBool::new(false));
        let threads_total = (ports.len() * THREADS_PER_PORT) as u32;
        let interval = Duration::from_secs(1) * threads_total / per_second.max(1);
        let mut threads = Vec::new();
        for (i, port) in ports
            .iter()
            .flat_map(|p| std::iter::repeat_n(*p, THREADS_PER_PORT))
            .enumerate()
        {
            let stop = stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("load-{port}-{i}"))
                .spawn(move || client(port, i as u64, interval, &stop))
                .context("spawning a load client")?;
            threads.push(thread);
        }
        Ok(Load {
            stop,
            threads,
            started: Instant::now(),
        })
    }

    /// Stops the clients (each finishes the connection it is on, and has
    /// made one at least).
    pub fn stop(self) -> Result<Report> {
        self.stop.store(true, Ordering::Relaxed);
        let mut tally = Tally::default();
        for thread in self.threads {
            tally.add(
                thread
                    .join()
                    .map_err(|_| anyhow!("a load client thread panicked"))?,
            );
        }
        Ok(Report {
            tally,
            elapsed: self.started.elapsed(),
        })
    }
}

fn client(port: u16, seed: u64, interval: Duration, stop: &AtomicBool) -> Tally {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut tally = Tally::default();
    let mut next = Instant::now();
    let mut n = 0u64;
    // At least one connection per thread, however soon the load stops.
    while n == 0 || !stop.load(Ordering::Relaxed) {
        // Pacing only: no assertion depends on timing.
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
        next = next.max(now) + interval;
        let payload = Payload::new(seed << 32 | n, PAYLOAD);
        match one(addr, &payload) {
            Ok(()) => tally.served += 1,
            Err((during, err)) => tally.failed(port, n, &err, during),
        }
        n += 1;
    }
    tally
}

/// One connection: send the payload, half-close, read the echo to EOF and
/// compare fingerprints.
fn one(addr: SocketAddr, payload: &Payload) -> Result<(), (&'static str, io::Error)> {
    let mut stream = TcpStream::connect(addr).map_err(|e| ("connect", e))?;
    let timeout = Some(crate::peers::IO_TIMEOUT);
    stream
        .set_read_timeout(timeout)
        .and_then(|()| stream.set_write_timeout(timeout))
        .map_err(|e| ("setting timeouts", e))?;
    // Small enough for the socket buffers: no writer thread needed.
    payload.write_to(&mut stream).map_err(|e| ("write", e))?;
    stream.flush().map_err(|e| ("write", e))?;
    stream
        .shutdown(Shutdown::Write)
        .map_err(|e| ("half-close", e))?;
    let got = read_fingerprint(&mut (&stream).take(PAYLOAD * 2)).map_err(|e| ("read", e))?;
    if got != payload.fingerprint() {
        return Err((
            "read",
            io::Error::other(format!(
                "echo differs: sent {}, got {got}",
                payload.fingerprint()
            )),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_nobody_listens_on_counts_as_refused() -> Result<()> {
        let port = crate::ports::free_port()?;
        let report = Load::start(&[port], 200)?.stop()?;
        // Every thread makes one connection at least.
        let t = &report.tally;
        assert!(t.refused >= THREADS_PER_PORT as u64, "{t:?}");
        assert_eq!((t.reset, t.other), (0, 0), "{t:?}");
        assert_eq!(report.tally.served, 0);
        let err = report
            .ensure_clean("nothing")
            .expect_err("refusals fail the check");
        assert!(err.to_string().contains("refused"), "{err}");
        Ok(())
    }
}
