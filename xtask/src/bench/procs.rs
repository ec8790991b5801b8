//! Processes, ports and readiness for the benchmarks, in one place.
//!
//! Every background process is started through [`Proc::spawn`] in its own
//! process group, with stdout and stderr in `target/bench/logs/`. Dropping
//! the [`Proc`] kills the whole group (socat's forked children and nginx's
//! worker included); a signal thread does the same for SIGINT/SIGTERM/SIGHUP,
//! when no destructor would run. Temp dirs ([`TempDir`]) are handled the
//! same way. Readiness is polled, never slept for.

use std::collections::BTreeSet;
use std::fs::File;
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use nix::sys::signal::{SigSet, Signal, killpg};
use nix::unistd::Pid;

use crate::{cmd, workspace};

/// Process groups alive right now, for the signal thread to kill.
static LIVE_GROUPS: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());
/// Temp dirs alive right now, for the signal thread to remove.
static LIVE_DIRS: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

/// Route SIGINT/SIGTERM/SIGHUP to a thread that kills every live process
/// group, removes the temp dirs and exits 130. Call before any other thread is started, so that
/// every thread inherits the blocked mask ([`Proc::spawn`] clears it in
/// children).
pub fn install_signal_cleanup() -> Result<()> {
    let mut set = SigSet::empty();
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(sig);
    }
    set.thread_block()
        .context("cannot block SIGINT/SIGTERM/SIGHUP")?;
    std::thread::Builder::new()
        .name("signal-cleanup".into())
        .spawn(move || {
            let sig = set.wait();
            let groups = LIVE_GROUPS.lock().map(|g| g.clone()).unwrap_or_default();
            for pgid in &groups {
                let _ = killpg(Pid::from_raw(*pgid), Signal::SIGKILL);
            }
            for dir in LIVE_DIRS.lock().map(|d| d.clone()).unwrap_or_default() {
                let _ = std::fs::remove_dir_all(dir);
            }
            eprintln!(
                "\nxtask: interrupted ({}); killed {} benchmark process group(s)",
                sig.map(|s| s.as_str()).unwrap_or("signal"),
                groups.len()
            );
            std::process::exit(130);
        })
        .context("cannot start the signal-cleanup thread")?;
    Ok(())
}

/// A background process (and everything it forks); killed on drop.
pub struct Proc {
    name: String,
    child: Child,
    stdout_log: PathBuf,
    stderr_log: PathBuf,
    exited: Option<ExitStatus>,
}

