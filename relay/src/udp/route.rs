//! Where a UDP route's sockets come from: the listening socket, bound once
//! (inside the listen address's namespace when it names one), and each
//! session's upstream socket, connected to the target (its name resolved
//! as the session opens; inside the target's namespace, checked again as
//! `forward::namespace` does, so a restarted container is followed).
//!
//! Not here: relaying (`super::UdpRelay`), the grammar (`addr`).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use socket2::{Domain, Protocol, Socket as RawSocket, Type};

use super::OpenUpstream;
use crate::addr::{Host, ListenAddr, ListenEndpoint, TargetAddr, TargetEndpoint, UdpTarget};
use crate::forward::ForwardError;
use crate::forward::namespace::Namespace;

/// Binds the route's UDP socket.
pub async fn bind(addr: &ListenAddr) -> Result<std::net::UdpSocket, ForwardError> {
    let ListenEndpoint::Udp(udp) = &addr.endpoint else {
        return Err(ForwardError::Bind {
            addr: addr.text.clone(),
            resolved: "not UDP".to_string(),
            cause: io::Error::new(io::ErrorKind::InvalidInput, "not a UDP listen address"),
        });
    };
    let socket_addr = crate::forward::listener::resolve(addr, udp).await?;
    let bind_err = |cause| ForwardError::Bind {
        addr: addr.text.clone(),
        resolved: format!("udp {socket_addr}"),
        cause,
    };
    let (reuseaddr, reuseport) = (udp.reuseaddr, udp.reuseport);
    let make = move || -> io::Result<std::net::UdpSocket> {
        let socket = RawSocket::new(
            Domain::for_address(socket_addr),
            Type::DGRAM,
            Some(Protocol::UDP),
        )?;
        socket.set_reuse_address(reuseaddr)?;
        socket.set_reuse_port(reuseport)?;
        socket.set_nonblocking(true)?;
        socket.bind(&socket_addr.into())?;
        Ok(socket.into())
    };
    match &addr.netns {
        None => make(),
        // A socket belongs to the namespace it was made in.
        Some(target) => crate::netns::resolve(target).await?.run_async(make).await?,
    }
    .map_err(bind_err)
}

/// How the route opens a session's upstream socket; the target's namespace
/// is resolved here, once, so that one that does not exist fails the start.
pub async fn upstream(target: &TargetAddr) -> Result<OpenUpstream, ForwardError> {
    let TargetEndpoint::Udp(udp) = &target.endpoint else {
        return Err(ForwardError::Bind {
            addr: target.text.clone(),
            resolved: "not UDP".to_string(),
            cause: io::Error::new(io::ErrorKind::InvalidInput, "not a UDP target"),
        });
    };
    let namespace = match &target.netns {
        Some(ns) => Some(Arc::new(Namespace::resolve(ns.clone()).await?)),
        None => None,
    };
    let udp = Arc::new(udp.clone());
    Ok(Arc::new(move || {
        let (udp, namespace) = (udp.clone(), namespace.clone());
        Box::pin(async move { open(&udp, namespace.as_deref()).await })
    }))
}

async fn open(udp: &UdpTarget, namespace: Option<&Namespace>) -> io::Result<tokio::net::UdpSocket> {
    let peer = resolve(udp).await?;
    let make = move || -> io::Result<std::net::UdpSocket> {
        let local: IpAddr = if peer.is_ipv4() {
            Ipv4Addr::UNSPECIFIED.into()
        } else {
            Ipv6Addr::UNSPECIFIED.into()
        };
        let socket = std::net::UdpSocket::bind(SocketAddr::new(local, 0))?;
        socket.connect(peer)?;
        socket.set_nonblocking(true)?;
        Ok(socket)
    };
    let socket = match namespace {
        None => make()?,
        Some(namespace) => {
            let netns = namespace.current(false).await.map_err(io::Error::other)?;
            netns.run_async(make).await.map_err(io::Error::other)??
        }
    };
    tokio::net::UdpSocket::from_std(socket)
}

/// The target's address now: a name is looked up for every session, so a
/// DNS change is followed.
async fn resolve(udp: &UdpTarget) -> io::Result<SocketAddr> {
    match &udp.host {
        Host::Ip(ip) => Ok(SocketAddr::new(*ip, udp.port)),
        Host::Name(name) => tokio::net::lookup_host((name.as_str(), udp.port))
            .await?
            .find(|sa| udp.family.admits(&sa.ip()))
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{name} has no address of the requested family"),
                )
            }),
    }
}
