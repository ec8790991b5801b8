//! Making the listening socket, and accepting from it, for every endpoint
//! kind: TCP with the options socat users expect (`reuseaddr`,
//! `reuseport`, `backlog`, `bind=`), UNIX with socat's file options
//! (`unlink-early`, `unlink-close`, `mode=`, `user=`, `group=`), and stdin/
//! stdout as a listener that "accepts" once. A TCP or abstract socket is
//! made inside the address's network namespace when it names one; a socket
//! path inside a container is reached through `/proc/<pid>/root`.
//!
//! The accept loop lives in [`super::Forwarder`]; this module owns the
//! socket and, for a UNIX path, its file ([`SocketFile`]: removed when the
//! last handle on the socket closes, so a reload that hands the socket to a
//! changed route keeps it, and a removed route takes it away).

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket as RawSocket, Type};
use tokio::net::{TcpListener, UnixListener};

use super::ForwardError;
use super::exec::Child;
use super::stdio::Stdio;
use super::stream::Socket;
use crate::addr::{Host, ListenAddr, ListenEndpoint, StdioMode, TcpListen, UnixListen, UnixName};
use crate::netns::Target;

/// Backlog when the address does not set one: deep enough for connection
/// bursts; the kernel caps it at net.core.somaxconn anyway.
const DEFAULT_BACKLOG: u32 = 4096;

/// Who connected, as the log line names them.
#[derive(Debug, Clone)]
pub enum Peer {
    Tcp(SocketAddr),
    /// SO_PEERCRED of the connecting process, when the kernel gives it.
    Unix {
        pid: Option<i32>,
        uid: Option<u32>,
    },
    Stdio,
    /// The file of a file address written first.
    File,
    /// The first of two connect addresses.
    First,
    Vsock {
        cid: u32,
        port: u32,
    },
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Tcp(addr) => write!(f, "{addr}"),
            Peer::Unix { pid, uid } => {
                f.write_str("unix")?;
                if let Some(pid) = pid {
                    write!(f, " pid={pid}")?;
                }
                if let Some(uid) = uid {
                    write!(f, " uid={uid}")?;
                }
                Ok(())
            }
            Peer::Stdio => f.write_str("stdio"),
            Peer::File => f.write_str("file"),
            Peer::First => f.write_str("first address"),
            Peer::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
        }
    }
}

/// A UNIX socket's file, removed (when `unlink` says so) once nothing holds
/// the socket any more, and only if the path still names the socket relay
/// made (not one a later process bound there).
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    identity: (u64, u64),
    unlink: bool,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| (m.dev(), m.ino()) == self.identity);
        if self.unlink && ours {
            match std::fs::remove_file(&self.path) {
                Ok(()) => tracing::debug!(path = %self.path.display(), "socket file removed"),
                Err(err) => {
                    tracing::warn!(path = %self.path.display(), error = %err, "cannot remove the socket file")
                }
            }
        }
    }
}

/// A bound, listening route socket.
pub enum Listener {
    Tcp(TcpListener),
    Unix {
        socket: UnixListener,
        name: String,
        file: Option<Arc<SocketFile>>,
    },
    /// stdin/stdout: one "connection", then nothing more.
    Stdio(Option<StdioMode>),
    /// A file, opened at bind (so a bad path fails at start): one
    /// "connection", then nothing more.
    File(Option<Socket>),
    /// An AF_VSOCK listener.
    Vsock(tokio_vsock::VsockListener),
    /// The first of two connect addresses, connected to (or started, for
    /// EXEC) at bind: one "connection", then nothing more.
    Connected(Option<Socket>, Option<Box<Child>>),
}

/// Another handle on a listening socket, for a reload's changed route.
#[derive(Debug)]
pub enum Handle {
    Tcp(std::net::TcpListener),
    Unix {
        socket: std::os::unix::net::UnixListener,
        name: String,
        file: Option<Arc<SocketFile>>,
    },
    /// A UDP route's socket (served by `udp::UdpRelay`, not a forwarder).
    Udp(std::net::UdpSocket),
}

