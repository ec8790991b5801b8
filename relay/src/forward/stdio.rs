//! stdin and stdout as one leg (socat's `STDIO`, `-`, `STDIN`, `STDOUT`):
//! reads come from stdin, writes go to stdout. `STDIN` discards what the
//! peer sends; `STDOUT` reads nothing, so the peer sees EOF at once and
//! its output still flows. EOF on stdin is an EOF like any other: the
//! connection passes it on as a half-close and keeps writing stdout until
//! the peer closes.
//!
//! tokio's stdin and stdout work on any file (a terminal, a pipe, a
//! regular file) through blocking threads; a read still waiting on stdin
//! when the connection ends is left to the runtime's shutdown.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::addr::StdioMode;

pub struct Stdio {
    stdin: Option<tokio::io::Stdin>,
    stdout: Option<tokio::io::Stdout>,
}

impl Stdio {
    pub fn new(mode: StdioMode) -> Self {
        let (read, write) = match mode {
            StdioMode::Both => (true, true),
            StdioMode::In => (true, false),
            StdioMode::Out => (false, true),
        };
        Stdio {
            stdin: read.then(tokio::io::stdin),
            stdout: write.then(tokio::io::stdout),
        }
    }
}

impl AsyncRead for Stdio {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut().stdin.as_mut() {
            Some(stdin) => Pin::new(stdin).poll_read(cx, buf),
            // STDOUT only: nothing to read, which is EOF.
            None => Poll::Ready(Ok(())),
        }
    }
}

impl AsyncWrite for Stdio {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut().stdout.as_mut() {
            Some(stdout) => Pin::new(stdout).poll_write(cx, buf),
            // STDIN only: the peer's bytes are taken and dropped.
            None => Poll::Ready(Ok(buf.len())),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().stdout.as_mut() {
            Some(stdout) => Pin::new(stdout).poll_flush(cx),
            None => Poll::Ready(Ok(())),
        }
    }
    /// stdout cannot be half-closed without closing fd 1 for the whole
    /// process; the bytes are flushed and the process's exit closes it.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_flush(cx)
    }
}
