//! A server inside another network namespace, named the ways relay names
//! namespaces, so one test body runs against every kind of target.
//!
//! A [`Subject`] is busybox httpd (serving a body no other subject serves)
//! inside one of:
//! - [`Kind::Container`]: a Docker container, target `container:<name>`,
//!   interface `eth0` on Docker's bridge;
//! - [`Kind::Netns`]: an `ip netns` namespace from [`NetNs`], target
//!   `netns:<name>`, interface its veth end;
//! - [`Kind::Pid`]: the same, but named by the httpd's own pid, `pid:<pid>`.
//!
//! The httpd binds the namespace's own `127.0.0.1` ([`Bind::Loopback`],
//! what `relay publish` is for) or every address ([`Bind::Any`], reachable
//! from the host at [`Subject::http_addr`]).
//!
//! Also what tests read from inside the namespace with the host's tools:
//! interface counters (`ip -s link`, [`LinkStats`]) and what is attached
//! at TC (`bpftool net`, `tc filter`, `tc qdisc`: [`Subject::tc_attachments`]).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::child::{ChildProc, output_of};
use crate::docker::{Container, HTTPD_PORT};
use crate::netns::NetNs;
use crate::tempdir::TempDir;

/// How a subject's namespace is named to relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Container,
    Netns,
    Pid,
}

impl Kind {
    /// Every kind, for tests that run one body over all of them.
    pub const ALL: [Kind; 3] = [Kind::Container, Kind::Netns, Kind::Pid];
}

/// Where the subject's httpd listens, inside its namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bind {
    /// `127.0.0.1:8080` only: out of the host's reach.
    Loopback,
    /// `0.0.0.0:8080`: reachable at [`Subject::http_addr`].
    Any,
}

impl Bind {
    fn ip(self) -> Ipv4Addr {
        match self {
            Bind::Loopback => Ipv4Addr::LOCALHOST,
            Bind::Any => Ipv4Addr::UNSPECIFIED,
        }
    }
}

/// Return `Ok(())` from the calling test unless a [`Subject`] of `kind`
/// can be made here: root, busybox and nsenter, and Docker for containers.
#[macro_export]
macro_rules! require_kind {
    ($kind:expr) => {
        $crate::require_root!("creates namespaces and enters them");
        $crate::require_tool!("busybox");
        $crate::require_tool!("nsenter");
        if $kind == $crate::namespaced::Kind::Container {
            $crate::require_docker!();
        }
    };
}

/// One `#[test]` per [`Kind`], named as given, each gated by
/// [`require_kind!`] (and the tools listed after `requires`) and running
/// `body(kind)`: one test body, every kind of target.
#[macro_export]
macro_rules! test_per_kind {
    ($body:path => $container:ident, $netns:ident, $pid:ident $(; requires $($tool:literal),+)?) => {
        $crate::test_per_kind!(@one $body, $container, Container $(; $($tool),+)?);
        $crate::test_per_kind!(@one $body, $netns, Netns $(; $($tool),+)?);
        $crate::test_per_kind!(@one $body, $pid, Pid $(; $($tool),+)?);
    };
    (@one $body:path, $name:ident, $kind:ident $(; $($tool:literal),+)?) => {
        #[test]
        fn $name() -> anyhow::Result<()> {
            $crate::require_kind!($crate::namespaced::Kind::$kind);
            $($($crate::require_tool!($tool);)+)?
            $body($crate::namespaced::Kind::$kind)
        }
    };
}

/// How long busybox httpd may take to listen.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(30);

/// busybox httpd inside a namespace; everything is removed on drop.
#[derive(Debug)]
pub struct Subject {
    kind: Kind,
    /// The httpd in an `ip netns` (killed before the namespace goes).
    httpd: Option<ChildProc>,
    netns: Option<NetNs>,
    container: Option<Container>,
    _www: Option<TempDir>,
    body: String,
}

