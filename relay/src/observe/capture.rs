//! Packet capture: the options (`--pcap`, `--filter`, `--sample`, ...), and
//! the thread that moves samples from the kernel's ring buffer into a
//! pcapng [`Sink`].
//!
//! The kernel side (filter, sampling, flow head, snap length, ring size) is
//! fixed when the programs load ([`KernelCapture`]); this module owns the
//! userspace side. One thread per attached observer: it waits on the ring
//! buffer's fd with poll(2), drains every record, writes and flushes in
//! small batches (so `--pcap -` shows packets live), and at the end stops
//! the kernel side, drains what is left and writes the interface
//! statistics blocks with the kernel's exact counts.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use aya::maps::{MapData, RingBuf};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use super::filter::{Filter, FilterError};
use super::maps::{CaptureStat, CaptureStats, Direction, SampleHeader};
use super::samples::{self, WallClock};
use super::sink::{Output, Sink, SinkError, SinkOptions};
use super::{ObserveError, Observer};
use crate::pcapng::{self, Statistics};

/// How long the thread sleeps in poll(2): the kernel wakes it only when the
/// ring buffer is a quarter full, so this is how long a sample may wait to
/// be written (and flushed, for `--pcap -`), and the reaction time to a stop.
const POLL_EVERY: Duration = Duration::from_millis(10);
/// After the kernel side is told to stop, how long programs already
/// running get to finish their sample before the last drain.
const SETTLE: Duration = Duration::from_millis(20);

/// With `--pcap-embed-keys`, how long packets wait before they are written,
/// so a TLS secret logged just after the packet that carried its handshake
/// (TLS 1.3 derives the handshake keys from the ServerHello that arrives
/// encrypted records after it) still goes in before it: readers that make
/// one pass, like tshark, then decrypt the whole session.
const KEY_HOLD: Duration = Duration::from_millis(100);

/// The largest snap length (RELAY_SNAPLEN_MAX in observe.h).
pub const SNAPLEN_MAX: u32 = 262_144;

/// Capture flags, shared by `relay observe` and `relay forward --observe`.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Capture (pcapng)")]
pub struct CaptureArgs {
    /// Write sampled packets as pcapng to FILE, or `-` for stdout (`| wireshark -k -i -`).
    #[arg(long, value_name = "FILE|-")]
    pub pcap: Option<Output>,
    /// Which packets, as tcpdump's expression says (pcap-filter(7): `tcp port 80`,
    /// `tcp[tcpflags] & tcp-syn != 0`, `not arp`, ...): compiled by libpcap, run in the kernel.
    #[arg(long, value_name = "EXPR", requires = "pcap", value_parser = parse_filter)]
    pub filter: Option<Filter>,
    /// Only packets arriving at the interfaces (in) or leaving them (out), decided in the
    /// kernel beside --filter (tcpdump's -Q in|out).
    #[arg(long, value_name = "in|out", requires = "pcap", value_parser = parse_direction)]
    pub direction: Option<Direction>,
    /// Keep all matching packets, none (with --flow-head: only flow heads) or 1 in N (per CPU).
    #[arg(long, value_name = "all|none|1/N", default_value = "all", requires = "pcap", value_parser = parse_sample)]
    pub sample: u32,
    /// Also keep the first K packets of every flow, and every SYN, FIN and RST, whatever --sample says.
    #[arg(long, value_name = "K", default_value_t = 0, requires = "pcap")]
    pub flow_head: u32,
    /// Bytes kept of each packet (from the link-layer header).
    #[arg(long, default_value_t = SNAPLEN_MAX, requires = "pcap",
          value_parser = clap::value_parser!(u32).range(1..=i64::from(SNAPLEN_MAX)))]
    pub snaplen: u32,
    /// Size of the kernel ring buffer samples wait in: a power of two, at least 4K (e.g. 64K, 8M).
    #[arg(long, value_name = "BYTES", default_value = "8M", requires = "pcap", value_parser = parse_ring_size)]
    pub ring_size: u32,
    /// Start a new file when the current one would grow past this size (FILE becomes FILE-00000, -00001 ...).
    #[arg(long, value_name = "BYTES", requires = "pcap", value_parser = parse_bytes)]
    pub rotate_size: Option<u64>,
    /// With --rotate-size: keep only the newest N files.
    #[arg(long, value_name = "N", requires = "rotate_size", value_parser = clap::value_parser!(u32).range(1..))]
    pub rotate_count: Option<u32>,
    /// With a TLS route (relay forward --observe): put the TLS key log into the pcapng
    /// (decryption secrets blocks), so Wireshark decrypts it with no key log file.
    #[arg(long, requires = "pcap")]
    pub pcap_embed_keys: bool,
}

