//! tshark: capturing a TCP port on loopback, and reading the capture back
//! decrypted with a TLS key log (the proof that relay's key log is right).
//!
//! Capture start is polled from tshark's own "Capture started" message;
//! capture end is polled from the file itself (the connection's FINs are in
//! it) before SIGINT, because tshark drops packets still in flight when
//! interrupted.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;

use crate::child::ChildProc;
use crate::interactive::Interactive;
use crate::wait::poll_until;

/// How long tshark may take to start or to read a file.
const TSHARK_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `tshark -i lo -f 'tcp port <p>' -w <file>`.
pub struct Capture {
    proc: ChildProc,
    port: u16,
    file: PathBuf,
}

impl Capture {
    /// Start capturing TCP port `port` on `lo` into `file`, and wait until
    /// packets are being captured.
    pub fn start(port: u16, file: &Path) -> Result<Self> {
        let mut cmd = Command::new("tshark");
        cmd.args(["-i", "lo", "-f"])
            .arg(format!("tcp port {port}"))
            .arg("-w")
            .arg(file);
        let mut proc = ChildProc::spawn("tshark-capture", cmd)?;
        poll_until("tshark to say \"Capture started\"", TSHARK_TIMEOUT, || {
            proc.ensure_running()?;
            Ok(proc.log().contains("Capture started").then_some(()))
        })?;
        Ok(Self {
            proc,
            port,
            file: file.to_path_buf(),
        })
    }

    /// Wait until the capture holds `fins` TCP FIN segments (the traffic
    /// of interest is complete), then stop tshark with SIGINT.
    pub fn stop_after_fins(mut self, fins: usize) -> Result<PathBuf> {
        let filter = format!("tcp.port == {} && tcp.flags.fin == 1", self.port);
        let file = self.file.clone();
        poll_until(
            &format!("{fins} FINs in the capture {}", file.display()),
            TSHARK_TIMEOUT,
            || {
                // The file grows while being read; a cut-short last packet
                // only makes tshark complain on stderr.
                let out = read(&file, &[], &filter, &["-T", "fields", "-e", "frame.number"])?;
                Ok((out.lines().count() >= fins).then_some(()))
            },
        )?;
        self.proc.signal(Signal::SIGINT)?;
        match self.proc.wait_exit(TSHARK_TIMEOUT)? {
            Some(_) => Ok(file),
            None => bail!("tshark did not stop within {TSHARK_TIMEOUT:?} of SIGINT"),
        }
    }
}

/// The request URIs of the HTTP requests in `pcap` on TCP port `port`,
/// decrypted with the NSS key log `keylog`.
pub fn decrypted_http_uris(pcap: &Path, keylog: &Path, port: u16) -> Result<Vec<String>> {
    let keylog_pref = format!("tls.keylog_file:{}", keylog.display());
    let tls_on_port = format!("tcp.port=={port},tls");
    let http_in_tls = format!("tls.port=={port},http");
    let out = read(
        pcap,
        &["-o", &keylog_pref, "-d", &tls_on_port, "-d", &http_in_tls],
        "http.request",
        &["-T", "fields", "-e", "http.request.uri"],
    )?;
    Ok(out.lines().map(str::to_string).collect())
}

/// `tshark -r <pcap> <options> -Y <filter> <output>`; returns stdout.
fn read(pcap: &Path, options: &[&str], filter: &str, output: &[&str]) -> Result<String> {
    let mut cmd = Command::new("tshark");
    cmd.arg("-r")
        .arg(pcap)
        .args(options)
        .args(["-Y", filter])
        .args(output);
    let out = Interactive::run("tshark-read", cmd, b"", TSHARK_TIMEOUT)?;
    String::from_utf8(out.stdout)
        .with_context(|| format!("tshark's output for {} is not UTF-8", pcap.display()))
}