impl Handle {
    pub fn try_clone(&self) -> io::Result<Handle> {
        Ok(match self {
            Handle::Tcp(l) => Handle::Tcp(l.try_clone()?),
            Handle::Unix { socket, name, file } => Handle::Unix {
                socket: socket.try_clone()?,
                name: name.clone(),
                file: file.clone(),
            },
            Handle::Udp(s) => Handle::Udp(s.try_clone()?),
        })
    }

    /// Where it listens, for messages.
    pub fn describe(&self) -> String {
        match self {
            Handle::Tcp(l) => l
                .local_addr()
                .map_or_else(|_| "a TCP socket".to_string(), |a| a.to_string()),
            Handle::Unix { name, .. } => name.clone(),
            Handle::Udp(s) => s
                .local_addr()
                .map_or_else(|_| "a UDP socket".to_string(), |a| format!("udp {a}")),
        }
    }
}

impl Listener {
    /// Takes over a socket another forwarder listens on.
    pub fn adopt(handle: Handle) -> io::Result<Listener> {
        Ok(match handle {
            Handle::Tcp(l) => {
                l.set_nonblocking(true)?;
                Listener::Tcp(TcpListener::from_std(l)?)
            }
            Handle::Unix { socket, name, file } => {
                socket.set_nonblocking(true)?;
                Listener::Unix {
                    socket: UnixListener::from_std(socket)?,
                    name,
                    file,
                }
            }
            Handle::Udp(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "a UDP socket cannot serve a stream route",
                ));
            }
        })
    }

    /// Another handle on the socket; `None` for stdin/stdout, which cannot
    /// be handed over.
    pub fn handle(&self) -> io::Result<Option<Handle>> {
        Ok(match self {
            Listener::Tcp(l) => Some(Handle::Tcp(socket2::SockRef::from(l).try_clone()?.into())),
            Listener::Unix { socket, name, file } => Some(Handle::Unix {
                socket: socket2::SockRef::from(socket).try_clone()?.into(),
                name: name.clone(),
                file: file.clone(),
            }),
            // A VSOCK listener is bound again by a reload that changes it.
            Listener::Stdio(_)
            | Listener::File(_)
            | Listener::Connected(..)
            | Listener::Vsock(_) => None,
        })
    }

    /// Where it listens: `127.0.0.1:8080`, `/run/x.sock`, `@name`, `stdio`.
    pub fn local(&self) -> io::Result<String> {
        match self {
            Listener::Tcp(l) => l.local_addr().map(|a| a.to_string()),
            Listener::Unix { name, .. } => Ok(name.clone()),
            Listener::Stdio(_) => Ok("stdio".to_string()),
            Listener::File(_) => Ok("file".to_string()),
            Listener::Vsock(l) => l
                .local_addr()
                .map(|a| format!("vsock:{}:{}", a.cid(), a.port())),
            Listener::Connected(..) => Ok("(connected to the first address)".to_string()),
        }
    }

    /// The next client. stdin/stdout is one, once; after it this waits for ever.
    pub async fn accept(&mut self) -> io::Result<(Socket, Peer)> {
        match self {
            Listener::Tcp(l) => {
                let (stream, peer) = l.accept().await?;
                Ok((Socket::Tcp(stream), Peer::Tcp(peer)))
            }
            Listener::Unix { socket, .. } => {
                let (stream, _) = socket.accept().await?;
                let (pid, uid) = stream
                    .peer_cred()
                    .map_or((None, None), |c| (c.pid(), Some(c.uid())));
                Ok((Socket::Unix(stream), Peer::Unix { pid, uid }))
            }
            Listener::Stdio(mode) => match mode.take() {
                Some(mode) => Ok((Socket::Stdio(Stdio::new(mode)), Peer::Stdio)),
                None => std::future::pending().await,
            },
            Listener::File(file) => match file.take() {
                Some(file) => Ok((file, Peer::File)),
                None => std::future::pending().await,
            },
            Listener::Vsock(l) => {
                let (stream, peer) = l.accept().await?;
                Ok((
                    Socket::Vsock(stream),
                    Peer::Vsock {
                        cid: peer.cid(),
                        port: peer.port(),
                    },
                ))
            }
            Listener::Connected(socket, _) => match socket.take() {
                Some(socket) => Ok((socket, Peer::First)),
                None => std::future::pending().await,
            },
        }
    }
}

