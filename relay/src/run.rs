//! The supervisor: runs a [`Spec`] and, when it came from a file, applies
//! a changed file as a diff. It binds every route's listener and starts
//! every observer before anything is served (a busy port or a bad
//! certificate fails the start, not the first connection), serves
//! `/metrics` for all of them, and owns the signals: SIGTERM or SIGINT
//! stops accepting everywhere and drains, a second one exits at once,
//! SIGHUP reloads the file (or, for a command-line spec, is logged).
//!
//! A reload never restarts: the new file is validated and every listener it
//! needs is bound (or taken over from the running route) before anything
//! changes, and a failure leaves the running spec whole. Routes are matched
//! by name: an unchanged route keeps its forwarder, socket and connections;
//! a changed one gets a new forwarder on the same listening socket (new
//! connections get the new settings, open ones finish with the old); a
//! removed one stops accepting and drains. Observers are matched by what
//! they observe and how.
//!
//! Under systemd it reports readiness, reloads and the stop (`notify`), and
//! takes the listeners systemd passed instead of binding (`inherited`).
//! An upgrade hands the listening sockets to a new process (`upgrade`,
//! `handover`), which finds them in `inherited` too.
//!
//! Not here: what a route or an observer does (`forward`, `observe`), or
//! how a file is read (`config::file`).

mod handover;
mod inherited;
mod notify;
mod upgrade;

pub use inherited::{InheritError, Inherited};
use notify::Notify;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus::{Gauge, IntCounterVec, IntGaugeVec, Opts};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::{Observed, ObserverSpec, RouteSpec, Spec};
use crate::forward::metrics::ForwardMetrics;
use crate::forward::{ForwardError, Forwarder, RouteConfig};
use crate::health::ReadyFlag;
use crate::metrics::{self, Metrics, MetricsError};
use crate::observe::fleet::Fleet;
use crate::observe::session::{Session, SessionOptions};
use crate::observe::{ObserveError, ObserveOptions};
use crate::tls;
use crate::udp::metrics::UdpMetrics;
use crate::udp::{UdpCounters, UdpOptions, UdpRelay};
pub use handover::HandoverError;

/// Why a run ended other than by a signal and a finished drain.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("route {route}")]
    Route {
        route: String,
        #[source]
        source: ForwardError,
    },
    #[error(transparent)]
    Inherited(#[from] InheritError),
    #[error(transparent)]
    Observe(#[from] ObserveError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error("upgrade: {0}")]
    Handover(#[from] HandoverError),
    #[error("cannot install the {signal} handler: {source}")]
    Signal {
        signal: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} during drain: exiting at once")]
    SecondSignal(&'static str),
    #[error("a relay task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// The one connection of a socat address without `fork` could not
    /// reach its target: socat exits 1 then, and so does relay.
    #[error(
        "route {route}: the connection could not reach its target ({outcome}; the log line says why)"
    )]
    Unreached {
        route: String,
        outcome: &'static str,
    },
}

impl RunError {
    /// Errors in what the user asked for (a TLS file, a namespace that does
    /// not exist), as opposed to failures of the running system.
    pub fn is_bad_input(&self) -> bool {
        match self {
            RunError::Route { source, .. } => source.is_bad_input(),
            RunError::Observe(e) => e.is_bad_input(),
            RunError::Handover(e) => e.is_bad_input(),
            _ => false,
        }
    }
}

/// What the signals ask of the run.
enum Asked {
    Stop(&'static str),
    Reload,
}

/// SIGTERM and SIGINT stop; SIGHUP reloads. SIGHUP is caught even for a
/// spec that cannot reload, so that a closing terminal or a `kill -HUP`
/// meant as "reload" does not end the relay without a drain.
pub struct Signals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl Signals {
    pub fn install() -> Result<Self, RunError> {
        let install = |kind: SignalKind, name: &'static str| {
            signal(kind).map_err(|source| RunError::Signal {
                signal: name,
                source,
            })
        };
        Ok(Signals {
            terminate: install(SignalKind::terminate(), "SIGTERM")?,
            interrupt: install(SignalKind::interrupt(), "SIGINT")?,
            hangup: install(SignalKind::hangup(), "SIGHUP")?,
        })
    }

    async fn next(&mut self) -> Asked {
        tokio::select! {
            _ = self.terminate.recv() => Asked::Stop("SIGTERM"),
            _ = self.interrupt.recv() => Asked::Stop("SIGINT"),
            _ = self.hangup.recv() => Asked::Reload,
        }
    }

    /// The next signal that stops; SIGHUP is logged and ignored.
    async fn next_stop(&mut self) -> &'static str {
        loop {
            match self.next().await {
                Asked::Stop(signal) => return signal,
                Asked::Reload => tracing::warn!(signal = "SIGHUP", "ignored while draining"),
            }
        }
    }
}

