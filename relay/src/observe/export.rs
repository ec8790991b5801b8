//! Turning observer snapshots into Prometheus series.
//!
//! The kernel keeps totals; Prometheus counters only go up by increments,
//! so each series remembers the total it last exported and adds the
//! difference. Flows are exported as a bounded top-K (`rank` 1..K) plus one
//! `other` series holding the rest, whatever the number of flows.
//!
//! Every series carries `target` (the observer's label: a container's
//! name, `host`, `pid:N`, a netns name) and `container` (the container's
//! name for container targets, empty otherwise), so a container's series
//! are the same whether it is observed alone (`container:web`) or as one
//! of `containers`, and join `relay_observe_container_info` on `container`.

use std::collections::HashMap;
use std::sync::Mutex;

use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};

use super::Snapshot;
use super::attach::Interface;
use super::latency::{self, LatencySeries};
use super::maps::CaptureStat;

/// The observe metric families, registered once per registry.
pub struct ObserveMetrics {
    packets: IntCounterVec,
    bytes: IntCounterVec,
    flags: IntCounterVec,
    top_bytes: IntGaugeVec,
    top_packets: IntGaugeVec,
    attached: IntGaugeVec,
    run_seconds: prometheus::CounterVec,
    runs: IntCounterVec,
    samples: IntCounterVec,
    sample_drops: IntCounterVec,
    retransmits: IntCounterVec,
    sent_segments: IntCounterVec,
    dns_queries: IntCounterVec,
    dns_responses: IntCounterVec,
    handshakes: LatencySeries,
    dns_latency: LatencySeries,
    /// Last exported total per series, keyed by family and labels.
    last: Mutex<HashMap<(&'static str, Vec<String>), u64>>,
    /// Flow series exported last time, per target, to remove stale ranks.
    flow_labels: Mutex<HashMap<String, Vec<Vec<String>>>>,
}

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("static metric definition is valid")
}

fn gauge(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).expect("static metric definition is valid")
}

const FLOW_LABELS: [&str; 7] = [
    "target",
    "container",
    "rank",
    "iface",
    "proto",
    "src",
    "dst",
];

