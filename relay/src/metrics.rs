//! The Prometheus registry of the relay and the HTTP endpoint serving it.
//!
//! Names follow Prometheus conventions (`relay_` prefix, `_total` counters,
//! `_seconds` units). Labels stay bounded: a route name, an outcome from a
//! fixed set, a direction. Nothing here knows about sockets being relayed;
//! `forward` reports into a [`RouteMetrics`].
//!
//! The same HTTP server answers `/healthz` from the run's [`Readiness`]
//! (200 when every listener is bound and every observer attached, else 503),
//! so orchestrators need one port only.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use thiserror::Error;

use crate::health::{Readiness, Report};
use crate::tls::HandshakeOutcome;
use tokio::net::TcpListener;

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
}

impl Outcome {
    pub const ALL: [Outcome; 10] = [
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
    ];

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
        }
    }
}

/// Bucket bounds for upstream connect time: 50 us (loopback) to 10 s (timeout).
const CONNECT_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];
/// Bucket bounds for connection lifetime: 1 ms to 1 h.
const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

/// The relay's registry and metric families.
pub struct Metrics {
    registry: Registry,
    /// Run before every render: sources that are read at scrape time (the
    /// observer's kernel maps) bring their series up to date here.
    on_scrape: std::sync::Mutex<Vec<Box<dyn Fn() + Send + Sync>>>,
    readiness: Readiness,
    connections: IntCounterVec,
    active: IntGaugeVec,
    bytes: IntCounterVec,
    connect_duration: HistogramVec,
    connection_duration: HistogramVec,
    tls_handshakes: IntCounterVec,
    tls_duration: HistogramVec,
    data_path: IntGaugeVec,
}

/// The children of every family for one route, resolved once so the hot
/// path only does atomic adds.
#[derive(Clone)]
pub struct RouteMetrics {
    pub name: Arc<str>,
    outcomes: Arc<[IntCounter; 10]>,
    tls_handshakes: IntCounterVec,
    tls_duration: HistogramVec,
    data_path: IntGaugeVec,
    pub active: IntGauge,
    pub to_target: IntCounter,
    pub to_client: IntCounter,
    pub connect_duration: prometheus::Histogram,
    pub connection_duration: prometheus::Histogram,
}

/// Which end of a TLS handshake the relay was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsRole {
    /// The relay originated TLS to the target.
    Client,
    /// The relay terminated TLS from a client.
    Server,
}

impl TlsRole {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsRole::Client => "client",
            TlsRole::Server => "server",
        }
    }
}

impl RouteMetrics {
    /// Creates the handshake series of `role` at 0, for a route that uses it.
    pub fn init_tls(&self, role: TlsRole) {
        for outcome in HandshakeOutcome::ALL {
            self.tls_handshakes
                .with_label_values(&[&*self.name, role.as_str(), outcome.as_str()]);
        }
        self.tls_duration
            .with_label_values(&[&*self.name, role.as_str()]);
    }

    pub fn tls_handshake(&self, role: TlsRole, outcome: HandshakeOutcome, seconds: f64) {
        self.tls_handshakes
            .with_label_values(&[&*self.name, role.as_str(), outcome.as_str()])
            .inc();
        self.tls_duration
            .with_label_values(&[&*self.name, role.as_str()])
            .observe(seconds);
    }

    /// Marks `path` (one of `paths`) as the data path in use: 1 for it, 0
    /// for the others, so a dashboard sees a switch.
    pub fn set_data_path(&self, path: &str, paths: &[&str]) {
        for candidate in paths {
            self.data_path
                .with_label_values(&[&*self.name, candidate])
                .set(i64::from(*candidate == path));
        }
    }

    pub fn outcome(&self, outcome: Outcome) -> &IntCounter {
        let index = Outcome::ALL
            .iter()
            .position(|o| *o == outcome)
            .expect("Outcome::ALL lists every outcome");
        &self.outcomes[index]
    }
}