/// Where a spec came from, and so whether (and how) it can be reloaded.
pub struct Source {
    /// The config file; `None` for a spec built from the command line.
    pub file: Option<PathBuf>,
    /// Reload when the file changes, not only on SIGHUP.
    pub watch: bool,
    /// The hash of the text the spec was read from (`relay_config_info`).
    pub hash: String,
    /// `--metrics` given on the command line overrides the file's, on every reload.
    pub metrics_override: Option<std::net::SocketAddr>,
    /// `--upgrade-from`: take the listening sockets of the relay serving
    /// this handover socket, and replace it.
    pub upgrade_from: Option<PathBuf>,
}

impl Source {
    /// A spec from the command line: nothing to reload.
    pub fn command_line() -> Self {
        Source {
            file: None,
            watch: false,
            hash: String::new(),
            metrics_override: None,
            upgrade_from: None,
        }
    }
}

/// The hash `relay_config_info{hash}` carries for a config text.
pub fn config_hash(text: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut hasher);
    format!("{:016x}", hasher.finish())
}

/// How often `--watch-config` looks at the file.
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// Runs `spec` until its routes end by themselves (socat addresses
/// without `fork`), its observers end (a target gone, without follow), or
/// a signal stops it (after the drain). Routes that name a socket take it
/// from `inherited`.
pub async fn run(spec: Spec, source: Source, inherited: Inherited) -> Result<(), RunError> {
    // First, so that no signal meant for a drain ends the relay abruptly.
    let mut signals = Signals::install()?;
    let registry = Arc::new(Metrics::new());
    let forward_metrics = registry.shared(ForwardMetrics::register);
    let udp_metrics = registry.shared(UdpMetrics::register);
    let reloads = registry.shared(ReloadMetrics::register);
    reloads.applied(&source.hash);
    let mut sup = Supervisor {
        registry: registry.clone(),
        forward_metrics,
        udp_metrics,
        reloads,
        routes: HashMap::new(),
        route_tasks: JoinSet::new(),
        next_id: 0,
        observers: HashMap::new(),
        sessions: JoinSet::new(),
        metrics: spec.metrics,
        upgrade_socket: spec.upgrade_socket.clone(),
        task_names: HashMap::new(),
        inherited,
        notify: Notify::new(),
    };
    sup.warn_unused_sockets(&spec);
    let metrics_addr = spec.metrics;
    // An upgrade takes the old relay's sockets first, so that nothing
    // binds what it serves; a fresh start serves its handover socket.
    let mut upgrades = upgrade::Upgrades::off();
    let mut arriving = None;
    match &source.upgrade_from {
        Some(from) => {
            let (sockets, taken) =
                upgrade::Arriving::take_over(from, spec.upgrade_socket.as_deref()).await?;
            sup.inherited.add_handed_over(sockets);
            arriving = Some(taken);
        }
        None => upgrades = upgrade::Upgrades::serve(spec.upgrade_socket.as_deref())?,
    }
    let prepared = sup.prepare(&spec).await?;
    sup.commit(prepared);
    let mut metrics_task = None;
    let mut metrics_handle = None;
    if let Some(addr) = metrics_addr {
        let listener = match sup
            .inherited
            .take_handed(&inherited::metrics_identity(addr))?
        {
            Some(listener) => metrics::adopt(addr, listener)?,
            None => metrics::bind(addr).await?,
        };
        tracing::info!(
            "metrics on http://{}/metrics",
            listener.local_addr().unwrap_or(addr)
        );
        metrics_handle = upgrade::metrics_handle(addr, &listener);
        metrics_task = Some(tokio::spawn(metrics::serve(listener, registry.clone())));
    }
    if let Some(arriving) = arriving {
        // Serving: the old relay may stop.
        upgrades = arriving.finish().await?;
        sup.inherited.close_unused_handed();
    }
    upgrades.offer_metrics(metrics_handle);
    let mut successor = None;
    sup.notify.ready(&sup.serving());
    // An observer that failed beside routes: the routes keep serving, and
    // the run reports it when it ends.
    let mut observer_failed: Option<RunError> = None;
    // A route without `fork` whose one connection did not get through.
    let mut unreached: Option<RunError> = None;
    let mut watched = source.file.as_deref().and_then(modified);
    let mut watch_tick = tokio::time::interval(WATCH_EVERY);

    // Until a signal: the routes ending by themselves ends the run (the
    // observers beside them stop too); an observer failing ends it with
    // its error; observers ending by themselves end an observe-only run.
    let signal = loop {
        tokio::select! {
            Some(done) = sup.route_tasks.join_next(), if !sup.route_tasks.is_empty() => {
                let (id, outcome) = done?;
                if let Some(outcome) = outcome.filter(|o| o.unreached())
                    && let Some(route) = sup.task_names.get(&id)
                {
                    unreached.get_or_insert(RunError::Unreached { route: route.clone(), outcome: outcome.as_str() });
                }
                let by_itself = sup.route_ended(id);
                // A socat address without `fork` served its connection. A
                // daemon's observers keep running; a command line's stop.
                if by_itself
                    && sup.routes.is_empty()
                    && sup.route_tasks.is_empty()
                    && (source.file.is_none() || sup.sessions.is_empty())
                {
                    sup.stop_observers();
                    let observers = finish_observers(&mut sup.sessions).await;
                    return unreached.or(observer_failed).map_or(observers, Err);
                }
            },
            Some(done) = sup.sessions.join_next(), if !sup.sessions.is_empty() => {
                let serving = !sup.routes.is_empty() || !sup.route_tasks.is_empty();
                match done.map_err(RunError::from).and_then(|r| r.map_err(RunError::from)) {
                    Ok(()) => {}
                    // Nothing else runs: the observer's error is the run's.
                    Err(err) if !serving => return Err(err),
                    Err(err) => {
                        tracing::error!(error = %anyhow_chain(&err), "an observer failed; the routes keep serving");
                        observer_failed.get_or_insert(err);
                    }
                }
                if !serving && sup.sessions.is_empty() {
                    return observer_failed.map_or(Ok(()), Err);
                }
            },
            asked = signals.next() => match asked {
                Asked::Stop(signal) => break signal,
                Asked::Reload => match &source.file {
                    Some(file) => sup.reload(file, &source).await,
                    None => tracing::warn!(
                        signal = "SIGHUP",
                        "ignored: this relay was started from the command line and has no configuration file to reload; stop it with SIGTERM"
                    ),
                },
            },
            event = upgrades.next() => match event {
                upgrade::Event::Asked(channel) => upgrades.offer(channel, sup.listening()),
                upgrade::Event::TakenOver(next) => {
                    successor = Some(next);
                    break "upgrade";
                }
            },
            _ = watch_tick.tick(), if source.watch && source.file.is_some() => {
                let file = source.file.as_deref().expect("checked by the branch's condition");
                let now = modified(file);
                if now != watched {
                    watched = now;
                    tracing::info!(file = %file.display(), "config file changed: reloading");
                    sup.reload(file, &source).await;
                }
            },
        }
    };
    sup.notify
        .stopping(&format!("{signal}: draining open connections"));
    if !sup.routes.is_empty() {
        tracing::info!(
            signal,
            "stopping: no new connections; a second signal exits at once"
        );
    } else {
        tracing::info!(signal, "stopping: detaching");
    }
    sup.drain_all();
    match successor {
        Some(successor) => {
            // The successor serves /metrics from the same socket now.
            if let Some(task) = metrics_task.take() {
                task.abort();
            }
            upgrades.hand_over(successor).await;
        }
        None => upgrades.close(),
    }
    tokio::select! {
        () = async { while sup.route_tasks.join_next().await.is_some() {} } => {}
        signal = signals.next_stop() => return Err(RunError::SecondSignal(signal)),
    }
    sup.stop_observers();
    let observers = finish_observers(&mut sup.sessions).await;
    observer_failed.map_or(observers, Err)
}

