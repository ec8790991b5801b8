//! Listening sockets that exist before any route binds: the ones systemd
//! passes (socket activation, sd_listen_fds(3): `LISTEN_FDS`, `LISTEN_PID`,
//! `LISTEN_FDNAMES`), and the ones the relay this one replaces handed over
//! in an upgrade (`handover`). This module owns the one answer to "where
//! does a route's listener come from, if not from a bind": the supervisor
//! asks [`Inherited::take_handed`] and [`Inherited::take`] before it looks
//! at running routes or binds.
//!
//! A socket handed over is matched by identity (`run::socket_identity`, or
//! [`metrics_identity`] for the metrics endpoint) and taken once, with its
//! accept queue, so nothing queued in it is lost while the two processes
//! hand over; those nobody took are closed once the spec serves
//! ([`Inherited::close_unused_handed`]): the old relay drains their routes.
//!
//! A route takes a passed socket by name (`socket = "web"`, the
//! `FileDescriptorName=` of the `.socket` unit). The pool keeps every
//! passed socket for the life of the process and hands out duplicates, so a
//! reload's changed or re-added route gets the very same socket back (and a
//! removed route's socket keeps queueing connections, as systemd's own copy
//! does, instead of refusing them).
//!
//! The descriptors are read with `sd-notify` (`listen_fds_with_names`), not
//! `listenfd`: listenfd does not read `LISTEN_FDNAMES`, and routes name
//! their socket; sd-notify also speaks the readiness protocol (`notify`),
//! so one small crate (depending only on libc) covers both.
//!
//! Not here: binding (`forward::listener`), matching a reload's routes to
//! running ones (`run`).

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Mutex;

use socket2::{Domain, SockRef, Type};

use crate::addr::Host;
use crate::config::{RouteSpec, Spec};

/// Why a route cannot have the listener it names.
#[derive(Debug, thiserror::Error)]
pub enum InheritError {
    #[error(
        "cannot read the sockets systemd passed ({cause}): LISTEN_FDS must be a count, LISTEN_PID this process's pid, and LISTEN_FDNAMES one name per descriptor, separated by `:`"
    )]
    Environment {
        #[source]
        cause: io::Error,
    },
    #[error(
        "route {route} takes socket `{name}`, which was not passed ({passed}); name it in a .socket unit's FileDescriptorName= (or fix the route's `socket`)"
    )]
    NotPassed {
        route: String,
        name: String,
        /// The names that were passed, as the message lists them.
        passed: String,
    },
    #[error(
        "route {route}: socket `{name}` was passed {count} times; a route takes one listener, so give each ListenStream= a socket unit (and FileDescriptorName=) of its own"
    )]
    Ambiguous {
        route: String,
        name: String,
        count: usize,
    },
    #[error(
        "route {route}: socket `{name}` is not a listening TCP socket ({found}); pass it with ListenStream= and Accept=no"
    )]
    NotListeningTcp {
        route: String,
        name: String,
        found: String,
    },
    #[error(
        "route {route}: socket `{name}` listens on {actual}, but the route's listen says `{expected}`; make ListenStream= and listen agree"
    )]
    Elsewhere {
        route: String,
        name: String,
        actual: SocketAddr,
        expected: String,
    },
    #[error(
        "the socket handed over for {identity} (used by {owner} in the old relay) is {found}: the two relays disagree on what it is; stop the old one and start this one instead"
    )]
    HandedOver {
        identity: String,
        owner: String,
        found: String,
    },
    #[error("route {route}: cannot use socket `{name}`: {cause}")]
    Socket {
        route: String,
        name: String,
        #[source]
        cause: io::Error,
    },
}

/// The listening sockets this process was given: by name (systemd) and by
/// identity (an upgrade).
#[derive(Debug, Default)]
pub struct Inherited {
    /// In the order passed; a name may repeat (the error says so when a
    /// route takes it).
    named: Vec<(String, OwnedFd)>,
    /// Handed over by the relay this one replaces, by identity: who used
    /// each there (for logs), and the socket. Taken out as routes take them.
    handed: Mutex<HashMap<String, (String, OwnedFd)>>,
}

/// The identity under which the metrics endpoint's socket travels in an
/// upgrade: its configured address.
pub fn metrics_identity(addr: SocketAddr) -> String {
    format!("metrics {addr}")
}

impl Inherited {
    /// No sockets: every route binds its own.
    pub fn none() -> Self {
        Inherited::default()
    }