impl Subject {
    /// Start httpd in a namespace of `kind`, bound as `bind` says; returns
    /// once it listens. IPv6 is switched off inside so the namespace's
    /// interface carries only what the test sends (no router or neighbour
    /// solicitations of its own).
    pub fn httpd(kind: Kind, bind: Bind) -> Result<Self> {
        let subject = match kind {
            Kind::Container => {
                let container = Container::httpd_on(bind.ip())?;
                Subject {
                    kind,
                    httpd: None,
                    netns: None,
                    body: container.httpd_body(),
                    container: Some(container),
                    _www: None,
                }
            }
            Kind::Netns | Kind::Pid => {
                let netns = NetNs::create()?;
                let www = TempDir::new("httpd-www")?;
                let body = format!("{}\n", netns.name());
                std::fs::write(www.join("index.html"), &body)
                    .context("writing the httpd's index.html")?;
                let mut cmd = netns.command("busybox");
                // `ip netns exec` execs: the child's pid is httpd's.
                cmd.args([
                    "httpd",
                    "-f",
                    "-p",
                    &format!("{}:{HTTPD_PORT}", bind.ip()),
                    "-h",
                ])
                .arg(www.path());
                let mut httpd = ChildProc::spawn("busybox-httpd", cmd)?;
                httpd.wait_listening(HTTPD_PORT, LISTEN_TIMEOUT)?;
                Subject {
                    kind,
                    httpd: Some(httpd),
                    netns: Some(netns),
                    container: None,
                    _www: Some(www),
                    body,
                }
            }
        };
        subject.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
        subject.sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
        if let Some(netns) = &subject.netns {
            // The host's end would solicit routers into the namespace.
            sysctl_here(
                &format!("net.ipv6.conf.{}.disable_ipv6", netns.host_if()),
                "1",
            )?;
        }
        Ok(subject)
    }

    /// httpd in a Docker container created with `docker run` `options`
    /// (`--label k=v`), reachable from the host at its bridge address.
    pub fn container_with(options: &[&str]) -> Result<Self> {
        let container = Container::httpd_with(Bind::Any.ip(), options)?;
        let subject = Subject {
            kind: Kind::Container,
            httpd: None,
            netns: None,
            body: container.httpd_body(),
            container: Some(container),
            _www: None,
        };
        subject.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
        subject.sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
        Ok(subject)
    }

    /// The container, to rename it.
    pub fn container_mut(&mut self) -> Result<&mut Container> {
        self.container
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("this subject is not a container"))
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The target as relay takes it: `container:<name>`, `netns:<name>`, `pid:<pid>`.
    pub fn target(&self) -> Result<String> {
        Ok(match self.kind {
            Kind::Container => format!("container:{}", self.container()?.name()),
            Kind::Netns => format!("netns:{}", self.netns()?.name()),
            Kind::Pid => format!("pid:{}", self.pid()?),
        })
    }

    /// The `target` label relay's observe metrics carry for this subject.
    pub fn label(&self) -> Result<String> {
        Ok(match self.kind {
            Kind::Container => self.container()?.name().to_string(),
            Kind::Netns => self.netns()?.name().to_string(),
            Kind::Pid => format!("pid:{}", self.pid()?),
        })
    }

    /// What GET /index.html returns.
    pub fn body(&self) -> &str {
        &self.body
    }

    /// The namespace's interface to the host.
    pub fn iface(&self) -> Result<String> {
        Ok(match &self.netns {
            Some(netns) => netns.ns_if().to_string(),
            None => "eth0".to_string(),
        })
    }

    /// The namespace's address on [`Self::iface`].
    pub fn ip(&self) -> Result<Ipv4Addr> {
        match &self.netns {
            Some(netns) => Ok(netns.addr()),
            None => self.container()?.ip(),
        }
    }

    /// Where the host reaches the httpd (only with [`Bind::Any`]).
    pub fn http_addr(&self) -> Result<SocketAddr> {
        Ok(SocketAddr::from((self.ip()?, HTTPD_PORT)))
    }

    /// The `ip netns` namespace, for the kinds that have one.
    pub fn netns(&self) -> Result<&NetNs> {
        self.netns
            .as_ref()
            .with_context(|| format!("a {:?} subject has no ip netns", self.kind))
    }

