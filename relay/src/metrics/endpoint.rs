//! The HTTP endpoint serving the registry: `/metrics` in the Prometheus text
//! format and `/healthz` from the run's [`Readiness`](crate::health::Readiness)
//! (200 when every listener is bound and every observer attached, else 503),
//! so orchestrators need one port only.
//!
//! The endpoint may face the network (`--metrics 0.0.0.0:9100`) without
//! authentication, so no client of it may starve the forwarder: it holds at
//! most [`EndpointLimits::max_connections`] connections (the descriptors
//! `limits` keeps aside for it), a connection has
//! [`EndpointLimits::header_read_timeout`] to send its request head, and none
//! lives longer than [`EndpointLimits::max_connection_age`]. Nor may clients
//! that never ask keep scrapers out: at the cap, a new connection replaces
//! the oldest one still without a request.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use thiserror::Error;
use tokio::net::TcpListener;

use super::Metrics;
use crate::health::Report;

/// How a connection to the metrics endpoint ended; the `outcome` label of
/// `relay_metrics_connections_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointOutcome {
    /// Answered (or the client left without asking), closed without error.
    Closed,
    /// Closed before its request head was in, to make room for a newer
    /// connection at the cap.
    Evicted,
    /// Closed at once: the endpoint was at its cap and every connection was
    /// answering a request.
    Refused,
    /// No complete request head within the header-read timeout.
    HeaderTimeout,
    /// Still open at the maximum connection age (a client that does not read
    /// its response, or sends a request body forever).
    MaxAge,
    /// A malformed request or an I/O error (a reset from the client).
    Error,
}

impl EndpointOutcome {
    pub const ALL: [EndpointOutcome; 6] = [
        EndpointOutcome::Closed,
        EndpointOutcome::Evicted,
        EndpointOutcome::Refused,
        EndpointOutcome::HeaderTimeout,
        EndpointOutcome::MaxAge,
        EndpointOutcome::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EndpointOutcome::Closed => "closed",
            EndpointOutcome::Evicted => "evicted",
            EndpointOutcome::Refused => "refused",
            EndpointOutcome::HeaderTimeout => "header_timeout",
            EndpointOutcome::MaxAge => "max_age",
            EndpointOutcome::Error => "error",
        }
    }
}

/// What one metrics connection may cost the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointLimits {
    /// Connections held at once. The next one is accepted and then either
    /// takes the slot of the oldest connection still without a request, or
    /// is closed; either way it leaves the listen backlog (a full backlog
    /// would make every scraper time out rather than fail fast).
    pub max_connections: usize,
    /// Time to send a whole request head. Prometheus sends its request at
    /// once; a client that trickles (slowloris) is cut off here.
    pub header_read_timeout: Duration,
    /// Bound on a connection's whole life, response included.
    pub max_connection_age: Duration,
}

impl EndpointLimits {
    /// The limits `relay` runs with; `limits` reserves descriptors for
    /// `max_connections + 1` of them.
    ///
    /// Keep-alive is off: each connection carries one request, so a
    /// connection holds a descriptor for at most one header timeout plus one
    /// response, never for the idle time between scrapes. A scrape every 15 s
    /// loses nothing measurable by opening a fresh connection.
    pub const DEFAULT: EndpointLimits = EndpointLimits {
        max_connections: 64,
        header_read_timeout: Duration::from_secs(5),
        // Prometheus gives up on a scrape after 10 s by default.
        max_connection_age: Duration::from_secs(30),
    };
}

