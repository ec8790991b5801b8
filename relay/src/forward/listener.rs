//! Binding the listening socket with the options socat users expect
//! (`reuseaddr`, `reuseport`, `backlog`, `bind=`). Accepting lives in
//! [`super::Forwarder`]; this module only makes the socket.

use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;

use super::ForwardError;
use crate::addr::{Host, ListenAddr};

/// Backlog when the address does not set one: deep enough for connection
/// bursts; the kernel caps it at net.core.somaxconn anyway.
const DEFAULT_BACKLOG: u32 = 4096;

/// Resolves the listen host (once: a listener binds one address) and binds.
pub async fn bind(addr: &ListenAddr) -> Result<TcpListener, ForwardError> {
    let socket_addr = resolve(addr).await?;
    let bind_err = |cause| ForwardError::Bind {
        addr: addr.text.clone(),
        resolved: socket_addr,
        cause,
    };
    let socket = Socket::new(
        Domain::for_address(socket_addr),
        Type::STREAM,
        Some(Protocol::TCP),
    )
    .map_err(bind_err)?;
    socket.set_reuse_address(addr.reuseaddr).map_err(bind_err)?;
    socket.set_reuse_port(addr.reuseport).map_err(bind_err)?;
    socket.set_nonblocking(true).map_err(bind_err)?;
    socket.bind(&socket_addr.into()).map_err(bind_err)?;
    let backlog = addr.backlog.unwrap_or(DEFAULT_BACKLOG).min(i32::MAX as u32) as i32;
    socket.listen(backlog).map_err(bind_err)?;
    TcpListener::from_std(socket.into()).map_err(bind_err)
}

async fn resolve(addr: &ListenAddr) -> Result<SocketAddr, ForwardError> {
    match &addr.host {
        Host::Ip(ip) => Ok(SocketAddr::new(*ip, addr.port)),
        Host::Name(name) => tokio::net::lookup_host((name.as_str(), addr.port))
            .await
            .map_err(|cause| ForwardError::ResolveListen {
                addr: addr.text.clone(),
                cause,
            })?
            .find(|sa| addr.family.admits(&sa.ip()))
            .ok_or_else(|| ForwardError::ResolveListen {
                addr: addr.text.clone(),
                cause: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no address of the requested family",
                ),
            }),
    }
}
