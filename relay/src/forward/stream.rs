//! One leg of a relayed connection: plain TCP, or TLS over TCP in either
//! role. The copy loop reads and writes through this; resets and socket
//! options go to the TCP socket underneath.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

pub enum Stream {
    Plain(TcpStream),
    /// TLS the relay terminated (it was the server).
    TlsServer(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// TLS the relay originated (it was the client).
    TlsClient(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Stream {
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(tcp) => tcp,
            Stream::TlsServer(tls) => tls.get_ref().0,
            Stream::TlsClient(tls) => tls.get_ref().0,
        }
    }

    /// Whether bytes of this leg are still on their way: sent by the peer
    /// and not read by relay yet, or written by relay and not yet taken
    /// (acknowledged) by the peer. On a TLS leg rustls may hold decrypted
    /// bytes too, but only while the pump that reads them is stuck
    /// writing, which the pump itself records (`Activity::hold`); on the
    /// sockmap path the kernel holds them, and they show in these queues.
    pub fn has_bytes_in_flight(&self) -> bool {
        unread_bytes(self.tcp()) > 0 || unsent_bytes(self.tcp()) > 0
    }
}

/// Bytes written to the socket that the peer has not acknowledged yet
/// (SIOCOUTQ); 0 when the kernel cannot say.
pub fn unsent_bytes(socket: &TcpStream) -> usize {
    queued(socket, nix::libc::TIOCOUTQ).unwrap_or(0)
}

/// Bytes waiting in the socket's receive queue (FIONREAD); 0 when the
/// kernel cannot say (the socket is already gone).
pub fn unread_bytes(socket: &TcpStream) -> usize {
    queued(socket, nix::libc::FIONREAD).unwrap_or(0)
}

/// One of the queue-length ioctls: FIONREAD (bytes to read) or TIOCOUTQ
/// (SIOCOUTQ: bytes sent but not acknowledged).
pub(super) fn queued(socket: &TcpStream, request: nix::libc::Ioctl) -> std::io::Result<usize> {
    let mut queued: std::ffi::c_int = 0;
    // SAFETY: FIONREAD and TIOCOUTQ write one int to the pointer given;
    // the fd is open for as long as `socket` is borrowed.
    let rc = unsafe {
        nix::libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(socket),
            request,
            &mut queued,
        )
    };
    if rc == 0 {
        Ok(usize::try_from(queued).unwrap_or(0))
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Calls the same poll method on whichever stream this is.
macro_rules! each {
    ($self:ident, $method:ident($($arg:expr),*)) => {
        match $self.get_mut() {
            Stream::Plain(s) => Pin::new(s).$method($($arg),*),
            Stream::TlsServer(s) => Pin::new(s.as_mut()).$method($($arg),*),
            Stream::TlsClient(s) => Pin::new(s.as_mut()).$method($($arg),*),
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        each!(self, poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        each!(self, poll_write(cx, buf))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, poll_flush(cx))
    }
    /// On a TLS leg this sends close_notify, then shuts down the TCP write side.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, poll_shutdown(cx))
    }
}