    /// The sockets systemd passed, if it passed any to this process; the
    /// `LISTEN_*` variables are removed either way, so no child inherits
    /// them.
    ///
    /// # Safety
    ///
    /// Call before any other thread runs: it removes environment variables
    /// (`std::env::remove_var`), which races with any other thread reading
    /// the environment.
    pub unsafe fn from_systemd() -> Result<Self, InheritError> {
        // SAFETY: single-threaded, as this function's contract requires.
        let passed = unsafe { sd_notify::listen_fds_with_names_and_unset_env() }
            .map_err(|cause| InheritError::Environment { cause })?;
        let named = passed
            .map(|(fd, name)| {
                // SAFETY: systemd passed these descriptors to this process
                // (LISTEN_PID matched), nothing else in it owns them, and
                // the variables that name them are gone, so they are taken
                // once.
                (name, unsafe { OwnedFd::from_raw_fd(fd) })
            })
            .collect();
        Ok(Inherited {
            named,
            ..Inherited::default()
        })
    }

    /// Adds the sockets an upgrade's predecessor handed over, as
    /// `(identity, owner, socket)`.
    pub fn add_handed_over(
        &mut self,
        sockets: impl IntoIterator<Item = (String, String, OwnedFd)>,
    ) {
        let handed = self
            .handed
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        handed.extend(
            sockets
                .into_iter()
                .map(|(identity, owner, fd)| (identity, (owner, fd))),
        );
    }

    /// The listening TCP socket handed over for `identity`, if any (once);
    /// a descriptor of another kind is an error, not a bind.
    pub fn take_handed(&self, identity: &str) -> Result<Option<TcpListener>, InheritError> {
        let Some((owner, fd)) = self.handed().remove(identity) else {
            return Ok(None);
        };
        let refused = |found: String| InheritError::HandedOver {
            identity: identity.to_string(),
            owner: owner.clone(),
            found,
        };
        match listening_tcp(&fd) {
            Ok(_) => Ok(Some(TcpListener::from(fd))),
            Err(Refused::Not(found)) => Err(refused(found)),
            Err(Refused::Io(cause)) => Err(refused(format!("unreadable ({cause})"))),
        }
    }

    /// Closes the sockets handed over that no route took (routes the new
    /// spec does not have: the old relay drains them), saying which.
    pub fn close_unused_handed(&self) {
        for (identity, (owner, _)) in self.handed().drain() {
            tracing::info!(
                identity,
                owner = %owner,
                "a socket handed over is not used by this config: closed (the old relay drains it)"
            );
        }
    }

    fn handed(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, OwnedFd)>> {
        // A panic while holding the map leaves it whole: taking the guard
        // from a poisoned lock is fine.
        self.handed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The names passed, in order (for logs and errors).
    pub fn names(&self) -> Vec<&str> {
        self.named.iter().map(|(name, _)| name.as_str()).collect()
    }

    /// Names passed that no route of `spec` takes.
    pub fn unused<'a>(&'a self, spec: &Spec) -> Vec<&'a str> {
        let mut unused: Vec<&str> = self
            .names()
            .into_iter()
            .filter(|name| {
                !spec
                    .routes
                    .iter()
                    .any(|r| r.socket.as_deref() == Some(*name))
            })
            .collect();
        unused.dedup();
        unused
    }

    /// The listener `route` names, if it names one: a duplicate of the
    /// passed socket, checked to be a listening TCP socket where the
    /// route's listen says. `None` when the route binds its own.
    pub fn take(&self, route: &RouteSpec) -> Result<Option<TcpListener>, InheritError> {
        let Some(name) = route.socket.as_deref() else {
            return Ok(None);
        };
        let mut found = self.named.iter().filter(|(n, _)| n == name);
        let fd = match (found.next(), found.count()) {
            (Some((_, fd)), 0) => fd,
            (Some(_), more) => {
                return Err(InheritError::Ambiguous {
                    route: route.name.clone(),
                    name: name.to_string(),
                    count: more + 1,
                });
            }
            (None, _) => {
                return Err(InheritError::NotPassed {
                    route: route.name.clone(),
                    name: name.to_string(),
                    passed: self.passed(),
                });
            }
        };
        let socket_err = |cause| InheritError::Socket {
            route: route.name.clone(),
            name: name.to_string(),
            cause,
        };
        let actual = listening_tcp(fd).map_err(|found| match found {
            Refused::Not(found) => InheritError::NotListeningTcp {
                route: route.name.clone(),
                name: name.to_string(),
                found,
            },
            Refused::Io(cause) => socket_err(cause),
        })?;
        if !agrees(route, actual) {
            return Err(InheritError::Elsewhere {
                route: route.name.clone(),
                name: name.to_string(),
                actual,
                expected: route.listen.text.clone(),
            });
        }
        let dup = fd.try_clone().map_err(socket_err)?;
        Ok(Some(TcpListener::from(dup)))
    }

    fn passed(&self) -> String {
        if self.named.is_empty() {
            return "no sockets were passed: LISTEN_FDS is unset, or LISTEN_PID names another process".into();
        }
        let names: Vec<String> = self.names().iter().map(|n| format!("`{n}`")).collect();
        format!("passed: {}", names.join(", "))
    }
}

