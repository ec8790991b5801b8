//! The socat address keywords relay knows (`TCP-LISTEN`, `UNIX-CONNECT`,
//! ...), each mapped to a [`Kind`], the option lists each kind takes (for
//! error messages), and socat's other address types with what to use instead.

use super::*;

pub(super) const LISTEN_OPTIONS: &str = "fork, reuseaddr, reuseport, bind=<addr>, backlog=<n>, max-children=<n>, range=<cidr> (repeatable), nodelay, keepalive, sndbuf=<bytes>, rcvbuf=<bytes>, netns=, container=, pid=";

pub(super) const TLS_LISTEN_OPTIONS: &str = "cert=, key=, cafile=, capath=, verify=0|1";

pub(super) const UNIX_LISTEN_OPTIONS: &str = "fork, unlink-early, unlink-close=0|1, mode=<octal>, user=<name|uid>, group=<name|gid>, backlog=<n>, max-children=<n>, netns=, container=, pid=";

pub(super) const CONNECT_OPTIONS: &str = "connect-timeout=<seconds>, retry=<n>, interval=<seconds>, forever, nodelay, keepalive, sndbuf=<bytes>, rcvbuf=<bytes>, netns=, container=, pid=";

pub(super) const TLS_CONNECT_OPTIONS: &str =
    "cafile=, capath=, cert=, key=, snihost=, no-sni, commonname=, verify=0|1";

pub(super) const UNIX_CONNECT_OPTIONS: &str =
    "connect-timeout=<seconds>, retry=<n>, interval=<seconds>, forever, netns=, container=, pid=";

pub(super) const SOCKS4_OPTIONS: &str = "socksport=<port> (default 1080), socksuser=<user>";

pub(super) const SOCKS5_OPTIONS: &str = "socksport=<port> (default 1080)";

pub(super) const HTTP_PROXY_OPTIONS: &str = "proxyport=<port> (default 8080), proxy-authorization=<user>:<password> (proxyauth=), proxy-authorization-file=<path>, resolve, ignorecr";

pub(super) const EXEC_OPTIONS: &str = "stderr, pty (with raw, echo=0|1, ctty, setsid)";

pub(super) const UDP_LISTEN_OPTIONS: &str =
    "fork, reuseaddr, so-reuseport, bind=<addr>, netns=, container=, pid=";

pub(super) const UDP_CONNECT_OPTIONS: &str = "netns=, container=, pid=";

pub(super) const VSOCK_LISTEN_OPTIONS: &str = "fork, max-children=<n>, backlog=<n>, cid=<n>";

pub(super) const VSOCK_CONNECT_OPTIONS: &str =
    "connect-timeout=<seconds>, retry=<n>, interval=<seconds>, forever";

/// The socat address types relay speaks, by what they make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    TcpListen(Family),
    TlsListen,
    UnixListen,
    AbstractListen,
    TcpConnect(Family),
    TlsConnect,
    UnixConnect,
    AbstractConnect,
    /// Either side: stdin/stdout.
    Stdio(StdioMode),
    /// A program per connection; `shell`: SYSTEM (through /bin/sh -c).
    Exec {
        shell: bool,
    },
    UdpListen(Family),
    UdpConnect(Family),
    /// Either side: a file, a named pipe, a terminal.
    File(FileKind),
    VsockListen,
    VsockConnect,
    /// TCP through a proxy: `SOCKS4`, `SOCKS4A`, `SOCKS5-CONNECT`, `PROXY`.
    ProxyConnect(Via),
}

/// Which proxy protocol a proxied connect address speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Via {
    Socks4,
    Socks4a,
    Socks5,
    Http,
}

impl Kind {
    pub(super) fn listens(self) -> bool {
        matches!(
            self,
            Kind::TcpListen(_)
                | Kind::TlsListen
                | Kind::UnixListen
                | Kind::AbstractListen
                | Kind::Stdio(_)
                | Kind::File(_)
                | Kind::UdpListen(_)
                | Kind::VsockListen
        )
    }

