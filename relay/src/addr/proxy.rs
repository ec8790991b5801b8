//! Connect addresses through a proxy, in socat's spelling:
//! `SOCKS4:<socks-server>:<host>:<port>`, `SOCKS4A:...`,
//! `SOCKS5-CONNECT:<socks-server>:<socks-port>:<host>:<port>` (socat 1.8)
//! and `PROXY:<proxy>:<host>:<port>` (HTTP CONNECT). The proxy's port may
//! also be written as the second field (`SOCKS4A:proxy:1081:host:80`), as
//! socat 1.8's SOCKS5 takes it; otherwise `socksport=`/`proxyport=` or the
//! defaults (1080, 8080). Every TCP connect option applies to the
//! connection to the proxy.

use super::target::tcp_target;
use super::*;

pub(super) fn parse_proxy_target(
    input: &str,
    via: Via,
    rest: &str,
) -> Result<TargetAddr, AddrError> {
    let (fields, options) = split_options(rest);
    let parts = split_fields(input, fields)?;
    let (proxy, proxy_port, host, port) = match parts.as_slice() {
        [proxy, host, port] => (*proxy, None, *host, *port),
        [proxy, proxy_port, host, port] => (*proxy, Some(*proxy_port), *host, *port),
        _ => {
            return Err(invalid(
                input,
                format!(
                    "expected `{}:<proxy>:<host>:<port>` (or `<proxy>:<proxy-port>:<host>:<port>`)",
                    input.split(':').next().unwrap_or(input)
                ),
            ));
        }
    };
    let host = parse_host(input, unbracket(host))?;
    let port = parse_port(input, port)?;
    if port == 0 {
        return Err(invalid(input, "port 0 cannot be connected to"));
    }
    let protocol = match via {
        Via::Socks4 => ProxyProtocol::Socks4 { user: None },
        Via::Socks4a => ProxyProtocol::Socks4a { user: None },
        Via::Socks5 => ProxyProtocol::Socks5,
        Via::Http => ProxyProtocol::HttpConnect {
            auth: None,
            resolve: false,
        },
    };
    if let (
        ProxyProtocol::Socks4 { .. } | ProxyProtocol::Socks4a { .. },
        Host::Ip(IpAddr::V6(ip)),
    ) = (&protocol, &host)
    {
        return Err(invalid(
            input,
            format!(
                "SOCKS 4 carries IPv4 addresses only, not {ip}: use SOCKS5-CONNECT for an IPv6 target"
            ),
        ));
    }
    let default_port = if via == Via::Http { 8080 } else { 1080 };
    let proxy_port = proxy_port.map_or(Ok(default_port), |p| parse_port(input, p))?;
    let tcp = TcpTarget {
        host: parse_host(input, unbracket(proxy))?,
        port: proxy_port,
        family: Family::Any,
        keepalive: false,
        buffers: SocketBuffers::default(),
        proxy: Some(ProxyHop {
            protocol,
            host,
            port,
        }),
    };
    tcp_target(input, tcp, options, false)
}

/// The URL forms of a proxied target: `socks4://`, `socks4a://`,
/// `socks5://` and `http-connect://` `<proxy>[:<proxy-port>]/<host>:<port>`,
/// the same target as the socat spelling with the same fields.
pub(super) fn parse_proxy_url(input: &str) -> Result<Option<TargetAddr>, AddrError> {
    let Some((scheme, rest)) = input.split_once("://") else {
        return Ok(None);
    };
    let via = match scheme.to_ascii_lowercase().as_str() {
        "socks4" => Via::Socks4,
        "socks4a" => Via::Socks4a,
        "socks5" => Via::Socks5,
        "http-connect" => Via::Http,
        _ => return Ok(None),
    };
    let Some((proxy, target)) = rest.split_once('/') else {
        return Err(invalid(
            input,
            format!("expected `{scheme}://<proxy>[:<port>]/<host>:<port>`"),
        ));
    };
    let mut addr = parse_proxy_target(input, via, &format!("{proxy}:{target}"))?;
    addr.text = input.to_string();
    Ok(Some(addr))
}

/// Applies `opt` if it is one of the proxy's options (the proxy's port,
/// the SOCKS user, HTTP credentials); `false` leaves it to the TCP ones.
pub(super) fn proxy_option(
    input: &str,
    opt: &SocatOption<'_>,
    tcp: &mut TcpTarget,
) -> Result<bool, AddrError> {
    let Some(hop) = tcp.proxy.as_mut() else {
        return Ok(false);
    };
    match (&mut hop.protocol, opt.key.as_str()) {
        (ProxyProtocol::HttpConnect { .. }, "proxyport")
        | (
            ProxyProtocol::Socks4 { .. } | ProxyProtocol::Socks4a { .. } | ProxyProtocol::Socks5,
            "socksport",
        ) => tcp.port = parse_port(input, opt.required(input)?)?,
        (ProxyProtocol::Socks4 { user } | ProxyProtocol::Socks4a { user }, "socksuser") => {
            let value = opt.required(input)?;
            if value.len() > 255 || value.contains('\0') {
                return Err(invalid(
                    input,
                    "`socksuser=`: at most 255 bytes, without NUL",
                ));
            }
            *user = Some(value.to_string());
        }
        (ProxyProtocol::HttpConnect { auth, .. }, "proxy-authorization" | "proxyauth") => {
            let value = opt.required(input)?;
            if !value.contains(':') {
                return Err(invalid(
                    input,
                    format!("`{}=`: expected `<user>:<password>`", opt.key),
                ));
            }
            *auth = Some(ProxyAuth::Inline(value.to_string()));
        }
        (ProxyProtocol::HttpConnect { auth, .. }, "proxy-authorization-file") => {
            *auth = Some(ProxyAuth::File(opt.path(input)?));
        }
        (ProxyProtocol::HttpConnect { resolve, .. }, "resolve") => *resolve = opt.flag(input)?,
        // relay takes a reply's lines ending in a bare NL always, so the
        // option changes nothing.
        (ProxyProtocol::HttpConnect { .. }, "ignorecr") => {
            opt.flag(input)?;
        }
        _ => return Ok(false),
    }
    Ok(true)
}

/// The options a proxied address takes beyond the TCP ones.
pub(super) fn proxy_options(protocol: &ProxyProtocol) -> &'static str {
    match protocol {
        ProxyProtocol::Socks4 { .. } | ProxyProtocol::Socks4a { .. } => SOCKS4_OPTIONS,
        ProxyProtocol::Socks5 => SOCKS5_OPTIONS,
        ProxyProtocol::HttpConnect { .. } => HTTP_PROXY_OPTIONS,
    }
}

/// Splits `a:b:c` at colons outside brackets, so `[::1]` stays one field.
fn split_fields<'a>(input: &str, text: &'a str) -> Result<Vec<&'a str>, AddrError> {
    let mut fields = Vec::new();
    let mut start = 0;
    let mut depth = 0usize;
    for (i, c) in text.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| invalid(input, "`]` without `[`"))?
            }
            ':' if depth == 0 => {
                fields.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(invalid(
            input,
            "missing `]` after an IPv6 address; expected `[v6addr]`",
        ));
    }
    fields.push(&text[start..]);
    Ok(fields)
}

fn unbracket(host: &str) -> &str {
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}
