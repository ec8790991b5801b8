//! The spec: everything one relay process runs (routes, observers, the
//! metrics endpoint), with every default written once. Every way of
//! starting relay builds a [`Spec`]: the command line (`forward`, the socat
//! form, `publish`, `observe`) in `main.rs`, a TOML file through
//! [`file`]. The supervisor (`run`) only ever sees a `Spec`.
//!
//! Not here: serving. A spec is plain data, already validated: addresses
//! parsed, filters compiled, durations in range. What needs the running
//! system (binding, loading programs) is the supervisor's.

pub mod file;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::addr::{ListenAddr, TargetAddr};
use crate::forward::dump::Dump;
use crate::forward::{DataPath, Flow};
use crate::netns::Target;
use crate::observe::capture::CaptureOptions;
pub use crate::observe::fleet::{ContainersSpec, DEFAULT_MAX_CONTAINERS};
use crate::observe::session::SessionOptions;
use crate::tls::settings::Flags as TlsFlags;

/// Give up connecting to a route's target after this long.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// After SIGTERM/SIGINT, how long open connections may take to finish.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Give up a TLS handshake after this long.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Open connections per route at most (lowered to what the open-file
/// limit holds, see `limits`).
pub const DEFAULT_MAX_CONNECTIONS: u32 = 10_000;
/// Flows exported by name per observer.
pub const DEFAULT_TOP_FLOWS: usize = 10;
/// Idle connections are closed after this long by default. socat has no
/// idle timeout, and HAProxy's sample configurations close idle clients
/// after 50 s (`timeout client`); relay carries long-lived TCP sessions
/// (database pools, shells, Docker API streams) where a minute would
/// surprise, yet without any timeout idle or vanished clients can hold
/// every `--max-connections` slot for ever. Ten minutes gives the slots
/// back while leaving quiet sessions alone; `--idle-timeout none` turns
/// it off.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(600);

/// UDP sessions (client addresses) per route at most: a new client beyond
/// it has its datagram dropped and counted (`limited`). Each session holds
/// one socket, so this also bounds the descriptors a UDP route takes.
pub const DEFAULT_MAX_SESSIONS: u32 = 1024;

/// What one relay process runs.
#[derive(Debug, Clone, Default)]
pub struct Spec {
    pub routes: Vec<RouteSpec>,
    pub observers: Vec<ObserverSpec>,
    /// Where `/metrics` and `/healthz` are served, if anywhere.
    pub metrics: Option<SocketAddr>,
    /// The unix socket a new relay takes this one's listening sockets
    /// from (`relay run --upgrade-from`); `None`: upgrades are off.
    pub upgrade_socket: Option<PathBuf>,
}

/// One route: a listener, its target, and how connections between them live.
#[derive(Debug, Clone)]
pub struct RouteSpec {
    /// The `route` label in metrics and logs.
    pub name: String,
    /// What the route serves (scheme, TLS) and where. With `socket` it is
    /// checked against the passed socket's address instead of bound.
    pub listen: ListenAddr,
    /// Take the listening socket systemd passed under this name
    /// (`FileDescriptorName=` of a `.socket` unit) instead of binding.
    pub socket: Option<String>,
    pub target: TargetAddr,
    pub connect_timeout: Duration,
    /// `None`: connections may stay idle for ever.
    pub idle_timeout: Option<Duration>,
    /// `None`: [`DEFAULT_MAX_CONNECTIONS`], or what the open-file limit holds.
    pub max_connections: Option<u32>,
    /// A UDP route's sessions at most (its idle timeout is `idle_timeout`).
    pub max_sessions: u32,
    pub drain_timeout: Duration,
    pub data_path: DataPath,
    /// Allows `data_path = sockmap` (known defects; see `forward::data_path`).
    pub experimental_sockmap: bool,
    /// Both directions, or one (socat's `-u` / `-U`).
    pub flow: Flow,
    /// socat's `-v`/`-x`: every block relayed, also on stderr.
    pub dump: Option<Dump>,
    /// socat's `-t`: once one side has closed, how long the other
    /// direction may go on; `None`: until it ends.
    pub half_close_timeout: Option<Duration>,
    /// socat's `-b`: the copy path's buffer at most this many bytes.
    pub block_size: Option<usize>,
    pub tls: TlsFlags,
    pub handshake_timeout: Duration,
    /// Observe this target beside the route (`forward --observe`).
    pub observe: Option<Target>,
    /// With `observe`: sampled packets to pcapng.
    pub capture: Option<CaptureOptions>,
}

impl RouteSpec {
    /// A route with the documented defaults, named after its listen address.
    pub fn new(listen: ListenAddr, target: TargetAddr) -> Self {
        // socat's `max-children=` is the route's limit.
        let max_connections = listen.max_children;
        RouteSpec {
            name: listen.text.clone(),
            listen,
            socket: None,
            target,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            idle_timeout: Some(DEFAULT_IDLE_TIMEOUT),
            max_connections,
            max_sessions: DEFAULT_MAX_SESSIONS,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            data_path: DataPath::Auto,
            experimental_sockmap: false,
            flow: Flow::Both,
            dump: None,
            half_close_timeout: None,
            block_size: None,
            tls: TlsFlags::default(),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            observe: None,
            capture: None,
        }
    }
}

/// One observer entry and how it observes.
#[derive(Debug, Clone)]
pub struct ObserverSpec {
    pub observed: Observed,
    pub session: SessionOptions,
}

/// What an observer entry observes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    /// One namespace (`container:web`, `pid:N`, `netns:x`, `host`).
    Target(Target),
    /// Every selected running container, each in its own namespace,
    /// discovered and followed at run time (`containers`).
    Containers(ContainersSpec),
}

/// The spec `relay run` uses when no file is given: observe this host's
/// interfaces, with `/metrics` on 127.0.0.1:9100. It makes sense on any
/// host and binds nothing beyond loopback.
pub const EMBEDDED_DEFAULT: &str = include_str!("default.toml");
