//! Address grammar: the URL form (`host:port`, `[v6]:port`, `tcp://host:port`)
//! and the socat form (`TCP-LISTEN:8080,fork,reuseaddr`, `TCP:host:80,nodelay`),
//! parsed into one [`ListenAddr`] or [`TargetAddr`].
//!
//! This module only parses; it resolves no names and opens no sockets. Every
//! error names the token that is wrong and what was expected, because users
//! paste these strings out of socat scripts.

use std::fmt;
use std::net::IpAddr;
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
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpTarget {
    pub host: Host,
    pub port: u16,
    pub family: Family,
    pub keepalive: bool,
}

impl ListenAddr {
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
}

impl TargetAddr {
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

const LISTEN_OPTIONS: &str = "fork, reuseaddr, reuseport, bind=<addr>, backlog=<n>, max-children=<n>, range=<cidr> (repeatable), nodelay, netns=, container=, pid=";
const TLS_LISTEN_OPTIONS: &str = "cert=, key=, cafile=, capath=, verify=0|1";
const UNIX_LISTEN_OPTIONS: &str = "fork, unlink-early, unlink-close=0|1, mode=<octal>, user=<name|uid>, group=<name|gid>, backlog=<n>, max-children=<n>, netns=, container=, pid=";
const CONNECT_OPTIONS: &str = "connect-timeout=<seconds>, retry=<n>, interval=<seconds>, forever, nodelay, keepalive, netns=, container=, pid=";
const TLS_CONNECT_OPTIONS: &str =
    "cafile=, capath=, cert=, key=, snihost=, no-sni, commonname=, verify=0|1";
const UNIX_CONNECT_OPTIONS: &str =
    "connect-timeout=<seconds>, retry=<n>, interval=<seconds>, forever, netns=, container=, pid=";
const EXEC_OPTIONS: &str = "stderr";
const UDP_LISTEN_OPTIONS: &str =
    "fork, reuseaddr, so-reuseport, bind=<addr>, netns=, container=, pid=";
const UDP_CONNECT_OPTIONS: &str = "netns=, container=, pid=";

/// The socat address types relay speaks, by what they make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
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
}

impl Kind {
    fn listens(self) -> bool {
        matches!(
            self,
            Kind::TcpListen(_)
                | Kind::TlsListen
                | Kind::UnixListen
                | Kind::AbstractListen
                | Kind::Stdio(_)
                | Kind::UdpListen(_)
        )
    }

    fn connects(self) -> bool {
        !self.listens() || matches!(self, Kind::Stdio(_))
    }
}

/// Every socat keyword relay takes (case-insensitive, as socat's are).
const KEYWORDS: &[(&str, Kind)] = &[
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
];

/// Splits a socat address into its kind and the rest (after the `:`, or
/// after the keyword for the STDIO family, which takes no parameter).
fn socat_keyword(input: &str) -> Option<(Kind, &str)> {
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
        Kind::Stdio(_) if input.contains(':') => None,
        Kind::Stdio(_) => Some((kind, rest)),
        _ if !input.contains(':') => None,
        _ => Some((kind, rest)),
    }
}

/// socat address types relay does not (yet) speak, with what to use
/// instead: named so that, for example, `UDP-LISTEN:53` is refused as such
/// instead of being looked up as a host called `UDP-LISTEN`.
const OTHER_SOCAT_TYPES: &[(&str, &str)] = &[
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
    ("pipe", FILE_INSTEAD),
    ("file", FILE_INSTEAD),
    ("open", FILE_INSTEAD),
    ("gopen", FILE_INSTEAD),
    ("create", FILE_INSTEAD),
    ("fd", FILE_INSTEAD),
    ("pty", FILE_INSTEAD),
    ("readline", "use socat for interactive line editing"),
    ("tun", "relay does not make TUN devices"),
    ("socks4", PROXY_INSTEAD),
    ("socks4a", PROXY_INSTEAD),
    ("socks5", PROXY_INSTEAD),
    ("proxy", PROXY_INSTEAD),
    ("proxy-connect", PROXY_INSTEAD),
    ("sctp", OTHER_PROTOCOL),
    ("sctp-listen", OTHER_PROTOCOL),
    ("sctp-connect", OTHER_PROTOCOL),
    ("vsock-listen", OTHER_PROTOCOL),
    ("vsock-connect", OTHER_PROTOCOL),
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

const UDP_INSTEAD: &str = "relay relays UDP as a listener with a session per client: use `UDP-LISTEN:<port>,fork UDP:<host>:<port>` (replies go back to each client), or keep socat for unconnected datagram addresses";
const DATAGRAM_UNIX_INSTEAD: &str = "relay forwards UNIX stream sockets only: use UNIX-LISTEN / UNIX-CONNECT, or socat for datagram sockets";
const FILE_INSTEAD: &str =
    "relay connects sockets and stdin/stdout only: use STDIO with a shell redirection, or socat";
const PROXY_INSTEAD: &str =
    "relay does not speak proxy protocols as a client yet; keep socat for this line";
const OTHER_PROTOCOL: &str = "relay forwards TCP, TLS and UNIX stream sockets only";

/// Is this string written in socat's address form rather than `host:port`?
/// A known socat type always is; otherwise a keyword-looking word (letters,
/// digits, dashes) followed by something other than a bare port.
fn looks_like_socat(input: &str) -> bool {
    input.split_once(':').is_some_and(|(word, rest)| {
        OTHER_SOCAT_TYPES
            .iter()
            .any(|(t, _)| t.eq_ignore_ascii_case(word))
            || (!word.is_empty()
                && word.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && word.chars().any(|c| c.is_ascii_alphabetic())
                && (rest.is_empty() || !rest.chars().all(|c| c.is_ascii_digit())))
    })
}

/// One `key` or `key=value` socat address option.
struct SocatOption<'a> {
    key: String,
    value: Option<&'a str>,
}

impl SocatOption<'_> {
    /// socat's boolean options take no value or `=0`/`=1`.
    fn flag(&self, input: &str) -> Result<bool, AddrError> {
        match self.value {
            None | Some("1") => Ok(true),
            Some("0") => Ok(false),
            Some(other) => Err(invalid(
                input,
                format!("option `{}` takes 0 or 1, not `{other}`", self.key),
            )),
        }
    }

    fn path(&self, input: &str) -> Result<PathBuf, AddrError> {
        self.required(input).map(PathBuf::from)
    }

    fn required(&self, input: &str) -> Result<&str, AddrError> {
        self.value.filter(|v| !v.is_empty()).ok_or_else(|| {
            invalid(
                input,
                format!("option `{}` needs a value (`{}=...`)", self.key, self.key),
            )
        })
    }
}

/// The options after an address's first comma. An empty one (`,,` or a
/// trailing comma) is refused: it is a typo more often than not, and socat
/// scripts that relay accepted silently would hide it.
/// `list` is `None` when the address has no comma at all.
fn socat_options<'a>(
    input: &'a str,
    list: Option<&'a str>,
) -> impl Iterator<Item = Result<SocatOption<'a>, AddrError>> {
    list.into_iter().flat_map(|l| l.split(',')).map(move |opt| {
        if opt.trim().is_empty() {
            return Err(invalid(
                input,
                "an empty option (two commas in a row, or a trailing comma); remove the extra comma",
            ));
        }
        let (key, value) = match opt.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (opt, None),
        };
        Ok(SocatOption {
            key: key.to_ascii_lowercase(),
            value,
        })
    })
}

/// Parses `host:port`, `[v6]:port` or a bare IPv6 literal is rejected (it is
/// ambiguous); `what` says which part of `input` this is for messages.
fn host_port(input: &str, part: &str) -> Result<(Host, u16), AddrError> {
    let (host, port) = if let Some(rest) = part.strip_prefix('[') {
        let (ip, after) = rest.split_once(']').ok_or_else(|| {
            invalid(
                input,
                "missing `]` after the IPv6 address; expected `[v6addr]:port`",
            )
        })?;
        let port = after
            .strip_prefix(':')
            .ok_or_else(|| invalid(input, "expected `:port` after `]`"))?;
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| invalid(input, format!("`{ip}` is not an IPv6 address")))?;
        (Host::Ip(ip), port)
    } else {
        let (host, port) = part
            .rsplit_once(':')
            .ok_or_else(|| invalid(input, format!("`{part}` has no port; expected `host:port`")))?;
        if host.contains(':') {
            return Err(invalid(
                input,
                "an IPv6 address needs brackets: `[v6addr]:port`",
            ));
        }
        (parse_host(input, host)?, port)
    };
    Ok((host, parse_port(input, port)?))
}

