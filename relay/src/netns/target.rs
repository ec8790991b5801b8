//! The target grammar: which network namespace the user means.
//!
//! `container:<name|id>`, `pid:<pid>`, `netns:<name>` (an `ip netns` name),
//! `netns:</absolute/path>`, and `host`. This module only parses and labels;
//! [`super::resolve`] turns a [`Target`] into an open namespace.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Where `ip netns add <name>` bind-mounts its namespaces.
pub const IP_NETNS_DIR: &str = "/var/run/netns";

/// A network namespace named by the user.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// The relay's own namespace (`/proc/self/ns/net`).
    Host,
    /// A Docker container by name or (full or unique prefix of its) id.
    Container(String),
    /// The namespace of a process.
    Pid(u32),
    /// An `ip netns` name: `/var/run/netns/<name>`.
    NetnsName(String),
    /// An absolute path to a namespace file (a bind mount or `/proc/.../ns/net`).
    NetnsPath(PathBuf),
}

/// Why a target string does not parse; names the offending text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid target {input:?}: {reason}")]
pub struct ParseTargetError {
    /// The text as given.
    pub input: String,
    /// What is wrong with it, and what was expected.
    pub reason: String,
}

const FORMS: &str = "expected container:<name|id>, pid:<pid>, netns:<name>, netns:</path>, or host";

impl Target {
    /// A short name for metrics labels and pcap file names: the container
    /// name, `pid:<pid>`, the `ip netns` name, the path, or `host`.
    ///
    /// A resolved [`super::Netns`] has a better one for containers given by
    /// id: the container's name as Docker reports it.
    pub fn label(&self) -> String {
        self.to_string()
    }

    /// The target as the user writes it (`container:web`, `netns:blue`);
    /// parses back to the same target. Error messages use this form.
    pub fn spec(&self) -> String {
        match self {
            Target::Host => "host".to_string(),
            Target::Container(name) => format!("container:{name}"),
            Target::Pid(pid) => format!("pid:{pid}"),
            Target::NetnsName(name) => format!("netns:{name}"),
            Target::NetnsPath(path) => format!("netns:{}", path.display()),
        }
    }

    /// The namespace file this target names, when no daemon is needed to
    /// find it (everything but a container).
    pub fn ns_path(&self) -> Option<PathBuf> {
        match self {
            Target::Host => Some(PathBuf::from("/proc/self/ns/net")),
            Target::Container(_) => None,
            Target::Pid(pid) => Some(pid_ns_path(*pid)),
            Target::NetnsName(name) => Some(Path::new(IP_NETNS_DIR).join(name)),
            Target::NetnsPath(path) => Some(path.clone()),
        }
    }
}

/// `/proc/<pid>/ns/net`.
pub(super) fn pid_ns_path(pid: u32) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/ns/net"))
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Host => f.write_str("host"),
            Target::Container(name) => f.write_str(name),
            Target::Pid(pid) => write!(f, "pid:{pid}"),
            Target::NetnsName(name) => f.write_str(name),
            Target::NetnsPath(path) => write!(f, "{}", path.display()),
        }
    }
}

impl FromStr for Target {
    type Err = ParseTargetError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let fail = |reason: String| ParseTargetError {
            input: input.to_string(),
            reason,
        };
        if input == "host" {
            return Ok(Target::Host);
        }
        let Some((kind, value)) = input.split_once(':') else {
            return Err(fail(format!(
                "no kind prefix; {FORMS} (a container? write container:{input})"
            )));
        };
        match kind {
            "container" => {
                check_container_name(value).map_err(fail)?;
                Ok(Target::Container(value.to_string()))
            }
            "pid" => match value.parse::<u32>() {
                Ok(0) => Err(fail("pid 0 is not a process".to_string())),
                Ok(pid) => Ok(Target::Pid(pid)),
                Err(_) => Err(fail(format!("pid {value:?} is not a positive integer"))),
            },
            "netns" if value.starts_with('/') => Ok(Target::NetnsPath(PathBuf::from(value))),
            "netns" => {
                check_netns_name(value).map_err(fail)?;
                Ok(Target::NetnsName(value.to_string()))
            }
            other => Err(fail(format!("unknown kind {other:?}; {FORMS}"))),
        }
    }
}

