//! TLS bridging: relay against the peers that terminate and originate TLS
//! (socat, stunnel, HAProxy, nginx stream), all measured in the same run.
//!
//! - Throughput plain -> TLS -> plain: iperf3 through an "entry" hop that
//!   originates TLS and an "exit" hop that terminates it (two hops of the
//!   same tool). Direct is plain iperf3 with no hop and no TLS, for scale.
//!   Targets: relay >= 2x socat and >= 1.3x the best peer.
//! - Full TLS handshakes per second through one terminating hop to a
//!   backend that closes at once, driven by a rustls load generator
//!   (resumption disabled, so every connection pays for a full handshake).
//!   Direct is a bare rustls server: the ceiling of the generator on this
//!   machine. Targets: relay >= 10x socat and >= 1.5x the best peer.
//!
//! How each tool is told to do it is in `via.rs` and `peers.rs`.
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
use super::peers::{TlsFiles, TlsSide};
use super::procs::{self, Proc, TempDir};
use super::report::{Better, PerVia, SectionReport, Target, median_by};
use super::throughput::{iperf3_client, iperf3_server};
use super::via::{Hop, Via};
use crate::{cmd, workspace};

const TARGET_THROUGHPUT_VS_SOCAT: f64 = 2.0;
const TARGET_HANDSHAKES_VS_SOCAT: f64 = 10.0;
const TARGET_THROUGHPUT_VS_BEST: f64 = 1.3;
const TARGET_HANDSHAKES_VS_BEST: f64 = 1.5;
/// The name both forwarders check in the exit hop's certificate.
const CERT_NAME: &str = "localhost";
/// Load generator threads, each with one connection in flight; also the
/// bare server's threads.
const CLIENT_THREADS: usize = 8;

