//! The forwarder: one listening socket (TCP, UNIX, or stdin/stdout), one
//! task per accepted client.
//!
//! This module owns the accept loop and the route's lifetime: the
//! connection limit, backing off when the process runs out of file
//! descriptors (never leaving the loop), and the drain after a shutdown
//! signal. What happens to a single connection lives in [`connection`];
//! how its bytes move is the route's [`Engine`], chosen once in
//! [`data_path`] and run by the sibling pumps `copy`, `splice` and
//! [`sockmap`] over the contract in `pump`.
//!
//! ```no_run
//! # async fn example() -> Result<(), relay::forward::ForwardError> {
//! use relay::{addr, forward::{Forwarder, RouteConfig, metrics::ForwardMetrics}, metrics::Metrics};
//! let config = RouteConfig::new(
//!     addr::parse_listen("127.0.0.1:8080").unwrap(),
//!     addr::parse_target("127.0.0.1:80").unwrap(),
//! );
//! let metrics = Metrics::new();
//! let forwarding = ForwardMetrics::register(metrics.registry());
//! let forwarder = Forwarder::bind(config, forwarding.route("web")).await?;
//! let (_drain, drain_rx) = tokio::sync::watch::channel(false);
//! forwarder.run(drain_rx).await;
//! # Ok(()) }
//! ```

pub mod connection;
mod copy;
pub mod data_path;
pub mod dump;
pub mod exec;
pub mod file;
pub mod listener;
pub mod metrics;
pub mod namespace;
mod pump;
pub mod sockmap;
mod splice;
pub mod stdio;
pub mod stream;
pub mod upstream;
pub mod via_proxy;

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::sync::{Semaphore, watch};

use crate::addr::{ListenAddr, ListenEndpoint, TargetAddr, TargetEndpoint};
use crate::forward::metrics::{Outcome, RouteMetrics, TlsRole};
use crate::tls::{self, TlsError};
use connection::Connection;
pub use data_path::{DataPath, Engine};

/// Which way a route's bytes go: both (the default), or one way only
/// (socat's `-u`, first address to second, and `-U`, second to first;
/// `relay forward --one-way`). One way, the source is only read and the
/// destination only written; what the destination sends back is read and
/// dropped, so its close is seen and relay's close never meets unread
/// bytes (which would turn the FIN into a reset and could cut the
/// transfer's tail).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Flow {
    #[default]
    Both,
    /// From the client to the target only.
    ToTarget,
    /// From the target to the client only.
    ToClient,
}

impl Flow {
    pub fn as_str(self) -> &'static str {
        match self {
            Flow::Both => "both",
            Flow::ToTarget => "to-target",
            Flow::ToClient => "to-client",
        }
    }

    /// Refuses one way on a route that cannot run it (a UDP route relays
    /// datagrams per client session, both ways), and a file written only
    /// (`CREATE:`) where it would be read.
    pub fn check(self, listen: &ListenAddr, target: &TargetAddr) -> Result<(), String> {
        if self != Flow::Both && listen.is_udp() {
            return Err(format!(
                "`{}`: one-way relaying (-u / -U, --one-way) applies to stream routes (TCP, UNIX, TLS, STDIO, EXEC); a UDP route relays both ways: drop it",
                listen.text
            ));
        }
        for (file, text, reads) in [
            (listen.file(), &listen.text, self != Flow::ToClient),
            (target.file(), &target.text, self != Flow::ToTarget),
        ] {
            if let Some(spec) = file
                && reads
                && spec.access_for(true, false) == crate::addr::Access::WriteOnly
            {
                return Err(format!(
                    "`{text}` is opened for writing only, and this route reads it: relay one way into it (-u with it second, -U with it first), or open it with OPEN:<path>,rdwr"
                ));
            }
        }
        Ok(())
    }

    /// Fixes how each file address of a route is opened: the way the route
    /// uses it (socat opens the first address of `-u` for reading only),
    /// unless an option of its own said.
    fn open_files(self, listen: &mut ListenAddr, target: &mut TargetAddr) {
        let (client_reads, target_reads) = match self {
            Flow::Both => (true, true),
            Flow::ToTarget => (true, false),
            Flow::ToClient => (false, true),
        };
        let fix = |spec: &mut crate::addr::FileSpec, reads: bool, writes: bool| {
            spec.access = Some(spec.access_for(reads, writes));
        };
        if let ListenEndpoint::File(spec) = &mut listen.endpoint {
            fix(spec, client_reads, self != Flow::ToTarget);
        }
        if let TargetEndpoint::File(spec) = &mut target.endpoint {
            fix(spec, target_reads, self != Flow::ToClient);
        }
    }
}

