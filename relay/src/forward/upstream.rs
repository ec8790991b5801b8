//! Connecting to the target for one accepted client: the host name is
//! resolved for every connection (so a DNS change is followed), each address
//! is tried in turn, and the whole attempt is bounded by the connect timeout.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use thiserror::Error;
use tokio::net::{TcpSocket, TcpStream};

use crate::addr::{Host, TargetAddr};
use crate::metrics::Outcome;

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
}

impl ConnectError {
    pub fn outcome(&self) -> Outcome {
        match self {
            ConnectError::Refused { .. } => Outcome::Refused,
            ConnectError::Timeout { .. } => Outcome::ConnectTimeout,
            ConnectError::Resolve { .. } | ConnectError::Failed { .. } => Outcome::ConnectError,
        }
    }
}

/// Connects to `target`, giving up after `timeout` overall.
pub async fn connect(target: &TargetAddr, timeout: Duration) -> Result<TcpStream, ConnectError> {
    let timeout = target.connect_timeout.unwrap_or(timeout);
    tokio::time::timeout(timeout, connect_any(target))
        .await
        .unwrap_or_else(|_| {
            Err(ConnectError::Timeout {
                target: target.text.clone(),
                after: timeout,
            })
        })
}

async fn connect_any(target: &TargetAddr) -> Result<TcpStream, ConnectError> {
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
        match connect_one(addr, target.keepalive).await {
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

async fn connect_one(addr: SocketAddr, keepalive: bool) -> io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_keepalive(keepalive)?;
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}
