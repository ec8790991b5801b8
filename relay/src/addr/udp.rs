//! UDP addresses (`UDP-LISTEN`, `UDP`, `udp://`) and the check that a
//! datagram listener is paired with a datagram target.

use super::*;

/// `UDP-LISTEN:<port>[,options]` (and `UDP4-`/`UDP6-`): like TCP-LISTEN,
/// without `fork` one client only.
pub(super) fn parse_udp_listen(
    input: &str,
    family: Family,
    rest: &str,
) -> Result<ListenAddr, AddrError> {
    let (port, options) = split_options(rest);
    let mut udp = TcpListen::any_address(family, parse_port(input, port)?);
    let mut addr = ListenAddr::new(ListenEndpoint::Stdio(StdioMode::Both), input, true);
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
pub(super) fn parse_udp_target(
    input: &str,
    family: Family,
    rest: &str,
) -> Result<TargetAddr, AddrError> {
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
    let mut addr = TargetAddr::new(TargetEndpoint::Udp(UdpTarget { host, port, family }), input);
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
