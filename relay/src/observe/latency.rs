//! Latency histograms the observe program keeps in the kernel: TCP
//! handshakes (`handshakes`: SYN to SYN-ACK) and DNS responses
//! (`dns_latency`: query to response). Their layout (mirroring `struct
//! relay_latency_hist` and the `RELAY_HS_*` constants of
//! relay-ebpf/include/observe.h), reading a per-CPU map into one histogram
//! per direction, and the Prometheus form of a histogram (cumulative `le`
//! buckets in seconds).
//!
//! [`LatencySeries`] is the Prometheus collector of one such family,
//! labelled `target`, `container`, `direction`: the kernel's histogram is
//! already bucketed and cumulative, so it is handed to Prometheus as it is
//! rather than replayed into a `prometheus::Histogram` one observation at a
//! time. What is measured is decided in the kernel (on SYN and SYN-ACK
//! segments, and on DNS messages, only).
//!
//! Buckets are log-linear in microseconds, as HDR histograms are: under
//! 64 us, then every power of two from 64 us to 2^24 us (16.8 s) cut into
//! four equal parts, then the rest (`+Inf`). A bucket is at most a quarter
//! as wide as its lower bound, whatever the latency, so a quantile read
//! from it is within about 12% of the truth; the exact mean comes from
//! `_sum / _count` (the kernel adds nanoseconds).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use aya::maps::{MapData, PerCpuArray};
use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, MetricFamily, MetricType};

/// `RELAY_HS_MIN_LOG2`: the first bound is 2^6 us.
pub const MIN_LOG2: u32 = 6;
/// `RELAY_HS_MAX_LOG2`: latencies from 2^24 us (16.8 s) on are in the last bucket.
pub const MAX_LOG2: u32 = 24;
/// `RELAY_HS_SUB_LOG2`: each power of two is cut into 2^2 parts.
pub const SUB_LOG2: u32 = 2;
const SUB: u32 = 1 << SUB_LOG2;
/// `RELAY_HS_BUCKETS`: under 64 us, the log-linear ones, and the rest.
pub const BUCKETS: usize = (2 + (MAX_LOG2 - MIN_LOG2) * SUB) as usize;

/// `enum relay_handshake_dir`: the index into a latency map (the DNS
/// counters use it too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// The target asked: its SYN out to the peer's SYN-ACK in (the peer's
    /// latency as the target sees it), its DNS query out to the answer in.
    Outbound,
    /// The target answered: a peer's SYN in to its SYN-ACK out, a DNS
    /// query in to its response out.
    Inbound,
}

impl Direction {
    pub const ALL: [Direction; 2] = [Direction::Outbound, Direction::Inbound];

    pub fn raw(self) -> u32 {
        self as u32
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// `struct relay_latency_hist`: one CPU's histogram of one direction.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatencyHist {
    pub sum_ns: u64,
    pub count: [u64; BUCKETS],
}

impl Default for LatencyHist {
    fn default() -> Self {
        LatencyHist {
            sum_ns: 0,
            count: [0; BUCKETS],
        }
    }
}

// SAFETY: #[repr(C)] u64s only: every bit pattern is valid, no padding.
unsafe impl aya::Pod for LatencyHist {}

impl LatencyHist {
    /// Handshakes measured.
    pub fn total(&self) -> u64 {
        self.count.iter().sum()
    }

    /// Adds `other` bucket by bucket (another CPU's share).
    pub fn add(&mut self, other: &LatencyHist) {
        self.sum_ns = self.sum_ns.wrapping_add(other.sum_ns);
        for (mine, theirs) in self.count.iter_mut().zip(other.count) {
            *mine += theirs;
        }
    }

