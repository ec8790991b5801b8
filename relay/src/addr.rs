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
    pub host: Host,
    pub port: u16,
    pub family: Family,
    pub reuseaddr: bool,
    pub reuseport: bool,
    pub backlog: Option<u32>,
    /// Serve one connection and exit: socat's listen address without `fork`.
    pub once: bool,
    /// TLS termination (`tls://`, `OPENSSL-LISTEN:`).
    pub tls: Option<TlsListen>,
    /// Listen inside this namespace (`...@container:web`, socat `netns=`).
    pub netns: Option<Target>,
    /// The address as the user wrote it, for logs and the default route name.
    pub text: String,
}

/// Where the relay connects for each accepted client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetAddr {
    pub host: Host,
    pub port: u16,
    pub family: Family,
    /// Per-address `connect-timeout=`; overrides `--connect-timeout`.
    pub connect_timeout: Option<Duration>,
    pub keepalive: bool,
    /// TLS origination (`tls://`, `OPENSSL:`).
    pub tls: Option<TlsTarget>,
    /// Connect from inside this namespace (`...@container:web`, socat `netns=`).
    pub netns: Option<Target>,
    pub text: String,
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

const LISTEN_KEYWORDS: &[(&str, Family)] = &[
    ("tcp-listen", Family::Any),
    ("tcp-l", Family::Any),
    ("tcp4-listen", Family::V4),
    ("tcp4-l", Family::V4),
    ("tcp6-listen", Family::V6),
    ("tcp6-l", Family::V6),
];

const TLS_LISTEN_KEYWORDS: &[(&str, Family)] =
    &[("openssl-listen", Family::Any), ("ssl-l", Family::Any)];
const TLS_CONNECT_KEYWORDS: &[(&str, Family)] = &[
    ("openssl", Family::Any),
    ("ssl", Family::Any),
    ("openssl-connect", Family::Any),
];

const CONNECT_KEYWORDS: &[(&str, Family)] = &[
    ("tcp", Family::Any),
    ("tcp-connect", Family::Any),
    ("tcp4", Family::V4),
    ("tcp4-connect", Family::V4),
    ("tcp6", Family::V6),
    ("tcp6-connect", Family::V6),
];

const LISTEN_OPTIONS: &str =
    "fork, reuseaddr, reuseport, bind=<addr>, backlog=<n>, netns=, container=, pid=";
const TLS_LISTEN_OPTIONS: &str = "cert=, key=, cafile=, capath=, verify=0|1";
const CONNECT_OPTIONS: &str =
    "connect-timeout=<seconds>, nodelay, keepalive, netns=, container=, pid=";
const TLS_CONNECT_OPTIONS: &str =
    "cafile=, capath=, cert=, key=, snihost=, no-sni, commonname=, verify=0|1";

/// Splits a socat address into its keyword and the rest, when the keyword is
/// one of `keywords` (case-insensitive, as socat's are).
fn socat_keyword<'a>(input: &'a str, keywords: &[(&str, Family)]) -> Option<(Family, &'a str)> {
    let (word, rest) = input.split_once(':')?;
    keywords
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(word))
        .map(|(_, family)| (*family, rest))
}

/// socat address types relay does not (yet) speak: named so that, for
/// example, `UDP-LISTEN:53` is refused as such instead of being looked up as
/// a host called `UDP-LISTEN`.
const OTHER_SOCAT_TYPES: &[&str] = &[
    "udp",
    "udp4",
    "udp6",
    "udp-listen",
    "udp4-listen",
    "udp6-listen",
    "udp-l",
    "udp-sendto",
    "udp-recvfrom",
    "udp-recv",
    "udp-datagram",
    "unix",
    "unix-connect",
    "unix-listen",
    "unix-l",
    "unix-sendto",
    "unix-recvfrom",
    "unix-client",
    "abstract-connect",
    "abstract-listen",
    "exec",
    "system",
    "stdio",
    "stdin",
    "stdout",
    "stderr",
    "pipe",
    "file",
    "open",
    "gopen",
    "create",
    "fd",
    "pty",
    "readline",
    "tun",
    "socks4",
    "socks4a",
    "socks5",
    "proxy",
    "proxy-connect",
    "sctp",
    "sctp-listen",
    "sctp-connect",
    "vsock-listen",
    "vsock-connect",
    "ip",
    "ip4",
    "ip6",
    "ip-sendto",
    "interface",
    "dccp-listen",
    "dccp-connect",
    "udplite-listen",
    "udplite-connect",
    "tcp-sendto",
];

