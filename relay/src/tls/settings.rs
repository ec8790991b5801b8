//! Merging TLS settings from the command line with those written into the
//! addresses (socat's `cafile=`, `cert=` ...), which win. Also refuses flags
//! that would do nothing, such as `--tls-ca` on a plain target.

use std::path::PathBuf;
use std::sync::Arc;

use super::{ClientOptions, Common, ServerOptions, Sni, TlsError, keylog::KeyLogFile};
use crate::addr::{ListenAddr, TargetAddr};

/// TLS flags of a route, as given on the command line.
#[derive(Debug, Clone, Default)]
pub struct Flags {
    pub ca: Option<PathBuf>,
    pub sni: Option<String>,
    pub no_sni: bool,
    pub name: Option<String>,
    /// The listener's certificate, or the client certificate when only the target speaks TLS.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub upstream_cert: Option<PathBuf>,
    pub upstream_key: Option<PathBuf>,
    pub client_ca: Option<PathBuf>,
    pub allow_names: Vec<String>,
    pub alpn: Vec<String>,
    pub tls13_only: bool,
    pub insecure: bool,
    /// `--tls-keylog`, else the SSLKEYLOGFILE environment variable.
    pub keylog: Option<PathBuf>,
}

fn unused(flag: &str, why: &str) -> TlsError {
    TlsError::Config(format!("{flag} is given but {why}"))
}