    pub(super) fn connects(self) -> bool {
        !self.listens() || matches!(self, Kind::Stdio(_) | Kind::File(_))
    }
}

/// Every socat keyword relay takes (case-insensitive, as socat's are).
pub(super) const KEYWORDS: &[(&str, Kind)] = &[
    ("tcp-listen", Kind::TcpListen(Family::Any)),
    ("tcp-l", Kind::TcpListen(Family::Any)),
    ("tcp4-listen", Kind::TcpListen(Family::V4)),
    ("tcp4-l", Kind::TcpListen(Family::V4)),
    ("tcp6-listen", Kind::TcpListen(Family::V6)),
    ("tcp6-l", Kind::TcpListen(Family::V6)),
    ("openssl-listen", Kind::TlsListen),
    ("ssl-l", Kind::TlsListen),
    ("unix-listen", Kind::UnixListen),
    ("unix-l", Kind::UnixListen),
    ("abstract-listen", Kind::AbstractListen),
    ("tcp", Kind::TcpConnect(Family::Any)),
    ("tcp-connect", Kind::TcpConnect(Family::Any)),
    ("tcp4", Kind::TcpConnect(Family::V4)),
    ("tcp4-connect", Kind::TcpConnect(Family::V4)),
    ("tcp6", Kind::TcpConnect(Family::V6)),
    ("tcp6-connect", Kind::TcpConnect(Family::V6)),
    ("openssl", Kind::TlsConnect),
    ("ssl", Kind::TlsConnect),
    ("openssl-connect", Kind::TlsConnect),
    ("unix-connect", Kind::UnixConnect),
    // socat's UNIX-CLIENT falls back to a datagram socket when a stream
    // connect fails; relay routes streams, so it is a stream connect here.
    ("unix-client", Kind::UnixConnect),
    ("unix", Kind::UnixConnect),
    ("abstract-connect", Kind::AbstractConnect),
    ("abstract-client", Kind::AbstractConnect),
    ("stdio", Kind::Stdio(StdioMode::Both)),
    ("-", Kind::Stdio(StdioMode::Both)),
    ("stdin", Kind::Stdio(StdioMode::In)),
    ("stdout", Kind::Stdio(StdioMode::Out)),
    ("exec", Kind::Exec { shell: false }),
    ("system", Kind::Exec { shell: true }),
    ("udp-listen", Kind::UdpListen(Family::Any)),
    ("udp-l", Kind::UdpListen(Family::Any)),
    ("udp4-listen", Kind::UdpListen(Family::V4)),
    ("udp4-l", Kind::UdpListen(Family::V4)),
    ("udp6-listen", Kind::UdpListen(Family::V6)),
    ("udp6-l", Kind::UdpListen(Family::V6)),
    ("udp", Kind::UdpConnect(Family::Any)),
    ("udp-connect", Kind::UdpConnect(Family::Any)),
    ("udp4", Kind::UdpConnect(Family::V4)),
    ("udp4-connect", Kind::UdpConnect(Family::V4)),
    ("udp6", Kind::UdpConnect(Family::V6)),
    ("udp6-connect", Kind::UdpConnect(Family::V6)),
    ("open", Kind::File(FileKind::Open)),
    ("file", Kind::File(FileKind::Open)),
    ("create", Kind::File(FileKind::Create)),
    ("creat", Kind::File(FileKind::Create)),
    ("gopen", Kind::File(FileKind::Gopen)),
    ("pipe", Kind::File(FileKind::Pipe)),
    ("pty", Kind::File(FileKind::Pty)),
    ("vsock-listen", Kind::VsockListen),
    ("vsock-l", Kind::VsockListen),
    ("vsock-connect", Kind::VsockConnect),
    ("socks4", Kind::ProxyConnect(Via::Socks4)),
    ("socks", Kind::ProxyConnect(Via::Socks4)),
    ("socks4a", Kind::ProxyConnect(Via::Socks4a)),
    // socat 1.8's SOCKS5 client address.
    ("socks5-connect", Kind::ProxyConnect(Via::Socks5)),
    ("socks5", Kind::ProxyConnect(Via::Socks5)),
    ("proxy", Kind::ProxyConnect(Via::Http)),
    ("proxy-connect", Kind::ProxyConnect(Via::Http)),
];

