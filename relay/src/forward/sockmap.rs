//! The `sockmap` data path for plain TCP legs: an sk_skb stream-verdict
//! program (relay-ebpf/src/sockmap.bpf.c) redirects the bytes arriving on
//! one socket of a connection to the other inside the kernel.
//!
//! This module owns the kernel side's lifecycle for one relay process: the
//! loaded program and its three maps ([`Sockmap`]), a connection's entries
//! in them ([`Pair`], removed when dropped; [`Sockmap::enter`] falls back
//! to copying when they cannot be made), and the per-direction task that
//! watches a redirected socket ([`pump`]).
//!
//! Userspace keeps the contract of `pump`, as the copy path does:
//! - EOF: a FIN makes the source readable; before the FIN is passed on with
//!   `shutdown(SHUT_WR)`, the pump waits until the destination socket holds
//!   every byte redirected to it (the kernel sends redirected bytes from a
//!   work queue, so a FIN passed on at once could overtake them);
//! - errors: a reset source, or a destination that fails, ends the
//!   connection like the copy path (both reset);
//! - bytes: the program counts what it redirected per source socket; the
//!   pump adds the growth to the route's counters as it sees it, and at EOF;
//! - idle: growth of those counts is activity.
//!
//! Bytes that reach userspace anyway (the verdict passes them when the peer
//! is gone) are copied like the copy path does.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use aya::maps::{HashMap, MapData, SockHash};
use aya::programs::SkSkb;
use aya::{Ebpf, EbpfLoader, Pod};
use thiserror::Error;
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::pump::{Activity, Counters, Direction, Eof, Leg};

/// The compiled program (`cargo xtask build-ebpf`), 8-byte aligned for ELF parsing.
fn object() -> &'static [u8] {
    aya::include_bytes_aligned!("../../../relay-ebpf/obj/sockmap.bpf.o")
}

const PROGRAM: &str = "relay_redirect";
const TARGETS: &str = "relay_targets";
const SOURCES: &str = "relay_sources";
const LINKS: &str = "relay_links";

/// How often a pump reads the kernel's byte counts while bytes flow, so
/// `/metrics` and the idle timer follow a long transfer.
const SYNC_INTERVAL: Duration = Duration::from_millis(500);
/// Polling step while waiting for redirected bytes to reach the peer.
const FLUSH_STEP: Duration = Duration::from_micros(200);
/// How long a connection that failed to pair half-way waits for the bytes
/// the kernel redirected meanwhile to leave before it copies.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Mirrors `struct relay_link` (relay-ebpf/include/sockmap.h).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Link {
    /// Socket cookie of the other leg.
    pub peer: u64,
    /// Bytes the program redirected from this socket to `peer`.
    pub bytes: u64,
}

// SAFETY: `Link` is #[repr(C)], two u64 and no padding, so any bit pattern
// is a valid value, as aya's map reads need.
unsafe impl Pod for Link {}