/// Why a descriptor is not a listener a route can take.
enum Refused {
    /// What it is instead.
    Not(String),
    Io(io::Error),
}

/// The address of `fd` if it is a listening TCP socket.
fn listening_tcp(fd: &OwnedFd) -> Result<SocketAddr, Refused> {
    let socket = SockRef::from(fd);
    // Not a socket at all: getsockopt says ENOTSOCK.
    let domain = socket.domain().map_err(|e| {
        if e.raw_os_error() == Some(nix::libc::ENOTSOCK) {
            Refused::Not("not a socket".into())
        } else {
            Refused::Io(e)
        }
    })?;
    if domain != Domain::IPV4 && domain != Domain::IPV6 {
        return Err(Refused::Not(format!("{domain:?} socket, not IPv4 or IPv6")));
    }
    let kind = socket.r#type().map_err(Refused::Io)?;
    if kind != Type::STREAM {
        return Err(Refused::Not(format!("{kind:?} socket, not a stream")));
    }
    if !socket.is_listener().map_err(Refused::Io)? {
        return Err(Refused::Not(
            "a stream socket that is not listening (a connection? Accept=yes passes those)".into(),
        ));
    }
    socket
        .local_addr()
        .map_err(Refused::Io)?
        .as_socket()
        .ok_or_else(|| Refused::Not("no IP address".into()))
}

