//! The three ways a benchmark client reaches its server: directly, through
//! socat, through relay. [`Hop::start`] puts the forwarder in front of a
//! server port and returns the port the client should dial.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use super::procs::{self, Proc};

/// One way from client to server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    Direct,
    Socat,
    Relay,
}

impl Via {
    pub const ALL: [Via; 3] = [Via::Direct, Via::Socat, Via::Relay];

    pub fn name(self) -> &'static str {
        match self {
            Via::Direct => "direct",
            Via::Socat => "socat",
            Via::Relay => "relay",
        }
    }
}

/// Per-forwarder knobs a section needs.
#[derive(Clone, Copy, Debug, Default)]
pub struct HopOptions {
    /// socat: set TCP_NODELAY on both legs (relay always does).
    pub nodelay: bool,
    /// relay: `--max-connections` (None: relay's default).
    pub max_connections: Option<usize>,
    /// relay: `--data-path` (None: relay's default, auto).
    pub data_path: Option<&'static str>,
}

/// A running forwarder (or none, for `Direct`) and the port to dial.
pub struct Hop {
    pub port: u16,
    pub proc: Option<Proc>,
}

impl Hop {
    /// Put `via` in front of 127.0.0.1:`target_port`; returns once the
    /// forwarder listens (polled in /proc/net/tcp, so no test connection
    /// reaches the server). `label` names the log files.
    pub fn start(
        via: Via,
        target_port: u16,
        relay_bin: &Path,
        label: &str,
        opts: HopOptions,
    ) -> Result<Hop> {
        let port = match via {
            Via::Direct => {
                return Ok(Hop {
                    port: target_port,
                    proc: None,
                });
            }
            _ => procs::free_port()?,
        };
        let cmd = match via {
            Via::Direct => unreachable!("handled above"),
            Via::Socat => {
                let nodelay = if opts.nodelay { ",nodelay" } else { "" };
                let mut cmd = Command::new("socat");
                cmd.arg(format!(
                    "TCP-LISTEN:{port},fork,reuseaddr,bind=127.0.0.1{nodelay}"
                ))
                .arg(format!("TCP:127.0.0.1:{target_port}{nodelay}"));
                cmd
            }
            Via::Relay => {
                let mut cmd = Command::new(relay_bin);
                cmd.arg("forward")
                    .arg(format!("127.0.0.1:{port}"))
                    .arg(format!("127.0.0.1:{target_port}"));
                if let Some(max) = opts.max_connections {
                    cmd.arg("--max-connections").arg(max.to_string());
                }
                if let Some(path) = opts.data_path {
                    cmd.arg("--data-path").arg(path);
                    if path == "sockmap" {
                        // Experimental (known defects); the bench still measures it.
                        cmd.arg("--experimental-sockmap");
                    }
                }
                cmd
            }
        };
        Hop::spawn(via, port, cmd, label)
            .with_context(|| format!("{} in front of port {target_port}", via.name()))
    }

    /// Start `cmd`, a forwarder of kind `via` that will listen on `port`,
    /// and return once it does (for sections that build their own command
    /// line, such as the TLS hops). `label` names the log files.
    pub fn spawn(via: Via, port: u16, cmd: Command, label: &str) -> Result<Hop> {
        let mut proc = Proc::spawn(&format!("{}-{label}", via.name()), cmd)?;
        procs::wait_listening(port, &mut proc, Duration::from_secs(10))
            .with_context(|| format!("{} ({label}) did not come up", via.name()))?;
        Ok(Hop {
            port,
            proc: Some(proc),
        })
    }

    /// Err when the forwarder died during a measurement (its stderr says why).
    pub fn check_alive(&mut self) -> Result<()> {
        match &mut self.proc {
            Some(proc) => proc.check_alive(),
            None => Ok(()),
        }
    }
}
