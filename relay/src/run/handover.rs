//! The upgrade handover: how a running relay gives its listening sockets
//! to the relay that replaces it, over a unix socket, as HAProxy's master
//! does. This module owns the wire protocol and the handover socket's
//! file; what to offer and what to do with what arrives is the
//! supervisor's (`run`, `run::inherited`).
//!
//! The exchange, on one connection to the old relay's handover socket:
//!
//! 1. old to new: `offer` frames, each carrying up to [`FDS_PER_FRAME`]
//!    listening sockets as SCM_RIGHTS beside their identities (the last has
//!    `last = true`). The kernel duplicates the descriptors into the new
//!    process: both now hold the same sockets, and both may accept;
//! 2. new to old: `ready`, once the new relay serves. Closing the
//!    connection instead (it failed to start) leaves the old relay as it
//!    was: its sockets never stopped accepting;
//! 3. old to new: `released`, once the old relay has removed its handover
//!    socket's path (so the new one may bind it) and stopped accepting; it
//!    then drains its open connections and exits.
//!
//! A frame is a 4-byte big-endian length and that many bytes of JSON. The
//! connection is a stream socket, so a frame may arrive in pieces; a
//! frame's descriptors travel with its first byte and are queued until the
//! frame is whole.
//!
//! Not here: matching sockets to routes (`run::inherited`) or when an
//! upgrade may happen (`run`).

use std::collections::VecDeque;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr, recvmsg, sendmsg};
use serde::{Deserialize, Serialize};
use tokio::io::Interest;
use tokio::net::{UnixListener, UnixStream};

/// The protocol version both sides must speak.
pub const VERSION: u32 = 1;

/// Descriptors per offer frame: well below the kernel's limit per message
/// (SCM_MAX_FD, 253).
pub const FDS_PER_FRAME: usize = 128;

/// Frames larger than this are refused (a thousand routes' identities fit
/// many times over).
const MAX_FRAME: usize = 1 << 20;

/// Room for the descriptors of one frame in a received control message.
const MAX_FDS_PER_MESSAGE: usize = 253;

/// One listening socket offered, and what it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Listening {
    /// How the receiver matches it to what it needs: a route's
    /// `socket_identity`, or the metrics endpoint's.
    pub identity: String,
    /// Who used it in the sender (a route's name, or `metrics`), for logs.
    pub owner: String,
}

/// Everything said on a handover connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "message", rename_all = "kebab-case", deny_unknown_fields)]
enum Message {
    /// Old to new: these sockets (the frame's descriptors, in this order).
    Offer {
        version: u32,
        pid: u32,
        sockets: Vec<Listening>,
        last: bool,
    },
    /// New to old: serving now; stop accepting and drain.
    Ready { pid: u32 },
    /// Old to new: it accepts no more and its handover socket is gone.
    Released,
}

impl Message {
    fn name(&self) -> &'static str {
        match self {
            Message::Offer { .. } => "offer",
            Message::Ready { .. } => "ready",
            Message::Released => "released",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error(
        "cannot connect to the upgrade socket {path}: {cause} (give --upgrade-from the `[upgrade] socket` path of the running relay's config file)"
    )]
    Connect { path: PathBuf, cause: io::Error },
    #[error("cannot serve the upgrade socket {path}: {cause}{hint}")]
    Bind {
        path: PathBuf,
        cause: io::Error,
        hint: &'static str,
    },
    #[error(
        "the upgrade socket {path} is served by a running relay: upgrade it with `relay run --upgrade-from {path}`, or give this one another `[upgrade] socket`"
    )]
    InUse { path: PathBuf },
    #[error("{path} exists and is not a socket: remove it or give `[upgrade] socket` another path")]
    NotASocket { path: PathBuf },
    #[error("the handover connection failed while {during}: {cause}")]
    Io {
        during: &'static str,
        cause: io::Error,
    },
    #[error("the other relay closed the handover connection while {during}")]
    Closed { during: &'static str },
    #[error("bad handover frame ({during}): {reason}")]
    Malformed {
        during: &'static str,
        reason: String,
    },
    #[error(
        "the other relay speaks handover protocol version {theirs}, this one {VERSION}: stop one and start the other instead"
    )]
    Version { theirs: u32 },
    #[error("expected a `{expected}` message while {during}, got `{got}`")]
    Unexpected {
        during: &'static str,
        expected: &'static str,
        got: &'static str,
    },
    #[error(
        "a `{message}` frame carried {got} descriptors, expected {expected} (one per socket offered)"
    )]
    Descriptors {
        message: &'static str,
        expected: usize,
        got: usize,
    },
}

