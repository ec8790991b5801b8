//! TLS bridging: relay against socat where a hop terminates or originates
//! TLS, both measured in the same run.
//!
//! - Throughput plain -> TLS -> plain: iperf3 through an "entry" hop that
//!   originates TLS and an "exit" hop that terminates it (two relays, or two
//!   socats). Direct is plain iperf3 with no hop and no TLS, for scale.
//!   Target: relay >= 2x socat.
//! - Full TLS handshakes per second through one terminating hop to a
//!   backend that closes at once, driven by a rustls load generator
//!   (resumption disabled, so every connection pays for a full handshake).
//!   Direct is a bare rustls server: the ceiling of the generator on this
//!   machine. Target: relay >= 10x socat.
//!
//! The generator, the bare server and the backend are `tls-peer`
//! (`tls_peer.rs`), built here with `--release` and run as processes of
//! their own, like wrk and iperf3 for the other sections.
//!
//! The certificates (a CA and a leaf for 127.0.0.1 and `localhost`) are made
//! here at bench time in a temp dir that is removed afterwards; no key is
//! ever written inside the workspace.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::Ctx;
use super::procs::{self, Proc, TempDir};
use super::report::{PerVia, Row, SectionReport, Target, cell, median_by, ratio};
use super::throughput::{iperf3_client, iperf3_server};
use super::via::{Hop, Via};
use crate::{cmd, workspace};

const TARGET_THROUGHPUT_VS_SOCAT: f64 = 2.0;
const TARGET_HANDSHAKES_VS_SOCAT: f64 = 10.0;
/// The name both forwarders check in the exit hop's certificate.
const CERT_NAME: &str = "localhost";
/// Load generator threads, each with one connection in flight; also the
/// bare server's threads.
const CLIENT_THREADS: usize = 8;
/// socat's default listen backlog is 5; give it relay's default instead,
/// so that a burst of connects is not what separates them.
const SOCAT_LISTEN: &str = "fork,reuseaddr,bind=127.0.0.1,backlog=4096";

