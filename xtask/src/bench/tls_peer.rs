//! `tls-peer`: the load-side processes of the TLS bench (`bench/tls.rs`).
//!
//! A binary of its own so that the bench can build it with `--release`:
//! `cargo xtask` runs an unoptimised xtask, and an unoptimised handshake
//! generator would be what limits the handshake rate. It is also what
//! wrk and iperf3 are to the other sections: a separate process with its
//! own logs. Not meant to be run by hand.
//!
//! ```text
//! tls-peer handshakes PORT CA_PEM NAME THREADS SECS   one JSON line on stdout
//! tls-peer serve PORT CERT_PEM KEY_PEM THREADS        TLS server, closes after each handshake
//! tls-peer close PORT                                 plain TCP server, closes at once
//! ```

use std::io::{self, Read};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use rustls::client::Resumption;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig};
use serde_json::json;

/// How long one connection may wait on its peer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

const USAGE: &str = "usage: tls-peer handshakes PORT CA_PEM NAME THREADS SECS \
                     | serve PORT CERT_PEM KEY_PEM THREADS | close PORT";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("tls-peer: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> Result<()> {
    let arg = |i: usize| {
        args.get(i)
            .map(String::as_str)
            .ok_or_else(|| anyhow!("missing argument {i}; {USAGE}"))
    };
    let number = |i: usize| -> Result<u64> {
        let text = arg(i)?;
        text.parse()
            .with_context(|| format!("argument {i} `{text}` is not a number; {USAGE}"))
    };
    let port = |i: usize| -> Result<u16> {
        u16::try_from(number(i)?).with_context(|| format!("argument {i} is not a port"))
    };
    match arg(0)? {
        "handshakes" => {
            let config = client_config(arg(2)?)?;
            let name = ServerName::try_from(arg(3)?.to_string())
                .with_context(|| format!("`{}` is not a TLS server name", arg(3).unwrap_or("")))?;
            let tally = generate(
                &config,
                &name,
                port(1)?,
                number(4)? as usize,
                Duration::from_secs(number(5)?),
            )?;
            println!("{}", tally.to_json());
            Ok(())
        }
        "serve" => {
            let config = server_config(arg(2)?, arg(3)?)?;
            serve(port(1)?, number(4)? as usize, move |sock| {
                let _ = serve_tls(&config, sock);
            })
        }
        "close" => serve(port(1)?, 1, drop),
        other => bail!("unknown command `{other}`; {USAGE}"),
    }
}

fn client_config(ca_pem: &str) -> Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    for cert in
        CertificateDer::pem_file_iter(ca_pem).with_context(|| format!("cannot read {ca_pem}"))?
    {
        let cert = cert.with_context(|| format!("bad PEM in {ca_pem}"))?;
        roots
            .add(cert)
            .with_context(|| format!("{ca_pem}: not usable as a trust root"))?;
    }
    let mut config = ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    // Every connection pays for a full handshake.
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

fn server_config(cert_pem: &str, key_pem: &str) -> Result<Arc<ServerConfig>> {
    let chain = CertificateDer::pem_file_iter(cert_pem)
        .with_context(|| format!("cannot read {cert_pem}"))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("bad PEM in {cert_pem}"))?;
    let key = PrivateKeyDer::from_pem_file(key_pem)
        .with_context(|| format!("no private key in {key_pem}"))?;
    let config = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("rustls refuses the certificate and key")?;
    Ok(Arc::new(config))
}

/// How the server ended a connection after the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Close {
    /// close_notify, then EOF.
    Notify,
    /// TCP EOF without close_notify.
    Eof,
    /// Connection reset.
    Reset,
}

