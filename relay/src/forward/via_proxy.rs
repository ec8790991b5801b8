//! The handshake on a connection to a proxy (socat's SOCKS4, SOCKS4A,
//! SOCKS5-CONNECT and PROXY addresses): once it succeeds the socket is a
//! plain TCP stream to the target, relayed on any data path.
//!
//! SOCKS is tokio-socks's (it reads exactly the reply's bytes). HTTP
//! CONNECT is written here: the reply head must be consumed to its blank
//! line and not one byte further, because a server that speaks first
//! (SMTP, SSH, a Redis error) may have its first bytes in the same
//! segment, and those belong to the client. The head is found with
//! `peek`, then only it is read; `httparse` parses it.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use base64::Engine;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_socks::TargetAddr;
use tokio_socks::tcp::{Socks4Stream, Socks5Stream};

use crate::addr::{Host, ProxyAuth, ProxyHop, ProxyProtocol};

/// The longest reply head accepted from an HTTP proxy.
const MAX_HEAD: usize = 16 * 1024;

#[derive(Debug, Error)]
pub enum ProxyError {
    /// The proxy answered and said no (the target refused, is unreachable,
    /// or the proxy's rules or credentials do not allow it).
    #[error("{0}")]
    Refused(String),
    /// The proxy did not speak the protocol, or the connection failed.
    #[error("{0}")]
    Failed(String),
}

/// Asks the proxy at the other end of `stream` to connect on to the hop's
/// host and port, and returns once it has.
pub async fn handshake(stream: &mut TcpStream, hop: &ProxyHop) -> Result<(), ProxyError> {
    match &hop.protocol {
        ProxyProtocol::Socks4 { user } => {
            let ip = resolve_v4(&hop.host, hop.port).await?;
            let target = TargetAddr::Ip(SocketAddr::new(ip.into(), hop.port));
            socks4(stream, target, &ProxyProtocol::socks_user(user)).await
        }
        ProxyProtocol::Socks4a { user } => {
            socks4(stream, socks_target(hop), &ProxyProtocol::socks_user(user)).await
        }
        ProxyProtocol::Socks5 => Socks5Stream::connect_with_socket(&mut *stream, socks_target(hop))
            .await
            .map(drop)
            .map_err(socks_error),
        ProxyProtocol::HttpConnect { auth, resolve } => {
            let authority = match (&hop.host, resolve) {
                (Host::Name(_), true) => {
                    format!("{}:{}", resolve_v4(&hop.host, hop.port).await?, hop.port)
                }
                (host, _) => format!("{host}:{}", hop.port),
            };
            let credentials = match auth {
                None => None,
                Some(ProxyAuth::Inline(text)) => Some(text.clone()),
                Some(ProxyAuth::File(path)) => Some(
                    tokio::fs::read_to_string(path)
                        .await
                        .map_err(|e| {
                            ProxyError::Failed(format!(
                                "cannot read proxy credentials from {}: {e}",
                                path.display()
                            ))
                        })?
                        .trim_end_matches(['\r', '\n'])
                        .to_string(),
                ),
            };
            http_connect(stream, &authority, credentials.as_deref()).await
        }
    }
}

/// The hop as SOCKS names it: an address, or a name the server resolves
/// (SOCKS 4A, SOCKS 5).
fn socks_target(hop: &ProxyHop) -> TargetAddr<'_> {
    match &hop.host {
        Host::Ip(ip) => TargetAddr::Ip(SocketAddr::new(*ip, hop.port)),
        Host::Name(name) => TargetAddr::Domain(name.as_str().into(), hop.port),
    }
}

/// SOCKS 4 to an address, or SOCKS 4A to a name.
async fn socks4(
    stream: &mut TcpStream,
    target: TargetAddr<'_>,
    user: &str,
) -> Result<(), ProxyError> {
    // tokio-socks refuses an empty user id; without one it sends none.
    let result = if user.is_empty() {
        Socks4Stream::connect_with_socket(&mut *stream, target).await
    } else {
        Socks4Stream::connect_with_userid_and_socket(&mut *stream, target, user).await
    };
    result.map(drop).map_err(socks_error)
}