#[derive(Debug, Error)]
pub enum MetricsError {
    #[error("cannot serve metrics on {addr}: {cause}")]
    Bind {
        addr: SocketAddr,
        cause: std::io::Error,
    },
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let readiness = Readiness::default();
        let connections = IntCounterVec::new(
            Opts::new(
                "relay_connections_total",
                "Relayed connections by how they ended.",
            ),
            &["route", "outcome"],
        )
        .expect("static metric definition is valid");
        let active = IntGaugeVec::new(
            Opts::new("relay_active_connections", "Connections currently relayed."),
            &["route"],
        )
        .expect("static metric definition is valid");
        let bytes = IntCounterVec::new(
            Opts::new(
                "relay_bytes_total",
                "Bytes relayed, by direction (to_target or to_client).",
            ),
            &["route", "direction"],
        )
        .expect("static metric definition is valid");
        let connect_duration = HistogramVec::new(
            HistogramOpts::new(
                "relay_upstream_connect_duration_seconds",
                "Time to connect to the target.",
            )
            .buckets(CONNECT_BUCKETS.to_vec()),
            &["route"],
        )
        .expect("static metric definition is valid");
        let connection_duration = HistogramVec::new(
            HistogramOpts::new(
                "relay_connection_duration_seconds",
                "Lifetime of relayed connections.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["route"],
        )
        .expect("static metric definition is valid");
        let tls_handshakes = IntCounterVec::new(
            Opts::new(
                "relay_tls_handshakes_total",
                "TLS handshakes by role (client: to the target, server: from clients) and outcome.",
            ),
            &["route", "role", "outcome"],
        )
        .expect("static metric definition is valid");
        let tls_duration = HistogramVec::new(
            HistogramOpts::new(
                "relay_tls_handshake_duration_seconds",
                "Time TLS handshakes took, failed ones included.",
            )
            .buckets(CONNECT_BUCKETS.to_vec()),
            &["route", "role"],
        )
        .expect("static metric definition is valid");
        let data_path = IntGaugeVec::new(
            Opts::new(
                "relay_data_path",
                "1 for the data path plain TCP bytes take on the route (copy, splice or sockmap), 0 for the others.",
            ),
            &["route", "path"],
        )
        .expect("static metric definition is valid");
        let build_info = IntGaugeVec::new(
            Opts::new("relay_build_info", "Always 1; labels carry the build."),
            &["version"],
        )
        .expect("static metric definition is valid");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        for collector in [
            Box::new(connections.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(active.clone()),
            Box::new(bytes.clone()),
            Box::new(connect_duration.clone()),
            Box::new(connection_duration.clone()),
            Box::new(tls_handshakes.clone()),
            Box::new(tls_duration.clone()),
            Box::new(data_path.clone()),
            Box::new(build_info),
            readiness.collector(),
        ] {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        Metrics {
            registry,
            on_scrape: std::sync::Mutex::new(Vec::new()),
            readiness,
            connections,
            active,
            bytes,
            connect_duration,
            connection_duration,
            tls_handshakes,
            tls_duration,
            data_path,
        }
    }

    /// The metrics of one route; every outcome series exists from the start
    /// (at 0), so rates and alerts work before the first failure.
    pub fn route(&self, name: &str) -> RouteMetrics {
        RouteMetrics {
            name: Arc::from(name),
            outcomes: Arc::new(
                Outcome::ALL.map(|o| self.connections.with_label_values(&[name, o.as_str()])),
            ),
            tls_handshakes: self.tls_handshakes.clone(),
            tls_duration: self.tls_duration.clone(),
            data_path: self.data_path.clone(),
            active: self.active.with_label_values(&[name]),
            to_target: self.bytes.with_label_values(&[name, "to_target"]),
            to_client: self.bytes.with_label_values(&[name, "to_client"]),
            connect_duration: self.connect_duration.with_label_values(&[name]),
            connection_duration: self.connection_duration.with_label_values(&[name]),
        }
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

/// Parses `--metrics`: `addr:port`, `[v6]:port`, or a bare port, which binds
/// 127.0.0.1 (metrics are not published to the network unless asked).
pub fn parse_endpoint(text: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = text.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    text.parse().map_err(|_| {
        format!("`{text}` is not a metrics address; expected a port (9100) or addr:port (0.0.0.0:9100, [::1]:9100)")
    })
}

/// Binds the metrics endpoint; separate from [`serve`] so a busy port is an
/// error at startup, before any traffic is accepted.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(addr)
        .await
        .map_err(|cause| MetricsError::Bind { addr, cause })
}

/// Serves `GET /metrics` and `GET /healthz` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                tracing::warn!(error = %err, "metrics endpoint: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(respond(&metrics, &req)) }
            });
            if let Err(err) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %err, "metrics endpoint: connection error");
            }
        });
    }
}

fn respond(metrics: &Metrics, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    answer(metrics, req.method(), req.uri().path())
}

/// The response to `method path`; apart from hyper's request type so it
/// can be tested without a socket.
fn answer(metrics: &Metrics, method: &Method, path: &str) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (method, path) {
        (&Method::GET, "/metrics") => (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(),
        ),
        (&Method::GET, "/healthz") => match metrics.readiness.report() {
            Report::Ready => (StatusCode::OK, "text/plain", "ready\n".to_string()),
            Report::Waiting(parts) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {}\n", parts.join(", ")),
            ),
        },
        (&Method::GET, _) => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; try /metrics or /healthz\n".to_string(),
        ),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET\n".to_string(),
        ),
    };
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_endpoint_bare_port_stays_local() {
        assert_eq!(
            parse_endpoint("9100"),
            Ok(SocketAddr::from(([127, 0, 0, 1], 9100)))
        );
        assert_eq!(
            parse_endpoint("0.0.0.0:9100"),
            Ok(SocketAddr::from(([0, 0, 0, 0], 9100)))
        );
        assert!(parse_endpoint("[::1]:9100").is_ok());
        assert!(parse_endpoint("metrics").unwrap_err().contains("`metrics`"));
    }

    #[test]
    fn healthz_is_503_until_every_part_is_ready() {
        use http_body_util::BodyExt;
        let body = |response: Response<Full<Bytes>>| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("a current-thread runtime builds");
            let bytes = runtime
                .block_on(response.into_body().collect())
                .expect("a Full body cannot fail")
                .to_bytes();
            String::from_utf8(bytes.to_vec()).expect("healthz answers text")
        };
        let metrics = Metrics::new();
        let listener = metrics.readiness().register("listener", "127.0.0.1:8080");
        let observer = metrics.readiness().register("observer", "netns:blue");
        listener.set(true);
        let waiting = answer(&metrics, &Method::GET, "/healthz");
        assert_eq!(waiting.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body(waiting), "not ready: observer netns:blue\n");
        observer.set(true);
        let ready = answer(&metrics, &Method::GET, "/healthz");
        assert_eq!(ready.status(), StatusCode::OK);
        assert_eq!(body(ready), "ready\n");
        assert!(
            metrics
                .render()
                .contains("relay_ready{name=\"netns:blue\",part=\"observer\"} 1"),
            "{}",
            metrics.render()
        );
        assert_eq!(
            answer(&metrics, &Method::POST, "/healthz").status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
    }

    #[test]
    fn every_outcome_series_exists_before_traffic() {
        let metrics = Metrics::new();
        let route = metrics.route("web");
        route.to_target.inc_by(5);
        let text = metrics.render();
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
        assert!(text.contains("relay_build_info{version=\""), "{text}");
    }
}
