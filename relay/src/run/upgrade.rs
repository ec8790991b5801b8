//! Binary upgrades, as the supervisor runs them. The running relay serves
//! its handover socket (`[upgrade] socket`) and, when a new relay connects,
//! offers it every listening socket (its routes' and the metrics
//! endpoint's) from a task of its own, so routes, signals and reloads go on
//! meanwhile; one successor at a time, the next waits in the backlog. Once
//! the successor says it serves, the supervisor stops accepting, lets go of
//! the handover socket, and drains.
//!
//! A new relay (`relay run --upgrade-from PATH`) receives the sockets
//! before it prepares its spec, binds its own handover socket beside the
//! final path (so a path it cannot use fails it before the old relay
//! stops), says it serves, and once the old relay has let go moves its
//! socket onto the path.
//!
//! Not here: the wire protocol (`handover`), or how a spec uses the
//! sockets (`inherited`).

use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use tokio::task::JoinHandle;

use super::handover::{self, Channel, HandoverError, Listening, Server, Successor};
use super::inherited::metrics_identity;

/// What the handover socket brought.
pub enum Event {
    /// A new relay connected: offer it the sockets.
    Asked(Channel),
    /// A new relay serves on them: stop accepting and drain.
    TakenOver(Successor),
}

/// The running relay's side: its handover socket and the offer under way.
pub struct Upgrades {
    server: Option<Server>,
    /// Another handle on the metrics endpoint's socket, and the address it
    /// was asked for (what a successor matches).
    metrics: Option<(SocketAddr, std::net::TcpListener)>,
    pending: Option<JoinHandle<Result<Successor, HandoverError>>>,
}

impl Upgrades {
    /// No handover socket: upgrades are off.
    pub fn off() -> Self {
        Self::with(None)
    }

    /// Serves the handover socket at `path` (none: upgrades are off).
    pub fn serve(path: Option<&Path>) -> Result<Self, HandoverError> {
        let server = path.map(Server::bind).transpose()?;
        if let Some(server) = &server {
            announce(server);
        }
        Ok(Self::with(server))
    }

    fn with(server: Option<Server>) -> Self {
        Upgrades {
            server,
            metrics: None,
            pending: None,
        }
    }

    /// Offer the metrics endpoint's socket too ([`metrics_handle`]).
    pub fn offer_metrics(&mut self, handle: Option<(SocketAddr, std::net::TcpListener)>) {
        self.metrics = handle;
    }

    /// The next thing the handover socket brings; never, with upgrades off.
    pub async fn next(&mut self) -> Event {
        loop {
            if let Some(pending) = &mut self.pending {
                // One successor at a time: the next waits in the backlog.
                let result = pending.await;
                self.pending = None;
                match result {
                    Ok(Ok(successor)) => return Event::TakenOver(successor),
                    Ok(Err(err)) => tracing::warn!(
                        error = %super::anyhow_chain(&err),
                        "upgrade abandoned: this relay keeps serving as before"
                    ),
                    Err(err) => {
                        tracing::error!(error = %err, "the upgrade task failed; this relay keeps serving")
                    }
                }
                continue;
            }
            match &self.server {
                Some(server) => return Event::Asked(server.accept().await),
                None => std::future::pending::<()>().await,
            }
        }
    }

    /// Offers `routes` (identity, route name, socket) and the metrics
    /// socket to the relay on `channel`, from a task of its own.
    pub fn offer(&mut self, channel: Channel, routes: Vec<(Listening, OwnedFd)>) {
        let mut sockets = routes;
        if let Some((asked, listener)) = &self.metrics {
            match listener.as_fd().try_clone_to_owned() {
                Ok(fd) => sockets.push((
                    Listening {
                        identity: metrics_identity(*asked),
                        owner: "metrics".to_string(),
                    },
                    fd,
                )),
                Err(err) => {
                    tracing::warn!(error = %err, "cannot duplicate the metrics socket for the new relay")
                }
            }
        }
        tracing::info!(
            sockets = sockets.len(),
            "upgrade: a new relay connected; offering the listening sockets (this relay keeps accepting until it serves)"
        );
        self.pending = Some(tokio::spawn(async move {
            let borrowed: Vec<(Listening, BorrowedFd)> = sockets
                .iter()
                .map(|(listening, fd)| (listening.clone(), fd.as_fd()))
                .collect();
            handover::offer(channel, &borrowed).await
        }));
    }