#[derive(Debug, Error)]
pub enum ForwardError {
    #[error("cannot listen on {addr} ({resolved}): {cause}{hint}", hint = bind_hint(cause))]
    Bind {
        addr: String,
        resolved: String,
        cause: io::Error,
    },
    #[error("cannot listen on {addr}: {}: {problem}", path.display())]
    SocketPath {
        addr: String,
        path: PathBuf,
        problem: String,
    },
    #[error("cannot reach the first address {addr}: {cause}")]
    First {
        addr: String,
        cause: Box<upstream::ConnectError>,
    },
    #[error("cannot open {} ({addr}): {cause}", path.display())]
    File {
        addr: String,
        path: PathBuf,
        cause: io::Error,
    },
    #[error(
        "cannot resolve listen address {addr}: {cause} (a listener binds an address of this host: give an IP address such as 127.0.0.1 or [::1])"
    )]
    ResolveListen { addr: String, cause: io::Error },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Netns(#[from] crate::netns::NetnsError),
    #[error(transparent)]
    Sockmap(#[from] sockmap::SockmapError),
}

impl ForwardError {
    /// Errors in what the user wrote (a TLS file, a listen name that is no
    /// address of this host, a namespace that does not exist), as opposed
    /// to a failure of the running system: the CLI exits 2 for these.
    pub fn is_bad_input(&self) -> bool {
        match self {
            ForwardError::Tls(_)
            | ForwardError::ResolveListen { .. }
            | ForwardError::SocketPath { .. }
            | ForwardError::File { .. } => true,
            ForwardError::Netns(e) => e.is_bad_input(),
            ForwardError::Bind { .. } | ForwardError::Sockmap(_) | ForwardError::First { .. } => {
                false
            }
        }
    }
}

fn bind_hint(cause: &io::Error) -> &'static str {
    match cause.kind() {
        io::ErrorKind::AddrInUse => {
            " (another socket listens there: stop it or choose another port)"
        }
        io::ErrorKind::PermissionDenied => " (ports below 1024 need root or CAP_NET_BIND_SERVICE)",
        io::ErrorKind::AddrNotAvailable => " (no interface of this host has that address)",
        _ => "",
    }
}

/// Everything one route needs; built from a `config::RouteSpec` by the supervisor.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub listen: ListenAddr,
    pub target: TargetAddr,
    pub connect_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    pub max_connections: usize,
    pub drain_timeout: Duration,
    /// Terminate TLS from clients.
    pub tls_server: Option<tls::ServerOptions>,
    /// Originate TLS to the target.
    pub tls_client: Option<tls::ClientOptions>,
    pub handshake_timeout: Duration,
    pub data_path: DataPath,
    pub flow: Flow,
    /// socat's `-t`: once one side has closed, how long the other
    /// direction may go on (`None`: until it ends; one way: 0.5 s).
    pub half_close_timeout: Option<Duration>,
    /// socat's `-b`: the copy path's buffer at most this many bytes.
    pub block_size: Option<usize>,
    /// socat's `-v`/`-x`: every block relayed, also on stderr (the route copies).
    pub dump: Option<dump::Dump>,
}

impl RouteConfig {
    /// A route with the documented defaults (`config`'s constants).
    pub fn new(listen: ListenAddr, target: TargetAddr) -> Self {
        RouteConfig {
            listen,
            target,
            connect_timeout: crate::config::DEFAULT_CONNECT_TIMEOUT,
            idle_timeout: Some(crate::config::DEFAULT_IDLE_TIMEOUT),
            max_connections: crate::config::DEFAULT_MAX_CONNECTIONS as usize,
            drain_timeout: crate::config::DEFAULT_DRAIN_TIMEOUT,
            tls_server: None,
            tls_client: None,
            handshake_timeout: crate::config::DEFAULT_HANDSHAKE_TIMEOUT,
            data_path: DataPath::Auto,
            flow: Flow::Both,
            half_close_timeout: None,
            block_size: None,
            dump: None,
        }
    }
}

