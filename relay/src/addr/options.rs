//! Options shared by several address kinds (`backlog=`, `max-children=`,
//! `range=`, `retry=`, `bind=`, the TLS option keys), parsed once here.

use super::*;

/// relay always sets TCP_NODELAY on both legs, so `nodelay=0` cannot be
/// honoured and is refused rather than ignored.
pub(super) fn no_nodelay_off(input: &str, opt: &SocatOption<'_>) -> Result<(), AddrError> {
    if opt.flag(input)? {
        Ok(())
    } else {
        Err(invalid(
            input,
            "`nodelay=0` cannot be honoured: relay always sets TCP_NODELAY",
        ))
    }
}

/// `sndbuf=<bytes>` / `rcvbuf=<bytes>` (and their `so-` spellings).
pub(super) fn buffer_option(
    input: &str,
    opt: &SocatOption<'_>,
    buffers: &mut SocketBuffers,
) -> Result<(), AddrError> {
    let value = opt.required(input)?;
    let size = value
        .parse::<u32>()
        .ok()
        .filter(|n| (1..=1 << 30).contains(n))
        .ok_or_else(|| {
            invalid(
                input,
                format!(
                    "`{}={value}`: expected a buffer size in bytes, such as 262144",
                    opt.key
                ),
            )
        })?;
    if opt.key.contains("snd") {
        buffers.send = Some(size);
    } else {
        buffers.recv = Some(size);
    }
    Ok(())
}

pub(super) fn max_children(input: &str, opt: &SocatOption<'_>) -> Result<u32, AddrError> {
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
pub(super) fn parse_range(input: &str, value: &str) -> Result<IpNet, AddrError> {
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

/// The options every connect address takes: `connect-timeout=`, and the
/// retries (`retry=`, `interval=`, `forever`). `false`: `opt` is none of
/// them, for the kind's own parser.
pub(super) fn connect_option(
    input: &str,
    opt: &SocatOption<'_>,
    addr: &mut TargetAddr,
) -> Result<bool, AddrError> {
    match opt.key.as_str() {
        "connect-timeout" => {
            addr.connect_timeout = Some(parse_seconds(input, &opt.key, opt.required(input)?)?);
        }
        "retry" | "interval" | "forever" => retry_option(input, opt, &mut addr.retry)?,
        _ => return Ok(false),
    }
    Ok(true)
}

/// `retry=<n>`, `interval=<seconds>`, `forever` (socat's connect retries).
pub(super) fn retry_option(
    input: &str,
    opt: &SocatOption<'_>,
    retry: &mut Retry,
) -> Result<(), AddrError> {
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
pub(super) fn refused_option(input: &str, key: &str) -> Result<(), AddrError> {
    match crate::socat_table::refusal(key) {
        Some((name, instead)) => Err(invalid(
            input,
            format!("socat option `{name}` is not supported: {instead}"),
        )),
        None => Ok(()),
    }
}

pub(super) fn backlog(input: &str, opt: &SocatOption<'_>) -> Result<u32, AddrError> {
    let value = opt.required(input)?;
    value
        .parse()
        .map_err(|_| invalid(input, format!("`backlog={value}`: expected a whole number")))
}

/// socat's TLS options, which a UDP address cannot take (relay speaks no DTLS).
pub(super) const TLS_OPTION_KEYS: &[&str] = &[
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

pub(super) fn refuse_tls_on_udp(input: &str, key: &str) -> Result<(), AddrError> {
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
pub(super) fn bind_ip(input: &str, opt: &SocatOption<'_>) -> Result<IpAddr, AddrError> {
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