pub fn run(ctx: &Ctx) -> SectionReport {
    let (secs, rounds) = if ctx.quick { (2, 1) } else { (5, 3) };
    // Other work on the machine shows up here; the JSON keeps it.
    let load_before = loadavg();
    let certs = Certs::generate();

    println!(
        "xtask: bench: TLS bridge throughput, plain -> entry hop -> TLS -> exit hop -> plain, \
         iperf3 -t {secs}, median of {rounds} rotating round(s) (direct: plain, no hops)"
    );
    let tput = match &certs {
        Err(err) => PerVia::all_failed(err),
        Ok(certs) => PerVia::measure_rounds(rounds, |via| {
            let gbps = measure_throughput(ctx, certs, via, secs)?;
            println!("xtask:   {:<6} {gbps:.2} Gbit/s", via.name());
            Ok(gbps)
        }),
    };

    println!(
        "xtask: bench: full TLS handshakes/s, {CLIENT_THREADS} rustls client threads, no resumption, \
         {secs} s, one hop to a backend that closes at once, median of {rounds} rotating round(s) \
         (direct: bare rustls server)"
    );
    let hs = match &certs {
        Err(err) => PerVia::all_failed(err),
        Ok(certs) => match HandshakeBench::start(certs) {
            Err(err) => PerVia::all_failed(&err),
            Ok(bench) => PerVia::measure_rounds(rounds, |via| {
                let run = bench.measure(ctx, certs, via, secs)?;
                println!("xtask:   {:<6} {}", via.name(), run.summary());
                Ok(run)
            }),
        },
    };

    let gbps = tput.map(|s| median_by(s, |g| *g));
    let hs_runs = hs.map(|s| median_by(s, |r| r.per_s()));
    let hps = hs_runs.map(HandshakeRun::per_s);
    let rows = vec![
        ratio_row(
            "TLS bridge plain->TLS->plain, 2 hops, 1 stream (Gbit/s; direct: no hops, no TLS)",
            &gbps,
            2,
            TARGET_THROUGHPUT_VS_SOCAT,
        ),
        ratio_row(
            "TLS handshakes/s, full, 1 terminating hop (direct: rustls server)",
            &hps,
            0,
            TARGET_HANDSHAKES_VS_SOCAT,
        ),
    ];
    let mut errors = gbps
        .errors()
        .into_iter()
        .map(|e| format!("throughput: {e}"))
        .collect::<Vec<_>>();
    errors.extend(hps.errors().into_iter().map(|e| format!("handshakes: {e}")));
    SectionReport {
        key: "tls",
        json: json!({
            "loadavg": { "before": load_before, "after": loadavg() },
            "throughput": {
                "tool": format!(
                    "iperf3 -t {secs} (end.sum_received.bits_per_second), median of {rounds}; \
                     entry hop: relay `forward A tls://B --tls-ca --tls-name {CERT_NAME}` / socat \
                     `TCP-LISTEN OPENSSL:..,cafile,commonname={CERT_NAME}`; exit hop: relay \
                     `forward tls://B P --tls-cert --tls-key` / socat `OPENSSL-LISTEN:..,cert,key,verify=0 TCP`; \
                     direct: no hops, no TLS"
                ),
                "gbit_per_s": gbps.to_json(|v| json!(v)),
                "samples_gbit_per_s": tput.to_json(|v| json!(v)),
                "relay_vs_socat": relay_vs_socat(&gbps),
            },
            "handshakes": {
                "tool": format!(
                    "tls-peer (rustls, release build): {CLIENT_THREADS} client threads, resumption disabled, {secs} s, \
                     per connection: connect, full handshake, read to the server's close, close_notify; \
                     hop: relay `forward tls://B P --tls-cert --tls-key` / socat \
                     `OPENSSL-LISTEN:B,{SOCAT_LISTEN},cert,key,verify=0 TCP:P`; backend closes at once; \
                     direct: tls-peer serve (rustls, {CLIENT_THREADS} threads); median of {rounds}"
                ),
                "handshakes_per_s": hps.to_json(|v| json!(v)),
                "samples_handshakes_per_s": hs.to_json(|s| json!(s.iter().map(HandshakeRun::per_s).collect::<Vec<_>>())),
                "runs": hs_runs.to_json(HandshakeRun::to_json),
                "relay_vs_socat": relay_vs_socat(&hps),
            },
        }),
        errors,
        rows,
    }
}

/// The 1-minute load average, from /proc/loadavg.
fn loadavg() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn relay_vs_socat(values: &PerVia<f64>) -> Option<f64> {
    match (&values.relay, &values.socat) {
        (Ok(r), Ok(s)) if *s > 0.0 => Some(r / s),
        _ => None,
    }
}

/// A table row for a higher-is-better value with a "relay >= Nx socat" target.
fn ratio_row(metric: &str, values: &PerVia<f64>, decimals: usize, target: f64) -> Row {
    Row {
        metric: metric.to_string(),
        values: [
            cell(&values.direct, decimals),
            cell(&values.socat, decimals),
            cell(&values.relay, decimals),
        ],
        vs_socat: ratio(values.relay.clone().ok(), values.socat.clone().ok()),
        vs_direct: ratio(values.relay.clone().ok(), values.direct.clone().ok()),
        target: Some(Target {
            text: format!(">= {target}x socat"),
            pass: relay_vs_socat(values).map(|r| r >= target),
        }),
    }
}

// ---------------------------------------------------------------------------
// Certificates

/// A CA and a leaf certificate it signed, for 127.0.0.1 and `localhost`,
/// as PEM files for the forwarders and tls-peer.
struct Certs {
    ca_pem: PathBuf,
    cert_pem: PathBuf,
    key_pem: PathBuf,
    _dir: TempDir,
}

