//! Deterministic payloads and the fingerprints (length + SHA-256) that prove
//! a byte stream arrived whole, in order, and unchanged.
//!
//! A [`Payload`] is a pseudo-random byte stream named by `(seed, len)`; two
//! different seeds give unrelated streams, so concurrent connections carry
//! distinguishable data. Nothing is held in memory beyond one chunk.

use std::fmt;
use std::io::{self, Read, Write};
use std::time::Duration;

use sha2::{Digest, Sha256};

/// Chunk size used when generating and reading; odd on purpose, so that it
/// never lines up with relay's buffer sizes.
const CHUNK: usize = 65_521;

/// What identifies a byte stream: its length and SHA-256.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint {
    pub len: u64,
    pub sha256: [u8; 32],
}

impl Fingerprint {
    pub fn of(bytes: &[u8]) -> Self {
        Self {
            len: bytes.len() as u64,
            sha256: Sha256::digest(bytes).into(),
        }
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} bytes, sha256 ", self.len)?;
        for byte in self.sha256 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A pseudo-random byte stream of `len` bytes determined by `seed`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Payload {
    pub seed: u64,
    pub len: u64,
}

impl Payload {
    pub fn new(seed: u64, len: u64) -> Self {
        Self { seed, len }
    }

    /// Call `f` with consecutive chunks that together make the payload.
    pub fn for_each_chunk(&self, mut f: impl FnMut(&[u8]) -> io::Result<()>) -> io::Result<()> {
        let mut state = self.seed ^ 0x9E37_79B9_7F4A_7C15;
        let mut buf = vec![0u8; CHUNK];
        let mut left = self.len;
        while left > 0 {
            let n = usize::try_from(left.min(CHUNK as u64)).expect("invariant: n <= CHUNK");
            for word in buf[..n].chunks_mut(8) {
                let bytes = splitmix64(&mut state).to_le_bytes();
                word.copy_from_slice(&bytes[..word.len()]);
            }
            f(&buf[..n])?;
            left -= n as u64;
        }
        Ok(())
    }

    /// The whole payload in memory (for small payloads).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut all = Vec::with_capacity(usize::try_from(self.len).unwrap_or(0));
        self.for_each_chunk(|chunk| {
            all.extend_from_slice(chunk);
            Ok(())
        })
        .expect("invariant: extending a Vec cannot fail");
        all
    }

    /// The fingerprint of the payload, computed without sending it.
    pub fn fingerprint(&self) -> Fingerprint {
        let mut hasher = Sha256::new();
        self.for_each_chunk(|chunk| {
            hasher.update(chunk);
            Ok(())
        })
        .expect("invariant: hashing cannot fail");
        Fingerprint {
            len: self.len,
            sha256: hasher.finalize().into(),
        }
    }

    /// Write the payload to `w`; returns the fingerprint of what was written.
    pub fn write_to(&self, w: &mut impl Write) -> io::Result<Fingerprint> {
        self.write_paced(w, None)
    }

    /// Write the payload, pausing `pause` between chunks when given (a slow
    /// sender, e.g. to keep a transfer in flight while a signal arrives).
    pub fn write_paced(
        &self,
        w: &mut impl Write,
        pause: Option<Duration>,
    ) -> io::Result<Fingerprint> {
        let mut hasher = Sha256::new();
        self.for_each_chunk(|chunk| {
            w.write_all(chunk)?;
            hasher.update(chunk);
            if let Some(pause) = pause {
                std::thread::sleep(pause);
            }
            Ok(())
        })?;
        w.flush()?;
        Ok(Fingerprint {
            len: self.len,
            sha256: hasher.finalize().into(),
        })
    }
}

/// Read `r` to EOF; returns the fingerprint of everything read.
pub fn read_fingerprint(r: &mut impl Read) -> io::Result<Fingerprint> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut len = 0u64;
    loop {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                hasher.update(&buf[..n]);
                len += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(Fingerprint {
        len,
        sha256: hasher.finalize().into(),
    })
}

/// One step of SplitMix64: a small, fast, seedable PRNG (also the
/// shaper's loss draw).
pub(crate) fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_matches_written_and_read_bytes() -> io::Result<()> {
        let payload = Payload::new(7, 200_001);
        let mut written = Vec::new();
        let sent = payload.write_to(&mut written)?;
        assert_eq!(sent, payload.fingerprint());
        assert_eq!(sent, Fingerprint::of(&written));
        assert_eq!(read_fingerprint(&mut written.as_slice())?, sent);
        assert_eq!(payload.to_vec(), written);
        Ok(())
    }

    #[test]
    fn different_seeds_give_different_streams() {
        assert_ne!(Payload::new(1, 64).to_vec(), Payload::new(2, 64).to_vec());
    }
}
