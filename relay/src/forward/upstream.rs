//! Connecting to the target for one accepted client, for every endpoint
//! kind: a TCP host name is resolved for every connection (so a DNS change
//! is followed) and each address tried in turn; a UNIX path is connected
//! as the host sees it (inside a container, through `/proc/<pid>/root`),
//! an abstract name from inside the target's network namespace; STDIO is
//! there already. A target through a proxy (SOCKS, HTTP CONNECT) is the
//! proxy's TCP address plus the handshake (`via_proxy`). Each attempt is
//! bounded by the connect timeout; socat's `retry=`/`forever` repeat a
//! failed one.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use prometheus::IntCounter;
use thiserror::Error;
use tokio::net::{TcpSocket, TcpStream, UnixStream};

use super::exec::{self, Child};
use super::namespace::Namespace;
use super::stdio::Stdio;
use super::stream::Socket;
use super::via_proxy::{self, ProxyError};
use crate::addr::{Host, TargetAddr, TargetEndpoint, TcpTarget, UnixName};
use crate::forward::metrics::Outcome;
use crate::netns::{Netns, NetnsError};

#[derive(Debug, Error)]
pub enum ConnectError {
    #[error("{addr} refused the connection")]
    Refused { addr: String },
    #[error("cannot connect to {path}: {cause}{hint}", hint = unix_hint(cause))]
    Unix { path: String, cause: io::Error },
    #[error("cannot connect to {addr}: {cause}")]
    Vsock {
        addr: crate::addr::VsockAddress,
        cause: io::Error,
    },
    #[error("cannot open {path}: {cause}")]
    File { path: String, cause: io::Error },
    #[error("cannot start {program}: {cause}")]
    Spawn { program: String, cause: io::Error },
    #[error("no answer from {target} within {after:?}")]
    Timeout { target: String, after: Duration },
    #[error("cannot resolve {host}: {cause}")]
    Resolve { host: String, cause: io::Error },
    #[error("cannot connect to {addr}: {cause}")]
    Failed { addr: SocketAddr, cause: io::Error },
    #[error("{target} through the proxy at {proxy}: {cause}")]
    Proxy {
        proxy: String,
        target: String,
        cause: ProxyError,
    },
    #[error("target namespace unavailable: {0}")]
    Namespace(#[from] NetnsError),
}

impl ConnectError {
    pub fn outcome(&self) -> Outcome {
        match self {
            ConnectError::Refused { .. }
            | ConnectError::Proxy {
                cause: ProxyError::Refused(_),
                ..
            } => Outcome::Refused,
            ConnectError::Timeout { .. } => Outcome::ConnectTimeout,
            ConnectError::Resolve { .. }
            | ConnectError::Failed { .. }
            | ConnectError::Unix { .. }
            | ConnectError::Spawn { .. }
            | ConnectError::File { .. }
            | ConnectError::Vsock { .. }
            | ConnectError::Proxy { .. } => Outcome::ConnectError,
            ConnectError::Namespace(_) => Outcome::NamespaceUnavailable,
        }
    }
}

/// Connects to `target` (from inside `namespace` when it has one), each
/// attempt bounded by `timeout`; a failed attempt is repeated as the
/// address's `retry=`/`forever` says, after its `interval=`, each repeat
/// counted in `retries`.
pub async fn connect(
    target: &TargetAddr,
    namespace: Option<&Namespace>,
    timeout: Duration,
    retries: &IntCounter,
) -> Result<(Socket, Option<Child>), ConnectError> {
    let mut attempts = 1;
    loop {
        match connect_once(target, namespace, timeout).await {
            Err(err) if target.retry.again_after(attempts) => {
                tracing::debug!(target = %target.text, error = %err, attempts,
                    retry_in_ms = target.retry.interval.as_millis() as u64, "connect failed; retrying");
                tokio::time::sleep(target.retry.interval).await;
                retries.inc();
                attempts += 1;
            }
            done => return done,
        }
    }
}

/// One connect attempt, giving up after `timeout`.
async fn connect_once(
    target: &TargetAddr,
    namespace: Option<&Namespace>,
    timeout: Duration,
) -> Result<(Socket, Option<Child>), ConnectError> {
    if let TargetEndpoint::Exec(spec) = &target.endpoint {
        // A program is started, not connected to: no namespace, no timeout.
        return exec::spawn(spec)
            .map(|(socket, child)| (socket, Some(child)))
            .map_err(|cause| ConnectError::Spawn {
                program: spec.argv.join(" "),
                cause,
            });
    }
    let timeout = target.connect_timeout.unwrap_or(timeout);
    let attempt = async {
        let Some(namespace) = namespace else {
            return connect_in(target, None).await;
        };
        match connect_in(target, Some(&*namespace.current(false).await?)).await {
            // Refused or unreachable in a namespace that may have just been
            // replaced (container restart): check it now and try once more.
            Err(
                ConnectError::Refused { .. }
                | ConnectError::Failed { .. }
                | ConnectError::Unix { .. },
            ) => connect_in(target, Some(&*namespace.current(true).await?)).await,
            done => done,
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map(|connected| connected.map(|socket| (socket, None)))
        .unwrap_or_else(|_| {
            Err(ConnectError::Timeout {
                target: target.text.clone(),
                after: timeout,
            })
        })
}

/// One attempt, inside `netns` when the target names one.
async fn connect_in(target: &TargetAddr, netns: Option<&Netns>) -> Result<Socket, ConnectError> {
    match &target.endpoint {
        TargetEndpoint::Tcp(tcp) => {
            let mut stream = connect_any(tcp, netns).await?;
            if let Some(hop) = &tcp.proxy {
                via_proxy::handshake(&mut stream, hop)
                    .await
                    .map_err(|cause| ConnectError::Proxy {
                        proxy: format!("{}:{}", tcp.host, tcp.port),
                        target: format!("{}:{}", hop.host, hop.port),
                        cause,
                    })?;
            }
            Ok(Socket::Tcp(stream))
        }
        TargetEndpoint::Unix(name) => connect_unix(name, netns).await.map(Socket::Unix),
        TargetEndpoint::Stdio(mode) => Ok(Socket::Stdio(Stdio::new(*mode))),
        TargetEndpoint::Vsock(vsock) => {
            tokio_vsock::VsockStream::connect(tokio_vsock::VsockAddr::new(vsock.cid, vsock.port))
                .await
                .map(Socket::Vsock)
                .map_err(|cause| ConnectError::Vsock {
                    addr: *vsock,
                    cause,
                })
        }
        TargetEndpoint::File(spec) => {
            super::file::open(spec)
                .await
                .map_err(|cause| ConnectError::File {
                    path: spec.path.display().to_string(),
                    cause,
                })
        }
        TargetEndpoint::Exec(_) => unreachable!("connect starts EXEC targets before connecting"),
        TargetEndpoint::Udp(_) => {
            unreachable!(
                "a UDP target pairs with a UDP listener only (addr::check_datagram_pair), which udp::UdpRelay serves"
            )
        }
    }
}

async fn connect_unix(name: &UnixName, netns: Option<&Netns>) -> Result<UnixStream, ConnectError> {
    match name {
        UnixName::Path(path) => {
            // A path lives in a mount namespace: a container's is reached
            // through its init process's root.
            let path = super::listener::host_path(path, netns.and_then(Netns::pid));
            UnixStream::connect(&path)
                .await
                .map_err(|cause| unix_error(path.display().to_string(), cause))
        }
        UnixName::Abstract(name) => {
            let shown = format!("@{name}");
            let abstract_addr = {
                use std::os::linux::net::SocketAddrExt;
                std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            }
            .map_err(|cause| unix_error(shown.clone(), cause))?;
            // The abstract namespace is the network namespace's: connect
            // from a thread inside it. A UNIX connect does not wait on the
            // network; it completes or fails at once.
            let connect = move || {
                let stream = std::os::unix::net::UnixStream::connect_addr(&abstract_addr)?;
                stream.set_nonblocking(true)?;
                Ok::<_, io::Error>(stream)
            };
            let stream = match netns {
                None => tokio::task::spawn_blocking(connect)
                    .await
                    .map_err(io::Error::other)
                    .and_then(|r| r),
                Some(netns) => netns.run_async(connect).await?,
            }
            .map_err(|cause| unix_error(shown.clone(), cause))?;
            UnixStream::from_std(stream).map_err(|cause| unix_error(shown, cause))
        }
    }
}

fn unix_error(path: String, cause: io::Error) -> ConnectError {
    if cause.kind() == io::ErrorKind::ConnectionRefused {
        ConnectError::Refused { addr: path }
    } else {
        ConnectError::Unix { path, cause }
    }
}

fn unix_hint(cause: &io::Error) -> &'static str {
    match cause.kind() {
        io::ErrorKind::NotFound => {
            " (no socket there: is the server running, and is the path the one it listens on?)"
        }
        io::ErrorKind::PermissionDenied => {
            " (the socket file's mode or owner keeps relay out: run relay as a user allowed to connect)"
        }
        _ => "",
    }
}

async fn connect_any(tcp: &TcpTarget, netns: Option<&Netns>) -> Result<TcpStream, ConnectError> {
    let target = tcp;
    let addrs: Vec<SocketAddr> = match &target.host {
        Host::Ip(ip) => vec![SocketAddr::new(*ip, target.port)],
        Host::Name(name) => tokio::net::lookup_host((name.as_str(), target.port))
            .await
            .map_err(|cause| ConnectError::Resolve {
                host: name.clone(),
                cause,
            })?
            .filter(|sa| target.family.admits(&sa.ip()))
            .collect(),
    };
    let mut last = None;
    for addr in addrs {
        match connect_one(addr, target, netns).await {
            Ok(stream) => return Ok(stream),
            Err(cause) if cause.kind() == io::ErrorKind::ConnectionRefused => {
                last = Some(ConnectError::Refused {
                    addr: addr.to_string(),
                })
            }
            Err(cause) => last = Some(ConnectError::Failed { addr, cause }),
        }
    }
    Err(last.unwrap_or_else(|| ConnectError::Resolve {
        host: target.host.to_string(),
        cause: io::Error::new(
            io::ErrorKind::NotFound,
            "no address of the requested family",
        ),
    }))
}

async fn connect_one(
    addr: SocketAddr,
    target: &TcpTarget,
    netns: Option<&Netns>,
) -> io::Result<TcpStream> {
    let socket = match netns {
        None if addr.is_ipv4() => TcpSocket::new_v4()?,
        None => TcpSocket::new_v6()?,
        // A socket belongs to the namespace it was created in: make it on
        // a thread inside the target's, connect it from here.
        Some(netns) => {
            let stream = netns
                .run_async(move || -> io::Result<std::net::TcpStream> {
                    let socket = socket2::Socket::new(
                        socket2::Domain::for_address(addr),
                        socket2::Type::STREAM,
                        Some(socket2::Protocol::TCP),
                    )?;
                    socket.set_nonblocking(true)?;
                    Ok(socket.into())
                })
                .await
                .map_err(io::Error::other)??;
            TcpSocket::from_std_stream(stream)
        }
    };
    socket.set_keepalive(target.keepalive)?;
    target.buffers.apply(&socket2::SockRef::from(&socket))?;
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}