fn parse_host(input: &str, host: &str) -> Result<Host, AddrError> {
    if host.is_empty() {
        return Err(invalid(input, "the host is empty; expected `host:port`"));
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(Host::Ip(ip));
    }
    let valid_name = host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        });
    if !valid_name {
        return Err(invalid(
            input,
            format!("`{host}` is neither an IP address nor a host name"),
        ));
    }
    Ok(Host::Name(host.to_string()))
}

fn parse_port(input: &str, port: &str) -> Result<u16, AddrError> {
    port.parse::<u16>()
        .map_err(|_| invalid(input, format!("`{port}` is not a port number (0-65535)")))
}

fn parse_seconds(input: &str, key: &str, value: &str) -> Result<Duration, AddrError> {
    value
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s > 0.0 && *s <= crate::duration::MAX.as_secs_f64())
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .ok_or_else(|| {
            invalid(
                input,
                format!(
                    "`{key}={value}`: expected a positive number of seconds, at most {}",
                    crate::duration::MAX.as_secs()
                ),
            )
        })
}

/// Splits off a URL scheme (`tcp` when there is none); any scheme not in
/// `schemes` is an error naming it.
fn split_scheme<'a>(input: &'a str, schemes: &[&str]) -> Result<(String, &'a str), AddrError> {
    match input.split_once("://") {
        None => Ok(("tcp".to_string(), input)),
        Some((scheme, rest)) if schemes.iter().any(|s| s.eq_ignore_ascii_case(scheme)) => {
            Ok((scheme.to_ascii_lowercase(), rest))
        }
        Some((scheme, _)) => Err(invalid(
            input,
            format!(
                "scheme `{scheme}://` is not supported; expected {}",
                schemes
                    .iter()
                    .map(|s| format!("`{s}://`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

/// Which address position is being parsed, for the wrong-side message.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Position {
    Listen,
    Target,
}

/// For an address in socat's form: its kind and the part after the
/// keyword. `None` for the URL form.
fn socat_form(input: &str, position: Position) -> Result<Option<(Kind, &str)>, AddrError> {
    if input.contains("://") {
        return Ok(None);
    }
    if let Some((kind, rest)) = socat_keyword(input) {
        return match position {
            Position::Listen if matches!(kind, Kind::Exec { .. }) => Err(invalid(
                input,
                "EXEC/SYSTEM as the first address (one program, one connection to the other address) is not supported yet: \
                 put a listener first and the program second, for example `TCP-LISTEN:8080,fork EXEC:/usr/bin/cat`",
            )),
            Position::Listen if !kind.listens() => Err(invalid(
                input,
                "this is a connect address; the first address must listen (for example `TCP-LISTEN:8080,fork`), or be STDIO",
            )),
            Position::Target if !kind.connects() => Err(invalid(
                input,
                "this is a listen address; the second address must connect (for example `TCP:host:port`), or be STDIO",
            )),
            _ => Ok(Some((kind, rest))),
        };
    }
    // `PTY,link=/dev/x` has no colon: the word ends at the first comma then.
    let word = input.split([':', ',']).next().unwrap_or(input);
    if let Some((_, instead)) = OTHER_SOCAT_TYPES
        .iter()
        .find(|(t, _)| t.eq_ignore_ascii_case(word))
    {
        return Err(invalid(
            input,
            format!("socat address type `{word}` is not supported by relay: {instead}"),
        ));
    }
    if looks_like_socat(input) {
        let expected = match position {
            Position::Listen => {
                "TCP-LISTEN, TCP4-LISTEN, TCP6-LISTEN, TCP-L, OPENSSL-LISTEN, UNIX-LISTEN, ABSTRACT-LISTEN, UDP-LISTEN, UDP4-LISTEN, UDP6-LISTEN or STDIO"
            }
            Position::Target => {
                "TCP, TCP4, TCP6, TCP-CONNECT, OPENSSL, UNIX-CONNECT, UNIX-CLIENT, UNIX, ABSTRACT-CONNECT, UDP, UDP4, UDP6, UDP-CONNECT or STDIO"
            }
        };
        return Err(invalid(
            input,
            format!("socat address type `{word}` is not supported here; expected {expected}"),
        ));
    }
    Ok(None)
}

/// Splits `address@target` (the namespace an address lives in) into its
/// parts; the part after the last `@` must be a namespace target.
fn split_namespace(input: &str) -> Result<(&str, Option<Target>), AddrError> {
    match input.rsplit_once('@') {
        None => Ok((input, None)),
        Some((address, target)) => {
            let target = target
                .parse::<Target>()
                .map_err(|e| invalid(input, format!("after `@`: {e}")))?;
            Ok((address, Some(target)))
        }
    }
}

/// socat-style options naming the namespace: `netns=<name|path>`,
/// `container=<name>`, `pid=<pid>`.
fn namespace_option(input: &str, opt: &SocatOption<'_>) -> Result<Option<Target>, AddrError> {
    let spec = match opt.key.as_str() {
        "netns" => format!("netns:{}", opt.required(input)?),
        "container" => format!("container:{}", opt.required(input)?),
        "pid" => format!("pid:{}", opt.required(input)?),
        _ => return Ok(None),
    };
    spec.parse::<Target>()
        .map(Some)
        .map_err(|e| invalid(input, format!("option `{}`: {e}", opt.key)))
}

/// A UNIX address in URL form, or `None` for another scheme:
/// `unix:///run/x.sock` (a path, which must be absolute) or
/// `unix-abstract://name`.
fn unix_url(input: &str, address: &str) -> Result<Option<UnixName>, AddrError> {
    let Some((scheme, rest)) = address.split_once("://") else {
        return Ok(None);
    };
    if scheme.eq_ignore_ascii_case("unix") {
        if !rest.starts_with('/') {
            return Err(invalid(
                input,
                "a unix:// URL takes an absolute path: `unix:///run/app.sock` (three slashes)",
            ));
        }
        return Ok(Some(UnixName::Path(PathBuf::from(rest))));
    }
    if scheme.eq_ignore_ascii_case("unix-abstract") {
        return abstract_name(input, rest).map(Some);
    }
    Ok(None)
}

fn unix_path(input: &str, path: &str) -> Result<UnixName, AddrError> {
    if path.is_empty() {
        return Err(invalid(
            input,
            "the socket path is empty; expected for example `UNIX-CONNECT:/run/app.sock`",
        ));
    }
    // sun_path holds 108 bytes with the terminating NUL.
    if path.len() > 107 {
        return Err(invalid(
            input,
            format!(
                "the socket path is {} bytes; the kernel takes at most 107: use a shorter path (a symlinked directory, say)",
                path.len()
            ),
        ));
    }
    Ok(UnixName::Path(PathBuf::from(path)))
}

fn abstract_name(input: &str, name: &str) -> Result<UnixName, AddrError> {
    if name.is_empty() || name.len() > 107 {
        return Err(invalid(
            input,
            "an abstract socket name needs 1 to 107 bytes",
        ));
    }
    Ok(UnixName::Abstract(name.to_string()))
}

/// A socket path is a file system thing: a network namespace cannot place
/// it. A container's or process's namespace can, through
/// `/proc/<pid>/root`, so those are kept; an `ip netns` name or a
/// namespace file has no file system to offer and is refused.
fn check_path_namespace(
    input: &str,
    name: &UnixName,
    netns: &Option<Target>,
) -> Result<(), AddrError> {
    if let (UnixName::Path(_), Some(Target::NetnsName(_) | Target::NetnsPath(_))) = (name, netns) {
        return Err(invalid(
            input,
            "a socket path belongs to a mount namespace, not a network namespace: netns= cannot place it; \
             use container= or pid= (relay reaches the path through /proc/<pid>/root), write the path as this host sees it, \
             or use an ABSTRACT address, which does live in a network namespace",
        ));
    }
    Ok(())
}

fn split_options(rest: &str) -> (&str, Option<&str>) {
    rest.split_once(',')
        .map_or((rest, None), |(h, o)| (h, Some(o)))
}

/// Parses a listen address: `host:port`, `[v6]:port`, `tcp://host:port`,
/// `unix:///path`, `unix-abstract://name`, socat's `TCP-LISTEN:<port>`,
/// `UNIX-LISTEN:<path>`, `ABSTRACT-LISTEN:<name>` (with options), or
/// `STDIO`/`-`.
pub fn parse_listen(input: &str) -> Result<ListenAddr, AddrError> {
    if let Some((kind, rest)) = socat_form(input, Position::Listen)? {
        return match kind {
            Kind::TcpListen(family) => parse_socat_listen(input, family, rest, false),
            Kind::TlsListen => parse_socat_listen(input, Family::Any, rest, true),
            Kind::UnixListen | Kind::AbstractListen => {
                let (name, options) = split_options(rest);
                let name = if kind == Kind::UnixListen {
                    unix_path(input, name)?
                } else {
                    abstract_name(input, name)?
                };
                parse_unix_listen(input, name, options)
            }
            Kind::Stdio(mode) => {
                stdio_options(input, rest)?;
                Ok(ListenAddr {
                    endpoint: ListenEndpoint::Stdio(mode),
                    backlog: None,
                    max_children: None,
                    once: true,
                    tls: None,
                    netns: None,
                    text: input.to_string(),
                })
            }
            Kind::UdpListen(family) => parse_udp_listen(input, family, rest),
            _ => unreachable!("socat_form returns listen kinds for the listen position"),
        };
    }
    let (address, netns) = split_namespace(input)?;
    if let Some(name) = unix_url(input, address)? {
        check_path_namespace(input, &name, &netns)?;
        return Ok(ListenAddr {
            endpoint: ListenEndpoint::Unix(unix_listen_defaults(name)),
            backlog: None,
            max_children: None,
            once: false,
            tls: None,
            netns,
            text: input.to_string(),
        });
    }
    let (scheme, rest) = split_scheme(
        address,
        &["tcp", "tls", "tls-listen", "unix", "unix-abstract", "udp"],
    )?;
    let (host, port) = host_port(input, rest)?;
    let endpoint = if scheme == "udp" {
        ListenEndpoint::Udp
    } else {
        ListenEndpoint::Tcp
    };
    Ok(ListenAddr {
        endpoint: endpoint(TcpListen {
            host,
            port,
            family: Family::Any,
            reuseaddr: true,
            reuseport: false,
            range: Vec::new(),
        }),
        backlog: None,
        max_children: None,
        once: false,
        tls: (scheme != "tcp" && scheme != "udp").then(TlsListen::default),
        netns,
        text: input.to_string(),
    })
}

/// socat's STDIO addresses take terminal and file options relay does not
/// apply; each is refused by name rather than ignored.
fn stdio_options(input: &str, rest: &str) -> Result<(), AddrError> {
    let options = rest.strip_prefix(',');
    if let Some(opt) = socat_options(input, options).next() {
        let opt = opt?;
        return Err(invalid(
            input,
            format!(
                "address option `{}` is not supported by relay on STDIO (it takes none; set a terminal up with stty before relay starts)",
                opt.key
            ),
        ));
    }
    Ok(())
}

fn unix_listen_defaults(name: UnixName) -> UnixListen {
    UnixListen {
        name,
        unlink_early: false,
        // socat removes the socket file when the address closes.
        unlink_close: true,
        mode: None,
        user: None,
        group: None,
    }
}

fn parse_unix_listen(
    input: &str,
    name: UnixName,
    options: Option<&str>,
) -> Result<ListenAddr, AddrError> {
    let is_path = matches!(name, UnixName::Path(_));
    let mut unix = unix_listen_defaults(name);
    // Filled in below; the endpoint is set once its options are read.
    let mut addr = ListenAddr {
        endpoint: ListenEndpoint::Stdio(StdioMode::Both),
        backlog: None,
        max_children: None,
        once: true,
        tls: None,
        netns: None,
        text: input.to_string(),
    };
    for opt in socat_options(input, options) {
        let opt = opt?;
        if let Some(target) = namespace_option(input, &opt)? {
            addr.netns = Some(target);
            continue;
        }
        let file_option = |key: &str| {
            if is_path {
                Ok(())
            } else {
                Err(invalid(
                    input,
                    format!(
                        "option `{key}` needs a socket file; an abstract socket has none (use UNIX-LISTEN:<path>)"
                    ),
                ))
            }
        };
        match opt.key.as_str() {
            "fork" => addr.once = !opt.flag(input)?,
            "unlink-early" => {
                file_option(&opt.key)?;
                unix.unlink_early = opt.flag(input)?;
            }
            "unlink-close" => {
                file_option(&opt.key)?;
                unix.unlink_close = opt.flag(input)?;
            }
            "mode" | "perm" => {
                file_option(&opt.key)?;
                let value = opt.required(input)?;
                unix.mode = Some(
                    u32::from_str_radix(value, 8)
                        .ok()
                        .filter(|m| *m <= 0o7777)
                        .ok_or_else(|| {
                            invalid(
                                input,
                                format!(
                                    "`{}={value}`: expected octal permission bits such as 660",
                                    opt.key
                                ),
                            )
                        })?,
                );
            }
            "user" | "owner" | "uid" => {
                file_option(&opt.key)?;
                unix.user = Some(opt.required(input)?.to_string());
            }
            "group" | "gid" => {
                file_option(&opt.key)?;
                unix.group = Some(opt.required(input)?.to_string());
            }
            "backlog" => addr.backlog = Some(backlog(input, &opt)?),
            "max-children" => addr.max_children = Some(max_children(input, &opt)?),
            other => {
                refused_option(input, other)?;
                return Err(invalid(
                    input,
                    format!(
                        "address option `{other}` is not supported by relay on a UNIX listen address (supported: {UNIX_LISTEN_OPTIONS})"
                    ),
                ));
            }
        }
    }
    check_path_namespace(input, &unix.name, &addr.netns)?;
    addr.endpoint = ListenEndpoint::Unix(unix);
    Ok(addr)
}

/// relay always sets TCP_NODELAY on both legs, so `nodelay=0` cannot be
/// honoured and is refused rather than ignored.
fn no_nodelay_off(input: &str, opt: &SocatOption<'_>) -> Result<(), AddrError> {
    if opt.flag(input)? {
        Ok(())
    } else {
        Err(invalid(
            input,
            "`nodelay=0` cannot be honoured: relay always sets TCP_NODELAY",
        ))
    }
}

fn max_children(input: &str, opt: &SocatOption<'_>) -> Result<u32, AddrError> {
    let value = opt.required(input)?;
    value.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
        invalid(
            input,
            format!("`max-children={value}`: expected a whole number of at least 1"),
        )
    })
}

/// socat's `range=`: `<ip>/<bits>`, `<ipv4>:<netmask>`, a bare address (that
/// host only); IPv6 in brackets or bare (`[fd00::]/8`, `fd00::/8`).
fn parse_range(input: &str, value: &str) -> Result<IpNet, AddrError> {
    let bad = || {
        invalid(
            input,
            format!(
                "`range={value}`: expected a network such as range=10.0.0.0/8, range=10.0.0.0:255.0.0.0, range=127.0.0.1 or range=[fd00::]/8"
            ),
        )
    };
    let unbracket = |text: &str| {
        text.strip_prefix('[')
            .map(|t| t.replacen(']', "", 1))
            .unwrap_or_else(|| text.to_string())
    };
    let text = unbracket(value);
    if let Ok(net) = text.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    let (ip, mask) = text.split_once(':').ok_or_else(bad)?;
    let ip: std::net::Ipv4Addr = ip.parse().map_err(|_| bad())?;
    let mask: std::net::Ipv4Addr = mask.parse().map_err(|_| bad())?;
    ipnet::Ipv4Net::with_netmask(ip, mask)
        .map(|net| IpNet::V4(net.trunc()))
        .map_err(|_| bad())
}

/// `retry=<n>`, `interval=<seconds>`, `forever` (socat's connect retries).
fn retry_option(input: &str, opt: &SocatOption<'_>, retry: &mut Retry) -> Result<(), AddrError> {
    match opt.key.as_str() {
        "retry" => {
            let value = opt.required(input)?;
            retry.retries = Some(value.parse().map_err(|_| {
                invalid(
                    input,
                    format!("`retry={value}`: expected a whole number of retries (or `forever`)"),
                )
            })?);
        }
        "interval" => retry.interval = parse_seconds(input, &opt.key, opt.required(input)?)?,
        _ => {
            if opt.flag(input)? {
                retry.retries = None;
            }
        }
    }
    Ok(())
}

/// Refuses an option relay knows it does not do (the conformance table,
/// `socat_table`), saying what to use instead; `Ok` for a name it does not
/// know (the caller says so).
fn refused_option(input: &str, key: &str) -> Result<(), AddrError> {
    match crate::socat_table::refusal(key) {
        Some((name, instead)) => Err(invalid(
            input,
            format!("socat option `{name}` is not supported: {instead}"),
        )),
        None => Ok(()),
    }
}

fn backlog(input: &str, opt: &SocatOption<'_>) -> Result<u32, AddrError> {
    let value = opt.required(input)?;
    value
        .parse()
        .map_err(|_| invalid(input, format!("`backlog={value}`: expected a whole number")))
}

impl TcpListen {
    /// A socat listen keyword's socket before its options: every address
    /// of the family, on `port`; SO_REUSEADDR only when asked, as socat.
    fn any_address(family: Family, port: u16) -> Self {
        TcpListen {
            host: Host::Ip(match family {
                Family::V6 => IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED),
                _ => IpAddr::from(std::net::Ipv4Addr::UNSPECIFIED),
            }),
            port,
            family,
            reuseaddr: false,
            reuseport: false,
            range: Vec::new(),
        }
    }
}

fn parse_socat_listen(
    input: &str,
    family: Family,
    rest: &str,
    tls: bool,
) -> Result<ListenAddr, AddrError> {
    let (port, options) = split_options(rest);
    let mut tcp = TcpListen::any_address(family, parse_port(input, port)?);
    // The endpoint is set once its options are read (`tcp` above).
    let mut addr = ListenAddr {
        endpoint: ListenEndpoint::Stdio(StdioMode::Both),
        backlog: None,
        max_children: None,
        once: true,
        tls: tls.then(|| TlsListen {
            verify_clients: true,
            ..TlsListen::default()
        }),
        netns: None,
        text: input.to_string(),
    };
    for opt in socat_options(input, options) {
        let opt = opt?;
        if let Some(target) = namespace_option(input, &opt)? {
            addr.netns = Some(target);
            continue;
        }
        if let Some(tls) = addr.tls.as_mut() {
            match opt.key.as_str() {
                "cert" => {
                    tls.cert = Some(opt.path(input)?);
                    continue;
                }
                "key" => {
                    tls.key = Some(opt.path(input)?);
                    continue;
                }
                "cafile" | "capath" => {
                    tls.ca = Some(opt.path(input)?);
                    continue;
                }
                "verify" => {
                    tls.verify_clients = opt.flag(input)?;
                    continue;
                }
                _ => {}
            }
        }
        match opt.key.as_str() {
            "fork" => addr.once = !opt.flag(input)?,
            "reuseaddr" | "so-reuseaddr" => tcp.reuseaddr = opt.flag(input)?,
            "reuseport" | "so-reuseport" => tcp.reuseport = opt.flag(input)?,
            "bind" => tcp.host = Host::Ip(bind_ip(input, &opt)?),
            "backlog" => addr.backlog = Some(backlog(input, &opt)?),
            "max-children" => addr.max_children = Some(max_children(input, &opt)?),
            "range" => tcp.range.push(parse_range(input, opt.required(input)?)?),
            // relay sets TCP_NODELAY on every accepted socket already.
            "nodelay" | "tcp-nodelay" => no_nodelay_off(input, &opt)?,
            "keepalive" | "so-keepalive" => {
                return Err(invalid(
                    input,
                    "`keepalive` on a listen address is not supported: relay sets SO_KEEPALIVE on the target leg only (write `keepalive` on the connect address); the idle timeout (-T) closes vanished clients",
                ));
            }
            other => {
                refused_option(input, other)?;
                return Err(invalid(
                    input,
                    format!(
                        "address option `{other}` is not supported by relay on a listen address (supported: {LISTEN_OPTIONS}{})",
                        if addr.tls.is_some() {
                            format!(", {TLS_LISTEN_OPTIONS}")
                        } else {
                            String::new()
                        }
                    ),
                ));
            }
        }
    }
    if let Host::Ip(ip) = &tcp.host
        && !family.admits(ip)
    {
        return Err(invalid(
            input,
            format!("`bind={ip}` does not match the address family of this keyword"),
        ));
    }
    addr.endpoint = ListenEndpoint::Tcp(tcp);
    Ok(addr)
}

/// Parses a target address: `host:port`, `[v6]:port`, `tcp://host:port`,
/// `unix:///path`, `unix-abstract://name`, socat's `TCP:<host>:<port>`,
/// `UNIX-CONNECT:<path>` (`UNIX-CLIENT:`, `UNIX:`), `ABSTRACT-CONNECT:<name>`
/// (with options), or `STDIO`/`-`.
pub fn parse_target(input: &str) -> Result<TargetAddr, AddrError> {
    if let Some((kind, rest)) = socat_form(input, Position::Target)? {
        return match kind {
            Kind::TcpConnect(family) => parse_socat_target(input, family, rest, false),
            Kind::TlsConnect => parse_socat_target(input, Family::Any, rest, true),
            Kind::UnixConnect | Kind::AbstractConnect => {
                let (name, options) = split_options(rest);
                let name = if kind == Kind::UnixConnect {
                    unix_path(input, name)?
                } else {
                    abstract_name(input, name)?
                };
                parse_unix_target(input, name, options)
            }
            Kind::Exec { shell } => parse_exec(input, rest, shell),
            Kind::UdpConnect(family) => parse_udp_target(input, family, rest),
            Kind::Stdio(mode) => {
                stdio_options(input, rest)?;
                Ok(TargetAddr {
                    endpoint: TargetEndpoint::Stdio(mode),
                    connect_timeout: None,
                    retry: Retry::NONE,
                    tls: None,
                    netns: None,
                    text: input.to_string(),
                })
            }
            _ => unreachable!("socat_form returns connect kinds for the target position"),
        };
    }
    let (address, netns) = split_namespace(input)?;
    if let Some(name) = unix_url(input, address)? {
        check_path_namespace(input, &name, &netns)?;
        return Ok(TargetAddr {
            endpoint: TargetEndpoint::Unix(name),
            connect_timeout: None,
            retry: Retry::NONE,
            tls: None,
            netns,
            text: input.to_string(),
        });
    }
    let (scheme, rest) = split_scheme(address, &["tcp", "tls", "unix", "unix-abstract", "udp"])?;
    let (host, port) = host_port(input, rest)?;
    if port == 0 {
        return Err(invalid(input, "port 0 cannot be connected to"));
    }
    if scheme == "udp" {
        return Ok(TargetAddr {
            endpoint: TargetEndpoint::Udp(UdpTarget {
                host,
                port,
                family: Family::Any,
            }),
            connect_timeout: None,
            retry: Retry::NONE,
            tls: None,
            netns,
            text: input.to_string(),
        });
    }
    let tls = (scheme == "tls").then(|| TlsTarget {
        verify: true,
        ..TlsTarget::default()
    });
    Ok(TargetAddr {
        endpoint: TargetEndpoint::Tcp(TcpTarget {
            host,
            port,
            family: Family::Any,
            keepalive: false,
        }),
        connect_timeout: None,
        retry: Retry::NONE,
        tls,
        netns,
        text: input.to_string(),
    })
}

/// `EXEC:<command>[,options]` / `SYSTEM:<command>[,options]`: the command
/// runs up to the first comma (socat's rule; a command with a comma needs a
/// script).
fn parse_exec(input: &str, rest: &str, shell: bool) -> Result<TargetAddr, AddrError> {
    let (command, options) = split_options(rest);
    if command.trim().is_empty() {
        return Err(invalid(
            input,
            "the command is empty; expected for example `EXEC:/usr/bin/cat` or `SYSTEM:'grep -v x'`",
        ));
    }
    let argv = if shell {
        vec!["/bin/sh".to_string(), "-c".to_string(), command.to_string()]
    } else {
        command
            .split(' ')
            .filter(|w| !w.is_empty())
            .map(str::to_string)
            .collect()
    };
    let mut spec = ExecSpec {
        argv,
        stderr_to_peer: false,
    };
    for opt in socat_options(input, options) {
        let opt = opt?;
        match opt.key.as_str() {
            "stderr" => spec.stderr_to_peer = opt.flag(input)?,
            "nofork" => {
                return Err(invalid(
                    input,
                    "option `nofork` is not supported by relay: relay runs one child per connection (its stdin and stdout the connection); drop `nofork`",
                ));
            }
            "pty" => {
                return Err(invalid(
                    input,
                    "option `pty` is not supported by relay yet: the child's stdin and stdout are a socket pair; keep socat for programs that need a terminal",
                ));
            }
            other => {
                return Err(invalid(
                    input,
                    format!(
                        "address option `{other}` is not supported by relay on EXEC/SYSTEM (supported: {EXEC_OPTIONS})"
                    ),
                ));
            }
        }
    }
    Ok(TargetAddr {
        endpoint: TargetEndpoint::Exec(spec),
        connect_timeout: None,
        retry: Retry::NONE,
        tls: None,
        netns: None,
        text: input.to_string(),
    })
}

fn parse_unix_target(
    input: &str,
    name: UnixName,
    options: Option<&str>,
) -> Result<TargetAddr, AddrError> {
    let mut addr = TargetAddr {
        endpoint: TargetEndpoint::Unix(name),
        connect_timeout: None,
        retry: Retry::NONE,
        tls: None,
        netns: None,
        text: input.to_string(),
    };
    for opt in socat_options(input, options) {
        let opt = opt?;
        if let Some(target) = namespace_option(input, &opt)? {
            addr.netns = Some(target);
            continue;
        }
        match opt.key.as_str() {
            "connect-timeout" => {
                addr.connect_timeout = Some(parse_seconds(input, &opt.key, opt.required(input)?)?);
            }
            "retry" | "interval" | "forever" => retry_option(input, &opt, &mut addr.retry)?,
            other => {
                refused_option(input, other)?;
                return Err(invalid(
                    input,
                    format!(
                        "address option `{other}` is not supported by relay on a UNIX connect address (supported: {UNIX_CONNECT_OPTIONS})"
                    ),
                ));
            }
        }
    }
    if let TargetEndpoint::Unix(name) = &addr.endpoint {
        check_path_namespace(input, name, &addr.netns)?;
    }
    Ok(addr)
}

fn parse_socat_target(
    input: &str,
    family: Family,
    rest: &str,
    tls: bool,
) -> Result<TargetAddr, AddrError> {
    let (hostport, options) = split_options(rest);
    let (host, port) = host_port(input, hostport)?;
    if port == 0 {
        return Err(invalid(input, "port 0 cannot be connected to"));
    }
    if let Host::Ip(ip) = &host
        && !family.admits(ip)
    {
        return Err(invalid(
            input,
            format!("`{ip}` does not match the address family of this keyword"),
        ));
    }
    let tls = tls.then(|| TlsTarget {
        verify: true,
        ..TlsTarget::default()
    });
    let mut tcp = TcpTarget {
        host,
        port,
        family,
        keepalive: false,
    };
    // The endpoint is set once its options are read (`tcp` above).
    let mut addr = TargetAddr {
        endpoint: TargetEndpoint::Stdio(StdioMode::Both),
        connect_timeout: None,
        retry: Retry::NONE,
        tls,
        netns: None,
        text: input.to_string(),
    };
    for opt in socat_options(input, options) {
        let opt = opt?;
        if let Some(target) = namespace_option(input, &opt)? {
            addr.netns = Some(target);
            continue;
        }
        if let Some(tls) = addr.tls.as_mut() {
            match opt.key.as_str() {
                "cafile" | "capath" => {
                    tls.ca = Some(opt.path(input)?);
                    continue;
                }
                "cert" => {
                    tls.cert = Some(opt.path(input)?);
                    continue;
                }
                "key" => {
                    tls.key = Some(opt.path(input)?);
                    continue;
                }
                "snihost" => {
                    tls.sni = Some(opt.required(input)?.to_string());
                    continue;
                }
                "no-sni" => {
                    tls.no_sni = opt.flag(input)?;
                    continue;
                }
                "commonname" | "cn" => {
                    tls.name = Some(opt.required(input)?.to_string());
                    continue;
                }
                "verify" => {
                    tls.verify = opt.flag(input)?;
                    continue;
                }
                _ => {}
            }
        }
        match opt.key.as_str() {
            "connect-timeout" => {
                addr.connect_timeout = Some(parse_seconds(input, &opt.key, opt.required(input)?)?);
            }
            // relay always sets TCP_NODELAY on both legs, so `nodelay=0`
            // cannot be honoured and is refused rather than ignored.
            "nodelay" | "tcp-nodelay" => no_nodelay_off(input, &opt)?,
            "keepalive" | "so-keepalive" => tcp.keepalive = opt.flag(input)?,
            "retry" | "interval" | "forever" => retry_option(input, &opt, &mut addr.retry)?,
            other => {
                refused_option(input, other)?;
                return Err(invalid(
                    input,
                    format!(
                        "address option `{other}` is not supported by relay on a connect address (supported: {CONNECT_OPTIONS}{})",
                        if addr.tls.is_some() {
                            format!(", {TLS_CONNECT_OPTIONS}")
                        } else {
                            String::new()
                        }
                    ),
                ));
            }
        }
    }
    addr.endpoint = TargetEndpoint::Tcp(tcp);
    Ok(addr)
}

/// socat's TLS options, which a UDP address cannot take (relay speaks no DTLS).
const TLS_OPTION_KEYS: &[&str] = &[
    "cert",
    "key",
    "cafile",
    "capath",
    "verify",
    "snihost",
    "no-sni",
    "commonname",
    "cn",
];

fn refuse_tls_on_udp(input: &str, key: &str) -> Result<(), AddrError> {
    if TLS_OPTION_KEYS.contains(&key) {
        return Err(invalid(
            input,
            format!(
                "option `{key}` is a TLS option and UDP carries no TLS (relay speaks no DTLS): drop it, or use OPENSSL-LISTEN / OPENSSL over TCP"
            ),
        ));
    }
    Ok(())
}

/// A listener's `bind=`: an IP address of this host. socat allows
/// `bind=host` or `bind=host:port`; the port of a listen address is the
/// one after the keyword. A name would be a DNS lookup at start, and a
/// typo an exit 1 after it.
fn bind_ip(input: &str, opt: &SocatOption<'_>) -> Result<IpAddr, AddrError> {
    let value = opt.required(input)?;
    let host = value
        .strip_prefix('[')
        .and_then(|v| v.strip_suffix(']'))
        .unwrap_or(value);
    host.parse().map_err(|_| {
        invalid(
            input,
            format!(
                "`bind={value}`: expected an IP address of this host (for example bind=127.0.0.1 or bind=[::1])"
            ),
        )
    })
}

/// `UDP-LISTEN:<port>[,options]` (and `UDP4-`/`UDP6-`): like TCP-LISTEN,
/// without `fork` one client only.
fn parse_udp_listen(input: &str, family: Family, rest: &str) -> Result<ListenAddr, AddrError> {
    let (port, options) = split_options(rest);
    let mut udp = TcpListen::any_address(family, parse_port(input, port)?);
    let mut addr = ListenAddr {
        endpoint: ListenEndpoint::Stdio(StdioMode::Both),
        backlog: None,
        max_children: None,
        once: true,
        tls: None,
        netns: None,
        text: input.to_string(),
    };
    for opt in socat_options(input, options) {
        let opt = opt?;
        if let Some(target) = namespace_option(input, &opt)? {
            addr.netns = Some(target);
            continue;
        }
        refuse_tls_on_udp(input, &opt.key)?;
        match opt.key.as_str() {
            "fork" => addr.once = !opt.flag(input)?,
            "reuseaddr" | "so-reuseaddr" => udp.reuseaddr = opt.flag(input)?,
            "reuseport" | "so-reuseport" => udp.reuseport = opt.flag(input)?,
            "bind" => {
                let ip = bind_ip(input, &opt)?;
                if !family.admits(&ip) {
                    return Err(invalid(
                        input,
                        format!("`bind={ip}` does not match the address family of this keyword"),
                    ));
                }
                udp.host = Host::Ip(ip);
            }
            "backlog" => {
                return Err(invalid(
                    input,
                    "option `backlog` is for stream listeners; a UDP socket has no accept queue: drop it",
                ));
            }
            other => {
                return Err(invalid(
                    input,
                    format!(
                        "address option `{other}` is not supported by relay on a UDP listen address (supported: {UDP_LISTEN_OPTIONS})"
                    ),
                ));
            }
        }
    }
    addr.endpoint = ListenEndpoint::Udp(udp);
    Ok(addr)
}

/// `UDP:<host>:<port>[,options]` (`UDP-CONNECT:`, `UDP4:`, `UDP6:`).
fn parse_udp_target(input: &str, family: Family, rest: &str) -> Result<TargetAddr, AddrError> {
    let (hostport, options) = split_options(rest);
    let (host, port) = host_port(input, hostport)?;
    if port == 0 {
        return Err(invalid(input, "port 0 cannot be sent to"));
    }
    if let Host::Ip(ip) = &host
        && !family.admits(ip)
    {
        return Err(invalid(
            input,
            format!("`{ip}` does not match the address family of this keyword"),
        ));
    }
    let mut addr = TargetAddr {
        endpoint: TargetEndpoint::Udp(UdpTarget { host, port, family }),
        connect_timeout: None,
        retry: Retry::NONE,
        tls: None,
        netns: None,
        text: input.to_string(),
    };
    for opt in socat_options(input, options) {
        let opt = opt?;
        if let Some(target) = namespace_option(input, &opt)? {
            addr.netns = Some(target);
            continue;
        }
        refuse_tls_on_udp(input, &opt.key)?;
        return Err(invalid(
            input,
            format!(
                "address option `{}` is not supported by relay on a UDP address (supported: {UDP_CONNECT_OPTIONS})",
                opt.key
            ),
        ));
    }
    Ok(addr)
}

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

/// A UDP listener relays datagrams, and only a UDP target takes them as
/// datagrams: a mixed pair is refused with what to write instead.
pub fn check_datagram_pair(listen: &ListenAddr, target: &TargetAddr) -> Result<(), AddrError> {
    match (listen.is_udp(), target.is_udp()) {
        (true, false) => Err(invalid(
            &target.text,
            format!(
                "a UDP listener (`{}`) relays datagrams: its target must be UDP too (`UDP:<host>:<port>` or `udp://host:port`); for a stream target listen with TCP-LISTEN",
                listen.text
            ),
        )),
        (false, true) => Err(invalid(
            &target.text,
            format!(
                "a UDP target takes datagrams: its listener must be UDP too (`UDP-LISTEN:<port>,fork` or `udp://host:port`), not `{}`",
                listen.text
            ),
        )),
        _ => Ok(()),
    }
}

/// The two addresses of the socat form, in either order: socat does not
/// care which comes first, so `relay TCP:host:port -` works like
/// `relay - TCP:host:port`. The first address is taken as the listener
/// when it can be one; else the second, if it can, and the first connects.
pub fn parse_pair(first: &str, second: &str) -> Result<(ListenAddr, TargetAddr), AddrError> {
    let forward = parse_listen(first).and_then(|l| parse_target(second).map(|t| (l, t)));
    let pair = match forward {
        Ok(pair) => pair,
        Err(err) => match (parse_listen(second), parse_target(first)) {
            (Ok(listen), Ok(target)) => (listen, target),
            _ => return Err(err),
        },
    };
    check_route(&pair.0, &pair.1)?;
    Ok(pair)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn v4(a: u8, b: u8, c: u8, d: u8) -> Host {
        Host::Ip(IpAddr::V4(Ipv4Addr::new(a, b, c, d)))
    }

    #[test]
    fn url_forms_parse_to_the_same_target() {
        for text in ["127.0.0.1:80", "tcp://127.0.0.1:80", "TCP://127.0.0.1:80"] {
            let t = parse_target(text).unwrap();
            let t = t.tcp().unwrap();
            assert_eq!((&t.host, t.port), (&v4(127, 0, 0, 1), 80), "{text}");
        }
        let t = parse_target("[::1]:6379").unwrap();
        assert_eq!(
            t.tcp().unwrap().host,
            Host::Ip(IpAddr::V6(Ipv6Addr::LOCALHOST))
        );
        let t = parse_target("redis.internal:6379").unwrap();
        assert_eq!(t.tcp().unwrap().host, Host::Name("redis.internal".into()));
        let t = parse_target("my-redis:6379").unwrap();
        assert_eq!(t.tcp().unwrap().host, Host::Name("my-redis".into()));
    }

    #[test]
    fn socat_listen_keeps_socat_semantics() {
        let l = parse_listen("TCP-LISTEN:8080,fork,reuseaddr").unwrap();
        let tcp = l.tcp().unwrap();
        assert_eq!(
            (tcp.port, l.once, tcp.reuseaddr, tcp.reuseport),
            (8080, false, true, false)
        );
        assert_eq!(tcp.host, v4(0, 0, 0, 0));
        let l = parse_listen("tcp-l:8080").unwrap();
        assert!(l.once, "socat without fork serves one connection");
        assert!(!l.tcp().unwrap().reuseaddr);
        let l = parse_listen("TCP6-LISTEN:443,bind=[::1],backlog=512,reuseport,fork").unwrap();
        let tcp = l.tcp().unwrap();
        assert_eq!(tcp.host, Host::Ip(IpAddr::V6(Ipv6Addr::LOCALHOST)));
        assert_eq!(
            (tcp.family, l.backlog, tcp.reuseport),
            (Family::V6, Some(512), true)
        );
        let l = parse_listen("TCP4-LISTEN:80,bind=127.0.0.2,fork=1").unwrap();
        assert_eq!((&l.tcp().unwrap().host, l.once), (&v4(127, 0, 0, 2), false));
    }

    #[test]
    fn socat_connect_options() {
        let t = parse_target("TCP:db:5432,connect-timeout=2.5,nodelay,keepalive").unwrap();
        assert_eq!(t.tcp().unwrap().host, Host::Name("db".into()));
        assert_eq!(t.connect_timeout, Some(Duration::from_millis(2500)));
        assert!(t.tcp().unwrap().keepalive);
        let t = parse_target("tcp6-connect:[::1]:80").unwrap();
        assert_eq!(t.tcp().unwrap().family, Family::V6);
    }

    #[test]
    fn range_admits_only_its_networks() {
        let l = parse_listen(
            "TCP-LISTEN:80,fork,range=10.0.0.0/8,range=192.168.1.7,range=172.16.0.0:255.240.0.0,range=[fd00::]/8",
        )
        .unwrap();
        let tcp = l.tcp().unwrap();
        assert_eq!(tcp.range.len(), 4);
        for inside in [
            "10.1.2.3",
            "192.168.1.7",
            "172.31.255.1",
            "fd12::1",
            "::ffff:10.9.9.9",
        ] {
            assert!(tcp.admits(inside.parse().unwrap()), "{inside}");
        }
        for outside in [
            "11.0.0.1",
            "192.168.1.8",
            "172.32.0.1",
            "fe80::1",
            "127.0.0.1",
        ] {
            assert!(!tcp.admits(outside.parse().unwrap()), "{outside}");
        }
        // Host bits in the network are dropped, as socat masks them.
        let l = parse_listen("TCP-LISTEN:80,range=127.0.0.9/8").unwrap();
        assert!(l.tcp().unwrap().admits("127.1.1.1".parse().unwrap()));
        // No range: everyone.
        let l = parse_listen("TCP-LISTEN:80").unwrap();
        assert!(l.tcp().unwrap().admits("203.0.113.1".parse().unwrap()));
        for bad in [
            "range=10.0.0.0/33",
            "range=nowhere",
            "range=10.0.0.0:255.0.255.0",
            "range=",
        ] {
            let err = parse_listen(&format!("TCP-LISTEN:80,{bad}")).unwrap_err();
            assert!(err.to_string().contains("range="), "{bad}: {err}");
        }
        // A UNIX socket has no client address to match.
        let err = parse_listen("UNIX-LISTEN:/tmp/x.sock,range=10.0.0.0/8").unwrap_err();
        assert!(err.to_string().contains("option `range`"), "{err}");
    }

    #[test]
    fn max_children_is_the_connection_limit() {
        let l = parse_listen("TCP-LISTEN:80,fork,max-children=8").unwrap();
        assert_eq!(l.max_children, Some(8));
        let l = parse_listen("UNIX-LISTEN:/tmp/x.sock,fork,max-children=3").unwrap();
        assert_eq!(l.max_children, Some(3));
        let spec = crate::config::RouteSpec::new(l, parse_target("TCP:db:1").unwrap());
        assert_eq!(spec.max_connections, Some(3));
        for bad in ["max-children=0", "max-children=many", "max-children"] {
            let err = parse_listen(&format!("TCP-LISTEN:80,{bad}")).unwrap_err();
            assert!(err.to_string().contains("max-children"), "{bad}: {err}");
        }
    }

    #[test]
    fn connect_retries_as_socat() {
        let t = parse_target("TCP:db:5432").unwrap();
        assert_eq!(t.retry, Retry::NONE);
        assert!(!t.retry.again_after(1));
        let t = parse_target("TCP:db:5432,retry=3,interval=0.5").unwrap();
        assert_eq!(
            t.retry,
            Retry {
                retries: Some(3),
                interval: Duration::from_millis(500)
            }
        );
        assert!(t.retry.again_after(3));
        assert!(!t.retry.again_after(4));
        let t = parse_target("UNIX-CONNECT:/run/x.sock,forever").unwrap();
        assert_eq!(t.retry.retries, None);
        assert!(t.retry.again_after(u32::MAX));
        assert_eq!(t.retry.interval, DEFAULT_RETRY_INTERVAL);
        for bad in [
            "retry=-1",
            "retry=",
            "interval=0",
            "interval=x",
            "forever=2",
        ] {
            let err = parse_target(&format!("TCP:db:1,{bad}")).unwrap_err();
            let key = bad.split('=').next().unwrap();
            assert!(err.to_string().contains(key), "{bad}: {err}");
        }
        // Retrying belongs to the connect side.
        let err = parse_listen("TCP-LISTEN:80,retry=3").unwrap_err();
        assert!(err.to_string().contains("option `retry`"), "{err}");
    }

    #[test]
    fn known_socat_options_are_refused_with_what_to_use() {
        let cases = [
            ("TCP-LISTEN:80,sndbuf=65536", "sndbuf", "tcp_wmem"),
            ("TCP:h:80,so-rcvbuf=65536", "rcvbuf", "tcp_rmem"),
            ("TCP:h:80,crlf", "crlf", "line endings"),
            ("UNIX-CONNECT:/x.sock,ignoreeof", "ignoreeof", "tail -f"),
            ("TCP-LISTEN:80,fork,su=nobody", "su", "User="),
            ("UNIX-LISTEN:/x.sock,substuser=nobody", "su", "runuser"),
        ];
        for (input, name, instead) in cases {
            let err = if input.contains("LISTEN") {
                parse_listen(input).map(|_| ())
            } else {
                parse_target(input).map(|_| ())
            }
            .unwrap_err()
            .to_string();
            assert!(
                err.contains(&format!("socat option `{name}`")),
                "{input}: {err}"
            );
            assert!(err.contains(instead), "{input}: {err}");
        }
        let err = parse_listen("TCP-LISTEN:80,keepalive").unwrap_err();
        assert!(err.to_string().contains("connect address"), "{err}");
        assert!(parse_listen("TCP-LISTEN:80,nodelay").is_ok());
    }

    #[test]
    fn tls_addresses_carry_their_options() {
        let t = parse_target("tls://redis:6380").unwrap();
        assert_eq!(
            t.tls,
            Some(TlsTarget {
                verify: true,
                ..TlsTarget::default()
            })
        );
        let t = parse_target("OPENSSL:redis:6380,cafile=/ca.pem,cert=c.pem,key=c.key,snihost=r.internal,commonname=redis,verify=1").unwrap();
        let tls = t.tls.unwrap();
        assert_eq!(tls.ca.as_deref(), Some(std::path::Path::new("/ca.pem")));
        assert_eq!(
            (tls.sni.as_deref(), tls.name.as_deref(), tls.verify),
            (Some("r.internal"), Some("redis"), true)
        );
        let t = parse_target("SSL:redis:6380,verify=0,no-sni").unwrap();
        assert!(!t.tls.as_ref().unwrap().verify && t.tls.unwrap().no_sni);
        assert!(parse_target("127.0.0.1:80").unwrap().tls.is_none());

        let l = parse_listen("OPENSSL-LISTEN:443,cert=s.pem,key=s.key,cafile=ca.pem,fork").unwrap();
        let tls = l.tls.unwrap();
        assert!(
            tls.verify_clients,
            "socat's OPENSSL-LISTEN verifies clients by default"
        );
        assert_eq!(tls.ca.as_deref(), Some(std::path::Path::new("ca.pem")));
        assert!(!l.once);
        let l = parse_listen("tls://0.0.0.0:443").unwrap();
        assert!(
            !l.tls.unwrap().verify_clients,
            "the URL form asks for no client certificate unless told"
        );
        assert!(
            parse_listen("tls-listen://127.0.0.1:443")
                .unwrap()
                .tls
                .is_some()
        );
    }

    #[test]
    fn addresses_may_live_in_a_namespace() {
        let t = parse_target("tcp://127.0.0.1:5005@container:web").unwrap();
        assert_eq!(
            (t.tcp().unwrap().port, t.netns.map(|n| n.spec())),
            (5005, Some("container:web".to_string()))
        );
        let l = parse_listen("127.0.0.1:6379@pid:1234").unwrap();
        assert_eq!(l.netns.map(|n| n.spec()), Some("pid:1234".to_string()));
        let t = parse_target("tls://db:6380@netns:blue").unwrap();
        assert!(t.tls.is_some() && t.netns.is_some());
        let t = parse_target("TCP:127.0.0.1:80,container=web").unwrap();
        assert_eq!(t.netns.map(|n| n.spec()), Some("container:web".to_string()));
        let l = parse_listen("TCP-LISTEN:80,fork,netns=blue").unwrap();
        assert_eq!(l.netns.map(|n| n.spec()), Some("netns:blue".to_string()));
        assert!(parse_target("127.0.0.1:80").unwrap().netns.is_none());
        let err = parse_target("127.0.0.1:80@vm:x").unwrap_err().to_string();
        assert!(err.contains("after `@`"), "{err}");
    }

    fn unix(l: &ListenAddr) -> &UnixListen {
        match &l.endpoint {
            ListenEndpoint::Unix(unix) => unix,
            other => panic!("expected a UNIX listener, got {other:?}"),
        }
    }

    #[test]
    fn unix_listen_keeps_socat_semantics() {
        let l = parse_listen(
            "UNIX-LISTEN:/run/x.sock,fork,mode=660,user=root,group=docker,unlink-early",
        )
        .unwrap();
        let u = unix(&l);
        assert_eq!(u.name, UnixName::Path("/run/x.sock".into()));
        assert_eq!(
            (u.mode, u.unlink_early, u.unlink_close),
            (Some(0o660), true, true)
        );
        assert_eq!(
            (u.user.as_deref(), u.group.as_deref()),
            (Some("root"), Some("docker"))
        );
        assert!(!l.once);
        let l = parse_listen("unix-l:/tmp/a.sock,unlink-close=0,backlog=8").unwrap();
        assert!(l.once, "socat without fork serves one connection");
        assert!(!unix(&l).unlink_close);
        assert_eq!(l.backlog, Some(8));
        let l = parse_listen("ABSTRACT-LISTEN:relay-test,fork,netns=blue").unwrap();
        assert_eq!(unix(&l).name, UnixName::Abstract("relay-test".into()));
        assert_eq!(l.netns.map(|n| n.spec()), Some("netns:blue".to_string()));
        let l = parse_listen("UNIX-LISTEN:/run/x.sock,fork,container=web").unwrap();
        assert_eq!(l.netns.map(|n| n.spec()), Some("container:web".to_string()));
    }

    #[test]
    fn unix_targets_in_every_spelling() {
        for text in [
            "UNIX-CONNECT:/var/run/docker.sock",
            "unix-client:/var/run/docker.sock",
            "UNIX:/var/run/docker.sock",
            "unix:///var/run/docker.sock",
        ] {
            let t = parse_target(text).unwrap();
            assert_eq!(
                t.endpoint,
                TargetEndpoint::Unix(UnixName::Path("/var/run/docker.sock".into())),
                "{text}"
            );
            assert!(t.tls.is_none() && t.host().is_none(), "{text}");
        }
        let t = parse_target("ABSTRACT-CONNECT:dbus,connect-timeout=1,pid=42").unwrap();
        assert_eq!(
            t.endpoint,
            TargetEndpoint::Unix(UnixName::Abstract("dbus".into()))
        );
        assert_eq!(t.connect_timeout, Some(Duration::from_secs(1)));
        assert_eq!(t.netns.map(|n| n.spec()), Some("pid:42".to_string()));
        let t = parse_target("unix-abstract://dbus@container:web").unwrap();
        assert_eq!(
            t.endpoint,
            TargetEndpoint::Unix(UnixName::Abstract("dbus".into()))
        );
        assert!(t.netns.is_some());
        let l = parse_listen("unix:///run/relay.sock").unwrap();
        assert_eq!(unix(&l).name, UnixName::Path("/run/relay.sock".into()));
        assert!(!l.once, "the URL form serves many connections");
    }

    #[test]
    fn stdio_is_either_address() {
        for (text, mode) in [
            ("-", StdioMode::Both),
            ("STDIO", StdioMode::Both),
            ("stdio", StdioMode::Both),
            ("STDIN", StdioMode::In),
            ("STDOUT", StdioMode::Out),
        ] {
            let l = parse_listen(text).unwrap();
            assert_eq!(
                (l.endpoint, l.once),
                (ListenEndpoint::Stdio(mode), true),
                "{text}"
            );
            let t = parse_target(text).unwrap();
            assert_eq!(t.endpoint, TargetEndpoint::Stdio(mode), "{text}");
        }
    }

    #[test]
    fn unix_addresses_refuse_what_does_not_apply() {
        let cases = [
            (
                parse_listen("UNIX-LISTEN:").map(|_| ()),
                "the socket path is empty",
            ),
            (
                parse_listen("UNIX-LISTEN:/x.sock,mode=rw").map(|_| ()),
                "`mode=rw`: expected octal",
            ),
            (
                parse_listen("ABSTRACT-LISTEN:x,mode=600").map(|_| ()),
                "an abstract socket has none",
            ),
            (
                parse_listen("UNIX-LISTEN:/x.sock,umask=022").map(|_| ()),
                "option `umask` is not supported by relay on a UNIX listen address",
            ),
            (
                parse_target("UNIX-CONNECT:/x.sock,fork").map(|_| ()),
                "option `fork` is not supported by relay on a UNIX connect address",
            ),
            (
                parse_target("UNIX-CONNECT:/x.sock,netns=blue").map(|_| ()),
                "not a network namespace",
            ),
            (
                parse_target("unix://run/x.sock").map(|_| ()),
                "three slashes",
            ),
            (
                parse_target(&format!("UNIX:/{}", "a".repeat(120))).map(|_| ()),
                "at most 107",
            ),
            (parse_target("STDIO,raw").map(|_| ()), "option `raw`"),
            (
                parse_listen("UNIX-CONNECT:/x.sock").map(|_| ()),
                "first address must listen",
            ),
            (
                parse_target("UNIX-LISTEN:/x.sock").map(|_| ()),
                "second address must connect",
            ),
        ];
        for (result, expected) in cases {
            let err = result.expect_err(expected).to_string();
            assert!(err.contains(expected), "expected `{expected}` in `{err}`");
        }
    }

    #[test]
    fn the_pair_may_come_in_either_order() {
        let (l, t) = parse_pair("-", "TCP:127.0.0.1:80").unwrap();
        assert!(l.is_stdio() && t.tcp().is_some());
        let (l, t) = parse_pair("TCP:127.0.0.1:80", "STDIO").unwrap();
        assert!(
            l.is_stdio() && t.tcp().is_some(),
            "a connect address first, STDIO second"
        );
        let (l, t) = parse_pair("UNIX-CONNECT:/run/x.sock", "TCP-LISTEN:2375,fork").unwrap();
        assert!(l.tcp().is_some() && !l.once);
        assert!(matches!(t.endpoint, TargetEndpoint::Unix(_)));
        let (l, t) = parse_pair("TCP-LISTEN:8080", "-").unwrap();
        assert!(l.once && t.is_stdio());
        let err = parse_pair("TCP-LISTEN:8080,fork", "STDIO")
            .unwrap_err()
            .to_string();
        assert!(err.contains("drop `fork`"), "{err}");
        let err = parse_pair("-", "STDIO").unwrap_err().to_string();
        assert!(err.contains("relays nothing"), "{err}");
        let err = parse_pair("TCP:a:1", "TCP:b:2").unwrap_err().to_string();
        assert!(err.contains("first address must listen"), "{err}");
    }

    #[test]
    fn exec_and_system_split_like_socat() {
        let exec = |text: &str| match parse_target(text).unwrap().endpoint {
            TargetEndpoint::Exec(spec) => spec,
            other => panic!("{text}: expected EXEC, got {other:?}"),
        };
        let spec = exec("EXEC:/usr/bin/tr  a-z A-Z,stderr");
        assert_eq!(spec.argv, ["/usr/bin/tr", "a-z", "A-Z"]);
        assert!(spec.stderr_to_peer);
        let spec = exec("SYSTEM:grep -v x | sort");
        assert_eq!(spec.argv, ["/bin/sh", "-c", "grep -v x | sort"]);
        assert!(!spec.stderr_to_peer);
    }

    #[test]
    fn bad_addresses_name_the_token() {
        let cases = [
            (
                parse_listen("TCP-LISTEN:notaport").map(|_| ()),
                "`notaport` is not a port",
            ),
            (
                parse_listen("TCP-LISTEN:80,bogus=1").map(|_| ()),
                "option `bogus`",
            ),
            (
                parse_listen("TCP-LISTEN:80,nodelay=0").map(|_| ()),
                "`nodelay=0` cannot be honoured",
            ),
            (parse_target("TCP:host").map(|_| ()), "`host` has no port"),
            (parse_target("TCP:db:1,fork").map(|_| ()), "option `fork`"),
            (parse_target("foo://x:1").map(|_| ()), "scheme `foo://`"),
            (parse_target("[::1:80").map(|_| ()), "missing `]`"),
            (parse_target("::1:80").map(|_| ()), "needs brackets"),
            (
                parse_target("OPENSSL:x:443,bogus").map(|_| ()),
                "option `bogus`",
            ),
            (
                parse_listen("OPENSSL-LISTEN:443,snihost=x").map(|_| ()),
                "option `snihost`",
            ),
            (
                parse_target("UDP-SENDTO:127.0.0.1:53").map(|_| ()),
                "`UDP-SENDTO` is not supported by relay: relay relays UDP as a listener",
            ),
            (
                parse_target("unix-sendto:/run/x.sock").map(|_| ()),
                "`unix-sendto` is not supported by relay: relay forwards UNIX stream sockets only",
            ),
            (
                parse_target("EXEC:/bin/cat,nofork").map(|_| ()),
                "option `nofork` is not supported by relay",
            ),
            (parse_target("EXEC:/bin/sh,pty").map(|_| ()), "option `pty`"),
            (
                parse_target("PTY,link=/tmp/x").map(|_| ()),
                "`PTY` is not supported by relay",
            ),
            (parse_target("SYSTEM:").map(|_| ()), "the command is empty"),
            (
                parse_listen("EXEC:/bin/cat").map(|_| ()),
                "put a listener first",
            ),
            (
                parse_target("TCP:db:5432,connect-timeout=soon").map(|_| ()),
                "connect-timeout=soon",
            ),
            (
                parse_target("TCP:db:5432,nodelay=0").map(|_| ()),
                "nodelay=0",
            ),
            (parse_target("TCP4:[::1]:80").map(|_| ()), "address family"),
            (parse_target("bad host!:80").map(|_| ()), "neither an IP"),
            (
                parse_listen("TCP:db:80").map(|_| ()),
                "first address must listen",
            ),
            (
                parse_target("TCP-L:80").map(|_| ()),
                "second address must connect",
            ),
            (parse_target("127.0.0.1:0").map(|_| ()), "port 0"),
            (
                parse_listen("TCP-LISTEN:80,,fork").map(|_| ()),
                "an empty option",
            ),
            (
                parse_listen("TCP-LISTEN:80,fork,").map(|_| ()),
                "an empty option",
            ),
            (
                parse_target("TCP:db:5432,,nodelay").map(|_| ()),
                "an empty option",
            ),
            (parse_target("TCP:db:5432,").map(|_| ()), "an empty option"),
            (
                parse_listen("TCP-LISTEN:80,bind=notanip").map(|_| ()),
                "`bind=notanip`: expected an IP address",
            ),
        ];
        for (result, expected) in cases {
            let err = result.expect_err(expected).to_string();
            assert!(err.contains(expected), "expected `{expected}` in `{err}`");
        }
    }

    #[test]
    fn udp_addresses_parse_in_both_forms() {
        let l = parse_listen("UDP-LISTEN:5353,fork,reuseaddr,so-reuseport,bind=127.0.0.1").unwrap();
        let ListenEndpoint::Udp(udp) = &l.endpoint else {
            panic!("a UDP listener: {l:?}")
        };
        assert_eq!(
            (&udp.host, udp.port, udp.reuseaddr, udp.reuseport, l.once),
            (&v4(127, 0, 0, 1), 5353, true, true, false)
        );
        assert!(
            parse_listen("udp6-listen:53").unwrap().once,
            "without fork, one client"
        );
        let l = parse_listen("udp://127.0.0.1:5353").unwrap();
        assert!(l.is_udp() && !l.once && l.tls.is_none());
        for text in [
            "UDP:127.0.0.1:53",
            "udp-connect:127.0.0.1:53",
            "udp://127.0.0.1:53",
        ] {
            let t = parse_target(text).unwrap();
            let TargetEndpoint::Udp(udp) = &t.endpoint else {
                panic!("a UDP target: {t:?}")
            };
            assert_eq!((&udp.host, udp.port), (&v4(127, 0, 0, 1), 53), "{text}");
        }
        let t = parse_target("UDP:dns:53,container=web").unwrap();
        assert_eq!(t.netns, Some("container:web".parse().unwrap()));
        assert!(parse_target("UDP4:[::1]:53").is_err(), "family checked");
    }

    #[test]
    fn udp_pairs_with_udp_only_and_takes_no_tls() {
        let err = parse_pair("UDP-LISTEN:53,fork", "TCP:127.0.0.1:53").unwrap_err();
        assert!(
            err.to_string().contains("its target must be UDP too"),
            "{err}"
        );
        let err = parse_pair("TCP-LISTEN:53,fork", "UDP:127.0.0.1:53").unwrap_err();
        assert!(
            err.to_string().contains("its listener must be UDP too"),
            "{err}"
        );
        assert!(parse_pair("UDP-LISTEN:53,fork", "UDP:127.0.0.1:53").is_ok());
        let err = parse_listen("UDP-LISTEN:53,cert=/x.pem").unwrap_err();
        assert!(err.to_string().contains("`cert` is a TLS option"), "{err}");
        let err = parse_target("UDP:127.0.0.1:53,verify=0").unwrap_err();
        assert!(err.to_string().contains("no DTLS"), "{err}");
        let err = parse_listen("UDP-RECVFROM:53").unwrap_err();
        assert!(err.to_string().contains("UDP-LISTEN:<port>,fork"), "{err}");
        let err = parse_listen("UDP-LISTEN:53,backlog=5").unwrap_err();
        assert!(err.to_string().contains("no accept queue"), "{err}");
    }
}
