//! The Grafana dashboard and the alert rules in `dashboards/`, proven on a
//! real Prometheus: relays that forward (plain and TLS), refuse, observe
//! with eBPF and lose their observed namespace are scraped while traffic
//! flows (through a lossy link into the observed namespace, so it
//! retransmits, and DNS lookups from it answered SERVFAIL), and every PromQL expression of the dashboard (read out of its
//! JSON) and of `alerts.yml` (as Prometheus itself loaded it) must parse and
//! return at least one series. A renamed metric or label breaks this test,
//! not a user's dashboard.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use relay_tests::certs::{Ca, CertSpec};
use relay_tests::child::{ChildProc, status_and_text};
use relay_tests::peers::{EchoServer, ServfailDns, dns_query, round_trip};
use relay_tests::ports::free_port;
use relay_tests::prometheus::Prometheus;
use relay_tests::relay_proc::{START_TIMEOUT, relay_bin};
use relay_tests::shaper::ShapedLink;
use relay_tests::tempdir::TempDir;
use relay_tests::tls_client::TlsClient;
use relay_tests::tools::promtool_check;
use relay_tests::wait::poll_until;
use relay_tests::{NetNs, Relay, RelayCmd, require_root, require_tool};
use serde_json::Value;

/// How long every query may take to see its series (a few scrapes and
/// rule evaluations at 1 s, on a busy 2-core machine).
const QUERY_TIMEOUT: Duration = Duration::from_secs(90);
/// The range Grafana's `$__rate_interval` stands for in the test: long
/// enough for several 1 s scrapes.
const RATE_INTERVAL: &str = "30s";

fn dashboards_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("invariant: tests/ sits inside the workspace root")
        .join("dashboards")
}

fn dashboard() -> Result<Value> {
    let path = dashboards_dir().join("relay.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
}

/// Panels, with the ones nested in collapsed rows.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut all = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        all.push(panel);
        all.extend(panel["panels"].as_array().into_iter().flatten());
    }
    all
}

/// Every PromQL expression of the dashboard, keyed by where it is: panel
/// targets, and template variables (Grafana's `label_values(m, l)` is sent
/// as the PromQL it stands for, `count by (l) (m)`).
fn dashboard_queries(dashboard: &Value) -> Result<BTreeMap<String, String>> {
    let mut queries = BTreeMap::new();
    for panel in panels(dashboard) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .filter(|e| !e.trim().is_empty())
                .with_context(|| format!("panel {:?} has a target without expr", panel["title"]))?;
            let place = format!(
                "panel {:?} {}",
                panel["title"].as_str().unwrap_or("?"),
                target["refId"]
            );
            queries.insert(place, substitute(expr));
        }
    }
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if var["type"] != "query" {
            continue;
        }
        let query = var["query"]["query"]
            .as_str()
            .or_else(|| var["query"].as_str())
            .with_context(|| format!("variable {:?} has no query", var["name"]))?;
        let promql = match query
            .trim()
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .and_then(|q| q.rsplit_once(','))
        {
            Some((metric, label)) => format!("count by ({}) ({})", label.trim(), metric.trim()),
            None => query.to_string(),
        };
        queries.insert(
            format!("variable ${}", var["name"].as_str().unwrap_or("?")),
            promql,
        );
    }
    Ok(queries)
}

/// Grafana's variables as the dashboard's "All" selection sends them.
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", RATE_INTERVAL)
        .replace("${route}", ".*")
        .replace("$route", ".*")
        .replace("${target}", ".*")
        .replace("$target", ".*")
}

#[test]
fn dashboard_is_importable_grafana_json_with_datasource_route_and_target_variables() -> Result<()> {
    let dashboard = dashboard()?;
    ensure!(
        dashboard["uid"].is_string() && dashboard["title"].is_string(),
        "uid and title are what Grafana imports by"
    );
    let vars: BTreeMap<&str, &Value> = dashboard["templating"]["list"]
        .as_array()
        .context("templating.list")?
        .iter()
        .filter_map(|v| Some((v["name"].as_str()?, v)))
        .collect();
    ensure!(
        vars.get("datasource").map(|v| (&v["type"], &v["query"]))
            == Some((&Value::from("datasource"), &Value::from("prometheus"))),
        "expected a datasource variable of type datasource (prometheus), got {:?}",
        vars.get("datasource")
    );
    for name in ["route", "target"] {
        let var = vars
            .get(name)
            .with_context(|| format!("no ${name} variable"))?;
        ensure!(
            var["type"] == "query" && var["includeAll"] == true,
            "${name} must be a query variable with All: {var}"
        );
    }
    let mut ids = std::collections::HashSet::new();
    let mut with_queries = 0;
    for panel in panels(&dashboard) {
        ensure!(
            ids.insert(panel["id"].as_u64().context("panel without id")?),
            "duplicate panel id {}",
            panel["id"]
        );
        ensure!(
            panel["gridPos"]["w"].is_u64(),
            "panel {:?} has no gridPos",
            panel["title"]
        );
        if panel["type"] != "row" {
            ensure!(
                panel["datasource"]["uid"] == "${datasource}",
                "panel {:?} must use the $datasource variable, not a fixed data source",
                panel["title"]
            );
            with_queries += 1;
        }
    }
    let queries = dashboard_queries(&dashboard)?;
    ensure!(
        with_queries >= 10 && queries.len() >= with_queries,
        "expected a query per panel, got {queries:?}"
    );
    Ok(())
}

