//! A link into a network namespace with added one-way delay and random
//! loss, shaped in userspace: this kernel has no `tc netem`.
//!
//! A [`ShapedLink`] is a [`NetNs`] (with its usual veth pair, untouched)
//! plus a second, point-to-point path made of two TUN devices: `rt<idx>s`
//! on the host and `rt<idx>t` inside the namespace. A shaper thread per
//! direction reads each packet the kernel sends into one TUN device, drops
//! it with probability `loss` (a seeded PRNG, so a run is repeatable up to
//! packet timing), and writes it into the other TUN device `delay` later.
//! TUN devices carry one IP packet per read and write (no GRO, no TSO), so
//! TCP sees real packet boundaries, as over a wire.
//!
//! Addresses follow [`NetNs`]: the link uses the same /30 index the
//! namespace's veth reserved, in the sibling subnet 10.232.0.0/16
//! (`.Y+1` host, `.Y+2` namespace), so it never collides with another
//! test's veth or link. Traffic goes only to those addresses.
//!
//! Dropping a [`ShapedLink`] stops the shaper threads and closes the TUN
//! fds (which destroys both devices), then deletes the namespace.
//!
//! ```ignore
//! // 20 ms each way (40 ms round trip), 5% of packets lost each way.
//! let link = ShapedLink::new(Duration::from_millis(20), 0.05)?;
//! let echo = EchoServer::on(link.ns().tcp_listen((link.addr(), 7000).into())?)?;
//! let client = peers::connect(echo.addr())?; // through the shaper
//! ```

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::netns::{NetNs, ip};
use crate::payload::splitmix64;

/// MTU of both TUN devices: an Ethernet's, so segments are the usual size.
const MTU: u32 = 1500;
/// Largest packet a TUN read can return at [`MTU`], with room to spare.
const READ_BUF: usize = 65_536;
/// How often a blocked shaper thread checks whether it should stop.
const STOP_POLL_MS: i32 = 50;
/// The seed of [`ShapedLink::new`]: runs lose the same packet numbers.
pub const DEFAULT_SEED: u64 = 0x0051_EED5;

/// Packets each direction has seen, read with [`ShapedLink::stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Host to namespace: delivered after the delay.
    pub to_ns_delivered: u64,
    /// Host to namespace: dropped by the loss rate.
    pub to_ns_dropped: u64,
    /// Namespace to host: delivered after the delay.
    pub to_host_delivered: u64,
    /// Namespace to host: dropped by the loss rate.
    pub to_host_dropped: u64,
}

impl LinkStats {
    pub fn dropped(&self) -> u64 {
        self.to_ns_dropped + self.to_host_dropped
    }

    pub fn delivered(&self) -> u64 {
        self.to_ns_delivered + self.to_host_delivered
    }
}

/// Counters one direction's threads update.
#[derive(Default)]
struct Counters {
    delivered: AtomicU64,
    dropped: AtomicU64,
}

/// A namespace reached from the host over a delayed, lossy link.
///
/// Field order is drop order: the shaper stops and the TUN devices go
/// before the namespace they live in is deleted.
pub struct ShapedLink {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    to_ns: Arc<Counters>,
    to_host: Arc<Counters>,
    host_addr: Ipv4Addr,
    addr: Ipv4Addr,
    host_if: String,
    delay: Duration,
    loss: f64,
    ns: NetNs,
}

impl ShapedLink {
    /// A new namespace linked to the host with `delay` added to each
    /// direction (a round trip takes `2 * delay` more) and each packet
    /// lost with probability `loss` (0.0 to 1.0) in each direction.
    pub fn new(delay: Duration, loss: f64) -> Result<Self> {
        Self::with_seed(delay, loss, DEFAULT_SEED)
    }

    /// As [`Self::new`], with the loss PRNG seeded by `seed`.
    pub fn with_seed(delay: Duration, loss: f64, seed: u64) -> Result<Self> {
        ensure!(
            (0.0..1.0).contains(&loss),
            "a shaped link's loss rate must be in [0, 1), got {loss}"
        );
        let ns = NetNs::create()?;
        // The veth reserved this /30 index: reuse it in 10.232.0.0/16.
        let [_, _, c, d] = ns.host_addr().octets();
        let host_addr = Ipv4Addr::new(10, 232, c, d);
        let addr = Ipv4Addr::new(10, 232, c, d + 1);
        let stem = ns
            .host_if()
            .strip_suffix('h')
            .context("invariant: NetNs names its host veth end rt<idx>h")?
            .to_string();
        let host_if = format!("{stem}s");
        let ns_if = format!("{stem}t");

        let host_tun = open_tun(&host_if)?;
        let ns_tun = {
            let ns_if = ns_if.clone();
            ns.enter(move || open_tun(&ns_if).map_err(|e| io::Error::other(format!("{e:#}"))))?
        };
        ip(&["addr", "add", &format!("{host_addr}/30"), "dev", &host_if])?;
        ip(&["link", "set", &host_if, "mtu", &MTU.to_string(), "up"])?;
        ip(&[
            "-n",
            ns.name(),
            "addr",
            "add",
            &format!("{addr}/30"),
            "dev",
            &ns_if,
        ])?;
        ip(&[
            "-n",
            ns.name(),
            "link",
            "set",
            &ns_if,
            "mtu",
            &MTU.to_string(),
            "up",
        ])?;

        let stop = Arc::new(AtomicBool::new(false));
        let to_ns = Arc::new(Counters::default());
        let to_host = Arc::new(Counters::default());
        let host_tun = Arc::new(host_tun);
        let ns_tun = Arc::new(ns_tun);
        let mut link = Self {
            stop,
            threads: Vec::new(),
            to_ns,
            to_host,
            host_addr,
            addr,
            host_if,
            delay,
            loss,
            ns,
        };
        // From here on, Drop stops whatever threads were started.
        let directions = [
            ("to-ns", &host_tun, &ns_tun, Arc::clone(&link.to_ns), seed),
            (
                "to-host",
                &ns_tun,
                &host_tun,
                Arc::clone(&link.to_host),
                !seed,
            ),
        ];
        for (name, from, to, counters, seed) in directions {
            let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
            let shaping = Shaping { delay, loss, seed };
            let (from, stop) = (Arc::clone(from), Arc::clone(&link.stop));
            let dropped = Arc::clone(&counters);
            link.threads.push(
                std::thread::Builder::new()
                    .name(format!("shaper-{name}-read"))
                    .spawn(move || read_side(&from, &stop, shaping, &tx, &dropped))
                    .context("spawning a shaper thread")?,
            );
            let to = Arc::clone(to);
            link.threads.push(
                std::thread::Builder::new()
                    .name(format!("shaper-{name}-write"))
                    .spawn(move || write_side(&to, &rx, &counters))
                    .context("spawning a shaper thread")?,
            );
        }
        Ok(link)
    }

