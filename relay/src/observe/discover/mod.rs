//! Discovery: which containers run on this host, as they come and go.
//!
//! A source ([`docker`]: the Docker Engine API's listing and events stream;
//! [`containerd`]: containerd's gRPC API, as on Kubernetes nodes;
//! [`netns`]: the network namespaces the kernel shows under
//! `/var/run/netns` and `/proc/*/ns/net`, for hosts where no daemon
//! answers) sends [`Update`]s down a channel, tagged with itself: a full
//! [`Update::Listed`] when it (re)connects, then one update per change, and
//! [`Update::Down`] / [`Update::Up`] as the daemon goes and comes back. It
//! never decides what is observed: selection, the cap, one attachment per
//! namespace and attaching are the fleet's (`observe::fleet`), which keeps
//! sources interchangeable.

pub mod containerd;
pub mod docker;
pub mod netns;
pub mod select;

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};

pub use select::{Glob, Rule, Selection};

/// Which source said a container runs. The order is the preference when
/// two describe the same namespace (a daemon's names and labels over the
/// kernel's inode).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    Docker,
    Containerd,
    Netns,
}

impl Source {
    /// The `source` label of `relay_observe_discovery_up` and the info series.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Docker => "docker",
            Source::Containerd => "containerd",
            Source::Netns => "netns",
        }
    }

    /// A container daemon (not the kernel's namespaces).
    pub fn is_daemon(self) -> bool {
        self != Source::Netns
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which sources a `containers` observer follows (`--source`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Sources {
    Docker,
    Containerd,
    Netns,
    /// Docker and containerd, whichever answer; the kernel's namespaces
    /// while neither does.
    #[default]
    Auto,
}

impl Sources {
    pub const NAMES: &str = "docker, containerd, netns or auto";

    pub fn sources(self) -> &'static [Source] {
        match self {
            Sources::Docker => &[Source::Docker],
            Sources::Containerd => &[Source::Containerd],
            Sources::Netns => &[Source::Netns],
            Sources::Auto => &[Source::Docker, Source::Containerd, Source::Netns],
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Sources::Docker => "docker",
            Sources::Containerd => "containerd",
            Sources::Netns => "netns",
            Sources::Auto => "auto",
        }
    }
}

impl fmt::Display for Sources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Sources {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "docker" => Ok(Sources::Docker),
            "containerd" => Ok(Sources::Containerd),
            "netns" => Ok(Sources::Netns),
            "auto" => Ok(Sources::Auto),
            other => Err(format!(
                "unknown discovery source {other:?}: expected {}",
                Sources::NAMES
            )),
        }
    }
}

/// A running container, as far as observing it goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Container {
    /// Unique among every source's containers: Docker's id,
    /// `containerd:<namespace>/<id>`, `netns:<inode>`.
    pub key: String,
    pub source: Source,
    /// The full id (the `id` label): Docker's or containerd's, or
    /// `net:[<inode>]` for a namespace found by itself.
    pub id: String,
    /// The name without Docker's leading `/`; changes on rename. For a
    /// Kubernetes pod `<namespace>/<pod>` (its other containers
    /// `<namespace>/<pod>/<container>`).
    pub name: String,
    /// The image as the container was created from it (`Config.Image`).
    pub image: String,
    pub labels: BTreeMap<String, String>,
    /// Its init process on the host (the namespace is `/proc/PID/ns/net`);
    /// 0 for a namespace known only by its file.
    pub pid: u32,
    /// The network namespace's inode, 0 when unknown: containers with the
    /// same one share a namespace and are observed once.
    pub netns: u64,
    /// The namespace file when it is not `/proc/<pid>/ns/net` (an
    /// `ip netns` name).
    pub ns_path: Option<PathBuf>,
    pub network: Network,
}

impl Container {
    pub fn label(&self, key: &str) -> &str {
        self.labels.get(key).map_or("", String::as_str)
    }

    /// What a restart changes: the process and its namespace. A namespace
    /// found by itself is its inode alone (which process in it is the
    /// lowest may change).
    pub fn instance(&self) -> (u32, u64) {
        match self.source {
            Source::Netns => (0, self.netns),
            _ => (self.pid, self.netns),
        }
    }
}

/// The inode of `/proc/<pid>/ns/net`, 0 when it cannot be read.
pub fn netns_inode(pid: u32) -> u64 {
    std::fs::metadata(format!("/proc/{pid}/ns/net")).map_or(0, |m| m.ino())
}

