//! Listen addresses: the URL form and the socat form (`TCP-LISTEN`,
//! `OPENSSL-LISTEN`, `STDIO`, and the UNIX and UDP kinds' entry points).

use super::*;

/// Parses a listen address: `host:port`, `[v6]:port`, `tcp://host:port`,
/// `unix:///path`, `unix-abstract://name`, socat's `TCP-LISTEN:<port>`,
/// `UNIX-LISTEN:<path>`, `ABSTRACT-LISTEN:<name>` (with options), or
/// `STDIO`/`-`.
pub fn parse_listen(input: &str) -> Result<ListenAddr, AddrError> {
    let (without, crlf) = take_crlf(input)?;
    let mut addr = parse_listen_form(&without)?;
    addr.crlf = crlf;
    addr.text = input.to_string();
    Ok(addr)
}

fn parse_listen_form(input: &str) -> Result<ListenAddr, AddrError> {
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
                Ok(ListenAddr::new(ListenEndpoint::Stdio(mode), input, true))
            }
            Kind::UdpListen(family) => parse_udp_listen(input, family, rest),
            Kind::File(kind) => file::parse_file_listen(input, kind, rest),
            Kind::VsockListen => vsock::parse_vsock_listen(input, rest),
            _ => unreachable!("socat_form returns listen kinds for the listen position"),
        };
    }
    let (address, netns) = split_namespace(input)?;
    if let Some(name) = unix_url(input, address)? {
        check_path_namespace(input, &name, &netns)?;
        return Ok(ListenAddr {
            netns,
            ..ListenAddr::new(
                ListenEndpoint::Unix(unix_listen_defaults(name)),
                input,
                false,
            )
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
            keepalive: false,
            buffers: SocketBuffers::default(),
        }),
        backlog: None,
        max_children: None,
        once: false,
        tls: (scheme != "tcp" && scheme != "udp").then(TlsListen::default),
        netns,
        text: input.to_string(),
        crlf: false,
    })
}

/// socat's STDIO addresses take terminal and file options relay does not
/// apply; each is refused by name rather than ignored.
pub(super) fn stdio_options(input: &str, rest: &str) -> Result<(), AddrError> {
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

impl TcpListen {
    /// A socat listen keyword's socket before its options: every address
    /// of the family, on `port`; SO_REUSEADDR only when asked, as socat.
    pub(super) fn any_address(family: Family, port: u16) -> Self {
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
            keepalive: false,
            buffers: SocketBuffers::default(),
        }
    }
}

pub(super) fn parse_socat_listen(
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
        crlf: false,
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
            "keepalive" | "so-keepalive" => tcp.keepalive = opt.flag(input)?,
            "sndbuf" | "so-sndbuf" | "rcvbuf" | "so-rcvbuf" => {
                buffer_option(input, &opt, &mut tcp.buffers)?;
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