/// What the generator saw, summed over its threads.
#[derive(Debug, Default)]
struct Tally {
    /// Connections with a completed handshake and a server close.
    ok: u64,
    /// Of `ok`: closes without close_notify, and resets.
    closed_without_notify: u64,
    reset_after_handshake: u64,
    /// Connect, handshake or I/O failures (timeouts included).
    errors: u64,
    first_error: Option<String>,
    /// Protocol, cipher suite and key exchange group of the first connection.
    negotiated: Option<String>,
    elapsed: Duration,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.ok += other.ok;
        self.closed_without_notify += other.closed_without_notify;
        self.reset_after_handshake += other.reset_after_handshake;
        self.errors += other.errors;
        self.first_error = self.first_error.take().or(other.first_error);
        self.negotiated = self.negotiated.take().or(other.negotiated);
    }

    fn to_json(&self) -> serde_json::Value {
        json!({
            "handshakes": self.ok,
            "seconds": self.elapsed.as_secs_f64(),
            "errors": self.errors,
            "first_error": self.first_error,
            "closed_without_close_notify": self.closed_without_notify,
            "reset_after_handshake": self.reset_after_handshake,
            "negotiated": self.negotiated,
        })
    }
}

/// Full handshakes against 127.0.0.1:`port` from `threads` threads for
/// `duration`; connections in flight at the end still count.
fn generate(
    config: &Arc<ClientConfig>,
    name: &ServerName<'static>,
    port: u16,
    threads: usize,
    duration: Duration,
) -> Result<Tally> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let start = Instant::now();
    let deadline = start + duration;
    let handles: Vec<JoinHandle<Tally>> = (0..threads)
        .map(|i| {
            let (config, name) = (config.clone(), name.clone());
            std::thread::Builder::new()
                .name(format!("client-{i}"))
                .spawn(move || {
                    let mut tally = Tally::default();
                    while Instant::now() < deadline {
                        match handshake_once(&config, &name, addr) {
                            Ok((close, negotiated)) => {
                                tally.ok += 1;
                                match close {
                                    Close::Notify => {}
                                    Close::Eof => tally.closed_without_notify += 1,
                                    Close::Reset => tally.reset_after_handshake += 1,
                                }
                                tally.negotiated.get_or_insert(negotiated);
                            }
                            Err(err) => {
                                tally.errors += 1;
                                tally.first_error.get_or_insert(format!("{err:#}"));
                                // Don't spin on a dead port.
                                std::thread::sleep(Duration::from_millis(10));
                            }
                        }
                    }
                    tally
                })
                .context("cannot start a client thread")
        })
        .collect::<Result<_>>()?;
    let mut total = Tally::default();
    for handle in handles {
        total.merge(
            handle
                .join()
                .map_err(|_| anyhow!("a client thread panicked"))?,
        );
    }
    total.elapsed = start.elapsed();
    Ok(total)
}

/// Connect, complete a full handshake, read until the server closes (its
/// backend closed at once), then send close_notify and close.
fn handshake_once(
    config: &Arc<ClientConfig>,
    name: &ServerName<'static>,
    addr: SocketAddr,
) -> Result<(Close, String)> {
    let mut sock = TcpStream::connect_timeout(&addr, IO_TIMEOUT).context("connect")?;
    set_timeouts(&sock)?;
    let client = ClientConnection::new(config.clone(), name.clone()).context("client setup")?;
    let mut conn = Connection::from(client);
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).context("handshake")?;
    }
    let negotiated = format!(
        "{:?} {:?} {:?}",
        conn.protocol_version()
            .ok_or_else(|| anyhow!("no protocol version"))?,
        conn.negotiated_cipher_suite()
            .ok_or_else(|| anyhow!("no cipher suite"))?
            .suite(),
        conn.negotiated_key_exchange_group()
            .ok_or_else(|| anyhow!("no key exchange group"))?
            .name()
    );
    let close = read_until_close(&mut conn, &mut sock)
        .context("after the handshake, waiting for the server to close")?;
    if close != Close::Reset {
        conn.send_close_notify();
        // The server may be gone already; its close was what we waited for.
        let _ = conn.complete_io(&mut sock);
    }
    Ok((close, negotiated))
}

/// Server side of the direct runs: handshake, close_notify, then wait for
/// the client's close so that no unread byte turns our close into a reset.
fn serve_tls(config: &Arc<ServerConfig>, mut sock: TcpStream) -> Result<()> {
    set_timeouts(&sock)?;
    let mut conn = Connection::from(rustls::ServerConnection::new(config.clone())?);
    while conn.is_handshaking() {
        conn.complete_io(&mut sock)?;
    }
    conn.send_close_notify();
    while conn.wants_write() {
        conn.write_tls(&mut sock)?;
    }
    read_until_close(&mut conn, &mut sock)?;
    Ok(())
}

