//! Telling the service manager how the run goes (sd_notify(3), for
//! `Type=notify` units): `READY=1` once every route listens and every
//! observer is attached, `RELOADING=1` when a reload begins and `READY=1`
//! when it is over (whatever its outcome, which `STATUS=` says),
//! `STOPPING=1` when a stop signal begins the drain.
//!
//! Nothing is sent when `NOTIFY_SOCKET` is unset (relay started by hand or
//! by anything but systemd). A failure to send is logged once and never
//! fatal: a relay that serves should not stop because its manager stopped
//! listening. The datagrams are written by `sd-notify`; see `inherited`
//! for why that crate.
//!
//! Not here: when those moments are (the supervisor, `run`, calls in).

use std::sync::atomic::{AtomicBool, Ordering};

use sd_notify::NotifyState;

/// The supervisor's line to the service manager.
#[derive(Debug, Default)]
pub struct Notify {
    /// A send failed already (logged once).
    failed: AtomicBool,
}

impl Notify {
    pub fn new() -> Self {
        Notify::default()
    }

    /// Serving: the start is done, or a reload is over (`status` says how it went).
    pub fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    /// A reload begins. systemd 253 and later want the monotonic clock's
    /// time beside it (`Type=notify-reload` fails the reload without it).
    pub fn reloading(&self) {
        let mut states = vec![
            NotifyState::Reloading,
            NotifyState::Status("reloading the config file"),
        ];
        match NotifyState::monotonic_usec_now() {
            Ok(now) => states.push(now),
            Err(err) => {
                tracing::warn!(error = %err, "cannot read the monotonic clock for MONOTONIC_USEC")
            }
        }
        self.send(&states);
    }

    /// The drain begins.
    pub fn stopping(&self, status: &str) {
        self.send(&[NotifyState::Stopping, NotifyState::Status(status)]);
    }

    fn send(&self, states: &[NotifyState]) {
        if let Err(err) = sd_notify::notify(states)
            && !self.failed.swap(true, Ordering::Relaxed)
        {
            let socket = std::env::var_os("NOTIFY_SOCKET").unwrap_or_default();
            tracing::warn!(
                error = %err,
                socket = %socket.to_string_lossy(),
                "cannot notify the service manager (NOTIFY_SOCKET); relay goes on serving, and says this once"
            );
        }
    }
}
