//! Process limits a relay needs: every relayed connection costs two file
//! descriptors, and the usual soft limit of 1024 would cap a relay at about
//! 500 connections while the hard limit allows far more.

use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns the new soft limit.
pub fn raise_nofile() -> nix::Result<u64> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(hard)
}
