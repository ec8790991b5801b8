//! The namespace a target address lives in (`...@container:web`), kept per
//! route and checked again at most once a second, so that after a container
//! restart new connections reach the new namespace without a relay restart.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

use crate::netns::{self, Netns, NetnsError, Target};

/// How long a resolved namespace is trusted before it is checked again.
const RECHECK: Duration = Duration::from_secs(1);

pub struct Namespace {
    target: Target,
    current: Mutex<Option<(Arc<Netns>, Instant)>>,
}

impl Namespace {
    /// Resolves `target` once: at startup a target that does not exist is
    /// the user's mistake and stops the relay.
    pub async fn resolve(target: Target) -> Result<Self, NetnsError> {
        let netns = Arc::new(netns::resolve(&target).await?);
        Ok(Namespace {
            target,
            current: Mutex::new(Some((netns, Instant::now()))),
        })
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    /// The namespace to use now. `recheck` skips the one-second trust, for a
    /// connection that just failed in the namespace it was given.
    pub async fn current(&self, recheck: bool) -> Result<Arc<Netns>, NetnsError> {
        let mut current = self.current.lock().await;
        if let Some((netns, checked)) = current.as_mut() {
            if !recheck && checked.elapsed() < RECHECK {
                return Ok(netns.clone());
            }
            // A daemon that cannot be asked is not proof the target moved.
            if netns.still_current().await.unwrap_or(true) {
                *checked = Instant::now();
                return Ok(netns.clone());
            }
            tracing::info!(namespace = %self.target.spec(), "namespace changed (container restarted?); resolving again");
        }
        *current = None;
        let netns = Arc::new(netns::resolve(&self.target).await?);
        *current = Some((netns.clone(), Instant::now()));
        Ok(netns)
    }
}