impl Listener {
    /// The program started for the first of two connect addresses (EXEC
    /// first), once its connection has been accepted: the connection reaps it.
    pub fn take_child(&mut self) -> Option<Child> {
        match self {
            Listener::Connected(None, child) => child.take().map(|child| *child),
            _ => None,
        }
    }
}

/// Binds the route's listening socket; for the first of two connect
/// addresses, connects to it (each attempt bounded by `connect_timeout`,
/// repeats counted in `retries`).
pub async fn bind(
    addr: &ListenAddr,
    connect_timeout: Duration,
    retries: &prometheus::IntCounter,
) -> Result<Listener, ForwardError> {
    let backlog = addr.backlog.unwrap_or(DEFAULT_BACKLOG).min(i32::MAX as u32) as i32;
    match &addr.endpoint {
        ListenEndpoint::Connect(first) => {
            connect_first(addr, first, connect_timeout, retries).await
        }
        ListenEndpoint::Tcp(tcp) => bind_tcp(addr, tcp, backlog).await.map(Listener::Tcp),
        ListenEndpoint::Unix(unix) => bind_unix(addr, unix, backlog).await,
        ListenEndpoint::Stdio(mode) => Ok(Listener::Stdio(Some(*mode))),
        ListenEndpoint::Vsock(vsock) => {
            tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(vsock.cid, vsock.port))
                .map(Listener::Vsock)
                .map_err(|cause| ForwardError::Bind {
                    addr: addr.text.clone(),
                    resolved: vsock.to_string(),
                    cause,
                })
        }
        ListenEndpoint::File(spec) => super::file::open(spec)
            .await
            .map(|file| Listener::File(Some(file)))
            .map_err(|cause| ForwardError::File {
                addr: addr.text.clone(),
                path: spec.path.clone(),
                cause,
            }),
        ListenEndpoint::Udp(_) => Err(ForwardError::Bind {
            addr: addr.text.clone(),
            resolved: "udp".to_string(),
            cause: io::Error::new(
                io::ErrorKind::InvalidInput,
                "a UDP listener relays datagrams (udp::UdpRelay), not a stream",
            ),
        }),
    }
}

/// The first of two connect addresses, reached once, in its namespace if
/// it names one.
async fn connect_first(
    addr: &ListenAddr,
    first: &crate::addr::TargetAddr,
    connect_timeout: Duration,
    retries: &prometheus::IntCounter,
) -> Result<Listener, ForwardError> {
    let namespace = match &first.netns {
        Some(target) => Some(super::namespace::Namespace::resolve(target.clone()).await?),
        None => None,
    };
    let (socket, child) =
        super::upstream::connect(first, namespace.as_ref(), connect_timeout, retries)
            .await
            .map_err(|cause| ForwardError::First {
                addr: addr.text.clone(),
                cause: Box::new(cause),
            })?;
    Ok(Listener::Connected(Some(socket), child.map(Box::new)))
}

/// Resolves the listen host (once: a listener binds one address) and binds,
/// inside the address's namespace when it has one.
async fn bind_tcp(
    addr: &ListenAddr,
    tcp: &TcpListen,
    backlog: i32,
) -> Result<TcpListener, ForwardError> {
    let socket_addr = resolve(addr, tcp).await?;
    let bind_err = |cause| ForwardError::Bind {
        addr: addr.text.clone(),
        resolved: socket_addr.to_string(),
        cause,
    };
    let tcp = tcp.clone();
    let listen = move || listening_socket(socket_addr, &tcp, backlog);
    let socket = match &addr.netns {
        None => listen(),
        // A socket belongs to the namespace it was created in: bind it on a
        // thread inside the target's (127.0.0.1 there is the namespace's
        // own loopback), accept from here.
        Some(target) => {
            crate::netns::resolve(target)
                .await?
                .run_async(listen)
                .await?
        }
    }
    .map_err(bind_err)?;
    TcpListener::from_std(socket.into()).map_err(bind_err)
}

