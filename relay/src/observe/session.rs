//! One `relay observe` (or `relay forward --observe`) run: resolve the
//! target, attach, export on every scrape, notice when the target's
//! namespace goes away (detach, drop its series) and, with `follow`,
//! attach again when a new one appears.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::capture::{CaptureError, CaptureOptions, CaptureRun};
use super::export::ObserveMetrics;
use super::{Chain, ObserveError, ObserveOptions, Observer, Snapshot};
use crate::health::ReadyFlag;
use crate::metrics::Metrics;
use crate::netns::{self, Netns, Target};

/// How often the target is checked for having gone (and, with follow, come back).
const CHECK_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct SessionOptions {
    pub observe: ObserveOptions,
    /// Re-attach when a namespace for the target appears again.
    pub follow: bool,
    /// Redraw a table on the terminal every second.
    pub watch: bool,
    /// Sample packets to pcapng (`--pcap`).
    pub capture: Option<CaptureOptions>,
}

/// The observer currently attached, shared with the scrape hook.
type Slot = Arc<Mutex<Option<Arc<Observer>>>>;

async fn attach(
    target: &Target,
    options: &ObserveOptions,
) -> Result<(Netns, Arc<Observer>), ObserveError> {
    let netns = netns::resolve(target).await?;
    let options = options.clone();
    // Attaching joins a thread inside the namespace: keep it off the workers.
    let (netns, observer) = tokio::task::spawn_blocking(move || {
        let observer = Observer::attach(&netns, &options);
        (netns, observer)
    })
    .await
    .map_err(|source| ObserveError::Join {
        what: "attach",
        source,
    })?;
    Ok((netns, Arc::new(observer?)))
}

/// Is the namespace still the target's? A daemon that cannot be asked
/// (dockerd restarting) is not taken as the target having gone.
async fn still_there(netns: &Netns) -> bool {
    netns.still_current().await.unwrap_or_else(|err| {
        tracing::debug!(error = %err, "cannot check the target; keeping the observer attached");
        true
    })
}

/// The `container` label: the observed container's name (as resolved,
/// also when it was given by id), empty for every other kind of target.
fn container_label<'a>(target: &Target, label: &'a str) -> &'a str {
    match target {
        Target::Container(_) => label,
        _ => "",
    }
}

/// Resolves when the capture (if any) failed to write; never without one.
async fn capture_failed(capture: &mut Option<CaptureRun>) -> Arc<CaptureError> {
    match capture {
        Some(run) => run.failed().await,
        None => std::future::pending().await,
    }
}

/// An observation that has attached once; [`Session::run`] keeps it going.
pub struct Session {
    target: Target,
    options: SessionOptions,
    export: Arc<ObserveMetrics>,
    slot: Slot,
    netns: Netns,
    observer: Arc<Observer>,
    capture: Option<CaptureRun>,
    /// `/healthz`: set while attached.
    ready: ReadyFlag,
    /// Reads the maps at scrape time while the session lives.
    _scrape: crate::metrics::ScrapeHook,
}

impl Session {
    /// Resolves and attaches, and registers the export on `metrics`. Errors
    /// here (no such target, no permission) are the caller's to report.
    pub async fn start(
        target: Target,
        options: SessionOptions,
        metrics: &Metrics,
    ) -> Result<Self, ObserveError> {
        let mut options = options;
        // The output is opened first: an unwritable path fails before attaching.
        let mut capture = match &options.capture {
            Some(c) => Some(CaptureRun::open(
                c,
                &target.to_string(),
                metrics.registry(),
            )?),
            None => None,
        };
        options.observe.capture = options.capture.as_ref().map(|c| c.kernel.clone());
        let (netns, observer) = attach(&target, &options.observe).await?;
        if let Some(run) = &mut capture {
            run.attach(&observer, &netns)?;
        }
        let export = metrics.shared(ObserveMetrics::register);
        let slot: Slot = Arc::new(Mutex::new(None));
        let (hook_slot, hook_export, hook_target, top) = (
            slot.clone(),
            export.clone(),
            target.clone(),
            options.observe.top_flows,
        );
        let scrape = metrics.on_scrape(move || {
            let current = hook_slot.lock().unwrap_or_else(|p| p.into_inner()).clone();
            if let Some(observer) = current {
                match observer.snapshot() {
                    Ok(snapshot) => hook_export.export(
                        observer.target(),
                        container_label(&hook_target, observer.target()),
                        observer.interfaces(),
                        &snapshot,
                        top,
                    ),
                    Err(err) => {
                        tracing::warn!(error = %Chain(&err), "cannot read the observer's maps")
                    }
                }
            }
        });
        export.attached(
            observer.target(),
            container_label(&target, observer.target()),
            observer.interfaces(),
            true,
        );
        *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(observer.clone());
        let ready = metrics
            .readiness()
            .register("observer", &target.to_string());
        ready.set(true);
        Ok(Session {
            capture,
            target,
            options,
            export,
            slot,
            netns,
            observer,
            ready,
            _scrape: scrape,
        })
    }