#[derive(Debug, Error)]
pub enum SockmapError {
    #[error(
        "cannot load the sockmap program: {0} (the sockmap data path needs root, or CAP_BPF and CAP_NET_ADMIN; use --data-path copy or splice otherwise)"
    )]
    Load(String),
    #[error(
        "the embedded sockmap object has no `{0}` (stale relay-ebpf/obj? run `cargo xtask build-ebpf`)"
    )]
    Missing(&'static str),
    #[error("{what}: {cause}")]
    Kernel { what: &'static str, cause: String },
}

fn kernel(what: &'static str) -> impl Fn(aya::maps::MapError) -> SockmapError {
    move |e| SockmapError::Kernel {
        what,
        cause: with_source(&e),
    }
}

/// aya's map errors name the syscall and keep the errno as their source.
fn with_source(e: &dyn std::error::Error) -> String {
    match e.source() {
        Some(source) => format!("{e}: {source}"),
        None => e.to_string(),
    }
}

struct Maps {
    targets: SockHash<MapData, u64>,
    sources: SockHash<MapData, u64>,
    links: HashMap<MapData, u64, Link>,
}

/// The loaded program and its maps, shared by every connection of the
/// process. Dropping it detaches and unloads the program.
pub struct Sockmap {
    maps: Mutex<Maps>,
    /// Owns the program and its attachment to `relay_sources`.
    _ebpf: Ebpf,
}

impl Sockmap {
    /// Loads the embedded object and attaches the verdict program to
    /// `relay_sources`.
    pub fn load() -> Result<Self, SockmapError> {
        let mut ebpf = EbpfLoader::new()
            .load(object())
            .map_err(|e| SockmapError::Load(e.to_string()))?;
        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name).ok_or(SockmapError::Missing(name))
        };
        let targets = SockHash::try_from(take(&mut ebpf, TARGETS)?).map_err(kernel(TARGETS))?;
        let sources: SockHash<MapData, u64> =
            SockHash::try_from(take(&mut ebpf, SOURCES)?).map_err(kernel(SOURCES))?;
        let links = HashMap::try_from(take(&mut ebpf, LINKS)?).map_err(kernel(LINKS))?;
        let program: &mut SkSkb = ebpf
            .program_mut(PROGRAM)
            .ok_or(SockmapError::Missing(PROGRAM))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| SockmapError::Load(e.to_string()))?;
        program
            .load()
            .map_err(|e| SockmapError::Load(e.to_string()))?;
        program
            .attach(sources.fd())
            .map_err(|e| SockmapError::Load(e.to_string()))?;
        Ok(Sockmap {
            maps: Mutex::new(Maps {
                targets,
                sources,
                links,
            }),
            _ebpf: ebpf,
        })
    }

    fn maps(&self) -> std::sync::MutexGuard<'_, Maps> {
        self.maps.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Puts a connection's two sockets on the kernel path. Bytes already
    /// queued on either socket go through the program too, in order.
    pub fn pair<'a>(
        &'a self,
        client: &TcpStream,
        upstream: &TcpStream,
    ) -> Result<Pair<'a>, PairError<'a>> {
        // A socket past ESTABLISHED (a client that already sent its FIN)
        // cannot enter a sockhash: copy it, and do not start half-way.
        for socket in [client, upstream] {
            let state = tcp_info(socket).map_err(|e| sent_error(&e))?.tcpi_state;
            if state != TCP_ESTABLISHED {
                return Err(PairError::NotEstablished);
            }
        }
        let cookies = [cookie(client)?, cookie(upstream)?];
        // Before the program can hand either socket a byte.
        let sent_before = [client, upstream].map(taken_to_send);
        let sent_before = [
            sent_before[0].as_ref().map_err(sent_error)?,
            sent_before[1].as_ref().map_err(sent_error)?,
        ]
        .map(|n| *n);
        let pair = Pair {
            sockmap: self,
            cookies,
            sent_before,
            seen: Default::default(),
        };
        {
            let mut maps = self.maps();
            for (own, peer, socket) in [
                (cookies[0], cookies[1], client),
                (cookies[1], cookies[0], upstream),
            ] {
                maps.links
                    .insert(own, Link { peer, bytes: 0 }, 0)
                    .map_err(kernel("adding a socket pair to relay_links"))?;
                maps.targets
                    .insert(own, socket.as_raw_fd(), 0)
                    .map_err(kernel("adding a socket to relay_targets"))?;
            }
            // Only now, with both peers in place as destinations, may the
            // program judge a byte.
            for (own, socket) in [(cookies[0], client), (cookies[1], upstream)] {
                if let Err(err) = maps.sources.insert(own, socket.as_raw_fd(), 0) {
                    // The other socket may be judging bytes already (this one
                    // turned CLOSE_WAIT in between, say): stop that before the
                    // caller falls back to copying, and let it wait for them.
                    let _ = maps.sources.remove(&cookies[0]);
                    return Err(PairError::Partial(
                        pair,
                        kernel("adding a socket to relay_sources")(err),
                    ));
                }
            }
        }
        // Bytes that arrived before the socket entered relay_sources sit in
        // its receive queue, and the program runs only when more arrive or
        // when userspace next reads (tcp_bpf hands the queue to the program
        // then). Setting SO_RCVLOWAT makes TCP signal "data ready" now, so
        // the queue moves at once, in order, ahead of anything newer.
        for socket in [client, upstream] {
            // Not fatal: the next read hands the queue to the program too.
            if let Err(err) = kick(socket.as_fd()) {
                tracing::debug!(error = %err, "sockmap: SO_RCVLOWAT failed; queued bytes move at the next read");
            }
        }
        Ok(pair)
    }

    /// Puts the connection on the kernel path; `None` when it cannot go
    /// there (a client that already sent its FIN, a full map) and takes the
    /// copy path instead, after any bytes the kernel redirected meanwhile
    /// have left. `counters` are client-to-target's, then target-to-client's.
    pub(super) async fn enter<'a>(
        &'a self,
        client: &TcpStream,
        upstream: &TcpStream,
        counters: [Counters<'_>; 2],
        activity: &Activity,
        route: &str,
    ) -> Option<Pair<'a>> {
        match self.pair(client, upstream) {
            Ok(pair) => Some(pair),
            Err(PairError::NotEstablished) => {
                tracing::debug!(route = %route, "a side already closed; this connection copies");
                None
            }
            Err(PairError::Failed(err)) => {
                tracing::warn!(route = %route, error = %err, "sockmap pairing failed; this connection copies instead");
                None
            }
            Err(PairError::Partial(pair, err)) => {
                tracing::warn!(route = %route, error = %err, "sockmap pairing failed half-way; this connection copies once redirected bytes have left");
                let settle = pair.settle(client, upstream, counters, activity);
                match tokio::time::timeout(SETTLE_TIMEOUT, settle).await {
                    Ok(Ok(())) => {}
                    Ok(Err(err)) => {
                        tracing::debug!(route = %route, error = %err, "settling a half-paired connection")
                    }
                    Err(_) => {
                        tracing::warn!(
                            route = %route,
                            "redirected bytes did not leave in time; copying anyway"
                        )
                    }
                }
                None
            }
        }
    }
}

