//! Address grammar: the URL form (`host:port`, `[v6]:port`, `tcp://host:port`)
//! and the socat form (`TCP-LISTEN:8080,fork,reuseaddr`, `TCP:host:80,nodelay`),
//! parsed into one [`ListenAddr`] or [`TargetAddr`].
//!
//! This module only parses; it resolves no names and opens no sockets. Every
//! error names the token that is wrong and what was expected, because users
//! paste these strings out of socat scripts.
//!
//! This file holds the parsed types and the pair checks; the grammar lives in
//! one submodule per concern: `keywords` (socat's address keywords and
//! types), `lex` (tokens and options), `options` (options several kinds
//! share), and one per address family (`listen`, `target`, `unix`, `udp`).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use crate::netns::Target;
use std::time::Duration;

use ipnet::IpNet;
use thiserror::Error;

/// A host as written: an IP literal, or a name resolved later (per connection
/// for targets, so a DNS change is followed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    Ip(IpAddr),
    Name(String),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            Host::Ip(ip) => write!(f, "{ip}"),
            Host::Name(name) => f.write_str(name),
        }
    }
}

/// Which address family an address may resolve to (socat's `TCP4`/`TCP6`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Family {
    #[default]
    Any,
    V4,
    V6,
}

impl Family {
    pub fn admits(self, ip: &IpAddr) -> bool {
        match self {
            Family::Any => true,
            Family::V4 => ip.is_ipv4(),
            Family::V6 => ip.is_ipv6(),
        }
    }
}

/// Where the relay listens, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenAddr {
    pub endpoint: ListenEndpoint,
    pub backlog: Option<u32>,
    /// `max-children=`: open connections at most (the route's
    /// `max_connections` unless that is set explicitly).
    pub max_children: Option<u32>,
    /// Serve one connection and exit: socat's listen address without `fork`.
    pub once: bool,
    /// TLS termination (`tls://`, `OPENSSL-LISTEN:`).
    pub tls: Option<TlsListen>,
    /// Listen inside this namespace (`...@container:web`, socat `netns=`).
    pub netns: Option<Target>,
    /// The address as the user wrote it, for logs and the default route name.
    pub text: String,
    /// socat's `crlf`: NL written to this side goes as CR NL, and CRs read
    /// from it are dropped (socat's conversion, byte for byte).
    pub crlf: bool,
}

/// What kind of socket a route listens on. `Udp` is the one datagram
/// kind: it pairs with a UDP target only ([`check_route`]), and the
/// supervisor runs such a route with `udp::UdpRelay`, not a forwarder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenEndpoint {
    Tcp(TcpListen),
    Unix(UnixListen),
    /// stdin/stdout as the one client (`STDIO`, `-`, `STDIN`, `STDOUT`).
    Stdio(StdioMode),
    /// A file as the one client (`OPEN:`, `CREATE:`, `GOPEN:`, `PIPE:`).
    File(FileSpec),
    /// An AF_VSOCK listener (`VSOCK-LISTEN:<port>`), on every CID of this
    /// machine unless `cid=` names one.
    Vsock(VsockAddress),
    /// Two connect addresses (`relay TCP:a:1 TCP:b:2`, `relay EXEC:cmd
    /// TCP:b:2`): the first is connected to (or started) once, at start,
    /// and is the route's one client.
    Connect(Box<TargetAddr>),
    /// A UDP socket (`UDP-LISTEN:`, `udp://`): host, port, family and the
    /// reuse flags mean what they mean for TCP; there is no backlog.
    Udp(TcpListen),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpListen {
    pub host: Host,
    pub port: u16,
    pub family: Family,
    pub reuseaddr: bool,
    pub reuseport: bool,
    /// `range=`: only clients inside one of these networks are served;
    /// empty admits every client.
    pub range: Vec<IpNet>,
    /// `keepalive`: SO_KEEPALIVE on every accepted connection.
    pub keepalive: bool,
    pub buffers: SocketBuffers,
}

