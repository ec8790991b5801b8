//! Attaching the observe programs to the interfaces of a namespace, at TC
//! ingress and egress. On kernels with TCX (6.6+) aya makes TCX links,
//! which the kernel removes when their fd closes, so even a killed relay
//! leaves nothing attached. Older kernels get a clsact qdisc (only if the
//! interface had none: one that was there stays) and cls_bpf filters,
//! which `Drop` of the loaded object removes.
//!
//! Must run on a thread inside the target namespace: interface names and
//! indexes, and the links themselves, resolve in the caller's namespace.

use aya::Ebpf;
use aya::maps::HashMap as BpfHashMap;
use aya::programs::{SchedClassifier, TcAttachType};

use super::{ObserveError, map_error};

/// An interface in the target namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub index: u32,
    pub name: String,
    /// Bytes before the IP header at TC: 14 (Ethernet, veth, loopback) or
    /// 0 (no link-layer header: tun, WireGuard), read in the namespace.
    pub l2_len: u32,
}

/// Interfaces of the calling thread's namespace: the ones named, or all
/// (loopback only with `loopback`).
pub fn interfaces(only: &[String], loopback: bool) -> Result<Vec<Interface>, ObserveError> {
    let all: Vec<Interface> = nix::net::if_::if_nameindex()
        .map_err(ObserveError::Interfaces)?
        .iter()
        .map(|i| {
            let name = i.name().to_string_lossy().into_owned();
            Interface {
                index: i.index(),
                l2_len: l2_len_of(&name),
                name,
            }
        })
        .collect();
    if only.is_empty() {
        return Ok(all
            .into_iter()
            .filter(|i| loopback || i.name != "lo")
            .collect());
    }
    only.iter()
        .map(|name| {
            all.iter()
                .find(|i| &i.name == name)
                .cloned()
                .ok_or_else(|| ObserveError::NoSuchInterface {
                    name: name.clone(),
                    present: all.iter().map(|i| i.name.clone()).collect(),
                })
        })
        .collect()
}

/// Bytes before the IP header at TC for the interface `name` of the
/// calling thread's namespace: 0 when the device has no link-layer header
/// (ARPHRD_NONE: tun, WireGuard), else 14. The type is asked of the
/// namespace itself (SIOCGIFHWADDR on a socket made here): sysfs shows the
/// devices of the namespace it was mounted in, not this thread's. A device
/// that cannot be asked reads as Ethernet, the common case.
fn l2_len_of(name: &str) -> u32 {
    const ARPHRD_NONE: u16 = 0xfffe;
    if name.len() >= nix::libc::IFNAMSIZ {
        return 14;
    }
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
    let Ok(socket) = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    ) else {
        return 14;
    };
    // SAFETY: an all-zero ifreq is valid (name empty, union zeroed).
    let mut req: nix::libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as nix::libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR reads the NUL-terminated name (shorter than
    // IFNAMSIZ, checked above) and writes ifr_hwaddr inside `req`.
    let rc = unsafe {
        nix::libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            nix::libc::SIOCGIFHWADDR,
            &mut req,
        )
    };
    // SAFETY: the kernel filled the ifr_hwaddr member of the union.
    let family = unsafe { req.ifr_ifru.ifru_hwaddr.sa_family };
    if rc == 0 && family == ARPHRD_NONE {
        0
    } else {
        14
    }
}

/// TCX arrived in 6.6; aya picks it by the same test.
fn has_tcx() -> bool {
    aya::util::KernelVersion::current().is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0))
}

/// Attaches both programs to every interface given.
pub fn attach_all(ebpf: &mut Ebpf, interfaces: &[Interface]) -> Result<(), ObserveError> {
    {
        let mut l2: BpfHashMap<_, u32, u32> = BpfHashMap::try_from(
            ebpf.map_mut("l2_len")
                .ok_or(ObserveError::MissingMap("l2_len"))?,
        )
        .map_err(map_error("l2_len", "open"))?;
        for iface in interfaces {
            l2.insert(iface.index, iface.l2_len, 0)
                .map_err(|source| ObserveError::MapEntry {
                    map: "l2_len",
                    action: "write",
                    iface: iface.name.clone(),
                    source: Box::new(source),
                })?;
        }
    }
    for (program, attach_type) in [
        ("observe_ingress", TcAttachType::Ingress),
        ("observe_egress", TcAttachType::Egress),
    ] {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(program)
            .ok_or(ObserveError::MissingProgram(program))?
            .try_into()
            .map_err(|source| ObserveError::ProgramType {
                program,
                source: Box::new(source),
            })?;
        prog.load().map_err(|source| ObserveError::LoadProgram {
            program,
            source: Box::new(source),
        })?;
        for iface in interfaces {
            if !has_tcx() {
                // Pre-TCX kernels: cls_bpf needs a clsact qdisc; one that
                // exists already is used as is.
                let _ = aya::programs::tc::qdisc_add_clsact(&iface.name);
            }
            prog.attach(&iface.name, attach_type)
                .map_err(|source| ObserveError::Attach {
                    program,
                    iface: iface.name.clone(),
                    direction: if attach_type == TcAttachType::Ingress {
                        "ingress"
                    } else {
                        "egress"
                    },
                    source: Box::new(source),
                })?;
        }
    }
    Ok(())
}
