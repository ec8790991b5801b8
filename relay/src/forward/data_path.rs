//! How bytes move between the two plain TCP sockets of a connection: the
//! user's choice ([`DataPath`], `--data-path`, with what `auto` means on
//! this kernel) and what a route runs on once it is made ([`Engine`]).
//! TLS legs always copy.
//!
//! The paths themselves live beside this module, as siblings over the
//! contract of `pump`: `copy`, `splice` and `sockmap`. This module only
//! chooses, loads what the choice needs, and says why when it falls back.

use std::sync::Arc;

use thiserror::Error;

use super::sockmap::{Sockmap, SockmapError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum DataPath {
    /// The benchmark's winner on this kernel, falling back when the kernel refuses it.
    #[default]
    Auto,
    /// read/write through an adaptive userspace buffer.
    Copy,
    /// splice(2) through a pipe for bulk batches (no userspace copy), read/write for small ones.
    Splice,
    /// Experimental (needs --experimental-sockmap): an eBPF sk_skb program redirects bytes between the sockets in the kernel.
    Sockmap,
}

/// The command-line switch that opts into the sockmap path.
pub const EXPERIMENTAL_SOCKMAP_FLAG: &str = "--experimental-sockmap";

/// Why sockmap is behind [`EXPERIMENTAL_SOCKMAP_FLAG`]: the defects issue
/// 12 measured on Linux 6.18, which copy and splice do not have. Kept
/// short: it is printed in the refusal and in the opt-in warning.
pub const SOCKMAP_DEFECTS: &str = "it can duplicate bytes toward the client over links with real \
packet boundaries (veth, TUN), reset about half the connections that write 4 MiB and then \
shut down writing, and has no backpressure (a target that does not read lets one client \
queue without bound in the kernel)";

/// A data path that was asked for without the switch it needs.
#[derive(Debug, Error)]
pub enum OptInError {
    #[error(
        "--data-path sockmap is experimental and off unless asked for: {SOCKMAP_DEFECTS}. \
         Use --data-path copy or splice, or pass {EXPERIMENTAL_SOCKMAP_FLAG} to run it anyway"
    )]
    ExperimentalSockmap,
}

/// Refuses `--data-path sockmap` unless `experimental_sockmap` is set: the
/// path loses and corrupts data (see [`SOCKMAP_DEFECTS`]), so running it
/// must be a choice made knowing that, never a default or a typo away.
pub fn require_opt_in(asked: DataPath, experimental_sockmap: bool) -> Result<(), OptInError> {
    if asked == DataPath::Sockmap && !experimental_sockmap {
        return Err(OptInError::ExperimentalSockmap);
    }
    Ok(())
}

/// What `auto` tries, best first, as `cargo xtask bench` measured it on
/// Linux 6.18 on an otherwise idle machine (README, Data paths): copy moved
/// as much as a direct connection on one stream, with the best connection
/// rate and the least memory per idle connection; splice did not beat it
/// here, and sockmap lost every row (its egress redirects go through a
/// kernel work queue). So auto copies.
const AUTO_PREFERENCE: [DataPath; 1] = [DataPath::Copy];

impl DataPath {
    /// The paths a route can run on (not `Auto`).
    pub const CONCRETE: [DataPath; 3] = [DataPath::Copy, DataPath::Splice, DataPath::Sockmap];

    pub fn as_str(self) -> &'static str {
        match self {
            DataPath::Auto => "auto",
            DataPath::Copy => "copy",
            DataPath::Splice => "splice",
            DataPath::Sockmap => "sockmap",
        }
    }
}

/// The data path a route runs on, with the kernel state it needs: what
/// [`DataPath`] becomes once `auto` is resolved and the sockmap program
/// loaded. Every connection of the route moves its plain TCP bytes with it.
#[derive(Clone)]
pub enum Engine {
    /// The adaptive read/write buffer (also every TLS leg).
    Copy,
    /// splice(2) through a pipe for bulk batches.
    Splice,
    /// The loaded sk_skb program and its maps, shared by the route's connections.
    Sockmap(Arc<Sockmap>),
}