/// The file's modification time, if it can be read.
fn modified(file: &Path) -> Option<SystemTime> {
    std::fs::metadata(file).and_then(|m| m.modified()).ok()
}

/// Waits for every observer to detach; the first error is the run's.
async fn finish_observers(
    sessions: &mut JoinSet<Result<(), ObserveError>>,
) -> Result<(), RunError> {
    let mut first = Ok(());
    while let Some(result) = sessions.join_next().await {
        if let Err(e) = result
            .map_err(RunError::from)
            .and_then(|r| r.map_err(RunError::from))
            && first.is_ok()
        {
            first = Err(e);
        }
    }
    first
}

/// `relay_config_*`: how reloads went and what runs.
struct ReloadMetrics {
    reloads: IntCounterVec,
    last_success: Gauge,
    info: IntGaugeVec,
}

/// The outcomes of a reload, as `relay_config_reloads_total` labels them.
const RELOAD_OUTCOMES: [&str; 3] = ["ok", "invalid", "bind_failed"];

impl ReloadMetrics {
    fn register(registry: &prometheus::Registry) -> Self {
        let reloads = IntCounterVec::new(
            Opts::new(
                "relay_config_reloads_total",
                "Config reloads by outcome (invalid: the file did not validate; bind_failed: a new listener or observer could not start; either way nothing changed).",
            ),
            &["outcome"],
        )
        .expect("static metric definition is valid");
        for outcome in RELOAD_OUTCOMES {
            reloads.with_label_values(&[outcome]);
        }
        let last_success = Gauge::new(
            "relay_config_last_reload_success_timestamp_seconds",
            "When the running config was applied (start or reload), as a Unix time.",
        )
        .expect("static metric definition is valid");
        let info = IntGaugeVec::new(
            Opts::new(
                "relay_config_info",
                "Always 1; the hash of the config file's text that runs (empty for a command-line spec).",
            ),
            &["hash"],
        )
        .expect("static metric definition is valid");
        for collector in [
            Box::new(reloads.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(last_success.clone()),
            Box::new(info.clone()),
        ] {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        ReloadMetrics {
            reloads,
            last_success,
            info,
        }
    }

    fn applied(&self, hash: &str) {
        self.info.reset();
        self.info.with_label_values(&[hash]).set(1);
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.last_success.set(now);
    }

    fn outcome(&self, outcome: &str) {
        self.reloads.with_label_values(&[outcome]).inc();
    }
}

/// A route that accepts now.
struct Running {
    /// The spec it runs, as compared on reload.
    key: String,
    /// The task's id (a changed route's successor has another).
    id: u64,
    drain: watch::Sender<bool>,
    /// Where it listens (`socket_identity`): a route of the next spec that
    /// listens there too takes the socket over, whatever its name.
    identity: String,
    /// Another handle on its listening socket, for that successor.
    listener: Option<crate::forward::listener::Handle>,
    ready: ReadyFlag,
}

/// An observer that is attached now.
struct Watching {
    stop: watch::Sender<bool>,
    /// The TLS key lines its capture embeds (a route's `--pcap-embed-keys`).
    keys: Option<Arc<crate::observe::capture::KeyLines>>,
}

/// Routes and observers started for a spec, not yet serving.
struct Prepared {
    /// Each with its `route_key`, computed once.
    routes: Vec<(RouteSpec, String, Service, ReadyFlag)>,
    observers: Vec<(String, Started)>,
}

/// What serves a route: a forwarder for streams, a UDP relay for datagrams.
enum Service {
    // Boxed: the two differ in size, and there are few of them.
    Stream(Box<Forwarder>),
    Datagram(Box<UdpRelay>),
}

impl Service {
    /// Another handle on its socket, for a changed route's successor.
    fn listener_handle(&self) -> std::io::Result<Option<crate::forward::listener::Handle>> {
        match self {
            Service::Stream(forwarder) => forwarder.listener_handle(),
            Service::Datagram(relay) => relay
                .socket_handle()
                .map(|s| Some(crate::forward::listener::Handle::Udp(s))),
        }
    }

    async fn run(self, drain: watch::Receiver<bool>) -> Option<crate::forward::metrics::Outcome> {
        match self {
            Service::Stream(forwarder) => (*forwarder).run(drain).await,
            Service::Datagram(relay) => {
                (*relay).run(drain).await;
                None
            }
        }
    }
}

/// An observer entry, started: one target's session, or a fleet of containers.
enum Started {
    // Boxed: the two differ in size, and there are few of them.
    Target(Box<Session>),
    Containers(Box<Fleet>),
}

impl Started {
    /// The TLS key lines its capture embeds (a fleet captures nothing).
    fn keys(&self) -> Option<Arc<crate::observe::capture::KeyLines>> {
        match self {
            Started::Target(session) => session.keys(),
            Started::Containers(_) => None,
        }
    }

    /// Runs until `stop` turns true (or, for a target without follow, it goes).
    async fn run(self, stop: watch::Receiver<bool>) -> Result<(), ObserveError> {
        match self {
            Started::Target(session) => (*session).run(stop).await,
            Started::Containers(fleet) => (*fleet).run(stop).await,
        }
    }
}

struct Supervisor {
    registry: Arc<Metrics>,
    forward_metrics: Arc<ForwardMetrics>,
    udp_metrics: Arc<UdpMetrics>,
    reloads: Arc<ReloadMetrics>,
    /// By route name.
    routes: HashMap<String, Running>,
    /// Every forwarder's task, current or draining, by id.
    route_tasks: JoinSet<(u64, Option<crate::forward::metrics::Outcome>)>,
    next_id: u64,
    /// By observer key.
    observers: HashMap<String, Watching>,
    sessions: JoinSet<Result<(), ObserveError>>,
    /// Where `/metrics` is served (fixed for the life of the process).
    metrics: Option<std::net::SocketAddr>,
    /// The handover socket (fixed for the life of the process too).
    upgrade_socket: Option<PathBuf>,
    /// The route name of every forwarder task still running, by task id
    /// (a removed route's series stay until its last task has drained).
    task_names: HashMap<u64, String>,
    /// Listeners that came from outside (systemd, or the relay this one
    /// replaces), consulted before binding.
    inherited: Inherited,
    notify: Notify,
}

/// Where a route listens, as a reload matches sockets: the systemd socket
/// it names, else host, port and namespace; for port 0 ("any free port")
/// the address as written.
fn socket_identity(route: &RouteSpec) -> String {
    if let Some(name) = &route.socket {
        return format!("systemd socket {name}");
    }
    crate::config::file::listen_identity(&route.listen)
        .unwrap_or_else(|| format!("as written: {}", route.listen.text))
}

/// What identifies a route's settings: its whole spec.
fn route_key(route: &RouteSpec) -> String {
    format!("{route:?}")
}

/// What identifies an observer: its target and options.
fn observer_key(observer: &ObserverSpec) -> String {
    format!("{:?}|{:?}", observer.observed, observer.session)
}

impl Supervisor {
    /// Starts what `spec` needs that does not run yet: binds new routes'
    /// listeners (a changed route takes its predecessor's socket) and
    /// attaches new observers. Nothing running changes; on an error,
    /// everything started here is dropped again.
    async fn prepare(&self, spec: &Spec) -> Result<Prepared, RunError> {
        let mut prepared = Prepared {
            routes: Vec::new(),
            observers: Vec::new(),
        };
        match self.prepare_into(spec, &mut prepared).await {
            Ok(()) => Ok(prepared),
            Err(err) => {
                self.discard(spec, prepared);
                Err(err)
            }
        }
    }

    /// Undoes what a failed [`Supervisor::prepare`] left beside the running
    /// spec: the new routes' readiness flags and series. (Its listeners and
    /// observers close as they are dropped.)
    fn discard(&self, spec: &Spec, prepared: Prepared) {
        for (_, _, _, ready) in &prepared.routes {
            ready.retire();
        }
        for route in &spec.routes {
            if !self.has_route(&route.name) {
                self.forward_metrics.remove_route(&route.name);
                self.udp_metrics.remove_route(&route.name);
            }
        }
        // A session detaches (programs, series, readiness) only by running
        // to its stop: run each with the stop already given.
        for (_, session) in prepared.observers {
            tokio::spawn(async move {
                let (_stop, stopped) = watch::channel(true);
                if let Err(err) = session.run(stopped).await {
                    tracing::warn!(error = %anyhow_chain(&err), "detaching an observer of a refused reload");
                }
            });
        }
    }

    /// `route`, its TLS key lines going where the running observer of its
    /// capture reads them: a changed route whose observer stays unchanged
    /// must not write its keys into a new list that nobody reads.
    fn with_running_keys<'a>(&self, route: &'a RouteSpec) -> std::borrow::Cow<'a, RouteSpec> {
        let running = route_observer(route)
            .and_then(|observer| self.observers.get(&observer_key(&observer)))
            .and_then(|watching| watching.keys.clone());
        match (running, &route.capture) {
            (Some(keys), Some(capture)) if capture.keys.is_some() => {
                let mut route = route.clone();
                if let Some(capture) = &mut route.capture {
                    capture.keys = Some(keys);
                }
                std::borrow::Cow::Owned(route)
            }
            _ => std::borrow::Cow::Borrowed(route),
        }
    }