#[test]
fn alert_rules_and_scrape_example_pass_promtool() -> Result<()> {
    require_tool!("promtool");
    let dir = dashboards_dir();
    for args in [
        ["check", "rules", "alerts.yml"],
        ["check", "config", "prometheus.yml"],
    ] {
        let mut promtool = Command::new("promtool");
        promtool.args(args).current_dir(&dir);
        let (status, said) = status_and_text(promtool)?;
        ensure!(
            status.success(),
            "promtool {} failed ({status}):\n{said}",
            args.join(" ")
        );
        ensure!(
            said.contains("SUCCESS"),
            "promtool {} said no SUCCESS:\n{said}",
            args.join(" ")
        );
    }
    Ok(())
}

/// `relay observe ...` with metrics on a free loopback port.
struct Observer {
    proc: ChildProc,
    metrics: SocketAddr,
}

impl Observer {
    fn spawn(args: &[&str]) -> Result<Self> {
        let metrics = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let mut cmd = Command::new(relay_bin()?);
        cmd.args(args).args(["--metrics", &metrics.to_string()]);
        let mut proc = ChildProc::spawn("relay observe", cmd)?;
        proc.wait_listening(metrics.port(), START_TIMEOUT)?;
        Ok(Self { proc, metrics })
    }
}

/// GET `path` on a relay's metrics address: status and body.
fn get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let response =
        relay_tests::http::get(relay_tests::peers::connect(addr)?, &addr.to_string(), path)?;
    Ok((
        response.status,
        String::from_utf8_lossy(&response.body).into_owned(),
    ))
}

fn metrics_of(relay: &Relay) -> Result<SocketAddr> {
    relay
        .metrics_addr()
        .context("relay started without metrics")
}

/// The live setup: every feature the dashboard has a panel for.
struct Fleet<'a> {
    watched: &'a NetNs,
    /// An echo in the watched namespace behind the lossy link.
    lossy: SocketAddr,
    /// A DNS server on the host answering the watched namespace SERVFAIL.
    dns: SocketAddr,
    plain: Relay,
    tls: Relay,
    refused: Relay,
    observer: Observer,
    detaching: Observer,
    ca: Ca,
}

impl Fleet<'_> {
    /// One round of traffic: a plain echo, a TLS echo, a client that
    /// speaks no TLS to the TLS listener, a connection the target refuses,
    /// an echo over the lossy link, and a DNS lookup from the namespace.
    fn traffic(&self) -> Result<()> {
        let payload: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
        let mut plain = self.plain.connect()?;
        round_trip(&mut plain, &payload)?;
        drop(plain);
        let mut tls = TlsClient::connect(self.tls.addr(), &self.ca, None)?;
        round_trip(&mut tls, &payload[..4096])?;
        tls.close_cleanly()?;
        // A handshake failure (outcome protocol): not TLS at all.
        let mut not_tls = self.tls.connect()?;
        not_tls.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
        let _ = not_tls.shutdown(Shutdown::Write);
        let _ = not_tls.read_to_end(&mut Vec::new());
        // Refused by the target inside the observed namespace (a RST there).
        let mut refused = self.refused.connect()?;
        let _ = refused.read_to_end(&mut Vec::new());
        // Retransmissions: the namespace echoes back across 10% loss.
        let mut lossy = relay_tests::peers::connect(self.lossy)?;
        round_trip(&mut lossy, &payload)?;
        drop(lossy);
        let dns = self.dns;
        self.watched.enter(move || {
            let socket = UdpSocket::bind("0.0.0.0:0")?;
            socket.set_read_timeout(Some(Duration::from_secs(2)))?;
            socket.send_to(&dns_query(0x5e5e, "relay.test"), dns)?;
            socket.recv_from(&mut [0u8; 512]).map(drop)
        })?;
        Ok(())
    }
}