/// Is this string written in socat's address form rather than `host:port`?
/// A known socat type always is; otherwise a keyword-looking word (letters,
/// digits, dashes) followed by something other than a bare port.
fn looks_like_socat(input: &str) -> bool {
    input.split_once(':').is_some_and(|(word, rest)| {
        OTHER_SOCAT_TYPES
            .iter()
            .any(|t| t.eq_ignore_ascii_case(word))
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

/// The socat keywords one address position takes (plain and TLS), the
/// other position's, and what to say about a keyword that does not fit.
struct Position {
    plain: &'static [(&'static str, Family)],
    tls: &'static [(&'static str, Family)],
    other_side: [&'static [(&'static str, Family)]; 2],
    wrong_side: &'static str,
    expected: &'static str,
}

const LISTEN_POSITION: Position = Position {
    plain: LISTEN_KEYWORDS,
    tls: TLS_LISTEN_KEYWORDS,
    other_side: [CONNECT_KEYWORDS, TLS_CONNECT_KEYWORDS],
    wrong_side: "this is a connect address; the first address must listen (for example `TCP-LISTEN:8080,fork`)",
    expected: "TCP-LISTEN, TCP4-LISTEN, TCP6-LISTEN, TCP-L or OPENSSL-LISTEN",
};

const TARGET_POSITION: Position = Position {
    plain: CONNECT_KEYWORDS,
    tls: TLS_CONNECT_KEYWORDS,
    other_side: [LISTEN_KEYWORDS, TLS_LISTEN_KEYWORDS],
    wrong_side: "this is a listen address; the second address must connect (for example `TCP:host:port`)",
    expected: "TCP, TCP4, TCP6, TCP-CONNECT or OPENSSL",
};