    /// Whether a route of this name runs or still drains.
    fn has_route(&self, name: &str) -> bool {
        self.routes.contains_key(name) || self.task_names.values().any(|n| n == name)
    }

    async fn prepare_into(&self, spec: &Spec, prepared: &mut Prepared) -> Result<(), RunError> {
        let mut observers: Vec<ObserverSpec> = spec.observers.clone();
        for route in &spec.routes {
            if let Some(observer) = route_observer(route) {
                observers.push(observer);
            }
            let key = route_key(route);
            let route = &self.with_running_keys(route);
            let running = self.routes.get(&route.name);
            if running.is_some_and(|r| r.key == key) {
                continue;
            }
            // A running route listens there (this one, or one renamed):
            // take its socket over; else bind anew.
            let identity = socket_identity(route);
            let holder = running
                .filter(|r| r.identity == identity)
                .or_else(|| self.routes.values().find(|r| r.identity == identity));
            let listener = match holder {
                Some(Running {
                    listener: Some(listener),
                    ..
                }) => Some(listener.try_clone().map_err(|cause| RunError::Route {
                    route: route.name.clone(),
                    source: ForwardError::Bind {
                        addr: route.listen.text.clone(),
                        resolved: listener.describe(),
                        cause,
                    },
                })?),
                _ => None,
            };
            // A socket from outside first: handed over by the relay this
            // one replaces (at start only), or passed by systemd (checked
            // again against this spec's listen, the same socket either way).
            let outside = match self.inherited.take_handed(&identity)? {
                Some(handed) => Some(handed),
                None => self.inherited.take(route)?,
            };
            let listener = outside
                .map(crate::forward::listener::Handle::Tcp)
                .or(listener);
            let (forwarder, ready) = if route.listen.is_udp() {
                self.start_udp_route(route, listener).await?
            } else {
                self.start_route(route, listener).await?
            };
            prepared
                .routes
                .push((RouteSpec::clone(route), key, forwarder, ready));
        }
        for observer in observers {
            let key = observer_key(&observer);
            if self.observers.contains_key(&key)
                || prepared.observers.iter().any(|(k, _)| *k == key)
            {
                continue;
            }
            let started = match observer.observed {
                Observed::Target(target) => Started::Target(Box::new(
                    Session::start(target, observer.session, &self.registry).await?,
                )),
                // Discovery starts when it runs; a daemon away is not a failure.
                Observed::Containers(containers) => Started::Containers(Box::new(Fleet::start(
                    containers,
                    observer.session.observe,
                    observer.session.watch,
                    &self.registry,
                ))),
            };
            prepared.observers.push((key, started));
        }
        Ok(())
    }

