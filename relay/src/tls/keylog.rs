//! NSS key log lines (`CLIENT_RANDOM ...`, `CLIENT_TRAFFIC_SECRET_0 ...`)
//! written to a file of the user's choosing, so Wireshark and tshark can
//! decrypt captures of either TLS leg; and [`KeyLogTee`], which also hands
//! every line to someone else (`--pcap-embed-keys` puts them in the pcapng).

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::Path;
use std::sync::Mutex;

use super::TlsError;

#[derive(Debug)]
pub struct KeyLogFile {
    file: Mutex<File>,
}

impl KeyLogFile {
    /// Opens `path` for appending (created 0600: the secrets decrypt traffic).
    pub fn open(path: &Path) -> Result<Self, TlsError> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(|cause| TlsError::File {
                path: path.to_path_buf(),
                problem: format!("cannot open key log: {cause}"),
            })?;
        Ok(KeyLogFile {
            file: Mutex::new(file),
        })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn nss_line(label: &str, client_random: &[u8], secret: &[u8]) -> String {
    format!("{label} {} {}\n", hex(client_random), hex(secret))
}

/// Where a [`KeyLogTee`] sends each line besides the wrapped key log.
type LineSink = Box<dyn Fn(&[u8]) + Send + Sync>;

/// A key log that passes every line to `also` and to the key log it wraps (if any).
pub struct KeyLogTee {
    inner: Option<std::sync::Arc<dyn rustls::KeyLog>>,
    also: LineSink,
}

impl KeyLogTee {
    pub fn new(
        inner: Option<std::sync::Arc<dyn rustls::KeyLog>>,
        also: impl Fn(&[u8]) + Send + Sync + 'static,
    ) -> Self {
        KeyLogTee {
            inner,
            also: Box::new(also),
        }
    }
}

impl std::fmt::Debug for KeyLogTee {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyLogTee")
            .field("inner", &self.inner.is_some())
            .finish()
    }
}

impl rustls::KeyLog for KeyLogTee {
    fn log(&self, label: &str, client_random: &[u8], secret: &[u8]) {
        (self.also)(nss_line(label, client_random, secret).as_bytes());
        if let Some(inner) = &self.inner {
            inner.log(label, client_random, secret);
        }
    }
}

impl rustls::KeyLog for KeyLogFile {
    fn log(&self, label: &str, client_random: &[u8], secret: &[u8]) {
        let line = nss_line(label, client_random, secret);
        // One write per line, so concurrent handshakes never interleave.
        let mut file = self
            .file
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Err(err) = file.write_all(line.as_bytes()) {
            tracing::warn!(error = %err, "cannot write the TLS key log");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::KeyLog;

    #[test]
    fn writes_nss_lines() {
        let dir = std::env::temp_dir().join(format!("relay-keylog-{}", std::process::id()));
        let log = KeyLogFile::open(&dir).unwrap();
        log.log("CLIENT_RANDOM", &[0xab, 0x01], &[0xff]);
        let text = std::fs::read_to_string(&dir).unwrap();
        std::fs::remove_file(&dir).unwrap();
        assert_eq!(text, "CLIENT_RANDOM ab01 ff\n");
    }
}