/// A VSOCK context id and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VsockAddress {
    pub cid: u32,
    pub port: u32,
}

impl fmt::Display for VsockAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "vsock:{}:{}", self.cid, self.port)
    }
}

/// socat's `sndbuf=` / `rcvbuf=`: SO_SNDBUF / SO_RCVBUF in bytes, which
/// also turns the kernel's autotuning off for that buffer. `None`: the
/// kernel's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SocketBuffers {
    pub send: Option<u32>,
    pub recv: Option<u32>,
}

impl SocketBuffers {
    /// Sets them on a socket not connected or listening yet.
    pub fn apply(&self, socket: &socket2::SockRef<'_>) -> std::io::Result<()> {
        if let Some(size) = self.send {
            socket.set_send_buffer_size(size as usize)?;
        }
        if let Some(size) = self.recv {
            socket.set_recv_buffer_size(size as usize)?;
        }
        Ok(())
    }
}

impl TcpListen {
    /// Whether `range=` lets this client in. An IPv4 client of a dual-stack
    /// listener arrives as `::ffff:a.b.c.d` and is matched as IPv4.
    pub fn admits(&self, client: IpAddr) -> bool {
        let client = client.to_canonical();
        self.range.is_empty() || self.range.iter().any(|net| net.contains(&client))
    }
}

/// A UNIX stream socket to listen on, with socat's file options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixListen {
    pub name: UnixName,
    /// Remove a socket file left at the path before binding.
    pub unlink_early: bool,
    /// Remove the socket file when the route closes (socat's default).
    pub unlink_close: bool,
    /// `mode=`: permission bits of the socket file (octal, as socat).
    pub mode: Option<u32>,
    /// `user=`: owner of the socket file (name or uid).
    pub user: Option<String>,
    /// `group=`: group of the socket file (name or gid).
    pub group: Option<String>,
}

/// A UNIX socket address: a file system path, or a name in the abstract
/// namespace (which belongs to a network namespace, not the file system).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum UnixName {
    Path(PathBuf),
    Abstract(String),
}

impl fmt::Display for UnixName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UnixName::Path(path) => write!(f, "{}", path.display()),
            UnixName::Abstract(name) => write!(f, "@{name}"),
        }
    }
}

/// Which of stdin and stdout a STDIO address uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StdioMode {
    /// `STDIO`, `-`: read stdin, write stdout.
    Both,
    /// `STDIN`: read stdin; what the peer sends is discarded.
    In,
    /// `STDOUT`: write stdout; stdin is not read (the peer sees EOF at once).
    Out,
}

/// Where the relay connects for each accepted client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetAddr {
    pub endpoint: TargetEndpoint,
    /// Per-address `connect-timeout=`; overrides `--connect-timeout`.
    pub connect_timeout: Option<Duration>,
    /// `retry=`, `interval=`, `forever`: how failed connects are repeated.
    pub retry: Retry,
    /// TLS origination (`tls://`, `OPENSSL:`).
    pub tls: Option<TlsTarget>,
    /// Connect from inside this namespace (`...@container:web`, socat `netns=`).
    pub netns: Option<Target>,
    pub text: String,
    /// socat's `crlf`, as [`ListenAddr::crlf`].
    pub crlf: bool,
}

/// socat's connect retries: after a failed attempt, wait `interval` and
/// try again, `retries` more times (`None`: for ever, socat's `forever`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    pub retries: Option<u32>,
    pub interval: Duration,
}

impl Retry {
    /// One attempt, no retry: socat's default.
    pub const NONE: Retry = Retry {
        retries: Some(0),
        interval: DEFAULT_RETRY_INTERVAL,
    };

    /// Whether another attempt follows attempt number `done` (1-based).
    pub fn again_after(&self, done: u32) -> bool {
        self.retries.is_none_or(|n| done <= n)
    }
}

