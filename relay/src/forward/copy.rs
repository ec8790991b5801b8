//! The `copy` data path: read into a userspace buffer, write it all, for
//! plain socket legs (over borrowed halves), stdin/stdout, and every TLS
//! leg (through rustls). It keeps the contract of `pump`.
//!
//! This module owns the buffer policy. Buffers exist only while bytes flow:
//! an idle connection holds none, so ten thousand idle connections cost
//! sockets and a task each, not buffers.

use std::io;

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{tcp, unix};

use super::pump::{Activity, Counters, Direction, Eof, Leg};
use super::stream::{FdSocket, Socket, Stream};

/// A direction's buffer starts small (ping-pong traffic never needs more)
/// and doubles each time a read fills it, up to the maximum: large reads
/// are what lets bulk transfers approach the speed of a direct connection.
const BUFFER_MIN: usize = 16 * 1024;
const BUFFER_MAX: usize = 1024 * 1024;

/// The reading half of a leg, as the copy loop needs it.
pub(super) trait Source: AsyncRead + Unpin + Send {
    /// Completes when a read may make progress; the loop waits here before
    /// it allocates a buffer, so an idle leg holds none.
    fn ready(&self) -> impl Future<Output = io::Result<()>> + Send;
}

/// The reading half of a leg: borrowed halves of a plain kernel socket
/// (no lock between the directions, and unlike owned halves they do not
/// shut down on drop, so a reset stays a reset), or a half of anything
/// else (TLS, stdin/stdout) through tokio's split.
pub(super) enum ReadPart<'a> {
    Tcp(tcp::ReadHalf<'a>),
    Unix(unix::ReadHalf<'a>),
    Other(tokio::io::ReadHalf<&'a mut Stream>),
}

pub(super) enum WritePart<'a> {
    Tcp(tcp::WriteHalf<'a>),
    Unix(unix::WriteHalf<'a>),
    Other(tokio::io::WriteHalf<&'a mut Stream>),
}

/// Splits a leg into the halves the two directions use.
pub(super) fn split(stream: &mut Stream) -> (ReadPart<'_>, WritePart<'_>) {
    match stream {
        Stream::Plain(Socket::Tcp(tcp)) => {
            let (read, write) = tcp.split();
            (ReadPart::Tcp(read), WritePart::Tcp(write))
        }
        Stream::Plain(Socket::Unix(unix)) => {
            let (read, write) = unix.split();
            (ReadPart::Unix(read), WritePart::Unix(write))
        }
        other => {
            let (read, write) = tokio::io::split(other);
            (ReadPart::Other(read), WritePart::Other(write))
        }
    }
}

impl ReadPart<'_> {
    /// The kernel socket under a plain half, for splice.
    pub(super) fn fd(&self) -> Option<FdSocket<'_>> {
        match self {
            ReadPart::Tcp(half) => Some(FdSocket::Tcp(half.as_ref())),
            ReadPart::Unix(half) => Some(FdSocket::Unix(half.as_ref())),
            ReadPart::Other(_) => None,
        }
    }
}

impl WritePart<'_> {
    /// The kernel socket under a plain half, for splice.
    pub(super) fn fd(&self) -> Option<FdSocket<'_>> {
        match self {
            WritePart::Tcp(half) => Some(FdSocket::Tcp(half.as_ref())),
            WritePart::Unix(half) => Some(FdSocket::Unix(half.as_ref())),
            WritePart::Other(_) => None,
        }
    }
}

impl Source for ReadPart<'_> {
    async fn ready(&self) -> io::Result<()> {
        match self {
            ReadPart::Tcp(half) => half.as_ref().readable().await,
            ReadPart::Unix(half) => half.as_ref().readable().await,
            // A TLS leg: rustls may already hold decrypted bytes while the
            // socket is quiet, so readiness of the socket says nothing; and
            // stdin has no readiness to wait for. Read directly.
            ReadPart::Other(_) => Ok(()),
        }
    }
}

impl AsyncRead for ReadPart<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ReadPart::Tcp(h) => Pin::new(h).poll_read(cx, buf),
            ReadPart::Unix(h) => Pin::new(h).poll_read(cx, buf),
            ReadPart::Other(h) => Pin::new(h).poll_read(cx, buf),
        }
    }
}

macro_rules! each_part {
    ($self:ident, $method:ident($($arg:expr),*)) => {
        match $self.get_mut() {
            WritePart::Tcp(h) => Pin::new(h).$method($($arg),*),
            WritePart::Unix(h) => Pin::new(h).$method($($arg),*),
            WritePart::Other(h) => Pin::new(h).$method($($arg),*),
        }
    };
}

impl AsyncWrite for WritePart<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        each_part!(self, poll_write(cx, buf))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each_part!(self, poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each_part!(self, poll_shutdown(cx))
    }
}

/// Copies `src` to `dst` until EOF on `src`, then shuts down writing on `dst`.
///
/// `read_buf` (rather than `try_read`) lets tokio clear the socket's
/// readiness after a short read, which saves a read that would only say
/// EAGAIN on every small message.
pub(super) async fn pump(
    src: &mut impl Source,
    dst: &mut (impl AsyncWrite + Unpin),
    counters: Counters<'_>,
    activity: &Activity,
) -> Direction {
    let mut buffer: Vec<u8> = Vec::new();
    let max = counters.block.unwrap_or(BUFFER_MAX).clamp(1, BUFFER_MAX);
    let mut size = BUFFER_MIN.min(max);
    loop {
        if buffer.capacity() == 0 {
            // Wait before allocating, so an idle direction holds no buffer.
            src.ready().await.map_err(|e| (Leg::Source, e))?;
            buffer.reserve_exact(size);
        }
        match src.read_buf(&mut buffer).await {
            Ok(0) => {
                return dst
                    .shutdown()
                    .await
                    .map(|()| Eof::Clean)
                    .map_err(|e| (Leg::Destination, e));
            }
            Ok(n) => {
                counters.crlf.convert(&mut buffer);
                counters.show(&buffer);
                activity.hold();
                dst.write_all(&buffer)
                    .await
                    .map_err(|e| (Leg::Destination, e))?;
                activity.release();
                counters.add(buffer.len() as u64);
                activity.touch();
                if n == buffer.capacity() && size < max {
                    size = (size * 2).min(max);
                    buffer = Vec::new();
                } else if 2 * n < buffer.capacity() {
                    // A light flow gives its buffer back, so a connection
                    // that goes quiet holds no buffer memory; a bulk flow
                    // keeps it rather than fault in fresh pages each time.
                    buffer = Vec::new();
                } else {
                    buffer.clear();
                }
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return dst
                    .shutdown()
                    .await
                    .map(|()| Eof::WithoutCloseNotify)
                    .map_err(|e| (Leg::Destination, e));
            }
            Err(e) => return Err((Leg::Source, e)),
        }
    }
}
