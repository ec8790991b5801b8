//! Waiting for things to become true, by polling with a deadline.
//!
//! Tests never sleep a fixed time hoping a peer is ready; they poll the
//! condition every few milliseconds and fail with what they waited for.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};

/// How often [`poll_until`] re-checks its condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Call `check` until it returns `Some`, or fail after `timeout`.
///
/// `what` completes the sentence "timed out after 5s waiting for ...".
/// `check` returning `Err` aborts the wait with that error.
pub fn poll_until<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check()? {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}