/// socat's `interval=` default.
pub const DEFAULT_RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// What kind of socket a route connects to for each client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetEndpoint {
    Tcp(TcpTarget),
    Unix(UnixName),
    /// stdin/stdout as the target of the one client.
    Stdio(StdioMode),
    /// A file opened for each client (`OPEN:`, `CREATE:`, `GOPEN:`, `PIPE:`).
    File(FileSpec),
    /// An AF_VSOCK peer (`VSOCK-CONNECT:<cid>:<port>`): a VM's host or
    /// guest, an enclave.
    Vsock(VsockAddress),
    /// A program started for each client, its stdin and stdout the
    /// connection (`EXEC:`, `SYSTEM:`).
    Exec(ExecSpec),
    /// A UDP peer (`UDP:`, `udp://`), one connected socket per client session.
    Udp(UdpTarget),
}

/// A UDP target: its host is resolved as each session opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpTarget {
    pub host: Host,
    pub port: u16,
    pub family: Family,
}

/// A program to run per connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecSpec {
    /// The program and its arguments: `EXEC:` split at spaces (no shell,
    /// as socat), `SYSTEM:` as `/bin/sh -c <command>`.
    pub argv: Vec<String>,
    /// `stderr`: the child's stderr goes into the connection too (a dup of
    /// its stdout, as socat's option); without it, to relay's stderr.
    pub stderr_to_peer: bool,
    /// `pty`: the child's stdin, stdout and stderr are a new terminal
    /// (its controlling one) instead of a socket pair.
    pub pty: bool,
    /// With `pty`: `raw` and `echo=` for that terminal.
    pub raw: bool,
    pub echo: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpTarget {
    pub host: Host,
    pub port: u16,
    pub family: Family,
    pub keepalive: bool,
    pub buffers: SocketBuffers,
    /// Through a proxy (socat's `SOCKS4`, `SOCKS4A`, `SOCKS5-CONNECT`,
    /// `PROXY`): `host` and `port` above are the proxy's, and the proxy is
    /// asked to connect on to the hop's.
    pub proxy: Option<ProxyHop>,
}

/// Where a proxy is asked to connect, and how it is asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyHop {
    pub protocol: ProxyProtocol,
    pub host: Host,
    pub port: u16,
}

/// The proxy protocols relay speaks as a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyProtocol {
    /// SOCKS 4: relay resolves the host (to IPv4; the protocol carries
    /// nothing else), as socat does.
    Socks4 { user: Option<String> },
    /// SOCKS 4A: the proxy resolves a host name.
    Socks4a { user: Option<String> },
    /// SOCKS 5 without authentication: names and IPv6 go to the proxy.
    Socks5,
    /// HTTP `CONNECT`; `resolve`: send the host's IPv4 address instead of
    /// its name (socat's `resolve`).
    HttpConnect {
        auth: Option<ProxyAuth>,
        resolve: bool,
    },
}

impl ProxyProtocol {
    /// The SOCKS user id sent (`socksuser=`, else socat's default: the
    /// login name from `$LOGNAME` or `$USER`, if any).
    pub fn socks_user(user: &Option<String>) -> String {
        user.clone()
            .or_else(|| std::env::var("LOGNAME").ok())
            .or_else(|| std::env::var("USER").ok())
            .unwrap_or_default()
    }
}

/// HTTP proxy credentials (`user:password`, sent as Basic).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyAuth {
    /// `proxy-authorization=` / `proxyauth=`: written in the address.
    Inline(String),
    /// `proxy-authorization-file=`: read when each connection is made, so
    /// the secret stays out of the process list and can be rotated.
    File(PathBuf),
}