    /// The container, for [`Kind::Container`].
    pub fn container(&self) -> Result<&Container> {
        self.container
            .as_ref()
            .with_context(|| format!("a {:?} subject has no container", self.kind))
    }

    /// A process inside the namespace: the container's init or the httpd.
    pub fn pid(&self) -> Result<u32> {
        match (&self.container, &self.httpd) {
            (Some(container), _) => container.pid(),
            (None, Some(httpd)) => Ok(httpd.pid()),
            (None, None) => bail!("subject without a process"),
        }
    }

    /// The namespace file (the container's changes when it restarts).
    pub fn ns_path(&self) -> Result<PathBuf> {
        Ok(match &self.netns {
            Some(netns) => PathBuf::from(format!("/var/run/netns/{}", netns.name())),
            None => PathBuf::from(format!("/proc/{}/ns/net", self.pid()?)),
        })
    }

    /// A command run inside the subject: `docker exec -i` in the container,
    /// else the host's program in the namespace (`nsenter --net`).
    pub fn exec(&self, program: &str) -> Result<Command> {
        match &self.container {
            Some(container) => {
                let mut cmd = Command::new("docker");
                cmd.args(["exec", "-i", container.name(), program]);
                Ok(cmd)
            }
            None => self.host_tool(program),
        }
    }

    /// The host's `program` run in the subject's network namespace (only:
    /// it still sees the host's files), for `ip`, `tc`, `bpftool`, `sysctl`.
    pub fn host_tool(&self, program: &str) -> Result<Command> {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.ns_path()?.display()))
            .arg(program);
        Ok(cmd)
    }

    /// Run a host tool in the namespace; its stdout, or an error with its stderr.
    pub fn host_tool_output(&self, program: &str, args: &[&str]) -> Result<String> {
        let mut cmd = self.host_tool(program)?;
        cmd.args(args);
        output_of(cmd)
    }

    fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        // /proc/sys/net is the namespace of whoever opens it.
        self.host_tool_output("sysctl", &["-q", "-w", &format!("{key}={value}")])
            .map(drop)
    }

    /// The kernel's counters of `iface` in the namespace.
    pub fn link_stats(&self, iface: &str) -> Result<LinkStats> {
        let text = self.host_tool_output("ip", &["-j", "-s", "link", "show", "dev", iface])?;
        LinkStats::parse(&text).with_context(|| format!("ip -j -s link show dev {iface}"))
    }

    /// Every program, filter or clsact qdisc attached at TC in the
    /// namespace, one line each (empty when nothing is): TCX programs per
    /// interface (asked of the kernel from inside), `bpftool net show`,
    /// and `tc filter show` / `tc qdisc show` per interface.
    pub fn tc_attachments(&self) -> Result<Vec<String>> {
        let mut found = self.tcx_programs()?;
        let net: Value =
            serde_json::from_str(&self.host_tool_output("bpftool", &["-j", "net", "show"])?)
                .context("bpftool -j net show printed something that is not JSON")?;
        for section in net.as_array().into_iter().flatten() {
            for (kind, entries) in section.as_object().into_iter().flatten() {
                for entry in entries.as_array().into_iter().flatten() {
                    found.push(format!("bpftool net: {kind}: {entry}"));
                }
            }
        }
        let links: Value =
            serde_json::from_str(&self.host_tool_output("ip", &["-j", "link", "show"])?)
                .context("ip -j link show printed something that is not JSON")?;
        for link in links.as_array().into_iter().flatten() {
            let Some(name) = link["ifname"].as_str() else {
                continue;
            };
            for hook in ["ingress", "egress"] {
                let filters =
                    self.host_tool_output("tc", &["filter", "show", "dev", name, hook])?;
                found.extend(
                    filters
                        .lines()
                        .filter(|l| !l.trim().is_empty())
                        .map(|l| format!("tc filter {name} {hook}: {l}")),
                );
            }
            let qdiscs = self.host_tool_output("tc", &["qdisc", "show", "dev", name])?;
            found.extend(
                qdiscs
                    .lines()
                    .filter(|l| l.contains("clsact"))
                    .map(|l| format!("tc qdisc {name}: {l}")),
            );
        }
        Ok(found)
    }

    /// Programs attached by TCX to each interface, queried on a thread
    /// that has entered the namespace: `<iface> <hook>: <name> (id <id>)`.
    fn tcx_programs(&self) -> Result<Vec<String>> {
        let path = self.ns_path()?;
        let ns =
            std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        let inside = std::thread::spawn(move || -> Result<Vec<String>> {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .context("setns into the subject's namespace")?;
            let mut found = Vec::new();
            for iface in nix::net::if_::if_nameindex()
                .context("listing interfaces")?
                .iter()
            {
                let name = iface.name().to_string_lossy().into_owned();
                for (hook, attach) in [
                    ("ingress", aya::programs::TcAttachType::Ingress),
                    ("egress", aya::programs::TcAttachType::Egress),
                ] {
                    let (_, programs) = aya::programs::SchedClassifier::query_tcx(&name, attach)
                        .with_context(|| format!("querying TCX {hook} of {name}"))?;
                    found.extend(programs.iter().map(|p| {
                        let prog = p.name_as_str().unwrap_or("?");
                        format!("tcx {name} {hook}: {prog} (id {})", p.id())
                    }));
                }
            }
            Ok(found)
        });
        match inside.join() {
            Ok(found) => found,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// `docker restart`: same container, new process and namespace.
    pub fn restart(&self) -> Result<()> {
        let container = self.container()?;
        container.restart()?;
        container.wait_listening(HTTPD_PORT)
    }

    /// `docker stop`: the container stays, with no namespace.
    pub fn stop(&self) -> Result<()> {
        self.container()?.stop()
    }
}

/// A pid no process has now (the highest free one below `pid_max`, the
/// last the kernel hands out).
pub fn missing_pid() -> Result<u32> {
    let pid_max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .context("reading /proc/sys/kernel/pid_max")?
        .trim()
        .parse()
        .context("parsing /proc/sys/kernel/pid_max")?;
    (2..pid_max)
        .rev()
        .find(|p| !std::path::Path::new(&format!("/proc/{p}")).exists())
        .context("every pid is taken")
}

/// An interface's counters, as `ip -s link` reads them from the kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
}

