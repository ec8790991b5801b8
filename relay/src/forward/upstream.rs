//! Connecting to the target for one accepted client: the host name is
//! resolved for every connection (so a DNS change is followed), each address
//! is tried in turn, and the whole attempt is bounded by the connect timeout.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use thiserror::Error;
use tokio::net::{TcpSocket, TcpStream};

use super::namespace::Namespace;
use crate::addr::{Host, TargetAddr};
use crate::forward::metrics::Outcome;
use crate::netns::{Netns, NetnsError};

#[derive(Debug, Error)]
pub enum ConnectError {
    #[error("{addr} refused the connection")]
    Refused { addr: SocketAddr },
    #[error("no answer from {target} within {after:?}")]
    Timeout { target: String, after: Duration },
    #[error("cannot resolve {host}: {cause}")]
    Resolve { host: String, cause: io::Error },
    #[error("cannot connect to {addr}: {cause}")]
    Failed { addr: SocketAddr, cause: io::Error },
    #[error("target namespace unavailable: {0}")]
    Namespace(#[from] NetnsError),
}

impl ConnectError {
    pub fn outcome(&self) -> Outcome {
        match self {
            ConnectError::Refused { .. } => Outcome::Refused,
            ConnectError::Timeout { .. } => Outcome::ConnectTimeout,
            ConnectError::Resolve { .. } | ConnectError::Failed { .. } => Outcome::ConnectError,
            ConnectError::Namespace(_) => Outcome::NamespaceUnavailable,
        }
    }
}

/// Connects to `target` (from inside `namespace` when it has one), giving
/// up after `timeout` overall.
pub async fn connect(
    target: &TargetAddr,
    namespace: Option<&Namespace>,
    timeout: Duration,
) -> Result<TcpStream, ConnectError> {
    let timeout = target.connect_timeout.unwrap_or(timeout);
    let attempt = async {
        let Some(namespace) = namespace else {
            return connect_any(target, None).await;
        };
        match connect_any(target, Some(&*namespace.current(false).await?)).await {
            // Refused or unreachable in a namespace that may have just been
            // replaced (container restart): check it now and try once more.
            Err(ConnectError::Refused { .. } | ConnectError::Failed { .. }) => {
                connect_any(target, Some(&*namespace.current(true).await?)).await
            }
            done => done,
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| {
            Err(ConnectError::Timeout {
                target: target.text.clone(),
                after: timeout,
            })
        })
}

async fn connect_any(
    target: &TargetAddr,
    netns: Option<&Netns>,
) -> Result<TcpStream, ConnectError> {
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
        match connect_one(addr, target.keepalive, netns).await {
            Ok(stream) => return Ok(stream),
            Err(cause) if cause.kind() == io::ErrorKind::ConnectionRefused => {
                last = Some(ConnectError::Refused { addr })
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
    keepalive: bool,
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
    socket.set_keepalive(keepalive)?;
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}