pub fn run(ctx: &Ctx) -> SectionReport {
    let (secs, rounds) = (ctx.secs(), ctx.rounds());
    let vias = ctx.vias(Via::TLS);
    // Other work on the machine shows up here; the JSON keeps it.
    let load_before = loadavg();
    let certs = Certs::generate();

    println!(
        "xtask: bench: TLS bridge throughput, plain -> entry hop -> TLS -> exit hop -> plain, \
         iperf3 -t {secs}, median of {rounds} rotating round(s) (direct: plain, no hops)"
    );
    let tput = match &certs {
        Err(err) => PerVia::all_failed(&vias, err),
        Ok(certs) => PerVia::measure_rounds(&vias, rounds, |via| {
            let gbps = measure_throughput(ctx, certs, via, secs)?;
            println!("xtask:   {:<14} {gbps:.2} Gbit/s", via.name());
            Ok(gbps)
        }),
    };

    println!(
        "xtask: bench: full TLS handshakes/s, {CLIENT_THREADS} rustls client threads, no resumption, \
         {secs} s, one hop to a backend that closes at once, median of {rounds} rotating round(s) \
         (direct: bare rustls server)"
    );
    let hs = match &certs {
        Err(err) => PerVia::all_failed(&vias, err),
        Ok(certs) => match HandshakeBench::start(certs) {
            Err(err) => PerVia::all_failed(&vias, &err),
            Ok(bench) => PerVia::measure_rounds(&vias, rounds, |via| {
                let run = bench.measure(ctx, certs, via, secs)?;
                println!("xtask:   {:<14} {}", via.name(), run.summary());
                Ok(run)
            }),
        },
    };

    let gbps = tput.map(|s| median_by(s, |g| *g));
    let hs_runs = hs.map(|s| median_by(s, |r| r.per_s()));
    let hps = hs_runs.map(HandshakeRun::per_s);
    let rows = vec![
        gbps.row(
            "TLS bridge plain->TLS->plain, 2 hops, 1 stream (Gbit/s; direct: no hops, no TLS)",
            2,
            Better::Higher,
        )
        .target(Target::at_least(
            &gbps,
            Via::Socat,
            TARGET_THROUGHPUT_VS_SOCAT,
        ))
        .target(Target::vs_best_peer(
            &gbps,
            Better::Higher,
            TARGET_THROUGHPUT_VS_BEST,
        )),
        hps.row(
            "TLS handshakes/s, full, 1 terminating hop (direct: rustls server)",
            0,
            Better::Higher,
        )
        .target(Target::at_least(
            &hps,
            Via::Socat,
            TARGET_HANDSHAKES_VS_SOCAT,
        ))
        .target(Target::vs_best_peer(
            &hps,
            Better::Higher,
            TARGET_HANDSHAKES_VS_BEST,
        )),
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
                     entry hop originates TLS verifying {CERT_NAME}, exit hop terminates it, two hops of \
                     the same tool (each hop's configuration: target/bench/<tool>-tls-entry.conf, \
                     <tool>-tls-exit.conf); direct: no hops, no TLS"
                ),
                "gbit_per_s": gbps.to_json(|v| json!(v)),
                "samples_gbit_per_s": tput.to_json(|v| json!(v)),
                "relay_vs_socat": gbps.relay_vs(Via::Socat),
                "relay_vs_best_peer": gbps.relay_vs_best_peer(Better::Higher),
            },
            "handshakes": {
                "tool": format!(
                    "tls-peer (rustls, release build): {CLIENT_THREADS} client threads, resumption disabled, {secs} s, \
                     per connection: connect, full handshake, read to the server's close, close_notify; \
                     one terminating hop (target/bench/<tool>-tls-handshakes.conf); backend closes at once; \
                     direct: tls-peer serve (rustls, {CLIENT_THREADS} threads); median of {rounds}"
                ),
                "handshakes_per_s": hps.to_json(|v| json!(v)),
                "samples_handshakes_per_s": hs.to_json(|s| json!(s.iter().map(HandshakeRun::per_s).collect::<Vec<_>>())),
                "runs": hs_runs.to_json(HandshakeRun::to_json),
                "relay_vs_socat": hps.relay_vs(Via::Socat),
                "relay_vs_best_peer": hps.relay_vs_best_peer(Better::Higher),
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

// ---------------------------------------------------------------------------
// Certificates

/// A CA and a leaf certificate it signed, for 127.0.0.1 and `localhost`,
/// as PEM files for the forwarders and tls-peer.
struct Certs {
    files: TlsFiles,
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

        let files = TlsFiles {
            ca: dir.path().join("ca.pem"),
            cert: dir.path().join("server.pem"),
            key: dir.path().join("server.key"),
            cert_and_key: dir.path().join("server-and-key.pem"),
            name: CERT_NAME,
        };
        write_file(&files.ca, &ca.pem(), 0o644)?;
        write_file(&files.cert, &cert.pem(), 0o644)?;
        // Owner-only, as relay warns about group/other-readable keys.
        write_file(&files.key, &key.serialize_pem(), 0o600)?;
        write_file(
            &files.cert_and_key,
            &(cert.pem() + &key.serialize_pem()),
            0o600,
        )?;
        Ok(Certs { files, _dir: dir })
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

/// Start `via` in front of 127.0.0.1:`target` with TLS on the side `tls`
/// says; returns once it listens.
fn start_hop(ctx: &Ctx, via: Via, tls: TlsSide, target: u16, label: &str) -> Result<Hop> {
    Hop::start_tls(via, target, tls, &ctx.relay_bin, label, ctx.hop_options())
}

/// One iperf3 run: fresh server, then exit hop, then entry hop in front.
fn measure_throughput(ctx: &Ctx, certs: &Certs, via: Via, secs: u64) -> Result<f64> {
    let label = format!("tls-{}", via.name());
    let (server_port, _server) = iperf3_server(&label)?;
    let mut hops = Vec::new();
    let client_port = if via == Via::Direct {
        server_port
    } else {
        let exit = start_hop(
            ctx,
            via,
            TlsSide::Terminate(&certs.files),
            server_port,
            "tls-exit",
        )?;
        let entry = start_hop(
            ctx,
            via,
            TlsSide::Originate(&certs.files),
            exit.port,
            "tls-entry",
        )?;
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
            .arg(&certs.files.cert)
            .arg(&certs.files.key)
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
                via,
                TlsSide::Terminate(&certs.files),
                self.backend_port,
                "tls-handshakes",
            )?),
        };
        let port = hop.as_ref().map_or(self.direct_port, |h| h.port);
        let mut cmd = Command::new(&self.peer_bin);
        cmd.arg("handshakes")
            .arg(port.to_string())
            .arg(&certs.files.ca)
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
        for key in [&certs.files.key, &certs.files.cert_and_key] {
            let mode = std::fs::metadata(key).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "{} mode {mode:o}", key.display());
        }
        let both = std::fs::read_to_string(&certs.files.cert_and_key).unwrap();
        assert!(both.contains("BEGIN CERTIFICATE") && both.contains("PRIVATE KEY"));
        for path in [&certs.files.ca, &certs.files.cert] {
            let text = std::fs::read_to_string(path).unwrap();
            assert!(
                text.starts_with("-----BEGIN CERTIFICATE-----"),
                "{}",
                path.display()
            );
        }
    }
}
