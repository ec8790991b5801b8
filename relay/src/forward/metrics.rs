//! The forwarder's metric series: what happened to relayed connections, per
//! route.
//!
//! [`ForwardMetrics`] holds the families, registered once into the shared
//! registry (as `observe::export` registers observe's); [`RouteMetrics`] is
//! one route's children, resolved when the route starts so the hot path only
//! does atomic adds. A route that goes away takes its series with it
//! ([`RouteMetrics::remove`]): a scrape shows the routes that exist, not
//! every route the process ever had.
//!
//! Labels stay bounded: the route name, an [`Outcome`] from a fixed set, a
//! direction, a TLS role and outcome, a data path.
//!
//! ```
//! use relay::forward::metrics::{ForwardMetrics, Outcome};
//! let registry = prometheus::Registry::new();
//! let forwarding = ForwardMetrics::register(&registry);
//! let web = forwarding.route("web");
//! web.outcome(Outcome::Closed).inc();
//! web.remove();
//! assert!(registry.gather().is_empty(), "no route, no series");
//! ```

use std::sync::{Arc, OnceLock};

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use super::DataPath;
use crate::tls::HandshakeOutcome;

/// How a relayed connection ended; the `outcome` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Both sides finished with FIN.
    Closed,
    /// The target refused the connection.
    Refused,
    /// The target did not answer within the connect timeout.
    ConnectTimeout,
    /// The target could not be reached otherwise (name resolution, unreachable).
    ConnectError,
    /// One side reset; the relay reset the other.
    Reset,
    /// No bytes either way for the idle timeout.
    IdleTimeout,
    /// Still open when the drain timeout after SIGTERM ran out.
    Drained,
    /// Accepting paused because --max-connections were open (counted per pause).
    Limit,
    /// A TLS handshake on either leg failed.
    TlsError,
    /// The target's namespace is gone (its container stopped).
    NamespaceUnavailable,
    /// The client is outside the listener's `range=`: closed before
    /// connecting to the target.
    Denied,
}

impl Outcome {
    pub const ALL: [Outcome; 11] = [
        Outcome::Closed,
        Outcome::Refused,
        Outcome::ConnectTimeout,
        Outcome::ConnectError,
        Outcome::Reset,
        Outcome::IdleTimeout,
        Outcome::Drained,
        Outcome::Limit,
        Outcome::TlsError,
        Outcome::NamespaceUnavailable,
        Outcome::Denied,
    ];

    /// The connection never reached its target (socat's exit status 1 for
    /// an address without `fork`).
    pub fn unreached(self) -> bool {
        matches!(
            self,
            Outcome::Refused
                | Outcome::ConnectTimeout
                | Outcome::ConnectError
                | Outcome::TlsError
                | Outcome::NamespaceUnavailable
                | Outcome::Denied
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Closed => "closed",
            Outcome::Refused => "refused",
            Outcome::ConnectTimeout => "connect_timeout",
            Outcome::ConnectError => "connect_error",
            Outcome::Reset => "reset",
            Outcome::IdleTimeout => "idle_timeout",
            Outcome::Drained => "drained",
            Outcome::Limit => "limit",
            Outcome::TlsError => "tls_error",
            Outcome::NamespaceUnavailable => "namespace_unavailable",
            Outcome::Denied => "denied",
        }
    }
}

/// Which end of a TLS handshake the relay was; the `role` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsRole {
    /// The relay originated TLS to the target.
    Client,
    /// The relay terminated TLS from a client.
    Server,
}

impl TlsRole {
    pub const ALL: [TlsRole; 2] = [TlsRole::Client, TlsRole::Server];

    pub fn as_str(self) -> &'static str {
        match self {
            TlsRole::Client => "client",
            TlsRole::Server => "server",
        }
    }

    fn index(self) -> usize {
        match self {
            TlsRole::Client => 0,
            TlsRole::Server => 1,
        }
    }
}

/// The two directions of `relay_bytes_total`.
const DIRECTIONS: [&str; 2] = ["to_target", "to_client"];

/// Bucket bounds for upstream connect time: 50 us (loopback) to 10 s (timeout).
const CONNECT_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];
/// Bucket bounds for connection lifetime: 1 ms to 1 h.
const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

