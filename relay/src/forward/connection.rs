//! One relayed connection: the TLS handshakes, the connect to the target,
//! two pumps on the route's [`Engine`] (one per direction, see `pump`),
//! and the end, for a named reason, with its log line and outcome count.
//! How bytes move is the engines' (`copy`, `splice`, `sockmap`); when the
//! connection ends, and how, is decided here.
//!
//! The rules live here and nowhere else:
//! - half-close: EOF from one side becomes `shutdown(SHUT_WR)` on the other,
//!   and the other direction keeps flowing until it ends too; except that
//!   with a stdin/stdout side the socket side's EOF ends the connection
//!   (stdin may never end, and nothing is left to send its bytes to);
//! - half-close timeout (socat's `-t`): when the route has one, the first
//!   EOF starts it, and when it runs out the connection closes even if the
//!   other direction still runs (a reset if bytes are still in flight);
//! - one way (socat's `-u` / `-U`): one pump from the source, the
//!   destination's replies read and dropped; the connection ends once the
//!   source's EOF is passed on and the destination closes, or the
//!   half-close timeout (0.5 s by default) after it;
//! - gone: a write that finds its destination reading no more (EPIPE: a
//!   program that printed its output and exited) ends that direction only,
//!   and the other still delivers what the destination wrote before it went;
//! - reset: any other error on either side resets both (SO_LINGER 0), so a peer
//!   that was reset is seen as reset on the far side, not as a clean close;
//! - idle: no byte either way for the idle timeout closes both;
//! - drain: when the drain timeout after SIGTERM runs out, both are closed;
//! - a cut is never a clean end, so no peer takes a truncated transfer for
//!   a finished one: the drain timeout resets both sides (a connection
//!   still open then has at least one direction that never ended, and no
//!   moment of a paced transfer tells "done" from "between two writes");
//!   the idle timer resets them when bytes are still in flight (held by
//!   relay, or unread or unacknowledged in either socket: a target that
//!   stopped reading), and sends FINs when there are none;
//! - TLS: a leg's handshake comes first (bounded by the handshake timeout);
//!   a clean end sends close_notify, and a peer's EOF without close_notify
//!   is named in the log but ends its direction like any EOF.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::AsyncWrite;
use tokio::sync::watch;
use tokio::time::Instant;

use super::exec::Child;
use super::listener::Peer;
use super::pump::{Activity, Counters, Direction, Eof, Leg, LineEnds};
use super::stream::{Socket, Stream};
use super::upstream;
use super::{Engine, Flow, copy, sockmap, splice};
use super::{RouteContext, raised};
use crate::forward::metrics::Outcome;
use crate::forward::metrics::TlsRole;
use crate::tls::HandshakeOutcome;
use crate::tls::server::Refused;

/// Which end of the relayed connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Target,
}

impl Side {
    fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Target => "target",
        }
    }

    fn other(self) -> Side {
        match self {
            Side::Client => Side::Target,
            Side::Target => Side::Client,
        }
    }
}

/// How the relay phase ended, before it is reduced to an [`Outcome`].
#[derive(Debug)]
enum End {
    /// Both directions ended with EOF; `first` sent its FIN first;
    /// `unclean` is a TLS side whose EOF came without close_notify.
    Closed { first: Side, unclean: Option<Side> },
    /// An I/O error on `side` (a reset, a broken pipe).
    Failed { side: Side, error: io::Error },
    /// The idle timer fired; `cut`: bytes were still in flight.
    Idle { cut: bool },
    /// The half-close timeout (socat's `-t`) ran out after `first` closed;
    /// `cut`: bytes were still in flight.
    HalfClosed { first: Side, cut: bool },
    /// The drain timeout ran out (both sides are reset).
    Drained,
}

impl End {
    fn outcome(&self) -> Outcome {
        match self {
            End::Closed { .. } | End::HalfClosed { cut: false, .. } => Outcome::Closed,
            End::HalfClosed { cut: true, .. } => Outcome::Reset,
            End::Failed { .. } => Outcome::Reset,
            End::Idle { .. } => Outcome::IdleTimeout,
            End::Drained => Outcome::Drained,
        }
    }

    /// Records whether the idle timer's close cuts bytes in flight.
    fn with_in_flight(self, in_flight: impl FnOnce() -> bool) -> Self {
        match self {
            End::Idle { .. } => End::Idle { cut: in_flight() },
            End::HalfClosed { first, .. } => End::HalfClosed {
                first,
                cut: in_flight(),
            },
            end => end,
        }
    }

