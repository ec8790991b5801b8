//! Namespace discovery, for hosts where no container daemon answers: the
//! network namespaces the kernel shows, as containers.
//!
//! Two places hold them: the `ip netns` names (`/var/run/netns/<name>`,
//! where CNI plugins also put pods' namespaces) and every process's
//! `/proc/<pid>/ns/net`. Both are scanned every [`POLL`] (the kernel has
//! no event for a new namespace) and deduplicated by the namespace's
//! inode; the host's own namespace is left out (it is the `host` target's).
//! A namespace is named by what is known: its `ip netns` name, else the
//! command of its lowest process and the inode (`nginx-4026532871`); its
//! id is `net:[<inode>]`, as `/proc/<pid>/ns/net` reads. A listing is sent
//! whenever the set changes, so the fleet attaches a new namespace within
//! a poll and an attach.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::watch;

use super::{Container, Network, Source, Update, Updates};
use crate::netns::IP_NETNS_DIR;

/// How often the namespaces are looked for.
pub const POLL: Duration = Duration::from_millis(250);

/// The host's namespace (left out) and nsfs's device (a file under
/// `/var/run/netns` on another device is not a mounted namespace).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Host {
    pub dev: u64,
    pub ino: u64,
}

impl Host {
    /// This process's namespace.
    pub fn own() -> std::io::Result<Self> {
        let m = std::fs::metadata("/proc/self/ns/net")?;
        Ok(Host {
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}

/// Scans until `stop` turns true or the fleet is gone.
pub async fn watch(updates: Updates, mut stop: watch::Receiver<bool>) {
    let host = match Host::own() {
        Ok(host) => host,
        Err(err) => {
            let reason = format!("cannot read /proc/self/ns/net: {err}");
            tracing::error!(%reason, "namespace discovery cannot run");
            let _ = updates.send(Update::Down(reason)).await;
            return;
        }
    };
    let mut last: Option<Vec<Container>> = None;
    loop {
        let found = tokio::task::spawn_blocking(move || {
            scan(host, Path::new(IP_NETNS_DIR), Path::new("/proc"))
        })
        .await
        .unwrap_or_default();
        if last.as_ref() != Some(&found) {
            if last.is_none() {
                tracing::info!(
                    namespaces = found.len(),
                    "namespace discovery up: listed the network namespaces under /var/run/netns and /proc"
                );
            }
            if updates.listed(found.clone()).await.is_err() {
                return;
            }
            last = Some(found);
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Every namespace but the host's under `netns_dir` and `proc`, by inode.
pub fn scan(host: Host, netns_dir: &Path, proc: &Path) -> Vec<Container> {
    // inode -> ip netns name (the first in name order).
    let mut named: BTreeMap<u64, String> = BTreeMap::new();
    if let Ok(entries) = std::fs::read_dir(netns_dir) {
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        names.sort();
        for name in names {
            if let Some(ino) = inode(host, &netns_dir.join(&name)) {
                named.entry(ino).or_insert(name);
            }
        }
    }
    // inode -> the lowest pid in it.
    let mut processes: BTreeMap<u64, u32> = BTreeMap::new();
    if let Ok(entries) = std::fs::read_dir(proc) {
        for entry in entries.filter_map(Result::ok) {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(ino) = inode(host, &proc.join(pid.to_string()).join("ns/net")) {
                let lowest = processes.entry(ino).or_insert(pid);
                *lowest = (*lowest).min(pid);
            }
        }
    }
    let mut inodes: Vec<u64> = named.keys().chain(processes.keys()).copied().collect();
    inodes.sort_unstable();
    inodes.dedup();
    inodes
        .into_iter()
        .map(|ino| {
            let pid = processes.get(&ino).copied();
            let (name, ns_path) = match named.get(&ino) {
                Some(name) => (name.clone(), Some(netns_dir.join(name))),
                None => {
                    let comm = pid.and_then(|p| command(proc, p)).unwrap_or_default();
                    (format!("{comm}-{ino}"), None)
                }
            };
            Container {
                key: format!("netns:{ino}"),
                source: Source::Netns,
                id: format!("net:[{ino}]"),
                name,
                image: String::new(),
                labels: BTreeMap::new(),
                // A named namespace is opened by its file; pid 0 keeps the
                // entry the same while its processes come and go.
                pid: if ns_path.is_some() {
                    0
                } else {
                    pid.unwrap_or(0)
                },
                netns: ino,
                ns_path,
                network: Network::Own,
            }
        })
        .collect()
}

/// The namespace inode behind `path`, unless it is the host's or not a namespace.
fn inode(host: Host, path: &PathBuf) -> Option<u64> {
    let m = std::fs::metadata(path).ok()?;
    (m.dev() == host.dev && m.ino() != host.ino).then_some(m.ino())
}

/// `/proc/<pid>/comm`, without its newline.
fn command(proc: &Path, pid: u32) -> Option<String> {
    let comm = std::fs::read_to_string(proc.join(pid.to_string()).join("comm")).ok()?;
    Some(comm.trim_end().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_namespace_is_left_out_and_this_process_is_in_it() {
        let host = Host::own().expect("/proc/self/ns/net");
        let found = scan(host, Path::new("/nonexistent/netns"), Path::new("/proc"));
        let me = std::process::id();
        assert!(
            found.iter().all(|c| c.pid != me && c.netns != host.ino),
            "{found:?}"
        );
        // Every entry is keyed and named by its inode.
        for c in &found {
            assert_eq!(c.key, format!("netns:{}", c.netns));
            assert!(c.name.ends_with(&format!("-{}", c.netns)), "{c:?}");
        }
    }

    #[test]
    fn plain_files_are_not_namespaces() {
        let dir = std::env::temp_dir().join(format!("relay-netns-scan-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::write(dir.join("blue"), b"").expect("a plain file");
        let host = Host::own().expect("/proc/self/ns/net");
        let found = scan(host, &dir, Path::new("/nonexistent/proc"));
        std::fs::remove_dir_all(&dir).ok();
        assert_eq!(found, vec![]);
    }
}