/// Why a connection could not go on the kernel path.
#[derive(Debug, Error)]
pub enum PairError<'a> {
    #[error("a socket is no longer ESTABLISHED (its peer already closed)")]
    NotEstablished,
    #[error(transparent)]
    Failed(#[from] SockmapError),
    /// One socket was judging bytes before the other failed to join: the
    /// pair is out of `relay_sources` again, but bytes it redirected may
    /// still be on their way; see [`Pair::settle`].
    #[error("{1}")]
    Partial(Pair<'a>, SockmapError),
}

/// `TCP_ESTABLISHED` in `tcpi_state`.
const TCP_ESTABLISHED: u8 = 1;

/// A connection's sockets in the maps; dropping it takes them out.
pub struct Pair<'a> {
    sockmap: &'a Sockmap,
    /// Socket cookies: client, upstream.
    cookies: [u64; 2],
    /// What each socket had taken to send before it was paired.
    sent_before: [u64; 2],
    /// Redirected bytes already added to the counters, per source socket.
    seen: [AtomicU64; 2],
}

/// Which socket of a pair bytes come from.
#[derive(Debug, Clone, Copy)]
pub enum From {
    Client = 0,
    Upstream = 1,
}

impl Pair<'_> {
    /// Bytes the program redirected from `from` to its peer so far.
    fn redirected(&self, from: From) -> io::Result<u64> {
        let maps = self.sockmap.maps();
        maps.links
            .get(&self.cookies[from as usize], 0)
            .map(|link| link.bytes)
            .map_err(|e| io::Error::other(format!("reading relay_links: {e}")))
    }
}

impl std::fmt::Debug for Pair<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pair")
            .field("cookies", &self.cookies)
            .finish_non_exhaustive()
    }
}

