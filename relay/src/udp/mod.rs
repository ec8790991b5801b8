//! UDP routes: socat's `UDP-LISTEN:<port>,fork UDP:<host>:<port>`.
//!
//! One listening socket; per client address a session with an upstream
//! socket of its own, connected to the target, so the target sees one peer
//! per client (as with socat's `fork`) and its replies go back to that
//! client alone. Every datagram is relayed as one datagram: boundaries are
//! kept both ways. A session ends after `idle_timeout` with no datagram
//! either way; beyond `max_sessions` a new client's datagram is dropped and
//! counted. Without `fork` (socat's single-peer listener) the first client
//! is the only one, and the route ends when its session does.
//!
//! Told to stop (a drain, or a reload that changed the route and gave a
//! duplicate of the socket to its successor), the relay stops receiving at
//! once: every datagram from then on is the successor's (or, for a removed
//! route, nobody's), and the open sessions only carry the target's replies
//! back until they are idle or the drain timeout ends. Reading on would
//! race the successor for each datagram and drop the new clients' ones.
//!
//! Not here: the address grammar (`addr`), where the upstream socket is
//! opened (the caller's [`OpenUpstream`]: resolving names, entering a
//! namespace), TCP (`forward`).

pub mod metrics;
pub mod route;

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::forward::metrics::{Outcome, RouteMetrics};
use metrics::{SessionEnd, UdpRouteMetrics};

/// The largest UDP payload (over IPv4; IPv6 jumbograms are not relayed).
const MAX_DATAGRAM: usize = 65_535;

/// Opens a session's upstream socket, connected to the target.
pub type OpenUpstream =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = io::Result<UdpSocket>> + Send>> + Send + Sync>;

/// How a UDP route's sessions live.
#[derive(Debug, Clone)]
pub struct UdpOptions {
    pub idle_timeout: Duration,
    pub max_sessions: usize,
    /// After the route is told to stop, how long open sessions may go on.
    pub drain_timeout: Duration,
    /// socat's listener without `fork`: one client only.
    pub once: bool,
}

/// Both families a UDP route counts into.
#[derive(Clone)]
pub struct UdpCounters {
    pub route: RouteMetrics,
    pub udp: UdpRouteMetrics,
}

impl UdpCounters {
    fn end(&self, end: SessionEnd) {
        self.udp.ended(end).inc();
        let outcome = match end {
            SessionEnd::Expired => Outcome::IdleTimeout,
            SessionEnd::Limited => Outcome::Limit,
            SessionEnd::Drained => Outcome::Drained,
            SessionEnd::Error => Outcome::ConnectError,
        };
        self.route.outcome(outcome).inc();
    }

    fn opened(&self) {
        self.udp.active.inc();
        self.route.active.inc();
    }

    fn closed(&self) {
        self.udp.active.dec();
        self.route.active.dec();
    }
}

/// A bound UDP route, not yet relaying.
pub struct UdpRelay {
    socket: Arc<UdpSocket>,
    open: OpenUpstream,
    options: UdpOptions,
    counters: UdpCounters,
}

/// One client's session, as the receiving loop sees it.
struct Session {
    upstream: Arc<UdpSocket>,
    /// Milliseconds since the relay started, at the last datagram either way.
    last: Arc<AtomicU64>,
    /// Set by the session's task as it ends: a datagram arriving then opens
    /// a new session instead of going to a socket nobody reads.
    ended: Arc<AtomicBool>,
}