    /// Upgrades end here (the relay drains): the handover socket goes, and
    /// an offer under way is dropped with its handles on the listening
    /// sockets, which would otherwise keep them open (and queueing clients
    /// nobody accepts) until this process exits.
    pub fn close(&mut self) {
        if let Some(pending) = self.pending.take() {
            pending.abort();
        }
        self.server = None;
        self.metrics = None;
    }

    /// The successor serves: remove the handover socket (its path is the
    /// successor's now) and tell it so. Call after the routes were told to
    /// drain.
    pub async fn hand_over(&mut self, successor: Successor) {
        self.close();
        let pid = successor.pid;
        if let Err(err) = successor.released().await {
            tracing::warn!(error = %super::anyhow_chain(&err), "upgrade: cannot tell the new relay this one let go; it goes on anyway");
        }
        tracing::info!(
            successor = pid,
            "upgrade: the new relay serves; this one accepts no more and drains its connections"
        );
    }
}

/// Another handle on the metrics endpoint's socket, for a successor;
/// `asked` is the address it was configured with (what a successor matches).
pub fn metrics_handle(
    asked: SocketAddr,
    listener: &tokio::net::TcpListener,
) -> Option<(SocketAddr, std::net::TcpListener)> {
    match socket2::SockRef::from(listener).try_clone() {
        Ok(dup) => Some((asked, dup.into())),
        Err(err) => {
            tracing::warn!(error = %err, "cannot duplicate the metrics socket; a successor will have to bind it");
            None
        }
    }
}

fn announce(server: &Server) {
    tracing::info!(path = %server.path().display(), "upgrade socket: `relay run --upgrade-from` this path takes the listening sockets over");
}

/// How long a new relay waits for the old one to say it let go; past it,
/// the new one goes on (the old was told, and a path is moved atomically).
const RELEASE_WAIT: Duration = Duration::from_secs(10);

/// The new relay's side: the sockets received, and the handover to finish.
pub struct Arriving {
    handover: handover::Handover,
    /// This relay's own handover socket, bound beside its final path.
    server: Option<Server>,
}

impl Arriving {
    /// Takes the sockets of the relay serving `from`, as `(identity, owner,
    /// socket)` for `Inherited::add_handed_over`, and
    /// binds this relay's own handover socket beside `own` (its path once
    /// the old relay let go): a path that cannot serve fails the upgrade
    /// while the old relay still serves.
    pub async fn take_over(
        from: &Path,
        own: Option<&Path>,
    ) -> Result<(Vec<(String, String, OwnedFd)>, Self), HandoverError> {
        let taken = handover::take_over(from).await?;
        tracing::info!(
            old = taken.pid,
            sockets = taken.sockets.len(),
            from = %from.display(),
            "upgrade: received the listening sockets of the running relay"
        );
        let server = own.map(Server::bind_beside).transpose()?;
        let (sockets, handover) = taken.split();
        let sockets = sockets
            .into_iter()
            .map(|(listening, fd)| (listening.identity, listening.owner, fd))
            .collect();
        Ok((sockets, Arriving { handover, server }))
    }

    /// Tells the old relay this one serves, waits for it to let go, and
    /// moves this relay's handover socket onto its path.
    pub async fn finish(self) -> Result<Upgrades, HandoverError> {
        let old = self.handover.pid;
        match tokio::time::timeout(RELEASE_WAIT, self.handover.ready()).await {
            Ok(done) => done?,
            Err(_) => tracing::warn!(
                old,
                waited_s = RELEASE_WAIT.as_secs(),
                "upgrade: the old relay did not say it let go; going on"
            ),
        }
        tracing::info!(
            old,
            "upgrade: the old relay accepts no more; this one serves alone"
        );
        let server = match self.server {
            None => None,
            Some(mut server) => match server.install() {
                Ok(()) => Some(server),
                Err(err) => {
                    // Serving matters more than the next upgrade: go on.
                    tracing::error!(error = %super::anyhow_chain(&err), "upgrade socket: cannot move it into place; this relay serves, but cannot be upgraded without a restart");
                    None
                }
            },
        };
        if let Some(server) = &server {
            announce(server);
        }
        Ok(Upgrades::with(server))
    }
}
