//! relay: a network relay and observer for Linux hosts that run containers.
//!
//! The binary (`main.rs`) only parses the command line and calls into this
//! library: [`addr`] parses addresses, [`forward`] relays connections (with
//! [`tls`] on either leg), [`netns`] resolves containers and namespaces,
//! [`observe`] counts their traffic with eBPF, [`metrics`] keeps and serves
//! the Prometheus registry (and `/healthz`, from [`health`]).

pub mod addr;
pub mod config;
pub mod duration;
pub mod forward;
pub mod health;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod netns;
pub mod observe;
pub mod pcapng;
pub mod run;
pub mod socat_flags;
pub mod socat_table;
pub mod tls;
pub mod udp;
