//! Discovery: which containers run on this host, as they come and go.
//!
//! A source (today [`docker`]: the Docker Engine API's listing and events
//! stream) sends [`Update`]s down a channel: a full [`Update::Listed`] when
//! it (re)connects, then one update per change, and [`Update::Down`] /
//! [`Update::Up`] as the daemon goes and comes back. It never decides what
//! is observed: selection, the cap and attaching are the fleet's
//! (`observe::fleet`), which keeps sources interchangeable (containerd and
//! `/proc` discovery are planned beside Docker's).

pub mod docker;
pub mod select;

use std::collections::BTreeMap;
use std::time::SystemTime;

pub use select::{Glob, Rule, Selection};

/// A running container, as far as observing it goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Container {
    /// The full id.
    pub id: String,
    /// The name without Docker's leading `/`; changes on rename.
    pub name: String,
    /// The image as the container was created from it (`Config.Image`).
    pub image: String,
    pub labels: BTreeMap<String, String>,
    /// Its init process on the host (the namespace is `/proc/PID/ns/net`).
    pub pid: u32,
    pub network: Network,
}

impl Container {
    pub fn label(&self, key: &str) -> &str {
        self.labels.get(key).map_or("", String::as_str)
    }
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