/// The TLS options of both legs of a route, or why they do not fit together.
pub fn resolve(
    listen: &ListenAddr,
    target: &TargetAddr,
    flags: &Flags,
) -> Result<(Option<ServerOptions>, Option<ClientOptions>), TlsError> {
    if target.tls.is_none() {
        let plain = "the target is not TLS (use tls://host:port or OPENSSL:host:port)";
        for (set, flag) in [
            (flags.ca.is_some(), "--tls-ca"),
            (flags.sni.is_some(), "--tls-sni"),
            (flags.no_sni, "--tls-no-sni"),
            (flags.name.is_some(), "--tls-name"),
            (flags.insecure, "--tls-insecure"),
            (
                flags.upstream_cert.is_some() || flags.upstream_key.is_some(),
                "--tls-upstream-cert/--tls-upstream-key",
            ),
        ] {
            if set {
                return Err(unused(flag, plain));
            }
        }
    }
    if listen.tls.is_none() {
        let plain = "the listener is not TLS (use tls://host:port or OPENSSL-LISTEN:port)";
        if flags.client_ca.is_some() {
            return Err(unused("--tls-client-ca", plain));
        }
        if !flags.allow_names.is_empty() {
            return Err(unused("--tls-allow-name", plain));
        }
        if target.tls.is_none()
            && (flags.cert.is_some()
                || flags.key.is_some()
                || flags.keylog.is_some()
                || !flags.alpn.is_empty())
        {
            return Err(unused(
                "a TLS flag",
                "neither the listener nor the target is TLS",
            ));
        }
    }
    if listen.tls.is_none() && target.tls.is_none() {
        return Ok((None, None));
    }

    let keylog = flags
        .keylog
        .clone()
        .or_else(|| std::env::var_os("SSLKEYLOGFILE").map(PathBuf::from));
    let common = Common {
        alpn: flags.alpn.clone(),
        tls13_only: flags.tls13_only,
        keylog: keylog
            .map(|path| KeyLogFile::open(&path).map(|k| Arc::new(k) as Arc<dyn rustls::KeyLog>))
            .transpose()?,
    };

    let server = listen
        .tls
        .as_ref()
        .map(|l| {
            let cert = l.cert.clone().or_else(|| flags.cert.clone()).ok_or_else(|| {
                TlsError::Config("a TLS listener needs its certificate: --tls-cert <file> --tls-key <file> (or cert=/key= on OPENSSL-LISTEN)".into())
            })?;
            // socat accepts one PEM file holding both certificate and key.
            let key = l.key.clone().or_else(|| flags.key.clone()).unwrap_or_else(|| cert.clone());
            let client_ca = if l.verify_clients {
                Some(l.ca.clone().or_else(|| flags.client_ca.clone()).ok_or_else(|| {
                    TlsError::Config(
                        "OPENSSL-LISTEN verifies client certificates by default (socat's verify=1): give cafile=<ca.pem>, or verify=0 to accept clients without one".into(),
                    )
                })?)
            } else {
                flags.client_ca.clone()
            };
            Ok::<_, TlsError>(ServerOptions { cert, key, client_ca, allow_names: flags.allow_names.clone(), common: common.clone() })
        })
        .transpose()?;

    let client = target.tls.as_ref().map(|t| {
        let (cert, key) = if t.cert.is_some() || t.key.is_some() {
            (t.cert.clone(), t.key.clone().or_else(|| t.cert.clone()))
        } else if flags.upstream_cert.is_some() || flags.upstream_key.is_some() {
            (flags.upstream_cert.clone(), flags.upstream_key.clone())
        } else if listen.tls.is_none() {
            (flags.cert.clone(), flags.key.clone())
        } else {
            (None, None)
        };
        let sni = if t.no_sni || flags.no_sni {
            Sni::Off
        } else {
            t.sni
                .clone()
                .or_else(|| flags.sni.clone())
                .map_or(Sni::Host, Sni::Name)
        };
        ClientOptions {
            ca: t.ca.clone().or_else(|| flags.ca.clone()),
            sni,
            name: t.name.clone().or_else(|| flags.name.clone()),
            cert,
            key,
            verify: t.verify && !flags.insecure,
            common: common.clone(),
        }
    });
    Ok((server, client))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::{parse_listen, parse_target};

    fn resolve_str(
        listen: &str,
        target: &str,
        flags: &Flags,
    ) -> Result<(Option<ServerOptions>, Option<ClientOptions>), TlsError> {
        resolve(
            &parse_listen(listen).unwrap(),
            &parse_target(target).unwrap(),
            flags,
        )
    }

    #[test]
    fn cert_flags_go_to_the_listener_when_it_is_tls_else_to_the_client() {
        let flags = Flags {
            cert: Some("c.pem".into()),
            key: Some("c.key".into()),
            ..Flags::default()
        };
        let (server, client) = resolve_str("tls://127.0.0.1:1", "tls://db:2", &flags).unwrap();
        assert_eq!(server.unwrap().cert, PathBuf::from("c.pem"));
        assert_eq!(
            client.unwrap().cert,
            None,
            "TLS to TLS: --tls-cert is the listener's"
        );
        let (server, client) = resolve_str("127.0.0.1:1", "tls://db:2", &flags).unwrap();
        assert!(server.is_none());
        assert_eq!(client.unwrap().key, Some(PathBuf::from("c.key")));
    }

    #[test]
    fn address_options_win_over_flags() {
        let flags = Flags {
            ca: Some("flag-ca.pem".into()),
            sni: Some("flag".into()),
            ..Flags::default()
        };
        let (_, client) = resolve_str(
            "127.0.0.1:1",
            "OPENSSL:db:2,cafile=addr-ca.pem,snihost=addr",
            &flags,
        )
        .unwrap();
        let client = client.unwrap();
        assert_eq!(client.ca, Some(PathBuf::from("addr-ca.pem")));
        assert_eq!(client.sni, Sni::Name("addr".into()));
        let (_, client) =
            resolve_str("127.0.0.1:1", "OPENSSL:db:2,verify=0", &Flags::default()).unwrap();
        assert!(!client.unwrap().verify);
    }

    #[test]
    fn socat_listen_demands_a_client_ca_unless_verify_0() {
        let err = resolve_str(
            "OPENSSL-LISTEN:1,cert=s.pem",
            "127.0.0.1:2",
            &Flags::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("verify=0"), "{err}");
        let (server, _) = resolve_str(
            "OPENSSL-LISTEN:1,cert=s.pem,verify=0",
            "127.0.0.1:2",
            &Flags::default(),
        )
        .unwrap();
        let server = server.unwrap();
        assert_eq!(
            (server.client_ca, server.key),
            (None, PathBuf::from("s.pem"))
        );
        let (server, _) = resolve_str(
            "OPENSSL-LISTEN:1,cert=s.pem,cafile=ca.pem",
            "127.0.0.1:2",
            &Flags::default(),
        )
        .unwrap();
        assert_eq!(server.unwrap().client_ca, Some(PathBuf::from("ca.pem")));
    }

    #[test]
    fn flags_that_would_do_nothing_are_refused() {
        let flags = Flags {
            ca: Some("ca.pem".into()),
            ..Flags::default()
        };
        let err = resolve_str("127.0.0.1:1", "127.0.0.1:2", &flags).unwrap_err();
        assert!(err.to_string().contains("--tls-ca"), "{err}");
        let flags = Flags {
            client_ca: Some("ca.pem".into()),
            ..Flags::default()
        };
        assert!(
            resolve_str("127.0.0.1:1", "tls://db:2", &flags)
                .unwrap_err()
                .to_string()
                .contains("--tls-client-ca")
        );
        assert!(
            resolve_str("tls://127.0.0.1:1", "127.0.0.1:2", &Flags::default())
                .unwrap_err()
                .to_string()
                .contains("--tls-cert")
        );
    }
}
