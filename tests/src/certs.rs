//! A throwaway PKI for the TLS tests: a CA and the certificates it issues,
//! generated at run time with rcgen into a temp dir that is removed on drop.
//!
//! No private key ever lives in the repository. Every certificate gets a
//! serial number unique within the test process, so "which certificate did
//! the peer present" is answered by comparing DER bytes (or the serial).
//! Not a general X.509 tool: just the shapes the tests need (server certs
//! for names or IPs, client certs by CN, expired ones).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SerialNumber,
};

use crate::tempdir::TempDir;

/// Serial numbers, unique per test process (CAs and leaves alike).
static NEXT_SERIAL: AtomicU64 = AtomicU64::new(1000);

/// What a certificate is for: the EKU it carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Usage {
    Server,
    Client,
}

/// The shape of a leaf certificate to issue.
#[derive(Clone, Debug)]
pub struct CertSpec {
    cn: String,
    names: Vec<String>,
    usage: Usage,
    expired: bool,
}

impl CertSpec {
    /// A server certificate valid for `names` (DNS names or IP addresses,
    /// as SANs); its CN is the first name.
    pub fn server(names: &[&str]) -> Self {
        Self {
            cn: names.first().copied().unwrap_or("server").to_string(),
            names: names.iter().map(|n| n.to_string()).collect(),
            usage: Usage::Server,
            expired: false,
        }
    }

    /// A server certificate for 127.0.0.1 (IP SAN) and `localhost`.
    pub fn loopback_server() -> Self {
        Self::server(&["127.0.0.1", "localhost"])
    }

    /// A client certificate whose subject CN is `cn` (no SAN).
    pub fn client(cn: &str) -> Self {
        Self {
            cn: cn.to_string(),
            names: Vec::new(),
            usage: Usage::Client,
            expired: false,
        }
    }

    /// Replace the subject CN (e.g. to tell two versions of a cert apart).
    pub fn cn(mut self, cn: &str) -> Self {
        self.cn = cn.to_string();
        self
    }

    /// Valid only during 2020: `not_after` lies in the past.
    pub fn expired(mut self) -> Self {
        self.expired = true;
        self
    }
}

/// A certificate and key written to disk, and what identifies them.
#[derive(Clone, Debug)]
pub struct Issued {
    /// PEM certificate file.
    pub cert: PathBuf,
    /// PEM (PKCS#8) private key file, mode 0600.
    pub key: PathBuf,
    /// The certificate in DER, to compare with what a peer presented.
    pub cert_der: Vec<u8>,
    /// The private key in PKCS#8 DER, for the in-process TLS client.
    pub key_der: Vec<u8>,
    pub cn: String,
    pub serial: u64,
}

/// A certificate authority with its files in a temp dir of its own.
pub struct Ca {
    name: String,
    cert: rcgen::Certificate,
    key: KeyPair,
    cert_path: PathBuf,
    // Last: the directory outlives nothing that points into it.
    dir: TempDir,
}

impl Ca {
    /// A fresh self-signed CA named `name` (its CN), written to `ca.pem`.
    pub fn new(name: &str) -> Result<Self> {
        let dir = TempDir::new(&format!("pki-{name}"))?;
        let mut params = CertificateParams::new(Vec::<String>::new())
            .context("building CA certificate parameters")?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(next_serial().into());
        let key = KeyPair::generate().context("generating the CA key")?;
        let cert = params
            .self_signed(&key)
            .with_context(|| format!("self-signing CA {name}"))?;
        let cert_path = dir.join("ca.pem");
        write_file(&cert_path, cert.pem().as_bytes(), 0o644)?;
        Ok(Self {
            name: name.to_string(),
            cert,
            key,
            cert_path,
            dir,
        })
    }

    /// The CA certificate (PEM file), for `--tls-ca`, `cafile=` and peers.
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// The CA certificate in DER, for the in-process TLS client's roots.
    pub fn cert_der(&self) -> &[u8] {
        self.cert.der()
    }

    /// The directory the CA writes into; tests put their other files here.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Issue a leaf per `spec`, written to `<stem>.pem` and `<stem>.key`.
    pub fn issue(&self, stem: &str, spec: &CertSpec) -> Result<Issued> {
        let what = || format!("issuing {stem} ({spec:?}) from CA {}", self.name);
        let mut params = CertificateParams::new(spec.names.clone()).with_context(what)?;
        params
            .distinguished_name
            .push(DnType::CommonName, spec.cn.as_str());
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![match spec.usage {
            Usage::Server => ExtendedKeyUsagePurpose::ServerAuth,
            Usage::Client => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        params.use_authority_key_identifier_extension = true;
        let serial = next_serial();
        params.serial_number = Some(SerialNumber::from(serial));
        if spec.expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().with_context(what)?;
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .with_context(what)?;
        let issued = Issued {
            cert: self.dir.join(&format!("{stem}.pem")),
            key: self.dir.join(&format!("{stem}.key")),
            cert_der: cert.der().to_vec(),
            key_der: key.serialize_der(),
            cn: spec.cn.clone(),
            serial,
        };
        write_file(&issued.cert, cert.pem().as_bytes(), 0o644)?;
        write_file(&issued.key, key.serialize_pem().as_bytes(), 0o600)?;
        Ok(issued)
    }
}

impl Issued {
    /// Put this certificate and key in place of `target`'s files, each by
    /// an atomic rename (key first, so a reader that sees the new
    /// certificate also finds its key). The files here are consumed.
    pub fn replace(&self, target: &Issued) -> Result<()> {
        for (from, to) in [(&self.key, &target.key), (&self.cert, &target.cert)] {
            std::fs::rename(from, to)
                .with_context(|| format!("renaming {} over {}", from.display(), to.display()))?;
        }
        Ok(())
    }
}

fn next_serial() -> u64 {
    NEXT_SERIAL.fetch_add(1, Ordering::Relaxed)
}

/// Write `bytes` to a new file `path` created with `mode`.
pub fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))
}
