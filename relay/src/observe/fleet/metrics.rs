//! The fleet's own series: who the observed containers are
//! (`relay_observe_container_info`, one per container, to join on
//! `container` in PromQL so the per-packet series do not multiply by
//! labels), whether discovery works (`relay_observe_discovery_up`), what
//! the cap refused, and how long attaching took.

use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGaugeVec, Opts, Registry};

use crate::observe::discover::Container;

/// Compose's labels, as `docker compose` sets them.
const COMPOSE_PROJECT: &str = "com.docker.compose.project";
const COMPOSE_SERVICE: &str = "com.docker.compose.service";
/// The labels the CRI (containerd's, cri-dockerd) puts on a pod's containers.
const POD_NAME: &str = "io.kubernetes.pod.name";
const POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";

const INFO_LABELS: [&str; 9] = [
    "container",
    "id",
    "image",
    "compose_project",
    "compose_service",
    "pod",
    "namespace",
    "network",
    "source",
];

/// Registered once per registry; every fleet shares them.
pub struct FleetMetrics {
    info: IntGaugeVec,
    up: IntGaugeVec,
    refused: IntCounterVec,
    attach_seconds: Histogram,
}

impl FleetMetrics {
    pub fn register(registry: &Registry) -> Self {
        let metrics = FleetMetrics {
            info: IntGaugeVec::new(
                Opts::new(
                    "relay_observe_container_info",
                    "Always 1 per discovered container: its id, image, compose project and service, Kubernetes pod and namespace, network (own: observed in its own namespace; host: counted as the host; none/container: no namespace of its own, or another container's, as a pod's containers share their sandbox's) and the source that found it (docker, containerd, netns). Join on container.",
                ),
                &INFO_LABELS,
            )
            .expect("static metric definition is valid"),
            up: IntGaugeVec::new(
                Opts::new(
                    "relay_observe_discovery_up",
                    "1 while container discovery lists from its source (docker, containerd; netns: the kernel's namespaces, always), 0 while it retries.",
                ),
                &["source"],
            )
            .expect("static metric definition is valid"),
            refused: IntCounterVec::new(
                Opts::new(
                    "relay_observe_containers_refused_total",
                    "Containers selected but not observed (reason=limit: over max-containers; attach: the programs could not be attached), once per container start.",
                ),
                &["reason"],
            )
            .expect("static metric definition is valid"),
            attach_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "relay_observe_container_attach_seconds",
                    "From the daemon's start event to the container's programs attached.",
                )
                .buckets(vec![0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
            )
            .expect("static metric definition is valid"),
        };
        for reason in ["limit", "attach"] {
            metrics.refused.with_label_values(&[reason]);
        }
        for collector in [
            Box::new(metrics.info.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(metrics.up.clone()),
            Box::new(metrics.refused.clone()),
            Box::new(metrics.attach_seconds.clone()),
        ] {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        metrics
    }

    fn info_labels(container: &Container) -> [String; 9] {
        [
            container.name.clone(),
            container.id.clone(),
            container.image.clone(),
            container.label(COMPOSE_PROJECT).to_string(),
            container.label(COMPOSE_SERVICE).to_string(),
            container.label(POD_NAME).to_string(),
            container.label(POD_NAMESPACE).to_string(),
            container.network.as_str().to_string(),
            container.source.as_str().to_string(),
        ]
    }

    /// The container's info series (its labels as they are now).
    pub fn show(&self, container: &Container) {
        let labels = Self::info_labels(container);
        let refs: Vec<&str> = labels.iter().map(String::as_str).collect();
        self.info.with_label_values(&refs).set(1);
    }

    /// Takes the info series `show` made for `container` out.
    pub fn hide(&self, container: &Container) {
        let labels = Self::info_labels(container);
        let refs: Vec<&str> = labels.iter().map(String::as_str).collect();
        let _ = self.info.remove_label_values(&refs);
    }

    pub fn set_up(&self, source: &str, up: bool) {
        self.up.with_label_values(&[source]).set(i64::from(up));
    }

    pub fn forget_source(&self, source: &str) {
        let _ = self.up.remove_label_values(&[source]);
    }

    pub fn refused(&self, reason: &str) {
        self.refused.with_label_values(&[reason]).inc();
    }

    pub fn attach_took(&self, seconds: f64) {
        self.attach_seconds.observe(seconds);
    }
}
