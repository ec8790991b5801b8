//! Naming why a handshake failed, for the `outcome` label of
//! `relay_tls_handshakes_total` and for the log line.

use std::io;

use rustls::{AlertDescription, CertificateError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeOutcome {
    Ok,
    /// The peer's certificate does not chain to a trusted CA (or the peer said so of ours).
    UnknownCa,
    /// The certificate is not valid for the name that was checked.
    BadName,
    /// The certificate has expired or is not valid yet.
    Expired,
    /// A client certificate was required and none came.
    NoClientCert,
    /// The client certificate is valid but its names are not in --tls-allow-name.
    NotAllowed,
    /// Anything else: not TLS at all, no common version or cipher, a bad message.
    Protocol,
    /// The handshake did not finish within the handshake timeout.
    Timeout,
}

impl HandshakeOutcome {
    pub const ALL: [HandshakeOutcome; 8] = [
        HandshakeOutcome::Ok,
        HandshakeOutcome::UnknownCa,
        HandshakeOutcome::BadName,
        HandshakeOutcome::Expired,
        HandshakeOutcome::NoClientCert,
        HandshakeOutcome::NotAllowed,
        HandshakeOutcome::Protocol,
        HandshakeOutcome::Timeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            HandshakeOutcome::Ok => "ok",
            HandshakeOutcome::UnknownCa => "unknown_ca",
            HandshakeOutcome::BadName => "bad_name",
            HandshakeOutcome::Expired => "expired",
            HandshakeOutcome::NoClientCert => "no_client_cert",
            HandshakeOutcome::NotAllowed => "not_allowed",
            HandshakeOutcome::Protocol => "protocol",
            HandshakeOutcome::Timeout => "timeout",
        }
    }

    /// Classifies the error tokio-rustls returned for a failed handshake.
    pub fn of(err: &io::Error) -> Self {
        match err
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            Some(tls) => Self::of_rustls(tls),
            None => HandshakeOutcome::Protocol,
        }
    }

    fn of_rustls(err: &rustls::Error) -> Self {
        use HandshakeOutcome::*;
        match err {
            rustls::Error::InvalidCertificate(cert) => match cert {
                CertificateError::UnknownIssuer | CertificateError::BadSignature => UnknownCa,
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => BadName,
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. } => Expired,
                _ => Protocol,
            },
            rustls::Error::NoCertificatesPresented => NoClientCert,
            rustls::Error::AlertReceived(alert) => match alert {
                AlertDescription::UnknownCA => UnknownCa,
                AlertDescription::CertificateExpired => Expired,
                AlertDescription::CertificateRequired => NoClientCert,
                _ => Protocol,
            },
            _ => Protocol,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io(err: rustls::Error) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, err)
    }

    #[test]
    fn names_the_failure_class() {
        let cases = [
            (
                rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
                "unknown_ca",
            ),
            (
                rustls::Error::InvalidCertificate(CertificateError::NotValidForName),
                "bad_name",
            ),
            (
                rustls::Error::InvalidCertificate(CertificateError::Expired),
                "expired",
            ),
            (rustls::Error::NoCertificatesPresented, "no_client_cert"),
            (
                rustls::Error::AlertReceived(AlertDescription::CertificateRequired),
                "no_client_cert",
            ),
            (
                rustls::Error::AlertReceived(AlertDescription::UnknownCA),
                "unknown_ca",
            ),
            (
                rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType),
                "protocol",
            ),
        ];
        for (err, expected) in cases {
            assert_eq!(
                HandshakeOutcome::of(&io(err.clone())).as_str(),
                expected,
                "{err:?}"
            );
        }
        assert_eq!(
            HandshakeOutcome::of(&io::Error::other("eof")),
            HandshakeOutcome::Protocol
        );
    }
}