impl HandoverError {
    /// Errors in what the user asked for: `--upgrade-from` a path where no
    /// relay serves, or an `[upgrade] socket` that cannot be used.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            HandoverError::Connect { .. }
                | HandoverError::InUse { .. }
                | HandoverError::NotASocket { .. }
                | HandoverError::Version { .. }
        )
    }
}

type Result<T, E = HandoverError> = std::result::Result<T, E>;

/// One end of a handover connection: frames and their descriptors.
pub struct Channel {
    stream: UnixStream,
    /// Bytes read that do not make a whole frame yet.
    bytes: Vec<u8>,
    /// Descriptors received and not yet claimed by a frame.
    fds: VecDeque<OwnedFd>,
}

impl Channel {
    pub fn new(stream: UnixStream) -> Self {
        Channel {
            stream,
            bytes: Vec::new(),
            fds: VecDeque::new(),
        }
    }

    async fn send(
        &self,
        message: &Message,
        fds: &[BorrowedFd<'_>],
        during: &'static str,
    ) -> Result<()> {
        let io_err = |cause| HandoverError::Io { during, cause };
        let body = serde_json::to_vec(message).expect("handover messages always serialize");
        let len = u32::try_from(body.len())
            .ok()
            .filter(|len| *len as usize <= MAX_FRAME)
            .expect("handover frames are far below MAX_FRAME: offers are chunked");
        let mut frame = len.to_be_bytes().to_vec();
        frame.extend_from_slice(&body);
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let mut sent = 0;
        while sent < frame.len() {
            // The descriptors go with the first byte; the rest is plain.
            let rights = [ControlMessage::ScmRights(&raw)];
            let cmsgs: &[ControlMessage] = if sent == 0 && !raw.is_empty() {
                &rights
            } else {
                &[]
            };
            let fd = self.stream.as_raw_fd();
            let rest = &frame[sent..];
            let n = self
                .stream
                .async_io(Interest::WRITABLE, || {
                    sendmsg::<UnixAddr>(
                        fd,
                        &[IoSlice::new(rest)],
                        cmsgs,
                        MsgFlags::MSG_NOSIGNAL,
                        None,
                    )
                    .map_err(io::Error::from)
                })
                .await
                .map_err(io_err)?;
            if n == 0 {
                return Err(io_err(io::ErrorKind::WriteZero.into()));
            }
            sent += n;
        }
        Ok(())
    }

    /// The next message and the descriptors that came with it; `None` when
    /// the other side closed the connection between frames.
    async fn recv(&mut self, during: &'static str) -> Result<Option<(Message, Vec<OwnedFd>)>> {
        loop {
            if let Some(frame) = self.frame(during)? {
                return Ok(Some(frame));
            }
            if self.read(during).await? == 0 {
                if self.bytes.is_empty() {
                    return Ok(None);
                }
                return Err(HandoverError::Malformed {
                    during,
                    reason: format!(
                        "the connection closed inside a frame ({} bytes of it read)",
                        self.bytes.len()
                    ),
                });
            }
        }
    }

    /// A whole frame from what was read, if there is one.
    fn frame(&mut self, during: &'static str) -> Result<Option<(Message, Vec<OwnedFd>)>> {
        let Some(head) = self.bytes.first_chunk::<4>() else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(*head) as usize;
        if len > MAX_FRAME {
            return Err(HandoverError::Malformed {
                during,
                reason: format!("a frame of {len} bytes, more than the {MAX_FRAME} allowed"),
            });
        }
        if self.bytes.len() < 4 + len {
            return Ok(None);
        }
        let body: Vec<u8> = self.bytes.drain(..4 + len).skip(4).collect();
        let message: Message =
            serde_json::from_slice(&body).map_err(|e| HandoverError::Malformed {
                during,
                reason: e.to_string(),
            })?;
        let expected = match &message {
            Message::Offer { sockets, .. } => sockets.len(),
            _ => 0,
        };
        // Descriptors a frame does not claim are closed with the queue:
        // the count must match exactly.
        if self.fds.len() != expected {
            return Err(HandoverError::Descriptors {
                message: message.name(),
                expected,
                got: self.fds.len(),
            });
        }
        Ok(Some((message, self.fds.drain(..).collect())))
    }

    /// Reads what is there (bytes, and descriptors beside them); 0 at EOF.
    async fn read(&mut self, during: &'static str) -> Result<usize> {
        let fd = self.stream.as_raw_fd();
        let mut buf = [0u8; 16 * 1024];
        let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS_PER_MESSAGE]);
        let (n, received) = self
            .stream
            .async_io(Interest::READABLE, || {
                let mut iov = [IoSliceMut::new(&mut buf)];
                let msg =
                    recvmsg::<UnixAddr>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)
                        .map_err(io::Error::from)?;
                let mut fds = Vec::new();
                let cmsgs = msg.cmsgs().map_err(|_| {
                    io::Error::other("more descriptors than one frame may carry (truncated)")
                })?;
                for cmsg in cmsgs {
                    if let ControlMessageOwned::ScmRights(raw) = cmsg {
                        fds.extend(raw.into_iter().map(|fd| {
                            // SAFETY: the kernel has just installed `fd` in
                            // this process for this message; nothing else
                            // knows of it, so this is its only owner.
                            unsafe { OwnedFd::from_raw_fd(fd) }
                        }));
                    }
                }
                Ok((msg.bytes, fds))
            })
            .await
            .map_err(|cause| HandoverError::Io { during, cause })?;
        self.bytes.extend_from_slice(&buf[..n]);
        self.fds.extend(received);
        Ok(n)
    }
}

