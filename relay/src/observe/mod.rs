//! observe: eBPF programs attached inside a network namespace that count
//! what crosses its interfaces.
//!
//! - [`attach`]: which interfaces, and attaching at TC ingress/egress;
//! - [`maps`]: the structs shared with the C program, and reading its maps;
//! - [`export`]: turning snapshots into Prometheus series;
//! - [`filter`], [`samples`], [`sink`], [`capture`]: sampled packets to
//!   pcapng (`--pcap`), filtered and sampled in the kernel.
//!
//! The programs live in relay-ebpf/src/observe.bpf.c; the compiled object is
//! committed and embedded here, so building relay needs no clang.

pub mod attach;
pub mod capture;
pub mod export;
pub mod filter;
pub mod maps;
pub mod samples;
pub mod session;
pub mod sink;
pub mod watch;

use std::os::fd::OwnedFd;
use std::sync::Mutex;
use std::time::Duration;

use aya::maps::{Array, MapData, PerCpuHashMap, PerCpuValues, RingBuf};
use aya::{Ebpf, EbpfLoader};
use thiserror::Error;

pub use attach::Interface;
use capture::KernelCapture;
use maps::{CaptureKey, CaptureStat, CaptureStats, Counter, FlagKey, FlowKey, TrafficKey};

use crate::netns::Netns;

/// The compiled observe programs (`cargo xtask build-ebpf`), 8-byte aligned as ELF parsing needs.
fn object() -> &'static [u8] {
    aya::include_bytes_aligned!("../../../relay-ebpf/obj/observe.bpf.o")
}

const PROGRAMS: [&str; 2] = ["observe_ingress", "observe_egress"];