    /// Puts what [`Supervisor::prepare`] started in service.
    fn commit(&mut self, prepared: Prepared) {
        for (route, key, service, ready) in prepared.routes {
            let listener = match service.listener_handle() {
                // A socat address without `fork` closes its listener after
                // one connection: a spare handle would keep it listening.
                Ok(_) if route.listen.once => None,
                Ok(listener) => listener,
                Err(err) => {
                    // Without a second handle a later change rebinds
                    // instead of taking the socket over; say so.
                    tracing::warn!(route = %route.name, error = %err, "cannot duplicate the listening socket; a reload that changes this route will have to bind again");
                    None
                }
            };
            self.next_id += 1;
            let id = self.next_id;
            let (drain, drain_rx) = watch::channel(false);
            let name = route.name.clone();
            self.task_names.insert(id, name.clone());
            if let Some(old) = self.routes.remove(&name) {
                // A changed route: the old forwarder stops accepting and
                // drains its connections with the old settings.
                tracing::info!(route = %name, "route changed: new connections get the new settings; open ones finish with the old");
                // The successor's flag (already set) carries /healthz now.
                old.ready.retire();
                old.drain.send_replace(true);
            }
            self.route_tasks.spawn(async move {
                let outcome = service.run(drain_rx).await;
                (id, outcome)
            });
            self.routes.insert(
                route.name.clone(),
                Running {
                    key,
                    id,
                    drain,
                    identity: socket_identity(&route),
                    listener,
                    ready,
                },
            );
        }
        for (key, session) in prepared.observers {
            let (stop, stop_rx) = watch::channel(false);
            let keys = session.keys();
            self.sessions.spawn(session.run(stop_rx));
            self.observers.insert(key, Watching { stop, keys });
        }
    }