impl Kind {
    /// What relay makes of this address type, for the conformance table.
    fn summary(self) -> &'static str {
        match self {
            Kind::TcpListen(_) => "TCP listener",
            Kind::TlsListen => "TLS listener (rustls)",
            Kind::UnixListen => "UNIX stream listener",
            Kind::AbstractListen => "UNIX stream listener in the abstract namespace",
            Kind::TcpConnect(_) => "TCP connect",
            Kind::TlsConnect => "TLS connect (rustls)",
            Kind::UnixConnect => {
                "UNIX stream connect (UNIX-CLIENT: stream only, no datagram fallback)"
            }
            Kind::AbstractConnect => "UNIX stream connect in the abstract namespace",
            Kind::Stdio(_) => "stdin/stdout as one connection, either side",
            Kind::Exec { shell: false } => "a program per connection (no shell)",
            Kind::Exec { shell: true } => "a shell command per connection",
            Kind::UdpListen(_) => "UDP listener, one session per client with fork",
            Kind::UdpConnect(_) => "UDP peer, one connected socket per session",
            Kind::File(FileKind::Open) => {
                "a file (or terminal), either side: the one connection first, else opened per connection"
            }
            Kind::File(FileKind::Create) => "a file made or truncated, written only",
            Kind::File(FileKind::Gopen) => {
                "a UNIX socket at the path is connected to, anything else opened as OPEN"
            }
            Kind::File(FileKind::Pipe) => "a named pipe, made if missing (no unnamed PIPE)",
            Kind::VsockListen => "AF_VSOCK listener (a VM's or enclave's socket), any CID",
            Kind::VsockConnect => "AF_VSOCK connect to <cid>:<port>",
            Kind::File(FileKind::Pty) => {
                "a new pseudo-terminal, relay holding its master side (link=, raw, echo=)"
            }
            Kind::ProxyConnect(Via::Socks4) => {
                "TCP through a SOCKS 4 server (relay resolves the host)"
            }
            Kind::ProxyConnect(Via::Socks4a) => {
                "TCP through a SOCKS 4A server (the server resolves the host)"
            }
            Kind::ProxyConnect(Via::Socks5) => "TCP through a SOCKS 5 server, no authentication",
            Kind::ProxyConnect(Via::Http) => "TCP through an HTTP proxy's CONNECT",
        }
    }
}

/// Every socat address type relay knows, aliases together: its names, and
/// what relay makes of it (`Ok`) or why it refuses it and what to use
/// instead (`Err`). From the tables the parser uses, so the README's
/// conformance table cannot drift from them.
pub fn address_types() -> Vec<(String, Result<&'static str, &'static str>)> {
    let mut rows: Vec<(String, Result<&'static str, &'static str>)> = Vec::new();
    let mut push = |name: &str, status| match rows.last_mut() {
        Some((names, last)) if *last == status => {
            names.push_str(", ");
            names.push_str(name);
        }
        _ => rows.push((name.to_string(), status)),
    };
    for (name, kind) in KEYWORDS {
        push(name, Ok(kind.summary()));
    }
    for (name, instead) in OTHER_SOCAT_TYPES {
        push(name, Err(*instead));
    }
    rows
}

/// Splits a socat address into its kind and the rest (after the `:`, or
/// after the keyword for the STDIO family, which takes no parameter).
pub(super) fn socat_keyword(input: &str) -> Option<(Kind, &str)> {
    let (word, rest) = match input.split_once(':') {
        Some(split) => split,
        // `STDIO`, `-`, `STDIN,opts`: no colon.
        None => input
            .split_once(',')
            .map_or((input, ""), |(w, _)| (w, &input[w.len()..])),
    };
    let kind = KEYWORDS
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(word))
        .map(|(_, kind)| *kind)?;
    match kind {
        Kind::Stdio(_) | Kind::File(FileKind::Pty) if input.contains(':') => None,
        Kind::Stdio(_) | Kind::File(FileKind::Pty) => Some((kind, rest)),
        _ if !input.contains(':') => None,
        _ => Some((kind, rest)),
    }
}