impl UdpRelay {
    /// Takes a bound socket (the caller binds, in a namespace if asked).
    pub fn new(
        socket: std::net::UdpSocket,
        open: OpenUpstream,
        options: UdpOptions,
        counters: UdpCounters,
    ) -> io::Result<Self> {
        socket.set_nonblocking(true)?;
        Ok(UdpRelay {
            socket: Arc::new(UdpSocket::from_std(socket)?),
            open,
            options,
            counters,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Another handle on the listening socket, for a reload's successor.
    pub fn socket_handle(&self) -> io::Result<std::net::UdpSocket> {
        Ok(socket2::SockRef::from(&*self.socket).try_clone()?.into())
    }

    /// Relays until `stop` turns true (then open sessions get the drain
    /// timeout), or, without `fork`, until the one session ends.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let UdpRelay {
            socket,
            open,
            options,
            counters,
        } = self;
        let started = Instant::now();
        let mut sessions: HashMap<SocketAddr, Session> = HashMap::new();
        let mut tasks = JoinSet::new();
        let (ended_tx, mut ended_rx) = mpsc::unbounded_channel::<SocketAddr>();
        let (close_tx, close_rx) = watch::channel(false);
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let mut served_once = false;
        let mut draining: Option<tokio::time::Instant> = None;
        'relay: loop {
            if draining.is_some() && sessions.is_empty() {
                break;
            }
            if options.once && served_once && sessions.is_empty() {
                break;
            }
            let drain_deadline = async {
                match draining {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                received = socket.recv_from(&mut buf), if draining.is_none() => {
                    let (n, client) = match received {
                        Ok(received) => received,
                        Err(err) => {
                            // An ICMP error for an earlier reply, and the like.
                            tracing::debug!(route = %counters.route.name, error = %err, "receiving a datagram failed");
                            continue;
                        }
                    };
                    // The datagram's session: its last use is stored before its end
                    // is read, and the reply task stores the end before it reads
                    // the last use again (both SeqCst), so a session that expires
                    // as this datagram arrives is either kept (the task sees the
                    // use) or replaced here (this loop sees the end): the datagram
                    // never goes to an upstream socket nobody reads.
                    loop {
                        let stale = sessions.get(&client).is_some_and(|s| s.ended.load(Ordering::Acquire));
                        if stale {
                            sessions.remove(&client);
                        }
                        if !sessions.contains_key(&client) {
                            let refused = draining.is_some()
                                || sessions.len() >= options.max_sessions
                                || (options.once && served_once);
                            if refused {
                                counters.end(SessionEnd::Limited);
                                continue 'relay;
                            }
                            let upstream = match open().await {
                                Ok(upstream) => Arc::new(upstream),
                                Err(err) => {
                                    tracing::warn!(route = %counters.route.name, %client, error = %err, "cannot open the upstream socket; datagram dropped");
                                    counters.end(SessionEnd::Error);
                                    continue 'relay;
                                }
                            };
                            served_once = true;
                            counters.opened();
                            let session = Session {
                                upstream: upstream.clone(),
                                last: Arc::new(AtomicU64::new(elapsed_ms(started))),
                                ended: Arc::new(AtomicBool::new(false)),
                            };
                            tracing::debug!(route = %counters.route.name, %client, "UDP session opened");
                            tasks.spawn(replies(Replies {
                                client,
                                upstream,
                                listener: socket.clone(),
                                last: session.last.clone(),
                                ended: session.ended.clone(),
                                started,
                                idle: options.idle_timeout,
                                counters: counters.clone(),
                                close: close_rx.clone(),
                                done: ended_tx.clone(),
                            }));
                            sessions.insert(client, session);
                        }
                        let session = &sessions[&client];
                        session.last.store(elapsed_ms(started), Ordering::SeqCst);
                        if !session.ended.load(Ordering::SeqCst) {
                            break;
                        }
                        sessions.remove(&client);
                    }
                    let session = &sessions[&client];
                    match session.upstream.send(&buf[..n]).await {
                        Ok(_) => {
                            counters.udp.to_target.inc();
                            counters.route.to_target.inc_by(n as u64);
                        }
                        // ECONNREFUSED: the target's port was closed when an
                        // earlier datagram arrived. UDP loses datagrams; so do we.
                        Err(err) => tracing::debug!(route = %counters.route.name, %client, error = %err, "sending to the target failed; datagram dropped"),
                    }
                }
                Some(client) = ended_rx.recv() => {
                    if sessions.get(&client).is_some_and(|s| s.ended.load(Ordering::Acquire)) {
                        sessions.remove(&client);
                    }
                }
                _ = crate::forward::raised(&mut stop), if draining.is_none() => {
                    tracing::info!(route = %counters.route.name, open = sessions.len(), timeout_s = options.drain_timeout.as_secs_f64(),
                        "stopping: no more datagrams read; open sessions carry replies until idle or the drain timeout");
                    draining = Some(tokio::time::Instant::now() + options.drain_timeout);
                }
                _ = drain_deadline => {
                    tracing::warn!(route = %counters.route.name, open = sessions.len(), "drain timeout: closing the UDP sessions still open");
                    break;
                }
            }
        }
        let _ = close_tx.send(true);
        while tasks.join_next().await.is_some() {}
    }
}

fn elapsed_ms(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// What a session's reply task needs.
struct Replies {
    client: SocketAddr,
    upstream: Arc<UdpSocket>,
    listener: Arc<UdpSocket>,
    last: Arc<AtomicU64>,
    ended: Arc<AtomicBool>,
    started: Instant,
    idle: Duration,
    counters: UdpCounters,
    close: watch::Receiver<bool>,
    done: mpsc::UnboundedSender<SocketAddr>,
}

/// Relays the target's datagrams back to the client until the session has
/// been idle for `idle`, or the route closes it.
async fn replies(mut r: Replies) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    // One timer for the session, moved only when it fires early (the
    // session was used since it was set): a datagram costs no timer
    // update, only a store of its time.
    let expiry = |last: u64| {
        tokio::time::Instant::from_std(r.started + Duration::from_millis(last) + r.idle)
    };
    let idle = tokio::time::sleep_until(expiry(r.last.load(Ordering::Acquire)));
    tokio::pin!(idle);
    let end = loop {
        tokio::select! {
            received = r.upstream.recv(&mut buf) => match received {
                Ok(n) => {
                    r.last.store(elapsed_ms(r.started), Ordering::Release);
                    match r.listener.send_to(&buf[..n], r.client).await {
                        Ok(_) => {
                            r.counters.udp.to_client.inc();
                            r.counters.route.to_client.inc_by(n as u64);
                        }
                        Err(err) => tracing::debug!(route = %r.counters.route.name, client = %r.client, error = %err, "sending to the client failed; datagram dropped"),
                    }
                }
                // The target's port is closed (an ICMP error on the connected
                // socket): later datagrams may find it open again.
                Err(err) if err.kind() == io::ErrorKind::ConnectionRefused => {
                    tracing::debug!(route = %r.counters.route.name, client = %r.client, "the target refused a datagram (port unreachable)");
                }
                Err(err) => {
                    tracing::warn!(route = %r.counters.route.name, client = %r.client, error = %err, "receiving from the target failed; closing the session");
                    break SessionEnd::Error;
                }
            },
            _ = &mut idle => {
                let since = elapsed_ms(r.started).saturating_sub(r.last.load(Ordering::SeqCst));
                if Duration::from_millis(since) >= r.idle {
                    // Ended first, then the last use read again: a datagram
                    // the receiving loop routed here meanwhile keeps the
                    // session (see `run`).
                    r.ended.store(true, Ordering::SeqCst);
                    let since = elapsed_ms(r.started).saturating_sub(r.last.load(Ordering::SeqCst));
                    if Duration::from_millis(since) >= r.idle {
                        break SessionEnd::Expired;
                    }
                    r.ended.store(false, Ordering::SeqCst);
                }
                idle.as_mut().reset(expiry(r.last.load(Ordering::Acquire)));
            }
            _ = crate::forward::raised(&mut r.close) => break SessionEnd::Drained,
        }
    };
    r.ended.store(true, Ordering::Release);
    r.counters.end(end);
    r.counters.closed();
    tracing::debug!(route = %r.counters.route.name, client = %r.client, end = end.as_str(), "UDP session ended");
    let _ = r.done.send(r.client);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forward::metrics::ForwardMetrics;

    /// A relay on loopback to `target`, with its counters.
    fn relay_to(target: SocketAddr, options: UdpOptions) -> (UdpRelay, UdpCounters) {
        let registry = prometheus::Registry::new();
        let counters = UdpCounters {
            route: ForwardMetrics::register(&registry).route("dns"),
            udp: metrics::UdpMetrics::register(&registry).route("dns"),
        };
        let open: OpenUpstream = Arc::new(move || {
            Box::pin(async move {
                let socket = UdpSocket::bind("127.0.0.1:0").await?;
                socket.connect(target).await?;
                Ok(socket)
            })
        });
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind loopback");
        let relay = UdpRelay::new(socket, open, options, counters.clone()).expect("a relay");
        (relay, counters)
    }

    fn options() -> UdpOptions {
        UdpOptions {
            idle_timeout: Duration::from_millis(300),
            max_sessions: 2,
            drain_timeout: Duration::from_secs(1),
            once: false,
        }
    }

    /// Echoes each datagram back prefixed with the peer's port, so a test
    /// sees which upstream socket carried it.
    async fn echo() -> SocketAddr {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind echo");
        let addr = socket.local_addr().expect("echo address");
        tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
                let mut reply = peer.port().to_be_bytes().to_vec();
                reply.extend_from_slice(&buf[..n]);
                let _ = socket.send_to(&reply, peer).await;
            }
        });
        addr
    }

    async fn ask(client: &UdpSocket, relay: SocketAddr, bytes: &[u8]) -> (u16, Vec<u8>) {
        client.send_to(bytes, relay).await.expect("send");
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let (n, from) = tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
            .await
            .expect("a reply within 5 s")
            .expect("recv");
        assert_eq!(from, relay, "the reply comes from the relay's address");
        (u16::from_be_bytes([buf[0], buf[1]]), buf[2..n].to_vec())
    }

    #[tokio::test]
    async fn each_client_gets_its_own_session_and_boundaries_are_kept() {
        let (relay, counters) = relay_to(echo().await, options());
        let addr = relay.local_addr().expect("bound");
        let (stop_tx, stop) = watch::channel(false);
        let running = tokio::spawn(relay.run(stop));
        let (a, b) = (
            UdpSocket::bind("127.0.0.1:0").await.expect("client a"),
            UdpSocket::bind("127.0.0.1:0").await.expect("client b"),
        );
        let (a_port, first) = ask(&a, addr, b"one").await;
        assert_eq!(first, b"one");
        let big = vec![7u8; 60_000];
        let (again, back) = ask(&a, addr, &big).await;
        assert_eq!(back, big, "a 60,000-byte datagram arrives whole");
        assert_eq!(again, a_port, "one client, one upstream socket");
        let (b_port, _) = ask(&b, addr, b"two").await;
        assert_ne!(b_port, a_port, "another client, another upstream socket");
        assert_eq!(counters.udp.active.get(), 2);
        assert_eq!(counters.udp.to_target.get(), 3);
        assert_eq!(counters.route.to_target.get(), 3 + 60_000 + 3);
        // A third client is over max_sessions: dropped and counted.
        let c = UdpSocket::bind("127.0.0.1:0").await.expect("client c");
        c.send_to(b"three", addr).await.expect("send");
        tokio::time::timeout(Duration::from_secs(5), async {
            while counters.udp.ended(SessionEnd::Limited).get() == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the third client is counted as limited");
        stop_tx.send_replace(true);
        tokio::time::timeout(Duration::from_secs(5), running)
            .await
            .expect("the relay stops within its drain timeout")
            .expect("the relay task");
        assert_eq!(counters.udp.active.get(), 0);
    }

    #[tokio::test]
    async fn an_idle_session_expires_and_the_client_gets_a_new_one() {
        let (relay, counters) = relay_to(echo().await, options());
        let addr = relay.local_addr().expect("bound");
        let (_stop_tx, stop) = watch::channel(false);
        tokio::spawn(relay.run(stop));
        let client = UdpSocket::bind("127.0.0.1:0").await.expect("client");
        let (first, _) = ask(&client, addr, b"hello").await;
        tokio::time::timeout(Duration::from_secs(5), async {
            while counters.udp.ended(SessionEnd::Expired).get() == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the session expires after its idle timeout");
        assert_eq!(counters.udp.active.get(), 0);
        let (second, back) = ask(&client, addr, b"again").await;
        assert_eq!(back, b"again");
        assert_ne!(second, first, "a new session has a new upstream socket");
    }

    #[tokio::test]
    async fn without_fork_the_first_client_is_the_only_one() {
        let mut once = options();
        once.once = true;
        let (relay, counters) = relay_to(echo().await, once);
        let addr = relay.local_addr().expect("bound");
        let (_stop_tx, stop) = watch::channel(false);
        let running = tokio::spawn(relay.run(stop));
        let (a, b) = (
            UdpSocket::bind("127.0.0.1:0").await.expect("client a"),
            UdpSocket::bind("127.0.0.1:0").await.expect("client b"),
        );
        ask(&a, addr, b"first").await;
        b.send_to(b"second", addr).await.expect("send");
        tokio::time::timeout(Duration::from_secs(5), running)
            .await
            .expect("the route ends when its one session expires")
            .expect("the relay task");
        assert_eq!(counters.udp.ended(SessionEnd::Limited).get(), 1);
        assert_eq!(counters.udp.ended(SessionEnd::Expired).get(), 1);
    }
}
