//! Rust peers: clients and servers whose behaviour a test scripts.
//!
//! - [`Backend`]: a server that runs a test-supplied handler on its own thread
//!   for each accepted connection (sinks, sources, resetters, slow senders).
//!   Handlers report what they saw over channels; the test asserts.
//! - [`EchoServer`]: a tokio echo server for many concurrent connections,
//!   half-close aware (it shuts down its write side after the client's EOF).
//! - client helpers: [`connect`] with timeouts, [`reset`] (SO_LINGER 0
//!   close), [`expect_close`] which says how and when a peer hung up, and
//!   [`echo_payload`] which sends a payload to an echo and reads it back.
//!
//! Real third-party peers (socat, nginx) live in [`crate::tools`].

use std::io::{self, Read};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::socket::{Shutdown, shutdown};

/// Read/write timeout on test sockets, so that a hang fails instead of
/// stalling the suite. Far above anything a passing test needs.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// Set [`IO_TIMEOUT`] as read and write timeout.
pub fn set_io_timeouts(stream: &TcpStream) -> Result<()> {
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .context("setting SO_RCVTIMEO")?;
    stream
        .set_write_timeout(Some(IO_TIMEOUT))
        .context("setting SO_SNDTIMEO")?;
    Ok(())
}

/// Connect to `addr` and set [`IO_TIMEOUT`]s.
///
/// A plain blocking connect on purpose: `connect_timeout` reports an RST
/// that arrives right after the handshake as a failed connect, and tests
/// must see such a reset on the established stream instead.
pub fn connect(addr: SocketAddr) -> Result<TcpStream> {
    let stream = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    set_io_timeouts(&stream)?;
    Ok(stream)
}

/// Close `stream` with SO_LINGER 0, so the peer receives RST instead of FIN.
pub fn reset(stream: TcpStream) -> Result<()> {
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .context("setting SO_LINGER 0")?;
    drop(stream);
    Ok(())
}

/// How a connection ended, as seen by a reader.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Closed {
    /// Orderly: read returned 0 (FIN).
    Eof,
    /// Abortive: read failed with ECONNRESET (RST).
    Reset,
}

/// Read until the peer closes; fail if data arrives or nothing happens
/// within `timeout`. Returns how it closed and how long that took.
pub fn expect_close(stream: &mut TcpStream, timeout: Duration) -> Result<(Closed, Duration)> {
    let start = Instant::now();
    stream
        .set_read_timeout(Some(timeout))
        .context("setting SO_RCVTIMEO")?;
    let mut buf = [0u8; 4096];
    let outcome = loop {
        match stream.read(&mut buf) {
            Ok(0) => break Closed::Eof,
            Ok(n) => bail!("expected the connection to close, got {n} more bytes instead"),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break Closed::Reset,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                bail!("expected the connection to close within {timeout:?}, it is still open")
            }
            Err(e) => bail!("expected EOF or ECONNRESET, got read error: {e}"),
        }
    };
    Ok((outcome, start.elapsed()))
}

/// The handler a [`Backend`] runs for each accepted connection.
pub type Handler = dyn Fn(TcpStream) + Send + Sync + 'static;

