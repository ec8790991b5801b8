//! `relay observe containers`: one observer entry that becomes one
//! attachment per selected running container, following them as they come
//! and go.
//!
//! The fleet owns what is attached. Discovery ([`crate::observe::discover`])
//! says what runs; [`reconcile::plan`] turns "what should be observed"
//! against "what is" into attach, detach, rename and refuse actions, and
//! the fleet carries them out: attaching loads the programs in the
//! container's namespace on a thread of its own (several at once), a
//! detach drops them with the container's series. Series are labelled
//! with the container's name (`target` and `container`), so a restarted
//! container's series come back under the same name and a renamed one's
//! move to the new name; `relay_observe_container_info` says the rest.
//!
//! One attachment per network namespace: containers without a namespace
//! of their own (host network, `none`, another container's, the other
//! containers of a Kubernetes pod: told by Docker's network mode and by the
//! namespace's inode, [`reconcile::share_namespaces`]) are shown in the
//! info series but not attached: a host-network container's packets are
//! the host's, counted once by an observer of `host`.
//!
//! Sources: Docker, containerd, the kernel's namespaces, or `auto` (the
//! daemons that answer; the namespaces while none does). Each source's
//! containers are its own in the wanted set (a listing replaces only its
//! source's); readiness is "some source lists".
//!
//! Not here: talking to the daemons (`discover::docker`,
//! `discover::containerd`, `discover::netns`), the programs and their
//! export (`observe`, `observe::export`).

mod metrics;
pub mod reconcile;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

pub use metrics::FleetMetrics;
use reconcile::{Action, Have, Want};

use super::discover::{self, Container, Network, Selection, Source, Sources, Update, Updates};
use super::export::ObserveMetrics;
use super::watch as watch_table;
use super::{Chain, ObserveError, ObserveOptions, Observer, Snapshot};
use crate::health::ReadyFlag;
use crate::metrics::{Metrics, ScrapeHook};

/// How soon a namespace with only loopback is looked at again.
const LOOK_AGAIN: Duration = Duration::from_secs(1);
/// `--watch` redraws this often.
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// Observed containers per fleet at most, unless configured.
pub const DEFAULT_MAX_CONTAINERS: usize = 256;

/// What `containers` observes, and through which daemon.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ContainersSpec {
    pub select: Selection,
    /// Attached at most; beyond it refused (and counted).
    pub max_containers: usize,
    /// Which discovery sources are followed.
    pub source: Sources,
    /// The Docker daemon's API socket.
    pub docker_socket: PathBuf,
    /// containerd's API socket.
    pub containerd_socket: PathBuf,
    /// The containerd namespaces listed.
    pub containerd_namespaces: Vec<String>,
}

impl Default for ContainersSpec {
    fn default() -> Self {
        ContainersSpec {
            select: Selection::all(),
            max_containers: DEFAULT_MAX_CONTAINERS,
            source: Sources::default(),
            docker_socket: PathBuf::from(discover::docker::DEFAULT_SOCKET),
            containerd_socket: PathBuf::from(discover::containerd::DEFAULT_SOCKET),
            containerd_namespaces: discover::containerd::DEFAULT_NAMESPACES
                .iter()
                .map(|n| n.to_string())
                .collect(),
        }
    }
}

/// One attached container.
struct Attached {
    /// As discovery last described it (the name follows renames).
    container: Container,
    observer: Arc<Observer>,
}

/// What the scrape hook reads: every attached container.
type Shared = Arc<Mutex<BTreeMap<String, Attached>>>;

/// A running `containers` observer; [`Fleet::run`] does the work.
pub struct Fleet {
    spec: ContainersSpec,
    options: ObserveOptions,
    export: Arc<ObserveMetrics>,
    metrics: Arc<FleetMetrics>,
    attached: Shared,
    /// `/healthz`: set while some source lists.
    ready: ReadyFlag,
    /// This process's namespace: a container in it is on the host's network.
    host_netns: u64,
    /// `--watch`: draw every container's block on the terminal each second.
    watch: bool,
    _scrape: ScrapeHook,
}

/// An attach in flight: its result, for the key and instance it was for.
type Attaching = JoinSet<(String, (u32, u64), Result<Arc<Observer>, ObserveError>)>;