/// For an address in socat's form: its family, the part after the keyword,
/// and whether it is the TLS keyword. `None` for the URL form.
fn socat_form<'a>(
    input: &'a str,
    position: &Position,
) -> Result<Option<(Family, &'a str, bool)>, AddrError> {
    if input.contains("://") {
        return Ok(None);
    }
    if let Some((family, rest)) = socat_keyword(input, position.plain) {
        return Ok(Some((family, rest, false)));
    }
    if let Some((family, rest)) = socat_keyword(input, position.tls) {
        return Ok(Some((family, rest, true)));
    }
    if position
        .other_side
        .iter()
        .any(|keywords| socat_keyword(input, keywords).is_some())
    {
        return Err(invalid(input, position.wrong_side));
    }
    if looks_like_socat(input) {
        let word = input.split_once(':').map_or(input, |(w, _)| w);
        return Err(invalid(
            input,
            format!(
                "socat address type `{word}` is not supported here; expected {}",
                position.expected
            ),
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

/// Parses a listen address: `host:port`, `[v6]:port`, `tcp://host:port`, or
/// socat's `TCP-LISTEN:<port>[,options]`.
pub fn parse_listen(input: &str) -> Result<ListenAddr, AddrError> {
    if let Some((family, rest, tls)) = socat_form(input, &LISTEN_POSITION)? {
        return parse_socat_listen(input, family, rest, tls);
    }
    let (address, netns) = split_namespace(input)?;
    let (scheme, rest) = split_scheme(address, &["tcp", "tls", "tls-listen"])?;
    let (host, port) = host_port(input, rest)?;
    Ok(ListenAddr {
        host,
        port,
        family: Family::Any,
        reuseaddr: true,
        reuseport: false,
        backlog: None,
        once: false,
        tls: (scheme != "tcp").then(TlsListen::default),
        netns,
        text: input.to_string(),
    })
}

fn parse_socat_listen(
    input: &str,
    family: Family,
    rest: &str,
    tls: bool,
) -> Result<ListenAddr, AddrError> {
    let (port, options) = rest
        .split_once(',')
        .map_or((rest, None), |(p, o)| (p, Some(o)));
    let mut addr = ListenAddr {
        host: Host::Ip(match family {
            Family::V6 => IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED),
            _ => IpAddr::from(std::net::Ipv4Addr::UNSPECIFIED),
        }),
        port: parse_port(input, port)?,
        family,
        // socat sets SO_REUSEADDR only when asked.
        reuseaddr: false,
        reuseport: false,
        backlog: None,
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
            "reuseaddr" | "so-reuseaddr" => addr.reuseaddr = opt.flag(input)?,
            "reuseport" | "so-reuseport" => addr.reuseport = opt.flag(input)?,
            "bind" => {
                let value = opt.required(input)?;
                // socat allows `bind=host` or `bind=host:port`; the port of a
                // listen address is the one after the keyword.
                let host = value
                    .strip_prefix('[')
                    .and_then(|v| v.strip_suffix(']'))
                    .unwrap_or(value);
                // A listener binds an address of this host: a name would be
                // a DNS lookup at start, and a typo an exit 1 after it.
                let ip: IpAddr = host.parse().map_err(|_| {
                    invalid(
                        input,
                        format!(
                            "`bind={value}`: expected an IP address of this host (for example bind=127.0.0.1 or bind=[::1])"
                        ),
                    )
                })?;
                addr.host = Host::Ip(ip);
            }
            "backlog" => {
                let value = opt.required(input)?;
                addr.backlog = Some(value.parse().map_err(|_| {
                    invalid(input, format!("`backlog={value}`: expected a whole number"))
                })?);
            }
            other => {
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
    if let Host::Ip(ip) = &addr.host
        && !family.admits(ip)
    {
        return Err(invalid(
            input,
            format!("`bind={ip}` does not match the address family of this keyword"),
        ));
    }
    Ok(addr)
}

/// Parses a target address: `host:port`, `[v6]:port`, `tcp://host:port`, or
/// socat's `TCP:<host>:<port>[,options]`.
pub fn parse_target(input: &str) -> Result<TargetAddr, AddrError> {
    if let Some((family, rest, tls)) = socat_form(input, &TARGET_POSITION)? {
        return parse_socat_target(input, family, rest, tls);
    }
    let (address, netns) = split_namespace(input)?;
    let (scheme, rest) = split_scheme(address, &["tcp", "tls"])?;
    let (host, port) = host_port(input, rest)?;
    if port == 0 {
        return Err(invalid(input, "port 0 cannot be connected to"));
    }
    let tls = (scheme == "tls").then(|| TlsTarget {
        verify: true,
        ..TlsTarget::default()
    });
    Ok(TargetAddr {
        host,
        port,
        family: Family::Any,
        connect_timeout: None,
        keepalive: false,
        tls,
        netns,
        text: input.to_string(),
    })
}

fn parse_socat_target(
    input: &str,
    family: Family,
    rest: &str,
    tls: bool,
) -> Result<TargetAddr, AddrError> {
    let (hostport, options) = rest
        .split_once(',')
        .map_or((rest, None), |(h, o)| (h, Some(o)));
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
    let mut addr = TargetAddr {
        host,
        port,
        family,
        connect_timeout: None,
        keepalive: false,
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
            "nodelay" | "tcp-nodelay" => {
                if !opt.flag(input)? {
                    return Err(invalid(
                        input,
                        "`nodelay=0` cannot be honoured: relay always sets TCP_NODELAY",
                    ));
                }
            }
            "keepalive" | "so-keepalive" => addr.keepalive = opt.flag(input)?,
            other => {
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
    Ok(addr)
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
            assert_eq!((t.host, t.port), (v4(127, 0, 0, 1), 80), "{text}");
        }
        let t = parse_target("[::1]:6379").unwrap();
        assert_eq!(t.host, Host::Ip(IpAddr::V6(Ipv6Addr::LOCALHOST)));
        let t = parse_target("redis.internal:6379").unwrap();
        assert_eq!(t.host, Host::Name("redis.internal".into()));
        let t = parse_target("my-redis:6379").unwrap();
        assert_eq!(t.host, Host::Name("my-redis".into()));
    }

    #[test]
    fn socat_listen_keeps_socat_semantics() {
        let l = parse_listen("TCP-LISTEN:8080,fork,reuseaddr").unwrap();
        assert_eq!(
            (l.port, l.once, l.reuseaddr, l.reuseport),
            (8080, false, true, false)
        );
        assert_eq!(l.host, v4(0, 0, 0, 0));
        let l = parse_listen("tcp-l:8080").unwrap();
        assert!(l.once, "socat without fork serves one connection");
        assert!(!l.reuseaddr);
        let l = parse_listen("TCP6-LISTEN:443,bind=[::1],backlog=512,reuseport,fork").unwrap();
        assert_eq!(l.host, Host::Ip(IpAddr::V6(Ipv6Addr::LOCALHOST)));
        assert_eq!(
            (l.family, l.backlog, l.reuseport),
            (Family::V6, Some(512), true)
        );
        let l = parse_listen("TCP4-LISTEN:80,bind=127.0.0.2,fork=1").unwrap();
        assert_eq!((l.host, l.once), (v4(127, 0, 0, 2), false));
    }

    #[test]
    fn socat_connect_options() {
        let t = parse_target("TCP:db:5432,connect-timeout=2.5,nodelay,keepalive").unwrap();
        assert_eq!(t.host, Host::Name("db".into()));
        assert_eq!(t.connect_timeout, Some(Duration::from_millis(2500)));
        assert!(t.keepalive);
        let t = parse_target("tcp6-connect:[::1]:80").unwrap();
        assert_eq!(t.family, Family::V6);
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
            (t.port, t.netns.map(|n| n.spec())),
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
                parse_listen("TCP-LISTEN:80,nodelay").map(|_| ()),
                "option `nodelay`",
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
                parse_listen("UDP-LISTEN:5353").map(|_| ()),
                "`UDP-LISTEN` is not supported",
            ),
            (
                parse_target("unix-connect:/run/x.sock").map(|_| ()),
                "`unix-connect` is not supported",
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
}