/// The listening socket, with the options accepted connections inherit
/// from it (SO_KEEPALIVE, SO_SNDBUF, SO_RCVBUF).
fn listening_socket(
    socket_addr: SocketAddr,
    tcp: &TcpListen,
    backlog: i32,
) -> io::Result<RawSocket> {
    let socket = RawSocket::new(
        Domain::for_address(socket_addr),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket.set_reuse_address(tcp.reuseaddr)?;
    socket.set_reuse_port(tcp.reuseport)?;
    socket.set_keepalive(tcp.keepalive)?;
    tcp.buffers.apply(&socket2::SockRef::from(&socket))?;
    socket.set_nonblocking(true)?;
    socket.bind(&socket_addr.into())?;
    socket.listen(backlog)?;
    Ok(socket)
}

/// The one address a listener binds (a UDP listener's too).
pub(crate) async fn resolve(
    addr: &ListenAddr,
    tcp: &TcpListen,
) -> Result<SocketAddr, ForwardError> {
    match &tcp.host {
        Host::Ip(ip) => Ok(SocketAddr::new(*ip, tcp.port)),
        Host::Name(name) => tokio::net::lookup_host((name.as_str(), tcp.port))
            .await
            .map_err(|cause| ForwardError::ResolveListen {
                addr: addr.text.clone(),
                cause,
            })?
            .find(|sa| tcp.family.admits(&sa.ip()))
            .ok_or_else(|| ForwardError::ResolveListen {
                addr: addr.text.clone(),
                cause: io::Error::new(
                    io::ErrorKind::NotFound,
                    "no address of the requested family",
                ),
            }),
    }
}

/// Where a socket path is, seen from relay: the path itself, or inside the
/// mount namespace of a container or process, `/proc/<pid>/root/<path>`.
pub(super) fn host_path(path: &Path, pid: Option<u32>) -> PathBuf {
    match pid {
        None => path.to_path_buf(),
        Some(pid) => {
            let relative = path.strip_prefix("/").unwrap_or(path);
            PathBuf::from(format!("/proc/{pid}/root")).join(relative)
        }
    }
}

/// The pid whose mount namespace a path lives in: a container's or a
/// process's. (The parser refuses `netns=` beside a path; the host's own
/// namespace needs no detour.)
pub(super) async fn path_pid(netns: Option<&Target>) -> Result<Option<u32>, ForwardError> {
    match netns {
        None | Some(Target::Host) => Ok(None),
        Some(target) => Ok(crate::netns::resolve(target).await?.pid()),
    }
}

async fn bind_unix(
    addr: &ListenAddr,
    unix: &UnixListen,
    backlog: i32,
) -> Result<Listener, ForwardError> {
    let bind_err = |resolved: String| {
        let text = addr.text.clone();
        move |cause| ForwardError::Bind {
            addr: text,
            resolved,
            cause,
        }
    };
    match &unix.name {
        UnixName::Abstract(name) => {
            let abstract_addr = {
                use std::os::linux::net::SocketAddrExt;
                std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            }
            .map_err(bind_err(format!("@{name}")))?;
            let listen = move || std::os::unix::net::UnixListener::bind_addr(&abstract_addr);
            // The abstract namespace belongs to the network namespace the
            // socket is made in.
            let socket = match &addr.netns {
                None => listen(),
                Some(target) => {
                    crate::netns::resolve(target)
                        .await?
                        .run_async(listen)
                        .await?
                }
            }
            .map_err(bind_err(format!("@{name}")))?;
            let socket = finish_listening(socket, backlog).map_err(bind_err(format!("@{name}")))?;
            Ok(Listener::Unix {
                socket,
                name: format!("@{name}"),
                file: None,
            })
        }
        UnixName::Path(path) => {
            let pid = path_pid(addr.netns.as_ref()).await?;
            let real = host_path(path, pid);
            let shown = real.display().to_string();
            prepare_path(addr, &real, unix.unlink_early)?;
            let socket = std::os::unix::net::UnixListener::bind(&real).map_err(|cause| {
                if cause.kind() == io::ErrorKind::AddrInUse {
                    stale_or_busy(addr, &real)
                } else {
                    bind_err(shown.clone())(cause)
                }
            })?;
            let meta = std::fs::symlink_metadata(&real).map_err(bind_err(shown.clone()))?;
            // From here the file is ours: dropping the guard removes it again
            // if what follows fails.
            let file = Arc::new(SocketFile {
                path: real.clone(),
                identity: (meta.dev(), meta.ino()),
                unlink: unix.unlink_close,
            });
            apply_file_options(addr, unix, &real)?;
            let socket = finish_listening(socket, backlog).map_err(bind_err(shown.clone()))?;
            Ok(Listener::Unix {
                socket,
                name: shown,
                file: Some(file),
            })
        }
    }
}

fn finish_listening(
    socket: std::os::unix::net::UnixListener,
    backlog: i32,
) -> io::Result<UnixListener> {
    // std listens with the kernel's maximum; listen(2) again sets ours.
    socket2::SockRef::from(&socket).listen(backlog)?;
    socket.set_nonblocking(true)?;
    UnixListener::from_std(socket)
}

/// What is at the path before binding: nothing (fine), a socket (removed
/// with `unlink-early`; else the bind reports it), or something else,
/// which relay never removes.
fn prepare_path(addr: &ListenAddr, path: &Path, unlink_early: bool) -> Result<(), ForwardError> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    let bad = |problem: String| ForwardError::SocketPath {
        addr: addr.text.clone(),
        path: path.to_path_buf(),
        problem,
    };
    if !meta.file_type().is_socket() {
        return Err(bad(
            "exists and is not a socket; relay removes only socket files (not even with unlink-early): choose another path or remove it".into(),
        ));
    }
    if unlink_early {
        std::fs::remove_file(path)
            .map_err(|e| bad(format!("cannot remove it (unlink-early): {e}")))?;
    }
    Ok(())
}