#[test]
fn every_dashboard_and_alert_query_returns_series_from_live_relays() -> Result<()> {
    require_root!("attaches eBPF observers and creates network namespaces");
    require_tool!("prometheus");
    require_tool!("promtool");
    // The observed namespace, reached over its veth and over a TUN link
    // losing 10% of packets each way.
    let link = ShapedLink::new(Duration::from_millis(2), 0.10)?;
    let watched = link.ns();
    let lossy_echo = EchoServer::on(watched.tcp_listen(SocketAddr::from((link.addr(), 7002)))?)?;
    let dns = SocketAddr::from((watched.host_addr(), 53));
    let _servfail =
        ServfailDns::on(UdpSocket::bind(dns).context("binding a DNS server on the veth")?)?;
    let leaving = NetNs::create()?;
    let echo = EchoServer::on(watched.tcp_listen(SocketAddr::from((watched.addr(), 7000)))?)?;
    let closed = SocketAddr::from((watched.addr(), 7001));
    let watched_target = format!("netns:{}", watched.name());
    let pcap_dir = TempDir::new("dashboards-pcap")?;
    let pcap = pcap_dir.join("watched.pcapng").display().to_string();
    let ca = Ca::new("dashboards")?;
    let server = ca.issue("relay", &CertSpec::loopback_server())?;
    let fleet = Fleet {
        watched,
        lossy: lossy_echo.addr(),
        dns,
        plain: RelayCmd::loopback_to(echo.addr())?
            .opts(&["--name", "plain", "--observe", &watched_target])
            .spawn()?,
        tls: RelayCmd::loopback_to(echo.addr())?
            .listen_scheme("tls")
            .opts(&["--name", "tls"])
            .opts(&["--tls-cert".to_string(), server.cert.display().to_string()])
            .opts(&["--tls-key".to_string(), server.key.display().to_string()])
            .spawn()?,
        refused: RelayCmd::loopback_to(closed)?
            .opts(&["--name", "refused"])
            .spawn()?,
        // A ring buffer of 4 KiB holds two full-size samples: the echo
        // rounds overflow it, so sample drops (reason="ring_full") happen.
        observer: Observer::spawn(&[
            "observe",
            &watched_target,
            "--bpf-stats",
            "--pcap",
            &pcap,
            "--ring-size",
            "4K",
        ])?,
        detaching: Observer::spawn(&["observe", &format!("netns:{}", leaving.name()), "--follow"])?,
        ca,
    };

    // /healthz: ready while bound and attached.
    for addr in [
        metrics_of(&fleet.plain)?,
        fleet.observer.metrics,
        fleet.detaching.metrics,
    ] {
        let (status, body) = get(addr, "/healthz")?;
        ensure!(
            status == 200,
            "GET /healthz on {addr}: expected 200 (ready), got {status}: {body}"
        );
    }

    // Nothing listens here: `up` is 0 for it, as for a relay that died.
    let dead = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
    let alerts = dashboards_dir().join("alerts.yml");
    let prometheus = Prometheus::start(
        &[
            metrics_of(&fleet.plain)?,
            metrics_of(&fleet.tls)?,
            metrics_of(&fleet.refused)?,
            fleet.observer.metrics,
            fleet.detaching.metrics,
            dead,
        ],
        &[&alerts],
    )?;

    fleet.traffic()?;
    // The observed namespace goes away: that observer detaches, keeps
    // running (--follow) and says so on /healthz and relay_ready.
    drop(leaving);
    poll_until(
        "the detached observer's /healthz to say 503",
        Duration::from_secs(15),
        || {
            let (status, body) = get(fleet.detaching.metrics, "/healthz")?;
            Ok((status == 503 && body.contains("observer")).then_some(()))
        },
    )
    .with_context(|| {
        format!(
            "relay observe --follow output:\n{}",
            fleet.detaching.proc.log()
        )
    })?;

    // promtool on scrapes with every feature on: forward + --observe, TLS,
    // observe --bpf-stats --pcap, and an observer that detached.
    for (what, addr) in [
        ("forward --observe", metrics_of(&fleet.plain)?),
        ("TLS forward", metrics_of(&fleet.tls)?),
        ("observe --bpf-stats --pcap", fleet.observer.metrics),
        ("observe --follow, detached", fleet.detaching.metrics),
    ] {
        let (_, text) = get(addr, "/metrics")?;
        if let Err(complaints) = promtool_check(&text)? {
            bail!("promtool check metrics on the {what} scrape:\n{complaints}\nscrape:\n{text}");
        }
    }

    let mut pending = dashboard_queries(&dashboard()?)?;
    ensure!(!pending.is_empty(), "the dashboard has no queries");
    let dashboard_count = pending.len();
    let mut alert_names = Vec::new();
    for group in prometheus.rules()? {
        for rule in group["rules"].as_array().into_iter().flatten() {
            let name = rule["name"].as_str().context("a rule without name")?;
            let query = rule["query"].as_str().context("a rule without query")?;
            alert_names.push(name.to_string());
            pending.insert(format!("alert {name}"), query.to_string());
        }
    }
    ensure!(
        alert_names.len() >= 6,
        "Prometheus loaded {} alert rules from {}, expected the 6 or more it holds: {alert_names:?}\nlog:\n{}",
        alert_names.len(),
        alerts.display(),
        prometheus.log()
    );

    let mut last: BTreeMap<String, String> = BTreeMap::new();
    let waited = poll_until("every query to return a series", QUERY_TIMEOUT, || {
        fleet.traffic()?;
        let mut still = BTreeMap::new();
        for (place, expr) in std::mem::take(&mut pending) {
            // An error (a parse error, an unknown function) fails at once.
            let result = prometheus
                .query(&expr)
                .with_context(|| format!("{place}: Prometheus rejected `{expr}`"))?;
            if result.result.is_empty() {
                last.insert(place.clone(), "no series".into());
                still.insert(place, expr);
            }
        }
        pending = still;
        Ok(pending.is_empty().then_some(()))
    });
    if let Err(err) = waited {
        let missing: Vec<String> = pending
            .iter()
            .map(|(place, expr)| {
                format!(
                    "  {place}: `{expr}` ({})",
                    last.get(place).map_or("?", |s| s.as_str())
                )
            })
            .collect();
        bail!(
            "{err:#}: these queries never returned a series:\n{}",
            missing.join("\n")
        );
    }

    // The alerts did not only return series: Prometheus evaluated them
    // to pending or firing (each has a `for:`), so each rule works as written.
    poll_until(
        "every alert to be pending or firing",
        Duration::from_secs(30),
        || {
            let states: Vec<(String, String)> = prometheus
                .rules()?
                .iter()
                .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
                .map(|r| {
                    (
                        r["name"].as_str().unwrap_or("?").to_string(),
                        r["state"].as_str().unwrap_or("?").to_string(),
                    )
                })
                .collect();
            Ok(states
                .iter()
                .all(|(_, s)| s == "pending" || s == "firing")
                .then_some(()))
        },
    )?;

    // And the numbers are the traffic's, not just present. A rate needs
    // two samples in its window, and a fast run gets here before every
    // target was scraped twice: poll, with traffic, for a bounded time.
    let positive = |expr: &str| -> Result<()> {
        let mut got = Vec::new();
        poll_until(&format!("`{expr}` > 0"), QUERY_TIMEOUT, || {
            fleet.traffic()?;
            let result = prometheus.query(expr)?;
            let value = result
                .result
                .first()
                .and_then(|s| s["value"][1].as_str())
                .and_then(|v| v.parse::<f64>().ok());
            got = result.result;
            Ok(value.is_some_and(|v| v > 0.0).then_some(()))
        })
        .with_context(|| format!("expected `{expr}` > 0, last got {got:?}"))?;
        Ok(())
    };
    positive(r#"sum(rate(relay_bytes_total{route="plain"}[30s]))"#)?;
    positive(r#"sum(rate(relay_tls_handshakes_total{route="tls",outcome="ok"}[30s]))"#)?;
    positive(&format!(
        r#"sum(rate(relay_observe_tcp_flags_total{{target="{}",flag="rst"}}[30s]))"#,
        watched.name()
    ))?;
    positive(r#"sum(rate(relay_observe_program_runs_total[30s]))"#)?;
    positive(r#"sum(rate(relay_observe_samples_total[30s]))"#)?;
    positive(&format!(
        r#"sum(rate(relay_observe_tcp_retransmits_total{{target="{}"}}[30s]))"#,
        watched.name()
    ))?;
    positive(&format!(
        r#"sum(rate(relay_observe_dns_responses_total{{target="{}",direction="outbound",rcode="SERVFAIL"}}[30s]))"#,
        watched.name()
    ))?;
    eprintln!(
        "dashboards: {dashboard_count} dashboard queries and {} alert rules ({}) returned series on Prometheus at {}",
        alert_names.len(),
        alert_names.join(", "),
        prometheus.addr()
    );
    Ok(())
}
