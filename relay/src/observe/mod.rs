//! observe: eBPF programs attached inside a network namespace that count
//! what crosses its interfaces.
//!
//! - [`attach`]: which interfaces, and attaching at TC ingress/egress;
//! - [`maps`]: the structs shared with the C program, and reading its maps;
//! - [`export`]: turning snapshots into Prometheus series;
//! - [`session`]: one target, followed across restarts;
//! - [`discover`], [`fleet`]: every container of the host (`containers`),
//!   found through the Docker API and attached one by one;
//! - [`filter`], [`samples`], [`sink`], [`capture`]: sampled packets to
//!   pcapng (`--pcap`), filtered and sampled in the kernel; the filter is
//!   libpcap's classic program, translated by [`cbpf`] and written into the
//!   object's filter stubs by [`stub`] before it loads.
//!
//! The programs live in relay-ebpf/src/observe.bpf.c; the compiled object is
//! committed and embedded here, so building relay needs no clang.

pub mod attach;
pub mod capture;
pub mod cbpf;
pub mod discover;
pub mod dns;
pub mod export;
pub mod filter;
pub mod fleet;
pub mod latency;
pub mod maps;
pub mod samples;
pub mod session;
pub mod sink;
pub mod stub;
pub mod tcp_mib;
pub mod watch;

use std::os::fd::OwnedFd;
use std::sync::Mutex;
use std::time::Duration;

use aya::maps::{Array, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues, RingBuf};
use aya::{Ebpf, EbpfLoader};
use nix::errno::Errno;
use thiserror::Error;

pub use attach::Interface;
use capture::KernelCapture;
use maps::{CaptureKey, CaptureStat, CaptureStats, Counter, FlagKey, FlowKey, TrafficKey};

use crate::netns::Netns;

/// The compiled observe programs (`cargo xtask build-ebpf`), 8-byte aligned as ELF parsing needs.
pub(crate) fn object() -> &'static [u8] {
    aya::include_bytes_aligned!("../../../relay-ebpf/obj/observe.bpf.o")
}

const PROGRAMS: [&str; 2] = ["observe_ingress", "observe_egress"];