/// Whose network namespace a container uses (`HostConfig.NetworkMode`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Network {
    /// Its own (bridge, a user network, macvlan, ...): attached separately.
    Own,
    /// The host's: its traffic is the host's, counted once as the host.
    Host,
    /// `none`: loopback only, nothing to attach to.
    None,
    /// Another container's (`container:<id>`): counted with that one.
    Shared,
}

impl Network {
    /// From Docker's `NetworkMode`.
    pub fn from_mode(mode: &str) -> Self {
        match mode {
            "host" => Network::Host,
            "none" => Network::None,
            m if m.starts_with("container:") => Network::Shared,
            _ => Network::Own,
        }
    }

    /// The `network` label of `relay_observe_container_info`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Network::Own => "own",
            Network::Host => "host",
            Network::None => "none",
            Network::Shared => "container",
        }
    }
}

/// What a discovery source tells the fleet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Update {
    /// Every running container, after a (re)connect: whatever is not in
    /// the list is gone.
    Listed(Vec<Container>),
    /// A container started or was renamed; `since` is when the daemon
    /// says it happened.
    Running {
        container: Container,
        since: Option<SystemTime>,
    },
    /// A network was connected to or disconnected from a running
    /// container: its interfaces changed.
    Rewired(Container),
    /// A container stopped or was removed, by id.
    Stopped(String),
    /// The daemon answers again (a listing follows).
    Up,
    /// The daemon cannot be reached or its event stream broke; the source
    /// retries with back-off.
    Down(String),
}

/// The sending half a source is given: its updates, tagged with it.
#[derive(Clone)]
pub struct Updates {
    source: Source,
    tx: mpsc::Sender<(Source, Update)>,
}

/// The fleet is gone: the source stops.
#[derive(Debug)]
pub struct Closed;

impl Updates {
    pub fn new(source: Source, tx: mpsc::Sender<(Source, Update)>) -> Self {
        Updates { source, tx }
    }

    pub async fn send(&self, update: Update) -> Result<(), Closed> {
        self.tx
            .send((self.source, update))
            .await
            .map_err(|_| Closed)
    }

    /// [`Update::Up`], then the full listing.
    pub async fn listed(&self, containers: Vec<Container>) -> Result<(), Closed> {
        self.send(Update::Up).await?;
        self.send(Update::Listed(containers)).await
    }
}

/// How one connection to a daemon ended.
#[derive(Debug)]
pub struct Failure {
    pub reason: String,
    /// It had listed (so the next failure starts the back-off afresh).
    pub listed: bool,
}

impl Failure {
    /// Failed before the listing was sent.
    pub fn before(reason: String) -> Self {
        Failure {
            reason,
            listed: false,
        }
    }

    /// Failed while following, after a listing.
    pub fn after(reason: String) -> Self {
        Failure {
            reason,
            listed: true,
        }
    }
}

/// The first retry after a failure; doubled up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(250);
/// A daemon that stays away is asked again this often.
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// A daemon source's life: `session` connects, lists (through
/// [`Updates::listed`]) and follows until it fails; then [`Update::Down`]
/// is sent once (and logged) and `session` is tried again with back-off,
/// until `stop` turns true or the fleet is gone (`session` returns
/// `Ok`). Nothing here is fatal.
pub async fn keep_following<F, Fut>(
    daemon: &str,
    socket: &Path,
    updates: &Updates,
    mut stop: watch::Receiver<bool>,
    mut session: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), Failure>>,
{
    let mut backoff = BACKOFF_MIN;
    // None until the first attempt: the first failure is reported too.
    let mut up: Option<bool> = None;
    loop {
        let outcome = tokio::select! {
            outcome = session() => outcome,
            _ = stop.wait_for(|s| *s) => return,
        };
        let failure = match outcome {
            Ok(()) => return,
            Err(failure) => failure,
        };
        if failure.listed {
            up = Some(true);
            backoff = BACKOFF_MIN;
        }
        if up != Some(false) {
            tracing::warn!(socket = %socket.display(), reason = %failure.reason, "{daemon} discovery down: retrying with back-off; observed containers stay attached meanwhile");
            if updates.send(Update::Down(failure.reason)).await.is_err() {
                return;
            }
            up = Some(false);
        } else {
            tracing::debug!(reason = %failure.reason, "{daemon} still unreachable");
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}