/// The ring buffer's size when none is given (`--ring-size 8M`).
pub const DEFAULT_RING_BYTES: u32 = 8 << 20;

pub fn parse_filter(text: &str) -> Result<Filter, FilterError> {
    Filter::parse(text)
}

/// `in` (`inbound`, `ingress`) or `out` (`outbound`, `egress`).
pub fn parse_direction(text: &str) -> Result<Direction, String> {
    match text {
        "in" | "inbound" | "ingress" => Ok(Direction::Ingress),
        "out" | "outbound" | "egress" => Ok(Direction::Egress),
        _ => Err(format!(
            "`{text}` is not in or out (leave --direction out for both)"
        )),
    }
}

/// `all` (1), `none` (0) or `1/N`.
pub fn parse_sample(text: &str) -> Result<u32, String> {
    match text {
        "all" => Ok(1),
        "none" => Ok(0),
        _ => text
            .strip_prefix("1/")
            .and_then(|n| n.parse::<u32>().ok())
            .filter(|n| *n >= 1)
            .ok_or_else(|| format!("`{text}` is not all, none or 1/N (N >= 1)")),
    }
}

/// `4096`, `64K`, `8M`, `1G` (powers of 1024).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => text.split_at(at),
        None => (text, ""),
    };
    let scale: u64 = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        _ => return Err(format!("`{text}`: unknown unit `{unit}` (use K, M or G)")),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("`{text}` is not a size such as 4096, 64K or 8M"))
}

pub fn parse_ring_size(text: &str) -> Result<u32, String> {
    let bytes = parse_bytes(text)?;
    u32::try_from(bytes)
        .ok()
        .filter(|b| b.is_power_of_two() && *b >= 4096)
        .ok_or_else(|| {
            format!("`{text}`: the ring buffer size must be a power of two from 4K to 2G")
        })
}

/// What the kernel program is loaded with.
#[derive(Debug, Clone)]
pub struct KernelCapture {
    pub filter: Filter,
    /// Only this direction (`--direction`); None: both.
    pub direction: Option<Direction>,
    /// 1: all; 0: none (flow heads only); N: 1 in N.
    pub sample_every: u32,
    pub flow_head: u32,
    pub snaplen: u32,
    pub ring_bytes: u32,
}

/// A capture to run beside an observer.
#[derive(Debug, Clone)]
pub struct CaptureOptions {
    pub kernel: KernelCapture,
    pub sink: SinkOptions,
    /// TLS key log lines to embed (`--pcap-embed-keys`).
    pub keys: Option<Arc<KeyLines>>,
}

/// TLS key log lines on their way into the capture: the TLS side appends,
/// the capture thread writes the new ones before the packets it drains
/// next (a handshake's secrets are logged before its first encrypted
/// record is sent), and every line again at the start of a rotated file.
#[derive(Debug, Default)]
pub struct KeyLines {
    lines: Mutex<(Vec<u8>, usize)>,
}

impl KeyLines {
    /// Appends one NSS key log line.
    pub fn push(&self, line: &[u8]) {
        let mut lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        lines.0.extend_from_slice(line);
    }

    /// The lines not handed out yet.
    fn take_new(&self) -> Vec<u8> {
        let mut lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        let (all, written) = &mut *lines;
        let new = all[*written..].to_vec();
        *written = all.len();
        new
    }

    /// Every line so far.
    fn all(&self) -> Vec<u8> {
        self.lines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clone()
    }
}

impl CaptureArgs {
    /// The options, or None without `--pcap`.
    pub fn options(&self) -> Option<CaptureOptions> {
        let output = self.pcap.clone()?;
        Some(CaptureOptions {
            kernel: KernelCapture {
                filter: self.filter.clone().unwrap_or_default(),
                direction: self.direction,
                sample_every: self.sample,
                flow_head: self.flow_head,
                snaplen: self.snaplen,
                ring_bytes: self.ring_size,
            },
            sink: SinkOptions {
                output,
                rotate_size: self.rotate_size,
                rotate_count: self.rotate_count,
            },
            keys: self.pcap_embed_keys.then(|| Arc::new(KeyLines::default())),
        })
    }
}

/// Why a capture stopped early.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Observe(#[from] ObserveError),
}