/// What every connection task of a route shares.
pub struct RouteContext {
    pub target: TargetAddr,
    pub connect_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    pub metrics: RouteMetrics,
    pub acceptor: Option<tls::Acceptor>,
    pub connector: Option<tls::Connector>,
    /// The namespace the target lives in, if not the relay's own.
    pub namespace: Option<namespace::Namespace>,
    /// How plain TCP bytes move (TLS legs always copy).
    pub engine: Engine,
    pub handshake_timeout: Duration,
    /// The side that is stdin/stdout, if one is: the connection ends when
    /// the other side's EOF has been written out (socat's way; stdin may
    /// never end, and its bytes have nowhere to go).
    pub stdio: Option<connection::Side>,
    pub flow: Flow,
    pub dump: Option<dump::Dump>,
    /// socat's `crlf` on the client side and on the target side.
    pub crlf: (bool, bool),
    pub half_close_timeout: Option<Duration>,
    pub block_size: Option<usize>,
}

/// A bound route, ready to accept.
pub struct Forwarder {
    listener: listener::Listener,
    local: String,
    config: RouteConfig,
    route: Arc<RouteContext>,
}

/// Back-off bounds when accept fails for lack of file descriptors or memory.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

impl Forwarder {
    /// Loads the TLS material and binds the listening socket: a bad file or
    /// a busy address fails here, at startup.
    pub async fn bind(config: RouteConfig, metrics: RouteMetrics) -> Result<Self, ForwardError> {
        Self::start(config, metrics, None).await
    }

    /// Like [`Forwarder::bind`], on a listening socket that is already
    /// bound (a reload's changed route takes its predecessor's socket, so
    /// no connection is refused while one forwarder hands over to the next;
    /// both may accept from it for a moment, which serves the client either
    /// way).
    pub async fn adopt(
        config: RouteConfig,
        metrics: RouteMetrics,
        listener: listener::Handle,
    ) -> Result<Self, ForwardError> {
        Self::start(config, metrics, Some(listener)).await
    }

    /// Another handle on the listening socket, for [`Forwarder::adopt`];
    /// `None` for stdin/stdout.
    pub fn listener_handle(&self) -> io::Result<Option<listener::Handle>> {
        self.listener.handle()
    }

    async fn start(
        mut config: RouteConfig,
        metrics: RouteMetrics,
        listener: Option<listener::Handle>,
    ) -> Result<Self, ForwardError> {
        config
            .flow
            .open_files(&mut config.listen, &mut config.target);
        let acceptor = config
            .tls_server
            .as_ref()
            .map(tls::Acceptor::new)
            .transpose()?;
        let connector = config
            .tls_client
            .as_ref()
            .map(|options| match config.target.host() {
                Some(host) => tls::Connector::new(options, host),
                None => Err(TlsError::Config(format!(
                    "TLS to `{}` needs a TCP target (OPENSSL:host:port or tls://host:port)",
                    config.target.text
                ))),
            })
            .transpose()?;
        if acceptor.is_some() {
            metrics.init_tls(TlsRole::Server);
        }
        if connector.is_some() {
            metrics.init_tls(TlsRole::Client);
        }
        let namespace = match &config.target.netns {
            Some(target) => Some(namespace::Namespace::resolve(target.clone()).await?),
            None => None,
        };
        let engine = engine(
            &config,
            acceptor.is_some() || connector.is_some(),
            &metrics.name,
        )?;
        metrics.set_data_path(engine.path());
        let listener = match listener {
            None => {
                listener::bind(
                    &config.listen,
                    config.connect_timeout,
                    &metrics.connect_retries,
                )
                .await?
            }
            Some(handle) => {
                let resolved = handle.describe();
                listener::Listener::adopt(handle).map_err(|cause| ForwardError::Bind {
                    addr: config.listen.text.clone(),
                    resolved,
                    cause,
                })?
            }
        };
        let local = listener.local().map_err(|cause| ForwardError::Bind {
            addr: config.listen.text.clone(),
            resolved: config.listen.text.clone(),
            cause,
        })?;
        let route = Arc::new(RouteContext {
            target: config.target.clone(),
            connect_timeout: config.connect_timeout,
            idle_timeout: config.idle_timeout,
            metrics,
            acceptor,
            connector,
            namespace,
            engine,
            handshake_timeout: config.handshake_timeout,
            stdio: if config.listen.is_stdio() || config.listen.file().is_some() {
                Some(connection::Side::Client)
            } else if config.target.is_stdio() || config.target.file().is_some() {
                Some(connection::Side::Target)
            } else {
                None
            },
            flow: config.flow,
            dump: config.dump,
            crlf: (config.listen.crlf, config.target.crlf),
            half_close_timeout: config.half_close_timeout,
            block_size: config.block_size,
        });
        Ok(Forwarder {
            listener,
            local,
            config,
            route,
        })
    }

