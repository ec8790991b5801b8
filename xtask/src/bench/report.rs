//! What a bench section hands back, and turning all of them into the
//! markdown table on stdout and `target/bench/results.json`.
//!
//! Sections own their numbers and targets; this module only lays them out.

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{Value, json};

use std::collections::BTreeMap;

use super::via::Via;

/// A measurement per route (direct and each forwarder measured in this
/// section): the value, or why it could not be taken.
pub struct PerVia<T> {
    entries: Vec<(Via, Result<T, String>)>,
}

impl<T> PerVia<Vec<T>> {
    /// Measure each of `vias` `rounds` times, rotating which goes first, so
    /// that load from elsewhere on the machine falls on all alike. A route
    /// that fails once is not measured again; its error is kept as text.
    pub fn measure_rounds(
        vias: &[Via],
        rounds: usize,
        mut f: impl FnMut(Via) -> anyhow::Result<T>,
    ) -> PerVia<Vec<T>> {
        let mut entries: Vec<(Via, Result<Vec<T>, String>)> =
            vias.iter().map(|&via| (via, Ok(Vec::new()))).collect();
        for round in 0..rounds {
            for turn in 0..entries.len() {
                let i = (round + turn) % entries.len();
                let via = entries[i].0;
                if let Ok(samples) = &mut entries[i].1 {
                    match f(via) {
                        Ok(value) => samples.push(value),
                        Err(err) => {
                            let text = format!("{err:#}");
                            eprintln!("xtask: bench: {} failed: {text}", via.name());
                            entries[i].1 = Err(text);
                        }
                    }
                }
            }
        }
        PerVia { entries }
    }
}

impl<T> PerVia<T> {
    /// Measure each of `vias` once with `f`, keeping errors as text.
    pub fn measure(vias: &[Via], mut f: impl FnMut(Via) -> anyhow::Result<T>) -> PerVia<T> {
        let once = PerVia::measure_rounds(vias, 1, &mut f);
        PerVia {
            entries: once
                .entries
                .into_iter()
                .map(|(via, r)| {
                    (
                        via,
                        r.map(|mut v| {
                            v.pop().expect(
                                "invariant: one round gives a sample for every route that did not fail",
                            )
                        }),
                    )
                })
                .collect(),
        }
    }

    /// Values already taken, in `vias` order.
    #[cfg(test)]
    pub fn from_entries(entries: Vec<(Via, Result<T, String>)>) -> PerVia<T> {
        PerVia { entries }
    }

    /// The same error for every route (the shared setup failed).
    pub fn all_failed(vias: &[Via], err: &anyhow::Error) -> PerVia<T> {
        let text = format!("{err:#}");
        eprintln!("xtask: bench: setup failed: {text}");
        PerVia {
            entries: vias.iter().map(|&via| (via, Err(text.clone()))).collect(),
        }
    }

    /// The routes measured, in order.
    pub fn vias(&self) -> impl Iterator<Item = Via> + '_ {
        self.entries.iter().map(|(via, _)| *via)
    }

    /// None when `via` was not part of this measurement.
    pub fn get(&self, via: Via) -> Option<&Result<T, String>> {
        self.entries.iter().find(|(v, _)| *v == via).map(|(_, r)| r)
    }

    /// The value for `via`, when it was measured and did not fail.
    pub fn ok(&self, via: Via) -> Option<&T> {
        self.get(via).and_then(|r| r.as_ref().ok())
    }

    pub fn map<U>(&self, f: impl Fn(&T) -> U) -> PerVia<U> {
        PerVia {
            entries: self
                .entries
                .iter()
                .map(|(via, r)| (*via, r.as_ref().map(&f).map_err(Clone::clone)))
                .collect(),
        }
    }

    pub fn errors(&self) -> Vec<String> {
        self.entries
            .iter()
            .filter_map(|(via, r)| r.as_ref().err().map(|e| format!("{}: {e}", via.name())))
            .collect()
    }

    /// `{"direct": f(v) or {"error": ..}, "socat": ..., ...}`
    pub fn to_json(&self, f: impl Fn(&T) -> Value) -> Value {
        let mut map = serde_json::Map::new();
        for (via, r) in &self.entries {
            let value = match r {
                Ok(v) => f(v),
                Err(e) => json!({ "error": e }),
            };
            map.insert(via.name().to_string(), value);
        }
        Value::Object(map)
    }
}

/// Which way a metric improves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Better {
    Higher,
    Lower,
}

