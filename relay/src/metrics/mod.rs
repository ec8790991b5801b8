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
    EndpointLimits, EndpointOutcome, MetricsError, adopt, bind, parse_endpoint, serve, serve_with,
};

/// The relay's registry, with the series every run has.
pub struct Metrics {
    registry: Registry,
    /// Run before every render: sources that are read at scrape time (the
    /// observer's kernel maps) bring their series up to date here.
    on_scrape: Mutex<Vec<Box<dyn Fn() + Send + Sync>>>,
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
            on_scrape: Mutex::new(Vec::new()),
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

    /// Runs `refresh` before every render.
    pub fn on_scrape(&self, refresh: impl Fn() + Send + Sync + 'static) {
        self.on_scrape
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Box::new(refresh));
    }

    /// The registry in Prometheus text exposition format.
    pub fn render(&self) -> String {
        for refresh in self
            .on_scrape
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            refresh();
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
}