/// The forwarding metric families, registered once per registry and shared
/// by every route (cloning shares the families).
#[derive(Clone)]
pub struct ForwardMetrics {
    connections: IntCounterVec,
    active: IntGaugeVec,
    bytes: IntCounterVec,
    connect_duration: HistogramVec,
    connection_duration: HistogramVec,
    tls_handshakes: IntCounterVec,
    tls_duration: HistogramVec,
    data_path: IntGaugeVec,
    children: IntCounterVec,
    connect_retries: IntCounterVec,
}

/// How an EXEC/SYSTEM child ended; the `exit` label.
pub const CHILD_EXITS: [&str; 4] = ["success", "failure", "signal", "killed"];

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("static metric definition is valid")
}

fn gauge(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).expect("static metric definition is valid")
}

fn histogram(name: &str, help: &str, buckets: &[f64], labels: &[&str]) -> HistogramVec {
    HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
    .expect("static metric definition is valid")
}

impl ForwardMetrics {
    /// Creates the families and registers them into `registry`. Call it once
    /// per registry: a second call would register the same names twice.
    pub fn register(registry: &Registry) -> Self {
        let metrics = ForwardMetrics {
            connections: counter(
                "relay_connections_total",
                "Relayed connections by how they ended.",
                &["route", "outcome"],
            ),
            active: gauge(
                "relay_active_connections",
                "Connections currently relayed.",
                &["route"],
            ),
            bytes: counter(
                "relay_bytes_total",
                "Bytes relayed, by direction (to_target or to_client).",
                &["route", "direction"],
            ),
            connect_duration: histogram(
                "relay_upstream_connect_duration_seconds",
                "Time to connect to the target.",
                CONNECT_BUCKETS,
                &["route"],
            ),
            connection_duration: histogram(
                "relay_connection_duration_seconds",
                "Lifetime of relayed connections.",
                DURATION_BUCKETS,
                &["route"],
            ),
            tls_handshakes: counter(
                "relay_tls_handshakes_total",
                "TLS handshakes by role (client: to the target, server: from clients) and outcome.",
                &["route", "role", "outcome"],
            ),
            tls_duration: histogram(
                "relay_tls_handshake_duration_seconds",
                "Time TLS handshakes took, failed ones included.",
                CONNECT_BUCKETS,
                &["route", "role"],
            ),
            data_path: gauge(
                "relay_data_path",
                "1 for the data path plain (not TLS) bytes take on the route (copy, splice or sockmap), 0 for the others.",
                &["route", "path"],
            ),
            children: counter(
                "relay_exec_children_total",
                "EXEC/SYSTEM children by how they ended (success: exit 0; failure: another exit status; signal: killed by a signal not from relay; killed: relay ended it after the connection closed).",
                &["route", "exit"],
            ),
            connect_retries: counter(
                "relay_upstream_connect_retries_total",
                "Connect attempts to the target repeated after a failure (socat's retry=/forever).",
                &["route"],
            ),
        };
        for collector in [
            Box::new(metrics.connections.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(metrics.active.clone()),
            Box::new(metrics.bytes.clone()),
            Box::new(metrics.connect_duration.clone()),
            Box::new(metrics.connection_duration.clone()),
            Box::new(metrics.tls_handshakes.clone()),
            Box::new(metrics.tls_duration.clone()),
            Box::new(metrics.data_path.clone()),
            Box::new(metrics.children.clone()),
            Box::new(metrics.connect_retries.clone()),
        ] {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        metrics
    }

    /// The metrics of one route; every outcome series exists from the start
    /// (at 0), so rates and alerts work before the first failure.
    pub fn route(&self, name: &str) -> RouteMetrics {
        RouteMetrics {
            name: Arc::from(name),
            families: self.clone(),
            outcomes: Arc::new(
                Outcome::ALL.map(|o| self.connections.with_label_values(&[name, o.as_str()])),
            ),
            tls: Arc::new([OnceLock::new(), OnceLock::new()]),
            data_path: Arc::new(OnceLock::new()),
            active: self.active.with_label_values(&[name]),
            to_target: self.bytes.with_label_values(&[name, DIRECTIONS[0]]),
            to_client: self.bytes.with_label_values(&[name, DIRECTIONS[1]]),
            connect_duration: self.connect_duration.with_label_values(&[name]),
            connection_duration: self.connection_duration.with_label_values(&[name]),
            connect_retries: self.connect_retries.with_label_values(&[name]),
        }
    }

    /// Removes every series labelled `route="name"`: all outcomes,
    /// directions, histograms, TLS roles and data paths. Series the route
    /// never had are skipped.
    pub fn remove_route(&self, name: &str) {
        // `remove_label_values` fails only for a series that is not there,
        // which is what removing wants.
        for outcome in Outcome::ALL {
            let _ = self
                .connections
                .remove_label_values(&[name, outcome.as_str()]);
        }
        let _ = self.active.remove_label_values(&[name]);
        for direction in DIRECTIONS {
            let _ = self.bytes.remove_label_values(&[name, direction]);
        }
        let _ = self.connect_duration.remove_label_values(&[name]);
        let _ = self.connection_duration.remove_label_values(&[name]);
        let _ = self.connect_retries.remove_label_values(&[name]);
        for role in TlsRole::ALL {
            for outcome in HandshakeOutcome::ALL {
                let _ = self.tls_handshakes.remove_label_values(&[
                    name,
                    role.as_str(),
                    outcome.as_str(),
                ]);
            }
            let _ = self
                .tls_duration
                .remove_label_values(&[name, role.as_str()]);
        }
        for path in DataPath::CONCRETE {
            let _ = self.data_path.remove_label_values(&[name, path.as_str()]);
        }
        for exit in CHILD_EXITS {
            let _ = self.children.remove_label_values(&[name, exit]);
        }
    }
}

/// One role's handshake series of a route.
struct TlsSeries {
    outcomes: [IntCounter; HandshakeOutcome::ALL.len()],
    duration: Histogram,
}

/// The children of every family for one route, resolved once so the hot
/// path only does atomic adds. Clones share the children.
///
/// After [`RouteMetrics::remove`], a clone still held by a connection that
/// is finishing counts into children no scrape shows, and never brings the
/// route's series back.
#[derive(Clone)]
pub struct RouteMetrics {
    pub name: Arc<str>,
    families: ForwardMetrics,
    outcomes: Arc<[IntCounter; Outcome::ALL.len()]>,
    /// Per [`TlsRole::index`]; set by [`RouteMetrics::init_tls`] for the
    /// roles the route plays.
    tls: Arc<[OnceLock<TlsSeries>; TlsRole::ALL.len()]>,
    /// Per [`DataPath::CONCRETE`]; set by [`RouteMetrics::set_data_path`].
    data_path: Arc<OnceLock<[IntGauge; DataPath::CONCRETE.len()]>>,
    pub active: IntGauge,
    pub to_target: IntCounter,
    pub to_client: IntCounter,
    pub connect_duration: Histogram,
    pub connection_duration: Histogram,
    pub connect_retries: IntCounter,
}

impl RouteMetrics {
    /// Creates the handshake series of `role` at 0, for a route that uses it.
    pub fn init_tls(&self, role: TlsRole) {
        self.tls_series(role);
    }

    fn tls_series(&self, role: TlsRole) -> &TlsSeries {
        self.tls[role.index()].get_or_init(|| TlsSeries {
            outcomes: HandshakeOutcome::ALL.map(|outcome| {
                self.families.tls_handshakes.with_label_values(&[
                    &*self.name,
                    role.as_str(),
                    outcome.as_str(),
                ])
            }),
            duration: self
                .families
                .tls_duration
                .with_label_values(&[&*self.name, role.as_str()]),
        })
    }

    pub fn tls_handshake(&self, role: TlsRole, outcome: HandshakeOutcome, seconds: f64) {
        let series = self.tls_series(role);
        let index = HandshakeOutcome::ALL
            .iter()
            .position(|o| *o == outcome)
            .expect("HandshakeOutcome::ALL lists every outcome");
        series.outcomes[index].inc();
        series.duration.observe(seconds);
    }

    /// Marks `path` as the data path in use: 1 for it, 0 for the other
    /// concrete paths, so a dashboard sees a switch.
    pub fn set_data_path(&self, path: DataPath) {
        let gauges = self.data_path.get_or_init(|| {
            DataPath::CONCRETE.map(|candidate| {
                self.families
                    .data_path
                    .with_label_values(&[&*self.name, candidate.as_str()])
            })
        });
        for (candidate, gauge) in DataPath::CONCRETE.iter().zip(gauges) {
            gauge.set(i64::from(*candidate == path));
        }
    }

    /// Counts an EXEC/SYSTEM child's end: one of [`CHILD_EXITS`].
    pub fn child_exit(&self, exit: &'static str) {
        debug_assert!(
            CHILD_EXITS.contains(&exit),
            "{exit} is not a child exit label"
        );
        self.families
            .children
            .with_label_values(&[&*self.name, exit])
            .inc();
    }

    pub fn outcome(&self, outcome: Outcome) -> &IntCounter {
        let index = Outcome::ALL
            .iter()
            .position(|o| *o == outcome)
            .expect("Outcome::ALL lists every outcome");
        &self.outcomes[index]
    }

    /// Removes the route's series from the registry
    /// ([`ForwardMetrics::remove_route`]).
    pub fn remove(&self) {
        self.families.remove_route(&self.name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::{Encoder, TextEncoder};

    fn render(registry: &Registry) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&registry.gather(), &mut out)
            .expect("encoding into a Vec cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }

    #[test]
    fn every_outcome_series_exists_before_traffic() {
        let registry = Registry::new();
        let route = ForwardMetrics::register(&registry).route("web");
        route.to_target.inc_by(5);
        let text = render(&registry);
        for outcome in Outcome::ALL {
            let series = format!(
                "relay_connections_total{{outcome=\"{}\",route=\"web\"}} 0",
                outcome.as_str()
            );
            assert!(text.contains(&series), "missing {series} in\n{text}");
        }
        assert!(
            text.contains("relay_bytes_total{direction=\"to_target\",route=\"web\"} 5"),
            "{text}"
        );
    }

    /// Every family a route can have a series in, each with a value.
    fn exercise(route: &RouteMetrics) {
        route.init_tls(TlsRole::Server);
        route.tls_handshake(TlsRole::Client, HandshakeOutcome::Expired, 0.01);
        route.set_data_path(DataPath::Splice);
        route.outcome(Outcome::Reset).inc();
        route.active.inc();
        route.to_target.inc_by(3);
        route.to_client.inc_by(4);
        route.connect_duration.observe(0.001);
        route.connection_duration.observe(1.0);
    }

    #[test]
    fn a_removed_route_leaves_no_series_and_others_keep_theirs() {
        let registry = Registry::new();
        let forwarding = ForwardMetrics::register(&registry);
        let (web, db) = (forwarding.route("web"), forwarding.route("db"));
        exercise(&web);
        exercise(&db);
        let before = render(&registry);
        let db_lines: Vec<&str> = before
            .lines()
            .filter(|line| line.contains("route=\"db\""))
            .collect();
        let families = [
            "relay_connections_total{",
            "relay_active_connections{",
            "relay_bytes_total{",
            "relay_upstream_connect_duration_seconds_bucket{",
            "relay_connection_duration_seconds_count{",
            "relay_tls_handshakes_total{",
            "relay_tls_handshake_duration_seconds_sum{",
            "relay_data_path{",
        ];
        for family in families {
            assert!(
                before
                    .lines()
                    .any(|line| line.starts_with(family) && line.contains("route=\"web\"")),
                "expected a {family}..}} series for web before removal in\n{before}"
            );
        }

        web.remove();
        // A connection still finishing on the removed route keeps counting,
        // out of sight.
        exercise(&web);

        let after = render(&registry);
        let left: Vec<&str> = after
            .lines()
            .filter(|line| line.contains("route=\"web\""))
            .collect();
        assert!(left.is_empty(), "expected no web series, found {left:#?}");
        let db_after: Vec<&str> = after
            .lines()
            .filter(|line| line.contains("route=\"db\""))
            .collect();
        assert_eq!(db_after, db_lines, "db's series changed with web's removal");

        db.remove();
        assert!(
            registry.gather().is_empty(),
            "no route left, no series: {}",
            render(&registry)
        );

        let _again = forwarding.route("web");
        assert!(
            render(&registry)
                .contains("relay_connections_total{outcome=\"closed\",route=\"web\"} 0"),
            "a route added again under the name starts at 0"
        );
    }
}