fn set_timeouts(sock: &TcpStream) -> Result<()> {
    sock.set_nodelay(true).context("TCP_NODELAY")?;
    sock.set_read_timeout(Some(IO_TIMEOUT))
        .context("SO_RCVTIMEO")?;
    sock.set_write_timeout(Some(IO_TIMEOUT))
        .context("SO_SNDTIMEO")
}

/// Read (and drop) application data until the peer closes the connection.
fn read_until_close(conn: &mut Connection, sock: &mut TcpStream) -> io::Result<Close> {
    let mut buf = [0u8; 4096];
    loop {
        while conn.wants_write() {
            conn.write_tls(sock)?;
        }
        match conn.reader().read(&mut buf) {
            Ok(0) => return Ok(Close::Notify),
            Ok(_) => continue,
            Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => return Ok(Close::Eof),
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            Err(err) => return Err(err),
        }
        match conn.read_tls(sock) {
            Ok(0) => return Ok(Close::Eof),
            Ok(_) => {}
            Err(err) if err.kind() == io::ErrorKind::ConnectionReset => return Ok(Close::Reset),
            Err(err) => return Err(err),
        }
        conn.process_new_packets().map_err(io::Error::other)?;
    }
}

/// Accept on 127.0.0.1:`port` from `workers` threads, each running
/// `handle` on its connection; runs until killed.
fn serve(
    port: u16,
    workers: usize,
    handle: impl Fn(TcpStream) + Send + Sync + 'static,
) -> Result<()> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).context("socket")?;
    socket.set_reuse_address(true).context("SO_REUSEADDR")?;
    socket
        .bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)).into())
        .with_context(|| format!("cannot bind 127.0.0.1:{port}"))?;
    // As deep as relay's default, so that bursts are not dropped here.
    socket.listen(4096).context("listen")?;
    let listener: TcpListener = socket.into();
    let handle = Arc::new(handle);
    let workers: Vec<JoinHandle<()>> = (0..workers)
        .map(|i| {
            let listener = listener.try_clone().context("cannot clone the listener")?;
            let handle = handle.clone();
            std::thread::Builder::new()
                .name(format!("server-{i}"))
                .spawn(move || {
                    loop {
                        match listener.accept() {
                            Ok((sock, _)) => handle(sock),
                            Err(err) => {
                                // EMFILE and the like pass; keep serving.
                                eprintln!("tls-peer: accept failed: {err}");
                                std::thread::sleep(Duration::from_millis(10));
                            }
                        }
                    }
                })
                .context("cannot start a server thread")
        })
        .collect::<Result<_>>()?;
    for worker in workers {
        worker
            .join()
            .map_err(|_| anyhow!("a server thread panicked"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_command_names_itself() {
        let err = run(&["frobnicate".to_string()]).unwrap_err();
        assert!(format!("{err:#}").contains("frobnicate"));
    }

    #[test]
    fn generator_completes_handshakes_against_the_server() {
        use rcgen::{CertificateParams, KeyPair};
        let dir = std::env::temp_dir().join(format!("tls-peer-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let (cert_pem, key_pem) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert_pem, cert.pem()).unwrap();
        std::fs::write(&key_pem, key.serialize_pem()).unwrap();
        let server = server_config(cert_pem.to_str().unwrap(), key_pem.to_str().unwrap()).unwrap();
        let client = client_config(cert_pem.to_str().unwrap()).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();

        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        std::thread::spawn(move || {
            serve(port, 2, move |sock| {
                let _ = serve_tls(&server, sock);
            })
        });
        let name = ServerName::try_from("localhost").unwrap();
        // The server thread may not listen yet: the first errors are fine.
        let deadline = Instant::now() + Duration::from_secs(5);
        let tally = loop {
            let tally = generate(&client, &name, port, 2, Duration::from_millis(300)).unwrap();
            if tally.errors == 0 || Instant::now() > deadline {
                break tally;
            }
        };
        assert!(tally.ok > 0 && tally.errors == 0, "{tally:?}");
        assert_eq!(
            tally.closed_without_notify + tally.reset_after_handshake,
            0,
            "{tally:?}"
        );
        assert!(tally.negotiated.unwrap().starts_with("TLSv1_3"));
    }
}