impl Pair<'_> {
    /// After a [`PairError::Partial`]: waits until each peer has taken what
    /// was redirected to it, so bytes copied next cannot overtake them, and
    /// counts those bytes. `counters` are client-to-target's, then
    /// target-to-client's.
    pub(super) async fn settle(
        &self,
        client: &TcpStream,
        upstream: &TcpStream,
        counters: [Counters<'_>; 2],
        activity: &Activity,
    ) -> io::Result<()> {
        for (from, dst) in [(From::Client, upstream), (From::Upstream, client)] {
            let redirected = self.sync(from, counters[from as usize], activity)?;
            flushed(dst, self.sent_before[1 - from as usize] + redirected).await?;
        }
        Ok(())
    }

    /// Brings the route's counters and the activity clock up to what the
    /// program redirected from `from`; returns that total. Pumps and the
    /// idle timer both call it: `fetch_max` adds each byte once.
    pub(super) fn sync(
        &self,
        from: From,
        counters: Counters<'_>,
        activity: &Activity,
    ) -> io::Result<u64> {
        let now = self.redirected(from)?;
        let before = self.seen[from as usize].fetch_max(now, Ordering::Relaxed);
        if now > before {
            counters.add(now - before);
            activity.touch();
        }
        Ok(now)
    }
}

impl Drop for Pair<'_> {
    fn drop(&mut self) {
        let mut maps = self.sockmap.maps();
        for cookie in &self.cookies {
            // Out of relay_sources first: no byte may be judged against a
            // link that is about to go. A missing entry (pairing failed
            // half-way) is no error here.
            let _ = maps.sources.remove(cookie);
            let _ = maps.links.remove(cookie);
            let _ = maps.targets.remove(cookie);
        }
    }
}

fn sent_error(e: &io::Error) -> SockmapError {
    SockmapError::Kernel {
        what: "reading TCP_INFO and SIOCOUTQ",
        cause: e.to_string(),
    }
}

