//! Reading certificates, keys and trust roots from PEM files, with errors
//! that name the file and say what is wrong with it.

use std::fs;
use std::path::{Path, PathBuf};

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::TlsError;

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|cause| TlsError::File {
        path: path.to_path_buf(),
        problem: cause.to_string(),
    })
}

fn bad(path: &Path, problem: impl Into<String>) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        problem: problem.into(),
    }
}

/// Every certificate in a PEM file, in order; at least one.
pub fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(path, format!("not a valid PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(bad(
            path,
            "no certificate in this file (expected -----BEGIN CERTIFICATE-----)",
        ));
    }
    Ok(certs)
}

/// The private key in a PEM file (PKCS#8, PKCS#1 or SEC1). Warns when the
/// file is readable by group or others.
pub fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    warn_if_exposed(path);
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => bad(
            path,
            "no private key in this file (expected -----BEGIN PRIVATE KEY-----)",
        ),
        other => bad(path, format!("not a valid PEM private key: {other}")),
    })
}

fn warn_if_exposed(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(file = %path.display(), mode = format!("{:o}", meta.permissions().mode() & 0o777),
            "private key file is readable by other users; chmod 600 it");
    }
}

/// Trust roots from a PEM file, or from every `*.crt`/`*.pem` file of a
/// directory (Docker's `certs.d/<host:port>/` layout works as is).
pub fn roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut files: Vec<PathBuf> = fs::read_dir(path)
            .map_err(|cause| bad(path, cause.to_string()))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension()
                    .is_some_and(|ext| ext == "crt" || ext == "pem")
            })
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(bad(path, "directory holds no *.crt or *.pem file"));
        }
        files
    } else {
        vec![path.to_path_buf()]
    };
    let mut store = RootCertStore::empty();
    for file in files {
        for cert in certificates(&file)? {
            store
                .add(cert)
                .map_err(|e| bad(&file, format!("not a usable CA certificate: {e}")))?;
        }
    }
    Ok(store)
}

/// The system's trust store.
pub fn system_roots() -> Result<RootCertStore, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    let mut store = RootCertStore::empty();
    let (added, _ignored) = store.add_parsable_certificates(found.certs);
    if added == 0 {
        return Err(TlsError::NoSystemRoots);
    }
    Ok(store)
}