    /// The TLS key lines its capture embeds, if it embeds any.
    pub fn keys(&self) -> Option<Arc<super::capture::KeyLines>> {
        self.options.capture.as_ref().and_then(|c| c.keys.clone())
    }

    /// Runs until `stop` turns true, or the target goes away without `follow`.
    pub async fn run(self, mut stop: watch::Receiver<bool>) -> Result<(), ObserveError> {
        let Session {
            mut capture,
            target,
            options,
            export,
            slot,
            mut netns,
            observer,
            ready,
            _scrape,
        } = self;
        let mut current = Some(observer);
        let mut before = (Snapshot::default(), Instant::now());
        loop {
            if let Some(observer) = &current {
                export.attached(
                    observer.target(),
                    container_label(&target, observer.target()),
                    observer.interfaces(),
                    true,
                );
                *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(observer.clone());
            }
            tokio::select! {
                _ = tokio::time::sleep(CHECK_EVERY) => {}
                _ = stop.wait_for(|s| *s) => break,
                failed = capture_failed(&mut capture) => {
                    return Err(ObserveError::Capture(failed));
                }
            }
            if options.watch
                && let Some(observer) = &current
                && let Ok(now) = observer.snapshot()
            {
                let table = super::watch::render(
                    observer.target(),
                    observer.interfaces(),
                    &before.0,
                    &now,
                    before.1.elapsed(),
                    options.observe.top_flows,
                );
                if let Err(err) = super::watch::draw(&table) {
                    tracing::debug!(error = %err, "cannot draw the watch table");
                }
                before = (now, Instant::now());
            }
            match &current {
                Some(observer) if !still_there(&netns).await => {
                    tracing::warn!(observed = %observer.target(), "target stopped: detaching, its series are removed");
                    export.forget(
                        observer.target(),
                        container_label(&target, observer.target()),
                        observer.interfaces(),
                    );
                    *slot.lock().unwrap_or_else(|p| p.into_inner()) = None;
                    if let Some(run) = &mut capture {
                        run.detach().await?;
                    }
                    current = None;
                    ready.set(false);
                    if !options.follow {
                        return Err(ObserveError::TargetGone(target.to_string()));
                    }
                }
                Some(_) => {}
                None => match attach(&target, &options.observe).await {
                    Ok((new_netns, observer)) => {
                        tracing::info!(observed = %observer.target(), "target is back: attached again");
                        netns = new_netns;
                        if let Some(run) = &mut capture {
                            run.attach(&observer, &netns)?;
                        }
                        current = Some(observer);
                        ready.set(true);
                    }
                    Err(err) => tracing::debug!(error = %Chain(&err), "target not back yet"),
                },
            }
        }
        if let Some(run) = &mut capture {
            run.detach().await?;
        }
        if let Some(observer) = current {
            export.forget(
                observer.target(),
                container_label(&target, observer.target()),
                observer.interfaces(),
            );
        }
        *slot.lock().unwrap_or_else(|p| p.into_inner()) = None;
        // The session is over (stopped, or its target gone for good): it
        // no longer holds /healthz back, and a successor observing the
        // same target keeps its own flag.
        ready.retire();
        Ok(())
    }
}