    /// The Prometheus form: (upper bound in seconds, cumulative count) for
    /// every bucket but the last (that one is `+Inf`, the total), and the
    /// sum in seconds.
    pub fn cumulative(&self) -> (Vec<(f64, u64)>, f64) {
        let mut running = 0;
        let buckets = self
            .count
            .iter()
            .take(BUCKETS - 1)
            .enumerate()
            .map(|(index, n)| {
                running += n;
                (upper_bound_us(index) as f64 / 1e6, running)
            })
            .collect();
        (buckets, self.sum_ns as f64 / 1e9)
    }
}

/// The exclusive upper bound, in microseconds, of bucket `index` (not the
/// last one, which has none).
pub fn upper_bound_us(index: usize) -> u64 {
    if index == 0 {
        return 1 << MIN_LOG2;
    }
    let index = index as u32 - 1;
    let log2 = MIN_LOG2 + index / SUB;
    let sub = u64::from(index % SUB);
    (u64::from(SUB) + sub + 1) << (log2 - SUB_LOG2)
}

/// The bucket a latency of `ns` nanoseconds falls in: what
/// `latency_bucket` in observe.bpf.c computes.
pub fn bucket_of(ns: u64) -> usize {
    let us = ns / 1000;
    if us < 1 << MIN_LOG2 {
        return 0;
    }
    if us >= 1 << MAX_LOG2 {
        return BUCKETS - 1;
    }
    let log2 = 63 - us.leading_zeros();
    let sub = (us >> (log2 - SUB_LOG2)) & u64::from(SUB - 1);
    (1 + (log2 - MIN_LOG2) * SUB) as usize + sub as usize
}

/// A latency map, summed over CPUs: one histogram per direction.
pub fn read(map: &PerCpuArray<&MapData, LatencyHist>) -> Vec<(Direction, LatencyHist)> {
    Direction::ALL
        .iter()
        .filter_map(|dir| {
            let per_cpu = map.get(&dir.raw(), 0).ok()?;
            let mut sum = LatencyHist::default();
            for cpu in per_cpu.iter() {
                sum.add(cpu);
            }
            Some((*dir, sum))
        })
        .collect()
}

/// The TCP handshake family.
pub const HANDSHAKE: (&str, &str) = (
    "relay_observe_tcp_handshake_seconds",
    "TCP handshake latency, measured in the kernel at TC: direction=outbound from the target's SYN to the peer's SYN-ACK (the peer's latency as the target sees it, retransmission timeouts included), inbound from a peer's SYN to the target's SYN-ACK.",
);
/// The DNS response family.
pub const DNS: (&str, &str) = (
    "relay_observe_dns_response_seconds",
    "DNS over UDP, query to response (same client, server, port and ID), measured in the kernel at TC: direction=outbound when the target asked, inbound when it answered.",
);
const LABELS: [&str; 3] = ["target", "container", "direction"];

/// The latest histogram of every (target, container, direction) of one
/// family, exported as they are at each scrape. Clones share the state:
/// one is registered, the exporter keeps another to update.
#[derive(Clone)]
pub struct LatencySeries {
    name: &'static str,
    help: &'static str,
    desc: Desc,
    latest: Arc<Mutex<BTreeMap<[String; 3], LatencyHist>>>,
}

impl LatencySeries {
    /// The family `(name, help)`: [`HANDSHAKE`] or [`DNS`].
    pub fn new((name, help): (&'static str, &'static str)) -> Self {
        LatencySeries {
            name,
            help,
            desc: Desc::new(
                name.into(),
                help.into(),
                LABELS.iter().map(|l| l.to_string()).collect(),
                Default::default(),
            )
            .expect("static metric definition is valid"),
            latest: Arc::new(Mutex::new(BTreeMap::new())),
        }
    }

    /// What the kernel holds now for `target`.
    pub fn set(&self, target: &str, container: &str, hists: &[(Direction, LatencyHist)]) {
        let mut latest = self.latest.lock().unwrap_or_else(|p| p.into_inner());
        for (dir, hist) in hists {
            latest.insert(
                [target.into(), container.into(), dir.as_str().into()],
                *hist,
            );
        }
    }

    /// Removes `target`'s series (it is no longer observed).
    pub fn forget(&self, target: &str) {
        let mut latest = self.latest.lock().unwrap_or_else(|p| p.into_inner());
        latest.retain(|labels, _| labels[0] != target);
    }
}

impl Collector for LatencySeries {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let latest = self.latest.lock().unwrap_or_else(|p| p.into_inner());
        let metrics = latest
            .iter()
            .map(|(labels, hist)| {
                let pairs = LABELS
                    .iter()
                    .zip(labels)
                    .map(|(name, value)| {
                        let mut pair = proto::LabelPair::default();
                        pair.set_name(name.to_string());
                        pair.set_value(value.clone());
                        pair
                    })
                    .collect();
                let (buckets, sum) = hist.cumulative();
                let mut histogram = proto::Histogram::default();
                histogram.set_sample_count(hist.total());
                histogram.set_sample_sum(sum);
                histogram.set_bucket(
                    buckets
                        .into_iter()
                        .map(|(le, count)| {
                            let mut bucket = proto::Bucket::default();
                            bucket.set_upper_bound(le);
                            bucket.set_cumulative_count(count);
                            bucket
                        })
                        .collect(),
                );
                let mut metric = proto::Metric::from_label(pairs);
                metric.set_histogram(histogram);
                metric
            })
            .collect();
        let mut family = MetricFamily::default();
        family.set_name(self.name.into());
        family.set_help(self.help.into());
        family.set_field_type(MetricType::HISTOGRAM);
        family.set_metric(metrics);
        vec![family]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn bounds_cover_100_us_to_10_s_and_grow_by_at_most_a_quarter() {
        let bounds: Vec<u64> = (0..BUCKETS - 1).map(upper_bound_us).collect();
        assert_eq!(bounds[0], 64);
        assert_eq!(*bounds.last().expect("buckets"), 1 << MAX_LOG2);
        assert!(
            bounds.last().copied().unwrap_or(0) > 10_000_000,
            "{bounds:?}"
        );
        for pair in bounds.windows(2) {
            assert!(pair[1] > pair[0], "bounds must increase: {pair:?}");
            if pair[0] >= 128 {
                assert!(
                    (pair[1] - pair[0]) * 4 <= pair[0],
                    "bucket ({}, {}] wider than a quarter of its lower bound",
                    pair[0],
                    pair[1]
                );
            }
        }
    }

