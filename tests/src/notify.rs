//! The service manager's end of sd_notify(3): a unix datagram socket whose
//! path goes into relay's `NOTIFY_SOCKET`, read one datagram (one
//! notification, `KEY=value` lines) at a time, as systemd reads it.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::tempdir::TempDir;

/// How long a notification may take to come.
pub const NOTIFY_TIMEOUT: Duration = Duration::from_secs(10);

/// A bound datagram socket, removed on drop.
#[derive(Debug)]
pub struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
    _dir: TempDir,
}

/// One notification: its `KEY=value` lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification(pub Vec<String>);

impl Notification {
    /// The value of `key`, if the notification sets it.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
    }
}

impl NotifySocket {
    pub fn bind() -> Result<Self> {
        let dir = TempDir::new("notify")?;
        let path = dir.join("notify.sock");
        let socket =
            UnixDatagram::bind(&path).with_context(|| format!("binding {}", path.display()))?;
        socket.set_read_timeout(Some(NOTIFY_TIMEOUT))?;
        Ok(NotifySocket {
            socket,
            path,
            _dir: dir,
        })
    }

    /// What `NOTIFY_SOCKET` should say.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// The next notification; an error after [`NOTIFY_TIMEOUT`] without one.
    pub fn next(&self) -> Result<Notification> {
        let mut buf = vec![0u8; 4096];
        let n = match self.socket.recv(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                bail!("no notification came within {NOTIFY_TIMEOUT:?}")
            }
            Err(e) => return Err(e).context("reading a notification"),
        };
        let text = String::from_utf8(buf[..n].to_vec()).context("a notification is not UTF-8")?;
        Ok(Notification(text.lines().map(str::to_string).collect()))
    }

    /// The next notification, which must set `key=value`.
    pub fn expect(&self, key: &str, value: &str) -> Result<Notification> {
        let got = self.next()?;
        if got.get(key) != Some(value) {
            bail!(
                "expected a notification with {key}={value}, got {:?}",
                got.0
            );
        }
        Ok(got)
    }
}