    /// The namespace at the far end (run servers in it with its helpers).
    pub fn ns(&self) -> &NetNs {
        &self.ns
    }

    /// The namespace's address on the shaped link: connect here to go
    /// through the shaper (its veth address, `ns().addr()`, does not).
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The host's address on the shaped link (the source of host traffic to [`Self::addr`]).
    pub fn host_addr(&self) -> Ipv4Addr {
        self.host_addr
    }

    /// The host's TUN device (gone once the link is dropped).
    pub fn host_if(&self) -> &str {
        &self.host_if
    }

    /// The one-way delay added in each direction.
    pub fn delay(&self) -> Duration {
        self.delay
    }

    /// The loss rate applied in each direction.
    pub fn loss(&self) -> f64 {
        self.loss
    }

    /// Packets delivered and dropped so far, per direction.
    pub fn stats(&self) -> LinkStats {
        LinkStats {
            to_ns_delivered: self.to_ns.delivered.load(Ordering::Relaxed),
            to_ns_dropped: self.to_ns.dropped.load(Ordering::Relaxed),
            to_host_delivered: self.to_host.delivered.load(Ordering::Relaxed),
            to_host_dropped: self.to_host.dropped.load(Ordering::Relaxed),
        }
    }
}

impl Drop for ShapedLink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Readers notice within STOP_POLL_MS; writers end when their reader
        // drops the channel. The last Arc<File> closes each TUN device.
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// What one direction does to each packet.
#[derive(Clone, Copy)]
struct Shaping {
    delay: Duration,
    loss: f64,
    seed: u64,
}

/// Read packets from `from` until `stop`; drop some, timestamp the rest
/// for delivery `delay` from now. A constant delay keeps FIFO order, so a
/// channel is the whole delay line.
fn read_side(
    from: &File,
    stop: &AtomicBool,
    shaping: Shaping,
    line: &mpsc::Sender<(Instant, Vec<u8>)>,
    counters: &Counters,
) {
    let mut rng = shaping.seed ^ 0x9E37_79B9_7F4A_7C15;
    let mut buf = vec![0u8; READ_BUF];
    let mut from = from;
    while !stop.load(Ordering::Relaxed) {
        if !readable(from, STOP_POLL_MS) {
            continue;
        }
        let n = match from.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // The device went away under us: the link is being torn down.
            Err(_) => return,
        };
        // Top 53 bits as a uniform f64 in [0, 1).
        let draw = (splitmix64(&mut rng) >> 11) as f64 / (1u64 << 53) as f64;
        if draw < shaping.loss {
            counters.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        if line
            .send((Instant::now() + shaping.delay, buf[..n].to_vec()))
            .is_err()
        {
            return;
        }
    }
}

/// Deliver each packet into `to` once its time has come.
fn write_side(to: &File, line: &mpsc::Receiver<(Instant, Vec<u8>)>, counters: &Counters) {
    let mut to = to;
    while let Ok((due, packet)) = line.recv() {
        let wait = due.saturating_duration_since(Instant::now());
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
        // A write fails only while a device is going down (EIO) or the
        // stack refuses the packet: the same as a loss on a real link.
        if to.write(&packet).is_ok() {
            counters.delivered.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Whether `file` has a packet to read within `timeout_ms`.
fn readable(file: &File, timeout_ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd: file.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, and the fd stays open while `file` is borrowed.
    let ready = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    ready > 0 && pfd.revents & libc::POLLIN != 0
}

/// `struct ifreq` as TUNSETIFF reads it: a name, then the flags in the union.
#[repr(C)]
struct IfReqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Create TUN device `name` (IP packets, no packet-info header) in the
/// calling thread's network namespace; it lives as long as the fd.
fn open_tun(name: &str) -> Result<File> {
    ensure!(
        name.len() < libc::IFNAMSIZ,
        "TUN device name {name:?} is longer than {} bytes",
        libc::IFNAMSIZ - 1
    );
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .context("opening /dev/net/tun (needs root and the tun module)")?;
    let mut req = IfReqFlags {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes one struct ifreq, which `req`
    // is (40 bytes, name then flags); the fd is open for the whole call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    if rc < 0 {
        bail!(
            "TUNSETIFF {name}: {} (a device of that name left by another run?)",
            io::Error::last_os_error()
        );
    }
    Ok(file)
}