    /// Whether both sides are reset rather than sent a FIN.
    fn resets(&self) -> bool {
        matches!(
            self,
            End::Failed { .. }
                | End::Idle { cut: true }
                | End::HalfClosed { cut: true, .. }
                | End::Drained
        )
    }

    fn describe(&self) -> String {
        match self {
            End::Closed {
                first,
                unclean: None,
            } => format!("{} closed first", first.as_str()),
            End::Closed {
                first,
                unclean: Some(side),
            } => {
                format!(
                    "{} closed first; {} ended TLS without close_notify",
                    first.as_str(),
                    side.as_str()
                )
            }
            End::Failed { side, error } => format!("{} failed: {error}", side.as_str()),
            End::Idle { cut: false } => "idle timeout".to_string(),
            End::Idle { cut: true } => {
                "idle timeout with bytes still in flight: both sides reset".to_string()
            }
            End::Drained => "drain timeout after shutdown signal: both sides reset".to_string(),
            End::HalfClosed { first, cut: false } => format!(
                "{} closed first; the other direction ended by the half-close timeout (-t)",
                first.as_str()
            ),
            End::HalfClosed { first, cut: true } => format!(
                "{} closed first; the half-close timeout (-t) cut bytes still in flight: both sides reset",
                first.as_str()
            ),
        }
    }
}

/// An accepted client on its way to the target.
pub struct Connection {
    client: Socket,
    peer: Peer,
    route: Arc<RouteContext>,
    /// The program behind the client leg (EXEC as the first of two
    /// connect addresses), reaped with the connection.
    client_child: Option<Child>,
}

impl Connection {
    pub fn new(client: Socket, peer: Peer, route: Arc<RouteContext>) -> Self {
        Connection {
            client,
            peer,
            route,
            client_child: None,
        }
    }

    pub fn with_client_child(mut self, child: Option<Child>) -> Self {
        self.client_child = child;
        self
    }

    /// Runs the connection to its end, records its outcome and logs one line.
    /// `close` turns true when the drain timeout has run out.
    pub async fn run(self, mut close: watch::Receiver<bool>) -> Outcome {
        let Connection {
            client,
            peer,
            route,
            client_child,
        } = self;
        let metrics = &route.metrics;
        let started = Instant::now();
        metrics.active.inc();
        let _active = scopeguard(|| metrics.active.dec());
        if let Some(Err(err)) = client.tcp().map(|tcp| tcp.set_nodelay(true)) {
            tracing::debug!(route = %metrics.name, %peer, error = %err, "cannot set TCP_NODELAY on client");
        }
        let peer = &peer;

        let mut client = match &route.acceptor {
            None => Stream::Plain(client),
            Some(acceptor) => {
                match handshake(&route, TlsRole::Server, acceptor.accept(client)).await {
                    Ok(tls) => Stream::TlsServer(Box::new(tls)),
                    Err(reason) => {
                        return finish(
                            &route,
                            peer,
                            started,
                            &Transfer::default(),
                            Outcome::TlsError,
                            &reason,
                        );
                    }
                }
            }
        };

        let upstream = tokio::select! {
            result = upstream::connect(&route.target, route.namespace.as_ref(), route.connect_timeout, &metrics.connect_retries) => result,
            _ = raised(&mut close) => {
                // The client may have sent a request already: a FIN would
                // read as "served", a reset says it was not.
                client.socket().reset();
                return finish(&route, peer, started, &Transfer::default(), Outcome::Drained, "drained while connecting: client reset");
            }
        };
        let (upstream, child) = match upstream {
            Ok(connected) => {
                metrics
                    .connect_duration
                    .observe(started.elapsed().as_secs_f64());
                connected
            }
            Err(err) => {
                // The client learns at once that there is no target behind
                // the relay: a reset, as a direct connect would have given.
                client.socket().reset();
                return finish(
                    &route,
                    peer,
                    started,
                    &Transfer::default(),
                    err.outcome(),
                    &err.to_string(),
                );
            }
        };
        let mut upstream = match &route.connector {
            None => Stream::Plain(upstream),
            Some(connector) => {
                let connecting = async {
                    connector
                        .connect(upstream)
                        .await
                        .map_err(|e| Refused::of(&e))
                };
                match handshake(&route, TlsRole::Client, connecting).await {
                    Ok(tls) => Stream::TlsClient(Box::new(tls)),
                    Err(reason) => {
                        client.socket().reset();
                        return finish(
                            &route,
                            peer,
                            started,
                            &Transfer::default(),
                            Outcome::TlsError,
                            &reason,
                        );
                    }
                }
            }
        };

        let transfer = Transfer::default();
        let activity = Activity::new();
        let end = relay(
            &mut client,
            &mut upstream,
            &route,
            &transfer,
            &activity,
            &mut close,
        )
        .await
        .with_in_flight(|| {
            activity.holding() || client.has_bytes_in_flight() || upstream.has_bytes_in_flight()
        });
        if end.resets() {
            client.socket().reset();
            upstream.socket().reset();
        }
        let outcome = finish(
            &route,
            peer,
            started,
            &transfer,
            end.outcome(),
            &end.describe(),
        );
        // An EXEC child's stdin and stdout close with relay's end of the
        // pair: that is its EOF, and then it has its moment to exit.
        drop((client, upstream));
        for child in [client_child, child].into_iter().flatten() {
            reap(&route, peer, child).await;
        }
        outcome
    }
}