impl Proc {
    /// Start `cmd` in a new process group, output to `logs/<name>.{out,err}`.
    pub fn spawn(name: &str, mut cmd: Command) -> Result<Proc> {
        let logs = workspace::bench_dir().join("logs");
        std::fs::create_dir_all(&logs)
            .with_context(|| format!("cannot create {}", logs.display()))?;
        let stdout_log = logs.join(format!("{name}.out"));
        let stderr_log = logs.join(format!("{name}.err"));
        let out = File::create(&stdout_log)
            .with_context(|| format!("cannot create {}", stdout_log.display()))?;
        let err = File::create(&stderr_log)
            .with_context(|| format!("cannot create {}", stderr_log.display()))?;
        let what = cmd::render(&cmd);
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        // The signals this process blocks for its cleanup thread stay
        // blocked in children that std spawns (seen: SigBlk 0x4003 in a
        // relay, whose SIGINT then never arrived). Unblock them in the child.
        // SAFETY: between fork and exec only async-signal-safe calls are
        // allowed; pthread_sigmask is one, and nothing is allocated.
        unsafe {
            cmd.pre_exec(|| {
                SigSet::empty()
                    .thread_set_mask()
                    .map_err(std::io::Error::from)
            });
        }
        // Hold the lock across spawn so the signal thread cannot miss a group.
        let mut live = LIVE_GROUPS
            .lock()
            .map_err(|_| anyhow!("process registry poisoned"))?;
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name}: `{what}` (is it installed?)"))?;
        let pid = i32::try_from(child.id()).expect("invariant: Linux pids fit in i32");
        live.insert(pid);
        Ok(Proc {
            name: name.to_string(),
            child,
            stdout_log,
            stderr_log,
            exited: None,
        })
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("invariant: Linux pids fit in i32")
    }

    /// Err with the process's stderr when it has exited (it should not have).
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.poll_exit()? {
            bail!(
                "{} exited early ({status}); stderr:\n{}",
                self.name,
                self.stderr_tail()
            );
        }
        Ok(())
    }

    fn poll_exit(&mut self) -> Result<Option<ExitStatus>> {
        if self.exited.is_none() {
            self.exited = self
                .child
                .try_wait()
                .with_context(|| format!("cannot wait for {}", self.name))?;
        }
        Ok(self.exited)
    }

    /// Wait for a process that ends by itself (a client run); kill it and
    /// fail after `timeout`. Returns its stdout.
    pub fn wait_output(mut self, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.poll_exit()? {
                break status;
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not finish within {timeout:?}; stderr:\n{}",
                    self.name,
                    self.stderr_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let stdout = std::fs::read_to_string(&self.stdout_log)
            .with_context(|| format!("cannot read {}", self.stdout_log.display()))?;
        if !status.success() {
            bail!(
                "{} failed ({status}); stderr:\n{}\nstdout (last lines):\n{}",
                self.name,
                self.stderr_tail(),
                tail(&stdout, 15)
            );
        }
        Ok(stdout)
    }

    /// The last lines of the process's stderr, for error messages.
    pub fn stderr_tail(&self) -> String {
        match std::fs::read_to_string(&self.stderr_log) {
            Ok(text) if text.trim().is_empty() => "  (empty)".to_string(),
            Ok(text) => tail(&text, 15),
            Err(err) => format!("  (cannot read {}: {err})", self.stderr_log.display()),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let pid = self.pid();
        // The group outlives its leader (socat's children), so kill it even
        // when the leader has exited; ESRCH then is fine.
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        if self.exited.is_none() {
            let _ = self.child.wait();
        }
        // The others (nginx's workers, socat's forks) are not our children:
        // wait a moment for them to be gone, so that the next measurement
        // does not share the machine with a dying forwarder.
        let deadline = Instant::now() + Duration::from_secs(2);
        while running_members(pid) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if let Ok(mut live) = LIVE_GROUPS.lock() {
            live.remove(&pid);
        }
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..]
        .iter()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A directory under /tmp (world-traversable, so that an unprivileged
/// nginx worker can read it), removed on drop or on interrupt.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(label: &str) -> Result<TempDir> {
        use std::os::unix::fs::PermissionsExt;
        let path = std::env::temp_dir().join(format!("relay-bench-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        if let Ok(mut live) = LIVE_DIRS.lock() {
            live.insert(path.clone());
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("cannot chmod {}", path.display()))?;
        Ok(TempDir { path })
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
        if let Ok(mut live) = LIVE_DIRS.lock() {
            live.remove(&self.path);
        }
    }
}

/// Ports handed out so far; the next candidate is derived from it.
static PORTS_TRIED: AtomicU32 = AtomicU32::new(0);

/// A loopback TCP port that is free right now (nobody bound, no TIME_WAIT),
/// taken below the ephemeral range so that the thousands of outgoing
/// connections of the memory bench cannot be holding it.
pub fn free_port() -> Result<u16> {
    const LOW: u32 = 10_000;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            text.split_whitespace()
                .next()
                .and_then(|n| n.parse::<u32>().ok())
        })
        .unwrap_or(32_768);
    let span = ephemeral_low.saturating_sub(LOW).max(1_000);
    // Start somewhere different per run, so that two benches side by side
    // (or a bench beside the tests) do not keep racing for the same port.
    let seed = std::process::id().wrapping_mul(7919);
    for _ in 0..span {
        let n = PORTS_TRIED.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(LOW + seed.wrapping_add(n) % span)
            .expect("invariant: LOW + span < 65536");
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free loopback TCP port between {LOW} and {}", LOW + span)
}

/// Poll /proc/net/tcp{,6} until something LISTENs on `port`; fail early if
/// `owner` (the process expected to listen) exits.
pub fn wait_listening(port: u16, owner: &mut Proc, timeout: Duration) -> Result<()> {
    wait_listening_in("/proc/net", port, owner, timeout)
}

/// [`wait_listening`] in `owner`'s own network namespace (a server started
/// under `ip netns exec`): `/proc/<owner>/net/tcp{,6}`.
pub fn wait_listening_in_own_netns(port: u16, owner: &mut Proc, timeout: Duration) -> Result<()> {
    let tables = format!("/proc/{}/net", owner.pid());
    wait_listening_in(&tables, port, owner, timeout)
}

fn wait_listening_in(tables: &str, port: u16, owner: &mut Proc, timeout: Duration) -> Result<()> {
    wait_all_listening_in(tables, &[port], owner, timeout)
}

/// [`wait_listening`] for several ports of one process (a forwarder with
/// many routes), reading the tables once per poll.
pub fn wait_all_listening(ports: &[u16], owner: &mut Proc, timeout: Duration) -> Result<()> {
    wait_all_listening_in("/proc/net", ports, owner, timeout)
}

fn wait_all_listening_in(
    tables: &str,
    ports: &[u16],
    owner: &mut Proc,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let listening = listening_ports(tables)?;
        let missing: Vec<u16> = ports
            .iter()
            .copied()
            .filter(|p| !listening.contains(p))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        owner.check_alive()?;
        if Instant::now() > deadline {
            bail!(
                "{} is not listening on port(s) {missing:?} after {timeout:?}; stderr:\n{}",
                owner.name,
                owner.stderr_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Every port something LISTENs on, from `<tables>/tcp{,6}`.
fn listening_ports(tables: &str) -> Result<BTreeSet<u16>> {
    const TCP_LISTEN: &str = "0A";
    let mut ports = BTreeSet::new();
    for table in [format!("{tables}/tcp"), format!("{tables}/tcp6")] {
        let text = match std::fs::read_to_string(&table) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
            Err(err) => return Err(err).with_context(|| format!("cannot read {table}")),
        };
        // "  sl  local_address rem_address   st ..." then e.g.
        // "   0: 0100007F:1F90 00000000:0000 0A ..."
        for line in text.lines().skip(1) {
            let mut fields = line.split_whitespace();
            let local = fields.nth(1).unwrap_or("");
            let state = fields.nth(1).unwrap_or("");
            if state != TCP_LISTEN {
                continue;
            }
            if let Some(port) = local
                .rsplit(':')
                .next()
                .and_then(|hex| u16::from_str_radix(hex, 16).ok())
            {
                ports.insert(port);
            }
        }
    }
    Ok(ports)
}

/// Raise RLIMIT_NOFILE (soft and, as root, hard) to at least `want`, so
/// this process and the children it starts can hold that many sockets.
/// Returns the (soft, hard) limits now in force; the soft one may stay
/// below `want` when the hard one cannot be raised (no CAP_SYS_RESOURCE).
pub fn raise_nofile(want: u64) -> Result<(u64, u64)> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit(RLIMIT_NOFILE)")?;
    if soft >= want {
        return Ok((soft, hard));
    }
    if hard < want && setrlimit(Resource::RLIMIT_NOFILE, want, want).is_ok() {
        return Ok((want, want));
    }
    let soft = hard.min(want);
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).context("setrlimit(RLIMIT_NOFILE)")?;
    Ok((soft, hard))
}

/// CPU time `pid` has used: user + system, plus that of its children once
/// reaped (socat's forks), from /proc/<pid>/stat, in seconds.
pub fn cpu_seconds(pid: i32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    parse_cpu_ticks(&stat)
        .map(|ticks| ticks as f64 / clock_ticks_per_second())
        .with_context(|| format!("unexpected /proc/{pid}/stat: {stat}"))
}

/// CPU time of every process in group `pgid` (a forwarder and its workers
/// or forks): each member's own, plus what each has reaped. A member that
/// exits between listing and reading is skipped; its parent counts it
/// once reaped.
pub fn group_cpu_seconds(pgid: i32) -> Result<f64> {
    let mut total = 0.0;
    for pid in group_members(pgid)? {
        if let Ok(secs) = cpu_seconds(pid) {
            total += secs;
        }
    }
    Ok(total)
}

/// The pids in process group `pgid`, from /proc.
pub fn group_members(pgid: i32) -> Result<Vec<i32>> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").context("cannot list /proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid pgrp ...": comm may hold spaces or ')'.
        let after_comm = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        if after_comm
            .split_whitespace()
            .nth(2)
            .and_then(|s| s.parse::<i32>().ok())
            == Some(pgid)
        {
            pids.push(pid);
        }
    }
    Ok(pids)
}