    /// Where it listens: `127.0.0.1:8080`, `/run/x.sock`, `@name`, `stdio`.
    pub fn local(&self) -> &str {
        &self.local
    }

    /// Accepts until `drain` turns true (or, for a socat address without
    /// `fork`, after the first connection), then closes the listener, gives
    /// open connections up to the drain timeout, closes what is left, and
    /// returns once every connection task has finished: with the outcome
    /// of the one connection of a socat address without `fork` (the
    /// process's exit status follows it), else `None`.
    pub async fn run(self, mut drain: watch::Receiver<bool>) -> Option<Outcome> {
        let Forwarder {
            mut listener,
            config,
            route,
            ..
        } = self;
        let max = config.max_connections.clamp(1, Semaphore::MAX_PERMITS);
        let slots = Arc::new(Semaphore::new(max));
        let (close_tx, close_rx) = watch::channel(false);
        let mut backoff = ACCEPT_BACKOFF_MIN;
        let mut once = None;

        loop {
            let slot = match slots.clone().try_acquire_owned() {
                Ok(slot) => slot,
                Err(_) => {
                    route.metrics.outcome(Outcome::Limit).inc();
                    tracing::warn!(route = %route.metrics.name, max, "connection limit reached; accepting paused until a connection closes");
                    tokio::select! {
                        slot = slots.clone().acquire_owned() => slot.expect("the slot semaphore is never closed"),
                        _ = raised(&mut drain) => break,
                    }
                }
            };
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = raised(&mut drain) => break,
            };
            match accepted {
                Ok((stream, peer)) => {
                    backoff = ACCEPT_BACKOFF_MIN;
                    let first_child = listener.take_child();
                    if !admitted(&config.listen, &peer) {
                        // Closed unread: no byte reaches the target, which is
                        // never connected to. socat goes on listening too,
                        // with `fork` or without.
                        tracing::debug!(route = %route.metrics.name, %peer, "client outside range=: closed");
                        route.metrics.outcome(Outcome::Denied).inc();
                        drop(stream);
                        continue;
                    }
                    let connection =
                        Connection::new(stream, peer, route.clone()).with_client_child(first_child);
                    let close = close_rx.clone();
                    let task = tokio::spawn(async move {
                        let outcome = connection.run(close).await;
                        drop(slot);
                        outcome
                    });
                    if config.listen.once {
                        once = Some(task);
                        break;
                    }
                }
                Err(err) if is_resource_exhaustion(&err) => {
                    tracing::warn!(route = %route.metrics.name, error = %err, retry_in_ms = backoff.as_millis() as u64,
                        "accept failed for lack of resources; backing off, the listener stays open");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                }
                // A client that went away between SYN and accept, and the like:
                // that client's problem, not the listener's.
                Err(err) => {
                    tracing::debug!(route = %route.metrics.name, error = %err, "accept failed")
                }
            }
        }
        drop(listener);
        Self::drain(&config, &route, &slots, max, close_tx, &mut drain).await;
        match once {
            // A task that panicked has no outcome to report.
            Some(task) => task.await.ok(),
            None => None,
        }
    }

    /// Waits for the open connections, up to the drain timeout once a drain
    /// is asked, then closes what is left.
    async fn drain(
        config: &RouteConfig,
        route: &RouteContext,
        slots: &Semaphore,
        max: usize,
        close_tx: watch::Sender<bool>,
        drain: &mut watch::Receiver<bool>,
    ) {
        let all = u32::try_from(max).expect("max is clamped to Semaphore::MAX_PERMITS");
        if !*drain.borrow() {
            // The socat single-connection case: wait for it, unless a
            // shutdown signal comes first.
            tokio::select! {
                _ = slots.acquire_many(all) => return,
                _ = raised(drain) => {}
            }
        }
        let open = max - slots.available_permits();
        tracing::info!(route = %route.metrics.name, open, timeout_s = config.drain_timeout.as_secs_f64(),
            "listener closed; draining open connections");
        if tokio::time::timeout(config.drain_timeout, slots.acquire_many(all))
            .await
            .is_ok()
        {
            return;
        }
        tracing::warn!(route = %route.metrics.name, open = max - slots.available_permits(),
            "drain timeout: closing the connections still open");
        // Every running task holds a receiver; with none left there is
        // nobody to tell, and the wait below returns at once.
        let _ = close_tx.send(true);
        let _ = slots.acquire_many(all).await;
    }
}

