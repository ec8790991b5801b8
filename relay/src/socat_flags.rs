//! socat's global flags in the socat form (`relay -d -d TCP-LISTEN:80,fork
//! TCP:web:80`): each means what it means in socat, or is refused by name
//! with what to use instead, never taken for one of relay's own options.
//!
//! This module owns that translation: which command lines are the socat
//! form, the table of socat's flags, and the rewriting of the argument
//! list before clap sees it. relay's own spellings stay for what socat
//! has no flag for; its verbosity is `--verbose`/`-q` here, because `-v`
//! is socat's data dump.

use thiserror::Error;

/// What relay does with one socat global flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlagStatus {
    /// Taken as socat takes it.
    Supported(&'static str),
    /// Refused: the reason and what to use instead.
    Refused(&'static str),
}

/// Every socat global flag relay knows: its spelling, whether it takes a
/// value, and what relay does with it.
pub const FLAGS: &[(&str, bool, FlagStatus)] = &[
    (
        "-d",
        false,
        FlagStatus::Supported(
            "log level, repeatable: -d warnings, -dd / -ddd info (socat's notices), -dddd debug; without it relay logs at info, where socat prints errors only",
        ),
    ),
    (
        "-T",
        true,
        FlagStatus::Supported(
            "idle timeout in seconds (relay's --idle-timeout); without it relay closes connections idle for 10 minutes, socat never does (-T none)",
        ),
    ),
    (
        "-ls",
        false,
        FlagStatus::Supported("log to stderr: relay's default"),
    ),
    (
        "-s",
        false,
        FlagStatus::Supported(
            "sloppy: accepted; relay refuses bad input at start and a failed connection never ends a `fork` listener",
        ),
    ),
    (
        "-v",
        false,
        FlagStatus::Supported(
            "every block relayed, also on stderr as text in socat's format (`> 2026/12/03 10:32:21.000972  length=5 from=0 to=4`, then the bytes; relay's --dump text); the route copies",
        ),
    ),
    (
        "-x",
        false,
        FlagStatus::Supported(
            "every block relayed, also on stderr in hex in socat's format (--dump hex); with -v, hex beside text (--dump both)",
        ),
    ),
    (
        "-t",
        true,
        FlagStatus::Supported(
            "once one side has closed, the other direction may go on this many seconds, then both close (relay's --half-close-timeout); without it relay waits for the other direction to end (one way: 0.5 s, socat's default)",
        ),
    ),
    (
        "-u",
        false,
        FlagStatus::Supported(
            "one direction, the first address to the second (relay's --one-way); what the second sends back is read and dropped, and the connection ends 0.5 s after the first's EOF at the latest, as socat's -t default",
        ),
    ),
    (
        "-U",
        false,
        FlagStatus::Supported(
            "one direction, the second address to the first (relay's --one-way); otherwise as -u",
        ),
    ),
    (
        "-4",
        false,
        FlagStatus::Supported(
            "IPv4 for the TCP and UDP addresses that name no family (TCP: as TCP4:, TCP-LISTEN: as TCP4-LISTEN:)",
        ),
    ),
    (
        "-6",
        false,
        FlagStatus::Supported(
            "IPv6 for the TCP and UDP addresses that name no family (TCP: as TCP6:, TCP-LISTEN: as TCP6-LISTEN: on [::])",
        ),
    ),
    (
        "-lf",
        true,
        FlagStatus::Supported(
            "log to this file, appended (relay's --log-file); the -v / -x dump stays on stderr, as socat's",
        ),
    ),
    (
        "-b",
        true,
        FlagStatus::Supported(
            "the copy path's buffer per direction at most this many bytes (relay's --block-size; up to 1 MiB); relay grows its buffer to that as reads fill it, and splice and sockmap need none",
        ),
    ),
    (
        "-ly",
        false,
        FlagStatus::Refused(
            "relay does not write to syslog: it logs to stderr, which systemd's journal keeps, or to a file with -lf",
        ),
    ),
    (
        "-L",
        true,
        FlagStatus::Refused("relay takes no lock file: run it under `flock -n FILE relay ...`"),
    ),
    (
        "-W",
        true,
        FlagStatus::Refused(
            "relay takes no lock file: run it under `flock FILE relay ...` (which waits)",
        ),
    ),
];

/// The subcommands; a command line naming one before any address is not
/// the socat form.
pub const SUBCOMMANDS: &[&str] = &[
    "run",
    "check",
    "forward",
    "observe",
    "publish",
    "completions",
    "man",
    "help",
];

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FlagError {
    #[error("socat flag `{flag}` is not supported: {instead}")]
    Refused { flag: String, instead: &'static str },
    #[error("socat flag `{flag}` needs a value (for example `{flag} 10`)")]
    MissingValue { flag: String },
}

/// The socat form's arguments, ready for clap, and the log level its
/// `-d` flags ask for.
#[derive(Debug, PartialEq, Eq)]
pub struct Translated {
    pub args: Vec<String>,
    /// relay's verbosity (0 info, -1 warnings, 1 debug), when `-d` was given.
    pub verbosity: Option<i8>,
}

/// The hidden option `-u` and `-U` become: which address is read,
/// `first` or `second`. Which of the two is the listener is known only
/// once the addresses are parsed (socat takes them in either order), so
/// the command line turns it into a route's `Flow` then.
pub const UNIDIRECTIONAL_ARG: &str = "--socat-unidirectional";

/// The hidden option `-4` and `-6` become, applied to both addresses once
/// they are parsed.
pub const FAMILY_ARG: &str = "--socat-family";

fn unidirectional(flag: &str) -> Option<&'static str> {
    match flag {
        "-u" => Some("first"),
        "-U" => Some("second"),
        _ => None,
    }
}

/// The socat form's two addresses, parsed in either order, with what the
/// flags that depend on that order mean for them.
#[derive(Debug)]
pub struct Pair {
    pub listen: crate::addr::ListenAddr,
    pub target: crate::addr::TargetAddr,
    /// `-u` / `-U`: the way bytes go, once it is known which address is
    /// the listener.
    pub flow: crate::forward::Flow,
    /// The listener was written second (a dump's `>` then points at it).
    pub listener_second: bool,
}

/// Parses the two addresses (`addr::parse_pair`) and applies what the
/// hidden options of [`translate`] carry: `unidirectional` (`first` or
/// `second`, the address read) and `family` (`4` or `6`, for addresses
/// that name none).
pub fn pair(
    first: &str,
    second: &str,
    unidirectional: Option<&str>,
    family: Option<&str>,
) -> Result<Pair, crate::addr::AddrError> {
    use crate::addr::Family;
    use crate::forward::Flow;
    let (mut listen, mut target) = crate::addr::parse_pair(first, second)?;
    if let Some(family) = family {
        let family = if family == "6" {
            Family::V6
        } else {
            Family::V4
        };
        listen.default_family(family);
        target.default_family(family);
    }
    let listener_first = listen.text == first;
    // -u reads the first address: the client when the first is the
    // listener, else the target (-U the other way).
    let flow = match (unidirectional, listener_first) {
        (Some("first"), true) | (Some("second"), false) => Flow::ToTarget,
        (Some(_), _) => Flow::ToClient,
        (None, _) => Flow::Both,
    };
    Ok(Pair {
        listen,
        target,
        flow,
        listener_second: !listener_first,
    })
}

/// Whether `args` (without the program name) is the socat form: an
/// address comes before any subcommand name. `takes_value` says which of
/// relay's own options consume the next argument, so their values
/// (`--name run`, `--metrics 127.0.0.1:9100`) are not mistaken for either.
pub fn is_socat_form(args: &[String], takes_value: impl Fn(&str) -> bool) -> bool {
    let mut tokens = args.iter();
    while let Some(token) = tokens.next() {
        if token == "--" {
            return true;
        }
        if token != "-" && token.starts_with('-') {
            let consumes = !token.contains('=')
                && (takes_value(token)
                    || FLAGS.iter().any(|(flag, value, _)| *value && flag == token));
            if consumes {
                tokens.next();
            }
            continue;
        }
        return !SUBCOMMANDS.contains(&token.as_str());
    }
    false
}

/// Rewrites the socat form's arguments: `-d` flags become a verbosity,
/// flags without an effect are dropped, refused ones are an error naming
/// them. relay's own long options pass through.
pub fn translate(args: &[String]) -> Result<Translated, FlagError> {
    let mut out = Vec::with_capacity(args.len());
    let mut debug_level = 0u32;
    let (mut dump_text, mut dump_hex) = (false, false);
    let mut tokens = args.iter();
    while let Some(token) = tokens.next() {
        if token == "--" {
            out.push(token.clone());
            out.extend(tokens.cloned());
            break;
        }
        // socat spells repeated -d as `-d -d` or `-dd`.
        if let Some(ds) = token.strip_prefix('-')
            && !ds.is_empty()
            && ds.chars().all(|c| c == 'd')
        {
            debug_level += ds.len() as u32;
            continue;
        }
        // socat also takes the log file glued to its flag: `-lf/var/log/x`.
        if let Some(path) = token.strip_prefix("-lf").filter(|p| !p.is_empty()) {
            out.extend(["--log-file".to_string(), path.to_string()]);
            continue;
        }
        // `-v -x`, also written `-vx`: socat's dumps combined.
        if let Some(letters) = token
            .strip_prefix('-')
            .filter(|rest| !rest.is_empty() && rest.chars().all(|c| c == 'v' || c == 'x'))
        {
            dump_text |= letters.contains('v');
            dump_hex |= letters.contains('x');
            continue;
        }
        match FLAGS.iter().find(|(flag, _, _)| *flag == token) {
            Some((_, _, FlagStatus::Refused(instead))) => {
                return Err(FlagError::Refused {
                    flag: token.clone(),
                    instead,
                });
            }
            Some((flag, takes_value, FlagStatus::Supported(_))) => {
                if let Some(direction) = unidirectional(flag) {
                    out.push(format!("{UNIDIRECTIONAL_ARG}={direction}"));
                } else if let Some(family) =
                    flag.strip_prefix('-').filter(|f| ["4", "6"].contains(f))
                {
                    out.push(format!("{FAMILY_ARG}={family}"));
                } else if ["-T", "-lf", "-t", "-b"].contains(flag) {
                    out.push(match *flag {
                        "-lf" => "--log-file".to_string(),
                        "-t" => "--half-close-timeout".to_string(),
                        "-b" => "--block-size".to_string(),
                        _ => token.clone(),
                    });
                    out.push(
                        tokens
                            .next()
                            .cloned()
                            .ok_or_else(|| FlagError::MissingValue {
                                flag: token.clone(),
                            })?,
                    );
                } else if *takes_value {
                    tokens.next();
                }
            }
            None => out.push(token.clone()),
        }
    }
    let dump = match (dump_text, dump_hex) {
        (true, true) => Some("both"),
        (true, false) => Some("text"),
        (false, true) => Some("hex"),
        (false, false) => None,
    };
    if let Some(mode) = dump {
        out.insert(0, format!("--dump={mode}"));
    }
    let verbosity = match debug_level {
        0 => None,
        1 => Some(-1),
        2 | 3 => Some(0),
        _ => Some(1),
    };
    Ok(Translated {
        args: out,
        verbosity,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<String> {
        line.split_whitespace().map(String::from).collect()
    }

    fn relay_value_options(flag: &str) -> bool {
        matches!(flag, "--name" | "--metrics" | "-T")
    }

    #[test]
    fn the_socat_form_is_told_from_subcommands() {
        for socat in [
            "TCP-LISTEN:80,fork TCP:web:80",
            "-d -d TCP-LISTEN:80 TCP:web:80",
            "- TCP:web:80",
            "--name run TCP-LISTEN:80 TCP:web:80",
            "--metrics 127.0.0.1:9100 TCP-LISTEN:80 TCP:web:80",
            "-T 30 TCP-LISTEN:80 TCP:web:80",
        ] {
            assert!(is_socat_form(&args(socat), relay_value_options), "{socat}");
        }
        for sub in [
            "forward 127.0.0.1:80 web:80",
            "-v forward 127.0.0.1:80 web:80",
            "run -c relay.toml",
            "--help",
            "",
        ] {
            assert!(!is_socat_form(&args(sub), relay_value_options), "{sub}");
        }
    }

    #[test]
    fn d_flags_are_the_log_level() {
        let cases = [
            ("TCP-LISTEN:80 TCP:w:80", None),
            ("-d TCP-LISTEN:80 TCP:w:80", Some(-1)),
            ("-d -d TCP-LISTEN:80 TCP:w:80", Some(0)),
            ("-dd TCP-LISTEN:80 TCP:w:80", Some(0)),
            ("-d -d -d TCP-LISTEN:80 TCP:w:80", Some(0)),
            ("-dd -dd TCP-LISTEN:80 TCP:w:80", Some(1)),
        ];
        for (line, verbosity) in cases {
            let t = translate(&args(line)).unwrap();
            assert_eq!(t.verbosity, verbosity, "{line}");
            assert_eq!(t.args, args("TCP-LISTEN:80 TCP:w:80"), "{line}");
        }
    }

    #[test]
    fn flags_without_effect_are_dropped_and_t_kept() {
        let t = translate(&args("-ls -s -T 30 --name web - TCP:w:80")).unwrap();
        assert_eq!(t.args, args("-T 30 --name web - TCP:w:80"));
        assert_eq!(
            translate(&args("TCP-LISTEN:80 TCP:w:80 -T")),
            Err(FlagError::MissingValue { flag: "-T".into() })
        );
    }

    #[test]
    fn lf_is_the_log_file_and_4_6_the_family() {
        for line in ["-lf /var/log/r - TCP:w:80", "-lf/var/log/r - TCP:w:80"] {
            let t = translate(&args(line)).unwrap();
            assert_eq!(t.args, args("--log-file /var/log/r - TCP:w:80"), "{line}");
        }
        let t = translate(&args("-6 TCP-LISTEN:80 TCP:w:80")).unwrap();
        assert_eq!(t.args, args("--socat-family=6 TCP-LISTEN:80 TCP:w:80"));
    }

    #[test]
    fn t_is_the_half_close_timeout() {
        let t = translate(&args("-t 2.5 - TCP:w:80")).unwrap();
        assert_eq!(t.args, args("--half-close-timeout 2.5 - TCP:w:80"));
    }

    #[test]
    fn v_and_x_are_the_traffic_dump() {
        for (line, mode) in [
            ("-v - TCP:w:80", "text"),
            ("-x - TCP:w:80", "hex"),
            ("-v -x - TCP:w:80", "both"),
            ("-vx - TCP:w:80", "both"),
        ] {
            let t = translate(&args(line)).unwrap();
            assert_eq!(t.args, args(&format!("--dump={mode} - TCP:w:80")), "{line}");
        }
    }

    #[test]
    fn the_pair_knows_which_way_u_goes_and_the_family() {
        use crate::forward::Flow;
        let p = pair("TCP-LISTEN:80", "TCP:w:80", Some("first"), Some("6")).unwrap();
        assert_eq!((p.flow, p.listener_second), (Flow::ToTarget, false));
        assert_eq!(p.target.tcp().unwrap().family, crate::addr::Family::V6);
        let p = pair("TCP:w:80", "TCP-LISTEN:80", Some("first"), None).unwrap();
        assert_eq!((p.flow, p.listener_second), (Flow::ToClient, true));
        let p = pair("TCP:w:80", "TCP-LISTEN:80", Some("second"), None).unwrap();
        assert_eq!(p.flow, Flow::ToTarget);
        assert_eq!(pair("-", "TCP:w:80", None, None).unwrap().flow, Flow::Both);
    }

    #[test]
    fn one_way_flags_name_the_address_read() {
        let t = translate(&args("-u - TCP:w:80")).unwrap();
        assert_eq!(t.args, args("--socat-unidirectional=first - TCP:w:80"));
        let t = translate(&args("-U TCP-LISTEN:80 TCP:w:80")).unwrap();
        assert_eq!(
            t.args,
            args("--socat-unidirectional=second TCP-LISTEN:80 TCP:w:80")
        );
    }

    #[test]
    fn b_is_the_block_size() {
        let t = translate(&args("-b 65536 TCP-LISTEN:80 TCP:w:80")).unwrap();
        assert_eq!(t.args, args("--block-size 65536 TCP-LISTEN:80 TCP:w:80"));
    }

    #[test]
    fn refused_flags_are_named_with_what_to_use() {
        for (line, flag, instead) in [
            ("-ly TCP-LISTEN:80 TCP:w:80", "-ly", "journal"),
            ("-L /run/x.lock TCP-LISTEN:80 TCP:w:80", "-L", "flock"),
        ] {
            let err = translate(&args(line)).unwrap_err().to_string();
            assert!(err.contains(&format!("`{flag}`")), "{line}: {err}");
            assert!(err.contains(instead), "{line}: {err}");
        }
    }
}