    #[test]
    fn a_latency_falls_in_the_bucket_whose_bounds_hold_it() {
        for ns in [
            0,
            63_999,
            64_000,
            100_000,
            MS,
            49 * MS,
            50 * MS,
            50_500_000,
            1_000 * MS,
            3_000 * MS,
            16_777 * MS,
        ] {
            let bucket = bucket_of(ns);
            let us = ns / 1000;
            assert!(us < upper_bound_us(bucket), "{ns} ns in bucket {bucket}");
            if bucket > 0 {
                assert!(
                    us >= upper_bound_us(bucket - 1),
                    "{ns} ns in bucket {bucket}, below its lower bound {}",
                    upper_bound_us(bucket - 1)
                );
            }
        }
        assert_eq!(
            bucket_of(16_778 * MS),
            BUCKETS - 1,
            "beyond 2^24 us: the +Inf bucket"
        );
        // 50 ms lies in [49.152, 57.344) ms.
        assert_eq!(upper_bound_us(bucket_of(50 * MS)), 57_344);
    }

    #[test]
    fn cpus_add_up_and_buckets_are_exported_cumulative_in_seconds() {
        let mut cpu0 = LatencyHist::default();
        let mut cpu1 = LatencyHist::default();
        for (cpu, ns) in [(0, 50 * MS), (1, 50 * MS), (1, 2 * MS)] {
            let cpu = if cpu == 0 { &mut cpu0 } else { &mut cpu1 };
            cpu.count[bucket_of(ns)] += 1;
            cpu.sum_ns += ns;
        }
        let mut sum = LatencyHist::default();
        sum.add(&cpu0);
        sum.add(&cpu1);
        assert_eq!(sum.total(), 3);

        let (buckets, seconds) = sum.cumulative();
        assert_eq!(buckets.len(), BUCKETS - 1);
        assert!((seconds - 0.102).abs() < 1e-9, "sum {seconds}");
        let at = |le: f64| {
            buckets
                .iter()
                .find(|(bound, _)| (*bound - le).abs() < 1e-9)
                .map(|(_, n)| *n)
        };
        assert_eq!(at(0.001792), Some(0), "2 ms is not under 1.792 ms");
        assert_eq!(at(0.002048), Some(1), "2 ms is under 2.048 ms");
        assert_eq!(at(0.049152), Some(1));
        assert_eq!(at(0.057344), Some(3));
        assert_eq!(buckets.last().map(|b| b.1), Some(3));
        assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1));
    }

    #[test]
    fn the_collector_exports_each_direction_as_a_histogram_and_forgets_a_target() {
        let series = LatencySeries::new(HANDSHAKE);
        let mut hist = LatencyHist::default();
        hist.count[bucket_of(50 * MS)] = 4;
        hist.sum_ns = 200 * MS;
        series.set(
            "web",
            "web",
            &[
                (Direction::Outbound, hist),
                (Direction::Inbound, LatencyHist::default()),
            ],
        );
        let registry = prometheus::Registry::new();
        registry.register(Box::new(series)).expect("registers once");
        let mut text = String::new();
        prometheus::TextEncoder::new()
            .encode_utf8(&registry.gather(), &mut text)
            .expect("encodes");
        assert!(
            text.contains("# TYPE relay_observe_tcp_handshake_seconds histogram"),
            "{text}"
        );
        assert!(
            text.contains(r#"relay_observe_tcp_handshake_seconds_count{target="web",container="web",direction="outbound"} 4"#),
            "{text}"
        );
        assert!(
            text.contains(r#"relay_observe_tcp_handshake_seconds_bucket{target="web",container="web",direction="outbound",le="0.057344"} 4"#),
            "{text}"
        );
        assert!(
            text.contains(r#"relay_observe_tcp_handshake_seconds_bucket{target="web",container="web",direction="outbound",le="0.049152"} 0"#),
            "{text}"
        );
        assert!(
            text.contains(r#"relay_observe_tcp_handshake_seconds_sum{target="web",container="web",direction="outbound"} 0.2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"relay_observe_tcp_handshake_seconds_count{target="web",container="web",direction="inbound"} 0"#),
            "{text}"
        );
    }

    #[test]
    fn forget_removes_only_that_target() {
        let series = LatencySeries::new(HANDSHAKE);
        let one = [(Direction::Outbound, LatencyHist::default())];
        series.set("a", "", &one);
        series.set("b", "", &one);
        series.forget("a");
        let families = series.collect();
        let targets: Vec<String> = families[0]
            .get_metric()
            .iter()
            .map(|m| {
                m.get_label()
                    .iter()
                    .find(|l| l.name() == "target")
                    .map(|l| l.value().to_string())
                    .unwrap_or_default()
            })
            .collect();
        assert_eq!(targets, ["b"]);
    }
}
