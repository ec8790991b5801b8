//! Network namespaces as test hosts, each linked to the host by a veth pair.
//!
//! A [`NetNs`] is `ip netns add relay-t-<pid>-<n>` plus a veth pair
//! `rt<idx>h` (host side, `10.231.X.Y+1/30`) and `rt<idx>n` (namespace side,
//! `.Y+2/30`), with `lo` up. `<idx>` picks the /30 out of 10.231.0.0/16; it is
//! reserved by the kernel itself, because creating a link whose name already
//! exists fails, so parallel test processes never share a subnet.
//!
//! Dropping a [`NetNs`] deletes the namespace (which destroys the veth pair),
//! also when the test panicked. Namespaces left by a killed test process are
//! swept the next time a namespace is created.
//!
//! Sockets for use *inside* a namespace are created on a short-lived thread
//! that has entered it (see [`NetNs::enter`]); a socket keeps the namespace
//! it was created in, so the test can use it from any thread.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Output};
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail};
use nix::sched::{CloneFlags, setns};

/// Prefix of every namespace this harness creates.
const NS_PREFIX: &str = "relay-t-";
/// How many /30 subnets fit in 10.231.0.0/16.
const SUBNETS: u32 = 1 << 14;

static NEXT_NS: AtomicU32 = AtomicU32::new(0);
static SWEEP: Once = Once::new();

/// A network namespace with a veth pair to the host; deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    host_if: String,
    ns_if: String,
    host_addr: Ipv4Addr,
    addr: Ipv4Addr,
    ns_mac: String,
    /// Set once the veth pair exists, so Drop knows what to remove.
    has_link: bool,
}