/// Docker's own rule for names (`[a-zA-Z0-9][a-zA-Z0-9_.-]+`), which ids
/// (hex) also satisfy. A leading `/` (as `docker inspect` prints names) is
/// accepted. Checking here also keeps the name safe to put in a URL path.
fn check_container_name(value: &str) -> Result<(), String> {
    let name = value.strip_prefix('/').unwrap_or(value);
    let mut chars = name.chars();
    match chars.next() {
        None => return Err("empty container name".to_string()),
        Some(c) if !c.is_ascii_alphanumeric() => {
            return Err(format!(
                "container name {value:?} must start with a letter or digit"
            ));
        }
        Some(_) => {}
    }
    if let Some(bad) = chars.find(|c| !(c.is_ascii_alphanumeric() || "_.-".contains(*c))) {
        return Err(format!(
            "container name {value:?} has {bad:?}; Docker names use [a-zA-Z0-9_.-]"
        ));
    }
    Ok(())
}

/// What `ip netns add` accepts: one path component.
fn check_netns_name(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err("empty netns name; give an `ip netns` name or an absolute path".to_string());
    }
    if value == "." || value == ".." || value.contains('/') {
        return Err(format!(
            "netns name {value:?} is not an `ip netns` name; a path must be absolute (netns:/...)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Target {
        s.parse()
            .unwrap_or_else(|e| panic!("expected {s:?} to parse, got: {e}"))
    }

    fn parse_err(s: &str) -> String {
        match s.parse::<Target>() {
            Ok(t) => panic!("expected {s:?} to be rejected, got {t:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn every_form_parses() {
        assert_eq!(parse("host"), Target::Host);
        assert_eq!(parse("container:web"), Target::Container("web".into()));
        assert_eq!(
            parse("container:4f1c2a9e0b7d"),
            Target::Container("4f1c2a9e0b7d".into())
        );
        assert_eq!(
            parse("container:/my_app.1-x"),
            Target::Container("/my_app.1-x".into())
        );
        assert_eq!(parse("pid:1234"), Target::Pid(1234));
        assert_eq!(parse("netns:blue"), Target::NetnsName("blue".into()));
        assert_eq!(
            parse("netns:/run/docker/netns/abc"),
            Target::NetnsPath("/run/docker/netns/abc".into())
        );
    }

    #[test]
    fn labels_are_short_and_distinct() {
        assert_eq!(parse("host").label(), "host");
        assert_eq!(parse("container:web").label(), "web");
        assert_eq!(parse("pid:42").label(), "pid:42");
        assert_eq!(parse("netns:blue").label(), "blue");
        assert_eq!(parse("netns:/run/x").label(), "/run/x");
    }

    #[test]
    fn specs_parse_back_to_the_same_target() {
        for input in [
            "host",
            "container:web",
            "pid:42",
            "netns:blue",
            "netns:/run/x",
        ] {
            let target = parse(input);
            assert_eq!(target.spec(), input);
            assert_eq!(parse(&target.spec()), target);
        }
    }

    #[test]
    fn paths_follow_the_kind() {
        assert_eq!(parse("host").ns_path(), Some("/proc/self/ns/net".into()));
        assert_eq!(parse("pid:7").ns_path(), Some("/proc/7/ns/net".into()));
        assert_eq!(
            parse("netns:blue").ns_path(),
            Some("/var/run/netns/blue".into())
        );
        assert_eq!(parse("netns:/x/y").ns_path(), Some("/x/y".into()));
        assert_eq!(parse("container:web").ns_path(), None);
    }

    #[test]
    fn errors_name_the_input_and_the_problem() {
        for (input, needle) in [
            ("web", "container:web"),
            ("", "no kind prefix"),
            ("vm:web", "unknown kind \"vm\""),
            ("container:", "empty container name"),
            ("container:-web", "must start with a letter or digit"),
            ("container:a/b", "'/'"),
            ("container:a b", "' '"),
            ("pid:", "is not a positive integer"),
            ("pid:abc", "\"abc\""),
            ("pid:-3", "\"-3\""),
            ("pid:0", "pid 0"),
            ("pid:99999999999", "not a positive integer"),
            ("netns:", "empty netns name"),
            ("netns:a/b", "must be absolute"),
            ("netns:..", "not an `ip netns` name"),
        ] {
            let msg = parse_err(input);
            assert!(
                msg.contains(&format!("{input:?}")),
                "error for {input:?} should quote it, got: {msg}"
            );
            assert!(
                msg.contains(needle),
                "error for {input:?} should say {needle:?}, got: {msg}"
            );
        }
    }
}
