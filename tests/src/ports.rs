//! Ports: picking free ones, and seeing who listens, without connecting.
//!
//! Readiness is read from `/proc/<pid>/net/tcp` and `/proc/<pid>/net/tcp6`,
//! which show the sockets of the network namespace that process lives in.
//! Probing by connecting would be counted by relay's metrics and would
//! consume a one-shot (socat-style, no `fork`) listener.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::wait::poll_until;

/// The kernel's code for TCP_LISTEN in /proc/net/tcp's `st` column.
const TCP_LISTEN: &str = "0A";

/// Where [`free_port`] looks: from here up to the kernel's ephemeral range.
const LOW_PORT: u32 = 10_000;

/// Candidates handed out by this process so far.
static PORTS_TRIED: AtomicU32 = AtomicU32::new(0);

/// A port on 127.0.0.1 that is free right now: nobody bound to it, no
/// connection lingering on it (the probe binds without SO_REUSEADDR). It
/// is taken below the kernel's ephemeral range (ip_local_port_range), so
/// that no outgoing connection, of this test or of one running beside it,
/// can take the port before the test binds it; each call tries the next
/// candidate of a sequence that starts somewhere different per process.
pub fn free_port() -> Result<u16> {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let span = ephemeral_low.saturating_sub(LOW_PORT).max(1_000);
    let seed = std::process::id().wrapping_mul(7919);
    for _ in 0..span {
        let n = PORTS_TRIED.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(LOW_PORT + seed.wrapping_add(n) % span)
            .expect("invariant: LOW_PORT + span < 65536");
        if bindable(port) {
            return Ok(port);
        }
    }
    anyhow::bail!(
        "no free port on 127.0.0.1 between {LOW_PORT} and {}",
        LOW_PORT + span
    )
}

/// Whether 127.0.0.1:`port` can be bound without SO_REUSEADDR: free, and
/// no TIME_WAIT left on it by an earlier test's connections.
fn bindable(port: u16) -> bool {
    let Ok(socket) = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
    else {
        return false;
    };
    socket
        .bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)).into())
        .is_ok()
}

/// A port on 127.0.0.1 that was free a moment ago for UDP and for TCP
/// both (UDP and TCP ports are separate, and a DNS server such as
/// dnsmasq takes the port for both).
pub fn free_udp_port() -> Result<u16> {
    for _ in 0..100 {
        // Below the ephemeral range too: no client socket (a dig's) can
        // take it before the server binds it.
        let port = free_port()?;
        if std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return Ok(port);
        }
    }
    anyhow::bail!("no port free for both UDP and TCP on 127.0.0.1 in 100 tries")
}

/// `n` distinct ports on 127.0.0.1 that were free a moment ago.
pub fn free_ports(n: usize) -> Result<Vec<u16>> {
    let mut ports = Vec::with_capacity(n);
    while ports.len() < n {
        let port = free_port()?;
        if !ports.contains(&port) {
            ports.push(port);
        }
    }
    Ok(ports)
}

/// 127.0.0.1:`port`.
pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// True when a connect to 127.0.0.1:`port` is refused (nobody listens).
pub fn refuses(port: u16) -> bool {
    matches!(
        std::net::TcpStream::connect_timeout(&loopback(port), Duration::from_secs(2)),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

/// Addresses with a socket in LISTEN state on `port`, in `pid`'s network namespace.
pub fn listeners_on(pid: u32, port: u16) -> Result<Vec<IpAddr>> {
    let mut found = Vec::new();
    for table in ["tcp", "tcp6"] {
        let path = format!("/proc/{pid}/net/{table}");
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            // IPv6 may be disabled; a vanished process has no listeners.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {path}")),
        };
        for line in text.lines().skip(1) {
            let mut cols = line.split_whitespace();
            let (Some(_slot), Some(local), Some(_remote), Some(state)) =
                (cols.next(), cols.next(), cols.next(), cols.next())
            else {
                continue;
            };
            if state != TCP_LISTEN {
                continue;
            }
            if let Some((ip, p)) = parse_proc_addr(local)
                && p == port
            {
                found.push(ip);
            }
        }
    }
    Ok(found)
}

/// True when `pid`'s namespace has a LISTEN socket on `port`.
pub fn is_listening(pid: u32, port: u16) -> Result<bool> {
    Ok(!listeners_on(pid, port)?.is_empty())
}

/// Poll until `pid`'s namespace has a LISTEN socket on `port`.
pub fn wait_listening(pid: u32, port: u16, timeout: Duration) -> Result<()> {
    poll_until(
        &format!("a LISTEN socket on port {port} (pid {pid})"),
        timeout,
        || Ok(is_listening(pid, port)?.then_some(())),
    )
}

/// Poll until `pid`'s namespace has no LISTEN socket on `port` any more.
pub fn wait_not_listening(pid: u32, port: u16, timeout: Duration) -> Result<()> {
    poll_until(
        &format!("the LISTEN socket on port {port} to close (pid {pid})"),
        timeout,
        || Ok((!is_listening(pid, port)?).then_some(())),
    )
}

/// Parse `0100007F:1F90` (IPv4) or 32 hex digits `:PORT` (IPv6), as the
/// kernel prints them: each 32-bit word in host (little-endian) byte order.
fn parse_proc_addr(field: &str) -> Option<(IpAddr, u16)> {
    let (ip_hex, port_hex) = field.split_once(':')?;
    let port = u16::from_str_radix(port_hex, 16).ok()?;
    let words: Vec<u32> = (0..ip_hex.len() / 8)
        .map(|i| u32::from_str_radix(&ip_hex[i * 8..i * 8 + 8], 16).map(u32::from_be))
        .collect::<Result<_, _>>()
        .ok()?;
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_be_bytes()).collect();
    let ip = match bytes.len() {
        4 => IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])),
        16 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(bytes.as_slice()).ok()?)),
        _ => return None,
    };
    Some((ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn parses_kernel_ipv4_and_ipv6_listen_addresses() {
        assert_eq!(
            parse_proc_addr("0100007F:1F90"),
            Some((IpAddr::V4(Ipv4Addr::LOCALHOST), 8080))
        );
        assert_eq!(
            parse_proc_addr("00000000000000000000000001000000:0050"),
            Some((IpAddr::V6(Ipv6Addr::LOCALHOST), 80))
        );
    }

    #[test]
    fn sees_own_listener_without_connecting() -> Result<()> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let port = listener.local_addr()?.port();
        assert_eq!(
            listeners_on(std::process::id(), port)?,
            vec![IpAddr::V4(Ipv4Addr::LOCALHOST)]
        );
        drop(listener);
        assert!(!is_listening(std::process::id(), port)?);
        Ok(())
    }
}