impl NetNs {
    /// Create the namespace, the veth pair, and the addresses; all up.
    pub fn create() -> Result<Self> {
        SWEEP.call_once(sweep_stale);
        let name = format!(
            "{NS_PREFIX}{}-{}",
            std::process::id(),
            NEXT_NS.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name])?;
        // From here on, Drop cleans up whatever part exists.
        let mut ns = Self {
            name,
            host_if: String::new(),
            ns_if: String::new(),
            host_addr: Ipv4Addr::UNSPECIFIED,
            addr: Ipv4Addr::UNSPECIFIED,
            ns_mac: String::new(),
            has_link: false,
        };
        let idx = ns.add_veth_pair()?;
        let [a, b, c, d] = subnet_base(idx).octets();
        ns.host_addr = Ipv4Addr::new(a, b, c, d + 1);
        ns.addr = Ipv4Addr::new(a, b, c, d + 2);
        ip(&["link", "set", &ns.ns_if, "netns", &ns.name])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/30", ns.host_addr),
            "dev",
            &ns.host_if,
        ])?;
        ip(&["link", "set", &ns.host_if, "up"])?;
        ip(&[
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("{}/30", ns.addr),
            "dev",
            &ns.ns_if,
        ])?;
        ip(&["-n", &ns.name, "link", "set", &ns.ns_if, "up"])?;
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &ns.name,
            "route",
            "add",
            "default",
            "via",
            &ns.host_addr.to_string(),
        ])?;
        Ok(ns)
    }

    /// Reserve a subnet index by creating its veth pair; returns the index.
    fn add_veth_pair(&mut self) -> Result<u32> {
        let start = std::process::id()
            .wrapping_mul(64)
            .wrapping_add(NEXT_NS.load(Ordering::Relaxed));
        for attempt in 0..SUBNETS {
            let idx = (start.wrapping_add(attempt)) % SUBNETS;
            let host_if = format!("rt{idx:05}h");
            let ns_if = format!("rt{idx:05}n");
            let ns_mac = format!("02:72:74:{:02x}:{:02x}:02", idx >> 8, idx & 0xff);
            let out = ip_output(&[
                "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if, "address", &ns_mac,
            ])?;
            if out.status.success() {
                self.host_if = host_if;
                self.ns_if = ns_if;
                self.ns_mac = ns_mac;
                self.has_link = true;
                return Ok(idx);
            }
            let stderr = String::from_utf8_lossy(&out.stderr);
            if !stderr.contains("File exists") {
                bail!(
                    "ip link add {host_if} type veth peer name {ns_if} failed: {}",
                    stderr.trim()
                );
            }
        }
        bail!("all {SUBNETS} test subnets in 10.231.0.0/16 are taken (leftover rt*h links?)")
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's own address (on its veth end).
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The namespace's end of the veth pair (its only interface besides `lo`).
    pub fn ns_if(&self) -> &str {
        &self.ns_if
    }

    /// The host's end of the veth pair.
    pub fn host_if(&self) -> &str {
        &self.host_if
    }

    /// The host's address on this namespace's veth (the namespace's gateway).
    pub fn host_addr(&self) -> Ipv4Addr {
        self.host_addr
    }

    /// `ip netns exec <name> <program>`: a Command that runs inside.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Run `program args` inside and fail with its stderr unless it succeeds.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<()> {
        let out = self
            .command(program)
            .args(args)
            .output()
            .with_context(|| format!("running {program} in netns {}", self.name))?;
        if !out.status.success() {
            bail!(
                "{program} {args:?} in netns {} exited with {}: {}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Run `f` on a fresh thread that has entered this namespace.
    ///
    /// Only that thread switches namespaces; it ends when `f` returns, so no
    /// other thread (nor the test's) ever runs in the wrong namespace.
    pub fn enter<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> std::io::Result<T> + Send + 'static,
    {
        let path = format!("/var/run/netns/{}", self.name);
        let handle = std::thread::Builder::new()
            .name(format!("in-{}", self.name))
            .spawn(move || -> Result<T> {
                let ns = File::open(&path).with_context(|| format!("opening {path}"))?;
                setns(&ns, CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("setns into {path}"))?;
                Ok(f()?)
            })
            .context("spawning a thread to enter a netns")?;
        match handle.join() {
            Ok(result) => result.with_context(|| format!("inside netns {}", self.name)),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// A TCP connection made from inside this namespace.
    pub fn tcp_connect(&self, addr: SocketAddr) -> Result<TcpStream> {
        let stream = self
            .enter(move || TcpStream::connect(addr))
            .with_context(|| format!("connecting to {addr}"))?;
        crate::peers::set_io_timeouts(&stream)?;
        Ok(stream)
    }

    /// A TCP listener bound inside this namespace.
    pub fn tcp_listen(&self, addr: SocketAddr) -> Result<TcpListener> {
        self.enter(move || TcpListener::bind(addr))
            .with_context(|| format!("binding {addr}"))
    }

    /// Make the namespace swallow everything sent to it, silently.
    ///
    /// The host keeps a permanent neighbour entry for [`Self::addr`] (so no
    /// ARP failure turns into "no route to host") while the namespace's end
    /// of the veth goes down, so the veth drops every frame. A connect to
    /// the namespace then gets neither SYN-ACK, RST nor ICMP: it hangs until
    /// the connector's own timeout.
    pub fn silence(&self) -> Result<()> {
        ip(&[
            "neigh",
            "replace",
            &self.addr.to_string(),
            "lladdr",
            &self.ns_mac,
            "dev",
            &self.host_if,
            "nud",
            "permanent",
        ])?;
        ip(&["-n", &self.name, "link", "set", &self.ns_if, "down"])
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace destroys its veth end and with it the pair;
        // the explicit link delete covers a pair that never got moved inside.
        if self.has_link {
            let _ = ip_output(&["link", "del", &self.host_if]);
        }
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("warning: could not remove netns {}: {e:#}", self.name);
        }
    }
}

/// The first address of /30 number `idx` in 10.231.0.0/16.
fn subnet_base(idx: u32) -> Ipv4Addr {
    let third = u8::try_from(idx / 64).expect("invariant: idx < 2^14, so idx/64 < 256");
    let fourth = u8::try_from((idx % 64) * 4).expect("invariant: (idx%64)*4 < 256");
    Ipv4Addr::new(10, 231, third, fourth)
}

/// Delete `relay-t-<pid>-*` namespaces whose test process no longer exists.
fn sweep_stale() {
    let Ok(out) = ip_output(&["netns", "list"]) else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(rest) = name.strip_prefix(NS_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip_output(&["netns", "del", name]);
        }
    }
}

fn ip_output(args: &[&str]) -> Result<Output> {
    Command::new("ip")
        .args(args)
        .output()
        .with_context(|| format!("running ip {}", args.join(" ")))
}

pub(crate) fn ip(args: &[&str]) -> Result<()> {
    let out = ip_output(args)?;
    if !out.status.success() {
        bail!(
            "ip {} exited with {}: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_are_distinct_slash_30s_inside_10_231() {
        assert_eq!(subnet_base(0), Ipv4Addr::new(10, 231, 0, 0));
        assert_eq!(subnet_base(1), Ipv4Addr::new(10, 231, 0, 4));
        assert_eq!(subnet_base(SUBNETS - 1), Ipv4Addr::new(10, 231, 255, 252));
    }
}