fn socks_error(err: tokio_socks::Error) -> ProxyError {
    use tokio_socks::Error as E;
    match err {
        E::GeneralSocksServerFailure
        | E::ConnectionNotAllowedByRuleset
        | E::NetworkUnreachable
        | E::HostUnreachable
        | E::ConnectionRefused
        | E::TtlExpired
        | E::IdentdAuthFailure
        | E::InvalidUserIdAuthFailure
        | E::NoAcceptableAuthMethods
        | E::PasswordAuthFailure(_) => {
            ProxyError::Refused(format!("the SOCKS server refused: {err}"))
        }
        other => ProxyError::Failed(format!("SOCKS handshake failed: {other}")),
    }
}

/// The host's first IPv4 address (SOCKS 4 and socat's `resolve` carry
/// nothing else).
async fn resolve_v4(host: &Host, port: u16) -> Result<Ipv4Addr, ProxyError> {
    let found = match host {
        Host::Ip(IpAddr::V4(ip)) => return Ok(*ip),
        Host::Ip(IpAddr::V6(ip)) => {
            return Err(ProxyError::Failed(format!(
                "{ip} is IPv6; this proxy protocol carries IPv4 only"
            )));
        }
        Host::Name(name) => tokio::net::lookup_host((name.as_str(), port))
            .await
            .map_err(|e| ProxyError::Failed(format!("cannot resolve {name}: {e}")))?
            .find_map(|sa| match sa.ip() {
                IpAddr::V4(ip) => Some(ip),
                IpAddr::V6(_) => None,
            }),
    };
    found.ok_or_else(|| {
        ProxyError::Failed(format!(
            "{host} has no IPv4 address (use SOCKS4A or SOCKS5-CONNECT to let the proxy resolve it)"
        ))
    })
}

async fn http_connect(
    stream: &mut TcpStream,
    authority: &str,
    credentials: Option<&str>,
) -> Result<(), ProxyError> {
    let io = |e: std::io::Error| ProxyError::Failed(format!("HTTP proxy: {e}"));
    stream
        .write_all(connect_request(authority, credentials).as_bytes())
        .await
        .map_err(io)?;
    let mut head = Vec::new();
    let mut buf = vec![0u8; MAX_HEAD];
    loop {
        let seen = stream.peek(&mut buf).await.map_err(io)?;
        if seen == 0 {
            return Err(ProxyError::Failed(
                "the HTTP proxy closed the connection before answering CONNECT".into(),
            ));
        }
        let before = head.len();
        head.extend_from_slice(&buf[..seen]);
        // Consume what belongs to the head: up to its end if it is here,
        // else everything seen (none of it can be past the head yet).
        let take = match head_end(&head) {
            Some(end) => end - before,
            None => seen,
        };
        head.truncate(before + take);
        stream.read_exact(&mut buf[..take]).await.map_err(io)?;
        if head_end(&head).is_some() {
            return reply_status(&head);
        }
        if head.len() >= MAX_HEAD {
            return Err(ProxyError::Failed(format!(
                "the HTTP proxy's reply head is longer than {MAX_HEAD} bytes"
            )));
        }
    }
}

/// The CONNECT request for `authority` (`host:port`, IPv6 in brackets).
fn connect_request(authority: &str, credentials: Option<&str>) -> String {
    let mut request = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
    if let Some(credentials) = credentials {
        let encoded = base64::engine::general_purpose::STANDARD.encode(credentials);
        request.push_str(&format!("Proxy-Authorization: Basic {encoded}\r\n"));
    }
    request.push_str("\r\n");
    request
}

/// Where the reply head ends (just past its blank line), taking a bare NL
/// as a line end too (socat's `ignorecr`).
fn head_end(bytes: &[u8]) -> Option<usize> {
    let mut line_start = 0;
    for (i, b) in bytes.iter().enumerate() {
        if *b == b'\n' {
            let line = &bytes[line_start..i];
            if line.is_empty() || line == b"\r" {
                return Some(i + 1);
            }
            line_start = i + 1;
        }
    }
    None
}