impl ListenAddr {
    /// `endpoint` as written in `input`, and nothing else: no backlog or
    /// child limit, no TLS, no namespace, no `crlf`; `once` for a socat
    /// address (one connection unless `fork`), not for a URL form.
    pub(crate) fn new(endpoint: ListenEndpoint, input: &str, once: bool) -> Self {
        ListenAddr {
            endpoint,
            backlog: None,
            max_children: None,
            once,
            tls: None,
            netns: None,
            text: input.to_string(),
            crlf: false,
        }
    }

    /// The TCP side of a TCP listener.
    pub fn tcp(&self) -> Option<&TcpListen> {
        match &self.endpoint {
            ListenEndpoint::Tcp(tcp) => Some(tcp),
            _ => None,
        }
    }

    pub fn is_stdio(&self) -> bool {
        matches!(self.endpoint, ListenEndpoint::Stdio(_))
    }

    /// A UDP listener: its route relays datagrams, not a stream.
    pub fn is_udp(&self) -> bool {
        matches!(self.endpoint, ListenEndpoint::Udp(_))
    }

    /// The file of a file address (`OPEN:`, `CREATE:` ...) written first.
    pub fn file(&self) -> Option<&FileSpec> {
        match &self.endpoint {
            ListenEndpoint::File(spec) => Some(spec),
            _ => None,
        }
    }

    /// socat's `-4` / `-6`: an IP listener that names no family takes
    /// this one, and without `bind=` listens on all of its addresses.
    pub fn default_family(&mut self, family: Family) {
        if let ListenEndpoint::Tcp(ip) | ListenEndpoint::Udp(ip) = &mut self.endpoint
            && ip.family == Family::Any
        {
            ip.family = family;
            if family == Family::V6 && ip.host == Host::Ip(Ipv4Addr::UNSPECIFIED.into()) {
                ip.host = Host::Ip(Ipv6Addr::UNSPECIFIED.into());
            }
        }
    }
}

impl TargetAddr {
    /// `endpoint` as written in `input`, and nothing else: one connect
    /// attempt, no TLS, no namespace, no `crlf`.
    pub(crate) fn new(endpoint: TargetEndpoint, input: &str) -> Self {
        TargetAddr {
            endpoint,
            connect_timeout: None,
            retry: Retry::NONE,
            tls: None,
            netns: None,
            text: input.to_string(),
            crlf: false,
        }
    }

    /// The TCP side of a TCP target.
    pub fn tcp(&self) -> Option<&TcpTarget> {
        match &self.endpoint {
            TargetEndpoint::Tcp(tcp) => Some(tcp),
            _ => None,
        }
    }

    /// The host a TLS target is reached at (the SNI default); a non-TCP
    /// target has none.
    pub fn host(&self) -> Option<&Host> {
        self.tcp().map(|t| &t.host)
    }

    pub fn is_stdio(&self) -> bool {
        matches!(self.endpoint, TargetEndpoint::Stdio(_))
    }

    pub fn is_udp(&self) -> bool {
        matches!(self.endpoint, TargetEndpoint::Udp(_))
    }

    /// The file of a file target (`OPEN:`, `CREATE:` ...).
    pub fn file(&self) -> Option<&FileSpec> {
        match &self.endpoint {
            TargetEndpoint::File(spec) => Some(spec),
            _ => None,
        }
    }

    /// socat's `-4` / `-6`: an IP target that names no family resolves
    /// to this one only.
    pub fn default_family(&mut self, family: Family) {
        let own = match &mut self.endpoint {
            TargetEndpoint::Tcp(tcp) => &mut tcp.family,
            TargetEndpoint::Udp(udp) => &mut udp.family,
            _ => return,
        };
        if *own == Family::Any {
            *own = family;
        }
    }
}

/// TLS settings written into a listen address (socat's `OPENSSL-LISTEN`
/// options); command-line flags fill what is left unset.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsListen {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// `cafile=`/`capath=`: roots that client certificates must chain to.
    pub ca: Option<PathBuf>,
    /// Demand a client certificate: socat's `verify`, 1 by default on
    /// `OPENSSL-LISTEN`; the URL form asks for none unless told.
    pub verify_clients: bool,
}

