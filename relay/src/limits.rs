//! Process limits a relay needs: every relayed connection costs two file
//! descriptors, and the usual soft limit of 1024 would cap a relay at about
//! 500 connections while the hard limit allows far more.
//!
//! The descriptor budget, for an open-file limit of N:
//!
//! ```text
//! N = 2 * max_connections          two per relayed connection (client, target)
//!   + 64                           listeners, logs, eBPF maps and ring buffers,
//!                                  the runtime's epoll and wakeup descriptors
//!   + 64                           the metrics endpoint's connection cap
//!   + 1                            the one connection past that cap, accepted
//!                                  only to be closed
//! ```
//!
//! so N = 20,000 holds 9,935 relayed connections, and however many clients
//! the metrics endpoint meets it never takes a descriptor the forwarder's
//! connections were counted on. Below 8 × 129 = 1,032 descriptors the
//! reserve shrinks to an eighth of the limit, so a tiny limit still relays
//! more than a handful of connections; there accept's backoff on EMFILE is
//! what keeps the relay alive.

use nix::sys::resource::{Resource, getrlimit, setrlimit};

use crate::metrics::EndpointLimits;

/// Descriptors of everything but relayed connections and the metrics endpoint.
const BASE_RESERVED_FDS: u64 = 64;

/// Descriptors kept aside from relayed connections (an eighth of a small
/// limit). The cap is a first line of defence: accept still backs off on
/// EMFILE when the estimate is short.
const RESERVED_FDS: u64 = BASE_RESERVED_FDS + EndpointLimits::DEFAULT.max_connections as u64 + 1;

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns the new soft limit.
pub fn raise_nofile() -> nix::Result<u64> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(hard)
}

/// How many relayed connections `nofile` descriptors can hold (two each),
/// so `--max-connections` can pause accepting before accept fails with EMFILE.
pub fn connections_for(nofile: u64) -> usize {
    usize::try_from(nofile.saturating_sub(RESERVED_FDS.min(nofile / 8)) / 2)
        .unwrap_or(usize::MAX)
        .max(1)
}

/// Every route gets at most what the open-file limit holds (two
/// descriptors per connection), and the default where none was asked.
pub fn fit_connections(spec: &mut crate::config::Spec) {
    let nofile = raise_nofile().unwrap_or_else(|err| {
        tracing::warn!(error = %err, "cannot raise the open-file limit; the relay may run out of descriptors early");
        getrlimit(Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft)
    });
    let fits = u32::try_from(connections_for(nofile)).unwrap_or(u32::MAX);
    for route in &mut spec.routes {
        route.max_connections = Some(match route.max_connections {
            Some(asked) if asked > fits => {
                tracing::warn!(
                    route = %route.name,
                    requested = asked,
                    nofile,
                    max_connections = fits,
                    "--max-connections lowered to what the open-file limit holds (two descriptors per connection)"
                );
                fits
            }
            Some(asked) => asked,
            None => crate::config::DEFAULT_MAX_CONNECTIONS.min(fits),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_descriptors_per_connection_after_the_reserve() {
        assert_eq!(RESERVED_FDS, 129, "the budget in the module doc");
        assert_eq!(connections_for(20_000), 9_935);
        assert_eq!(connections_for(1_048_576), 524_223);
        assert_eq!(connections_for(1_032), 451);
        assert_eq!(connections_for(64), 28);
        assert_eq!(
            connections_for(1),
            1,
            "a tiny limit still allows one connection"
        );
    }
}
