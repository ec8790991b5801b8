//! Process limits a relay needs: every relayed connection costs two file
//! descriptors, and the usual soft limit of 1024 would cap a relay at about
//! 500 connections while the hard limit allows far more.

use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// Descriptors kept aside for listeners, the metrics endpoint, logs and the
/// runtime itself (an eighth of a small limit). The cap is a first line of
/// defence: accept still backs off on EMFILE when the estimate is short.
const RESERVED_FDS: u64 = 64;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_descriptors_per_connection_after_the_reserve() {
        assert_eq!(connections_for(20_000), 9_968);
        assert_eq!(connections_for(1_048_576), 524_256);
        assert_eq!(connections_for(64), 28);
        assert_eq!(
            connections_for(1),
            1,
            "a tiny limit still allows one connection"
        );
    }
}
