//! A file as one leg of a connection (socat's `OPEN`, `CREATE`, `GOPEN`,
//! `PIPE`): opened with the address's flags, then read and written
//! through tokio's file I/O, which runs on blocking threads: a regular
//! file, a named pipe or a terminal has no readiness an event loop could
//! wait on. The read side and the write side are two descriptors of one
//! open file, so a read that waits (a terminal, a pipe) never holds up a
//! write. `ignoreeof` turns the end of the file into a wait for more, as
//! `tail -f`; a terminal is put into raw mode and its echo set as asked.
//!
//! A read still waiting when the connection ends is left to its thread
//! (as stdin's is): the file closes once that read returns.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::stream::Socket;
use crate::addr::{Access, FileKind, FileSpec};

/// How long `ignoreeof` waits at the end of the file before it reads
/// again: `tail -f`'s interval.
const EOF_POLL: Duration = Duration::from_secs(1);

/// An open file, both ways or one.
pub struct FileLeg {
    read: Option<tokio::fs::File>,
    write: Option<tokio::fs::File>,
    ignore_eof: bool,
    /// While `ignoreeof` waits at the end of the file.
    wait: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A PTY's own terminal side, held open so that a program may open and
    /// close the terminal again and again (a serial port does not go away
    /// when one user closes it) without relay's reads failing.
    _terminal: Option<std::os::fd::OwnedFd>,
    /// A PTY's `link=`, removed when the leg closes.
    link: Option<std::path::PathBuf>,
    /// The master side of a terminal: EIO from a read means every program
    /// on the terminal side has closed it, which is its EOF.
    master: bool,
    /// An EXEC child's terminal in canonical mode: its end-of-file
    /// character, written when the peer's EOF is passed on, so the child
    /// reads EOF as it would from a keyboard's ^D (twice: the first ends a
    /// line the child has not seen yet, the second is the EOF).
    eof_char: Option<u8>,
    eof_sent: bool,
}

impl Drop for FileLeg {
    fn drop(&mut self) {
        if let Some(link) = &self.link {
            // Gone already (removed by hand): nothing to clean.
            let _ = std::fs::remove_file(link);
        }
    }
}

/// Opens `spec` the way its route uses it (`FileSpec::access`, fixed when
/// the route starts; both ways if unset): a leg of the connection, a
/// [`FileLeg`] or, for `GOPEN` on a UNIX socket, the connected socket.
/// Opening may wait (a named pipe opened for reading waits for a writer),
/// so it runs on a blocking thread.
pub async fn open(spec: &FileSpec) -> io::Result<Socket> {
    let access = spec.access.unwrap_or(Access::ReadWrite);
    let spec = spec.clone();
    tokio::task::spawn_blocking(move || open_blocking(&spec, access))
        .await
        .map_err(io::Error::other)?
}

fn open_blocking(spec: &FileSpec, access: Access) -> io::Result<Socket> {
    if spec.kind == FileKind::Pty {
        return open_pty(spec);
    }
    let path = &spec.path;
    if spec.kind == FileKind::Gopen
        && std::fs::metadata(path).is_ok_and(|m| m.file_type().is_socket())
    {
        let stream = std::os::unix::net::UnixStream::connect(path)?;
        stream.set_nonblocking(true)?;
        return tokio::net::UnixStream::from_std(stream).map(Socket::Unix);
    }
    if spec.kind == FileKind::Pipe && !path.exists() {
        nix::unistd::mkfifo(
            path,
            nix::sys::stat::Mode::from_bits_truncate(spec.perm as nix::libc::mode_t),
        )?;
    }
    let writes = access.writes();
    let file = OpenOptions::new()
        .read(access.reads())
        .write(writes && !spec.append)
        .append(writes && spec.append)
        .truncate(writes && spec.truncate)
        .create(spec.create && !spec.exclusive)
        .create_new(spec.exclusive)
        .mode(spec.perm)
        // A terminal opened here must not become relay's controlling one.
        .custom_flags(nix::libc::O_NOCTTY)
        .open(path)?;
    if spec.raw || spec.echo.is_some() {
        terminal_mode(&file, spec)?;
    }
    let (read, write) = match access {
        Access::ReadOnly => (Some(file), None),
        Access::WriteOnly => (None, Some(file)),
        Access::ReadWrite => (Some(file.try_clone()?), Some(file)),
    };
    Ok(Socket::File(Box::new(FileLeg {
        read: read.map(tokio::fs::File::from_std),
        write: write.map(tokio::fs::File::from_std),
        ignore_eof: spec.ignore_eof,
        wait: None,
        _terminal: None,
        link: None,
        master: false,
        eof_char: None,
        eof_sent: false,
    })))
}

