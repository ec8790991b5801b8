//! The `splice` data path for plain socket legs (TCP or UNIX, in any
//! mix): bulk bytes go socket ->
//! pipe -> socket inside the kernel with splice(2) and never through a
//! userspace buffer. Readiness drives it exactly like the copy path, and
//! EOF, errors, counting and idle tracking follow the same rules (the
//! contract of `pump`).
//!
//! A direction starts light: a message-sized batch is one read and one
//! write through a small buffer, as on the copy path, because two splices
//! and a pipe cost more than a copy for a few bytes (ping-pong latency, new
//! connections per second). A read that fills the buffer means bulk: the
//! direction makes a pipe (the kernel's default size, grown to 1 MiB once a
//! batch fills it) and splices until a batch comes in small again or a
//! second passes without bytes, when the pipe is closed. So an idle or
//! chatty connection holds no pipe and two descriptors, as on the copy
//! path, and a direction that cannot get a pipe (out of descriptors) just
//! stays light.

use std::io;
use std::os::fd::OwnedFd;
use std::time::Duration;

use super::pump::{Activity, Counters, Direction, Eof, Leg};
use super::stream::FdSocket;
use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
use tokio::io::Interest;

/// Pipe capacity asked for: large moves per syscall, as the copy path's
/// largest buffer. The kernel may grant less (fs.pipe-max-size).
const PIPE_SIZE: usize = 1024 * 1024;
/// The buffer of a light batch; a read that fills it makes the direction bulk.
const COPY_BATCH: usize = 16 * 1024;

/// A direction's pipe is closed after this long without a byte.
const PIPE_IDLE: Duration = Duration::from_secs(1);

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// What the pipe holds at most (the kernel's default, 64 KiB, at first).
    capacity: usize,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        let capacity = fcntl(&write, FcntlArg::F_GETPIPE_SZ).map_or(64 * 1024, |c| c as usize);
        Ok(Pipe {
            read,
            write,
            capacity,
        })
    }

    /// After a batch that filled the pipe: ask for the large size. A
    /// refusal (fs.pipe-max-size, memory) keeps the pipe as it is.
    fn grow(&mut self) {
        if let Ok(granted) = fcntl(&self.write, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as i32)) {
            self.capacity = granted as usize;
        }
    }
}

const FLAGS: SpliceFFlags = SpliceFFlags::SPLICE_F_MOVE.union(SpliceFFlags::SPLICE_F_NONBLOCK);

/// Moves `src` to `dst` until EOF on `src`, then shuts down writing on `dst`.
pub(super) async fn pump(
    src: FdSocket<'_>,
    dst: FdSocket<'_>,
    counters: Counters<'_>,
    activity: &Activity,
) -> Direction {
    // Some while the direction is bulk.
    let mut slot: Option<Pipe> = None;
    loop {
        if slot.is_some() {
            tokio::select! {
                ready = src.readable() => ready.map_err(|e| (Leg::Source, e))?,
                () = tokio::time::sleep(PIPE_IDLE) => {
                    slot = None;
                    continue;
                }
            }
        } else {
            src.readable().await.map_err(|e| (Leg::Source, e))?;
        }
        let Some(pipe) = slot.as_mut() else {
            match copy_batch(src, dst, activity).await? {
                0 => return shut_down(dst),
                n => {
                    counters.add(n as u64);
                    activity.touch();
                    if n == COPY_BATCH {
                        // No pipe to be had: stay light.
                        slot = Pipe::new().ok();
                    }
                    continue;
                }
            }
        };
        // try_io clears the readiness only when splice says EAGAIN.
        let n = match src.try_io(Interest::READABLE, || {
            Ok(splice(
                src.as_fd(),
                None,
                &pipe.write,
                None,
                pipe.capacity,
                FLAGS,
            )?)
        }) {
            Ok(0) => return shut_down(dst),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err((Leg::Source, e)),
        };
        // The pipe holds the batch until it has all gone out.
        activity.hold();
        let mut left = n;
        while left > 0 {
            dst.writable().await.map_err(|e| (Leg::Destination, e))?;
            match dst.try_io(Interest::WRITABLE, || {
                Ok(splice(&pipe.read, None, dst.as_fd(), None, left, FLAGS)?)
            }) {
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err((Leg::Destination, e)),
            }
        }
        activity.release();
        counters.add(n as u64);
        activity.touch();
        if n < COPY_BATCH {
            // The flow turned light: the pipe is empty, close it.
            slot = None;
        } else if n >= pipe.capacity && pipe.capacity < PIPE_SIZE {
            pipe.grow();
        }
    }
}

/// Passes an EOF on: shuts down writing on `dst`.
fn shut_down(dst: FdSocket<'_>) -> Direction {
    dst.shutdown_write()
        .map(|()| Eof::Clean)
        .map_err(|e| (Leg::Destination, e))
}

/// One read and its write through a userspace buffer (a light batch);
/// 0 is EOF. `src` has just been reported readable.
async fn copy_batch(
    src: FdSocket<'_>,
    dst: FdSocket<'_>,
    activity: &Activity,
) -> Result<usize, (Leg, io::Error)> {
    let mut buffer = vec![0u8; COPY_BATCH];
    let n = loop {
        match src.try_read(&mut buffer) {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                src.readable().await.map_err(|e| (Leg::Source, e))?;
            }
            Err(e) => return Err((Leg::Source, e)),
        }
    };
    activity.hold();
    let mut rest = &buffer[..n];
    while !rest.is_empty() {
        dst.writable().await.map_err(|e| (Leg::Destination, e))?;
        match dst.try_write(rest) {
            Ok(m) => rest = &rest[m..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err((Leg::Destination, e)),
        }
    }
    activity.release();
    Ok(n)
}
