//! What a bench section hands back, and turning all of them into the
//! markdown table on stdout and `target/bench/results.json`.
//!
//! Sections own their numbers and targets; this module only lays them out.

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{Value, json};

use super::via::Via;

/// A measurement per route: the value, or why it could not be taken.
pub struct PerVia<T> {
    pub direct: Result<T, String>,
    pub socat: Result<T, String>,
    pub relay: Result<T, String>,
}

impl<T> PerVia<Vec<T>> {
    /// Measure each route `rounds` times, rotating which goes first, so that
    /// load from elsewhere on the machine falls on all three alike. A route
    /// that fails once is not measured again; its error is kept as text.
    pub fn measure_rounds(
        rounds: usize,
        mut f: impl FnMut(Via) -> anyhow::Result<T>,
    ) -> PerVia<Vec<T>> {
        let mut results: [Result<Vec<T>, String>; 3] =
            [Ok(Vec::new()), Ok(Vec::new()), Ok(Vec::new())];
        for round in 0..rounds {
            for turn in 0..Via::ALL.len() {
                let i = (round + turn) % Via::ALL.len();
                let via = Via::ALL[i];
                if let Ok(samples) = &mut results[i] {
                    match f(via) {
                        Ok(value) => samples.push(value),
                        Err(err) => {
                            let text = format!("{err:#}");
                            eprintln!("xtask: bench: {} failed: {text}", via.name());
                            results[i] = Err(text);
                        }
                    }
                }
            }
        }
        let [direct, socat, relay] = results;
        PerVia {
            direct,
            socat,
            relay,
        }
    }
}

impl<T> PerVia<T> {
    /// Measure each route once with `f`, keeping errors as text.
    pub fn measure(mut f: impl FnMut(Via) -> anyhow::Result<T>) -> PerVia<T> {
        let once = PerVia::measure_rounds(1, &mut f);
        let single = |r: Result<Vec<T>, String>| {
            r.map(|mut v| {
                v.pop()
                    .expect("invariant: one round gives a sample for every route that did not fail")
            })
        };
        PerVia {
            direct: single(once.direct),
            socat: single(once.socat),
            relay: single(once.relay),
        }
    }

    /// The same error for every route (the shared setup failed).
    pub fn all_failed(err: &anyhow::Error) -> PerVia<T> {
        let text = format!("{err:#}");
        eprintln!("xtask: bench: setup failed: {text}");
        PerVia {
            direct: Err(text.clone()),
            socat: Err(text.clone()),
            relay: Err(text),
        }
    }

    pub fn get(&self, via: Via) -> &Result<T, String> {
        match via {
            Via::Direct => &self.direct,
            Via::Socat => &self.socat,
            Via::Relay => &self.relay,
        }
    }

    pub fn map<U>(&self, f: impl Fn(&T) -> U) -> PerVia<U> {
        let g = |r: &Result<T, String>| r.as_ref().map(&f).map_err(Clone::clone);
        PerVia {
            direct: g(&self.direct),
            socat: g(&self.socat),
            relay: g(&self.relay),
        }
    }

    pub fn errors(&self) -> Vec<String> {
        Via::ALL
            .iter()
            .filter_map(|via| {
                self.get(*via)
                    .as_ref()
                    .err()
                    .map(|e| format!("{}: {e}", via.name()))
            })
            .collect()
    }

    /// `{"direct": f(v) or {"error": ..}, ...}`
    pub fn to_json(&self, f: impl Fn(&T) -> Value) -> Value {
        let cell = |r: &Result<T, String>| match r {
            Ok(v) => f(v),
            Err(e) => json!({ "error": e }),
        };
        json!({ "direct": cell(&self.direct), "socat": cell(&self.socat), "relay": cell(&self.relay) })
    }
}

/// A goal for relay, checked on every run; a miss is reported, not fatal.
pub struct Target {
    pub text: String,
    /// None when the numbers it needs could not be measured.
    pub pass: Option<bool>,
}

/// One line of the table.
pub struct Row {
    pub metric: String,
    /// Formatted direct, socat, relay values (`-` for not applicable).
    pub values: [String; 3],
    pub vs_socat: String,
    pub vs_direct: String,
    pub target: Option<Target>,
}

/// Everything a section produced.
pub struct SectionReport {
    pub key: &'static str,
    pub rows: Vec<Row>,
    pub json: Value,
    pub errors: Vec<String>,
}

/// The sample with the median `key` (the upper one of an even count).
pub fn median_by<T: Clone>(samples: &[T], key: impl Fn(&T) -> f64) -> T {
    let mut sorted = samples.to_vec();
    sorted.sort_by(|a, b| key(a).total_cmp(&key(b)));
    sorted[sorted.len() / 2].clone()
}

/// `relay / reference` as `3.21x`, or `-`.
pub fn ratio(relay: Option<f64>, reference: Option<f64>) -> String {
    match (relay, reference) {
        (Some(r), Some(b)) if b > 0.0 => format!("{:.2}x", r / b),
        _ => "-".to_string(),
    }
}

/// A value cell: the number, or `error`.
pub fn cell(value: &Result<f64, String>, decimals: usize) -> String {
    match value {
        Ok(v) => format!("{v:.decimals$}"),
        Err(_) => "error".to_string(),
    }
}

pub fn render_table(sections: &[SectionReport]) -> String {
    let header = [
        "metric",
        "direct",
        "socat",
        "relay",
        "relay/socat",
        "relay vs direct",
        "target",
        "result",
    ];
    let mut lines = vec![
        format!("| {} |", header.join(" | ")),
        format!("|{}", header.iter().map(|_| "---|").collect::<String>()),
    ];
    for row in sections.iter().flat_map(|s| &s.rows) {
        let (target, result) = match &row.target {
            None => ("-".to_string(), "-"),
            Some(t) => (
                t.text.clone(),
                match t.pass {
                    Some(true) => "pass",
                    Some(false) => "MISS",
                    None => "n/a",
                },
            ),
        };
        lines.push(format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            row.metric,
            row.values[0],
            row.values[1],
            row.values[2],
            row.vs_socat,
            row.vs_direct,
            target,
            result
        ));
    }
    lines.join("\n")
}

pub fn write_json(path: &Path, quick: bool, sections: &[SectionReport]) -> Result<()> {
    let targets: Vec<Value> = sections
        .iter()
        .flat_map(|s| &s.rows)
        .filter_map(|row| {
            row.target
                .as_ref()
                .map(|t| json!({ "metric": row.metric, "target": t.text, "pass": t.pass }))
        })
        .collect();
    let mut results = serde_json::Map::new();
    for section in sections {
        results.insert(section.key.to_string(), section.json.clone());
    }
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let doc = json!({
        "quick": quick,
        "unix_time": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        "kernel": kernel.trim(),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "results": results,
        "targets": targets,
    });
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(&doc).context("cannot serialise bench results")?;
    std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))
}
