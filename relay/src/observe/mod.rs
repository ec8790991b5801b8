//! observe: eBPF programs attached inside a network namespace that count
//! what crosses its interfaces.
//!
//! - [`attach`]: which interfaces, and attaching at TC ingress/egress;
//! - [`maps`]: the structs shared with the C program, and reading its maps;
//! - [`export`]: turning snapshots into Prometheus series.
//!
//! The programs live in relay-ebpf/src/observe.bpf.c; the compiled object is
//! committed and embedded here, so building relay needs no clang.

pub mod attach;
pub mod export;
pub mod maps;
pub mod session;
pub mod watch;

use std::os::fd::OwnedFd;
use std::sync::Mutex;
use std::time::Duration;

use aya::maps::PerCpuHashMap;
use aya::{Ebpf, EbpfLoader};
use thiserror::Error;

pub use attach::Interface;
use maps::{Counter, FlagKey, FlowKey, TrafficKey};

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
}

impl ObserveError {
    /// A mistake in what the user asked for (exit 2), rather than a failure
    /// of the kernel or the daemon (exit 1).
    pub fn is_bad_input(&self) -> bool {
        match self {
            ObserveError::NoSuchInterface { .. } | ObserveError::NothingToObserve => true,
            ObserveError::Netns(err) => err.is_bad_input(),
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
}

impl Default for ObserveOptions {
    fn default() -> Self {
        ObserveOptions {
            interfaces: Vec::new(),
            loopback: false,
            top_flows: 10,
            bpf_stats: false,
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
}

/// Programs loaded and attached in one namespace; dropping it detaches them.
pub struct Observer {
    target: String,
    interfaces: Vec<Interface>,
    ebpf: Mutex<Ebpf>,
    /// Keeps the kernel's BPF run-time accounting on while held.
    _stats: Option<OwnedFd>,
}

impl Observer {
    /// Loads the programs and attaches them inside `netns`, on a thread
    /// that has entered it (never on an async worker).
    pub fn attach(netns: &Netns, options: &ObserveOptions) -> Result<Self, ObserveError> {
        let (only, loopback) = (options.interfaces.clone(), options.loopback);
        let (ebpf, interfaces) =
            netns.run(move || -> Result<(Ebpf, Vec<Interface>), ObserveError> {
                let interfaces = attach::interfaces(&only, loopback)?;
                if interfaces.is_empty() {
                    return Err(ObserveError::NothingToObserve);
                }
                let mut ebpf = EbpfLoader::new()
                    .load(object())
                    .map_err(|e| ObserveError::Load(e.to_string()))?;
                attach::attach_all(&mut ebpf, &interfaces)?;
                Ok((ebpf, interfaces))
            })??;
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
            tracing::info!(target = %target, iface = %iface.name, "observing (ingress and egress)");
        }
        Ok(Observer {
            target,
            interfaces,
            ebpf: Mutex::new(ebpf),
            _stats: stats,
        })
    }

    pub fn target(&self) -> &str {
        &self.target
    }

    pub fn interfaces(&self) -> &[Interface] {
        &self.interfaces
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
        Ok(Snapshot {
            traffic: maps::read_traffic(&traffic),
            flags: maps::read_flags(&flags),
            flows,
            programs,
        })
    }
}
