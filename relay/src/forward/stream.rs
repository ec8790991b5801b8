//! One leg of a relayed connection: a [`Socket`] (TCP, UNIX, or
//! stdin/stdout), plain or with TLS over it in either role. The pumps read
//! and write through [`Stream`]; resets and queue lengths go to the socket
//! underneath. Every endpoint kind becomes one of these, so a data path
//! never asks what the address was.

use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use super::file::FileLeg;
use super::stdio::Stdio;

/// The byte stream under a leg.
pub enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
    Stdio(Stdio),
    /// A file, named pipe or terminal (socat's `OPEN`, `CREATE`, `PIPE`).
    File(Box<FileLeg>),
    /// An AF_VSOCK stream (socat's `VSOCK-LISTEN`, `VSOCK-CONNECT`).
    Vsock(tokio_vsock::VsockStream),
}

/// A leg that is a kernel socket, as splice(2) needs one.
#[derive(Clone, Copy)]
pub enum FdSocket<'a> {
    Tcp(&'a TcpStream),
    Unix(&'a UnixStream),
}

impl Socket {
    /// The TCP socket, for what only TCP has (TCP_NODELAY, the sockmap).
    pub fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Socket::Tcp(tcp) => Some(tcp),
            _ => None,
        }
    }

    /// The kernel socket, for splice; stdin/stdout are not one.
    pub fn fd(&self) -> Option<FdSocket<'_>> {
        match self {
            Socket::Tcp(tcp) => Some(FdSocket::Tcp(tcp)),
            Socket::Unix(unix) => Some(FdSocket::Unix(unix)),
            Socket::Stdio(_) | Socket::File(_) | Socket::Vsock(_) => None,
        }
    }

    /// Makes the coming close send RST instead of FIN. Only TCP has a
    /// reset; a UNIX peer sees the close (and an error on its next write).
    pub fn reset(&self) {
        if let Socket::Tcp(tcp) = self {
            // An error here means the socket is already gone; the close still happens.
            let _ = socket2::SockRef::from(tcp).set_linger(Some(Duration::ZERO));
        }
    }

    /// Bytes of this leg still on their way: sent by the peer and not read
    /// by relay yet, or written by relay and not yet taken by the peer.
    fn has_bytes_in_flight(&self) -> bool {
        match self.fd() {
            Some(FdSocket::Tcp(s)) => unread_bytes(s) > 0 || unsent_bytes(s) > 0,
            Some(FdSocket::Unix(s)) => unread_bytes(s) > 0 || unsent_bytes(s) > 0,
            None => false,
        }
    }
}

pub enum Stream {
    Plain(Socket),
    /// TLS the relay terminated (it was the server).
    TlsServer(Box<tokio_rustls::server::TlsStream<Socket>>),
    /// TLS the relay originated (it was the client).
    TlsClient(Box<tokio_rustls::client::TlsStream<Socket>>),
}

impl Stream {
    pub fn socket(&self) -> &Socket {
        match self {
            Stream::Plain(socket) => socket,
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
        self.socket().has_bytes_in_flight()
    }
}

/// Bytes written to the socket that the peer has not acknowledged yet
/// (SIOCOUTQ; for a UNIX socket, not yet read by the peer); 0 when the
/// kernel cannot say.
pub fn unsent_bytes(socket: &impl AsRawFd) -> usize {
    queued(socket, nix::libc::TIOCOUTQ).unwrap_or(0)
}

/// Bytes waiting in the socket's receive queue (FIONREAD); 0 when the
/// kernel cannot say (the socket is already gone).
pub fn unread_bytes(socket: &impl AsRawFd) -> usize {
    queued(socket, nix::libc::FIONREAD).unwrap_or(0)
}

/// One of the queue-length ioctls: FIONREAD (bytes to read) or TIOCOUTQ
/// (SIOCOUTQ: bytes sent but not acknowledged).
pub(super) fn queued(socket: &impl AsRawFd, request: nix::libc::Ioctl) -> std::io::Result<usize> {
    let mut queued: std::ffi::c_int = 0;
    // SAFETY: FIONREAD and TIOCOUTQ write one int to the pointer given;
    // the fd is open for as long as `socket` is borrowed.
    let rc = unsafe { nix::libc::ioctl(socket.as_raw_fd(), request, &mut queued) };
    if rc == 0 {
        Ok(usize::try_from(queued).unwrap_or(0))
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Calls the same poll method on whichever socket this is.
macro_rules! each_socket {
    ($self:ident, $method:ident($($arg:expr),*)) => {
        match $self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).$method($($arg),*),
            Socket::Unix(s) => Pin::new(s).$method($($arg),*),
            Socket::Stdio(s) => Pin::new(s).$method($($arg),*),
            Socket::File(s) => Pin::new(s).$method($($arg),*),
            Socket::Vsock(s) => Pin::new(s).$method($($arg),*),
        }
    };
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        each_socket!(self, poll_read(cx, buf))
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        each_socket!(self, poll_write(cx, buf))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each_socket!(self, poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each_socket!(self, poll_shutdown(cx))
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
    /// On a TLS leg this sends close_notify, then shuts down the socket's write side.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, poll_shutdown(cx))
    }
}

/// The same readiness-driven calls on either kind of kernel socket, for
/// the splice path.
impl FdSocket<'_> {
    pub async fn readable(self) -> io::Result<()> {
        match self {
            FdSocket::Tcp(s) => s.readable().await,
            FdSocket::Unix(s) => s.readable().await,
        }
    }

    pub async fn writable(self) -> io::Result<()> {
        match self {
            FdSocket::Tcp(s) => s.writable().await,
            FdSocket::Unix(s) => s.writable().await,
        }
    }

    pub fn try_io<R>(
        self,
        interest: tokio::io::Interest,
        f: impl FnOnce() -> io::Result<R>,
    ) -> io::Result<R> {
        match self {
            FdSocket::Tcp(s) => s.try_io(interest, f),
            FdSocket::Unix(s) => s.try_io(interest, f),
        }
    }

    pub fn try_read(self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            FdSocket::Tcp(s) => s.try_read(buf),
            FdSocket::Unix(s) => s.try_read(buf),
        }
    }

    pub fn try_write(self, buf: &[u8]) -> io::Result<usize> {
        match self {
            FdSocket::Tcp(s) => s.try_write(buf),
            FdSocket::Unix(s) => s.try_write(buf),
        }
    }

    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        match self {
            FdSocket::Tcp(s) => s.as_fd(),
            FdSocket::Unix(s) => s.as_fd(),
        }
    }

    /// Passes an EOF on: `shutdown(SHUT_WR)`.
    pub fn shutdown_write(self) -> io::Result<()> {
        match self {
            FdSocket::Tcp(s) => socket2::SockRef::from(s).shutdown(std::net::Shutdown::Write),
            FdSocket::Unix(s) => socket2::SockRef::from(s).shutdown(std::net::Shutdown::Write),
        }
    }
}