// ------------------------------------------------------------ the old side

/// The running relay's side, after a successor connected: offers its
/// sockets and waits for `ready`. Returns the channel to send `released`
/// on; an error (or the successor closing the connection, which means it
/// failed to start) leaves this relay as it was.
pub async fn offer(
    mut channel: Channel,
    sockets: &[(Listening, BorrowedFd<'_>)],
) -> Result<Successor> {
    let during = "offering the listening sockets";
    let pid = std::process::id();
    let mut chunks = sockets.chunks(FDS_PER_FRAME).peekable();
    if chunks.peek().is_none() {
        let message = Message::Offer {
            version: VERSION,
            pid,
            sockets: Vec::new(),
            last: true,
        };
        channel.send(&message, &[], during).await?;
    }
    while let Some(chunk) = chunks.next() {
        let message = Message::Offer {
            version: VERSION,
            pid,
            sockets: chunk.iter().map(|(l, _)| l.clone()).collect(),
            last: chunks.peek().is_none(),
        };
        let fds: Vec<BorrowedFd> = chunk.iter().map(|(_, fd)| *fd).collect();
        channel.send(&message, &fds, during).await?;
    }
    let during = "waiting for the new relay to be ready";
    match channel.recv(during).await? {
        Some((Message::Ready { pid }, _)) => Ok(Successor { channel, pid }),
        Some((other, _)) => Err(HandoverError::Unexpected {
            during,
            expected: "ready",
            got: other.name(),
        }),
        None => Err(HandoverError::Closed { during }),
    }
}

/// A new relay that serves and waits for this one to let go.
pub struct Successor {
    channel: Channel,
    pub pid: u32,
}

impl Successor {
    /// Tells the successor that this relay accepts no more and its handover
    /// socket is gone.
    pub async fn released(self) -> Result<()> {
        self.channel
            .send(
                &Message::Released,
                &[],
                "telling the new relay it may go on",
            )
            .await
    }
}

// ------------------------------------------------------------ the new side

/// What a new relay received from the one it replaces.
pub struct TakenOver {
    pub sockets: Vec<(Listening, OwnedFd)>,
    /// The old relay's pid, for logs.
    pub pid: u32,
    channel: Channel,
}

/// Connects to the running relay's handover socket at `path` and receives
/// its listening sockets. The old relay keeps accepting on them until
/// [`TakenOver::ready`].
pub async fn take_over(path: &Path) -> Result<TakenOver> {
    let stream = UnixStream::connect(path)
        .await
        .map_err(|cause| HandoverError::Connect {
            path: path.to_path_buf(),
            cause,
        })?;
    receive(Channel::new(stream)).await
}

async fn receive(mut channel: Channel) -> Result<TakenOver> {
    let during = "receiving the listening sockets";
    let mut sockets = Vec::new();
    loop {
        match channel.recv(during).await? {
            Some((
                Message::Offer {
                    version,
                    pid,
                    sockets: listening,
                    last,
                },
                fds,
            )) => {
                if version != VERSION {
                    return Err(HandoverError::Version { theirs: version });
                }
                sockets.extend(listening.into_iter().zip(fds));
                if last {
                    return Ok(TakenOver {
                        sockets,
                        pid,
                        channel,
                    });
                }
            }
            Some((other, _)) => {
                return Err(HandoverError::Unexpected {
                    during,
                    expected: "offer",
                    got: other.name(),
                });
            }
            None => return Err(HandoverError::Closed { during }),
        }
    }
}

impl TakenOver {
    /// The received sockets, leaving the channel for [`Handover::ready`].
    pub fn split(self) -> (Vec<(Listening, OwnedFd)>, Handover) {
        (
            self.sockets,
            Handover {
                channel: self.channel,
                pid: self.pid,
            },
        )
    }
}

/// The new relay's end of the connection once it holds the sockets.
pub struct Handover {
    channel: Channel,
    pub pid: u32,
}

impl Handover {
    /// Tells the old relay that this one serves, and waits until it has
    /// stopped accepting and let go of its handover socket. An old relay
    /// that closes the connection instead (it died, or a second signal
    /// ended it) is as good: it accepts no more either.
    pub async fn ready(mut self) -> Result<()> {
        let ready = Message::Ready {
            pid: std::process::id(),
        };
        match self
            .channel
            .send(&ready, &[], "telling the old relay to stop")
            .await
        {
            Ok(()) => {}
            // It is gone already (a signal stopped it meanwhile): its
            // sockets are this relay's alone, which is what ready asks.
            Err(HandoverError::Io { cause, .. }) if is_hang_up(&cause) => return Ok(()),
            Err(err) => return Err(err),
        }
        let during = "waiting for the old relay to stop accepting";
        match self.channel.recv(during).await {
            Ok(Some((Message::Released, _))) | Ok(None) => Ok(()),
            Ok(Some((other, _))) => Err(HandoverError::Unexpected {
                during,
                expected: "released",
                got: other.name(),
            }),
            Err(HandoverError::Io { cause, .. }) if is_hang_up(&cause) => Ok(()),
            Err(err) => Err(err),
        }
    }
}

/// The other end went away.
fn is_hang_up(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
    )
}

// ------------------------------------------------------ the socket's file

/// The handover socket a running relay serves: mode 0600, and removed when
/// dropped unless another relay's socket has replaced it at the path.
pub struct Server {
    listener: UnixListener,
    /// Where the socket file is now.
    path: PathBuf,
    /// Where it moves at [`Server::install`] (bound beside it first).
    destination: Option<PathBuf>,
    /// The socket file's (device, inode): the path is removed only while
    /// it still names this socket.
    file: (u64, u64),
}

/// Where a new relay binds its handover socket until the old one has let
/// go of the path: `<path>.new`.
pub fn beside(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".new");
    PathBuf::from(name)
}

