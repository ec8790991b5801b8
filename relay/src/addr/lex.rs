//! Tokens of both address forms: the socat keyword and `,key=value` options,
//! `host:port` and `[v6]:port`, ports, seconds, URL schemes and the
//! `@netns:` / `netns=` namespace parts.

use super::*;

/// Is this string written in socat's address form rather than `host:port`?
/// A known socat type always is; otherwise a keyword-looking word (letters,
/// digits, dashes) followed by something other than a bare port.
pub(super) fn looks_like_socat(input: &str) -> bool {
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
pub(super) struct SocatOption<'a> {
    pub(super) key: String,
    pub(super) value: Option<&'a str>,
}

impl SocatOption<'_> {
    /// socat's boolean options take no value or `=0`/`=1`.
    pub(super) fn flag(&self, input: &str) -> Result<bool, AddrError> {
        match self.value {
            None | Some("1") => Ok(true),
            Some("0") => Ok(false),
            Some(other) => Err(invalid(
                input,
                format!("option `{}` takes 0 or 1, not `{other}`", self.key),
            )),
        }
    }

    pub(super) fn path(&self, input: &str) -> Result<PathBuf, AddrError> {
        self.required(input).map(PathBuf::from)
    }

    pub(super) fn required(&self, input: &str) -> Result<&str, AddrError> {
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
pub(super) fn socat_options<'a>(
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
pub(super) fn host_port(input: &str, part: &str) -> Result<(Host, u16), AddrError> {
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

pub(super) fn parse_host(input: &str, host: &str) -> Result<Host, AddrError> {
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

pub(super) fn parse_port(input: &str, port: &str) -> Result<u16, AddrError> {
    port.parse::<u16>()
        .map_err(|_| invalid(input, format!("`{port}` is not a port number (0-65535)")))
}

pub(super) fn parse_seconds(input: &str, key: &str, value: &str) -> Result<Duration, AddrError> {
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
pub(super) fn split_scheme<'a>(
    input: &'a str,
    schemes: &[&str],
) -> Result<(String, &'a str), AddrError> {
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
pub(super) enum Position {
    Listen,
    Target,
}

/// For an address in socat's form: its kind and the part after the
/// keyword. `None` for the URL form.
pub(super) fn socat_form(
    input: &str,
    position: Position,
) -> Result<Option<(Kind, &str)>, AddrError> {
    if input.contains("://") {
        return Ok(None);
    }
    if let Some((kind, rest)) = socat_keyword(input) {
        return match position {
            Position::Listen if matches!(kind, Kind::Exec { .. }) => Err(invalid(
                input,
                "EXEC/SYSTEM does not listen: put a listener first and the program second (`TCP-LISTEN:8080,fork EXEC:/usr/bin/cat`), \
                 or in the socat form the program first and a connect address second (`relay EXEC:cmd TCP:host:port`: one program, one connection)",
            )),
            Position::Listen if !kind.listens() => Err(invalid(
                input,
                "this is a connect address; the first address must listen (for example `TCP-LISTEN:8080,fork`), or be STDIO (in the socat form two connect addresses are joined once: `relay TCP:a:1 TCP:b:2`)",
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
                "TCP-LISTEN, TCP4-LISTEN, TCP6-LISTEN, TCP-L, OPENSSL-LISTEN, UNIX-LISTEN, ABSTRACT-LISTEN, UDP-LISTEN, UDP4-LISTEN, UDP6-LISTEN, OPEN, CREATE, GOPEN, PIPE or STDIO"
            }
            Position::Target => {
                "TCP, TCP4, TCP6, TCP-CONNECT, OPENSSL, UNIX-CONNECT, UNIX-CLIENT, UNIX, ABSTRACT-CONNECT, UDP, UDP4, UDP6, UDP-CONNECT, SOCKS4, SOCKS4A, SOCKS5-CONNECT, PROXY, OPEN, CREATE, GOPEN, PIPE or STDIO"
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
pub(super) fn split_namespace(input: &str) -> Result<(&str, Option<Target>), AddrError> {
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
pub(super) fn namespace_option(
    input: &str,
    opt: &SocatOption<'_>,
) -> Result<Option<Target>, AddrError> {
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

/// socat's `crlf`, which every address kind takes: taken out of the
/// option list here, so that no kind's own parser sees it. The address
/// without it, and whether it was set.
pub(super) fn take_crlf(input: &str) -> Result<(String, bool), AddrError> {
    let Some((head, options)) = input.split_once(',') else {
        return Ok((input.to_string(), false));
    };
    let mut crlf = false;
    let mut kept = vec![head];
    for (opt, text) in socat_options(input, Some(options)).zip(options.split(',')) {
        let opt = opt?;
        if opt.key == "crlf" {
            crlf = opt.flag(input)?;
        } else {
            kept.push(text);
        }
    }
    Ok((kept.join(","), crlf))
}

pub(super) fn split_options(rest: &str) -> (&str, Option<&str>) {
    rest.split_once(',')
        .map_or((rest, None), |(h, o)| (h, Some(o)))
}