impl Engine {
    /// The concrete path this engine runs, as `relay_data_path` names it.
    pub fn path(&self) -> DataPath {
        match self {
            Engine::Copy => DataPath::Copy,
            Engine::Splice => DataPath::Splice,
            Engine::Sockmap(_) => DataPath::Sockmap,
        }
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.path().as_str())
    }
}

/// Resolves `asked`. An explicit `sockmap` that the kernel refuses is an
/// error; under `auto` a refusal is logged once and the next path taken.
pub fn select(asked: DataPath, route: &str) -> Result<Engine, SockmapError> {
    let candidates: &[DataPath] = match asked {
        DataPath::Auto => &AUTO_PREFERENCE,
        DataPath::Copy => &[DataPath::Copy],
        DataPath::Splice => &[DataPath::Splice],
        DataPath::Sockmap => &[DataPath::Sockmap],
    };
    select_from(candidates, asked == DataPath::Auto, route, Sockmap::load)
}

/// The first of `candidates` that loads; with `fall_back`, a refusal moves
/// on to the next, else it is the error.
fn select_from(
    candidates: &[DataPath],
    fall_back: bool,
    route: &str,
    load_sockmap: impl Fn() -> Result<Sockmap, SockmapError>,
) -> Result<Engine, SockmapError> {
    let chose = |engine: Engine| {
        if fall_back {
            tracing::info!(
                route,
                data_path = engine.path().as_str(),
                "data path auto chose"
            );
        }
        engine
    };
    let mut refused = None;
    for &path in candidates {
        match path {
            DataPath::Sockmap => match load_sockmap() {
                Ok(sockmap) => return Ok(Engine::Sockmap(Arc::new(sockmap))),
                Err(err) if fall_back => {
                    tracing::warn!(route, error = %err, "data path auto: sockmap unavailable, falling back");
                    refused = Some(err);
                }
                Err(err) => return Err(err),
            },
            DataPath::Splice => return Ok(chose(Engine::Splice)),
            // `Auto` is what the lists resolve, never one of them.
            DataPath::Copy | DataPath::Auto => return Ok(chose(Engine::Copy)),
        }
    }
    Err(refused.expect("every candidate list ends with a path that needs no kernel support"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockmap_needs_the_experimental_switch_and_auto_never_picks_it() {
        let err = require_opt_in(DataPath::Sockmap, false)
            .expect_err("sockmap without the switch is refused");
        assert!(err.to_string().contains(EXPERIMENTAL_SOCKMAP_FLAG), "{err}");
        assert!(require_opt_in(DataPath::Sockmap, true).is_ok());
        for path in [DataPath::Auto, DataPath::Copy, DataPath::Splice] {
            assert!(
                require_opt_in(path, false).is_ok(),
                "{path:?} needs no switch"
            );
        }
        assert!(!AUTO_PREFERENCE.contains(&DataPath::Sockmap));
    }

    #[test]
    fn auto_ends_with_a_path_that_always_works() {
        assert_eq!(AUTO_PREFERENCE.last(), Some(&DataPath::Copy));
    }

    #[test]
    fn explicit_paths_need_no_kernel_support_except_sockmap() {
        for path in [DataPath::Copy, DataPath::Splice] {
            let engine = select(path, "test").expect("copy and splice always load");
            assert_eq!(engine.path(), path);
        }
    }

    fn refused() -> Result<Sockmap, SockmapError> {
        Err(SockmapError::Load("Operation not permitted".into()))
    }

    #[test]
    fn a_refused_sockmap_falls_back_to_the_next_candidate() {
        let candidates = [DataPath::Sockmap, DataPath::Splice, DataPath::Copy];
        let engine = select_from(&candidates, true, "test", refused).expect("splice is next");
        assert!(matches!(engine, Engine::Splice), "{engine:?}");
    }

    #[test]
    fn an_explicit_sockmap_that_is_refused_is_an_error_naming_the_capabilities() {
        let err = select_from(&[DataPath::Sockmap], false, "test", refused)
            .expect_err("no fallback when sockmap was asked for");
        assert!(err.to_string().contains("CAP_BPF"), "{err}");
    }
}