/// A TCP server running a handler per connection, each on its own thread.
///
/// Dropping it stops accepting; handler threads already running finish on
/// their own (they hold only their connection).
pub struct Backend {
    addr: SocketAddr,
    listener: Arc<TcpListener>,
    accepted: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Backend {
    /// Listen on 127.0.0.1 (a free port) and run `handler` per connection.
    pub fn start(handler: impl Fn(TcpStream) + Send + Sync + 'static) -> Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .context("binding a backend on 127.0.0.1:0")?;
        Self::on(listener, handler)
    }

    /// Serve on an existing listener (e.g. one bound inside a netns).
    pub fn on(
        listener: TcpListener,
        handler: impl Fn(TcpStream) + Send + Sync + 'static,
    ) -> Result<Self> {
        let addr = listener
            .local_addr()
            .context("reading a backend's address")?;
        let listener = Arc::new(listener);
        let accepted = Arc::new(AtomicU64::new(0));
        let handler: Arc<Handler> = Arc::new(handler);
        let thread = std::thread::Builder::new()
            .name(format!("backend-{addr}"))
            .spawn({
                let listener = Arc::clone(&listener);
                let accepted = Arc::clone(&accepted);
                move || accept_loop(&listener, &accepted, &handler)
            })
            .context("spawning a backend's accept thread")?;
        Ok(Self {
            addr,
            listener,
            accepted,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many connections the backend has accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

fn accept_loop(listener: &TcpListener, accepted: &AtomicU64, handler: &Arc<Handler>) {
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                accepted.fetch_add(1, Ordering::SeqCst);
                if set_io_timeouts(&stream).is_err() {
                    continue;
                }
                let handler = Arc::clone(handler);
                // A failed spawn drops the connection; the test sees that.
                let _ = std::thread::Builder::new()
                    .name("backend-conn".into())
                    .spawn(move || handler(stream));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
            // EINVAL: Backend::drop shut the listener down.
            Err(_) => return,
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        // shutdown(SHUT_RD) on a listening socket wakes a blocked accept()
        // with EINVAL on Linux, which ends the accept loop.
        let _ = shutdown(self.listener.as_raw_fd(), Shutdown::Read);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// An echo server on a tokio runtime of its own; stops on drop.
///
/// Each connection echoes until the client's EOF, then shuts down its write
/// side (so the client reads EOF after the full echo). Errors (resets) just
/// end that connection.
pub struct EchoServer {
    addr: SocketAddr,
    accepted: Arc<AtomicU64>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    /// Listen on 127.0.0.1 on a free port.
    pub fn start() -> Result<Self> {
        Self::on(
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                .context("binding an echo server on 127.0.0.1:0")?,
        )
    }

    /// Listen on a given address, e.g. a port the relay already targets.
    pub fn start_on(addr: SocketAddr) -> Result<Self> {
        Self::on(
            TcpListener::bind(addr).with_context(|| format!("binding an echo server on {addr}"))?,
        )
    }

    /// Serve on an existing listener (e.g. one bound inside a netns).
    pub fn on(listener: TcpListener) -> Result<Self> {
        let addr = listener
            .local_addr()
            .context("reading the echo server's address")?;
        listener
            .set_nonblocking(true)
            .context("making the echo listener non-blocking")?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("building the echo server's tokio runtime")?;
        let listener = {
            let _guard = runtime.enter();
            tokio::net::TcpListener::from_std(listener)
                .context("registering the echo listener with tokio")?
        };
        let accepted = Arc::new(AtomicU64::new(0));
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let thread = std::thread::Builder::new()
            .name(format!("echo-{addr}"))
            .spawn({
                let accepted = Arc::clone(&accepted);
                move || runtime.block_on(echo_accept_loop(listener, accepted, stopped))
            })
            .context("spawning the echo server thread")?;
        Ok(Self {
            addr,
            accepted,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many connections the server has accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

async fn echo_accept_loop(
    listener: tokio::net::TcpListener,
    accepted: Arc<AtomicU64>,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            result = listener.accept() => match result {
                Ok((stream, _)) => {
                    accepted.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(echo_one(stream));
                }
                // EMFILE and the like: back off instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            },
        }
    }
}

async fn echo_one(mut stream: tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt;
    let (mut reader, mut writer) = stream.split();
    if tokio::io::copy(&mut reader, &mut writer).await.is_ok() {
        let _ = writer.shutdown().await;
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // The runtime is dropped on that thread, which cancels open echoes.
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Send `bytes`, read exactly as many back, and compare: one echo round trip.
pub fn round_trip(stream: &mut (impl io::Read + io::Write), bytes: &[u8]) -> Result<()> {
    stream.write_all(bytes).context("writing an echo request")?;
    let mut back = vec![0u8; bytes.len()];
    stream
        .read_exact(&mut back)
        .context("reading the echo back")?;
    if back != bytes {
        bail!("echo mismatch: sent {:?}, got back {:?}", bytes, back);
    }
    Ok(())
}

/// Send `payload` over `stream` (from a thread of its own, so a large
/// echo never deadlocks on full buffers), shut down writing, and read
/// until EOF: returns the fingerprint of what came back. A reset or a
/// stall (past the stream's read timeout) is an error naming the bytes
/// received so far.
pub fn echo_payload(stream: TcpStream, payload: crate::Payload) -> Result<crate::Fingerprint> {
    echo_payload_paced(stream, payload, None)
}

/// [`echo_payload`], the sender pausing `pause` between chunks when given
/// (to keep a transfer in flight for a while).
pub fn echo_payload_paced(
    stream: TcpStream,
    payload: crate::Payload,
    pause: Option<Duration>,
) -> Result<crate::Fingerprint> {
    let mut writer = stream
        .try_clone()
        .context("cloning the echo client's socket")?;
    let sender = std::thread::Builder::new()
        .name("echo-payload-writer".into())
        .spawn(move || -> io::Result<()> {
            payload.write_paced(&mut writer, pause)?;
            writer.shutdown(std::net::Shutdown::Write)
        })
        .context("spawning the echo client's writer")?;
    let mut reader = CountingReader {
        inner: stream,
        read: 0,
    };
    let heard = crate::payload::read_fingerprint(&mut reader).with_context(|| {
        format!(
            "reading the echo of {} bytes: failed after {} bytes",
            payload.len, reader.read
        )
    });
    let sent = sender
        .join()
        .map_err(|_| anyhow::anyhow!("the echo client's writer panicked"))?;
    let heard = heard?;
    sent.with_context(|| format!("writing {} bytes to the echo", payload.len))?;
    Ok(heard)
}

/// Counts the bytes read, for error messages.
struct CountingReader {
    inner: TcpStream,
    read: u64,
}

impl Read for CountingReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        Ok(n)
    }
}

/// An echo server on a UNIX socket path: each connection on its own
/// thread, echoed until EOF, then its write side shut down. It counts the
/// connections it accepted, so a test can tell that a refused client never
/// reached it.
pub struct UnixEchoServer {
    path: std::path::PathBuf,
    accepted: Arc<AtomicU64>,
}

impl UnixEchoServer {
    pub fn start(path: &std::path::Path) -> Result<Self> {
        let listener = std::os::unix::net::UnixListener::bind(path)
            .with_context(|| format!("binding a UNIX echo server on {}", path.display()))?;
        let accepted = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&accepted);
        std::thread::Builder::new()
            .name("unix-echo".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    let Ok(mut stream) = stream else { return };
                    counter.fetch_add(1, Ordering::SeqCst);
                    std::thread::spawn(move || {
                        let Ok(mut reader) = stream.try_clone() else {
                            return;
                        };
                        if io::copy(&mut reader, &mut stream).is_ok() {
                            let _ = stream.shutdown(std::net::Shutdown::Write);
                        }
                    });
                }
            })
            .context("spawning the UNIX echo server's thread")?;
        Ok(Self {
            path: path.to_path_buf(),
            accepted,
        })
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// A DNS server that answers every query SERVFAIL (its header echoed with
/// QR set and RCODE 2), on a UDP socket the caller bound; stops on drop.
pub struct ServfailDns {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ServfailDns {
    pub fn on(socket: std::net::UdpSocket) -> Result<Self> {
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .context("setting the DNS responder's read timeout")?;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("servfail-dns".into())
            .spawn({
                let stop = Arc::clone(&stop);
                move || {
                    let mut buf = [0u8; 1500];
                    while !stop.load(Ordering::Relaxed) {
                        let Ok((n, from)) = socket.recv_from(&mut buf) else {
                            continue;
                        };
                        if n < 12 {
                            continue;
                        }
                        buf[2] |= 0x80; // QR: a response
                        buf[3] = (buf[3] & 0xf0) | 2; // RCODE: SERVFAIL
                        let _ = socket.send_to(&buf[..n], from);
                    }
                }
            })
            .context("spawning the DNS responder")?;
        Ok(ServfailDns {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for ServfailDns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A DNS query for `name` type A (recursion desired), as a client sends it.
pub fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut query = id.to_be_bytes().to_vec();
    query.extend([0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        query.push(label.len() as u8);
        query.extend(label.as_bytes());
    }
    query.extend([0, 0, 1, 0, 1]);
    query
}