#[derive(Debug, Error)]
pub enum ObserveError {
    #[error("cannot list interfaces: {0}")]
    Interfaces(String),
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
    #[error(
        "cannot load the eBPF programs: {0} (relay observe needs root, or CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON)"
    )]
    Load(String),
    #[error("cannot attach to {iface} ({direction}): {cause}")]
    Attach {
        iface: String,
        direction: &'static str,
        cause: String,
    },
    #[error("{what}: {cause}")]
    Kernel { what: String, cause: String },
    #[error("target {0} stopped (use --follow to attach again when it returns)")]
    TargetGone(String),
    #[error(transparent)]
    Netns(#[from] crate::netns::NetnsError),
    #[error(transparent)]
    Sink(#[from] sink::SinkError),
    #[error("{0}")]
    CaptureFailed(String),
}

impl ObserveError {
    /// A mistake in what the user asked for (exit 2), rather than a failure
    /// of the kernel or the daemon (exit 1).
    pub fn is_bad_input(&self) -> bool {
        match self {
            ObserveError::NoSuchInterface { .. } | ObserveError::NothingToObserve => true,
            ObserveError::Netns(err) => err.is_bad_input(),
            ObserveError::Sink(sink::SinkError::Open { .. }) => true,
            _ => false,
        }
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
}

/// Programs loaded and attached in one namespace; dropping it detaches them.
pub struct Observer {
    target: String,
    interfaces: Vec<Interface>,
    ebpf: Mutex<Ebpf>,
    /// The `samples` ring buffer until the capture thread takes it.
    samples: Mutex<Option<RingBuf<MapData>>>,
    capturing: bool,
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
        let (mut ebpf, interfaces) =
            netns.run(move || -> Result<(Ebpf, Vec<Interface>), ObserveError> {
                let interfaces = attach::interfaces(&only, loopback)?;
                if interfaces.is_empty() {
                    return Err(ObserveError::NothingToObserve);
                }
                let mut ebpf = load(capture.as_ref(), interfaces.len())?;
                if capture.is_some() {
                    start_capture(&mut ebpf, &interfaces)?;
                }
                attach::attach_all(&mut ebpf, &interfaces)?;
                Ok((ebpf, interfaces))
            })??;
        let samples = if capturing {
            let map = ebpf
                .take_map("samples")
                .ok_or(ObserveError::MissingMap("samples"))?;
            Some(RingBuf::try_from(map).map_err(|e| ObserveError::Kernel {
                what: "map samples".into(),
                cause: e.to_string(),
            })?)
        } else {
            None
        };
        let stats = if options.bpf_stats {
            Some(
                aya::sys::enable_stats(aya::sys::Stats::RunTime).map_err(|e| {
                    ObserveError::Kernel {
                        what: "enabling BPF run-time statistics".into(),
                        cause: e.to_string(),
                    }
                })?,
            )
        } else {
            None
        };
        let target = netns.label().to_string();
        for iface in &interfaces {
            tracing::info!(observed = %target, iface = %iface.name, "observing (ingress and egress)");
        }
        Ok(Observer {
            target,
            interfaces,
            ebpf: Mutex::new(ebpf),
            samples: Mutex::new(samples),
            capturing,
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
        .map_err(|e| ObserveError::Kernel {
            what: "map capture_stats".into(),
            cause: e.to_string(),
        })?;
        Ok(maps::read_capture(&map))
    }

    /// Tells the programs to stop sampling (counting goes on).
    pub fn stop_capture(&self) {
        let mut ebpf = self.ebpf.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(err) = set_capture_ctl(&mut ebpf, 0) {
            tracing::warn!(error = %err, "cannot stop the kernel side of the capture");
        }
    }

    /// Reads every map once.
    pub fn snapshot(&self) -> Result<Snapshot, ObserveError> {
        let ebpf = self.ebpf.lock().unwrap_or_else(|p| p.into_inner());
        let open = |name: &'static str| ebpf.map(name).ok_or(ObserveError::MissingMap(name));
        let kernel = |what: &str| {
            let what = what.to_string();
            move |e: aya::maps::MapError| ObserveError::Kernel {
                what: what.clone(),
                cause: e.to_string(),
            }
        };
        let traffic: PerCpuHashMap<_, TrafficKey, Counter> =
            PerCpuHashMap::try_from(open("traffic")?).map_err(kernel("map traffic"))?;
        let flags: PerCpuHashMap<_, FlagKey, u64> =
            PerCpuHashMap::try_from(open("tcp_flags")?).map_err(kernel("map tcp_flags"))?;
        let flows: PerCpuHashMap<_, FlowKey, Counter> =
            PerCpuHashMap::try_from(open("flows")?).map_err(kernel("map flows"))?;
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
        })
    }
}

/// Flows --flow-head tracks at once (the least recently seen make room).
const FLOW_HEAD_FLOWS: u32 = 65536;

/// Loads the object, with the capture tunables when capturing (without,
/// the verifier prunes the capture path: counting costs what it did).
fn load(capture: Option<&KernelCapture>, interfaces: usize) -> Result<Ebpf, ObserveError> {
    let Some(capture) = capture else {
        return EbpfLoader::new()
            .load(object())
            .map_err(|e| ObserveError::Load(e.to_string()));
    };
    let (rules, filter_len) = capture.filter.table();
    let cpus = aya::util::nr_cpus().map_err(|(what, e)| ObserveError::Kernel {
        what: what.to_string(),
        cause: e.to_string(),
    })?;
    let cpus = u32::try_from(cpus).unwrap_or(u32::MAX);
    let on = 1u32;
    // Woken at a quarter full; the reader also drains every few milliseconds.
    let wakeup_bytes = capture.ring_bytes / 4;
    let stats_entries =
        u32::try_from(interfaces.max(1) * maps::CaptureStat::ALL.len()).unwrap_or(u32::MAX);
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
        .override_global("filter_len", &filter_len, true)
        .override_global("filter_rules", &rules, true)
        .map_max_entries("samples", capture.ring_bytes)
        .map_max_entries("capture_scratch", cpus)
        .map_max_entries("capture_stats", stats_entries)
        .map_max_entries("capture_flows", flow_entries)
        .load(object())
        .map_err(|e| ObserveError::Load(e.to_string()))
}

/// Seeds every (interface, counter) of `capture_stats` with zeros, so the
/// programs only ever increment, then turns sampling on.
fn start_capture(ebpf: &mut Ebpf, interfaces: &[Interface]) -> Result<(), ObserveError> {
    let kernel = |what: &str| {
        let what = what.to_string();
        move |e: aya::maps::MapError| ObserveError::Kernel {
            what: what.clone(),
            cause: e.to_string(),
        }
    };
    let cpus = aya::util::nr_cpus().map_err(|(what, e)| ObserveError::Kernel {
        what: what.to_string(),
        cause: e.to_string(),
    })?;
    let mut stats: PerCpuHashMap<_, CaptureKey, u64> = PerCpuHashMap::try_from(
        ebpf.map_mut("capture_stats")
            .ok_or(ObserveError::MissingMap("capture_stats"))?,
    )
    .map_err(kernel("map capture_stats"))?;
    for iface in interfaces {
        for stat in CaptureStat::ALL {
            let zeros =
                PerCpuValues::try_from(vec![0u64; cpus]).map_err(|e| ObserveError::Kernel {
                    what: "per-CPU zeros".into(),
                    cause: e.to_string(),
                })?;
            let key = CaptureKey {
                ifindex: iface.index,
                stat: stat.raw(),
            };
            stats
                .insert(key, zeros, 0)
                .map_err(kernel("seeding capture_stats"))?;
        }
    }
    set_capture_ctl(ebpf, 1)
}

fn set_capture_ctl(ebpf: &mut Ebpf, on: u32) -> Result<(), ObserveError> {
    let mut ctl: Array<_, u32> = Array::try_from(
        ebpf.map_mut("capture_ctl")
            .ok_or(ObserveError::MissingMap("capture_ctl"))?,
    )
    .map_err(|e| ObserveError::Kernel {
        what: "map capture_ctl".into(),
        cause: e.to_string(),
    })?;
    ctl.set(0, on, 0).map_err(|e| ObserveError::Kernel {
        what: "writing capture_ctl".into(),
        cause: e.to_string(),
    })
}
