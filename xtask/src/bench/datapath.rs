//! relay's data paths against each other, in the same run as direct (the
//! peers are left out here: the other sections compare them): the throughput (1 and 8 streams, with CPU per GiB), connection
//! rate and latency sections run once per `--data-path`, and their rows
//! are labelled with the path. `auto` picks the winner of this table
//! (relay/src/forward/data_path.rs; README, Performance).
//!
//! Targets (data-path issue): the best path reaches >= 0.85x direct on one
//! stream and uses less CPU per GiB than copy (the host's CPU: sockmap's
//! work is not charged to the relay process).

use serde_json::{Value, json};

use super::report::{Row, SectionReport, Target};
use super::via::Via;
use super::{Ctx, connrate, latency, throughput};

const PATHS: [&str; 3] = ["copy", "splice", "sockmap"];
const TARGET_VS_DIRECT: f64 = 0.85;

pub fn run(ctx: &Ctx) -> SectionReport {
    let mut rows = Vec::new();
    let mut json = serde_json::Map::new();
    let mut errors = Vec::new();
    for path in PATHS {
        println!("xtask: bench: data path {path}");
        let sub = Ctx {
            data_path: Some(path),
            peers: Some(Vec::new()),
            ..ctx.clone()
        };
        let mut per_path = serde_json::Map::new();
        for section in [throughput::run, connrate::run, latency::run] {
            let report = section(&sub);
            rows.extend(report.rows.into_iter().map(|mut row| {
                row.metric = format!("{} [relay --data-path {path}]", row.metric);
                // The sections' own targets are about auto; this table's are below.
                row.targets.clear();
                row
            }));
            errors.extend(report.errors.into_iter().map(|e| format!("{path}: {e}")));
            per_path.insert(report.key.to_string(), report.json);
        }
        json.insert(path.to_string(), Value::Object(per_path));
    }
    let verdict = verdict(&json);
    let mut best = Row::cells(
        format!(
            "best data path by 1-stream throughput: {}",
            verdict.best.unwrap_or("-")
        ),
        &[(
            Via::Relay,
            verdict
                .best_gbps
                .map_or("-".to_string(), |g| format!("{g:.2}")),
        )],
    )
    .target(Target {
        text: format!(">= {TARGET_VS_DIRECT}x direct, less host CPU/GiB than copy"),
        pass: match (verdict.vs_direct, verdict.cpu_below_copy) {
            (Some(r), Some(cpu)) => Some(r >= TARGET_VS_DIRECT && cpu),
            _ => None,
        },
    });
    best.vs_direct = verdict
        .vs_direct
        .map_or("-".to_string(), |r| format!("{r:.2}x"));
    rows.push(best);
    json.insert(
        "best".into(),
        json!({
            "path": verdict.best,
            "gbit_per_s": verdict.best_gbps,
            "vs_direct": verdict.vs_direct,
            "cpu_below_copy": verdict.cpu_below_copy,
        }),
    );
    SectionReport {
        key: "datapath",
        rows,
        json: Value::Object(json),
        errors,
    }
}

struct Verdict {
    best: Option<&'static str>,
    best_gbps: Option<f64>,
    vs_direct: Option<f64>,
    cpu_below_copy: Option<bool>,
}

/// The path with the highest 1-stream throughput, from the sections' JSON.
fn verdict(json: &serde_json::Map<String, Value>) -> Verdict {
    let get = |path: &str, pointer: &str| {
        json.get(path)
            .and_then(|v| v.pointer(pointer))
            .and_then(Value::as_f64)
    };
    let gbps = |path: &str| get(path, "/throughput/streams_1/gbit_per_s/relay");
    // The whole host's CPU, not the relay process's: sockmap's work runs in
    // softirq and kernel workers, which the relay's own rusage never sees.
    let cpu = |path: &str| get(path, "/throughput/host_cpu_s_per_gib/relay");
    let best = PATHS
        .iter()
        .filter_map(|p| gbps(p).map(|g| (*p, g)))
        .max_by(|a, b| a.1.total_cmp(&b.1));
    let direct = best.and_then(|(p, _)| get(p, "/throughput/streams_1/gbit_per_s/direct"));
    Verdict {
        best: best.map(|(p, _)| p),
        best_gbps: best.map(|(_, g)| g),
        vs_direct: match (best, direct) {
            (Some((_, g)), Some(d)) if d > 0.0 => Some(g / d),
            _ => None,
        },
        cpu_below_copy: best.and_then(|(p, _)| Some(cpu(p)? < cpu("copy")?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_takes_the_fastest_path_and_compares_its_cpu_with_copy() {
        let json = json!({
            "copy": {"throughput": {"streams_1": {"gbit_per_s": {"relay": 10.0, "direct": 20.0}}, "host_cpu_s_per_gib": {"relay": 0.5}}},
            "splice": {"throughput": {"streams_1": {"gbit_per_s": {"relay": 18.0, "direct": 20.0}}, "host_cpu_s_per_gib": {"relay": 0.2}}},
            "sockmap": {"throughput": {"streams_1": {"gbit_per_s": {"relay": 12.0, "direct": 20.0}}, "host_cpu_s_per_gib": {"relay": 0.1}}},
        });
        let v = verdict(json.as_object().unwrap());
        assert_eq!(v.best, Some("splice"));
        assert_eq!(v.vs_direct, Some(0.9));
        assert_eq!(v.cpu_below_copy, Some(true));
    }
}