impl Certs {
    fn generate() -> Result<Certs> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let dir = TempDir::new("tls")?;
        let ca_key = KeyPair::generate().context("cannot generate the CA key")?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())
            .context("cannot set up the CA certificate")?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "relay bench CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = ca_params
            .self_signed(&ca_key)
            .context("cannot sign the CA certificate")?;

        let key = KeyPair::generate().context("cannot generate the server key")?;
        let mut params =
            CertificateParams::new(vec![CERT_NAME.to_string(), "127.0.0.1".to_string()])
                .context("cannot set up the server certificate")?;
        // socat's commonname= check falls back to the CN when it finds no SAN match.
        params
            .distinguished_name
            .push(DnType::CommonName, CERT_NAME);
        let cert = params
            .signed_by(&key, &ca, &ca_key)
            .context("cannot sign the server certificate")?;

        let certs = Certs {
            ca_pem: dir.path().join("ca.pem"),
            cert_pem: dir.path().join("server.pem"),
            key_pem: dir.path().join("server.key"),
            _dir: dir,
        };
        write_file(&certs.ca_pem, &ca.pem(), 0o644)?;
        write_file(&certs.cert_pem, &cert.pem(), 0o644)?;
        // Owner-only, as relay warns about group/other-readable keys.
        write_file(&certs.key_pem, &key.serialize_pem(), 0o600)?;
        Ok(certs)
    }
}

fn write_file(path: &Path, text: &str, mode: u32) -> Result<()> {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .with_context(|| format!("cannot write {}", path.display()))
}

// ---------------------------------------------------------------------------
// Hops

/// What a TLS hop does with TLS.
#[derive(Clone, Copy)]
enum Role {
    /// Terminates TLS from its clients, forwards plain.
    Exit,
    /// Takes plain clients, originates TLS to its target.
    Entry,
}

/// Start `via` listening on a free port in front of 127.0.0.1:`target`,
/// with TLS on the side `role` says; returns once it listens.
fn start_hop(
    ctx: &Ctx,
    certs: &Certs,
    via: Via,
    role: Role,
    target: u16,
    label: &str,
) -> Result<Hop> {
    let port = procs::free_port()?;
    let (cert, key, ca) = (&certs.cert_pem, &certs.key_pem, &certs.ca_pem);
    let cmd = match (via, role) {
        (Via::Direct, _) => bail!("invariant: direct runs start no hop"),
        (Via::Relay, Role::Exit) => {
            let mut cmd = Command::new(&ctx.relay_bin);
            cmd.arg("forward")
                .arg(format!("tls://127.0.0.1:{port}"))
                .arg(format!("127.0.0.1:{target}"))
                .arg("--tls-cert")
                .arg(cert)
                .arg("--tls-key")
                .arg(key);
            cmd
        }
        (Via::Relay, Role::Entry) => {
            let mut cmd = Command::new(&ctx.relay_bin);
            cmd.arg("forward")
                .arg(format!("127.0.0.1:{port}"))
                .arg(format!("tls://127.0.0.1:{target}"))
                .arg("--tls-ca")
                .arg(ca)
                .args(["--tls-name", CERT_NAME]);
            cmd
        }
        (Via::Socat, Role::Exit) => {
            let mut cmd = Command::new("socat");
            cmd.arg(format!(
                "OPENSSL-LISTEN:{port},{SOCAT_LISTEN},cert={},key={},verify=0",
                cert.display(),
                key.display()
            ))
            .arg(format!("TCP:127.0.0.1:{target}"));
            cmd
        }
        (Via::Socat, Role::Entry) => {
            let mut cmd = Command::new("socat");
            cmd.arg(format!("TCP-LISTEN:{port},{SOCAT_LISTEN}"))
                .arg(format!(
                    "OPENSSL:127.0.0.1:{target},cafile={},commonname={CERT_NAME}",
                    ca.display()
                ));
            cmd
        }
    };
    Hop::spawn(via, port, cmd, label)
}

