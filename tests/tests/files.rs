//! socat's file addresses against real files, pipes, terminals and
//! sockets: an upload through `-u TCP-LISTEN,fork CREATE:` lands whole in
//! the file, `-u OPEN:` sends a file and exits 0, `ignoreeof` follows a
//! growing file, a named pipe is made and read, a terminal opened `raw,
//! echo=0` passes bytes unchanged both ways, `GOPEN` on a UNIX socket
//! connects to it; a file that cannot be opened, or one opened for
//! writing only where the route reads, is refused at start with exit 2.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use relay_tests::child::ChildProc;
use relay_tests::peers::{Backend, EchoServer, UnixEchoServer, round_trip};
use relay_tests::ports::free_port;
use relay_tests::relay_proc::relay_bin;
use relay_tests::tempdir::TempDir;
use relay_tests::wait::poll_until;
use relay_tests::{Fingerprint, Payload, RelayCmd};

/// How long relay may take to exit, or a byte to arrive, once it can.
const TIMEOUT: Duration = Duration::from_secs(10);

/// A TCP server that keeps everything each connection sends.
struct Sink {
    backend: Backend,
    got: Arc<Mutex<Vec<u8>>>,
}

impl Sink {
    fn start() -> Result<Self> {
        let got: Arc<Mutex<Vec<u8>>> = Arc::default();
        let backend = {
            let got = Arc::clone(&got);
            Backend::start(move |mut stream| {
                let mut buf = [0u8; 16 * 1024];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    got.lock().expect("sink lock").extend_from_slice(&buf[..n]);
                }
            })?
        };
        Ok(Sink { backend, got })
    }

    fn target(&self) -> String {
        format!("TCP:{}", self.backend.addr())
    }

    fn got(&self) -> Vec<u8> {
        self.got.lock().expect("sink lock").clone()
    }
}

fn relay(args: &[&str]) -> Result<ChildProc> {
    let mut cmd = Command::new(relay_bin()?);
    cmd.args(["-q"]).args(args);
    ChildProc::spawn("relay", cmd)
}

#[test]
fn an_upload_through_tcp_listen_lands_whole_in_a_created_file() -> Result<()> {
    let dir = TempDir::new("files-upload")?;
    let file = dir.join("upload.bin");
    let port = free_port()?;
    let payload = Payload::new(21, 3 << 20);
    let _relay = RelayCmd::socat(
        port,
        format!("TCP-LISTEN:{port},fork,reuseaddr"),
        format!("CREATE:{}", file.display()),
    )
    .opts(&["-u"])
    .spawn()?;
    for _ in 0..2 {
        // Each connection truncates the file again, as socat's creat().
        let mut client = _relay.connect()?;
        payload.write_to(&mut client)?;
        client.shutdown(Shutdown::Write)?;
        let mut rest = Vec::new();
        client.read_to_end(&mut rest)?;
        let landed = poll_until("the whole upload in the file", TIMEOUT, || {
            let bytes = std::fs::read(&file).unwrap_or_default();
            Ok((bytes.len() as u64 >= 3 << 20).then_some(bytes))
        })?;
        ensure!(
            Fingerprint::of(&landed) == payload.fingerprint(),
            "the file holds {}, the client sent {}",
            Fingerprint::of(&landed),
            payload.fingerprint()
        );
    }
    Ok(())
}

#[test]
fn a_file_is_sent_whole_and_relay_exits_zero() -> Result<()> {
    let dir = TempDir::new("files-send")?;
    let file = dir.join("send.bin");
    let payload = Payload::new(22, 2 << 20);
    payload.write_to(&mut std::fs::File::create(&file)?)?;
    let sink = Sink::start()?;
    for order in [
        [format!("OPEN:{}", file.display()), sink.target()],
        [sink.target(), format!("FILE:{},rdonly", file.display())],
    ] {
        let flag = if order[0].starts_with("TCP") {
            "-U"
        } else {
            "-u"
        };
        let before = sink.got().len();
        let mut proc = relay(&[flag, &order[0], &order[1]])?;
        let status = proc.wait_exit(TIMEOUT)?.with_context(|| {
            format!("relay {flag} {order:?} did not exit; log:\n{}", proc.log())
        })?;
        ensure!(
            status.success(),
            "relay {flag} {order:?}: {status}\n{}",
            proc.log()
        );
        let got = poll_until("the whole file at the sink", TIMEOUT, || {
            let got = sink.got();
            Ok((got.len() - before >= 2 << 20).then(|| got[before..].to_vec()))
        })?;
        ensure!(
            Fingerprint::of(&got) == payload.fingerprint(),
            "relay {flag} {order:?}: the sink got {}, the file is {}",
            Fingerprint::of(&got),
            payload.fingerprint()
        );
    }
    Ok(())
}

#[test]
fn ignoreeof_follows_a_growing_file_and_a_named_pipe_is_made_and_read() -> Result<()> {
    let dir = TempDir::new("files-follow")?;
    let log = dir.join("app.log");
    std::fs::write(&log, b"first line\n")?;
    let sink = Sink::start()?;
    let _follow = relay(&[
        "-u",
        &format!("OPEN:{},ignoreeof", log.display()),
        &sink.target(),
    ])?;
    poll_until("the first line at the sink", TIMEOUT, || {
        Ok((sink.got() == b"first line\n").then_some(()))
    })?;
    std::fs::OpenOptions::new()
        .append(true)
        .open(&log)?
        .write_all(b"second line\n")?;
    poll_until("the appended line at the sink", TIMEOUT, || {
        Ok((sink.got() == b"first line\nsecond line\n").then_some(()))
    })?;

    let fifo = dir.join("in.fifo");
    let piped = Sink::start()?;
    let mut proc = relay(&["-u", &format!("PIPE:{}", fifo.display()), &piped.target()])?;
    poll_until("relay to make the named pipe", TIMEOUT, || {
        Ok(fifo.exists().then_some(()))
    })?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&fifo)?
        .write_all(b"through the pipe")?;
    poll_until("the pipe's bytes at the sink", TIMEOUT, || {
        Ok((piped.got() == b"through the pipe").then_some(()))
    })?;
    let status = proc
        .wait_exit(TIMEOUT)?
        .context("relay did not exit after the pipe's writer closed")?;
    ensure!(status.success(), "relay PIPE: {status}\n{}", proc.log());
    Ok(())
}