/// A socket file is already there and the bind said EADDRINUSE: tell a
/// stale file (nobody accepts on it) from one in use. The kernel's table
/// of UNIX sockets says who listens, without connecting (a probe would be
/// a connection the other server logs and counts).
fn stale_or_busy(addr: &ListenAddr, path: &Path) -> ForwardError {
    let problem = if listens_here(path) {
        "another process listens on this socket: stop it or choose another path"
    } else {
        "a socket file is already there and nothing in this network namespace listens on it (a process that exited left it): add unlink-early to remove it first, as socat needs too, or remove it"
    };
    ForwardError::SocketPath {
        addr: addr.text.clone(),
        path: path.to_path_buf(),
        problem: problem.to_string(),
    }
}

/// Whether `/proc/net/unix` lists a listening socket bound to `path`.
fn listens_here(path: &Path) -> bool {
    /// `__SO_ACCEPTCON`: the socket listens.
    const ACCEPTING: &str = "00010000";
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    let path = path.to_string_lossy();
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() >= 8 && fields[3] == ACCEPTING && fields[7] == path
    })
}

/// `mode=`, `user=`, `group=` on the socket file.
fn apply_file_options(
    addr: &ListenAddr,
    unix: &UnixListen,
    path: &Path,
) -> Result<(), ForwardError> {
    let bad = |problem: String| ForwardError::SocketPath {
        addr: addr.text.clone(),
        path: path.to_path_buf(),
        problem,
    };
    if let Some(mode) = unix.mode {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| bad(format!("cannot set mode={mode:o}: {e}")))?;
    }
    let uid = match &unix.user {
        None => None,
        Some(user) => Some(match user.parse::<u32>() {
            Ok(uid) => nix::unistd::Uid::from_raw(uid),
            Err(_) => nix::unistd::User::from_name(user)
                .ok()
                .flatten()
                .map(|u| u.uid)
                .ok_or_else(|| bad(format!("user={user}: no such user on this host (give a name from /etc/passwd or a uid)")))?,
        }),
    };
    let gid = match &unix.group {
        None => None,
        Some(group) => Some(match group.parse::<u32>() {
            Ok(gid) => nix::unistd::Gid::from_raw(gid),
            Err(_) => nix::unistd::Group::from_name(group)
                .ok()
                .flatten()
                .map(|g| g.gid)
                .ok_or_else(|| bad(format!("group={group}: no such group on this host (give a name from /etc/group or a gid)")))?,
        }),
    };
    if uid.is_some() || gid.is_some() {
        nix::unistd::chown(path, uid, gid)
            .map_err(|e| bad(format!("cannot change the owner (user=/group=): {e}")))?;
    }
    Ok(())
}
