//! The contract every data path keeps: what a pump is, and the shared
//! state it reports through. `copy`, `splice` and `sockmap` each implement
//! a pump over it; `connection` runs two of them, one per direction, and
//! turns their results into the connection's end. Nothing here moves bytes.
//!
//! A pump moves one direction, `src` to `dst`, and:
//! - runs until EOF on `src`, then passes it on as `shutdown(SHUT_WR)` on
//!   `dst` and returns the [`Eof`]; the other direction keeps flowing;
//! - returns the first error with the [`Leg`] it came from, and leaves the
//!   reset to the connection;
//! - adds bytes to its [`Counters`] once `dst` has taken them, and touches
//!   the [`Activity`] clock, so the idle timer sees them;
//! - calls [`Activity::hold`] once it holds bytes read from `src` and
//!   [`Activity::release`] once they are written: it can be dropped at any
//!   await (by the idle or drain timer), and a hold left raised is how the
//!   close learns that it cuts a transfer;
//! - holds no buffer or pipe while its direction is idle.

use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use prometheus::IntCounter;
use tokio::time::Instant;

use super::dump::Dump;

/// The result of one direction: how its source ended, or which leg failed.
pub(super) type Direction = Result<Eof, (Leg, io::Error)>;

/// How a direction's source ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Eof {
    Clean,
    /// A TLS peer closed TCP without sending close_notify first.
    WithoutCloseNotify,
}

/// Which socket of a direction an error came from.
#[derive(Debug, Clone, Copy)]
pub(super) enum Leg {
    Source,
    Destination,
}

impl Leg {
    /// The end of the connection this leg is, given the direction's two.
    pub(super) fn or<T>(self, source: T, destination: T) -> T {
        match self {
            Leg::Source => source,
            Leg::Destination => destination,
        }
    }
}

/// A direction's counters: the route's metric and the connection's total;
/// and, when the route dumps its traffic (socat's `-v`/`-x`), the dump and
/// whether this direction goes to the target.
#[derive(Clone, Copy)]
pub(super) struct Counters<'a> {
    pub(super) metric: &'a IntCounter,
    pub(super) total: &'a AtomicU64,
    pub(super) dump: Option<(&'a Dump, bool)>,
    /// socat's `crlf` on the source (its CRs are dropped) or on the
    /// destination (NL goes as CR NL). Only the copy path converts; a
    /// route with `crlf` copies.
    pub(super) crlf: LineEnds,
    /// socat's `-b`: the copy path's buffer at most this many bytes
    /// (`None`: its own maximum).
    pub(super) block: Option<usize>,
}

/// socat's `crlf` conversions of one direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct LineEnds {
    pub(super) strip_cr: bool,
    pub(super) add_cr: bool,
}

impl LineEnds {
    /// Converts a block just read, as socat does: every CR dropped (a
    /// source with `crlf`), then every NL written as CR NL (a destination
    /// with `crlf`). No state crosses blocks, so a CR NL split between two
    /// reads converts as one.
    pub(super) fn convert(self, block: &mut Vec<u8>) {
        if self.strip_cr {
            block.retain(|&b| b != b'\r');
        }
        if self.add_cr && block.contains(&b'\n') {
            let mut out = Vec::with_capacity(block.len() + block.len() / 8 + 1);
            for &b in block.iter() {
                if b == b'\n' {
                    out.push(b'\r');
                }
                out.push(b);
            }
            *block = out;
        }
    }
}

impl Counters<'_> {
    /// Shows a block just read in the route's dump, before it is written
    /// (socat's order). Only the copy path sees blocks; a dumping route
    /// copies.
    pub(super) fn show(self, bytes: &[u8]) {
        if let Some((dump, to_target)) = self.dump {
            dump.write(to_target, self.total.load(Ordering::Relaxed), bytes);
        }
    }

    /// Counts `n` bytes that reached the destination.
    pub(super) fn add(self, n: u64) {
        self.metric.inc_by(n);
        self.total.fetch_add(n, Ordering::Relaxed);
    }
}

/// The time of the last byte relayed either way, as nanoseconds since the
/// relay phase began; both directions update it, the idle timer reads it.
pub(super) struct Activity {
    start: Instant,
    last: AtomicU64,
    /// Directions holding bytes read from one side and not yet written to
    /// the other. A pump raises it after a read and lowers it after the
    /// write; a pump dropped in between (by a timer) leaves it raised,
    /// which is how the close learns that it cuts a transfer.
    held: AtomicU32,
}

impl Activity {
    pub(super) fn new() -> Self {
        Activity {
            start: Instant::now(),
            last: AtomicU64::new(0),
            held: AtomicU32::new(0),
        }
    }

    /// A direction now holds bytes it has yet to write.
    pub(super) fn hold(&self) {
        self.held.fetch_add(1, Ordering::Relaxed);
    }

    /// The bytes of [`Activity::hold`] were written.
    pub(super) fn release(&self) {
        self.held.fetch_sub(1, Ordering::Relaxed);
    }

    /// Whether a direction holds bytes it has yet to write.
    pub(super) fn holding(&self) -> bool {
        self.held.load(Ordering::Relaxed) > 0
    }

    pub(super) fn touch(&self) {
        let nanos = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last.store(nanos, Ordering::Relaxed);
    }

    fn deadline(&self, idle: Duration) -> Instant {
        self.start + Duration::from_nanos(self.last.load(Ordering::Relaxed)) + idle
    }

    /// Completes when nothing has moved for `idle`. `refresh` brings in
    /// bytes the kernel moved without the pumps seeing them (the sockmap
    /// path), so they count as activity before the verdict.
    pub(super) async fn idle_for(&self, idle: Duration, refresh: &(dyn Fn() + Sync)) {
        loop {
            let mut deadline = self.deadline(idle);
            if Instant::now() >= deadline {
                refresh();
                deadline = self.deadline(idle);
                if Instant::now() >= deadline {
                    return;
                }
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::LineEnds;

    fn convert(strip_cr: bool, add_cr: bool, text: &[u8]) -> Vec<u8> {
        let mut block = text.to_vec();
        LineEnds { strip_cr, add_cr }.convert(&mut block);
        block
    }

    #[test]
    fn crlf_converts_as_socat_byte_for_byte() {
        assert_eq!(convert(false, true, b"a\nb\r\n"), b"a\r\nb\r\r\n");
        assert_eq!(convert(true, false, b"a\r\nb\rc"), b"a\nbc");
        assert_eq!(convert(true, true, b"a\r\n"), b"a\r\n");
        assert_eq!(convert(false, false, b"a\r\n"), b"a\r\n");
    }
}