/// TLS settings written into a target address (socat's `OPENSSL` options).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsTarget {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// `snihost=`
    pub sni: Option<String>,
    /// `no-sni`
    pub no_sni: bool,
    /// `commonname=`: the name checked in the certificate.
    pub name: Option<String>,
    /// `verify=0` turns verification off.
    pub verify: bool,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum AddrError {
    #[error("`{input}`: {problem}")]
    Invalid { input: String, problem: String },
}

fn invalid(input: &str, problem: impl Into<String>) -> AddrError {
    AddrError::Invalid {
        input: input.to_string(),
        problem: problem.into(),
    }
}

mod file;
mod keywords;
mod lex;
mod listen;
mod options;
mod proxy;
mod target;
mod udp;
mod unix;
mod vsock;

use keywords::*;
use lex::*;
use listen::*;
use options::*;
use proxy::*;
use udp::*;
use unix::*;

pub use file::{Access, FileKind, FileSpec};
pub use keywords::address_types;
pub use listen::parse_listen;
pub use target::parse_target;
pub use udp::check_datagram_pair;

/// Checks what one address cannot know about the other: STDIO is one
/// client, so a listener in front of it cannot `fork`, and STDIO on both
/// sides relays nothing.
pub fn check_route(listen: &ListenAddr, target: &TargetAddr) -> Result<(), AddrError> {
    check_datagram_pair(listen, target)?;
    if listen.is_stdio() && target.is_stdio() {
        return Err(invalid(
            &target.text,
            "STDIO on both sides relays nothing; one address must be a socket (for example `TCP:host:port`)",
        ));
    }
    if target.is_stdio() && !listen.once {
        return Err(invalid(
            &listen.text,
            "STDIO as the target serves one client: drop `fork` (stdin and stdout cannot be shared between connections)",
        ));
    }
    Ok(())
}

/// The two addresses of the socat form, in either order: socat does not
/// care which comes first, so `relay TCP:host:port -` works like
/// `relay - TCP:host:port`. The first address is taken as the listener
/// when it can be one; else the second, if it can, and the first connects;
/// else, when both connect (`relay TCP:a:1 TCP:b:2`), the first is
/// connected to once at start and the second for it.
pub fn parse_pair(first: &str, second: &str) -> Result<(ListenAddr, TargetAddr), AddrError> {
    let forward = parse_listen(first).and_then(|l| parse_target(second).map(|t| (l, t)));
    let pair = match forward {
        Ok(pair) => pair,
        Err(err) => match (parse_listen(second), parse_target(first)) {
            (Ok(listen), Ok(target)) => (listen, target),
            (Err(_), Ok(connect)) => match parse_target(second) {
                Ok(target) => (first_connect(connect)?, target),
                Err(_) => return Err(err),
            },
            _ => return Err(err),
        },
    };
    check_route(&pair.0, &pair.1)?;
    Ok(pair)
}

/// The first of two connect addresses, as the route's one client.
fn first_connect(connect: TargetAddr) -> Result<ListenAddr, AddrError> {
    let refuse = |why: &str| Err(invalid(&connect.text, why));
    if connect.tls.is_some() {
        return refuse(
            "OPENSSL as the first of two connect addresses is not supported: write it second (`relay TCP:a:1 OPENSSL:b:443`)",
        );
    }
    if connect.is_udp() {
        return refuse(
            "UDP as the first of two connect addresses is not supported: relay relays UDP from a UDP-LISTEN",
        );
    }
    Ok(ListenAddr {
        text: connect.text.clone(),
        crlf: connect.crlf,
        endpoint: ListenEndpoint::Connect(Box::new(connect)),
        backlog: None,
        max_children: None,
        once: true,
        tls: None,
        netns: None,
    })
}

#[cfg(test)]
mod tests;
