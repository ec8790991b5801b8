//! Records of the `samples` ring buffer, and the kernel's clock turned into
//! wall-clock time.
//!
//! A record is a [`SampleHeader`] followed by `caplen` bytes of the frame.
//! Its timestamp is `bpf_ktime_get_ns()`, CLOCK_MONOTONIC; pcapng wants
//! time since the Unix epoch. [`WallClock`] measures the offset between
//! the two clocks once, when a capture starts, and applies it to every
//! sample, so the samples keep the kernel's own order and spacing (a wall
//! clock stepped by NTP mid-capture does not reorder them).

use std::mem::size_of;

use nix::time::{ClockId, clock_gettime};

use super::maps::SampleHeader;

/// One sampled frame, borrowed from the ring buffer.
#[derive(Debug, Clone, Copy)]
pub struct Sample<'a> {
    pub header: SampleHeader,
    pub data: &'a [u8],
}

/// Splits a record into header and frame; `None` for a record too short
/// for what its header claims (which the kernel program never writes).
pub fn parse(record: &[u8]) -> Option<Sample<'_>> {
    let head = record.get(..size_of::<SampleHeader>())?;
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_ne_bytes(head.get(at..at + 4)?.try_into().ok()?))
    };
    let header = SampleHeader {
        ts_ns: u64::from_ne_bytes(head.get(0..8)?.try_into().ok()?),
        ifindex: u32_at(8)?,
        len: u32_at(12)?,
        caplen: u32_at(16)?,
        direction: *head.get(20)?,
        _pad: [0; 3],
    };
    let start = size_of::<SampleHeader>();
    let data = record.get(start..start + usize::try_from(header.caplen).ok()?)?;
    Some(Sample { header, data })
}

/// CLOCK_MONOTONIC now, the clock of the samples' timestamps.
pub fn monotonic_ns() -> u64 {
    u64::try_from(nanos(ClockId::CLOCK_MONOTONIC)).unwrap_or(0)
}

/// CLOCK_MONOTONIC to nanoseconds since the Unix epoch, by one offset.
#[derive(Debug, Clone, Copy)]
pub struct WallClock {
    /// realtime - monotonic, in nanoseconds.
    offset_ns: i128,
}

fn nanos(clock: ClockId) -> i128 {
    // Both clocks exist on every Linux; a failure would be a broken kernel.
    let ts =
        clock_gettime(clock).expect("invariant: CLOCK_MONOTONIC and CLOCK_REALTIME are readable");
    i128::from(ts.tv_sec()) * 1_000_000_000 + i128::from(ts.tv_nsec())
}

impl WallClock {
    /// Measures the offset now: the realtime reading is paired with the
    /// midpoint of two monotonic readings around it, the tightest of a few
    /// tries (a preemption between the reads widens the bracket).
    pub fn measure() -> Self {
        let mut best: Option<(i128, i128)> = None;
        for _ in 0..5 {
            let before = nanos(ClockId::CLOCK_MONOTONIC);
            let real = nanos(ClockId::CLOCK_REALTIME);
            let after = nanos(ClockId::CLOCK_MONOTONIC);
            let width = after - before;
            let offset = real - (before + after) / 2;
            if best.is_none_or(|(w, _)| width < w) {
                best = Some((width, offset));
            }
        }
        WallClock {
            offset_ns: best.map_or(0, |(_, offset)| offset),
        }
    }

    /// The wall-clock time of a monotonic timestamp.
    pub fn unix_ns(&self, monotonic_ns: u64) -> u64 {
        u64::try_from(i128::from(monotonic_ns) + self.offset_ns).unwrap_or(0)
    }

    /// Now, on the wall clock as this conversion sees it.
    pub fn now_ns(&self) -> u64 {
        u64::try_from(nanos(ClockId::CLOCK_MONOTONIC) + self.offset_ns).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_split_into_header_and_frame() {
        let mut record = Vec::new();
        record.extend_from_slice(&123u64.to_ne_bytes());
        record.extend_from_slice(&7u32.to_ne_bytes());
        record.extend_from_slice(&1500u32.to_ne_bytes());
        record.extend_from_slice(&4u32.to_ne_bytes());
        record.extend_from_slice(&[1, 0, 0, 0]);
        record.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        let sample = parse(&record).expect("a whole record");
        assert_eq!(sample.header.ts_ns, 123);
        assert_eq!(sample.header.ifindex, 7);
        assert_eq!(sample.header.len, 1500);
        assert_eq!(sample.header.direction, 1);
        assert_eq!(sample.data, &[0xde, 0xad, 0xbe, 0xef]);
        assert!(
            parse(&record[..record.len() - 1]).is_none(),
            "caplen beyond the record"
        );
    }

    #[test]
    fn monotonic_converts_to_the_wall_clock() {
        let clock = WallClock::measure();
        let mono = u64::try_from(nanos(ClockId::CLOCK_MONOTONIC)).expect("positive");
        let wall = u64::try_from(nanos(ClockId::CLOCK_REALTIME)).expect("positive");
        let converted = clock.unix_ns(mono);
        assert!(
            converted.abs_diff(wall) < 5_000_000,
            "{converted} vs {wall}"
        );
    }
}
