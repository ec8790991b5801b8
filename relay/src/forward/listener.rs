//! Binding the listening socket with the options socat users expect
//! (`reuseaddr`, `reuseport`, `backlog`, `bind=`), inside the listen
//! address's namespace when it names one (`...@container:app`). Accepting
//! lives in [`super::Forwarder`]; this module only makes the socket.

use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;

use super::ForwardError;
use crate::addr::{Host, ListenAddr};

/// Backlog when the address does not set one: deep enough for connection
/// bursts; the kernel caps it at net.core.somaxconn anyway.
const DEFAULT_BACKLOG: u32 = 4096;

/// Resolves the listen host (once: a listener binds one address) and binds,
/// inside the address's namespace when it has one.
pub async fn bind(addr: &ListenAddr) -> Result<TcpListener, ForwardError> {
    let socket_addr = resolve(addr).await?;
    let bind_err = |cause| ForwardError::Bind {
        addr: addr.text.clone(),
        resolved: socket_addr,
        cause,
    };
    let (reuseaddr, reuseport) = (addr.reuseaddr, addr.reuseport);
    let backlog = addr.backlog.unwrap_or(DEFAULT_BACKLOG).min(i32::MAX as u32) as i32;
    let listen = move || listening_socket(socket_addr, reuseaddr, reuseport, backlog);
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

fn listening_socket(
    socket_addr: SocketAddr,
    reuseaddr: bool,
    reuseport: bool,
    backlog: i32,
) -> std::io::Result<Socket> {
    let socket = Socket::new(
        Domain::for_address(socket_addr),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket.set_reuse_address(reuseaddr)?;
    socket.set_reuse_port(reuseport)?;
    socket.set_nonblocking(true)?;
    socket.bind(&socket_addr.into())?;
    socket.listen(backlog)?;
    Ok(socket)
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
