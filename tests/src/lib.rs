//! Test harness for relay's integration tests.
//!
//! The tests under `tests/tests/` drive the real `relay` binary against real
//! peers (socat, nginx, and small Rust servers) on loopback and inside network
//! namespaces that the harness creates and removes. This crate owns the
//! plumbing; the tests own the assertions about relay's behaviour.
//!
//! One module per concern:
//! - [`gate`]: skip tests that need root or a missing tool, and say so.
//! - [`wait`]: polling for a condition with a deadline (never fixed sleeps).
//! - [`ports`]: free ports, and who listens where (`/proc/<pid>/net/tcp`).
//! - [`config_file`]: `relay run -c` files of routes.
//! - [`load`]: clients opening connections at a steady rate, each payload
//!   checked, counting refused and reset ones.
//! - [`tempdir`]: scratch directories removed on drop.
//! - [`child`]: external processes killed (with their process group) on drop.
//! - [`crafted`]: packets with chosen addresses, ports and flags (pnet), and
//!   reading them back out of a capture with tshark.
//! - [`netns`]: network namespaces with a veth pair to the host.
//! - [`shaper`]: a namespace reached over a TUN link with added delay and
//!   loss, shaped in userspace (no `tc netem` on this kernel).
//! - [`namespaced`]: busybox httpd in a container, an `ip netns` or a pid's
//!   namespace, named as relay targets; the namespace's counters and TC hooks.
//! - [`containerd`]: a private containerd driven with `ctr`, as on a
//!   Kubernetes node.
//! - [`observed`]: `relay observe`'s counters next to the kernel's, read quietly.
//! - [`fleet`]: `relay observe containers`: attached, detached, counted.
//! - [`relay_proc`]: locating, spawning, signalling and scraping `relay`.
//! - [`metrics`]: parsing the Prometheus text relay serves.
//! - [`notify`]: a service manager's end of sd_notify(3), for `NOTIFY_SOCKET`.
//! - [`payload`]: deterministic payloads and their SHA-256 fingerprints.
//! - [`peers`]: Rust servers with scripted behaviour (echo, sink, source).
//! - [`tools`]: external peers: socat, nginx, promtool.
//! - [`prometheus`]: a real Prometheus scraping relays, queried over its HTTP API.
//! - [`http`]: a minimal HTTP/1.0 GET over a given stream.
//! - [`certs`]: a throwaway PKI (CA, server and client certificates) made at run time.
//! - [`tls_client`]: an in-process TLS client whose every step a test steers.
//! - [`interactive`]: external clients driven through stdin/stdout.
//! - [`openssl`]: `openssl s_server` / `s_client` as TLS peers.
//! - [`redis`]: a TLS-only redis-server, and redis-cli.
//! - [`tshark`]: loopback captures, read back decrypted with a key log.

pub mod certs;
pub mod child;
pub mod config_file;
pub mod containerd;
pub mod crafted;
pub mod docker;
pub mod fleet;
pub mod gate;
pub mod http;
pub mod interactive;
pub mod load;
pub mod metrics;
pub mod namespaced;
pub mod netns;
pub mod notify;
pub mod observed;
pub mod openssl;
pub mod payload;
pub mod peers;
pub mod ports;
pub mod prometheus;
pub mod proxies;
pub mod redis;
pub mod relay_proc;
pub mod shaper;
pub mod tempdir;
pub mod tls_client;
pub mod tools;
pub mod tshark;
pub mod wait;

pub use metrics::Scrape;
pub use netns::NetNs;
pub use payload::{Fingerprint, Payload};
pub use relay_proc::{Relay, RelayCmd};
pub use shaper::ShapedLink;
