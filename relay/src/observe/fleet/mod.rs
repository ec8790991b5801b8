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
//! Containers without a namespace of their own (host network, `none`,
//! another container's) are shown in the info series but not attached:
//! a host-network container's packets are the host's, counted once by an
//! observer of `host`.
//!
//! Not here: talking to the daemon (`discover::docker`), the programs and
//! their export (`observe`, `observe::export`).

mod metrics;
pub mod reconcile;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

pub use metrics::FleetMetrics;
use reconcile::{Action, Have, Want};

use super::discover::{self, Container, Network, Selection, Update};
use super::export::ObserveMetrics;
use super::{Chain, ObserveError, ObserveOptions, Observer};
use crate::health::ReadyFlag;
use crate::metrics::{Metrics, ScrapeHook};

/// Observed containers per fleet at most, unless configured.
pub const DEFAULT_MAX_CONTAINERS: usize = 256;

/// What `containers` observes, and through which daemon.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ContainersSpec {
    pub select: Selection,
    /// Attached at most; beyond it refused (and counted).
    pub max_containers: usize,
    /// The Docker daemon's API socket.
    pub docker_socket: PathBuf,
}

impl Default for ContainersSpec {
    fn default() -> Self {
        ContainersSpec {
            select: Selection::all(),
            max_containers: DEFAULT_MAX_CONTAINERS,
            docker_socket: PathBuf::from(discover::docker::DEFAULT_SOCKET),
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
    /// `/healthz`: set while discovery is connected.
    ready: ReadyFlag,
    _scrape: ScrapeHook,
}

/// An attach in flight: its result, for the container id and pid it was for.
type Attaching = JoinSet<(String, u32, Result<Arc<Observer>, ObserveError>)>;

impl Fleet {
    /// Registers the series and the scrape hook; discovery starts in
    /// [`Fleet::run`], and a daemon that does not answer is not an error.
    pub fn start(spec: ContainersSpec, options: ObserveOptions, registry: &Metrics) -> Self {
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
        let ready = registry.readiness().register("discovery", "docker");
        Fleet {
            spec,
            options,
            export,
            metrics,
            attached,
            ready,
            _scrape: scrape,
        }
    }

    /// Runs until `stop` turns true: discovery, reconciling after every
    /// update and every finished attach; at the end everything detaches.
    pub async fn run(self, mut stop: watch::Receiver<bool>) -> Result<(), ObserveError> {
        let (updates_tx, mut updates) = mpsc::channel(1024);
        let (stop_discovery, discovery_stopped) = watch::channel(false);
        let discovery = tokio::spawn(discover::docker::watch(
            self.spec.docker_socket.clone(),
            updates_tx,
            discovery_stopped,
        ));
        tracing::info!(select = %self.spec.select, max = self.spec.max_containers, "observing containers");
        let mut state = State::default();
        let mut attaching: Attaching = JoinSet::new();
        let mut discovery_ended = false;
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                update = updates.recv() => match update {
                    Some(update) => self.apply(&mut state, update),
                    None => discovery_ended = true,
                },
                Some(done) = attaching.join_next(), if !attaching.is_empty() => match done {
                    Ok((id, pid, result)) => self.attached_one(&mut state, id, pid, result),
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
        let _ = discovery.await;
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
        self.metrics.forget_source("docker");
        self.ready.retire();
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Attached>> {
        self.attached.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes one discovery update into the wanted set.
    fn apply(&self, state: &mut State, update: Update) {
        match update {
            Update::Up => self.metrics.set_up("docker", true),
            Update::Down(_) => {
                // Logged by discovery; what is attached stays until a
                // listing says otherwise.
                self.metrics.set_up("docker", false);
                self.ready.set(false);
            }
            Update::Listed(containers) => {
                state.wanted = containers
                    .into_iter()
                    .filter(|c| self.spec.select.matches(c))
                    .map(|c| (c.id.clone(), c))
                    .collect();
                self.metrics.set_up("docker", true);
                self.ready.set(true);
            }
            Update::Running { container, since } => {
                if let Some(since) = since {
                    state.started.insert(container.id.clone(), since);
                }
                if self.spec.select.matches(&container) {
                    state.wanted.insert(container.id.clone(), container);
                } else {
                    state.wanted.remove(&container.id);
                }
            }
            Update::Rewired(container) => {
                // Its interfaces changed: attach again to see the new set.
                let id = container.id.clone();
                let same = self
                    .lock()
                    .get(&id)
                    .is_some_and(|a| a.container.pid == container.pid);
                if same {
                    tracing::info!(container = %container.name, "a network was connected or disconnected: attaching again");
                    self.detach(&id);
                }
                if self.spec.select.matches(&container) {
                    state.wanted.insert(id, container);
                } else {
                    state.wanted.remove(&id);
                }
            }
            Update::Stopped(id) => {
                state.wanted.remove(&id);
                state.started.remove(&id);
            }
        }
    }

    /// Makes the attached set follow the wanted set.
    fn reconcile(&self, state: &mut State, attaching: &mut Attaching) {
        let wanted: BTreeMap<String, Want> = state
            .wanted
            .iter()
            // One that failed to attach is tried again when it restarts.
            .filter(|(id, c)| state.failed.get(*id) != Some(&c.pid))
            .map(|(id, c)| {
                (
                    id.clone(),
                    Want {
                        name: c.name.clone(),
                        pid: c.pid,
                        network: c.network.clone(),
                    },
                )
            })
            .collect();
        let mut have: BTreeMap<String, Have> = self
            .lock()
            .iter()
            .map(|(id, a)| {
                (
                    id.clone(),
                    Have {
                        name: a.container.name.clone(),
                        pid: a.container.pid,
                    },
                )
            })
            .collect();
        have.extend(state.pending.iter().map(|(id, h)| (id.clone(), h.clone())));
        for action in reconcile::plan(&wanted, &have, self.spec.max_containers) {
            match action {
                Action::Detach(id) => {
                    if state.pending.remove(&id).is_none() {
                        self.detach(&id);
                    }
                }
                Action::Rename { id, to } => self.rename(state, &id, &to),
                Action::Attach(id) => {
                    let Some(container) = state.wanted.get(&id) else {
                        continue;
                    };
                    state.refused.remove(&id);
                    state.pending.insert(
                        id.clone(),
                        Have {
                            name: container.name.clone(),
                            pid: container.pid,
                        },
                    );
                    let (container, options) = (container.clone(), self.options.clone());
                    attaching.spawn(async move {
                        let result = attach(&container, options).await;
                        (container.id, container.pid, result)
                    });
                }
                Action::Refuse(id) => {
                    if state.refused.insert(id.clone()) {
                        let name = state.wanted.get(&id).map_or("", |c| c.name.as_str());
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
        state.refused.retain(|id| state.wanted.contains_key(id));
        state
            .failed
            .retain(|id, pid| state.wanted.get(id).is_some_and(|c| c.pid == *pid));
        self.show_info(state);
    }

    /// The info series: every attached container, and every selected one
    /// whose traffic is counted elsewhere (host network and the like).
    fn show_info(&self, state: &mut State) {
        let mut desired: HashMap<String, Container> = self
            .lock()
            .iter()
            .map(|(id, a)| (id.clone(), a.container.clone()))
            .collect();
        for (id, container) in &state.wanted {
            if container.network != Network::Own {
                desired.insert(id.clone(), container.clone());
            }
        }
        state.shown.retain(|id, shown| {
            let keep = desired.get(id) == Some(shown);
            if !keep {
                self.metrics.hide(shown);
            }
            keep
        });
        for (id, container) in desired {
            if state.shown.contains_key(&id) {
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
            state.shown.insert(id, container);
        }
    }

    /// An attach finished: keep it if the container is still the one it
    /// was for, else drop it (which detaches it).
    fn attached_one(
        &self,
        state: &mut State,
        id: String,
        pid: u32,
        result: Result<Arc<Observer>, ObserveError>,
    ) {
        if state.pending.get(&id).is_none_or(|h| h.pid != pid) {
            return;
        }
        state.pending.remove(&id);
        let Some(container) = state.wanted.get(&id).filter(|c| c.pid == pid).cloned() else {
            return;
        };
        match result {
            Ok(observer) => {
                let name = container.name.clone();
                self.export
                    .attached(&name, &name, observer.interfaces(), true);
                let delay = state
                    .started
                    .remove(&id)
                    .and_then(|since| SystemTime::now().duration_since(since).ok());
                if let Some(delay) = delay {
                    self.metrics.attach_took(delay.as_secs_f64());
                }
                tracing::info!(container = %name, id = %short(&id), pid, since_start_ms = delay.map(|d| d.as_millis() as u64), "container attached");
                self.lock().insert(
                    id,
                    Attached {
                        container,
                        observer,
                    },
                );
            }
            Err(err) => {
                tracing::warn!(container = %container.name, error = %Chain(&err), "cannot observe the container; trying again when it restarts");
                self.metrics.refused("attach");
                state.failed.insert(id, pid);
            }
        }
    }

    /// Drops a container's programs and series.
    fn detach(&self, id: &str) {
        let Some(gone) = self.lock().remove(id) else {
            return;
        };
        let name = gone.container.name.as_str();
        self.export.forget(name, name, gone.observer.interfaces());
        tracing::info!(container = name, id = %short(id), "container detached: its programs and series are removed");
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

/// The fleet's bookkeeping between updates.
#[derive(Default)]
struct State {
    /// Selected running containers, by id.
    wanted: BTreeMap<String, Container>,
    /// Attaches in flight, by id.
    pending: BTreeMap<String, Have>,
    /// When the daemon said a container started, until it is attached.
    started: HashMap<String, SystemTime>,
    /// Refused for the cap (counted once each).
    refused: HashSet<String>,
    /// Failed to attach, with the pid it failed for.
    failed: HashMap<String, u32>,
    /// Info series shown, by id, with the labels they were shown with.
    shown: HashMap<String, Container>,
}

/// Loads and attaches the programs in `container`'s namespace, on a thread of its own.
async fn attach(
    container: &Container,
    options: ObserveOptions,
) -> Result<Arc<Observer>, ObserveError> {
    let netns = crate::netns::open_container(
        &container.name,
        &container.name,
        &container.id,
        container.pid,
    )?;
    let observer = tokio::task::spawn_blocking(move || Observer::attach(&netns, &options))
        .await
        .map_err(|source| ObserveError::Join {
            what: "attach",
            source,
        })??;
    Ok(Arc::new(observer))
}

/// Docker's 12-digit short id, for logs.
fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}