/// The route's data path. A TLS leg's bytes pass through rustls, so it
/// copies; sockmap pairs two TCP sockets, so a route with another kind of
/// leg copies (splice works on any two kernel sockets, TCP or UNIX, and a
/// stdin/stdout leg copies per connection).
fn engine(config: &RouteConfig, tls: bool, route: &str) -> Result<Engine, ForwardError> {
    let tcp_only = matches!(config.listen.endpoint, ListenEndpoint::Tcp(_))
        && matches!(config.target.endpoint, TargetEndpoint::Tcp(_));
    if tls {
        if !matches!(config.data_path, DataPath::Auto | DataPath::Copy) {
            tracing::warn!(
                route,
                data_path = config.data_path.as_str(),
                "--data-path applies to plain (not TLS) routes only; this route has a TLS leg and copies"
            );
        }
        return Ok(Engine::Copy);
    }
    if config.dump.is_some() || config.listen.crlf || config.target.crlf {
        if !matches!(config.data_path, DataPath::Auto | DataPath::Copy) {
            tracing::warn!(
                route,
                data_path = config.data_path.as_str(),
                "a route that dumps its traffic (-v / -x, --dump) or converts line ends (crlf) copies: only the copy path sees the bytes"
            );
        }
        return Ok(Engine::Copy);
    }
    if config.data_path == DataPath::Sockmap && !tcp_only {
        tracing::warn!(
            route,
            data_path = config.data_path.as_str(),
            "--data-path sockmap pairs TCP sockets only; this route has a UNIX, EXEC or STDIO leg and copies"
        );
        return Ok(Engine::Copy);
    }
    Ok(data_path::select(config.data_path, route)?)
}

/// Completes when the flag turns true; never, if its sender is gone (a
/// dropped sender must not read as "drain now").
pub(crate) async fn raised(flag: &mut watch::Receiver<bool>) {
    if flag.wait_for(|d| *d).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Whether the listener's `range=` lets `peer` in; only TCP listeners
/// have one.
fn admitted(listen: &ListenAddr, peer: &listener::Peer) -> bool {
    match (listen.tcp(), peer) {
        (Some(tcp), listener::Peer::Tcp(addr)) => tcp.admits(addr.ip()),
        _ => true,
    }
}

/// Errors after which accepting again at once would spin: the process or
/// the system is out of file descriptors or memory.
fn is_resource_exhaustion(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc_errno::EMFILE | libc_errno::ENFILE | libc_errno::ENOBUFS | libc_errno::ENOMEM)
    )
}

mod libc_errno {
    pub const EMFILE: i32 = nix::errno::Errno::EMFILE as i32;
    pub const ENFILE: i32 = nix::errno::Errno::ENFILE as i32;
    pub const ENOBUFS: i32 = nix::errno::Errno::ENOBUFS as i32;
    pub const ENOMEM: i32 = nix::errno::Errno::ENOMEM as i32;
}