impl Fleet {
    /// Registers the series and the scrape hook; discovery starts in
    /// [`Fleet::run`], and a daemon that does not answer is not an error.
    pub fn start(
        spec: ContainersSpec,
        options: ObserveOptions,
        watch: bool,
        registry: &Metrics,
    ) -> Self {
        let export = registry.shared(ObserveMetrics::register);
        let metrics = registry.shared(FleetMetrics::register);
        let attached: Shared = Arc::new(Mutex::new(BTreeMap::new()));
        let (hook_attached, hook_export, top) =
            (attached.clone(), export.clone(), options.top_flows);
        let scrape = registry.on_scrape(move || {
            let attached = hook_attached.lock().unwrap_or_else(|p| p.into_inner());
            for one in attached.values() {
                let name = one.container.name.as_str();
                match one.observer.snapshot() {
                    Ok(snapshot) => {
                        hook_export.export(name, name, one.observer.interfaces(), &snapshot, top)
                    }
                    Err(err) => {
                        tracing::warn!(container = name, error = %Chain(&err), "cannot read the observer's maps")
                    }
                }
            }
        });
        let ready = registry
            .readiness()
            .register("discovery", spec.source.as_str());
        let host_netns = discover::netns::Host::own().map_or(0, |h| h.ino);
        Fleet {
            spec,
            options,
            export,
            metrics,
            attached,
            ready,
            host_netns,
            watch,
            _scrape: scrape,
        }
    }