/// One iperf3 run: fresh server, then exit hop, then entry hop in front.
fn measure_throughput(ctx: &Ctx, certs: &Certs, via: Via, secs: u64) -> Result<f64> {
    let label = format!("tls-{}", via.name());
    let (server_port, _server) = iperf3_server(&label)?;
    let mut hops = Vec::new();
    let client_port = if via == Via::Direct {
        server_port
    } else {
        let exit = start_hop(ctx, certs, via, Role::Exit, server_port, "tls-exit")?;
        let entry = start_hop(ctx, certs, via, Role::Entry, exit.port, "tls-entry")?;
        let port = entry.port;
        hops.extend([exit, entry]);
        port
    };
    let gbps = iperf3_client(client_port, secs, 1, &label);
    for hop in &mut hops {
        hop.check_alive()?;
    }
    gbps
}

// ---------------------------------------------------------------------------
// Handshakes

/// The processes the handshake measurement keeps for all its runs.
struct HandshakeBench {
    peer_bin: PathBuf,
    /// Plain backend behind the hop: accepts and closes.
    backend_port: u16,
    _backend: Proc,
    /// TLS server for the direct runs.
    direct_port: u16,
    _direct: Proc,
}

impl HandshakeBench {
    fn start(certs: &Certs) -> Result<HandshakeBench> {
        let peer_bin = build_peer()?;
        let backend_port = procs::free_port()?;
        let mut cmd = Command::new(&peer_bin);
        cmd.arg("close").arg(backend_port.to_string());
        let mut backend = Proc::spawn("tls-peer-backend", cmd)?;
        procs::wait_listening(backend_port, &mut backend, Duration::from_secs(10))?;

        let direct_port = procs::free_port()?;
        let mut cmd = Command::new(&peer_bin);
        cmd.arg("serve")
            .arg(direct_port.to_string())
            .arg(&certs.cert_pem)
            .arg(&certs.key_pem)
            .arg(CLIENT_THREADS.to_string());
        let mut direct = Proc::spawn("tls-peer-direct", cmd)?;
        procs::wait_listening(direct_port, &mut direct, Duration::from_secs(10))?;
        Ok(HandshakeBench {
            peer_bin,
            backend_port,
            _backend: backend,
            direct_port,
            _direct: direct,
        })
    }

    fn measure(&self, ctx: &Ctx, certs: &Certs, via: Via, secs: u64) -> Result<HandshakeRun> {
        let mut hop = match via {
            Via::Direct => None,
            _ => Some(start_hop(
                ctx,
                certs,
                via,
                Role::Exit,
                self.backend_port,
                "tls-handshakes",
            )?),
        };
        let port = hop.as_ref().map_or(self.direct_port, |h| h.port);
        let mut cmd = Command::new(&self.peer_bin);
        cmd.arg("handshakes")
            .arg(port.to_string())
            .arg(&certs.ca_pem)
            .arg(CERT_NAME)
            .arg(CLIENT_THREADS.to_string())
            .arg(secs.to_string());
        let out = Proc::spawn(&format!("tls-peer-handshakes-{}", via.name()), cmd)?
            .wait_output(Duration::from_secs(secs + 30));
        if let Some(hop) = &mut hop {
            hop.check_alive()?;
        }
        let run = HandshakeRun::parse(&out?)?;
        // A forwarder that fails handshakes fast would look fast.
        if run.handshakes == 0 || run.errors > run.handshakes / 100 {
            bail!(
                "{} of {} connections failed (first: {}); see target/bench/logs/{}.err",
                run.errors,
                run.handshakes + run.errors,
                run.first_error.as_deref().unwrap_or("?"),
                match via {
                    Via::Direct => "tls-peer-direct".to_string(),
                    _ => format!("{}-tls-handshakes", via.name()),
                }
            );
        }
        Ok(run)
    }
}

/// `cargo build --release -p xtask --bin tls-peer`; returns its path.
fn build_peer() -> Result<PathBuf> {
    cmd::run_streaming(workspace::cargo().args([
        "build",
        "--release",
        "-p",
        "xtask",
        "--bin",
        "tls-peer",
    ]))?;
    let bin = workspace::target_dir().join("release").join("tls-peer");
    if !bin.is_file() {
        bail!("cargo built tls-peer but {} does not exist", bin.display());
    }
    Ok(bin)
}