/// Whether a passed socket at `actual` is where the route's listen says:
/// the same port (any, for port 0) and, for an IP address, the same
/// address; a host name is not resolved.
fn agrees(route: &RouteSpec, actual: SocketAddr) -> bool {
    let Some(listen) = route.listen.tcp() else {
        // `relay check` refuses `socket` on another kind of listener.
        return false;
    };
    let port = listen.port == 0 || listen.port == actual.port();
    let host = match &listen.host {
        Host::Ip(ip) => *ip == actual.ip(),
        Host::Name(_) => true,
    };
    port && host
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn route(listen: &str, socket: &str) -> RouteSpec {
        let mut route = RouteSpec::new(
            crate::addr::parse_listen(listen).expect("a valid listen address"),
            crate::addr::parse_target("127.0.0.1:1").expect("a valid target"),
        );
        route.name = "web".into();
        route.socket = Some(socket.into());
        route
    }

    fn pool(sockets: Vec<(&str, OwnedFd)>) -> Inherited {
        Inherited {
            named: sockets
                .into_iter()
                .map(|(n, fd)| (n.to_string(), fd))
                .collect(),
            ..Inherited::default()
        }
    }

    fn handed(identity: &str, fd: OwnedFd) -> Inherited {
        let mut pool = Inherited::none();
        pool.add_handed_over([(identity.to_string(), "route web".to_string(), fd)]);
        pool
    }

    fn listener() -> (OwnedFd, SocketAddr) {
        let l = TcpListener::bind("127.0.0.1:0").expect("binding loopback");
        let addr = l.local_addr().expect("a bound address");
        (l.into(), addr)
    }

    #[test]
    fn a_route_takes_the_socket_it_names_as_often_as_asked() {
        let (fd, addr) = listener();
        let pool = pool(vec![("web", fd)]);
        let r = route(&format!("127.0.0.1:{}", addr.port()), "web");
        for _ in 0..2 {
            let taken = pool.take(&r).expect("the socket is there").expect("named");
            assert_eq!(taken.local_addr().unwrap(), addr);
        }
        let mut binds = r.clone();
        binds.socket = None;
        assert!(
            pool.take(&binds).unwrap().is_none(),
            "no `socket`: it binds"
        );
    }

    #[test]
    fn a_name_not_passed_says_which_were() {
        let (fd, addr) = listener();
        let pool = pool(vec![("admin", fd)]);
        let err = pool
            .take(&route(&addr.to_string(), "web"))
            .expect_err("web was not passed");
        let text = err.to_string();
        assert!(
            text.contains("route web takes socket `web`, which was not passed (passed: `admin`)"),
            "{text}"
        );
        let err = Inherited::none()
            .take(&route(&addr.to_string(), "web"))
            .expect_err("nothing was passed");
        assert!(err.to_string().contains("LISTEN_FDS is unset"), "{err}");
    }

    #[test]
    fn a_socket_elsewhere_than_listen_says_is_refused() {
        let (fd, addr) = listener();
        let pool = pool(vec![("web", fd)]);
        let other_port = format!("127.0.0.1:{}", addr.port().wrapping_add(1).max(1));
        let err = pool
            .take(&route(&other_port, "web"))
            .expect_err("another port");
        assert!(matches!(err, InheritError::Elsewhere { .. }), "{err}");
        assert!(
            err.to_string().contains(&format!("listens on {addr}")),
            "{err}"
        );
        let wildcard = format!("0.0.0.0:{}", addr.port());
        assert!(
            pool.take(&route(&wildcard, "web")).is_err(),
            "another address"
        );
        let any_port = pool.take(&route("127.0.0.1:0", "web"));
        assert!(any_port.is_ok(), "port 0 takes any port");
        let named = pool.take(&route(&format!("localhost:{}", addr.port()), "web"));
        assert!(named.is_ok(), "a host name is not resolved");
    }

    #[test]
    fn only_a_listening_tcp_socket_can_be_taken() {
        let (fd, addr) = listener();
        let connected = std::net::TcpStream::connect(addr).expect("connecting to loopback");
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("binding udp");
        let (unix, _) = std::os::unix::net::UnixStream::pair().expect("a socket pair");
        let file = std::fs::File::open("/dev/null").expect("/dev/null");
        let pool = pool(vec![
            ("connected", connected.as_fd().try_clone_to_owned().unwrap()),
            ("udp", udp.into()),
            ("unix", unix.into()),
            ("file", file.into()),
            ("web", fd),
        ]);
        for (name, says) in [
            ("connected", "not listening"),
            ("udp", "not a stream"),
            ("unix", "not IPv4 or IPv6"),
            ("file", "not a socket"),
        ] {
            let err = pool
                .take(&route("127.0.0.1:0", name))
                .expect_err("not a listener");
            assert!(
                matches!(err, InheritError::NotListeningTcp { .. })
                    && err.to_string().contains(says),
                "{name}: expected `{says}`, got {err}"
            );
        }
    }

    #[test]
    fn a_name_passed_twice_is_ambiguous_and_unused_names_are_listed() {
        let (a, _) = listener();
        let (b, _) = listener();
        let (c, _) = listener();
        let pool = pool(vec![("web", a), ("web", b), ("spare", c)]);
        let err = pool.take(&route("127.0.0.1:0", "web")).expect_err("twice");
        assert!(err.to_string().contains("was passed 2 times"), "{err}");
        let spec = Spec {
            routes: vec![route("127.0.0.1:0", "web")],
            ..Spec::default()
        };
        assert_eq!(pool.unused(&spec), vec!["spare"]);
    }

    #[test]
    fn a_socket_handed_over_is_taken_once_by_identity() {
        let (fd, addr) = listener();
        let pool = handed("127.0.0.1:1", fd);
        let taken = pool
            .take_handed("127.0.0.1:1")
            .expect("valid")
            .expect("present");
        assert_eq!(taken.local_addr().expect("addr"), addr);
        assert!(pool.take_handed("127.0.0.1:1").expect("valid").is_none());
        assert!(pool.take_handed("elsewhere").expect("valid").is_none());
    }

    #[test]
    fn a_socket_handed_over_that_does_not_listen_is_an_error_naming_it() {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("binding udp");
        let pool = handed("web", udp.into());
        let err = pool.take_handed("web").expect_err("not a listener");
        assert!(
            err.to_string()
                .contains("handed over for web (used by route web in the old relay) is"),
            "{err}"
        );
    }

    #[test]
    fn sockets_handed_over_and_not_taken_are_closed() {
        let (fd, _) = listener();
        let pool = handed("web", fd);
        pool.close_unused_handed();
        assert!(pool.take_handed("web").expect("valid").is_none());
    }
}