/// Waits for (and if need be ends) a connection's EXEC child; logs and
/// counts how it ended.
async fn reap(route: &RouteContext, peer: &Peer, child: Child) {
    let (pid, program) = (child.pid(), child.program().to_string());
    let exit = child.finish().await;
    route.metrics.child_exit(exit.label);
    tracing::info!(route = %route.metrics.name, %peer, pid, program, status = %exit.status,
        exit = exit.label, "child exited");
}

/// Bytes moved by one connection, per direction, for its close log line.
#[derive(Default)]
struct Transfer {
    to_target: AtomicU64,
    to_client: AtomicU64,
}

/// Moves bytes both ways on the route's engine until the connection ends.
async fn relay(
    client: &mut Stream,
    upstream: &mut Stream,
    route: &RouteContext,
    transfer: &Transfer,
    activity: &Activity,
    close: &mut watch::Receiver<bool>,
) -> End {
    let metrics = &route.metrics;
    let up = counters(route, true, &metrics.to_target, &transfer.to_target);
    let down = counters(route, false, &metrics.to_client, &transfer.to_client);
    if route.flow != Flow::Both {
        return one_way(client, upstream, route, (up, down), activity, close).await;
    }
    if let (
        Engine::Sockmap(sockmap),
        Stream::Plain(Socket::Tcp(client)),
        Stream::Plain(Socket::Tcp(upstream)),
    ) = (&route.engine, &*client, &*upstream)
    {
        let name = &metrics.name;
        if let Some(pair) = sockmap
            .enter(client, upstream, [up, down], activity, name)
            .await
        {
            let to_target =
                sockmap::pump(&pair, sockmap::From::Client, client, upstream, up, activity);
            let to_client = sockmap::pump(
                &pair,
                sockmap::From::Upstream,
                upstream,
                client,
                down,
                activity,
            );
            let refresh = || {
                // A map that cannot be read leaves the clock as it
                // is; the pumps report that error themselves.
                let _ = pair.sync(sockmap::From::Client, up, activity);
                let _ = pair.sync(sockmap::From::Upstream, down, activity);
            };
            let end = both_ways(to_target, to_client, activity, &refresh, route, close).await;
            // An error, the idle timer or the drain may end it
            // before a pump's last sync: count what moved.
            refresh();
            return end;
        }
        // Not paired: this connection copies.
    }
    if let (Engine::Splice, Stream::Plain(client), Stream::Plain(upstream)) =
        (&route.engine, &*client, &*upstream)
        && let (Some(client), Some(upstream)) = (client.fd(), upstream.fd())
    {
        // Any two kernel sockets, TCP or UNIX; stdin/stdout copies.
        let to_target = splice::pump(client, upstream, up, activity);
        let to_client = splice::pump(upstream, client, down, activity);
        return both_ways(to_target, to_client, activity, &|| {}, route, close).await;
    }
    // The copy path, also for every TLS leg (through rustls).
    let (client_read, client_write) = copy::split(client);
    let (upstream_read, upstream_write) = copy::split(upstream);
    let halves = (client_read, client_write, upstream_read, upstream_write);
    copy_both_ways(halves, (up, down), activity, route, close).await
}

/// One direction's counters and the route's conversions for it: toward
/// the target the client's `crlf` strips and the target's adds, back the
/// other way round.
fn counters<'a>(
    route: &'a RouteContext,
    to_target: bool,
    metric: &'a prometheus::IntCounter,
    total: &'a AtomicU64,
) -> Counters<'a> {
    let (source_crlf, destination_crlf) = if to_target {
        route.crlf
    } else {
        (route.crlf.1, route.crlf.0)
    };
    Counters {
        metric,
        total,
        dump: route.dump.as_ref().map(|dump| (dump, to_target)),
        crlf: LineEnds {
            strip_cr: source_crlf,
            add_cr: destination_crlf,
        },
        block: route.block_size,
    }
}