impl Server {
    /// Binds `path`. A socket file left by a relay that died is replaced; a
    /// socket a live relay serves is an error ([`HandoverError::InUse`]).
    pub fn bind(path: &Path) -> Result<Self> {
        let bind_err = |cause: io::Error| HandoverError::Bind {
            path: path.to_path_buf(),
            hint: bind_hint(&cause),
            cause,
        };
        match std::fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(HandoverError::NotASocket {
                    path: path.to_path_buf(),
                });
            }
            Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => {
                    return Err(HandoverError::InUse {
                        path: path.to_path_buf(),
                    });
                }
                // Nobody listens: a relay that died left it.
                Err(_) => std::fs::remove_file(path).map_err(bind_err)?,
            },
            Err(_) => {}
        }
        Self::bind_at(path)
    }

    /// Binds beside `path` ([`beside`]), for a new relay whose predecessor
    /// still serves `path`; [`Server::install`] moves it there. A file left
    /// there by an upgrade that failed is replaced.
    pub fn bind_beside(path: &Path) -> Result<Self> {
        let temporary = beside(path);
        if std::fs::symlink_metadata(&temporary).is_ok_and(|m| m.file_type().is_socket()) {
            let _ = std::fs::remove_file(&temporary);
        }
        let mut server = Self::bind_at(&temporary)?;
        server.destination = Some(path.to_path_buf());
        Ok(server)
    }

    /// Moves a socket bound with [`Server::bind_beside`] onto its path
    /// (atomically: whoever connects to the path reaches one relay or the
    /// other, never none).
    pub fn install(&mut self) -> Result<()> {
        let Some(destination) = self.destination.take() else {
            return Ok(());
        };
        std::fs::rename(&self.path, &destination).map_err(|cause| HandoverError::Bind {
            path: destination.clone(),
            cause,
            hint: " (moving the new relay's upgrade socket into place)",
        })?;
        self.path = destination;
        Ok(())
    }

    fn bind_at(path: &Path) -> Result<Self> {
        let bind_err = |cause: io::Error| HandoverError::Bind {
            path: path.to_path_buf(),
            hint: bind_hint(&cause),
            cause,
        };
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        // Only this user (the one who may start a relay that takes these
        // sockets) may connect; `accept` checks the peer's uid as well.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
        let meta = std::fs::symlink_metadata(path).map_err(bind_err)?;
        Ok(Server {
            listener,
            path: path.to_path_buf(),
            destination: None,
            file: (meta.dev(), meta.ino()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The next connection from a process of this user (or root); others
    /// are logged and closed.
    pub async fn accept(&self) -> Channel {
        loop {
            let stream = match self.listener.accept().await {
                Ok((stream, _)) => stream,
                Err(err) => {
                    tracing::warn!(error = %err, path = %self.path.display(), "upgrade socket: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let me = nix::unistd::geteuid().as_raw();
            match stream.peer_cred() {
                Ok(cred) if cred.uid() == me || cred.uid() == 0 => return Channel::new(stream),
                Ok(cred) => tracing::warn!(
                    uid = cred.uid(),
                    pid = ?cred.pid(),
                    "upgrade socket: refused a connection from another user"
                ),
                Err(err) => {
                    tracing::warn!(error = %err, "upgrade socket: cannot tell who connected; refused")
                }
            }
        }
    }
}

fn bind_hint(cause: &io::Error) -> &'static str {
    match cause.kind() {
        io::ErrorKind::NotFound => {
            " (its directory does not exist: create it, e.g. RuntimeDirectory=relay in the systemd unit)"
        }
        io::ErrorKind::PermissionDenied => {
            " (this user cannot create files there: choose a directory it owns)"
        }
        _ => "",
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|meta| (meta.dev(), meta.ino()) == self.file);
        if ours && let Err(err) = std::fs::remove_file(&self.path) {
            tracing::warn!(error = %err, path = %self.path.display(), "cannot remove the upgrade socket");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;

    fn pair() -> (Channel, Channel) {
        let (a, b) = UnixStream::pair().expect("socketpair");
        (Channel::new(a), Channel::new(b))
    }

    fn listening(identity: &str) -> Listening {
        Listening {
            identity: identity.to_string(),
            owner: format!("route {identity}"),
        }
    }

    /// Raw bytes on one end of a pair, as a misbehaving peer would send them.
    fn raw_pair() -> (std::os::unix::net::UnixStream, Channel) {
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        b.set_nonblocking(true).expect("nonblocking");
        (
            a,
            Channel::new(UnixStream::from_std(b).expect("tokio stream")),
        )
    }

    fn frame(json: &str) -> Vec<u8> {
        let mut bytes = (json.len() as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(json.as_bytes());
        bytes
    }

    #[tokio::test]
    async fn listening_sockets_and_identities_cross_a_socketpair() {
        // More sockets than one frame carries: the offer spans frames.
        let listeners: Vec<std::net::TcpListener> = (0..FDS_PER_FRAME + 3)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"))
            .collect();
        let offered: Vec<(Listening, BorrowedFd)> = listeners
            .iter()
            .enumerate()
            .map(|(i, l)| (listening(&format!("127.0.0.1:{i}")), l.as_fd()))
            .collect();
        let addrs: Vec<std::net::SocketAddr> = listeners
            .iter()
            .map(|l| l.local_addr().expect("local address"))
            .collect();
        let (old, new) = pair();
        let new_side = tokio::spawn(async move {
            let taken = receive(new).await.expect("the new side receives the offer");
            assert_eq!(taken.pid, std::process::id());
            assert_eq!(taken.sockets.len(), addrs.len());
            for (i, ((got, fd), addr)) in taken.sockets.iter().zip(&addrs).enumerate() {
                assert_eq!(got.identity, format!("127.0.0.1:{i}"));
                // The same kernel socket: the same local address.
                let received = std::net::TcpListener::from(fd.try_clone().expect("dup"));
                assert_eq!(received.local_addr().expect("local address"), *addr);
            }
            // The new side says ready and waits for released.
            taken.split().1.ready().await
        });
        let successor = offer(old, &offered)
            .await
            .expect("the old side hears ready");
        assert_eq!(successor.pid, std::process::id());
        successor.released().await.expect("released is sent");
        new_side
            .await
            .expect("task")
            .expect("the new side hears released");
    }

    #[tokio::test]
    async fn a_client_connects_through_a_socket_handed_over() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("local address");
        let (old, new) = pair();
        let offered = [(listening("web"), listener.as_fd())];
        // The new side hangs up after receiving: the offer ends.
        let (_, mut sockets) = tokio::join!(offer(old, &offered), async {
            receive(new).await.expect("offer received").split().0
        });
        let (_, fd) = sockets.pop().expect("one socket");
        // The sender closes its handle: the socket lives on in the receiver.
        drop(listener);
        let received = std::net::TcpListener::from(fd);
        let mut client = std::net::TcpStream::connect(addr).expect("connect");
        let (mut served, _) = received.accept().expect("accept");
        client.write_all(b"hello").expect("write");
        let mut got = [0u8; 5];
        served.read_exact(&mut got).expect("read");
        assert_eq!(&got, b"hello");
    }

    #[tokio::test]
    async fn an_empty_offer_is_one_last_frame() {
        let (old, new) = pair();
        let (_, sockets) = tokio::join!(offer(old, &[]), async {
            receive(new).await.expect("an empty offer").sockets
        });
        assert!(sockets.is_empty());
    }

    #[tokio::test]
    async fn a_new_relay_that_closes_before_ready_leaves_the_old_as_it_was() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let (old, new) = pair();
        let offered = [(listening("web"), listener.as_fd())];
        let (successor, ()) = tokio::join!(offer(old, &offered), async move {
            // Received, then the new relay fails: the connection closes.
            drop(receive(new).await);
        });
        let err = successor.err().expect("no successor");
        assert!(
            matches!(err, HandoverError::Closed { .. }),
            "expected Closed, got {err}"
        );
        assert!(
            err.to_string()
                .contains("waiting for the new relay to be ready")
        );
    }

    #[tokio::test]
    async fn an_old_relay_gone_before_ready_lets_the_new_one_serve() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let (old, new) = pair();
        // The old relay sends its offer and dies (its end closes) before
        // the new one says ready.
        let message = Message::Offer {
            version: VERSION,
            pid: 1,
            sockets: vec![listening("web")],
            last: true,
        };
        old.send(&message, &[listener.as_fd()], "testing")
            .await
            .expect("send");
        drop(old);
        let taken = receive(new).await;
        let (sockets, handover) = taken.expect("the offer arrived").split();
        assert_eq!(sockets.len(), 1);
        handover
            .ready()
            .await
            .expect("an old relay that is gone is as good as released");
    }

    #[tokio::test]
    async fn a_partial_frame_is_an_error_naming_what_was_read() {
        let (mut raw, mut channel) = raw_pair();
        let bytes = frame(r#"{"message":"released"}"#);
        raw.write_all(&bytes[..7]).expect("write");
        drop(raw);
        let err = channel.recv("testing").await.expect_err("an error");
        assert!(
            err.to_string().contains("closed inside a frame (7 bytes"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_frame_split_across_writes_is_read_whole() {
        let (mut raw, mut channel) = raw_pair();
        let bytes = frame(r#"{"message":"released"}"#);
        let reader =
            tokio::spawn(async move { channel.recv("testing").await.map(|m| m.map(|m| m.0)) });
        for byte in bytes {
            raw.write_all(&[byte]).expect("write");
        }
        let message = reader.await.expect("task").expect("a message");
        assert_eq!(message, Some(Message::Released));
    }

    #[tokio::test]
    async fn bad_json_an_unknown_message_and_a_huge_length_are_refused() {
        for (bytes, expected) in [
            (frame("not json"), "bad handover frame"),
            (frame(r#"{"message":"bye"}"#), "unknown variant `bye`"),
            (
                frame(r#"{"message":"ready","pid":1,"extra":true}"#),
                "unknown field `extra`",
            ),
            (
                u32::MAX.to_be_bytes().to_vec(),
                "more than the 1048576 allowed",
            ),
        ] {
            let (mut raw, mut channel) = raw_pair();
            raw.write_all(&bytes).expect("write");
            let err = channel.recv("testing").await.expect_err("an error");
            assert!(
                err.to_string().contains(expected),
                "expected {expected:?} in {err}"
            );
        }
    }

    #[tokio::test]
    async fn an_offer_whose_descriptors_do_not_match_its_sockets_is_refused() {
        let (old, mut new) = pair();
        let message = Message::Offer {
            version: VERSION,
            pid: 1,
            sockets: vec![listening("a"), listening("b")],
            last: true,
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        old.send(&message, &[listener.as_fd()], "testing")
            .await
            .expect("send");
        let err = new.recv("testing").await.expect_err("an error");
        assert!(
            err.to_string()
                .contains("carried 1 descriptors, expected 2"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn another_protocol_version_is_refused() {
        let (old, new) = pair();
        let message = Message::Offer {
            version: VERSION + 1,
            pid: 1,
            sockets: Vec::new(),
            last: true,
        };
        old.send(&message, &[], "testing").await.expect("send");
        let err = receive(new).await.err().expect("an error");
        assert!(matches!(err, HandoverError::Version { .. }), "{err}");
    }

    #[tokio::test]
    async fn the_socket_file_is_private_replaces_a_stale_one_and_goes_at_drop() {
        let dir = std::env::temp_dir().join(format!("relay-handover-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join("upgrade.sock");
        // A stale socket, as a killed relay leaves it.
        drop(std::os::unix::net::UnixListener::bind(&path).expect("stale socket"));
        let server = Server::bind(&path).expect("a stale socket is replaced");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let err = Server::bind(&path).err().expect("a live socket is in use");
        assert!(matches!(err, HandoverError::InUse { .. }), "{err}");
        drop(server);
        assert!(!path.exists(), "the socket file is removed at drop");
        std::fs::write(&path, "").expect("a plain file");
        let err = Server::bind(&path).err().expect("not a socket");
        assert!(matches!(err, HandoverError::NotASocket { .. }), "{err}");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