/// Why observing failed. Kernel and aya errors are kept as the
/// [`source`](std::error::Error::source) (errno included); the message
/// names what was being done to which program, map or interface.
#[derive(Debug, Error)]
pub enum ObserveError {
    #[error("cannot list the interfaces of the target namespace")]
    Interfaces(#[source] nix::errno::Errno),
    #[error("no interface `{name}` in the target namespace (it has: {})", present.join(", "))]
    NoSuchInterface { name: String, present: Vec<String> },
    #[error(
        "no interface to observe in the target namespace besides loopback (name `lo` with --iface to watch it)"
    )]
    NothingToObserve,
    #[error(
        "the embedded eBPF object has no map `{0}` (stale relay-ebpf/obj? run `cargo xtask build-ebpf`)"
    )]
    MissingMap(&'static str),
    #[error(
        "the embedded eBPF object has no program `{0}` (stale relay-ebpf/obj? run `cargo xtask build-ebpf`)"
    )]
    MissingProgram(&'static str),
    #[error("cannot load the eBPF programs{}", privilege_hint(.source))]
    Load {
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error(
        "program `{program}` of the embedded eBPF object is not a TC classifier (stale relay-ebpf/obj? run `cargo xtask build-ebpf`)"
    )]
    ProgramType {
        program: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("cannot load the eBPF program `{program}`{}", privilege_hint(.source))]
    LoadProgram {
        program: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("cannot attach to {iface} ({direction}){}", attach_hint(.source))]
    Attach {
        program: &'static str,
        iface: String,
        direction: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("cannot {action} the map `{map}`")]
    Map {
        map: &'static str,
        /// "open", "write", ...
        action: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("cannot {action} the map `{map}` for {iface}")]
    MapEntry {
        map: &'static str,
        action: &'static str,
        iface: String,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("cannot count the possible CPUs ({what})")]
    Cpus {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot enable the kernel's BPF run-time statistics (--bpf-stats){}", privilege_hint(.source))]
    Stats {
        #[source]
        source: aya::sys::SyscallError,
    },
    #[error("waiting on the samples ring buffer")]
    Poll(#[source] nix::errno::Errno),
    #[error("cannot start the {what} thread")]
    Thread {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the {what} thread ended abnormally")]
    Join {
        what: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
    #[error("target {0} stopped (use --follow to attach again when it returns)")]
    TargetGone(String),
    /// The filter does not compile for an interface's link type (it did for Ethernet).
    #[error("cannot filter on {iface}: {source}")]
    Filter {
        iface: String,
        #[source]
        source: filter::FilterError,
    },
    #[error(transparent)]
    Stub(#[from] stub::StubError),
    #[error(transparent)]
    Netns(#[from] crate::netns::NetnsError),
    #[error(transparent)]
    Sink(#[from] sink::SinkError),
    /// The capture thread failed (kept whole: a full disk's errno included).
    #[error(transparent)]
    Capture(std::sync::Arc<capture::CaptureError>),
}

impl ObserveError {
    /// A mistake in what the user asked for (exit 2), rather than a failure
    /// of the kernel or the daemon (exit 1).
    pub fn is_bad_input(&self) -> bool {
        match self {
            ObserveError::NoSuchInterface { .. }
            | ObserveError::NothingToObserve
            | ObserveError::Filter { .. } => true,
            ObserveError::Netns(err) => err.is_bad_input(),
            ObserveError::Sink(sink::SinkError::Open { .. }) => true,
            _ => false,
        }
    }

    /// The kernel's errno behind this error, if one is: the first OS error
    /// in the source chain (EPERM: no privileges; ENOENT/ENODEV: the
    /// interface went away).
    ///
    /// ```
    /// use nix::errno::Errno;
    /// use relay::observe::ObserveError;
    ///
    /// let err = ObserveError::Interfaces(Errno::EMFILE);
    /// assert_eq!(err.errno(), Some(Errno::EMFILE));
    /// assert!(!err.is_permission_denied());
    /// ```
    pub fn errno(&self) -> Option<Errno> {
        errno_of(self)
    }

    /// Refused for lack of privileges (EPERM or EACCES from the kernel).
    pub fn is_permission_denied(&self) -> bool {
        matches!(self.errno(), Some(Errno::EPERM | Errno::EACCES))
    }
}

/// The first OS error in `err`'s chain, `err` included.
fn errno_of(err: &(dyn std::error::Error + 'static)) -> Option<Errno> {
    let mut current = Some(err);
    while let Some(err) = current {
        if let Some(errno) = err.downcast_ref::<Errno>() {
            return Some(*errno);
        }
        let raw = if let Some(io) = err.downcast_ref::<std::io::Error>() {
            io.raw_os_error()
        } else if let Some(netlink) = err.downcast_ref::<aya::sys::NetlinkError>() {
            netlink.raw_os_error()
        } else {
            None
        };
        if let Some(raw) = raw {
            return Some(Errno::from_raw(raw));
        }
        current = err.source();
    }
    None
}

/// Said after a failure the kernel refused for lack of privileges.
fn privilege_hint(err: &(dyn std::error::Error + 'static)) -> &'static str {
    match errno_of(err) {
        Some(Errno::EPERM | Errno::EACCES) => {
            " (relay observe needs root, or CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON)"
        }
        _ => "",
    }
}

fn attach_hint(err: &(dyn std::error::Error + 'static)) -> &'static str {
    match errno_of(err) {
        Some(Errno::ENOENT | Errno::ENODEV) => " (the interface is gone)",
        _ => privilege_hint(err),
    }
}

/// Shows an error with its sources, `a: b: c`, for logs that print one
/// error on its own line (`main` prints chains with anyhow's `{:#}`).
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(err) = source {
            write!(f, ": {err}")?;
            source = err.source();
        }
        Ok(())
    }
}

/// What to observe and how.
#[derive(Debug, Clone)]
pub struct ObserveOptions {
    /// Interfaces to attach to; empty means every one (but loopback, unless `loopback`).
    pub interfaces: Vec<String>,
    /// Include loopback when no interface is named: a published container
    /// port is reached over the container's own `lo`.
    pub loopback: bool,
    /// How many flows to export by name; the rest are summed as `other`.
    pub top_flows: usize,
    /// Turn on the kernel's run-time accounting of BPF programs while attached.
    pub bpf_stats: bool,
    /// Sample packets into the ring buffer (`--pcap`).
    pub capture: Option<KernelCapture>,
}

impl Default for ObserveOptions {
    fn default() -> Self {
        ObserveOptions {
            interfaces: Vec::new(),
            loopback: false,
            top_flows: 10,
            bpf_stats: false,
            capture: None,
        }
    }
}

/// Cost of one program as the kernel accounts it (with --bpf-stats).
#[derive(Debug, Clone, Copy, Default)]
pub struct ProgramCost {
    pub run_time: Duration,
    pub runs: u64,
}

/// Everything the maps hold at one moment, summed over CPUs.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub traffic: maps::Traffic,
    pub flags: maps::Flags,
    /// Flows by bytes, largest first.
    pub flows: Vec<(FlowKey, Counter)>,
    pub programs: Vec<(&'static str, ProgramCost)>,
    /// Capture counts (empty without `--pcap`).
    pub capture: CaptureStats,
    /// TCP handshake latency, per direction.
    pub handshakes: Vec<(latency::Direction, latency::LatencyHist)>,
    /// DNS messages by direction, type and rcode.
    pub dns: Vec<dns::DnsCount>,
    /// DNS response latency, per direction.
    pub dns_latency: Vec<(latency::Direction, latency::LatencyHist)>,
    /// TCP segments the namespace sent and retransmitted since attach (the
    /// kernel's MIB; `None` when it could not be read).
    pub segments: Option<tcp_mib::TcpSegments>,
}

/// Programs loaded and attached in one namespace; dropping it detaches them.
pub struct Observer {
    target: String,
    interfaces: Vec<Interface>,
    ebpf: Mutex<Ebpf>,
    /// The `samples` ring buffer until the capture thread takes it.
    samples: Mutex<Option<RingBuf<MapData>>>,
    capturing: bool,
    /// The namespace's TCP counters (retransmissions).
    tcp_mib: Option<Mutex<tcp_mib::TcpMib>>,
    /// Keeps the kernel's BPF run-time accounting on while held.
    _stats: Option<OwnedFd>,
}

impl Observer {
    /// Loads the programs and attaches them inside `netns`, on a thread
    /// that has entered it (never on an async worker).
    pub fn attach(netns: &Netns, options: &ObserveOptions) -> Result<Self, ObserveError> {
        let (only, loopback) = (options.interfaces.clone(), options.loopback);
        let capture = options.capture.clone();
        let capturing = capture.is_some();
        type Attached = (Ebpf, Vec<Interface>, std::io::Result<tcp_mib::TcpMib>);
        let (mut ebpf, interfaces, mib) =
            netns.run(move || -> Result<Attached, ObserveError> {
                let interfaces = attach::interfaces(&only, loopback)?;
                if interfaces.is_empty() {
                    return Err(ObserveError::NothingToObserve);
                }
                let mut ebpf = load(capture.as_ref(), &interfaces)?;
                if capture.is_some() {
                    start_capture(&mut ebpf, &interfaces)?;
                }
                attach::attach_all(&mut ebpf, &interfaces)?;
                Ok((ebpf, interfaces, tcp_mib::TcpMib::open_here()))
            })??;
        let samples = if capturing {
            let map = ebpf
                .take_map("samples")
                .ok_or(ObserveError::MissingMap("samples"))?;
            Some(RingBuf::try_from(map).map_err(map_error("samples", "open"))?)
        } else {
            None
        };
        let stats = if options.bpf_stats {
            Some(
                aya::sys::enable_stats(aya::sys::Stats::RunTime)
                    .map_err(|source| ObserveError::Stats { source })?,
            )
        } else {
            None
        };
        let target = netns.label().to_string();
        let tcp_mib = match mib {
            Ok(mib) => Some(Mutex::new(mib)),
            Err(err) => {
                tracing::warn!(observed = %target, error = %err, "cannot read the namespace's /proc/net/snmp: no relay_observe_tcp_retransmits_total for it");
                None
            }
        };
        for iface in &interfaces {
            tracing::info!(observed = %target, iface = %iface.name, "observing (ingress and egress)");
        }
        Ok(Observer {
            target,
            interfaces,
            ebpf: Mutex::new(ebpf),
            samples: Mutex::new(samples),
            capturing,
            tcp_mib,
            _stats: stats,
        })
    }

    pub fn target(&self) -> &str {
        &self.target
    }

    pub fn interfaces(&self) -> &[Interface] {
        &self.interfaces
    }

    /// The ring buffer samples arrive in (once: the capture thread owns it).
    pub fn take_samples(&self) -> Result<RingBuf<MapData>, ObserveError> {
        self.samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .ok_or(ObserveError::MissingMap("samples"))
    }

    /// The kernel's capture counts, summed over CPUs (empty without capture).
    pub fn capture_stats(&self) -> Result<CaptureStats, ObserveError> {
        if !self.capturing {
            return Ok(CaptureStats::new());
        }
        let ebpf = self.ebpf.lock().unwrap_or_else(|p| p.into_inner());
        let map: PerCpuHashMap<_, CaptureKey, u64> = PerCpuHashMap::try_from(
            ebpf.map("capture_stats")
                .ok_or(ObserveError::MissingMap("capture_stats"))?,
        )
        .map_err(map_error("capture_stats", "open"))?;
        Ok(maps::read_capture(&map))
    }

    /// Tells the programs to stop sampling (counting goes on).
    pub fn stop_capture(&self) {
        let mut ebpf = self.ebpf.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(err) = set_capture_ctl(&mut ebpf, 0) {
            tracing::warn!(error = %Chain(&err), "cannot stop the kernel side of the capture");
        }
    }

    /// Segments the namespace sent and retransmitted since attach.
    fn segments(&self) -> Option<tcp_mib::TcpSegments> {
        let mut mib = self
            .tcp_mib
            .as_ref()?
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match mib.since_open() {
            Ok(count) => Some(count),
            Err(err) => {
                tracing::debug!(observed = %self.target, error = %err, "reading /proc/net/snmp");
                None
            }
        }
    }

    /// Reads every map once.
    pub fn snapshot(&self) -> Result<Snapshot, ObserveError> {
        let ebpf = self.ebpf.lock().unwrap_or_else(|p| p.into_inner());
        let open = |name: &'static str| ebpf.map(name).ok_or(ObserveError::MissingMap(name));
        let traffic: PerCpuHashMap<_, TrafficKey, Counter> =
            PerCpuHashMap::try_from(open("traffic")?).map_err(map_error("traffic", "open"))?;
        let flags: PerCpuHashMap<_, FlagKey, u64> =
            PerCpuHashMap::try_from(open("tcp_flags")?).map_err(map_error("tcp_flags", "open"))?;
        let flows: PerCpuHashMap<_, FlowKey, Counter> =
            PerCpuHashMap::try_from(open("flows")?).map_err(map_error("flows", "open"))?;
        let histogram = |name: &'static str| -> Result<_, ObserveError> {
            let map: PerCpuArray<_, latency::LatencyHist> =
                PerCpuArray::try_from(open(name)?).map_err(map_error(name, "open"))?;
            Ok(latency::read(&map))
        };
        let (handshakes, dns_latency) = (histogram("handshakes")?, histogram("dns_latency")?);
        let dns: PerCpuHashMap<_, dns::DnsKey, u64> =
            PerCpuHashMap::try_from(open("dns")?).map_err(map_error("dns", "open"))?;
        let dns = dns::read(&dns);
        let mut flows = maps::read_flows(&flows);
        flows.sort_by_key(|(_, counter)| std::cmp::Reverse(counter.bytes));
        let programs = PROGRAMS
            .iter()
            .filter_map(|name| {
                let info = ebpf.program(name)?.info().ok()?;
                Some((
                    *name,
                    ProgramCost {
                        run_time: info.run_time(),
                        runs: info.run_count(),
                    },
                ))
            })
            .collect();
        let (traffic, flags) = (maps::read_traffic(&traffic), maps::read_flags(&flags));
        drop(ebpf);
        Ok(Snapshot {
            traffic,
            flags,
            flows,
            programs,
            capture: self.capture_stats()?,
            handshakes,
            dns,
            dns_latency,
            segments: self.segments(),
        })
    }
}

/// Flows --flow-head tracks at once (the least recently seen make room).
const FLOW_HEAD_FLOWS: u32 = 65536;

/// Loads the object, with the capture tunables when capturing (without,
/// the verifier prunes the capture path: counting costs what it did), and
/// the filter written into the stub of each link type among `interfaces`.
fn load(capture: Option<&KernelCapture>, interfaces: &[Interface]) -> Result<Ebpf, ObserveError> {
    let Some(capture) = capture else {
        return EbpfLoader::new()
            .load(object())
            .map_err(|source| ObserveError::Load {
                source: Box::new(source),
            });
    };
    let mut object = stub::Object8::new(object());
    let mut patched = Vec::new();
    for iface in interfaces {
        let (link, name) = if iface.l2_len == 0 {
            (filter::LinkType::Raw, stub::RAW)
        } else {
            (filter::LinkType::Ethernet, stub::ETHER)
        };
        if patched.contains(&name) {
            continue;
        }
        let program = capture
            .filter
            .program(link)
            .map_err(|source| ObserveError::Filter {
                iface: iface.name.clone(),
                source,
            })?;
        if let Some(program) = program {
            stub::patch(&mut object, name, &program)?;
        }
        patched.push(name);
    }
    let filter_on = u32::from(!capture.filter.is_all());
    let direction = match capture.direction {
        None => 0u32,
        Some(maps::Direction::Ingress) => 1,
        Some(maps::Direction::Egress) => 2,
    };
    let cpus = nr_cpus()?;
    let cpus = u32::try_from(cpus).unwrap_or(u32::MAX);
    let on = 1u32;
    // Woken at a quarter full; the reader also drains every few milliseconds.
    let wakeup_bytes = capture.ring_bytes / 4;
    let stats_entries =
        u32::try_from(interfaces.len().max(1) * maps::CaptureStat::ALL.len()).unwrap_or(u32::MAX);
    // The LRU map is allocated whole at creation: only as big as --flow-head needs.
    let flow_entries = if capture.flow_head > 0 {
        FLOW_HEAD_FLOWS
    } else {
        1
    };
    EbpfLoader::new()
        .override_global("capture_on", &on, true)
        .override_global("sample_every", &capture.sample_every, true)
        .override_global("flow_head", &capture.flow_head, true)
        .override_global("snaplen", &capture.snaplen, true)
        .override_global("wakeup_bytes", &wakeup_bytes, true)
        .override_global("filter_on", &filter_on, true)
        .override_global("capture_direction", &direction, true)
        .map_max_entries("samples", capture.ring_bytes)
        .map_max_entries("capture_scratch", cpus)
        .map_max_entries("capture_stats", stats_entries)
        .map_max_entries("capture_flows", flow_entries)
        .load(object.bytes())
        .map_err(|source| ObserveError::Load {
            source: Box::new(source),
        })
}

/// Seeds every (interface, counter) of `capture_stats` with zeros, so the
/// programs only ever increment, then turns sampling on.
fn start_capture(ebpf: &mut Ebpf, interfaces: &[Interface]) -> Result<(), ObserveError> {
    let cpus = nr_cpus()?;
    let mut stats: PerCpuHashMap<_, CaptureKey, u64> = PerCpuHashMap::try_from(
        ebpf.map_mut("capture_stats")
            .ok_or(ObserveError::MissingMap("capture_stats"))?,
    )
    .map_err(map_error("capture_stats", "open"))?;
    for iface in interfaces {
        for stat in CaptureStat::ALL {
            let zeros =
                PerCpuValues::try_from(vec![0u64; cpus]).map_err(|source| ObserveError::Cpus {
                    what: "per-CPU zeros for capture_stats",
                    source,
                })?;
            let key = CaptureKey {
                ifindex: iface.index,
                stat: stat.raw(),
            };
            stats
                .insert(key, zeros, 0)
                .map_err(|source| ObserveError::MapEntry {
                    map: "capture_stats",
                    action: "seed",
                    iface: iface.name.clone(),
                    source: Box::new(source),
                })?;
        }
    }
    set_capture_ctl(ebpf, 1)
}

fn set_capture_ctl(ebpf: &mut Ebpf, on: u32) -> Result<(), ObserveError> {
    let mut ctl: Array<_, u32> = Array::try_from(
        ebpf.map_mut("capture_ctl")
            .ok_or(ObserveError::MissingMap("capture_ctl"))?,
    )
    .map_err(map_error("capture_ctl", "open"))?;
    ctl.set(0, on, 0).map_err(map_error("capture_ctl", "write"))
}

/// Wraps a map error with the map's name and what was being done to it.
fn map_error(
    map: &'static str,
    action: &'static str,
) -> impl FnOnce(aya::maps::MapError) -> ObserveError {
    move |source| ObserveError::Map {
        map,
        action,
        source: Box::new(source),
    }
}

fn nr_cpus() -> Result<usize, ObserveError> {
    aya::util::nr_cpus().map_err(|(what, source)| ObserveError::Cpus { what, source })
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;
    use std::io;
    use std::sync::Arc;

    use aya::maps::MapError;
    use aya::programs::ProgramError;
    use aya::sys::SyscallError;

    use super::*;

    fn os(errno: Errno) -> io::Error {
        io::Error::from_raw_os_error(errno as i32)
    }

    #[test]
    fn a_refused_load_keeps_the_errno_and_says_what_privileges_it_needs() {
        let err = ObserveError::Load {
            source: Box::new(aya::EbpfError::MapError(MapError::CreateError {
                name: "traffic".into(),
                io_error: os(Errno::EPERM),
            })),
        };
        assert_eq!(err.errno(), Some(Errno::EPERM));
        assert!(err.is_permission_denied());
        assert!(err.to_string().contains("needs root, or CAP_BPF"), "{err}");
        // The chain goes down to the kernel's answer.
        let mut deepest: &dyn std::error::Error = &err;
        while let Some(next) = deepest.source() {
            deepest = next;
        }
        let io = deepest
            .downcast_ref::<io::Error>()
            .expect("io::Error at the bottom");
        assert_eq!(io.raw_os_error(), Some(Errno::EPERM as i32));
        assert!(
            Chain(&err).to_string().contains("traffic"),
            "{}",
            Chain(&err)
        );
    }

    #[test]
    fn a_load_failing_for_another_reason_does_not_blame_privileges() {
        let err = ObserveError::LoadProgram {
            program: "observe_ingress",
            source: Box::new(ProgramError::SyscallError(SyscallError {
                call: "bpf_prog_load",
                io_error: os(Errno::EINVAL),
            })),
        };
        assert_eq!(err.errno(), Some(Errno::EINVAL));
        assert!(!err.is_permission_denied());
        assert_eq!(
            err.to_string(),
            "cannot load the eBPF program `observe_ingress`"
        );
    }

    #[test]
    fn attaching_to_a_vanished_interface_says_so() {
        let err = ObserveError::Attach {
            program: "observe_egress",
            iface: "veth0".into(),
            direction: "egress",
            source: Box::new(ProgramError::SyscallError(SyscallError {
                call: "bpf_link_create",
                io_error: os(Errno::ENODEV),
            })),
        };
        assert_eq!(err.errno(), Some(Errno::ENODEV));
        assert_eq!(
            err.to_string(),
            "cannot attach to veth0 (egress) (the interface is gone)"
        );
    }

    #[test]
    fn a_full_disk_reaches_the_caller_as_enospc() {
        let failed = Arc::new(capture::CaptureError::Sink(sink::SinkError::Write {
            path: "/tmp/x.pcapng".into(),
            source: os(Errno::ENOSPC),
        }));
        let err = ObserveError::Capture(failed);
        let source = err.source().expect("the io::Error is the source");
        assert_eq!(
            source
                .downcast_ref::<io::Error>()
                .and_then(io::Error::raw_os_error),
            Some(Errno::ENOSPC as i32)
        );
        assert_eq!(err.errno(), Some(Errno::ENOSPC));
        let shown = Chain(&err).to_string();
        assert!(
            shown.contains("/tmp/x.pcapng") && shown.contains("No space left on device"),
            "{shown}"
        );
    }

    #[test]
    fn listing_interfaces_keeps_the_errno() {
        let err = ObserveError::Interfaces(Errno::EMFILE);
        assert_eq!(
            err.source().and_then(|e| e.downcast_ref::<Errno>()),
            Some(&Errno::EMFILE)
        );
        assert_eq!(err.errno(), Some(Errno::EMFILE));
        assert_eq!(ObserveError::NothingToObserve.errno(), None);
    }
}
