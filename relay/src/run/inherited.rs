//! Listening sockets this process did not bind but was given: by the relay
//! it replaces in an upgrade (`handover`). The supervisor asks this pool
//! before it binds: a route (or the metrics endpoint) whose identity is
//! here takes that socket, with its accept queue, so nothing queued in it
//! is lost and no client is refused while the two processes hand over.
//! Whatever no one took is closed once the spec is serving.
//!
//! Not here: where the sockets came from (`handover`), or how a route's
//! identity is written (`run::socket_identity`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::Mutex;

use nix::sys::socket::{getsockopt, sockopt};

/// A socket taken from the pool, or why it cannot serve.
#[derive(Debug, thiserror::Error)]
#[error(
    "the socket handed over for {identity} (used by {owner}) {problem}: the old relay and this one disagree on what it is; stop the old one and start this one instead"
)]
pub struct InheritedError {
    pub identity: String,
    pub owner: String,
    pub problem: String,
}

/// One socket given to this process, and who used it there.
struct Given {
    fd: OwnedFd,
    owner: String,
}

/// The pool, by identity.
#[derive(Default)]
pub struct Inherited {
    sockets: Mutex<HashMap<String, Given>>,
}

/// The identity under which the metrics endpoint's socket travels.
pub fn metrics_identity(addr: SocketAddr) -> String {
    format!("metrics {addr}")
}

impl Inherited {
    /// A pool of `(identity, owner, socket)`.
    pub fn new(sockets: impl IntoIterator<Item = (String, String, OwnedFd)>) -> Self {
        Inherited {
            sockets: Mutex::new(
                sockets
                    .into_iter()
                    .map(|(identity, owner, fd)| (identity, Given { fd, owner }))
                    .collect(),
            ),
        }
    }

    /// The listening TCP socket given for `identity`, if any; checked to be
    /// one (a descriptor of another kind is an error, not a bind).
    pub fn take(&self, identity: &str) -> Result<Option<std::net::TcpListener>, InheritedError> {
        let Some(given) = self.lock().remove(identity) else {
            return Ok(None);
        };
        let problem = |problem: String| InheritedError {
            identity: identity.to_string(),
            owner: given.owner.clone(),
            problem,
        };
        match getsockopt(&given.fd, sockopt::AcceptConn) {
            Ok(true) => {}
            Ok(false) => return Err(problem("is not listening".into())),
            Err(errno) => return Err(problem(format!("is not a socket ({errno})"))),
        }
        match getsockopt(&given.fd, sockopt::SockType) {
            Ok(nix::sys::socket::SockType::Stream) => {}
            Ok(other) => return Err(problem(format!("is a {other:?} socket, not TCP"))),
            Err(errno) => return Err(problem(format!("has no socket type ({errno})"))),
        }
        let listener = std::net::TcpListener::from(given.fd);
        if let Err(err) = listener.local_addr() {
            return Err(problem(format!("has no IP address ({err})")));
        }
        tracing::debug!(identity, "listening socket taken over");
        Ok(Some(listener))
    }

    /// Closes what nobody took (a route the new spec no longer has: the
    /// old relay drains it), saying which.
    pub fn close_rest(&self) {
        for (identity, given) in self.lock().drain() {
            tracing::info!(
                identity,
                owner = %given.owner,
                "a socket handed over is not used by this config: closed (the old relay drains it)"
            );
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Given>> {
        // A panic while holding the map leaves it whole: taking the guard
        // from a poisoned lock is fine.
        self.sockets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool_of(listener: std::net::TcpListener) -> Inherited {
        Inherited::new([(
            "127.0.0.1:1".to_string(),
            "route a".to_string(),
            listener.into(),
        )])
    }

    #[test]
    fn a_listener_is_taken_once() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let pool = pool_of(listener);
        let taken = pool.take("127.0.0.1:1").expect("valid").expect("present");
        assert_eq!(taken.local_addr().expect("addr"), addr);
        assert!(pool.take("127.0.0.1:1").expect("valid").is_none());
        assert!(pool.take("elsewhere").expect("valid").is_none());
    }

    #[test]
    fn a_socket_that_does_not_listen_is_an_error_naming_it() {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        let pool = Inherited::new([("web".to_string(), "route web".to_string(), socket.into())]);
        let err = pool.take("web").expect_err("an error");
        assert!(
            err.to_string()
                .contains("web (used by route web) is not listening"),
            "{err}"
        );
    }

    #[test]
    fn a_unix_listener_is_not_a_tcp_one() {
        let path =
            std::env::temp_dir().join(format!("relay-inherited-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        let pool = Inherited::new([("web".to_string(), "route web".to_string(), listener.into())]);
        let err = pool.take("web").expect_err("an error");
        assert!(err.to_string().contains("has no IP address"), "{err}");
        let _ = std::fs::remove_file(&path);
    }
}