    /// Stops what runs but `spec` no longer has: removed routes drain,
    /// removed observers detach.
    fn retire(&mut self, spec: &Spec) {
        // Sets: a file of a thousand routes would otherwise compare every
        // name with every other (the reload bench's profile showed it).
        let names: std::collections::HashSet<&str> =
            spec.routes.iter().map(|r| r.name.as_str()).collect();
        let gone: Vec<String> = self
            .routes
            .keys()
            .filter(|name| !names.contains(&name.as_str()))
            .cloned()
            .collect();
        for name in gone {
            if let Some(route) = self.routes.remove(&name) {
                tracing::info!(route = %name, "route removed: no new connections; open ones drain");
                route.ready.retire();
                route.drain.send_replace(true);
            }
        }
        let mut keys: std::collections::HashSet<String> =
            spec.observers.iter().map(observer_key).collect();
        keys.extend(
            spec.routes
                .iter()
                .filter_map(route_observer)
                .map(|o| observer_key(&o)),
        );
        self.observers.retain(|key, watching| {
            let keep = keys.contains(key);
            if !keep {
                watching.stop.send_replace(true);
            }
            keep
        });
    }

    /// A forwarder's task ended: a route that ended by itself (no drain
    /// asked; true is returned) leaves the spec; a route that no longer
    /// exists takes its series with it.
    fn route_ended(&mut self, id: u64) -> bool {
        let Some(name) = self.task_names.remove(&id) else {
            return false;
        };
        let by_itself = self.routes.get(&name).is_some_and(|r| r.id == id);
        if by_itself {
            self.routes.remove(&name);
        }
        if !by_itself && !self.has_route(&name) {
            self.forward_metrics.remove_route(&name);
            self.udp_metrics.remove_route(&name);
        }
        by_itself
    }

    /// Reads `file` again and applies it, telling the service manager.
    async fn reload(&mut self, file: &Path, source: &Source) {
        self.notify.reloading();
        let outcome = self.apply(file, source).await;
        self.notify.ready(&format!("{outcome}; {}", self.serving()));
    }

