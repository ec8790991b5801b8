//! The few facts relay reads out of a certificate: its names (for
//! --tls-allow-name) and its expiry (to refuse an expired listener
//! certificate at startup rather than at every handshake).

use x509_parser::prelude::*;

/// Subject common names and DNS subject-alternative names.
pub fn names(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return Vec::new();
    };
    let mut names: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_string))
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        names.extend(
            san.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::DNSName(dns) => Some(dns.to_string()),
                    _ => None,
                }),
        );
    }
    names
}

/// The certificate's notAfter as an RFC 2822 date, if it lies in the past.
pub fn expired(der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let not_after = cert.validity().not_after;
    (not_after.timestamp() < ASN1Time::now().timestamp()).then(|| not_after.to_string())
}