/// Members of group `pgid` that are not zombies (a zombie holds no socket
/// and uses no CPU; init reaps it when it will).
fn running_members(pgid: i32) -> usize {
    group_members(pgid).map_or(0, |pids| {
        pids.into_iter()
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                    let state = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
                    !state.trim_start().starts_with('Z')
                })
            })
            .count()
    })
}

/// utime + stime + cutime + cstime (fields 14-17), counted after the
/// command name, which may hold spaces and parentheses.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    // Field 3 (state) is the first after the name; 14..=17 follow.
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    (11..=14).map(|i| fields.get(i)?.parse::<u64>().ok()).sum()
}

fn clock_ticks_per_second() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |t| t as f64)
}

#[cfg(test)]
mod cpu_tests {
    use super::*;

    #[test]
    fn cpu_ticks_sum_the_four_fields_after_an_awkward_name() {
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 2 1 20 0 1 0 5 0 0";
        assert_eq!(parse_cpu_ticks(stat), Some(7 + 3 + 2 + 1));
    }
}

/// CPU time the whole machine has been busy (every process, softirq and
/// kernel worker included), from /proc/stat, in seconds. Work a kernel data
/// path does outside the forwarder's own threads shows here only.
pub fn host_busy_seconds() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat").context("cannot read /proc/stat")?;
    parse_busy_ticks(&stat)
        .map(|ticks| ticks as f64 / clock_ticks_per_second())
        .context("unexpected first line in /proc/stat")
}

/// `cpu  user nice system idle iowait irq softirq steal ...`: all but idle and iowait.
fn parse_busy_ticks(stat: &str) -> Option<u64> {
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let at = |i: usize| fields.get(i).copied();
    Some(at(0)? + at(1)? + at(2)? + at(5)? + at(6)? + at(7).unwrap_or(0))
}

#[cfg(test)]
mod busy_tests {
    use super::*;

    #[test]
    fn busy_ticks_leave_out_idle_and_iowait() {
        let stat = "cpu  10 1 5 1000 7 2 3 4 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n";
        assert_eq!(parse_busy_ticks(stat), Some(10 + 1 + 5 + 2 + 3 + 4));
    }
}