    /// What runs, as the service manager's status says it.
    fn serving(&self) -> String {
        format!(
            "serving {} routes, {} observers",
            self.routes.len(),
            self.observers.len()
        )
    }

    /// Every passed socket that no route of `spec` takes: logged.
    fn warn_unused_sockets(&self, spec: &Spec) {
        for name in self.inherited.unused(spec) {
            tracing::warn!(
                socket = name,
                "systemd passed socket `{name}`, but no route takes it (`socket = \"{name}\"`); connections to it wait unserved"
            );
        }
    }

    /// Reads `file` again and applies it; on any failure nothing changes.
    /// Returns how it went.
    async fn apply(&mut self, file: &Path, source: &Source) -> &'static str {
        let (mut spec, text) = match crate::config::file::load(file) {
            Ok(loaded) => loaded,
            Err(problems) => {
                self.reloads.outcome("invalid");
                for problem in &problems.0 {
                    tracing::error!("reload: {problem}");
                }
                tracing::error!(
                    problems = problems.0.len(),
                    "reload refused: the running config stays"
                );
                return "reload refused: the file is invalid (see the log)";
            }
        };
        if source.metrics_override.is_some() {
            spec.metrics = source.metrics_override;
        }
        if spec.metrics != self.metrics {
            tracing::warn!(
                running = ?self.metrics,
                asked = ?spec.metrics,
                "reload: a change of [metrics] needs a restart; the endpoint stays as it is"
            );
        }
        if spec.upgrade_socket != self.upgrade_socket {
            tracing::warn!(
                running = ?self.upgrade_socket,
                asked = ?spec.upgrade_socket,
                "reload: a change of [upgrade] socket needs a restart (or an upgrade); the socket stays as it is"
            );
        }
        crate::limits::fit_connections(&mut spec);
        match self.prepare(&spec).await {
            Ok(prepared) => {
                let (added, kept) = (
                    prepared.routes.len(),
                    spec.routes.len() - prepared.routes.len(),
                );
                self.commit(prepared);
                self.retire(&spec);
                self.reloads.applied(&config_hash(&text));
                self.reloads.outcome("ok");
                tracing::info!(
                    routes = spec.routes.len(),
                    started_or_changed = added,
                    unchanged = kept,
                    observers = self.observers.len(),
                    "reloaded"
                );
                self.warn_unused_sockets(&spec);
                "reloaded"
            }
            Err(err) => {
                self.reloads.outcome("bind_failed");
                tracing::error!(error = %anyhow_chain(&err), "reload refused: the running config stays");
                "reload refused: a listener or observer could not start (see the log)"
            }
        }
    }

    /// Another handle on every route's listening socket, for a successor.
    fn listening(&self) -> Vec<(handover::Listening, std::os::fd::OwnedFd)> {
        let mut sockets = Vec::new();
        for (name, route) in &self.routes {
            // UNIX listeners are not handed over yet (the old relay would
            // remove the socket file as it exits): the new relay's bind
            // fails on the path in use, and this relay serves on.
            let Some(crate::forward::listener::Handle::Tcp(listener)) = &route.listener else {
                continue;
            };
            match std::os::fd::AsFd::as_fd(listener).try_clone_to_owned() {
                Ok(fd) => sockets.push((
                    handover::Listening {
                        identity: route.identity.clone(),
                        owner: format!("route {name}"),
                    },
                    fd,
                )),
                Err(err) => {
                    tracing::warn!(route = %name, error = %err, "cannot duplicate the listening socket; the new relay will have to bind it")
                }
            }
        }
        sockets
    }

    fn drain_all(&mut self) {
        // A draining relay accepts nothing more: orchestrators should stop sending.
        for route in self.routes.values_mut() {
            route.ready.set(false);
            // The spare handle would keep the socket listening (and new
            // clients queued in its backlog) after the forwarder closed it.
            route.listener = None;
            route.drain.send_replace(true);
        }
    }

    fn stop_observers(&mut self) {
        for watching in self.observers.values() {
            watching.stop.send_replace(true);
        }
    }

    /// Loads a route's TLS material and binds its listener (or takes
    /// `listener` over), marked ready.
    async fn start_route(
        &self,
        route: &RouteSpec,
        listener: Option<crate::forward::listener::Handle>,
    ) -> Result<(Service, ReadyFlag), RunError> {
        let failed = |source: ForwardError| RunError::Route {
            route: route.name.clone(),
            source,
        };
        let (mut tls_server, mut tls_client) =
            tls::settings::resolve(&route.listen, &route.target, &route.tls)
                .map_err(|e| failed(e.into()))?;
        if let Some(keys) = route.capture.as_ref().and_then(|c| c.keys.clone()) {
            // --pcap-embed-keys: every key log line of either leg also goes into the capture.
            let legs = [
                tls_server.as_mut().map(|s| &mut s.common),
                tls_client.as_mut().map(|c| &mut c.common),
            ];
            let mut tls_legs = 0;
            for common in legs.into_iter().flatten() {
                let keys = keys.clone();
                let tee =
                    tls::keylog::KeyLogTee::new(common.keylog.take(), move |line| keys.push(line));
                common.keylog = Some(Arc::new(tee));
                tls_legs += 1;
            }
            if tls_legs == 0 {
                return Err(failed(
                    tls::TlsError::Config(
                        "--pcap-embed-keys needs a TLS listener or target (tls://... or OPENSSL:...)"
                            .into(),
                    )
                    .into(),
                ));
            }
        }
        let config = RouteConfig {
            listen: route.listen.clone(),
            target: route.target.clone(),
            connect_timeout: route.connect_timeout,
            idle_timeout: route.idle_timeout,
            max_connections: route
                .max_connections
                .unwrap_or(crate::config::DEFAULT_MAX_CONNECTIONS)
                as usize,
            drain_timeout: route.drain_timeout,
            tls_server,
            tls_client,
            handshake_timeout: route.handshake_timeout,
            data_path: route.data_path,
            flow: route.flow,
            half_close_timeout: route.half_close_timeout,
            block_size: route.block_size,
            dump: route.dump,
        };
        let metrics = self.forward_metrics.route(&route.name);
        let forwarder = match listener {
            None => Forwarder::bind(config, metrics).await,
            Some(listener) => Forwarder::adopt(config, metrics, listener).await,
        }
        .map_err(failed)?;
        let ready = self
            .registry
            .readiness()
            .register("listener", forwarder.local());
        ready.set(true);
        tracing::info!(route = %route.name, upstream = %route.target.text, "listening on {}", forwarder.local());
        Ok((Service::Stream(Box::new(forwarder)), ready))
    }

    /// Binds a UDP route's socket (or takes `listener` over) and opens its
    /// target's namespace, marked ready.
    async fn start_udp_route(
        &self,
        route: &RouteSpec,
        listener: Option<crate::forward::listener::Handle>,
    ) -> Result<(Service, ReadyFlag), RunError> {
        let failed = |source: ForwardError| RunError::Route {
            route: route.name.clone(),
            source,
        };
        // UDP carries no TLS: a --tls-* flag (or [route.tls]) on this route
        // is refused, as on a plain TCP route, rather than ignored.
        tls::settings::resolve(&route.listen, &route.target, &route.tls)
            .map_err(|e| failed(e.into()))?;
        let socket = match listener {
            Some(crate::forward::listener::Handle::Udp(socket)) => socket,
            // Another kind of socket at this identity cannot be: identities
            // of UDP listeners are their own.
            _ => crate::udp::route::bind(&route.listen)
                .await
                .map_err(failed)?,
        };
        let open = crate::udp::route::upstream(&route.target)
            .await
            .map_err(failed)?;
        let options = UdpOptions {
            idle_timeout: route.idle_timeout.unwrap_or(crate::duration::MAX),
            max_sessions: route.max_sessions as usize,
            drain_timeout: route.drain_timeout,
            once: route.listen.once,
        };
        let counters = UdpCounters {
            route: self.forward_metrics.route(&route.name),
            udp: self.udp_metrics.route(&route.name),
        };
        let bind_failed = |cause| {
            failed(ForwardError::Bind {
                addr: route.listen.text.clone(),
                resolved: "udp".to_string(),
                cause,
            })
        };
        let relay = UdpRelay::new(socket, open, options, counters).map_err(bind_failed)?;
        let local = relay
            .local_addr()
            .map(|a| format!("udp://{a}"))
            .map_err(bind_failed)?;
        let ready = self.registry.readiness().register("listener", &local);
        ready.set(true);
        tracing::info!(route = %route.name, upstream = %route.target.text, "listening on {local}");
        Ok((Service::Datagram(Box::new(relay)), ready))
    }
}

/// `error: cause: cause`, for log lines.
fn anyhow_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The observer a route asks for beside it (`forward --observe`): it
/// follows its target across restarts (a forwarder does not stop because
/// the container it watches did) and includes loopback, where a published
/// container port is reached.
fn route_observer(route: &RouteSpec) -> Option<ObserverSpec> {
    route.observe.clone().map(|target| ObserverSpec {
        observed: Observed::Target(target),
        session: SessionOptions {
            observe: ObserveOptions {
                loopback: true,
                ..ObserveOptions::default()
            },
            follow: true,
            watch: false,
            capture: route.capture.clone(),
        },
    })
}
