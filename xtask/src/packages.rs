//! The Debian packages the tests and benches need, and installing the
//! missing ones. `REQUIRED` is the one list: add new peers here.
//!
//! A package counts as present when dpkg says it is installed, or when
//! the program it is needed for is on PATH (so a host with, say,
//! nginx-full is not asked to install the conflicting nginx-light).

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::cmd;

/// A Debian package and the program the tests use from it.
pub struct Package {
    pub name: &'static str,
    pub program: &'static str,
}

/// Everything `cargo xtask test` and `cargo xtask bench` run as real peers.
pub const REQUIRED: &[Package] = &[
    Package {
        name: "socat",
        program: "socat",
    },
    // UDP routes (issue 14): DNS through relay, a real server and client.
    Package {
        name: "dnsmasq",
        program: "dnsmasq",
    },
    Package {
        name: "bind9-dnsutils",
        program: "dig",
    },
    Package {
        name: "iperf3",
        program: "iperf3",
    },
    Package {
        name: "wrk",
        program: "wrk",
    },
    Package {
        name: "prometheus",
        program: "promtool",
    },
    Package {
        name: "nginx-light",
        program: "nginx",
    },
    // The bench's peers (issue 18): HAProxy, nginx's stream module (a
    // dynamic module in Debian, checked by its file), stunnel for the TLS
    // rows; docker-proxy comes with docker.io below.
    Package {
        name: "haproxy",
        program: "haproxy",
    },
    Package {
        name: "libnginx-mod-stream",
        program: "/usr/lib/nginx/modules/ngx_stream_module.so",
    },
    Package {
        name: "stunnel4",
        program: "stunnel4",
    },
    // Proxy servers for the SOCKS4 / SOCKS5-CONNECT (Dante) and PROXY
    // (Tinyproxy, HTTP CONNECT) connect addresses.
    Package {
        name: "dante-server",
        program: "/usr/sbin/danted",
    },
    Package {
        name: "tinyproxy",
        program: "tinyproxy",
    },
    Package {
        name: "iproute2",
        program: "ip",
    },
    Package {
        name: "procps",
        program: "pkill",
    },
    Package {
        name: "util-linux",
        program: "nsenter",
    },
    // TLS peers: a mutual-TLS redis target, s_server / s_client, and
    // tshark to decrypt a capture with relay's key log. tshark's debconf
    // question (may non-root users capture?) is answered with its default,
    // "no", because the install runs with DEBIAN_FRONTEND=noninteractive.
    Package {
        name: "redis-server",
        program: "redis-server",
    },
    Package {
        name: "redis-tools",
        program: "redis-cli",
    },
    Package {
        name: "openssl",
        program: "openssl",
    },
    Package {
        name: "tshark",
        program: "tshark",
    },
    // eBPF: clang and libbpf's headers rebuild relay-ebpf/obj for the
    // stale-object check; bpftool inspects what is attached in the tests.
    Package {
        name: "clang",
        program: "clang",
    },
    Package {
        name: "libbpf-dev",
        program: "/usr/include/bpf/bpf_helpers.h",
    },
    // libFuzzer (C++) for `cargo xtask fuzz`, built by libfuzzer-sys.
    Package {
        name: "g++",
        program: "g++",
    },
    Package {
        name: "bpftool",
        program: "bpftool",
    },
    // Container targets: a Docker engine and busybox for FROM-scratch images;
    // the bench runs docker-proxy from the same package.
    Package {
        name: "docker.io",
        program: "dockerd",
    },
    Package {
        name: "busybox-static",
        program: "busybox",
    },
    // containerd driven directly with ctr, as on a Kubernetes node
    // (tests/tests/containerd.rs); docker.io depends on both, named here
    // because the tests run them themselves.
    Package {
        name: "containerd",
        program: "containerd",
    },
    Package {
        name: "runc",
        program: "runc",
    },
    // The capture bench compares relay observe --pcap with tcpdump -w;
    // tests/tests/pcap_filter.rs reads captures with tcpdump -r '<expr>'.
    Package {
        name: "tcpdump",
        program: "tcpdump",
    },
    // The capture filter: relay links libpcap (the pcap crate), and
    // `cargo xtask dist` links it statically, with libdbus-1.a.
    Package {
        name: "libpcap-dev",
        program: "/usr/include/pcap/pcap.h",
    },
    Package {
        name: "libdbus-1-dev",
        program: "/usr/include/dbus-1.0/dbus/dbus.h",
    },
    // Deployment checks: `systemd-analyze verify` on deploy/systemd/, and
    // tests/tests/systemd.rs (systemd-socket-activate, from the same package).
    Package {
        name: "systemd",
        program: "systemd-analyze",
    },
];

