//! A real Prometheus server (Debian's `prometheus`) owned by a test.
//!
//! [`Prometheus::start`] writes a config that scrapes the given targets
//! every second as job `relay` (the job name `dashboards/alerts.yml`
//! expects) and evaluates the given rule files every second, starts
//! `prometheus` on a free loopback port with its storage in a temp dir, and
//! waits for its HTTP API. Dropping it kills the server (its process group)
//! and removes the storage. [`Prometheus::query`] runs an instant query
//! through `/api/v1/query`; [`Prometheus::rules`] reads `/api/v1/rules`.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::child::ChildProc;
use crate::ports::free_port;
use crate::tempdir::TempDir;

/// The first start creates the TSDB; give it time on a busy 2-core VM.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// What an instant query returned.
#[derive(Debug, Clone)]
pub struct QueryResult {
    /// The series (or the scalar), as Prometheus sent them.
    pub result: Vec<Value>,
}

/// A running Prometheus; killed on drop.
pub struct Prometheus {
    // Dropped first: kill the server before removing its storage.
    proc: ChildProc,
    addr: SocketAddr,
    _dir: TempDir,
}

impl Prometheus {
    /// Scrape `targets` (job `relay`, every second) and evaluate `rule_files`.
    pub fn start(targets: &[SocketAddr], rule_files: &[&Path]) -> Result<Self> {
        let dir = TempDir::new("prometheus")?;
        let config = dir.join("prometheus.yml");
        std::fs::write(&config, Self::config(targets, rule_files)?)
            .context("writing prometheus.yml")?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let mut cmd = Command::new("prometheus");
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn");
        let mut proc = ChildProc::spawn("prometheus", cmd)?;
        proc.wait_listening(addr.port(), START_TIMEOUT)?;
        let prometheus = Self {
            proc,
            addr,
            _dir: dir,
        };
        crate::wait::poll_until("prometheus to be ready", START_TIMEOUT, || {
            Ok(prometheus
                .get("/-/ready")
                .map(|(status, _)| status == 200)
                .unwrap_or(false)
                .then_some(()))
        })?;
        Ok(prometheus)
    }

    fn config(targets: &[SocketAddr], rule_files: &[&Path]) -> Result<String> {
        // JSON is YAML; serde_json quotes every path and address correctly.
        let config = serde_json::json!({
            "global": { "scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s" },
            "rule_files": rule_files.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
            "scrape_configs": [{
                "job_name": "relay",
                "static_configs": [{ "targets": targets.iter().map(|t| t.to_string()).collect::<Vec<_>>() }],
            }],
        });
        Ok(serde_json::to_string_pretty(&config)?)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Everything Prometheus logged so far.
    pub fn log(&self) -> String {
        self.proc.log()
    }

    /// `GET path` on the API: status and body.
    fn get(&self, path: &str) -> Result<(u16, Vec<u8>)> {
        let stream = crate::peers::connect(self.addr)?;
        let response = crate::http::get(stream, &self.addr.to_string(), path)?;
        Ok((response.status, response.body))
    }

    /// `GET path` returning Prometheus's JSON envelope's `data`, or the
    /// error Prometheus gave (a PromQL parse error, for instance).
    fn api(&self, path: &str) -> Result<Value> {
        let (status, body) = self.get(path)?;
        let json: Value = serde_json::from_slice(&body).with_context(|| {
            format!(
                "GET {path}: status {status}, body is not JSON: {}",
                String::from_utf8_lossy(&body)
            )
        })?;
        if json["status"] != "success" {
            bail!(
                "GET {path}: status {status}, {}: {}",
                json["errorType"].as_str().unwrap_or("error"),
                json["error"].as_str().unwrap_or("(no message)")
            );
        }
        Ok(json["data"].clone())
    }

    /// Runs `expr` as an instant query now.
    pub fn query(&self, expr: &str) -> Result<QueryResult> {
        let data = self.api(&format!("/api/v1/query?query={}", url_encode(expr)))?;
        let result = match &data["result"] {
            Value::Array(series) => series.clone(),
            Value::Null => Vec::new(),
            scalar => vec![scalar.clone()],
        };
        Ok(QueryResult { result })
    }

    /// The rule groups Prometheus loaded (`/api/v1/rules` data.groups).
    pub fn rules(&self) -> Result<Vec<Value>> {
        let data = self.api("/api/v1/rules")?;
        Ok(data["groups"].as_array().cloned().unwrap_or_default())
    }

    /// The scrape targets and their health (`/api/v1/targets` activeTargets).
    pub fn targets(&self) -> Result<Vec<Value>> {
        let data = self.api("/api/v1/targets")?;
        Ok(data["activeTargets"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
pub fn url_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_encoding_keeps_promql_intact() {
        assert_eq!(
            url_encode(r#"rate(x{a=~"b|c"}[1m])"#),
            "rate%28x%7Ba%3D~%22b%7Cc%22%7D%5B1m%5D%29"
        );
    }
}
