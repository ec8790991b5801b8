//! The UDP relay's own series, beside the connection and byte series every
//! route has (`forward::metrics`): sessions open now, datagrams per
//! direction, and how sessions ended.
//!
//! Labels stay bounded: the route name, a direction, a [`SessionEnd`].

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

/// How a UDP session ended (or why one was not made); the `outcome` label
/// of `relay_udp_sessions_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    /// No datagram either way for the idle timeout.
    Expired,
    /// Not made: `max-sessions` were open (the datagram was dropped).
    Limited,
    /// Still open when the route stopped and its drain timeout ran out.
    Drained,
    /// Not made, or ended: the upstream socket could not be opened or used.
    Error,
}

impl SessionEnd {
    pub const ALL: [SessionEnd; 4] = [
        SessionEnd::Expired,
        SessionEnd::Limited,
        SessionEnd::Drained,
        SessionEnd::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SessionEnd::Expired => "expired",
            SessionEnd::Limited => "limited",
            SessionEnd::Drained => "drained",
            SessionEnd::Error => "error",
        }
    }
}

/// The families, registered once per registry.
#[derive(Clone)]
pub struct UdpMetrics {
    active: IntGaugeVec,
    datagrams: IntCounterVec,
    sessions: IntCounterVec,
}

impl UdpMetrics {
    pub fn register(registry: &Registry) -> Self {
        let active = IntGaugeVec::new(
            Opts::new(
                "relay_udp_sessions_active",
                "UDP sessions (one upstream socket per client address) open now.",
            ),
            &["route"],
        )
        .expect("static metric definition is valid");
        let datagrams = IntCounterVec::new(
            Opts::new(
                "relay_udp_datagrams_total",
                "UDP datagrams relayed, by direction (to_target, to_client).",
            ),
            &["route", "direction"],
        )
        .expect("static metric definition is valid");
        let sessions = IntCounterVec::new(
            Opts::new(
                "relay_udp_sessions_total",
                "UDP sessions ended (expired, drained, error) or not made (limited, error).",
            ),
            &["route", "outcome"],
        )
        .expect("static metric definition is valid");
        for collector in [
            Box::new(active.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(datagrams.clone()),
            Box::new(sessions.clone()),
        ] {
            registry
                .register(collector)
                .expect("UDP metric names are registered once per registry");
        }
        UdpMetrics {
            active,
            datagrams,
            sessions,
        }
    }

    /// One route's children, every series at 0 from the start.
    pub fn route(&self, name: &str) -> UdpRouteMetrics {
        UdpRouteMetrics {
            families: self.clone(),
            name: name.to_string(),
            active: self.active.with_label_values(&[name]),
            to_target: self.datagrams.with_label_values(&[name, "to_target"]),
            to_client: self.datagrams.with_label_values(&[name, "to_client"]),
            ends: SessionEnd::ALL.map(|end| self.sessions.with_label_values(&[name, end.as_str()])),
        }
    }

    /// Removes every series of the route `name`.
    pub fn remove_route(&self, name: &str) {
        // Fails only for a series that is not there, which is what removing wants.
        let _ = self.active.remove_label_values(&[name]);
        for direction in ["to_target", "to_client"] {
            let _ = self.datagrams.remove_label_values(&[name, direction]);
        }
        for end in SessionEnd::ALL {
            let _ = self.sessions.remove_label_values(&[name, end.as_str()]);
        }
    }
}

/// One route's children, resolved once.
#[derive(Clone)]
pub struct UdpRouteMetrics {
    families: UdpMetrics,
    name: String,
    pub active: IntGauge,
    pub to_target: IntCounter,
    pub to_client: IntCounter,
    ends: [IntCounter; SessionEnd::ALL.len()],
}

impl UdpRouteMetrics {
    pub fn ended(&self, end: SessionEnd) -> &IntCounter {
        let index = SessionEnd::ALL
            .iter()
            .position(|e| *e == end)
            .expect("SessionEnd::ALL lists every end");
        &self.ends[index]
    }

    pub fn remove(&self) {
        self.families.remove_route(&self.name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_route_starts_at_zero_and_leaves_no_series_behind() {
        let registry = Registry::new();
        let udp = UdpMetrics::register(&registry);
        let dns = udp.route("dns");
        dns.ended(SessionEnd::Expired).inc();
        let families = registry.gather();
        let sessions = families
            .iter()
            .find(|f| f.name() == "relay_udp_sessions_total")
            .expect("the sessions family");
        assert_eq!(sessions.get_metric().len(), SessionEnd::ALL.len());
        dns.remove();
        assert!(registry.gather().is_empty(), "no route, no series");
    }
}