impl LinkStats {
    fn parse(json: &str) -> Result<Self> {
        let doc: Value = serde_json::from_str(json).context("not JSON")?;
        let stats = &doc[0]["stats64"];
        let field = |dir: &str, name: &str| {
            stats[dir][name]
                .as_u64()
                .with_context(|| format!("no stats64.{dir}.{name} in {json}"))
        };
        Ok(LinkStats {
            rx_packets: field("rx", "packets")?,
            rx_bytes: field("rx", "bytes")?,
            tx_packets: field("tx", "packets")?,
            tx_bytes: field("tx", "bytes")?,
        })
    }

    /// What grew from `earlier` to `self`.
    pub fn since(&self, earlier: &LinkStats) -> LinkStats {
        LinkStats {
            rx_packets: self.rx_packets - earlier.rx_packets,
            rx_bytes: self.rx_bytes - earlier.rx_bytes,
            tx_packets: self.tx_packets - earlier.tx_packets,
            tx_bytes: self.tx_bytes - earlier.tx_bytes,
        }
    }
}

fn sysctl_here(key: &str, value: &str) -> Result<()> {
    let mut cmd = Command::new("sysctl");
    cmd.args(["-q", "-w", &format!("{key}={value}")]);
    output_of(cmd).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_stats_come_from_stats64() -> Result<()> {
        let json = r#"[{"ifname":"eth0","stats64":{"rx":{"bytes":10,"packets":2},"tx":{"bytes":30,"packets":4}}}]"#;
        let stats = LinkStats::parse(json)?;
        assert_eq!(
            stats,
            LinkStats {
                rx_packets: 2,
                rx_bytes: 10,
                tx_packets: 4,
                tx_bytes: 30
            }
        );
        Ok(())
    }
}