/// Success for a 2xx reply; the status line otherwise.
fn reply_status(head: &[u8]) -> Result<(), ProxyError> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) | Err(_) => {
            let first =
                String::from_utf8_lossy(head.split(|b| *b == b'\n').next().unwrap_or_default());
            return Err(ProxyError::Failed(format!(
                "the HTTP proxy's reply is not HTTP: `{}`",
                first.trim_end()
            )));
        }
    }
    let code = response.code.unwrap_or_default();
    if (200..300).contains(&code) {
        Ok(())
    } else {
        Err(ProxyError::Refused(format!(
            "the HTTP proxy answered CONNECT with {code} {}",
            response.reason.unwrap_or_default()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_names_the_target_and_carries_basic_credentials() {
        assert_eq!(
            connect_request("db.internal:5432", None),
            "CONNECT db.internal:5432 HTTP/1.1\r\nHost: db.internal:5432\r\n\r\n"
        );
        assert_eq!(
            connect_request("[::1]:80", Some("user:pass")),
            "CONNECT [::1]:80 HTTP/1.1\r\nHost: [::1]:80\r\nProxy-Authorization: Basic dXNlcjpwYXNz\r\n\r\n"
        );
    }

    #[test]
    fn the_head_ends_at_the_blank_line_and_not_after_it() {
        let reply = b"HTTP/1.1 200 Connection established\r\nVia: x\r\n\r\n+OK banner";
        let end = head_end(reply).unwrap();
        assert_eq!(&reply[end..], b"+OK banner");
        assert_eq!(head_end(b"HTTP/1.0 200 OK\n\nSSH-2.0"), Some(17));
        assert_eq!(head_end(b"HTTP/1.1 200 OK\r\nVia: x\r\n"), None);
        assert_eq!(head_end(b""), None);
    }

    #[test]
    fn only_a_2xx_reply_lets_the_connection_through() {
        reply_status(b"HTTP/1.1 200 Connection established\r\n\r\n").unwrap();
        reply_status(b"HTTP/1.0 200 OK\n\n").unwrap();
        let err = reply_status(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n").unwrap_err();
        assert!(
            matches!(&err, ProxyError::Refused(m) if m.contains("403 Forbidden")),
            "{err}"
        );
        let err = reply_status(b"SSH-2.0-OpenSSH\r\n\r\n").unwrap_err();
        assert!(
            matches!(&err, ProxyError::Failed(m) if m.contains("SSH-2.0-OpenSSH")),
            "{err}"
        );
    }

    /// The reply head arrives in pieces and the target's first bytes share
    /// its last segment: the handshake reads the head and leaves them.
    #[tokio::test]
    async fn bytes_after_the_reply_head_stay_in_the_stream() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let proxy = tokio::spawn(async move {
            let (mut peer, _) = listener.accept().await.unwrap();
            let mut request = vec![0u8; 1024];
            let n = peer.read(&mut request).await.unwrap();
            peer.write_all(b"HTTP/1.1 200 Conn").await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            peer.write_all(b"ection established\r\n\r\n220 smtp ready\r\n")
                .await
                .unwrap();
            String::from_utf8(request[..n].to_vec()).unwrap()
        });
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let hop = ProxyHop {
            protocol: ProxyProtocol::HttpConnect {
                auth: None,
                resolve: false,
            },
            host: Host::Name("mail.internal".into()),
            port: 25,
        };
        handshake(&mut stream, &hop).await.unwrap();
        let mut rest = vec![0u8; 16];
        let n = stream.read(&mut rest).await.unwrap();
        assert_eq!(&rest[..n], b"220 smtp ready\r\n");
        assert!(
            proxy
                .await
                .unwrap()
                .starts_with("CONNECT mail.internal:25 HTTP/1.1\r\n")
        );
    }
}