/// A new pseudo-terminal: relay reads and writes its master side; the
/// terminal side takes `raw` and `echo=`, and `link=` points at it.
fn open_pty(spec: &FileSpec) -> io::Result<Socket> {
    let pty = nix::pty::openpty(None, None)?;
    let terminal = std::fs::File::from(pty.slave);
    if spec.raw || spec.echo.is_some() {
        terminal_mode(&terminal, spec)?;
    }
    let name = std::fs::read_link(format!("/proc/self/fd/{}", terminal.as_raw_fd()))?;
    if let Some(link) = &spec.link {
        // A link left by an earlier run (or connection) is replaced; a
        // file that is not a link is not relay's to remove.
        if std::fs::symlink_metadata(link).is_ok_and(|m| m.file_type().is_symlink()) {
            std::fs::remove_file(link)?;
        }
        std::os::unix::fs::symlink(&name, link)?;
    }
    let mut leg = FileLeg::master(pty.master, None)?;
    leg._terminal = Some(terminal.into());
    leg.link = spec.link.clone();
    Ok(Socket::File(Box::new(leg)))
}

impl FileLeg {
    /// The master side of a pseudo-terminal; `eof_char`: what to write
    /// when the peer's EOF is passed on (an EXEC child's ^D).
    pub fn master(master: std::os::fd::OwnedFd, eof_char: Option<u8>) -> io::Result<Self> {
        let master = std::fs::File::from(master);
        Ok(FileLeg {
            read: Some(tokio::fs::File::from_std(master.try_clone()?)),
            write: Some(tokio::fs::File::from_std(master)),
            ignore_eof: false,
            wait: None,
            _terminal: None,
            link: None,
            master: true,
            eof_char,
            eof_sent: false,
        })
    }
}

/// Sets up a new terminal's mode: `raw` (cfmakeraw) and `echo=`.
pub fn set_terminal(
    terminal: &impl std::os::fd::AsFd,
    raw: bool,
    echo: Option<bool>,
) -> io::Result<()> {
    use nix::sys::termios::{self, LocalFlags, SetArg};
    let mut attrs = termios::tcgetattr(terminal)?;
    if raw {
        termios::cfmakeraw(&mut attrs);
    }
    if let Some(echo) = echo {
        attrs.local_flags.set(LocalFlags::ECHO, echo);
    }
    termios::tcsetattr(terminal, SetArg::TCSANOW, &attrs)?;
    Ok(())
}

/// The end-of-file character of a terminal in canonical mode, if it is.
pub fn eof_char(terminal: &impl std::os::fd::AsFd) -> io::Result<Option<u8>> {
    use nix::sys::termios::{self, LocalFlags, SpecialCharacterIndices};
    let attrs = termios::tcgetattr(terminal)?;
    Ok(attrs
        .local_flags
        .contains(LocalFlags::ICANON)
        .then(|| attrs.control_chars[SpecialCharacterIndices::VEOF as usize]))
}

/// `raw` and `echo=` on a terminal; on anything else they are an error,
/// as socat's are.
fn terminal_mode(file: &std::fs::File, spec: &FileSpec) -> io::Result<()> {
    if !nix::unistd::isatty(file).unwrap_or(false) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "`raw` and `echo=` apply to a terminal, and {} is not one",
                spec.path.display()
            ),
        ));
    }
    set_terminal(file, spec.raw, spec.echo)
}

impl AsyncRead for FileLeg {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if let Some(wait) = this.wait.as_mut() {
                ready!(wait.as_mut().poll(cx));
                this.wait = None;
            }
            // Opened for writing only: nothing to read, which is EOF.
            let Some(file) = this.read.as_mut() else {
                return Poll::Ready(Ok(()));
            };
            let before = buf.filled().len();
            match ready!(Pin::new(file).poll_read(cx, buf)) {
                Err(e) if this.master && e.raw_os_error() == Some(nix::libc::EIO) => {
                    return Poll::Ready(Ok(()));
                }
                result => result?,
            }
            if buf.filled().len() > before || !this.ignore_eof {
                return Poll::Ready(Ok(()));
            }
            this.wait = Some(Box::pin(tokio::time::sleep(EOF_POLL)));
        }
    }
}

impl AsyncWrite for FileLeg {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut().write.as_mut() {
            Some(file) => Pin::new(file).poll_write(cx, buf),
            // Opened for reading only: what the peer sends is dropped.
            None => Poll::Ready(Ok(buf.len())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().write.as_mut() {
            Some(file) => Pin::new(file).poll_flush(cx),
            None => Poll::Ready(Ok(())),
        }
    }

    /// A file has no half-close: its bytes are flushed to it, and it
    /// closes with the connection. An EXEC child's terminal is sent its
    /// end-of-file character first.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let (Some(eof), false) = (self.eof_char, self.eof_sent) {
            ready!(self.as_mut().poll_flush(cx))?;
            let written = ready!(self.as_mut().poll_write(cx, &[eof, eof]))?;
            self.eof_sent = written == 2;
        }
        self.poll_flush(cx)
    }
}