impl ObserveMetrics {
    pub fn register(registry: &Registry) -> Self {
        let traffic = ["target", "container", "iface", "direction", "proto"];
        let metrics = ObserveMetrics {
            packets: counter("relay_observe_packets_total", "Packets seen by the observer, per interface, direction and protocol.", &traffic),
            bytes: counter("relay_observe_bytes_total", "Bytes seen by the observer (link-layer frame length).", &traffic),
            flags: counter("relay_observe_tcp_flags_total", "TCP segments with SYN (no ACK), SYN-ACK, FIN or RST set.", &["target", "container", "iface", "direction", "flag"]),
            top_bytes: gauge("relay_observe_top_flow_bytes", "Bytes of the top flows by bytes (rank 1..K) and of all others (rank=\"other\").", &FLOW_LABELS),
            top_packets: gauge("relay_observe_top_flow_packets", "Packets of the flows in relay_observe_top_flow_bytes.", &FLOW_LABELS),
            attached: gauge("relay_observe_attached", "1 while the observer's programs are attached to the interface.", &["target", "container", "iface"]),
            run_seconds: prometheus::CounterVec::new(
                Opts::new("relay_observe_program_run_seconds_total", "Time the observe programs ran, from the kernel's BPF statistics (--bpf-stats)."),
                &["target", "container", "program"],
            )
            .expect("static metric definition is valid"),
            runs: counter("relay_observe_program_runs_total", "Runs of the observe programs, from the kernel's BPF statistics (--bpf-stats).", &["target", "container", "program"]),
            samples: counter("relay_observe_samples_total", "Packets sampled into the ring buffer for --pcap.", &["target", "container", "iface"]),
            sample_drops: counter(
                "relay_observe_sample_drops_total",
                "Packets not sampled whole for --pcap: reason=filter (did not match), sampled (left out by --sample), ring_full (no room in the ring buffer: lost), truncated (sampled, cut to --snaplen).",
                &["target", "container", "iface", "reason"],
            ),
            retransmits: counter(
                "relay_observe_tcp_retransmits_total",
                "TCP segments the target's network namespace retransmitted since it was observed (the kernel's own count, TcpRetransSegs of the namespace).",
                &["target", "container"],
            ),
            sent_segments: counter(
                "relay_observe_tcp_sent_segments_total",
                "TCP segments the target's network namespace sent since it was observed, retransmissions not included (the kernel's OutSegs of the namespace): the denominator of a retransmit ratio.",
                &["target", "container"],
            ),
            dns_queries: counter(
                "relay_observe_dns_queries_total",
                "DNS queries over UDP seen at TC (to port 53): direction=outbound sent by the target, inbound sent to it; qtype = the first question's type (A, AAAA, ... or other).",
                &["target", "container", "direction", "qtype"],
            ),
            dns_responses: counter(
                "relay_observe_dns_responses_total",
                "DNS responses over UDP seen at TC (from port 53): direction=outbound answers the target received, inbound answers it sent; rcode = NOERROR, NXDOMAIN, SERVFAIL, ...",
                &["target", "container", "direction", "qtype", "rcode"],
            ),
            handshakes: LatencySeries::new(latency::HANDSHAKE),
            dns_latency: LatencySeries::new(latency::DNS),
            last: Mutex::new(HashMap::new()),
            flow_labels: Mutex::new(HashMap::new()),
        };
        for collector in [
            Box::new(metrics.packets.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(metrics.bytes.clone()),
            Box::new(metrics.flags.clone()),
            Box::new(metrics.top_bytes.clone()),
            Box::new(metrics.top_packets.clone()),
            Box::new(metrics.attached.clone()),
            Box::new(metrics.run_seconds.clone()),
            Box::new(metrics.runs.clone()),
            Box::new(metrics.samples.clone()),
            Box::new(metrics.sample_drops.clone()),
            Box::new(metrics.retransmits.clone()),
            Box::new(metrics.sent_segments.clone()),
            Box::new(metrics.dns_queries.clone()),
            Box::new(metrics.dns_responses.clone()),
            Box::new(metrics.handshakes.clone()),
            Box::new(metrics.dns_latency.clone()),
        ] {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        metrics
    }

    /// Adds what grew since the last export to `family`'s series `labels`.
    fn advance(&self, family: &'static str, labels: &[&str], total: u64) -> u64 {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let previous = last
            .insert(
                (family, labels.iter().map(|l| l.to_string()).collect()),
                total,
            )
            .unwrap_or(0);
        total.saturating_sub(previous)
    }

    pub fn attached(&self, target: &str, container: &str, interfaces: &[Interface], on: bool) {
        for iface in interfaces {
            if on {
                self.attached
                    .with_label_values(&[target, container, &iface.name])
                    .set(1);
            } else {
                let _ = self
                    .attached
                    .remove_label_values(&[target, container, &iface.name]);
            }
        }
    }

    pub fn export(
        &self,
        target: &str,
        container: &str,
        interfaces: &[Interface],
        snapshot: &Snapshot,
        top: usize,
    ) {
        let name = |index: u32| {
            interfaces
                .iter()
                .find(|i| i.index == index)
                .map_or_else(|| index.to_string(), |i| i.name.clone())
        };
        // The families (IPv4, IPv6, non-IP) are summed: the label set stays small.
        let mut traffic: HashMap<(String, &str, &str), (u64, u64)> = HashMap::new();
        for ((ifindex, direction, proto, _family), counter) in &snapshot.traffic {
            let entry = traffic
                .entry((name(*ifindex), direction.as_str(), *proto))
                .or_default();
            entry.0 += counter.packets;
            entry.1 += counter.bytes;
        }
        for ((iface, direction, proto), (packets, bytes)) in traffic {
            let labels = [target, container, iface.as_str(), direction, proto];
            self.packets
                .with_label_values(&labels)
                .inc_by(self.advance("packets", &labels, packets));
            self.bytes
                .with_label_values(&labels)
                .inc_by(self.advance("bytes", &labels, bytes));
        }
        for ((ifindex, direction, flag), count) in &snapshot.flags {
            let iface = name(*ifindex);
            let labels = [target, container, iface.as_str(), direction.as_str(), flag];
            self.flags
                .with_label_values(&labels)
                .inc_by(self.advance("flags", &labels, *count));
        }
        for (program, cost) in &snapshot.programs {
            let labels = [target, container, program];
            self.runs
                .with_label_values(&labels)
                .inc_by(self.advance("runs", &labels, cost.runs));
            let nanos = self.advance(
                "run_ns",
                &labels,
                u64::try_from(cost.run_time.as_nanos()).unwrap_or(u64::MAX),
            );
            self.run_seconds
                .with_label_values(&labels)
                .inc_by(nanos as f64 / 1e9);
        }
        for ((ifindex, stat), count) in &snapshot.capture {
            let iface = name(*ifindex);
            let reason = match stat {
                CaptureStat::Sent => {
                    let labels = [target, container, iface.as_str()];
                    self.samples
                        .with_label_values(&labels)
                        .inc_by(self.advance("samples", &labels, *count));
                    continue;
                }
                CaptureStat::Matched => continue,
                CaptureStat::Filtered => "filter",
                CaptureStat::Sampled => "sampled",
                CaptureStat::RingFull => "ring_full",
                CaptureStat::Truncated => "truncated",
            };
            let labels = [target, container, iface.as_str(), reason];
            self.sample_drops
                .with_label_values(&labels)
                .inc_by(self.advance("drops", &labels, *count));
        }
        if let Some(segments) = snapshot.segments {
            let labels = [target, container];
            self.retransmits
                .with_label_values(&labels)
                .inc_by(self.advance("retransmits", &labels, segments.retransmitted));
            self.sent_segments
                .with_label_values(&labels)
                .inc_by(self.advance("sent_segments", &labels, segments.sent));
        }
        self.handshakes.set(target, container, &snapshot.handshakes);
        self.dns_latency
            .set(target, container, &snapshot.dns_latency);
        for dns in &snapshot.dns {
            let direction = dns.direction.as_str();
            match &dns.rcode {
                None => {
                    let labels = [target, container, direction, dns.qtype];
                    self.dns_queries
                        .with_label_values(&labels)
                        .inc_by(self.advance("dns_queries", &labels, dns.count));
                }
                Some(rcode) => {
                    let labels = [target, container, direction, dns.qtype, rcode.as_str()];
                    self.dns_responses
                        .with_label_values(&labels)
                        .inc_by(self.advance("dns_responses", &labels, dns.count));
                }
            }
        }
        self.export_flows(target, container, &name, snapshot, top);
    }

    fn export_flows(
        &self,
        target: &str,
        container: &str,
        name: &dyn Fn(u32) -> String,
        snapshot: &Snapshot,
        top: usize,
    ) {
        let mut current: Vec<Vec<String>> = Vec::new();
        let mut set = |labels: Vec<String>, bytes: u64, packets: u64| {
            let refs: Vec<&str> = labels.iter().map(String::as_str).collect();
            self.top_bytes
                .with_label_values(&refs)
                .set(i64::try_from(bytes).unwrap_or(i64::MAX));
            self.top_packets
                .with_label_values(&refs)
                .set(i64::try_from(packets).unwrap_or(i64::MAX));
            current.push(labels);
        };
        for (rank, (flow, counter)) in snapshot.flows.iter().take(top).enumerate() {
            let endpoint = |addr: std::net::IpAddr, port: u16| match addr {
                std::net::IpAddr::V6(v6) => format!("[{v6}]:{port}"),
                v4 => format!("{v4}:{port}"),
            };
            set(
                vec![
                    target.to_string(),
                    container.to_string(),
                    (rank + 1).to_string(),
                    name(flow.ifindex),
                    flow.proto_name().to_string(),
                    endpoint(flow.source(), flow.sport),
                    endpoint(flow.destination(), flow.dport),
                ],
                counter.bytes,
                counter.packets,
            );
        }
        let (bytes, packets) = snapshot
            .flows
            .iter()
            .skip(top)
            .fold((0, 0), |acc, (_, c)| (acc.0 + c.bytes, acc.1 + c.packets));
        set(
            vec![
                target.to_string(),
                container.to_string(),
                "other".into(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
            ],
            bytes,
            packets,
        );

        let mut previous = self.flow_labels.lock().unwrap_or_else(|p| p.into_inner());
        for stale in previous
            .get(target)
            .into_iter()
            .flatten()
            .filter(|l| !current.contains(l))
        {
            let refs: Vec<&str> = stale.iter().map(String::as_str).collect();
            let _ = self.top_bytes.remove_label_values(&refs);
            let _ = self.top_packets.remove_label_values(&refs);
        }
        previous.insert(target.to_string(), current);
    }

    /// Removes every series of `target` (its namespace is gone).
    pub fn forget(&self, target: &str, container: &str, interfaces: &[Interface]) {
        self.attached(target, container, interfaces, false);
        self.handshakes.forget(target);
        self.dns_latency.forget(target);
        let mut previous = self.flow_labels.lock().unwrap_or_else(|p| p.into_inner());
        for labels in previous.remove(target).into_iter().flatten() {
            let refs: Vec<&str> = labels.iter().map(String::as_str).collect();
            let _ = self.top_bytes.remove_label_values(&refs);
            let _ = self.top_packets.remove_label_values(&refs);
        }
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let mut by_family: Vec<((&'static str, Vec<String>), u64)> = Vec::new();
        last.retain(|key, total| {
            let keep = key.1.first().map(String::as_str) != Some(target);
            if !keep {
                by_family.push((key.clone(), *total));
            }
            keep
        });
        for ((family, labels), _) in by_family {
            let refs: Vec<&str> = labels.iter().map(String::as_str).collect();
            let _ = match family {
                "packets" => self.packets.remove_label_values(&refs),
                "bytes" => self.bytes.remove_label_values(&refs),
                "flags" => self.flags.remove_label_values(&refs),
                "runs" => self.runs.remove_label_values(&refs),
                "samples" => self.samples.remove_label_values(&refs),
                "drops" => self.sample_drops.remove_label_values(&refs),
                "retransmits" => self.retransmits.remove_label_values(&refs),
                "sent_segments" => self.sent_segments.remove_label_values(&refs),
                "dns_queries" => self.dns_queries.remove_label_values(&refs),
                "dns_responses" => self.dns_responses.remove_label_values(&refs),
                _ => self.run_seconds.remove_label_values(&refs),
            };
        }
    }
}