impl PerVia<f64> {
    /// The best of the peers measured (not direct, not relay).
    pub fn best_peer(&self, better: Better) -> Option<(Via, f64)> {
        self.entries
            .iter()
            .filter(|(via, _)| via.is_peer())
            .filter_map(|(via, r)| r.as_ref().ok().map(|v| (*via, *v)))
            .filter(|(_, v)| v.is_finite())
            .reduce(|a, b| match better {
                Better::Higher if b.1 > a.1 => b,
                Better::Lower if b.1 < a.1 => b,
                _ => a,
            })
    }

    /// relay's value over the best peer's.
    pub fn relay_vs_best_peer(&self, better: Better) -> Option<f64> {
        let relay = *self.ok(Via::Relay)?;
        let (_, best) = self.best_peer(better)?;
        (best > 0.0 && relay.is_finite()).then(|| relay / best)
    }

    /// relay's value over `via`'s.
    pub fn relay_vs(&self, via: Via) -> Option<f64> {
        let relay = *self.ok(Via::Relay)?;
        let other = *self.ok(via)?;
        (other > 0.0 && relay.is_finite()).then(|| relay / other)
    }

    /// A table row of these values: a cell per route measured (`error` for a
    /// failed one, `-` for a non-finite value), relay over the best peer and
    /// over direct. Targets are the caller's to add.
    pub fn row(&self, metric: impl Into<String>, decimals: usize, better: Better) -> Row {
        let cells = self
            .entries
            .iter()
            .map(|(via, r)| {
                let text = match r {
                    Ok(v) if v.is_finite() => format!("{v:.decimals$}"),
                    Ok(_) => "-".to_string(),
                    Err(_) => "error".to_string(),
                };
                (*via, text)
            })
            .collect();
        Row {
            metric: metric.into(),
            cells,
            vs_best_peer: vs_best_peer_text(self, better),
            vs_direct: ratio(self.ok(Via::Relay).copied(), self.ok(Via::Direct).copied()),
            targets: Vec::new(),
        }
    }
}

/// `1.23x (haproxy)`, or `-`.
pub fn vs_best_peer_text(values: &PerVia<f64>, better: Better) -> String {
    match (values.relay_vs_best_peer(better), values.best_peer(better)) {
        (Some(r), Some((via, _))) => format!("{r:.2}x ({})", via.name()),
        _ => "-".to_string(),
    }
}

/// A goal for relay, checked on every run; a miss is reported, not fatal.
pub struct Target {
    pub text: String,
    /// None when the numbers it needs could not be measured.
    pub pass: Option<bool>,
}

impl Target {
    /// `relay >= factor x the best peer` (Higher) or `<=` (Lower).
    pub fn vs_best_peer(values: &PerVia<f64>, better: Better, factor: f64) -> Target {
        let ratio = values.relay_vs_best_peer(better);
        match better {
            Better::Higher => Target {
                text: format!(">= {factor}x best peer"),
                pass: ratio.map(|r| r >= factor),
            },
            Better::Lower => Target {
                text: format!("<= {factor}x best peer"),
                pass: ratio.map(|r| r <= factor),
            },
        }
    }

    /// `relay >= factor x via`, e.g. socat or direct.
    pub fn at_least(values: &PerVia<f64>, via: Via, factor: f64) -> Target {
        Target {
            text: format!(">= {factor}x {}", via.name()),
            pass: values.relay_vs(via).map(|r| r >= factor),
        }
    }
}

/// One line of the table.
pub struct Row {
    pub metric: String,
    /// Formatted values by route; a route missing here is `n/a` (it cannot
    /// do this job, or was not asked to).
    pub cells: BTreeMap<Via, String>,
    /// relay over the best peer, naming it.
    pub vs_best_peer: String,
    pub vs_direct: String,
    pub targets: Vec<Target>,
}

impl Row {
    /// A row of preformatted cells, for sections with their own layout.
    pub fn cells(metric: impl Into<String>, cells: &[(Via, String)]) -> Row {
        Row {
            metric: metric.into(),
            cells: cells.iter().cloned().collect(),
            vs_best_peer: "-".to_string(),
            vs_direct: "-".to_string(),
            targets: Vec::new(),
        }
    }

    pub fn target(mut self, target: Target) -> Row {
        self.targets.push(target);
        self
    }
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
        (Some(r), Some(b)) if b > 0.0 && r.is_finite() => format!("{:.2}x", r / b),
        _ => "-".to_string(),
    }
}