/// The copy path: client read/write halves, then upstream's.
async fn copy_both_ways(
    (mut client_read, mut client_write, mut upstream_read, mut upstream_write): (
        impl copy::Source,
        impl AsyncWrite + Unpin + Send,
        impl copy::Source,
        impl AsyncWrite + Unpin + Send,
    ),
    (up, down): (Counters<'_>, Counters<'_>),
    activity: &Activity,
    route: &RouteContext,
    close: &mut watch::Receiver<bool>,
) -> End {
    let to_target = copy::pump(&mut client_read, &mut upstream_write, up, activity);
    let to_client = copy::pump(&mut upstream_read, &mut client_write, down, activity);
    both_ways(to_target, to_client, activity, &|| {}, route, close).await
}

/// How long a one-way connection waits, once the source's EOF has been
/// passed on, for the destination to close too, unless the route's
/// half-close timeout says: socat's `-t` default.
const ONE_WAY_LINGER: Duration = Duration::from_millis(500);

/// One direction only ([`Flow::ToTarget`] or [`Flow::ToClient`]): the
/// source's bytes go to the destination (spliced where the route splices;
/// a sockmap pair carries both directions, so one way splices there too),
/// and what the destination sends back is read and dropped, except from
/// stdin, which is left to the user. The connection ends once the source's
/// EOF has been passed on and the destination has closed, or
/// [`ONE_WAY_LINGER`] later: a destination that keeps its end open is not
/// waited for.
async fn one_way(
    client: &mut Stream,
    upstream: &mut Stream,
    route: &RouteContext,
    (up, down): (Counters<'_>, Counters<'_>),
    activity: &Activity,
    close: &mut watch::Receiver<bool>,
) -> End {
    let (source, destination, counters, from) = match route.flow {
        Flow::ToClient => (upstream, client, down, Side::Target),
        Flow::ToTarget | Flow::Both => (client, upstream, up, Side::Client),
    };
    let to = from.other();
    let drops_replies = !matches!(destination, Stream::Plain(Socket::Stdio(_)));
    let splices = !matches!(route.engine, Engine::Copy);
    let (mut source_read, _) = copy::split(source);
    let (mut replies, mut destination_write) = copy::split(destination);
    let forward = async {
        if let (true, Some(src), Some(dst)) = (splices, source_read.fd(), destination_write.fd()) {
            return splice::pump(src, dst, counters, activity).await;
        }
        copy::pump(&mut source_read, &mut destination_write, counters, activity).await
    };
    let dropped = async {
        if !drops_replies {
            return std::future::pending().await;
        }
        match tokio::io::copy(&mut replies, &mut tokio::io::sink()).await {
            // A TLS peer that closed without close_notify has closed.
            Err(e) if e.kind() != io::ErrorKind::UnexpectedEof => Err(e),
            _ => Ok(()),
        }
    };
    tokio::pin!(forward, dropped);
    let mut destination_closed = false;
    let eof = loop {
        tokio::select! {
            result = &mut forward => match result {
                Ok(eof) => break eof,
                Err((leg, error)) => return End::Failed { side: leg.or(from, to), error },
            },
            result = &mut dropped, if !destination_closed => match result {
                Ok(()) => destination_closed = true,
                Err(error) => return End::Failed { side: to, error },
            },
            _ = activity.idle_for(route.idle_timeout.unwrap_or(Duration::MAX), &|| {}), if route.idle_timeout.is_some() => {
                return End::Idle { cut: false };
            }
            _ = raised(close) => return End::Drained,
        }
    };
    // stdout has no close to wait for: its bytes were flushed.
    if drops_replies && !destination_closed {
        tokio::select! {
            _ = &mut dropped => {}
            _ = tokio::time::sleep(route.half_close_timeout.unwrap_or(ONE_WAY_LINGER)) => {}
            _ = raised(close) => {}
        }
    }
    End::Closed {
        first: from,
        unclean: (eof == Eof::WithoutCloseNotify).then_some(from),
    }
}