/// socat address types relay does not (yet) speak, with what to use
/// instead: named so that, for example, `UDP-LISTEN:53` is refused as such
/// instead of being looked up as a host called `UDP-LISTEN`.
pub(super) const OTHER_SOCAT_TYPES: &[(&str, &str)] = &[
    ("udp-sendto", UDP_INSTEAD),
    ("udp4-sendto", UDP_INSTEAD),
    ("udp6-sendto", UDP_INSTEAD),
    ("udp-recvfrom", UDP_INSTEAD),
    ("udp4-recvfrom", UDP_INSTEAD),
    ("udp6-recvfrom", UDP_INSTEAD),
    ("udp-recv", UDP_INSTEAD),
    ("udp4-recv", UDP_INSTEAD),
    ("udp6-recv", UDP_INSTEAD),
    ("udp-datagram", UDP_INSTEAD),
    ("udp4-datagram", UDP_INSTEAD),
    ("udp6-datagram", UDP_INSTEAD),
    ("unix-sendto", DATAGRAM_UNIX_INSTEAD),
    ("unix-recvfrom", DATAGRAM_UNIX_INSTEAD),
    ("unix-recv", DATAGRAM_UNIX_INSTEAD),
    ("abstract-sendto", DATAGRAM_UNIX_INSTEAD),
    ("abstract-recvfrom", DATAGRAM_UNIX_INSTEAD),
    ("abstract-recv", DATAGRAM_UNIX_INSTEAD),
    ("stderr", "relay writes only its log to stderr; use STDOUT"),
    ("fd", FILE_INSTEAD),
    ("readline", "use socat for interactive line editing"),
    ("tun", "relay does not make TUN devices"),
    ("socks4-listen", PROXY_INSTEAD),
    ("socks5-listen", PROXY_INSTEAD),
    ("sctp", OTHER_PROTOCOL),
    ("sctp-listen", OTHER_PROTOCOL),
    ("sctp-connect", OTHER_PROTOCOL),
    ("ip", OTHER_PROTOCOL),
    ("ip4", OTHER_PROTOCOL),
    ("ip6", OTHER_PROTOCOL),
    ("ip-sendto", OTHER_PROTOCOL),
    ("interface", OTHER_PROTOCOL),
    ("dccp-listen", OTHER_PROTOCOL),
    ("dccp-connect", OTHER_PROTOCOL),
    ("udplite-listen", OTHER_PROTOCOL),
    ("udplite-connect", OTHER_PROTOCOL),
    ("tcp-sendto", OTHER_PROTOCOL),
];

pub(super) const UDP_INSTEAD: &str = "relay relays UDP as a listener with a session per client: use `UDP-LISTEN:<port>,fork UDP:<host>:<port>` (replies go back to each client), or keep socat for unconnected datagram addresses";

pub(super) const DATAGRAM_UNIX_INSTEAD: &str = "relay forwards UNIX stream sockets only: use UNIX-LISTEN / UNIX-CONNECT, or socat for datagram sockets";

pub(super) const FILE_INSTEAD: &str = "relay opens files by path only (OPEN:, CREATE:, GOPEN:, PIPE:, PTY): use STDIO with a shell redirection (`relay - <ADDR> <&3`), or socat";

pub(super) const PROXY_INSTEAD: &str = "relay is not a SOCKS server: it connects through one (SOCKS4, SOCKS4A, SOCKS5-CONNECT, PROXY); keep socat, or a SOCKS server such as dante, for this line";

pub(super) const OTHER_PROTOCOL: &str =
    "relay forwards TCP, TLS, UDP, UNIX and VSOCK stream sockets only";
