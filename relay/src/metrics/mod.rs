//! The relay's Prometheus registry, and the HTTP endpoint serving it.
//!
//! Names follow Prometheus conventions (`relay_` prefix, `_total` counters,
//! `_seconds` units). Labels stay bounded. This module owns what every run
//! has (the registry, `relay_build_info`, readiness as `relay_ready`) and
//! the endpoint ([`endpoint`]: `/metrics`, `/healthz`, their limits). The
//! families of a job live with the job and register themselves into
//! [`Metrics::registry`]: forwarding's in
//! [`forward::metrics`](crate::forward::metrics), observe's in
//! `observe::export`.

mod endpoint;

use std::sync::{Arc, Mutex};

use prometheus::{Encoder, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::health::Readiness;
pub use endpoint::{
    EndpointLimits, EndpointOutcome, MetricsError, adopt, bind, parse_endpoint, serve,
    serve_connection, serve_with,
};

type Hooks = Vec<(u64, Box<dyn Fn() + Send + Sync>)>;

/// A refresh registered by [`Metrics::on_scrape`]; dropping it removes it
/// (an observer detached by a reload stops being read at scrape time).
#[must_use = "the hook is removed when this is dropped"]
pub struct ScrapeHook {
    id: u64,
    hooks: std::sync::Weak<Mutex<Hooks>>,
}

impl Drop for ScrapeHook {
    fn drop(&mut self) {
        if let Some(hooks) = self.hooks.upgrade() {
            hooks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|(id, _)| *id != self.id);
        }
    }
}

/// The relay's registry, with the series every run has.
pub struct Metrics {
    registry: Registry,
    /// Run before every render: sources that are read at scrape time (the
    /// observer's kernel maps) bring their series up to date here. Each
    /// under the id its [`ScrapeHook`] removes it by.
    on_scrape: Arc<Mutex<Hooks>>,
    readiness: Readiness,
    endpoint: endpoint::EndpointMetrics,
    /// Families a job registers once per registry however many of its
    /// parts run (every observer shares the observe families), by type.
    shared: Mutex<Vec<Arc<dyn std::any::Any + Send + Sync>>>,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let readiness = Readiness::default();
        let build_info = IntGaugeVec::new(
            Opts::new("relay_build_info", "Always 1; labels carry the build."),
            &["version"],
        )
        .expect("static metric definition is valid");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        for collector in [
            Box::new(build_info) as Box<dyn prometheus::core::Collector>,
            readiness.collector(),
        ] {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        let endpoint = endpoint::EndpointMetrics::register(&registry);
        Metrics {
            registry,
            on_scrape: Arc::new(Mutex::new(Vec::new())),
            readiness,
            endpoint,
            shared: Mutex::new(Vec::new()),
        }
    }

    /// The one `T` of this registry, registered by `register` the first
    /// time it is asked for: families are registered once per registry, so
    /// every part of a job (each observer of a spec) shares them.
    pub fn shared<T: Send + Sync + 'static>(
        &self,
        register: impl FnOnce(&Registry) -> T,
    ) -> Arc<T> {
        let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(found) = shared.iter().find_map(|s| s.clone().downcast::<T>().ok()) {
            return found;
        }
        let made = Arc::new(register(&self.registry));
        shared.push(made.clone());
        made
    }

    /// The registry, for families kept by other modules.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The readiness flags `/healthz` answers from; listeners and observers
    /// register theirs here.
    pub fn readiness(&self) -> &Readiness {
        &self.readiness
    }

    /// Runs `refresh` before every render, until the returned hook is dropped.
    pub fn on_scrape(&self, refresh: impl Fn() + Send + Sync + 'static) -> ScrapeHook {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.on_scrape
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((id, Box::new(refresh)));
        ScrapeHook {
            id,
            hooks: Arc::downgrade(&self.on_scrape),
        }
    }

    /// How many scrape-time refreshes are registered.
    #[cfg(test)]
    fn scrape_hooks(&self) -> usize {
        self.on_scrape
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// The registry in Prometheus text exposition format.
    pub fn render(&self) -> String {
        for refresh in self
            .on_scrape
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            refresh.1();
        }
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encoding into a Vec cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_run_shows_its_build_and_endpoint() {
        let text = Metrics::new().render();
        for series in [
            "relay_build_info{version=\"",
            "relay_metrics_connections_total{outcome=\"evicted\"} 0",
            "relay_metrics_active_connections 0",
        ] {
            assert!(text.contains(series), "missing {series} in\n{text}");
        }
    }

    #[test]
    fn a_scrape_hook_runs_at_every_render_until_dropped() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let metrics = Metrics::new();
        let runs = Arc::new(AtomicUsize::new(0));
        let counted = runs.clone();
        let hook = metrics.on_scrape(move || {
            counted.fetch_add(1, Ordering::Relaxed);
        });
        let other = metrics.on_scrape(|| {});
        metrics.render();
        metrics.render();
        assert_eq!(runs.load(Ordering::Relaxed), 2);
        drop(hook);
        metrics.render();
        assert_eq!(runs.load(Ordering::Relaxed), 2, "a dropped hook still ran");
        assert_eq!(metrics.scrape_hooks(), 1, "only the dropped hook goes");
        drop(other);
        assert_eq!(metrics.scrape_hooks(), 0);
    }
}