/// Runs both directions to their end (or the idle or drain timer's), and
/// says how the connection ended. The data path only changes the futures.
async fn both_ways(
    to_target: impl Future<Output = Direction>,
    to_client: impl Future<Output = Direction>,
    activity: &Activity,
    refresh: &(dyn Fn() + Sync),
    route: &RouteContext,
    close: &mut watch::Receiver<bool>,
) -> End {
    tokio::pin!(to_target, to_client);
    let mut ends = Ends::default();
    // Armed at the first EOF when the route has a half-close timeout.
    let mut half_closed: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(half_closed.unwrap_or_else(Instant::now)), if half_closed.is_some() => {
                return End::HalfClosed {
                    first: ends.first.unwrap_or(Side::Client),
                    cut: false,
                };
            }
            result = &mut to_target, if !ends.client => match result {
                Ok(eof) => ends.record(Side::Client, eof),
                Err((Leg::Destination, error)) if gone(&error) => ends.record(Side::Client, Eof::Clean),
                Err((leg, error)) => return End::Failed { side: leg.or(Side::Client, Side::Target), error },
            },
            result = &mut to_client, if !ends.target => match result {
                Ok(eof) => ends.record(Side::Target, eof),
                Err((Leg::Destination, error)) if gone(&error) => ends.record(Side::Target, Eof::Clean),
                Err((leg, error)) => return End::Failed { side: leg.or(Side::Target, Side::Client), error },
            },
            _ = activity.idle_for(route.idle_timeout.unwrap_or(Duration::MAX), refresh), if route.idle_timeout.is_some() => {
                return End::Idle { cut: false };
            }
            _ = raised(close) => return End::Drained,
        }
        // The socket side has closed and its bytes are out on stdout: stdin
        // has nowhere left to send to, so the connection is over (socat
        // exits then too, after its -t wait) without waiting for an EOF on
        // stdin that a terminal may never give.
        let socket_ended = match route.stdio {
            Some(Side::Client) => ends.target,
            Some(Side::Target) => ends.client,
            None => false,
        };
        if let (true, Some(first)) = (socket_ended, ends.first) {
            return End::Closed {
                first,
                unclean: ends.unclean,
            };
        }
        if let (true, true, Some(first)) = (ends.client, ends.target, ends.first) {
            return End::Closed {
                first,
                unclean: ends.unclean,
            };
        }
        if let (None, Some(_), Some(after)) = (half_closed, ends.first, route.half_close_timeout) {
            half_closed = Some(Instant::now() + after);
        }
    }
}

/// Whether a write error means only that the destination will read no
/// more (EPIPE: a program that printed its output and exited, its socket
/// pair closed), so the direction toward it is over, its bytes dropped,
/// and the other direction still delivers what the destination wrote
/// before it went. A reset (ECONNRESET: a TCP peer's RST) stays a failure,
/// passed on as a reset.
fn gone(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::BrokenPipe
}

/// The EOFs seen so far: which side's, which came first, and a TLS side
/// that ended without close_notify.
#[derive(Default)]
struct Ends {
    client: bool,
    target: bool,
    first: Option<Side>,
    unclean: Option<Side>,
}

impl Ends {
    fn record(&mut self, side: Side, eof: Eof) {
        match side {
            Side::Client => self.client = true,
            Side::Target => self.target = true,
        }
        self.first.get_or_insert(side);
        if eof == Eof::WithoutCloseNotify {
            self.unclean = Some(side);
        }
    }
}

/// Runs one TLS handshake under the route's handshake timeout and counts it;
/// the error is the line to log.
async fn handshake<T>(
    route: &RouteContext,
    role: TlsRole,
    handshake: impl Future<Output = Result<T, Refused>>,
) -> Result<T, String> {
    let started = Instant::now();
    let result = tokio::time::timeout(route.handshake_timeout, handshake)
        .await
        .unwrap_or_else(|_| {
            Err(Refused {
                outcome: HandshakeOutcome::Timeout,
                reason: format!("no handshake within {:?}", route.handshake_timeout),
            })
        });
    let outcome = result
        .as_ref()
        .map_or_else(|refused| refused.outcome, |_| HandshakeOutcome::Ok);
    route
        .metrics
        .tls_handshake(role, outcome, started.elapsed().as_secs_f64());
    result.map_err(|refused| {
        format!(
            "TLS handshake as {} failed ({}): {}",
            role.as_str(),
            outcome.as_str(),
            refused.reason
        )
    })
}

fn finish(
    route: &RouteContext,
    peer: &Peer,
    started: Instant,
    transfer: &Transfer,
    outcome: Outcome,
    reason: &str,
) -> Outcome {
    let metrics = &route.metrics;
    let duration = started.elapsed();
    metrics.outcome(outcome).inc();
    metrics.connection_duration.observe(duration.as_secs_f64());
    let to_target = transfer.to_target.load(Ordering::Relaxed);
    let to_client = transfer.to_client.load(Ordering::Relaxed);
    tracing::info!(
        route = %metrics.name,
        %peer,
        to_target,
        to_client,
        duration_ms = duration.as_millis() as u64,
        outcome = outcome.as_str(),
        reason,
        "connection closed"
    );
    outcome
}

/// Runs `f` when dropped: the active-connections gauge must come down on
/// every path out of [`Connection::run`].
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}
