//! UNIX stream socket addresses: `UNIX-LISTEN`, `UNIX-CONNECT`, `UNIX`,
//! `ABSTRACT-*` and the `unix://` URLs, paths checked against the namespace
//! they are reached in.

use super::*;

/// A UNIX address in URL form, or `None` for another scheme:
/// `unix:///run/x.sock` (a path, which must be absolute) or
/// `unix-abstract://name`.
pub(super) fn unix_url(input: &str, address: &str) -> Result<Option<UnixName>, AddrError> {
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

pub(super) fn unix_path(input: &str, path: &str) -> Result<UnixName, AddrError> {
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

pub(super) fn abstract_name(input: &str, name: &str) -> Result<UnixName, AddrError> {
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
pub(super) fn check_path_namespace(
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

pub(super) fn unix_listen_defaults(name: UnixName) -> UnixListen {
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

pub(super) fn parse_unix_listen(
    input: &str,
    name: UnixName,
    options: Option<&str>,
) -> Result<ListenAddr, AddrError> {
    let is_path = matches!(name, UnixName::Path(_));
    let mut unix = unix_listen_defaults(name);
    // Filled in below; the endpoint is set once its options are read.
    let mut addr = ListenAddr::new(ListenEndpoint::Stdio(StdioMode::Both), input, true);
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

pub(super) fn parse_unix_target(
    input: &str,
    name: UnixName,
    options: Option<&str>,
) -> Result<TargetAddr, AddrError> {
    let mut addr = TargetAddr::new(TargetEndpoint::Unix(name), input);
    for opt in socat_options(input, options) {
        let opt = opt?;
        if let Some(target) = namespace_option(input, &opt)? {
            addr.netns = Some(target);
            continue;
        }
        if connect_option(input, &opt, &mut addr)? {
            continue;
        }
        refused_option(input, &opt.key)?;
        return Err(invalid(
            input,
            format!(
                "address option `{}` is not supported by relay on a UNIX connect address (supported: {UNIX_CONNECT_OPTIONS})",
                opt.key
            ),
        ));
    }
    if let TargetEndpoint::Unix(name) = &addr.endpoint {
        check_path_namespace(input, name, &addr.netns)?;
    }
    Ok(addr)
}
