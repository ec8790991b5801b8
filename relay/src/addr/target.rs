//! Target addresses: the URL form and the socat form (`TCP`, `OPENSSL`,
//! `EXEC`/`SYSTEM`, `STDIO`, and the UNIX and UDP kinds' entry points).

use super::*;

/// Parses a target address: `host:port`, `[v6]:port`, `tcp://host:port`,
/// `unix:///path`, `unix-abstract://name`, socat's `TCP:<host>:<port>`,
/// `UNIX-CONNECT:<path>` (`UNIX-CLIENT:`, `UNIX:`), `ABSTRACT-CONNECT:<name>`
/// (with options), or `STDIO`/`-`.
pub fn parse_target(input: &str) -> Result<TargetAddr, AddrError> {
    let (without, crlf) = take_crlf(input)?;
    let mut addr = parse_target_form(&without)?;
    addr.crlf = crlf;
    addr.text = input.to_string();
    Ok(addr)
}

fn parse_target_form(input: &str) -> Result<TargetAddr, AddrError> {
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
            Kind::ProxyConnect(via) => parse_proxy_target(input, via, rest),
            Kind::UdpConnect(family) => parse_udp_target(input, family, rest),
            Kind::File(kind) => file::parse_file_target(input, kind, rest),
            Kind::VsockConnect => vsock::parse_vsock_target(input, rest),
            Kind::Stdio(mode) => {
                stdio_options(input, rest)?;
                Ok(TargetAddr::new(TargetEndpoint::Stdio(mode), input))
            }
            _ => unreachable!("socat_form returns connect kinds for the target position"),
        };
    }
    if let Some(addr) = proxy::parse_proxy_url(input)? {
        return Ok(addr);
    }
    if let Some(rest) = input.strip_prefix("vsock://") {
        return vsock::parse_vsock_target(input, rest);
    }
    let (address, netns) = split_namespace(input)?;
    if let Some(name) = unix_url(input, address)? {
        check_path_namespace(input, &name, &netns)?;
        return Ok(TargetAddr {
            netns,
            ..TargetAddr::new(TargetEndpoint::Unix(name), input)
        });
    }
    let (scheme, rest) = split_scheme(
        address,
        &[
            "tcp",
            "tls",
            "unix",
            "unix-abstract",
            "udp",
            "vsock",
            "socks4",
            "socks4a",
            "socks5",
            "http-connect",
        ],
    )?;
    let (host, port) = host_port(input, rest)?;
    if port == 0 {
        return Err(invalid(input, "port 0 cannot be connected to"));
    }
    if scheme == "udp" {
        return Ok(TargetAddr {
            netns,
            ..TargetAddr::new(
                TargetEndpoint::Udp(UdpTarget {
                    host,
                    port,
                    family: Family::Any,
                }),
                input,
            )
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
            buffers: SocketBuffers::default(),
            proxy: None,
        }),
        connect_timeout: None,
        retry: Retry::NONE,
        tls,
        netns,
        text: input.to_string(),
        crlf: false,
    })
}

/// `EXEC:<command>[,options]` / `SYSTEM:<command>[,options]`: the command
/// runs up to the first comma (socat's rule; a command with a comma needs a
/// script).
pub(super) fn parse_exec(input: &str, rest: &str, shell: bool) -> Result<TargetAddr, AddrError> {
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
        pty: false,
        raw: false,
        echo: None,
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
            "pty" => spec.pty = opt.flag(input)?,
            "raw" => spec.raw = opt.flag(input)?,
            "echo" => spec.echo = Some(opt.flag(input)?),
            "ctty" | "setsid" => {
                // What `pty` does anyway: the terminal is the child's
                // controlling one, in a session of its own.
                opt.flag(input)?;
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
    if !spec.pty && (spec.raw || spec.echo.is_some()) {
        return Err(invalid(
            input,
            "`raw` and `echo=` set up a terminal: add `pty` (the child's stdin and stdout are a socket pair without it)",
        ));
    }
    Ok(TargetAddr::new(TargetEndpoint::Exec(spec), input))
}

pub(super) fn parse_socat_target(
    input: &str,
    family: Family,
    rest: &str,
    tls: bool,
) -> Result<TargetAddr, AddrError> {
    let (hostport, options) = split_options(rest);
    let (host, port) = host_port(input, hostport)?;
    let tcp = TcpTarget {
        host,
        port,
        family,
        keepalive: false,
        buffers: SocketBuffers::default(),
        proxy: None,
    };
    tcp_target(input, tcp, options, tls)
}

/// A TCP target (direct, or the connection to a proxy) with its options:
/// the TCP and retry ones, the TLS ones when `tls`, the proxy's when it
/// goes through one.
pub(super) fn tcp_target(
    input: &str,
    mut tcp: TcpTarget,
    options: Option<&str>,
    tls: bool,
) -> Result<TargetAddr, AddrError> {
    let family = tcp.family;
    if tcp.port == 0 {
        return Err(invalid(input, "port 0 cannot be connected to"));
    }
    if let Host::Ip(ip) = &tcp.host
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
    // The endpoint is set once its options are read (`tcp` above).
    let mut addr = TargetAddr {
        endpoint: TargetEndpoint::Stdio(StdioMode::Both),
        connect_timeout: None,
        retry: Retry::NONE,
        tls,
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
        if proxy_option(input, &opt, &mut tcp)? {
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
        if connect_option(input, &opt, &mut addr)? {
            continue;
        }
        match opt.key.as_str() {
            // relay always sets TCP_NODELAY on both legs, so `nodelay=0`
            // cannot be honoured and is refused rather than ignored.
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
                        "address option `{other}` is not supported by relay on a connect address (supported: {CONNECT_OPTIONS}{})",
                        match (&addr.tls, &tcp.proxy) {
                            (Some(_), _) => format!(", {TLS_CONNECT_OPTIONS}"),
                            (None, Some(hop)) => format!(", {}", proxy_options(&hop.protocol)),
                            (None, None) => String::new(),
                        }
                    ),
                ));
            }
        }
    }
    addr.endpoint = TargetEndpoint::Tcp(tcp);
    Ok(addr)
}
