//! The socat conformance table: every socat address option relay knows,
//! each supported (what relay does, and how socat differs if it does),
//! refused (why, and what to use instead) or not applicable. The address
//! parser refuses by this table, `relay --explain` describes a command
//! line from it, and the README's "socat conformance" section is
//! generated from it (a test fails when the README differs).
//!
//! Global flags have their table in [`crate::socat_flags`]; address types
//! come from the parser's keyword tables ([`addr::address_types`]).

use crate::addr::{self, AddrError};
use crate::socat_flags::{self, FlagStatus};

/// What relay does with one socat address option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Taken as socat takes it; the text says what it does (and how
    /// relay differs, if it does).
    Supported(&'static str),
    /// Refused with exit 2: why, and what to use instead.
    Refused(&'static str),
}

/// socat address options: name (and aliases), where they apply, status.
pub const OPTIONS: &[(&str, &str, Status)] = &[
    (
        "fork",
        "listen",
        Status::Supported(
            "serve every client (one task each, not a process); without it, one client and exit",
        ),
    ),
    (
        "reuseaddr",
        "TCP listen",
        Status::Supported("SO_REUSEADDR (socat sets it only when asked, as relay's socat form)"),
    ),
    (
        "reuseport, so-reuseport",
        "TCP listen",
        Status::Supported("SO_REUSEPORT"),
    ),
    (
        "bind",
        "TCP listen",
        Status::Supported("listen on this IP of the host (a name is refused)"),
    ),
    ("backlog", "listen", Status::Supported("listen(2) backlog")),
    (
        "max-children",
        "listen",
        Status::Supported(
            "open connections at most (--max-connections wins); more wait in the backlog, counted as outcome=\"limit\"",
        ),
    ),
    (
        "range",
        "TCP listen",
        Status::Supported(
            "admit only clients inside these networks (repeatable: any may match); others are closed before the target is connected, counted as outcome=\"denied\"",
        ),
    ),
    (
        "nodelay, tcp-nodelay",
        "TCP listen and connect",
        Status::Supported("TCP_NODELAY: relay sets it on both legs always; nodelay=0 is refused"),
    ),
    (
        "keepalive, so-keepalive",
        "TCP listen and connect",
        Status::Supported(
            "SO_KEEPALIVE: on a connect address the target leg's, on a listener every accepted connection's",
        ),
    ),
    (
        "connect-timeout",
        "connect",
        Status::Supported("give up an attempt after this many seconds"),
    ),
    (
        "retry",
        "connect",
        Status::Supported(
            "repeat a failed connect this many times, counted in relay_upstream_connect_retries_total",
        ),
    ),
    (
        "interval",
        "connect",
        Status::Supported("seconds between retries (default 1)"),
    ),
    (
        "forever",
        "connect",
        Status::Supported(
            "retry without end, each attempt bounded by the connect timeout, until the client leaves or the route drains",
        ),
    ),
    (
        "unlink-early",
        "UNIX listen",
        Status::Supported(
            "remove a socket file left at the path before binding (never another kind of file)",
        ),
    ),
    (
        "unlink-close",
        "UNIX listen",
        Status::Supported("remove the socket file when the route closes (on by default, as socat)"),
    ),
    (
        "mode, perm",
        "UNIX listen",
        Status::Supported("permission bits of the socket file (octal)"),
    ),
    (
        "user, owner, uid",
        "UNIX listen",
        Status::Supported("owner of the socket file"),
    ),
    (
        "group, gid",
        "UNIX listen",
        Status::Supported("group of the socket file"),
    ),
    (
        "netns, container, pid",
        "any socket address",
        Status::Supported(
            "listen or connect inside that namespace (container= and pid= are relay's)",
        ),
    ),
    (
        "cert, key",
        "OPENSSL",
        Status::Supported("the certificate and key (PEM)"),
    ),
    (
        "cafile, capath",
        "OPENSSL",
        Status::Supported("trust roots (listener: for client certificates)"),
    ),
    (
        "verify",
        "OPENSSL",
        Status::Supported("verify=0 turns certificate checks off (logged as a warning)"),
    ),
    (
        "snihost, no-sni",
        "OPENSSL connect",
        Status::Supported("the SNI name sent, or none"),
    ),
    (
        "commonname, cn",
        "OPENSSL connect",
        Status::Supported("the name the target's certificate must carry"),
    ),
    (
        "stderr",
        "EXEC, SYSTEM",
        Status::Supported("the child's stderr goes into the connection too"),
    ),
    (
        "pty",
        "EXEC, SYSTEM",
        Status::Supported(
            "the child on a new terminal, its controlling one (also ctty, setsid); a half-close reaches it as the terminal's end-of-file; raw and echo= set it up",
        ),
    ),
    (
        "socksport",
        "SOCKS4, SOCKS4A, SOCKS5-CONNECT",
        Status::Supported("the SOCKS server's port (default 1080; also the second field)"),
    ),
    (
        "socksuser",
        "SOCKS4, SOCKS4A",
        Status::Supported("the user id sent (default $LOGNAME or $USER, as socat)"),
    ),
    (
        "proxyport",
        "PROXY",
        Status::Supported("the HTTP proxy's port (default 8080; also the second field)"),
    ),
    (
        "proxy-authorization, proxyauth",
        "PROXY",
        Status::Supported("`user:password`, sent as Proxy-Authorization: Basic"),
    ),
    (
        "proxy-authorization-file",
        "PROXY",
        Status::Supported(
            "the credentials read from this file at each connect (kept out of the process list)",
        ),
    ),
    (
        "resolve",
        "PROXY",
        Status::Supported("relay resolves the host (IPv4) and sends the address in CONNECT"),
    ),
    (
        "ignorecr",
        "PROXY",
        Status::Supported("accepted: relay takes a bare NL as a line end in the reply always"),
    ),
    (
        "sndbuf, so-sndbuf",
        "TCP listen and connect",
        Status::Supported(
            "SO_SNDBUF in bytes (the kernel doubles it and stops autotuning that buffer); on a listener, every accepted connection's",
        ),
    ),
    (
        "rcvbuf, so-rcvbuf",
        "TCP listen and connect",
        Status::Supported(
            "SO_RCVBUF in bytes (the kernel doubles it and stops autotuning that buffer); on a listener, every accepted connection's",
        ),
    ),
    (
        "crlf",
        "any",
        Status::Supported(
            "NL written to this address goes as CR NL, CRs read from it are dropped (socat's conversion); the route copies",
        ),
    ),
    (
        "ignoreeof",
        "OPEN, FILE, GOPEN, PIPE",
        Status::Supported(
            "at the end of the file, wait a second and read again (`tail -f`); on other addresses refused",
        ),
    ),
    (
        "creat, create",
        "OPEN, FILE, GOPEN, PIPE",
        Status::Supported("make the file if it is missing"),
    ),
    (
        "excl",
        "OPEN, FILE, GOPEN, PIPE",
        Status::Supported("with creat: fail if the file exists"),
    ),
    (
        "append",
        "file addresses",
        Status::Supported("write at the end of the file"),
    ),
    (
        "trunc",
        "file addresses",
        Status::Supported("empty the file when it is opened (CREATE always does)"),
    ),
    (
        "rdonly, wronly, rdwr",
        "file addresses",
        Status::Supported(
            "open for reading, writing or both; without them, the way the route uses the file (socat's -u opens the first address for reading only)",
        ),
    ),
    (
        "perm, mode",
        "file addresses",
        Status::Supported("permission bits (octal) of a file relay makes, before umask"),
    ),
    (
        "link",
        "PTY",
        Status::Supported(
            "a symbolic link to the new terminal, made when it opens (replacing an old link) and removed when the connection ends",
        ),
    ),
    (
        "raw",
        "file addresses (a terminal), PTY, EXEC with pty",
        Status::Supported(
            "the terminal in raw mode (cfmakeraw: no line editing, CR and NL unchanged)",
        ),
    ),
    (
        "echo",
        "file addresses (a terminal), PTY, EXEC with pty",
        Status::Supported("echo=0 turns the terminal's echo off, echo=1 on"),
    ),
    ("su, substuser", "any", Status::Refused(SU)),
    ("su-d, substuser-delayed", "any", Status::Refused(SU)),
];

const SU: &str = "relay does not switch users: run relay as that user (the systemd unit's User=, or `runuser -u USER -- relay ...`)";

/// The table entry of `key` (any alias, any case).
pub fn lookup(key: &str) -> Option<(&'static str, &'static str, Status)> {
    let key = key.to_ascii_lowercase();
    OPTIONS
        .iter()
        .find(|(names, _, _)| names.split(", ").any(|n| n == key))
        .copied()
}

/// Why relay refuses `key`, if the table refuses it: its first name and
/// what to use instead.
pub fn refusal(key: &str) -> Option<(&'static str, &'static str)> {
    match lookup(key)? {
        (names, _, Status::Refused(instead)) => {
            Some((names.split(", ").next().unwrap_or(names), instead))
        }
        _ => None,
    }
}

/// What relay will do with a socat command line's two addresses: each
/// address, then each of its options from the table. An address relay
/// refuses is the parser's error, the same message a run gives.
pub fn explain(first: &str, second: &str) -> Result<String, AddrError> {
    let (listen, target) = addr::parse_pair(first, second)?;
    let mut out = String::new();
    let describe = |out: &mut String, role: &str, text: &str| {
        let (keyword, options) = text.split_once(',').unwrap_or((text, ""));
        out.push_str(&format!("{role}: {keyword}\n"));
        for option in options.split(',').filter(|o| !o.is_empty()) {
            let key = option.split_once('=').map_or(option, |(k, _)| k);
            let what = match lookup(key) {
                Some((_, _, Status::Supported(what))) => what,
                // The parser refused refused options already.
                _ => "accepted",
            };
            out.push_str(&format!("  {option}: {what}\n"));
        }
    };
    describe(&mut out, "listen", &listen.text);
    if listen.once {
        out.push_str("  (no fork: serves one client, then exits with its status, as socat)\n");
    }
    describe(&mut out, "connect", &target.text);
    if target.tcp().is_some() || matches!(target.endpoint, addr::TargetEndpoint::Unix(_)) {
        out.push_str("  (each client gets its own connection to the target)\n");
    }
    out.push_str("differences from socat: relay closes connections idle for 10 minutes (socat never does; -T none turns it off) and logs at info by default\n");
    Ok(out)
}

/// The README's "socat conformance" tables, generated from [`OPTIONS`] and
/// [`socat_flags::FLAGS`].
pub fn conformance_markdown() -> String {
    let mut out = String::from("| socat address type | relay |\n|---|---|\n");
    for (names, status) in addr::address_types() {
        let names = names
            .split(", ")
            .map(|n| format!("`{}`", n.to_ascii_uppercase()))
            .collect::<Vec<_>>()
            .join(", ");
        let status = match status {
            Ok(what) => Status::Supported(what),
            Err(why) => Status::Refused(why),
        };
        out.push_str(&format!("| {names} | {} |\n", cell(status)));
    }
    out.push_str("\n| socat option | applies to | relay |\n|---|---|---|\n");
    for (names, applies, status) in OPTIONS {
        let names = names
            .split(", ")
            .map(|n| format!("`{n}`"))
            .collect::<Vec<_>>()
            .join(", ");
        out.push_str(&format!("| {names} | {applies} | {} |\n", cell(*status)));
    }
    out.push_str("\n| socat flag | relay |\n|---|---|\n");
    for (flag, _, status) in socat_flags::FLAGS {
        let status = match status {
            FlagStatus::Supported(what) => Status::Supported(what),
            FlagStatus::Refused(why) => Status::Refused(why),
        };
        out.push_str(&format!("| `{flag}` | {} |\n", cell(status)));
    }
    out
}

fn cell(status: Status) -> String {
    let (word, text) = match status {
        Status::Supported(what) => ("supported", what),
        Status::Refused(why) => ("refused", why),
    };
    format!("{word}: {}", text.replace('|', "\\|"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEGIN: &str = "<!-- socat-conformance:begin (generated by socat_table::conformance_markdown; edit the table there) -->\n";
    const END: &str = "<!-- socat-conformance:end -->";

    /// `RELAY_BLESS=1 cargo test -p relay --lib socat_table` rewrites the
    /// README's section from the table.
    #[test]
    fn the_readme_table_is_the_generated_one() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md");
        let readme = std::fs::read_to_string(path).expect("README.md is readable");
        let start = readme
            .find(BEGIN)
            .expect("README.md has the socat-conformance begin marker")
            + BEGIN.len();
        let end = readme[start..]
            .find(END)
            .expect("README.md has the socat-conformance end marker")
            + start;
        let generated = conformance_markdown();
        if readme[start..end] == generated {
            return;
        }
        if std::env::var_os("RELAY_BLESS").is_some() {
            let blessed = format!("{}{generated}{}", &readme[..start], &readme[end..]);
            std::fs::write(path, blessed).expect("README.md is writable");
            return;
        }
        panic!(
            "README.md's socat conformance section differs from socat_table::OPTIONS / socat_flags::FLAGS: run RELAY_BLESS=1 cargo test -p relay --lib socat_table"
        );
    }

    #[test]
    fn every_refused_option_is_refused_by_the_parser() {
        for (names, _, status) in OPTIONS {
            if let Status::Refused(instead) = status {
                for name in names.split(", ") {
                    let err = addr::parse_target(&format!("TCP:h:1,{name}=1"))
                        .unwrap_err()
                        .to_string();
                    assert!(err.contains(instead), "{name}: {err}");
                }
            }
        }
    }

    #[test]
    fn explain_describes_each_option_and_refuses_as_a_run_does() {
        let text = explain(
            "TCP-LISTEN:8080,fork,range=10.0.0.0/8",
            "TCP:db:5432,retry=3",
        )
        .unwrap();
        assert!(text.contains("listen: TCP-LISTEN:8080"), "{text}");
        assert!(
            text.contains("range=10.0.0.0/8: admit only clients"),
            "{text}"
        );
        assert!(text.contains("retry=3: repeat a failed connect"), "{text}");
        let err = explain("TCP-LISTEN:8080,fork,su=nobody", "TCP:db:5432").unwrap_err();
        assert!(err.to_string().contains("`su`"), "{err}");
    }
}
