//! The `copy` data path: read into a userspace buffer, write it all, for
//! plain TCP legs (over borrowed halves) and for every TLS leg (through
//! rustls). It keeps the contract of `pump`.
//!
//! This module owns the buffer policy. Buffers exist only while bytes flow:
//! an idle connection holds none, so ten thousand idle connections cost
//! sockets and a task each, not buffers.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::ReadHalf;

use super::pump::{Activity, Counters, Direction, Eof, Leg};
use super::stream::Stream;

/// A direction's buffer starts small (ping-pong traffic never needs more)
/// and doubles each time a read fills it, up to the maximum: large reads
/// are what lets bulk transfers approach the speed of a direct connection.
const BUFFER_MIN: usize = 16 * 1024;
const BUFFER_MAX: usize = 1024 * 1024;

/// The reading half of a leg, as the copy loop needs it.
pub(super) trait Source: AsyncRead + Unpin + Send {
    /// Completes when a read may make progress; the loop waits here before
    /// it allocates a buffer, so an idle leg holds none.
    fn ready(&self) -> impl Future<Output = io::Result<()>> + Send;
}

impl Source for ReadHalf<'_> {
    fn ready(&self) -> impl Future<Output = io::Result<()>> + Send {
        self.as_ref().readable()
    }
}

/// A TLS leg: rustls may already hold decrypted bytes while the socket is
/// quiet, so readiness of the socket says nothing; read directly.
impl Source for tokio::io::ReadHalf<&mut Stream> {
    fn ready(&self) -> impl Future<Output = io::Result<()>> + Send {
        std::future::ready(Ok(()))
    }
}

/// Copies `src` to `dst` until EOF on `src`, then shuts down writing on `dst`.
///
/// `read_buf` (rather than `try_read`) lets tokio clear the socket's
/// readiness after a short read, which saves a read that would only say
/// EAGAIN on every small message.
pub(super) async fn pump(
    src: &mut impl Source,
    dst: &mut (impl AsyncWrite + Unpin),
    counters: Counters<'_>,
    activity: &Activity,
) -> Direction {
    let mut buffer: Vec<u8> = Vec::new();
    let mut size = BUFFER_MIN;
    loop {
        if buffer.capacity() == 0 {
            // Wait before allocating, so an idle direction holds no buffer.
            src.ready().await.map_err(|e| (Leg::Source, e))?;
            buffer.reserve_exact(size);
        }
        match src.read_buf(&mut buffer).await {
            Ok(0) => {
                return dst
                    .shutdown()
                    .await
                    .map(|()| Eof::Clean)
                    .map_err(|e| (Leg::Destination, e));
            }
            Ok(n) => {
                activity.hold();
                dst.write_all(&buffer)
                    .await
                    .map_err(|e| (Leg::Destination, e))?;
                activity.release();
                counters.add(n as u64);
                activity.touch();
                if n == buffer.capacity() && size < BUFFER_MAX {
                    size *= 2;
                    buffer = Vec::new();
                } else if 2 * n < buffer.capacity() {
                    // A light flow gives its buffer back, so a connection
                    // that goes quiet holds no buffer memory; a bulk flow
                    // keeps it rather than fault in fresh pages each time.
                    buffer = Vec::new();
                } else {
                    buffer.clear();
                }
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return dst
                    .shutdown()
                    .await
                    .map(|()| Eof::WithoutCloseNotify)
                    .map_err(|e| (Leg::Destination, e));
            }
            Err(e) => return Err((Leg::Source, e)),
        }
    }
}