/// What one `tls-peer handshakes` run reported (its stdout, one JSON line).
#[derive(Clone, Debug, Default, PartialEq)]
struct HandshakeRun {
    /// Connections with a completed handshake and a server close.
    handshakes: u64,
    seconds: f64,
    /// Connect, handshake or I/O failures (timeouts included).
    errors: u64,
    first_error: Option<String>,
    /// Of `handshakes`: server closes without close_notify, and resets.
    closed_without_notify: u64,
    reset_after_handshake: u64,
    /// Protocol, cipher suite and key exchange group of the first connection.
    negotiated: Option<String>,
}

impl HandshakeRun {
    fn parse(out: &str) -> Result<HandshakeRun> {
        let doc: Value = serde_json::from_str(out.trim())
            .with_context(|| format!("tls-peer printed something that is not JSON: {out}"))?;
        let count = |key: &str| {
            doc.get(key)
                .and_then(Value::as_u64)
                .with_context(|| format!("tls-peer output has no count `{key}`: {out}"))
        };
        let text = |key: &str| doc.get(key).and_then(Value::as_str).map(str::to_string);
        Ok(HandshakeRun {
            handshakes: count("handshakes")?,
            seconds: doc
                .get("seconds")
                .and_then(Value::as_f64)
                .with_context(|| format!("tls-peer output has no `seconds`: {out}"))?,
            errors: count("errors")?,
            first_error: text("first_error"),
            closed_without_notify: count("closed_without_close_notify")?,
            reset_after_handshake: count("reset_after_handshake")?,
            negotiated: text("negotiated"),
        })
    }

    fn per_s(&self) -> f64 {
        self.handshakes as f64 / self.seconds.max(1e-9)
    }

    fn summary(&self) -> String {
        format!(
            "{:.0} handshakes/s ({} in {:.1} s; {} errors, {} closed without close_notify, {} reset; {})",
            self.per_s(),
            self.handshakes,
            self.seconds,
            self.errors,
            self.closed_without_notify,
            self.reset_after_handshake,
            self.negotiated.as_deref().unwrap_or("nothing negotiated")
        )
    }

    fn to_json(&self) -> Value {
        json!({
            "handshakes_per_s": self.per_s(),
            "handshakes": self.handshakes,
            "seconds": self.seconds,
            "errors": self.errors,
            "first_error": self.first_error,
            "closed_without_close_notify": self.closed_without_notify,
            "reset_after_handshake": self.reset_after_handshake,
            "negotiated": self.negotiated,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tls_peer_output() {
        let out = r#"{"handshakes":100,"seconds":2.0,"errors":1,"first_error":"connect: refused",
                      "closed_without_close_notify":3,"reset_after_handshake":0,
                      "negotiated":"TLSv1_3 TLS13_AES_256_GCM_SHA384 X25519"}"#;
        let run = HandshakeRun::parse(&out.replace('\n', " ")).unwrap();
        assert_eq!(
            (run.handshakes, run.errors, run.closed_without_notify),
            (100, 1, 3)
        );
        assert!((run.per_s() - 50.0).abs() < 1e-9);
        assert_eq!(run.first_error.as_deref(), Some("connect: refused"));
        assert!(HandshakeRun::parse("{}").is_err());
    }

    #[test]
    fn certificates_name_localhost_and_keep_the_key_private() {
        use std::os::unix::fs::PermissionsExt;
        let certs = Certs::generate().unwrap();
        let mode = std::fs::metadata(&certs.key_pem)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "key file mode {mode:o}");
        for path in [&certs.ca_pem, &certs.cert_pem] {
            let text = std::fs::read_to_string(path).unwrap();
            assert!(
                text.starts_with("-----BEGIN CERTIFICATE-----"),
                "{}",
                path.display()
            );
        }
    }
}
