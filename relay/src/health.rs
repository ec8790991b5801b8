//! Readiness for orchestrators: the flags behind `/healthz`.
//!
//! Each part of a run that must be up before traffic or numbers are worth
//! anything (a bound listener, an attached observer) registers a
//! [`ReadyFlag`] and sets it as its state changes. The run is ready when
//! every registered flag is set. This module only keeps the flags; the HTTP
//! answer lives in [`crate::metrics`], and the parts decide what "ready"
//! means for themselves.
//!
//! Each flag is also the gauge `relay_ready{part,name}`, so an alert can
//! name the observer that detached while relay itself keeps running
//! (`--follow`), which `up` cannot see.

use std::sync::{Arc, Mutex};

use prometheus::{IntGauge, IntGaugeVec, Opts};

/// The readiness flags of one run.
pub struct Readiness {
    shared: Arc<Shared>,
}

/// What the run and every flag share: a flag can take itself out.
struct Shared {
    parts: Mutex<Vec<Arc<Part>>>,
    gauges: IntGaugeVec,
}

impl Shared {
    fn remove(&self, part: &Arc<Part>) {
        let mut parts = self.parts.lock().unwrap_or_else(|p| p.into_inner());
        parts.retain(|p| !Arc::ptr_eq(p, part));
        // Another part may carry the same labels (a changed route's
        // successor on the same address): keep the series for it.
        if !parts.iter().any(|p| p.labels == part.labels) {
            let [kind, name] = &part.labels;
            let _ = self.gauges.remove_label_values(&[kind, name]);
        }
    }
}

struct Part {
    /// `relay_ready`'s `part` and `name`.
    labels: [String; 2],
    /// 1 when ready; the gauge is the flag, so the two never disagree.
    ready: IntGauge,
}

/// One part's flag; starts not ready. Cloning shares the flag.
#[derive(Clone)]
pub struct ReadyFlag {
    part: Arc<Part>,
    shared: Arc<Shared>,
}

impl ReadyFlag {
    pub fn set(&self, ready: bool) {
        self.part.ready.set(i64::from(ready));
    }

    pub fn is_set(&self) -> bool {
        self.part.ready.get() == 1
    }

    /// Takes the part out of the run (a route removed, an observer
    /// stopped): it no longer holds `/healthz` back, and its
    /// `relay_ready` series goes unless another part carries its labels.
    pub fn retire(&self) {
        self.shared.remove(&self.part);
    }
}

/// What `/healthz` reports: ready, or the names of the parts not ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    Ready,
    Waiting(Vec<String>),
}

impl Default for Readiness {
    fn default() -> Self {
        Readiness {
            shared: Arc::new(Shared {
            parts: Mutex::new(Vec::new()),
            gauges: IntGaugeVec::new(
                Opts::new(
                    "relay_ready",
                    "1 while the part (a listener, an observer) is ready: bound, or attached; /healthz is 200 when all are.",
                ),
                &["part", "name"],
            )
            .expect("static metric definition is valid"),
            }),
        }
    }
}

impl Readiness {
    /// The `relay_ready` family, for the registry.
    pub fn collector(&self) -> Box<dyn prometheus::core::Collector> {
        Box::new(self.shared.gauges.clone())
    }

    /// Registers a part, e.g. `("listener", "127.0.0.1:8080")`, not ready yet.
    pub fn register(&self, part: &str, name: &str) -> ReadyFlag {
        let part = Arc::new(Part {
            labels: [part.to_string(), name.to_string()],
            ready: self.shared.gauges.with_label_values(&[part, name]),
        });
        part.ready.set(0);
        self.shared
            .parts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(part.clone());
        ReadyFlag {
            part,
            shared: self.shared.clone(),
        }
    }

    /// Ready when every registered part is; a run with no parts has nothing
    /// to wait for.
    pub fn report(&self) -> Report {
        let waiting: Vec<String> = self
            .shared
            .parts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|p| p.ready.get() != 1)
            .map(|p| p.labels.join(" "))
            .collect();
        if waiting.is_empty() {
            Report::Ready
        } else {
            Report::Waiting(waiting)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_while_every_part_is() {
        let readiness = Readiness::default();
        assert_eq!(readiness.report(), Report::Ready);
        let listener = readiness.register("listener", "127.0.0.1:8080");
        let observer = readiness.register("observer", "netns:blue");
        assert_eq!(
            readiness.report(),
            Report::Waiting(vec![
                "listener 127.0.0.1:8080".into(),
                "observer netns:blue".into()
            ])
        );
        listener.set(true);
        observer.clone().set(true);
        assert_eq!(readiness.report(), Report::Ready);
        // The observer's target went away: detached, not ready.
        observer.set(false);
        assert_eq!(
            readiness.report(),
            Report::Waiting(vec!["observer netns:blue".into()])
        );
        assert!(listener.is_set() && !observer.is_set());
        let gauge = |name: &str| {
            readiness
                .shared
                .gauges
                .with_label_values(&["observer", name])
                .get()
        };
        assert_eq!(gauge("netns:blue"), 0);
        observer.retire();
        assert_eq!(readiness.report(), Report::Ready);
    }
}