/// The markdown table: a column per route that appears in any row (in
/// [`Via::ALL`] order), then relay over the best peer and over direct, the
/// targets and their results.
pub fn render_table(sections: &[SectionReport]) -> String {
    let rows: Vec<&Row> = sections.iter().flat_map(|s| &s.rows).collect();
    let columns: Vec<Via> = Via::ALL
        .into_iter()
        .filter(|via| rows.iter().any(|row| row.cells.contains_key(via)))
        .collect();
    let mut header = vec!["metric"];
    header.extend(columns.iter().map(|v| v.name()));
    header.extend(["relay / best peer", "relay vs direct", "target", "result"]);
    let mut lines = vec![
        format!("| {} |", header.join(" | ")),
        format!("|{}", header.iter().map(|_| "---|").collect::<String>()),
    ];
    for row in rows {
        let mut fields = vec![row.metric.clone()];
        fields.extend(columns.iter().map(|via| {
            row.cells
                .get(via)
                .cloned()
                .unwrap_or_else(|| "n/a".to_string())
        }));
        let (targets, results) = if row.targets.is_empty() {
            ("-".to_string(), "-".to_string())
        } else {
            (
                row.targets
                    .iter()
                    .map(|t| t.text.as_str())
                    .collect::<Vec<_>>()
                    .join("; "),
                row.targets
                    .iter()
                    .map(|t| match t.pass {
                        Some(true) => "pass",
                        Some(false) => "MISS",
                        None => "n/a",
                    })
                    .collect::<Vec<_>>()
                    .join("; "),
            )
        };
        fields.extend([
            row.vs_best_peer.clone(),
            row.vs_direct.clone(),
            targets,
            results,
        ]);
        lines.push(format!("| {} |", fields.join(" | ")));
    }
    lines.join("\n")
}

pub fn write_json(
    path: &Path,
    quick: bool,
    rounds: Option<usize>,
    sections: &[SectionReport],
) -> Result<()> {
    let targets: Vec<Value> = sections
        .iter()
        .flat_map(|s| &s.rows)
        .flat_map(|row| {
            row.targets
                .iter()
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
        "rounds": rounds,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn values(entries: &[(Via, Result<f64, String>)]) -> PerVia<f64> {
        PerVia::from_entries(entries.to_vec())
    }

    #[test]
    fn best_peer_leaves_out_direct_relay_and_failures() {
        let v = values(&[
            (Via::Direct, Ok(100.0)),
            (Via::Socat, Ok(10.0)),
            (Via::Haproxy, Ok(30.0)),
            (Via::Nginx, Err("down".into())),
            (Via::Relay, Ok(60.0)),
        ]);
        assert_eq!(v.best_peer(Better::Higher), Some((Via::Haproxy, 30.0)));
        assert_eq!(v.best_peer(Better::Lower), Some((Via::Socat, 10.0)));
        assert_eq!(v.relay_vs_best_peer(Better::Higher), Some(2.0));
        let t = Target::vs_best_peer(&v, Better::Higher, 1.2);
        assert_eq!((t.text.as_str(), t.pass), (">= 1.2x best peer", Some(true)));
        let t = Target::vs_best_peer(&v, Better::Lower, 1.0);
        assert_eq!(t.pass, Some(false));
        let t = Target::at_least(&v, Via::Direct, 0.5);
        assert_eq!(t.pass, Some(true));
        let none = values(&[(Via::Direct, Ok(1.0)), (Via::Relay, Ok(1.0))]);
        assert_eq!(Target::vs_best_peer(&none, Better::Higher, 1.0).pass, None);
    }

    #[test]
    fn table_has_a_column_per_route_seen_and_marks_the_rest_na() {
        let v = values(&[
            (Via::Direct, Ok(2.0)),
            (Via::Nginx, Ok(1.0)),
            (Via::Relay, Err("x".into())),
        ]);
        let row = v
            .row("m", 1, Better::Higher)
            .target(Target::at_least(&v, Via::Direct, 1.0));
        let other = Row::cells("n", &[(Via::Socat, "5".to_string())]);
        let table = render_table(&[SectionReport {
            key: "k",
            rows: vec![row, other],
            json: Value::Null,
            errors: Vec::new(),
        }]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[0],
            "| metric | direct | socat | nginx | relay | relay / best peer | relay vs direct | target | result |"
        );
        assert_eq!(
            lines[2],
            "| m | 2.0 | n/a | 1.0 | error | - | - | >= 1x direct | n/a |"
        );
        assert_eq!(lines[3], "| n | n/a | 5 | n/a | n/a | - | - | - | - |");
    }
}
