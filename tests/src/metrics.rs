//! Reading relay's Prometheus text exposition: samples by name and labels.
//!
//! Just enough of the text format for assertions: `# ...` lines are
//! skipped, each other line is `name{label="value",...} value [timestamp]`.
//! Validating the format is promtool's job (see [`crate::tools::promtool_check`]).

use std::collections::BTreeMap;
use std::fmt;

use anyhow::{Context, Result, bail};

/// One sample line.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed scrape, with the original text kept for error messages.
#[derive(Clone, Debug)]
pub struct Scrape {
    pub text: String,
    pub samples: Vec<Sample>,
}

impl Scrape {
    pub fn parse(text: &str) -> Result<Self> {
        let samples = text
            .lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty() && !line.starts_with('#'))
            .map(|(i, line)| {
                parse_sample(line).with_context(|| format!("metrics line {}: {line:?}", i + 1))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            text: text.to_string(),
            samples,
        })
    }

    /// Samples named `name` whose labels include all of `labels`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).is_some_and(|have| have == v))
        })
    }

    /// Sum of the matching samples; `None` when no sample matches.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.matching(name, labels)
            .map(|s| s.value)
            .reduce(|a, b| a + b)
    }

    /// Like [`Self::value`] but 0 when absent: a labelled counter appears
    /// only once its label combination was first incremented.
    pub fn counter(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels).unwrap_or(0.0)
    }
}

/// `name{a="b"}` for messages.
pub struct Selector<'a>(pub &'a str, pub &'a [(&'a str, &'a str)]);

impl fmt::Display for Selector<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        if !self.1.is_empty() {
            let labels: Vec<String> = self.1.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
            write!(f, "{{{}}}", labels.join(","))?;
        }
        Ok(())
    }
}

fn parse_sample(line: &str) -> Result<Sample> {
    let name_end = line
        .find(['{', ' '])
        .context("no value after the metric name")?;
    let name = line[..name_end].to_string();
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(after_brace) = rest.strip_prefix('{') {
        rest = parse_labels(after_brace, &mut labels)?;
    }
    let value_text = rest
        .split_whitespace()
        .next()
        .context("missing sample value")?;
    let value = match value_text {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        other => other
            .parse()
            .with_context(|| format!("sample value {other:?} is not a number"))?,
    };
    Ok(Sample {
        name,
        labels,
        value,
    })
}

/// Parse `a="b",c="d"}` (after the `{`); returns the text after the `}`.
fn parse_labels<'a>(mut s: &'a str, labels: &mut BTreeMap<String, String>) -> Result<&'a str> {
    loop {
        s = s.trim_start_matches([',', ' ']);
        if let Some(rest) = s.strip_prefix('}') {
            return Ok(rest);
        }
        let (key, after_key) = s.split_once("=\"").context("label without =\"value\"")?;
        let mut value = String::new();
        let mut chars = after_key.char_indices();
        let end = loop {
            match chars.next() {
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => bail!("label value ends in a backslash"),
                },
                Some((_, c)) => value.push(c),
                None => bail!("unterminated label value"),
            }
        };
        labels.insert(key.trim().to_string(), value);
        s = &after_key[end + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_samples_by_name_and_label_subset() -> Result<()> {
        let scrape = Scrape::parse(
            "# HELP relay_bytes_total Bytes.\n# TYPE relay_bytes_total counter\n\
             relay_bytes_total{direction=\"to_target\",route=\"a\\\"b\"} 42\n\
             relay_bytes_total{direction=\"to_client\",route=\"x\"} 7\n\
             relay_build_info{version=\"0.1.0\"} 1\n\
             relay_x_bucket{le=\"+Inf\"} 3 1700000000\n",
        )?;
        assert_eq!(
            scrape.value("relay_bytes_total", &[("direction", "to_target")]),
            Some(42.0)
        );
        assert_eq!(scrape.value("relay_bytes_total", &[]), Some(49.0));
        assert_eq!(
            scrape.value("relay_bytes_total", &[("route", "a\"b")]),
            Some(42.0)
        );
        assert_eq!(
            scrape.counter("relay_connections_total", &[("outcome", "refused")]),
            0.0
        );
        assert_eq!(scrape.value("relay_x_bucket", &[("le", "+Inf")]), Some(3.0));
        Ok(())
    }
}