/// Checkers from PyPI (not packaged by Debian): (pip package, program).
/// kubernetes-validate checks deploy/kubernetes/daemonset.yaml against the
/// API schema it ships; the test skips, saying so, when it is missing.
pub const PYTHON: &[(&str, &str)] = &[("kubernetes-validate", "kubernetes-validate")];

/// `pip install` whatever in `PYTHON` is missing; a machine without pip (or
/// one that refuses) only loses those checks, so this warns instead of failing.
pub fn ensure_python() {
    for (package, program) in PYTHON {
        if find_program(program).is_some() {
            continue;
        }
        let Some(pip) = ["pip3", "pip"].into_iter().find_map(find_program) else {
            println!("xtask: warning: no pip to install {package}; its checks will be skipped");
            continue;
        };
        if let Err(err) =
            cmd::run_streaming(Command::new(pip).args(["install", "--quiet", package]))
        {
            println!(
                "xtask: warning: cannot install {package} ({err:#}); its checks will be skipped"
            );
        }
    }
}

/// Install whatever in `REQUIRED` is missing, or explain how to.
pub fn ensure() -> Result<()> {
    let missing: Vec<&Package> = REQUIRED.iter().filter(|p| !is_present(p)).collect();
    if missing.is_empty() {
        println!(
            "xtask: all {} required Debian packages present",
            REQUIRED.len()
        );
        return Ok(());
    }
    let names: Vec<&str> = missing.iter().map(|p| p.name).collect();
    println!("xtask: missing Debian packages: {}", names.join(" "));

    let debian = Path::new("/etc/debian_version").exists();
    let root = nix::unistd::geteuid().is_root();
    if !(debian && root) {
        let command = format!(
            "sudo apt-get update && sudo DEBIAN_FRONTEND=noninteractive \
             apt-get install -y --no-install-recommends {}",
            names.join(" ")
        );
        if debian {
            bail!("cannot install them without root; run:\n  {command}");
        }
        let programs: Vec<&str> = missing.iter().map(|p| p.program).collect();
        bail!(
            "not a Debian system, so not installing anything; install the packages \
             that provide {} (on Debian: `{command}`)",
            programs.join(", ")
        );
    }

    // Another apt may hold the lock (e.g. provisioning); wait for it
    // rather than fail.
    let lock_wait = ["-o", "DPkg::Lock::Timeout=600"];
    cmd::run_streaming(
        Command::new("apt-get")
            .args(lock_wait)
            .args(["-q", "update"]),
    )
    .context("apt-get update failed")?;
    cmd::run_streaming(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(lock_wait)
            .args(["-q", "install", "-y", "--no-install-recommends"])
            .args(&names),
    )
    .context("apt-get install failed")?;

    let still: Vec<&str> = REQUIRED
        .iter()
        .filter(|p| !is_present(p))
        .map(|p| p.name)
        .collect();
    if !still.is_empty() {
        bail!(
            "apt-get install succeeded but these are still missing: {}",
            still.join(" ")
        );
    }
    Ok(())
}

fn is_present(pkg: &Package) -> bool {
    dpkg_installed(pkg.name) || find_program(pkg.program).is_some()
}

/// `dpkg-query -W -f='${Status}' NAME` says "install ok installed".
fn dpkg_installed(name: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", name])
        .stderr(std::process::Stdio::null())
        .output()
        .map(|out| {
            out.status.success()
                && String::from_utf8_lossy(&out.stdout).trim() == "install ok installed"
        })
        .unwrap_or(false)
}

/// Like `which`, also looking in the sbin directories (nginx lives there)
/// that a non-root PATH often lacks.
pub fn find_program(program: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(Into::into))
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}
