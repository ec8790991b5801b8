//! The supervisor: runs a [`Spec`] to its end. It binds every route's
//! listener and starts every observer before anything is served (a busy
//! port or a bad certificate fails the start, not the first connection),
//! serves `/metrics` for all of them, and owns the signals: SIGTERM or
//! SIGINT stops accepting everywhere and drains, a second one exits at
//! once, SIGHUP is logged (reloading a spec is not built yet).
//!
//! Not here: what a route or an observer does (`forward`, `observe`), or
//! where the spec came from (`config`, the command line).

use std::sync::Arc;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::{ObserverSpec, RouteSpec, Spec};
use crate::forward::metrics::ForwardMetrics;
use crate::forward::{ForwardError, Forwarder, RouteConfig};
use crate::metrics::{self, Metrics, MetricsError};
use crate::observe::session::{Session, SessionOptions};
use crate::observe::{ObserveError, ObserveOptions};
use crate::tls;

/// Why a run ended other than by a signal and a finished drain.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("route {route}")]
    Route {
        route: String,
        #[source]
        source: ForwardError,
    },
    #[error(transparent)]
    Observe(#[from] ObserveError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error("cannot install the {signal} handler: {source}")]
    Signal {
        signal: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} during drain: exiting at once")]
    SecondSignal(&'static str),
    #[error("an observer task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl RunError {
    /// Errors in what the user asked for (a TLS file, a namespace that does
    /// not exist), as opposed to failures of the running system.
    pub fn is_bad_input(&self) -> bool {
        match self {
            RunError::Route { source, .. } => source.is_bad_input(),
            RunError::Observe(e) => e.is_bad_input(),
            _ => false,
        }
    }
}

/// SIGTERM and SIGINT, as one stream of named signals. SIGHUP is caught
/// too, so that a closing terminal or a `kill -HUP` meant as "reload" does
/// not end the relay without a drain: it is logged and ignored until
/// reloading a spec is built.
pub struct Signals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl Signals {
    pub fn install() -> Result<Self, RunError> {
        let install = |kind: SignalKind, name: &'static str| {
            signal(kind).map_err(|source| RunError::Signal {
                signal: name,
                source,
            })
        };
        Ok(Signals {
            terminate: install(SignalKind::terminate(), "SIGTERM")?,
            interrupt: install(SignalKind::interrupt(), "SIGINT")?,
            hangup: install(SignalKind::hangup(), "SIGHUP")?,
        })
    }

    /// The next signal that stops the relay.
    pub async fn next(&mut self) -> &'static str {
        loop {
            tokio::select! {
                _ = self.terminate.recv() => return "SIGTERM",
                _ = self.interrupt.recv() => return "SIGINT",
                _ = self.hangup.recv() => tracing::warn!(
                    signal = "SIGHUP",
                    "ignored: reloading the configuration is not supported yet; stop relay with SIGTERM and start it again"
                ),
            }
        }
    }
}

/// Runs `spec` until its routes end by themselves (socat addresses
/// without `fork`), its observers end (a target gone, without follow), or
/// a signal stops it (after the drain).
pub async fn run(spec: Spec) -> Result<(), RunError> {
    // First, so that no signal meant for a drain ends the relay abruptly.
    let mut signals = Signals::install()?;
    let registry = Arc::new(Metrics::new());
    let forward_metrics = ForwardMetrics::register(registry.registry());

    // Everything is bound before anything is served.
    let mut forwarders = Vec::with_capacity(spec.routes.len());
    let mut observers = Vec::new();
    for route in spec.routes {
        let (forwarder, observer) = start_route(route, &registry, &forward_metrics).await?;
        forwarders.push(forwarder);
        observers.extend(observer);
    }
    observers.extend(spec.observers);
    let (stop_observers, observer_stop) = watch::channel(false);
    let mut sessions = JoinSet::new();
    for ObserverSpec { target, session } in observers {
        let session = Session::start(target, session, &registry).await?;
        sessions.spawn(session.run(observer_stop.clone()));
    }
    if let Some(addr) = spec.metrics {
        let listener = metrics::bind(addr).await?;
        tracing::info!(
            "metrics on http://{}/metrics",
            listener.local_addr().unwrap_or(addr)
        );
        tokio::spawn(metrics::serve(listener, registry.clone()));
    }

    let (drain_tx, drain_rx) = watch::channel(false);
    let has_routes = !forwarders.is_empty();
    let mut routes = JoinSet::new();
    let mut listening = Vec::with_capacity(forwarders.len());
    for (forwarder, ready) in forwarders {
        listening.push(ready);
        routes.spawn(forwarder.run(drain_rx.clone()));
    }

    // Until a signal: the routes ending by themselves ends the run (the
    // observers beside them stop too); an observer failing ends it with
    // its error; observers ending by themselves end an observe-only run.
    let signal = loop {
        tokio::select! {
            done = routes.join_next(), if has_routes => match done {
                Some(result) => result?,
                None => {
                    stop_observers.send_replace(true);
                    return finish_observers(&mut sessions).await;
                }
            },
            done = sessions.join_next(), if !sessions.is_empty() => {
                if let Some(result) = done {
                    result??;
                }
                if !has_routes && sessions.is_empty() {
                    return Ok(());
                }
            },
            signal = signals.next() => break signal,
        }
    };
    if has_routes {
        tracing::info!(
            signal,
            "stopping: no new connections; a second signal exits at once"
        );
    } else {
        tracing::info!(signal, "stopping: detaching");
    }
    // A draining relay accepts nothing more: orchestrators should stop sending.
    for ready in &listening {
        ready.set(false);
    }
    drain_tx.send_replace(true);
    tokio::select! {
        () = async { while routes.join_next().await.is_some() {} } => {}
        signal = signals.next() => return Err(RunError::SecondSignal(signal)),
    }
    stop_observers.send_replace(true);
    finish_observers(&mut sessions).await
}