/// The kernel's socket cookie, the key of every map.
fn cookie(socket: &TcpStream) -> Result<u64, SockmapError> {
    const SO_COOKIE: nix::libc::c_int = 57;
    let mut value: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as nix::libc::socklen_t;
    // SAFETY: the fd is a live socket borrowed from `socket`; `value` and
    // `len` are valid for writes of the sizes given.
    let rc = unsafe {
        nix::libc::getsockopt(
            socket.as_raw_fd(),
            nix::libc::SOL_SOCKET,
            SO_COOKIE,
            (&mut value as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(SockmapError::Kernel {
            what: "reading SO_COOKIE",
            cause: io::Error::last_os_error().to_string(),
        });
    }
    Ok(value)
}

fn kick(socket: BorrowedFd<'_>) -> io::Result<()> {
    let one: nix::libc::c_int = 1;
    // SAFETY: the fd is a live socket; `one` is a valid int for the call.
    let rc = unsafe {
        nix::libc::setsockopt(
            socket.as_raw_fd(),
            nix::libc::SOL_SOCKET,
            nix::libc::SO_RCVLOWAT,
            (&one as *const nix::libc::c_int).cast(),
            std::mem::size_of::<nix::libc::c_int>() as nix::libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The kernel's TCP_INFO for a socket.
fn tcp_info(socket: &TcpStream) -> io::Result<nix::libc::tcp_info> {
    // SAFETY: tcp_info is plain data; zeroes are a valid value.
    let mut info: nix::libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<nix::libc::tcp_info>() as nix::libc::socklen_t;
    // SAFETY: the fd is a live TCP socket; `info` and `len` are valid for writes.
    let rc = unsafe {
        nix::libc::getsockopt(
            socket.as_raw_fd(),
            nix::libc::IPPROTO_TCP,
            nix::libc::TCP_INFO,
            (&mut info as *mut nix::libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info)
}

/// Bytes a TCP socket has taken to send since it connected: acknowledged
/// plus still queued (`tcpi_bytes_acked` + SIOCOUTQ).
fn taken_to_send(socket: &TcpStream) -> io::Result<u64> {
    let acked = tcp_info(socket)?.tcpi_bytes_acked;
    let queued = super::stream::queued(socket, nix::libc::TIOCOUTQ)?;
    Ok(acked + queued as u64)
}

/// One direction, `src` to `dst`, while the kernel moves the bytes: waits
/// for `src`'s EOF or error, keeps the counters current, and passes the
/// EOF on once `dst` holds everything redirected to it.
pub(super) async fn pump(
    pair: &Pair<'_>,
    from: From,
    src: &TcpStream,
    dst: &TcpStream,
    counters: Counters<'_>,
    activity: &Activity,
) -> Direction {
    // What dst had taken to send before it was paired.
    let base = pair.sent_before[1 - from as usize];
    let mut copied = 0u64;
    let sync = || pair.sync(from, counters, activity);
    let mut buffer = Vec::new();
    loop {
        tokio::select! {
            ready = src.readable() => ready.map_err(|e| (Leg::Source, context("waiting for readability", e)))?,
            _ = tokio::time::sleep(SYNC_INTERVAL) => {
                sync().map_err(|e| (Leg::Source, e))?;
                continue;
            }
        }
        if buffer.capacity() == 0 {
            buffer.reserve_exact(16 * 1024);
        }
        buffer.clear();
        match src.try_read_buf(&mut buffer) {
            Ok(0) => {
                let redirected = sync().map_err(|e| (Leg::Source, e))?;
                flushed(dst, base + redirected + copied)
                    .await
                    .map_err(|e| {
                        (
                            Leg::Destination,
                            context("waiting for redirected bytes to leave", e),
                        )
                    })?;
                return socket2::SockRef::from(dst)
                    .shutdown(std::net::Shutdown::Write)
                    .map(|()| Eof::Clean)
                    .map_err(|e| (Leg::Destination, context("passing the FIN on", e)));
            }
            Ok(n) => {
                // Passed to userspace (the peer was leaving the map):
                // copy it, after what the kernel already redirected.
                let redirected = sync().map_err(|e| (Leg::Source, e))?;
                flushed(dst, base + redirected + copied)
                    .await
                    .map_err(|e| {
                        (
                            Leg::Destination,
                            context("waiting for redirected bytes to leave", e),
                        )
                    })?;
                tracing::debug!(
                    bytes = n,
                    "sockmap: bytes passed to userspace; copying them"
                );
                write_all(dst, &buffer[..n])
                    .await
                    .map_err(|e| (Leg::Destination, context("copying passed bytes", e)))?;
                copied += n as u64;
                counters.add(n as u64);
                activity.touch();
                buffer = Vec::new();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err((Leg::Source, context("reading", e))),
        }
    }
}

/// Says which step of the sockmap pump an error came from; the kind stays.
fn context(step: &str, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{step}: {e}"))
}

/// Completes when `dst` has taken `expected` bytes in all: the kernel's
/// work queue has handed it everything redirected so far.
async fn flushed(dst: &TcpStream, expected: u64) -> io::Result<()> {
    while taken_to_send(dst)? < expected {
        // A destination that failed will never catch up: report its error.
        if let Some(err) = dst.take_error()? {
            return Err(err);
        }
        tokio::time::sleep(FLUSH_STEP).await;
    }
    Ok(())
}

async fn write_all(dst: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        dst.writable().await?;
        match dst.try_io(Interest::WRITABLE, || {
            nix::sys::socket::send(
                dst.as_raw_fd(),
                bytes,
                nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
            )
            .map_err(io::Error::from)
        }) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    /// The BTF of the committed object names `struct relay_link` with the
    /// size and member offsets the Rust mirror must have.
    #[test]
    fn link_layout_matches_the_compiled_object() {
        let object = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../relay-ebpf/obj/sockmap.bpf.o"
        );
        let dump = match std::process::Command::new("bpftool")
            .args(["btf", "dump", "file", object, "format", "c"])
            .output()
        {
            Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).into_owned(),
            _ => {
                eprintln!("SKIP link_layout_matches_the_compiled_object: bpftool not available");
                return;
            }
        };
        assert!(
            dump.contains("struct relay_link {\n\t__u64 peer;\n\t__u64 bytes;\n};"),
            "struct relay_link in the object differs from the Rust mirror (peer: u64, bytes: u64):\n{dump}"
        );
        assert_eq!(size_of::<Link>(), 16);
        assert_eq!(offset_of!(Link, peer), 0);
        assert_eq!(offset_of!(Link, bytes), 8);
    }
}