/// A serial-line bridge as scripts write it (`FILE:/dev/ttyX,raw,echo=0`),
/// on a pseudo-terminal: what the far end types reaches the TCP peer
/// unchanged (a CR stays a CR), and the reply comes back with no local echo.
#[test]
fn a_raw_terminal_passes_bytes_unchanged_both_ways() -> Result<()> {
    let echo = EchoServer::start()?;
    let pty = nix::pty::openpty(None, None).context("openpty")?;
    let name = std::fs::read_link(format!("/proc/self/fd/{}", pty.slave.as_raw_fd()))?;
    let mut proc = relay(&[
        &format!("FILE:{},raw,echo=0", name.display()),
        &format!("TCP:{}", echo.addr()),
    ])?;
    let mut master = std::fs::File::from(pty.master);
    poll_until("relay to connect to the echo server", TIMEOUT, || {
        proc.ensure_running()?;
        Ok((echo.accepted() == 1).then_some(()))
    })?;
    // With the terminal still cooked, the CR would come back as NL and
    // the line would be echoed locally before the server's copy.
    master.write_all(b"AT\rOK\n")?;
    let mut back = [0u8; 6];
    let reader = std::thread::spawn(move || master.read_exact(&mut back).map(|()| back));
    let got = poll_until("the echo through the terminal", TIMEOUT, || {
        Ok(reader.is_finished().then_some(()))
    })
    .and_then(|()| {
        reader
            .join()
            .map_err(|_| anyhow::anyhow!("the reader panicked"))?
            .context("reading the terminal")
    })?;
    ensure!(&got == b"AT\rOK\n", "the terminal got back {got:?}");
    drop(pty.slave);
    Ok(())
}

/// A virtual serial port (`PTY,link=...,raw,echo=0`): a program opens the
/// link, and what it writes reaches the TCP peer unchanged and the reply
/// comes back; it may close and open the terminal again; the link goes
/// when relay exits.
#[test]
fn a_pty_is_a_serial_port_at_its_link_until_relay_exits() -> Result<()> {
    let echo = EchoServer::start()?;
    let dir = TempDir::new("files-pty")?;
    let link = dir.join("ttyV0");
    let mut proc = relay(&[
        "--drain-timeout",
        "1s",
        &format!("PTY,link={},raw,echo=0", link.display()),
        &format!("TCP:{}", echo.addr()),
    ])?;
    poll_until("relay to link its terminal", TIMEOUT, || {
        proc.ensure_running()?;
        Ok(link.exists().then_some(()))
    })?;
    for line in [&b"AT\rOK\n"[..], b"again\r"] {
        let mut port = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&link)
            .with_context(|| format!("opening {}", link.display()))?;
        port.write_all(line)?;
        let mut back = vec![0u8; line.len()];
        let reader = std::thread::spawn(move || port.read_exact(&mut back).map(|()| back));
        poll_until("the echo through the terminal", TIMEOUT, || {
            Ok(reader.is_finished().then_some(()))
        })?;
        let back = reader
            .join()
            .map_err(|_| anyhow::anyhow!("the reader panicked"))?
            .context("reading the terminal")?;
        ensure!(back == line, "the terminal got back {back:?} for {line:?}");
    }
    proc.signal(nix::sys::signal::Signal::SIGTERM)?;
    proc.wait_exit(TIMEOUT)?
        .context("relay did not exit on SIGTERM")?;
    ensure!(
        std::fs::symlink_metadata(&link).is_err(),
        "the link outlived relay"
    );
    Ok(())
}

#[test]
fn gopen_connects_to_a_unix_socket_at_the_path() -> Result<()> {
    let dir = TempDir::new("files-gopen")?;
    let path = dir.join("echo.sock");
    let server = UnixEchoServer::start(&path)?;
    let port = free_port()?;
    let relay = RelayCmd::socat(
        port,
        format!("TCP-LISTEN:{port},fork,reuseaddr"),
        format!("GOPEN:{}", path.display()),
    )
    .spawn()?;
    round_trip(&mut relay.connect()?, b"through GOPEN")?;
    ensure!(server.accepted() == 1, "the UNIX server accepted once");
    Ok(())
}

#[test]
fn files_that_cannot_serve_the_route_are_refused_at_start() -> Result<()> {
    let dir = TempDir::new("files-refused")?;
    let missing = dir.join("missing.log");
    let created = dir.join("made.bin");
    for (args, says) in [
        (
            vec![
                "-u".to_string(),
                format!("OPEN:{}", missing.display()),
                "TCP:127.0.0.1:9".into(),
            ],
            "No such file",
        ),
        (
            vec![
                "TCP-LISTEN:1".to_string(),
                format!("CREATE:{}", created.display()),
            ],
            "opened for writing only",
        ),
        (
            vec!["-".to_string(), format!("OPEN:{},excl", created.display())],
            "`excl`",
        ),
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        RelayCmd::raw(&args).expect_usage_error(TIMEOUT, &[says])?;
    }
    ensure!(!created.exists(), "a refused CREATE must not make the file");
    Ok(())
}