/// The capture thread of one observer; [`Capture::finish`] ends it cleanly.
pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<(), Arc<CaptureError>>>>,
}

/// One interface of the observer, as the pcapng file knows it.
struct Known {
    id: u32,
    delivered: u64,
}

impl Capture {
    /// Takes the observer's ring buffer, adds its interfaces to `sink`
    /// (named `<iface>@<target>`, described by `description`) and starts
    /// the thread. `on_failure` is called (from the thread) with the error
    /// when writing fails, so the run can stop.
    pub fn start(
        observer: Arc<Observer>,
        sink: Arc<Mutex<Sink>>,
        description: &str,
        snaplen: u32,
        keys: Option<Arc<KeyLines>>,
        on_failure: impl FnOnce(Arc<CaptureError>) + Send + 'static,
    ) -> Result<Self, ObserveError> {
        let ring = observer.take_samples()?;
        let mut known = HashMap::new();
        {
            let mut sink = sink.lock().unwrap_or_else(|p| p.into_inner());
            for iface in observer.interfaces() {
                let id = sink.add_interface(pcapng::Interface {
                    name: format!("{}@{}", iface.name, observer.target()),
                    description: format!("{} in {description}", iface.name),
                    linktype: if iface.l2_len == 0 {
                        pcapng::LINKTYPE_RAW
                    } else {
                        pcapng::LINKTYPE_ETHERNET
                    },
                    snaplen,
                });
                known.insert(iface.index, Known { id, delivered: 0 });
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name("relay-capture".into())
            .spawn(move || {
                let mut worker = Worker {
                    observer,
                    sink,
                    ring,
                    known,
                    keys,
                    held: std::collections::VecDeque::new(),
                    clock: WallClock::measure(),
                    start_ns: 0,
                };
                worker.start_ns = worker.clock.now_ns();
                let result = worker.run(&thread_stop).map_err(Arc::new);
                if let Err(err) = &result {
                    // Stop the kernel side too: nothing reads the ring any more.
                    worker.observer.stop_capture();
                    on_failure(err.clone());
                }
                result
            })
            .map_err(|source| ObserveError::Thread {
                what: "capture",
                source,
            })?;
        Ok(Capture {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the kernel side, writes what is left and the statistics
    /// blocks, and waits for the thread. Blocks: call it off async workers.
    pub fn finish(mut self) -> Result<(), Arc<CaptureError>> {
        self.stop.store(true, Ordering::Release);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(panic)) => std::panic::resume_unwind(panic),
            None => Ok(()),
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

struct Worker {
    observer: Arc<Observer>,
    sink: Arc<Mutex<Sink>>,
    ring: RingBuf<MapData>,
    known: HashMap<u32, Known>,
    keys: Option<Arc<KeyLines>>,
    /// With keys: samples waiting [`KEY_HOLD`] for the secrets that decrypt them.
    held: std::collections::VecDeque<Held>,
    clock: WallClock,
    start_ns: u64,
}

impl Worker {
    fn run(&mut self, stop: &AtomicBool) -> Result<(), CaptureError> {
        loop {
            let stopping = stop.load(Ordering::Acquire);
            if stopping {
                // Programs that already read the flag finish within SETTLE;
                // after it, the ring holds every sample there will be.
                self.observer.stop_capture();
                std::thread::sleep(SETTLE);
            } else {
                let mut fds = [PollFd::new(self.ring.as_fd(), PollFlags::POLLIN)];
                let timeout = PollTimeout::try_from(POLL_EVERY).unwrap_or(PollTimeout::MAX);
                match poll(&mut fds, timeout) {
                    Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                    Err(errno) => {
                        return Err(ObserveError::Poll(errno).into());
                    }
                }
            }
            self.drain(stopping)?;
            if stopping {
                let stats = self.statistics()?;
                let mut sink = self.sink.lock().unwrap_or_else(|p| p.into_inner());
                sink.statistics(&stats);
                sink.flush()?;
                return Ok(());
            }
        }
    }

    /// Writes every record waiting in the ring buffer, then flushes. With
    /// embedded keys, packets are held for [`KEY_HOLD`] first and the keys
    /// logged meanwhile go in before them (`last`: write everything).
    fn drain(&mut self, last: bool) -> Result<(), CaptureError> {
        let Worker {
            observer,
            sink,
            ring,
            known,
            keys,
            held,
            clock,
            start_ns,
        } = self;
        let mut sink = sink.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Writer {
            sink: &mut sink,
            observer,
            known,
            keys: keys.as_deref(),
            clock,
            start_ns: *start_ns,
        };
        while let Some(record) = ring.next() {
            let Some(sample) = samples::parse(&record) else {
                continue;
            };
            if keys.is_some() {
                held.push_back(Held::of(&sample));
            } else {
                out.packet(&sample.header, sample.data)?;
            }
        }
        if let Some(keys) = keys.as_deref() {
            let new = keys.take_new();
            if !new.is_empty() {
                out.sink.key_log(&new);
            }
            let cutoff = if last {
                u64::MAX
            } else {
                samples::monotonic_ns().saturating_sub(KEY_HOLD.as_nanos() as u64)
            };
            while held.front().is_some_and(|h| h.header.ts_ns <= cutoff) {
                let h = held.pop_front().expect("invariant: front() was Some");
                out.packet(&h.header, &h.data)?;
            }
        }
        sink.flush()?;
        Ok(())
    }

    fn statistics(&self) -> Result<Vec<(Statistics, String)>, CaptureError> {
        statistics(&self.observer, &self.known, &self.clock, self.start_ns)
    }
}

/// A sample copied out of the ring buffer, waiting for its keys.
struct Held {
    header: SampleHeader,
    data: Vec<u8>,
}

impl Held {
    fn of(sample: &samples::Sample<'_>) -> Self {
        Held {
            header: sample.header,
            data: sample.data.to_vec(),
        }
    }
}

/// Writing one drain's packets: rotation, statistics and keys as they fall due.
struct Writer<'a> {
    sink: &'a mut Sink,
    observer: &'a Observer,
    known: &'a mut HashMap<u32, Known>,
    keys: Option<&'a KeyLines>,
    clock: &'a WallClock,
    start_ns: u64,
}

impl Writer<'_> {
    fn packet(&mut self, header: &SampleHeader, data: &[u8]) -> Result<(), CaptureError> {
        if !self.known.contains_key(&header.ifindex) {
            return Ok(());
        }
        let block_len = 44 + data.len().next_multiple_of(4);
        if self.sink.rotation_due(block_len) {
            let stats = statistics(self.observer, self.known, self.clock, self.start_ns)?;
            self.sink.rotate(&stats)?;
            if let Some(keys) = self.keys {
                // Each file decrypts on its own.
                let all = keys.all();
                if !all.is_empty() {
                    self.sink.key_log(&all);
                }
            }
        }
        let known = self
            .known
            .get_mut(&header.ifindex)
            .expect("invariant: checked above");
        self.sink.packet(&pcapng::Packet {
            interface: known.id,
            timestamp_ns: self.clock.unix_ns(header.ts_ns),
            original_len: header.len,
            data,
            direction: if header.direction == 0 {
                pcapng::Direction::Inbound
            } else {
                pcapng::Direction::Outbound
            },
        })?;
        known.delivered += 1;
        Ok(())
    }
}

/// One statistics block per interface, from the kernel's counts.
fn statistics(
    observer: &Observer,
    known: &HashMap<u32, Known>,
    clock: &WallClock,
    start_ns: u64,
) -> Result<Vec<(Statistics, String)>, CaptureError> {
    {
        let counts: CaptureStats = observer.capture_stats()?;
        let now = clock.now_ns();
        let mut blocks: Vec<(Statistics, String)> = known
            .iter()
            .map(|(ifindex, known)| {
                let get = |stat| counts.get(&(*ifindex, stat)).copied().unwrap_or(0);
                let matched = get(CaptureStat::Matched);
                (
                    Statistics {
                        interface: known.id,
                        timestamp_ns: now,
                        start_ns,
                        received: matched + get(CaptureStat::Filtered),
                        dropped: get(CaptureStat::RingFull),
                        filter_accept: matched,
                        delivered: known.delivered,
                    },
                    format!(
                        "relay: matched {matched}, sampled out {}, ring buffer full {}, cut to the snap length {}",
                        get(CaptureStat::Sampled),
                        get(CaptureStat::RingFull),
                        get(CaptureStat::Truncated)
                    ),
                )
            })
            .collect();
        blocks.sort_by_key(|(s, _)| s.interface);
        Ok(blocks)
    }
}

/// The capture of a whole run: one output, and the capture thread of the
/// observer attached now (a new one after each re-attach with --follow,
/// its interfaces added to the same output).
pub struct CaptureRun {
    sink: Arc<Mutex<Sink>>,
    snaplen: u32,
    keys: Option<Arc<KeyLines>>,
    current: Option<Capture>,
    failed_tx: tokio::sync::watch::Sender<Option<Arc<CaptureError>>>,
    failed_rx: tokio::sync::watch::Receiver<Option<Arc<CaptureError>>>,
}

impl CaptureRun {
    /// Opens the output (an unwritable path fails here, before attaching)
    /// and registers `relay_observe_pcap_bytes_written_total`.
    pub fn open(
        options: &CaptureOptions,
        target: &str,
        registry: &prometheus::Registry,
    ) -> Result<Self, ObserveError> {
        let host = nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default();
        let uname = nix::sys::utsname::uname().ok();
        let section = pcapng::Section {
            hardware: uname
                .as_ref()
                .map(|u| u.machine().to_string_lossy().into_owned())
                .unwrap_or_default(),
            os: uname
                .as_ref()
                .map(|u| {
                    format!(
                        "{} {}",
                        u.sysname().to_string_lossy(),
                        u.release().to_string_lossy()
                    )
                })
                .unwrap_or_default(),
            application: format!("relay {}", env!("CARGO_PKG_VERSION")),
            comment: format!(
                "relay observe {target} on host {host}; filter: {}{}",
                if options.kernel.filter.text().is_empty() {
                    "(all)"
                } else {
                    options.kernel.filter.text()
                },
                match options.kernel.direction {
                    None => "",
                    Some(Direction::Ingress) => "; direction: in",
                    Some(Direction::Egress) => "; direction: out",
                }
            ),
        };
        let mut sink = Sink::open(options.sink.clone(), section)?;
        let bytes = prometheus::IntCounter::new(
            "relay_observe_pcap_bytes_written_total",
            "Bytes of pcapng written by --pcap (all files, or stdout).",
        )
        .expect("static metric definition is valid");
        if let Err(err) = registry.register(Box::new(bytes.clone())) {
            tracing::debug!(error = %err, "pcap bytes counter already registered");
        }
        sink.count_bytes(bytes);
        let (failed_tx, failed_rx) = tokio::sync::watch::channel(None);
        Ok(CaptureRun {
            sink: Arc::new(Mutex::new(sink)),
            snaplen: options.kernel.snaplen,
            keys: options.keys.clone(),
            current: None,
            failed_tx,
            failed_rx,
        })
    }

    /// Starts capturing from a freshly attached observer.
    pub fn attach(
        &mut self,
        observer: &Arc<Observer>,
        netns: &crate::netns::Netns,
    ) -> Result<(), ObserveError> {
        let description = format!(
            "{} (network namespace {})",
            netns.target().spec(),
            netns.id()
        );
        let failed = self.failed_tx.clone();
        self.current = Some(Capture::start(
            observer.clone(),
            self.sink.clone(),
            &description,
            self.snaplen,
            self.keys.clone(),
            move |err| {
                failed.send_replace(Some(err));
            },
        )?);
        Ok(())
    }

    /// Ends the current observer's capture: the last samples and the
    /// statistics blocks are written.
    pub async fn detach(&mut self) -> Result<(), ObserveError> {
        let Some(capture) = self.current.take() else {
            return Ok(());
        };
        let finished = tokio::task::spawn_blocking(move || capture.finish())
            .await
            .map_err(|source| ObserveError::Join {
                what: "capture",
                source,
            })?;
        finished.map_err(ObserveError::Capture)
    }

    /// Resolves when writing the capture failed (a full disk), with the error.
    pub async fn failed(&mut self) -> Arc<CaptureError> {
        loop {
            if let Some(message) = self.failed_rx.borrow_and_update().clone() {
                return message;
            }
            if self.failed_rx.changed().await.is_err() {
                // The sender lives in self: this does not happen.
                std::future::pending::<()>().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_and_sizes_parse() {
        assert_eq!(parse_sample("all"), Ok(1));
        assert_eq!(parse_sample("none"), Ok(0));
        assert_eq!(parse_sample("1/10"), Ok(10));
        assert!(parse_sample("1/0").unwrap_err().contains("`1/0`"));
        assert!(parse_sample("half").is_err());
        assert_eq!(parse_bytes("64K"), Ok(65536));
        assert_eq!(parse_bytes("1500"), Ok(1500));
        assert_eq!(parse_ring_size("8M"), Ok(8 << 20));
        assert!(parse_ring_size("5000").is_err());
        assert!(parse_ring_size("1K").is_err());
    }
}