    /// Runs until `stop` turns true: discovery, reconciling after every
    /// update and every finished attach; at the end everything detaches.
    pub async fn run(self, mut stop: watch::Receiver<bool>) -> Result<(), ObserveError> {
        let (updates_tx, mut updates) = mpsc::channel(1024);
        let (stop_discovery, discovery_stopped) = watch::channel(false);
        let mut discovery = JoinSet::new();
        for &source in self.spec.source.sources() {
            let (tx, stopped) = (
                Updates::new(source, updates_tx.clone()),
                discovery_stopped.clone(),
            );
            match source {
                Source::Docker => discovery.spawn(discover::docker::watch(
                    self.spec.docker_socket.clone(),
                    tx,
                    stopped,
                )),
                Source::Containerd => discovery.spawn(discover::containerd::watch(
                    self.spec.containerd_socket.clone(),
                    self.spec.containerd_namespaces.clone(),
                    tx,
                    stopped,
                )),
                Source::Netns => discovery.spawn(discover::netns::watch(tx, stopped)),
            };
        }
        drop(updates_tx);
        tracing::info!(select = %self.spec.select, max = self.spec.max_containers, source = %self.spec.source, "observing containers");
        let mut state = State::default();
        let mut attaching: Attaching = JoinSet::new();
        let mut discovery_ended = false;
        let mut redraw = tokio::time::interval(WATCH_EVERY);
        let mut drawn: (BTreeMap<String, Snapshot>, Instant) = (BTreeMap::new(), Instant::now());
        loop {
            let look_again = state.look_again.values().min().copied();
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                _ = tokio::time::sleep_until(look_again.unwrap_or_else(Instant::now)), if look_again.is_some() => {
                    let now = Instant::now();
                    let due: Vec<String> = state.look_again.iter().filter(|(_, at)| **at <= now).map(|(key, _)| key.clone()).collect();
                    for key in due {
                        state.look_again.remove(&key);
                        state.failed.remove(&key);
                    }
                }
                update = updates.recv() => match update {
                    Some((source, update)) => self.apply(&mut state, source, update),
                    None => discovery_ended = true,
                },
                _ = redraw.tick(), if self.watch => {
                    self.draw(&mut drawn);
                    continue;
                }
                Some(done) = attaching.join_next(), if !attaching.is_empty() => match done {
                    Ok((key, instance, result)) => self.attached_one(&mut state, key, instance, result),
                    Err(err) => tracing::error!(error = %err, "an attach task failed"),
                },
            }
            if discovery_ended {
                tracing::error!(
                    "container discovery ended unexpectedly; the observed containers stay as they are"
                );
                let _ = stop.wait_for(|s| *s).await;
                break;
            }
            self.reconcile(&mut state, &mut attaching);
        }
        stop_discovery.send_replace(true);
        while discovery.join_next().await.is_some() {}
        // Attaches in flight finish (a thread in a namespace cannot be
        // cancelled) and are dropped, which detaches them.
        while attaching.join_next().await.is_some() {}
        let ids: Vec<String> = self.lock().keys().cloned().collect();
        for id in ids {
            self.detach(&id);
        }
        for container in state.shown.values() {
            self.metrics.hide(container);
        }
        for source in self.spec.source.sources() {
            self.metrics.forget_source(source.as_str());
        }
        self.ready.retire();
        Ok(())
    }

    /// `--watch`: every attached container's block, rates since the last
    /// draw (`drawn`: the snapshots then, and when).
    fn draw(&self, drawn: &mut (BTreeMap<String, Snapshot>, Instant)) {
        let attached: Vec<(String, Arc<Observer>)> = self
            .lock()
            .values()
            .map(|one| (one.container.name.clone(), one.observer.clone()))
            .collect();
        let now: BTreeMap<String, Snapshot> = attached
            .iter()
            .filter_map(|(name, observer)| Some((name.clone(), observer.snapshot().ok()?)))
            .collect();
        let idle = Snapshot::default();
        let views: Vec<watch_table::View> = attached
            .iter()
            .filter_map(|(name, observer)| {
                Some(watch_table::View {
                    name,
                    interfaces: observer.interfaces(),
                    before: drawn.0.get(name).unwrap_or(&idle),
                    now: now.get(name)?,
                })
            })
            .collect();
        let table = watch_table::render_fleet(views, drawn.1.elapsed(), self.options.top_flows);
        if let Err(err) = watch_table::draw(&table) {
            tracing::debug!(error = %err, "cannot draw the watch table");
        }
        *drawn = (now, Instant::now());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Attached>> {
        self.attached.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes one discovery update from `source` into the wanted set.
    fn apply(&self, state: &mut State, source: Source, update: Update) {
        match update {
            Update::Up => {
                self.metrics.set_up(source.as_str(), true);
                state.up.insert(source, true);
            }
            Update::Down(_) => {
                // Logged by discovery; what is attached stays until a
                // listing says otherwise.
                self.metrics.set_up(source.as_str(), false);
                state.up.insert(source, false);
            }
            Update::Listed(containers) => {
                state.wanted.retain(|_, c| c.source != source);
                state.wanted.extend(
                    containers
                        .into_iter()
                        .filter(|c| self.spec.select.matches(c))
                        .map(|c| (c.key.clone(), c)),
                );
                self.metrics.set_up(source.as_str(), true);
                state.up.insert(source, true);
            }
            Update::Running { container, since } => {
                if let Some(since) = since {
                    state.started.insert(container.key.clone(), since);
                }
                if self.spec.select.matches(&container) {
                    state.wanted.insert(container.key.clone(), container);
                } else {
                    state.wanted.remove(&container.key);
                }
            }
            Update::Rewired(container) => {
                // Its interfaces changed: attach again to see the new set.
                let key = container.key.clone();
                let same = self
                    .lock()
                    .get(&key)
                    .is_some_and(|a| a.container.instance() == container.instance());
                if same {
                    tracing::info!(container = %container.name, "a network was connected or disconnected: attaching again");
                    self.detach(&key);
                }
                if self.spec.select.matches(&container) {
                    state.wanted.insert(key, container);
                } else {
                    state.wanted.remove(&key);
                }
            }
            Update::Stopped(key) => {
                state.wanted.remove(&key);
                state.started.remove(&key);
            }
        }
        self.ready.set(state.up.values().any(|up| *up));
    }

    /// What is observed now: every source's selected containers (the
    /// kernel's namespaces only while no daemon answers, under `auto`),
    /// one per namespace.
    fn effective(&self, state: &State) -> BTreeMap<String, Container> {
        let daemon_up = state.up.iter().any(|(s, up)| s.is_daemon() && *up);
        let mut merged: BTreeMap<String, Container> = state
            .wanted
            .iter()
            .filter(|(_, c)| c.source.is_daemon() || !daemon_up)
            .map(|(k, c)| (k.clone(), c.clone()))
            .collect();
        reconcile::share_namespaces(&mut merged, self.host_netns);
        merged
    }

    /// Makes the attached set follow the wanted set.
    fn reconcile(&self, state: &mut State, attaching: &mut Attaching) {
        let effective = self.effective(state);
        let wanted: BTreeMap<String, Want> = effective
            .iter()
            // One that failed to attach is tried again when it restarts.
            .filter(|(key, c)| state.failed.get(*key) != Some(&c.instance()))
            .map(|(key, c)| {
                (
                    key.clone(),
                    Want {
                        name: c.name.clone(),
                        instance: c.instance(),
                        network: c.network.clone(),
                    },
                )
            })
            .collect();
        let mut have: BTreeMap<String, Have> = self
            .lock()
            .iter()
            .map(|(key, a)| {
                (
                    key.clone(),
                    Have {
                        name: a.container.name.clone(),
                        instance: a.container.instance(),
                    },
                )
            })
            .collect();
        have.extend(state.pending.iter().map(|(k, h)| (k.clone(), h.clone())));
        for action in reconcile::plan(&wanted, &have, self.spec.max_containers) {
            match action {
                Action::Detach(key) => {
                    if state.pending.remove(&key).is_none() {
                        self.detach(&key);
                    }
                }
                Action::Rename { id, to } => self.rename(state, &id, &to),
                Action::Attach(key) => {
                    let Some(container) = effective.get(&key) else {
                        continue;
                    };
                    state.refused.remove(&key);
                    state.pending.insert(
                        key.clone(),
                        Have {
                            name: container.name.clone(),
                            instance: container.instance(),
                        },
                    );
                    let (container, options) = (container.clone(), self.options.clone());
                    attaching.spawn(async move {
                        let result = attach(&container, options).await;
                        let instance = container.instance();
                        (container.key, instance, result)
                    });
                }
                Action::Refuse(key) => {
                    if state.refused.insert(key.clone()) {
                        let name = effective.get(&key).map_or("", |c| c.name.as_str());
                        tracing::warn!(
                            container = name,
                            max = self.spec.max_containers,
                            "not observed: max-containers reached (raise it, or narrow the selection)"
                        );
                        self.metrics.refused("limit");
                    }
                }
            }
        }
        state.refused.retain(|key| effective.contains_key(key));
        state
            .look_again
            .retain(|key, _| effective.contains_key(key));
        state
            .loopback_only
            .retain(|key| effective.contains_key(key));
        state.failed.retain(|key, instance| {
            effective
                .get(key)
                .is_some_and(|c| c.instance() == *instance)
        });
        self.show_info(state, &effective);
    }

    /// The info series: every attached container, and every selected one
    /// whose traffic is counted elsewhere (host network and the like).
    fn show_info(&self, state: &mut State, effective: &BTreeMap<String, Container>) {
        let mut desired: HashMap<String, Container> = self
            .lock()
            .iter()
            .map(|(key, a)| (key.clone(), a.container.clone()))
            .collect();
        for (key, container) in effective {
            if container.network != Network::Own {
                desired.insert(key.clone(), container.clone());
            }
        }
        state.shown.retain(|key, shown| {
            let keep = desired.get(key) == Some(shown);
            if !keep {
                self.metrics.hide(shown);
            }
            keep
        });
        for (key, container) in desired {
            if state.shown.contains_key(&key) {
                continue;
            }
            match container.network {
                Network::Host => {
                    tracing::info!(container = %container.name, "uses the host's network: not attached separately, its traffic is counted as the host's (observe target host)")
                }
                Network::None => {
                    tracing::info!(container = %container.name, "has no network (NetworkMode none): nothing to attach to")
                }
                Network::Shared => {
                    tracing::info!(container = %container.name, "shares another container's network namespace: counted with that container")
                }
                Network::Own => {}
            }
            self.metrics.show(&container);
            state.shown.insert(key, container);
        }
    }

    /// An attach finished: keep it if the container is still the one it
    /// was for, else drop it (which detaches it).
    fn attached_one(
        &self,
        state: &mut State,
        key: String,
        instance: (u32, u64),
        result: Result<Arc<Observer>, ObserveError>,
    ) {
        if state
            .pending
            .get(&key)
            .is_none_or(|h| h.instance != instance)
        {
            return;
        }
        state.pending.remove(&key);
        let Some(container) = state
            .wanted
            .get(&key)
            .filter(|c| c.instance() == instance)
            .cloned()
        else {
            return;
        };
        match result {
            Ok(observer) => {
                let name = container.name.clone();
                self.export
                    .attached(&name, &name, observer.interfaces(), true);
                let delay = state
                    .started
                    .remove(&key)
                    .and_then(|since| SystemTime::now().duration_since(since).ok());
                if let Some(delay) = delay {
                    self.metrics.attach_took(delay.as_secs_f64());
                }
                tracing::info!(container = %name, id = %short(&container.id), source = %container.source, pid = container.pid, since_start_ms = delay.map(|d| d.as_millis() as u64), "container attached");
                self.lock().insert(
                    key,
                    Attached {
                        container,
                        observer,
                    },
                );
            }
            Err(ObserveError::NothingToObserve) => {
                // A namespace is often made before its interfaces are
                // moved in (`ip netns add`, CNI): looked at again.
                if state.loopback_only.insert(key.clone()) {
                    tracing::info!(container = %container.name, "has only loopback: nothing to observe yet; looking again every second");
                }
                state.failed.insert(key.clone(), instance);
                state.look_again.insert(key, Instant::now() + LOOK_AGAIN);
            }
            Err(err) => {
                tracing::warn!(container = %container.name, error = %Chain(&err), "cannot observe the container; trying again when it restarts");
                self.metrics.refused("attach");
                state.failed.insert(key, instance);
            }
        }
    }

    /// Drops a container's programs and series.
    fn detach(&self, key: &str) {
        let Some(gone) = self.lock().remove(key) else {
            return;
        };
        let name = gone.container.name.as_str();
        self.export.forget(name, name, gone.observer.interfaces());
        tracing::info!(container = name, id = %short(&gone.container.id), "container detached: its programs and series are removed");
    }

    /// Same namespace, new name: the series move over (counted from the
    /// kernel's totals, so the new name's counters start where the
    /// programs are, not at zero).
    fn rename(&self, state: &mut State, id: &str, to: &str) {
        if let Some(pending) = state.pending.get_mut(id) {
            pending.name = to.to_string();
        }
        let mut attached = self.lock();
        let Some(one) = attached.get_mut(id) else {
            return;
        };
        let from = std::mem::replace(&mut one.container.name, to.to_string());
        self.export.forget(&from, &from, one.observer.interfaces());
        self.export
            .attached(to, to, one.observer.interfaces(), true);
        if let Some(container) = state.wanted.get(id) {
            one.container = container.clone();
        }
        tracing::info!(from = %from, to, "container renamed: its series carry the new name");
    }
}

/// The fleet's bookkeeping between updates; every map is by key.
#[derive(Default)]
struct State {
    /// Selected running containers of every source.
    wanted: BTreeMap<String, Container>,
    /// Which sources list now.
    up: BTreeMap<Source, bool>,
    /// Attaches in flight.
    pending: BTreeMap<String, Have>,
    /// When the daemon said a container started, until it is attached.
    started: HashMap<String, SystemTime>,
    /// Refused for the cap (counted once each).
    refused: HashSet<String>,
    /// Failed to attach, with the instance it failed for.
    failed: HashMap<String, (u32, u64)>,
    /// Failed for having only loopback: when to try again.
    look_again: HashMap<String, Instant>,
    /// Said to have only loopback (logged once).
    loopback_only: HashSet<String>,
    /// Info series shown, with the labels they were shown with.
    shown: HashMap<String, Container>,
}

/// Loads and attaches the programs in `container`'s namespace, on a thread of its own.
async fn attach(
    container: &Container,
    options: ObserveOptions,
) -> Result<Arc<Observer>, ObserveError> {
    let netns = match &container.ns_path {
        Some(path) => crate::netns::open_path(&container.name, path)?,
        None => crate::netns::open_container(
            &container.name,
            &container.name,
            &container.id,
            container.pid,
        )?,
    };
    let observer = tokio::task::spawn_blocking(move || Observer::attach(&netns, &options))
        .await
        .map_err(|source| ObserveError::Join {
            what: "attach",
            source,
        })??;
    Ok(Arc::new(observer))
}

/// Docker's and containerd's 12-digit short id, for logs (other ids whole).
fn short(id: &str) -> &str {
    match id.get(..12) {
        Some(short) if id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()) => short,
        _ => id,
    }
}