/// Waits for every observer to detach; the first error is the run's.
async fn finish_observers(
    sessions: &mut JoinSet<Result<(), ObserveError>>,
) -> Result<(), RunError> {
    let mut first = Ok(());
    while let Some(result) = sessions.join_next().await {
        if let Err(e) = result
            .map_err(RunError::from)
            .and_then(|r| r.map_err(RunError::from))
            && first.is_ok()
        {
            first = Err(e);
        }
    }
    first
}

/// A bound route, its readiness flag, and the observer it asked for.
type Started = ((Forwarder, crate::health::ReadyFlag), Option<ObserverSpec>);

/// Loads a route's TLS material, binds its listener and marks it ready;
/// returns the observer to run beside it (`forward --observe`).
async fn start_route(
    route: RouteSpec,
    registry: &Arc<Metrics>,
    forward_metrics: &ForwardMetrics,
) -> Result<Started, RunError> {
    let RouteSpec {
        name,
        listen,
        target,
        connect_timeout,
        idle_timeout,
        max_connections,
        drain_timeout,
        data_path,
        experimental_sockmap: _,
        tls: tls_flags,
        handshake_timeout,
        observe,
        capture,
    } = route;
    let failed = |source: ForwardError| RunError::Route {
        route: name.clone(),
        source,
    };
    let (mut tls_server, mut tls_client) =
        tls::settings::resolve(&listen, &target, &tls_flags).map_err(|e| failed(e.into()))?;
    if let Some(keys) = capture.as_ref().and_then(|c| c.keys.clone()) {
        // --pcap-embed-keys: every key log line of either leg also goes into the capture.
        let legs = [
            tls_server.as_mut().map(|s| &mut s.common),
            tls_client.as_mut().map(|c| &mut c.common),
        ];
        let mut tls_legs = 0;
        for common in legs.into_iter().flatten() {
            let keys = keys.clone();
            let tee =
                tls::keylog::KeyLogTee::new(common.keylog.take(), move |line| keys.push(line));
            common.keylog = Some(Arc::new(tee));
            tls_legs += 1;
        }
        if tls_legs == 0 {
            return Err(failed(
                tls::TlsError::Config(
                    "--pcap-embed-keys needs a TLS listener or target (tls://... or OPENSSL:...)"
                        .into(),
                )
                .into(),
            ));
        }
    }
    let config = RouteConfig {
        listen,
        target,
        connect_timeout,
        idle_timeout,
        max_connections: max_connections.unwrap_or(crate::config::DEFAULT_MAX_CONNECTIONS) as usize,
        drain_timeout,
        tls_server,
        tls_client,
        handshake_timeout,
        data_path,
    };
    let upstream = config.target.text.clone();
    let forwarder = Forwarder::bind(config, forward_metrics.route(&name))
        .await
        .map_err(failed)?;
    let ready = registry
        .readiness()
        .register("listener", &forwarder.local_addr().to_string());
    ready.set(true);
    tracing::info!(route = %name, %upstream, "listening on {}", forwarder.local_addr());
    // The observer follows its target across restarts (a forwarder does not
    // stop because the container it watches did) and includes loopback,
    // where a published container port is reached.
    let observer = observe.map(|target| ObserverSpec {
        target,
        session: SessionOptions {
            observe: ObserveOptions {
                loopback: true,
                ..ObserveOptions::default()
            },
            follow: true,
            watch: false,
            capture,
        },
    });
    Ok(((forwarder, ready), observer))
}