impl Default for EndpointLimits {
    fn default() -> Self {
        Self::DEFAULT
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

/// The endpoint's own series: how its connections ended, how many are open.
pub(super) struct EndpointMetrics {
    connections: IntCounterVec,
    active: IntGauge,
}

impl EndpointMetrics {
    pub(super) fn register(registry: &Registry) -> Self {
        let connections = IntCounterVec::new(
            Opts::new(
                "relay_metrics_connections_total",
                "Connections to the metrics endpoint by how they ended (evicted: closed without a request to make room at the cap; refused: closed at once, every slot answering).",
            ),
            &["outcome"],
        )
        .expect("static metric definition is valid");
        for outcome in EndpointOutcome::ALL {
            connections.with_label_values(&[outcome.as_str()]);
        }
        let active = IntGauge::new(
            "relay_metrics_active_connections",
            "Connections the metrics endpoint holds open, this scrape's included.",
        )
        .expect("static metric definition is valid");
        for collector in [
            Box::new(connections.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(active.clone()),
        ] {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        EndpointMetrics {
            connections,
            active,
        }
    }

    /// Counts a metrics endpoint connection that ended with `outcome`.
    fn ended(&self, outcome: EndpointOutcome) {
        self.connections
            .with_label_values(&[outcome.as_str()])
            .inc();
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

/// Like [`bind`], on a socket bound already (handed over by the relay this
/// one replaces, for `addr`).
pub fn adopt(
    addr: SocketAddr,
    listener: std::net::TcpListener,
) -> Result<TcpListener, MetricsError> {
    listener
        .set_nonblocking(true)
        .and_then(|()| TcpListener::from_std(listener))
        .map_err(|cause| MetricsError::Bind { addr, cause })
}

/// Serves `/metrics` and `/healthz` (GET and HEAD) on `listener` with
/// [`EndpointLimits::DEFAULT`] until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    serve_with(listener, metrics, EndpointLimits::DEFAULT).await
}

/// [`serve`] under `limits`.
///
/// At the cap, a new connection takes the slot of the oldest one that has
/// not finished its request head yet (it is closed and counted `evicted`):
/// a scraper sends its request at once, so a flood of clients that never
/// ask cannot keep it out. Only when every slot is busy answering is the
/// new connection closed at once (`refused`).
pub async fn serve_with(listener: TcpListener, metrics: Arc<Metrics>, limits: EndpointLimits) {
    let table = Arc::new(std::sync::Mutex::new(
        Table::<tokio::task::JoinHandle<()>>::new(limits.max_connections),
    ));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                tracing::warn!(error = %err, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let room = lock(&table).make_room();
        match room {
            Room::Free => {}
            Room::Evict(oldest) => {
                oldest.abort();
                // Waiting for the aborted task closes its descriptor before
                // the new connection is served: the endpoint never holds
                // more than the cap (plus the one just accepted).
                let _ = oldest.await;
                metrics.endpoint.ended(EndpointOutcome::Evicted);
            }
            Room::Full => {
                // Closing at once frees the descriptor and the backlog entry.
                drop(stream);
                metrics.endpoint.ended(EndpointOutcome::Refused);
                tracing::debug!(
                    max_connections = limits.max_connections,
                    "metrics endpoint: connection refused, every slot is answering a request"
                );
                continue;
            }
        }
        let asked = Arc::new(AtomicBool::new(false));
        // Held across the spawn so the task cannot look for its entry
        // before the entry exists.
        let mut open = lock(&table);
        let id = open.next_id();
        let task = tokio::spawn({
            let (metrics, table, asked) = (metrics.clone(), table.clone(), asked.clone());
            async move {
                let outcome = serve_connection(stream, &metrics, &asked, limits).await;
                let mut open = lock(&table);
                // An entry already gone was evicted, and counted as such.
                if open.remove(id) {
                    metrics.endpoint.active.set(open.len() as i64);
                    metrics.endpoint.ended(outcome);
                }
            }
        });
        open.insert(id, asked, task);
        metrics.endpoint.active.set(open.len() as i64);
    }
}

fn lock<T>(table: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The table stays consistent through a panic: every change is one call.
    table.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the endpoint can do with one more connection.
#[derive(Debug, PartialEq, Eq)]
enum Room<T> {
    /// Under the cap.
    Free,
    /// At the cap; this entry, the oldest still without a request, was
    /// taken out of the table and must be closed.
    Evict(T),
    /// At the cap and every connection is answering a request.
    Full,
}

/// The metrics connections open now, oldest first; `T` is what closes one
/// (a task handle).
struct Table<T> {
    cap: usize,
    last_id: u64,
    open: std::collections::VecDeque<(u64, Arc<AtomicBool>, T)>,
}

impl<T> Table<T> {
    fn new(cap: usize) -> Self {
        Table {
            cap: cap.max(1),
            last_id: 0,
            open: std::collections::VecDeque::new(),
        }
    }

    fn next_id(&mut self) -> u64 {
        self.last_id += 1;
        self.last_id
    }

    fn len(&self) -> usize {
        self.open.len()
    }

    /// Makes room for one more connection if it can.
    fn make_room(&mut self) -> Room<T> {
        if self.open.len() < self.cap {
            return Room::Free;
        }
        let idle = self
            .open
            .iter()
            .position(|(_, asked, _)| !asked.load(Ordering::Acquire));
        match idle.and_then(|index| self.open.remove(index)) {
            Some((_, _, handle)) => Room::Evict(handle),
            None => Room::Full,
        }
    }

    fn insert(&mut self, id: u64, asked: Arc<AtomicBool>, handle: T) {
        self.open.push_back((id, asked, handle));
    }

    /// Takes connection `id` out; false if it was no longer there (evicted).
    fn remove(&mut self, id: u64) -> bool {
        match self.open.iter().position(|(open, _, _)| *open == id) {
            Some(index) => self.open.remove(index).is_some(),
            None => false,
        }
    }
}

/// One HTTP connection under `limits`; the stream is closed on return.
/// `asked` turns true once the request head is in (the connection is then
/// busy answering and no longer evicted). Any byte stream will do, so the
/// fuzz target (fuzz/fuzz_targets/metrics_http.rs) drives the very code a
/// socket does.
pub async fn serve_connection<S>(
    stream: S,
    metrics: &Arc<Metrics>,
    asked: &Arc<AtomicBool>,
    limits: EndpointLimits,
) -> EndpointOutcome
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (for_service, asked) = (metrics.clone(), asked.clone());
    let service = hyper::service::service_fn(move |req| {
        asked.store(true, Ordering::Release);
        let metrics = for_service.clone();
        async move { Ok::<_, Infallible>(respond(&metrics, &req)) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service);
    match tokio::time::timeout(limits.max_connection_age, connection).await {
        Ok(Ok(())) => EndpointOutcome::Closed,
        Ok(Err(err)) if err.is_timeout() => EndpointOutcome::HeaderTimeout,
        Ok(Err(err)) => {
            tracing::debug!(error = %err, "metrics endpoint: connection error");
            EndpointOutcome::Error
        }
        Err(_) => EndpointOutcome::MaxAge,
    }
}

fn respond(metrics: &Metrics, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    answer(metrics, req.method(), req.uri().path())
}

/// The response to `method path`; apart from hyper's request type so it
/// can be tested without a socket.
///
/// HEAD gets GET's whole response: hyper sends its head (Content-Length
/// included, as HEAD requires) and leaves the body out.
fn answer(metrics: &Metrics, method: &Method, path: &str) -> Response<Full<Bytes>> {
    if method != Method::GET && method != Method::HEAD {
        return Response::builder()
            .status(StatusCode::METHOD_NOT_ALLOWED)
            .header(hyper::header::CONTENT_TYPE, "text/plain")
            .header(hyper::header::ALLOW, "GET, HEAD")
            .body(Full::new(Bytes::from_static(b"only GET and HEAD\n")))
            .expect("static response parts are valid");
    }
    let (status, content_type, body) = match path {
        "/metrics" => (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(),
        ),
        "/healthz" => match metrics.readiness().report() {
            Report::Ready => (StatusCode::OK, "text/plain", "ready\n".to_string()),
            Report::Waiting(parts) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {}\n", parts.join(", ")),
            ),
        },
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; try /metrics or /healthz\n".to_string(),
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
    use tokio::net::TcpStream;

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
    fn head_answers_like_get() {
        let metrics = Metrics::new();
        for path in ["/metrics", "/healthz", "/nope"] {
            let get = answer(&metrics, &Method::GET, path);
            let head = answer(&metrics, &Method::HEAD, path);
            assert_eq!(head.status(), get.status(), "HEAD {path}");
            assert_eq!(head.headers(), get.headers(), "HEAD {path}");
        }
        let post = answer(&metrics, &Method::POST, "/metrics");
        assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(post.headers()[hyper::header::ALLOW], "GET, HEAD");
    }

    #[test]
    fn at_the_cap_the_oldest_connection_without_a_request_makes_room() {
        let mut table = Table::new(3);
        let flags: Vec<Arc<AtomicBool>> =
            (0..3).map(|_| Arc::new(AtomicBool::new(false))).collect();
        for (name, asked) in ["first", "second", "third"].into_iter().zip(&flags) {
            assert_eq!(table.make_room(), Room::Free);
            let id = table.next_id();
            table.insert(id, asked.clone(), name);
        }
        flags[0].store(true, Ordering::Release);
        assert_eq!(
            table.make_room(),
            Room::Evict("second"),
            "the first is answering; the second is the oldest still silent"
        );
        let id = table.next_id();
        table.insert(id, Arc::new(AtomicBool::new(true)), "fourth");
        assert_eq!(table.make_room(), Room::Evict("third"));
        let id = table.next_id();
        table.insert(id, Arc::new(AtomicBool::new(true)), "fifth");
        assert_eq!(table.make_room(), Room::Full, "every slot is answering");
        assert!(table.remove(1), "the first ends on its own");
        assert!(!table.remove(2), "the second was evicted already");
        assert_eq!(table.len(), 2);
        assert_eq!(table.make_room(), Room::Free);
    }

    /// Slow clients that never finish a request head give way to a scraper
    /// at the cap, and are cut off at the header timeout.
    #[tokio::test]
    async fn endpoint_serves_a_scraper_past_a_cap_of_slow_clients() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio::time::{Instant, timeout};

        let limits = EndpointLimits {
            max_connections: 2,
            header_read_timeout: Duration::from_millis(300),
            max_connection_age: Duration::from_secs(5),
        };
        let metrics = Arc::new(Metrics::new());
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("binding 127.0.0.1:0 works");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let server = tokio::spawn(serve_with(listener, metrics.clone(), limits));

        /// Reads until EOF or a reset; returns how long that took.
        async fn closed_after(stream: &mut TcpStream) -> Duration {
            let started = Instant::now();
            let mut buf = [0u8; 512];
            loop {
                match timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
                    Ok(Ok(0) | Err(_)) => return started.elapsed(),
                    Ok(Ok(_)) => continue,
                    Err(_) => panic!("expected the endpoint to close the connection within 5 s"),
                }
            }
        }
        async fn slow_client(addr: SocketAddr) -> TcpStream {
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            stream.write_all(b"GET /metr").await.expect("write");
            stream
        }

        let mut oldest = slow_client(addr).await;
        let mut newer = slow_client(addr).await;
        while metrics.endpoint.active.get() < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut scraper = TcpStream::connect(addr).await.expect("connect");
        scraper
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let evicted_after = closed_after(&mut oldest).await;
        assert!(
            evicted_after < limits.header_read_timeout,
            "expected the oldest slow client closed at once for the scraper, it took {evicted_after:?}"
        );
        let mut response = String::new();
        timeout(
            Duration::from_secs(5),
            scraper.read_to_string(&mut response),
        )
        .await
        .expect("the endpoint answers and closes (no keep-alive) within 5 s")
        .expect("the response is UTF-8");
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        for series in [
            "relay_metrics_connections_total{outcome=\"evicted\"} 1",
            "relay_metrics_active_connections 2",
        ] {
            assert!(response.contains(series), "missing {series} in\n{response}");
        }
        let timed_out_after = closed_after(&mut newer).await;
        assert!(
            timed_out_after < limits.header_read_timeout * 3,
            "expected the slow head cut off near {:?}, it took {timed_out_after:?}",
            limits.header_read_timeout
        );
        assert!(
            metrics
                .render()
                .contains("relay_metrics_connections_total{outcome=\"header_timeout\"} 1"),
            "{}",
            metrics.render()
        );
        server.abort();
    }
}
