//! socat's traffic dump (`-v` text, `-x` hex, both together): every block
//! relayed is also written to stderr in socat's own format, so what reads
//! socat's dump (an eye, a script) reads relay's. A block is a header
//!
//! ```text
//! > 2026/12/03 10:32:21.000972  length=27 from=0 to=26
//! ```
//!
//! (`>` from the first address on the command line to the second, `<` back;
//! `from`/`to` are the offsets of its bytes in that direction of the
//! connection), then the bytes as socat shows them. Only the copy path sees
//! the bytes, so a route that dumps copies.
//!
//! The formatting is ours, written from socat's documented output (and
//! checked against the socat in the tests): no crate prints it.

use std::io::Write;

/// How the bytes of a block are shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DumpMode {
    /// socat's `-v`: the bytes as text, control characters escaped.
    Text,
    /// socat's `-x`: the bytes in hex on one line.
    Hex,
    /// socat's `-v -x`: lines of up to 16 bytes, hex beside text.
    Both,
}

/// A route's dump: the mode, and which way `>` points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dump {
    pub mode: DumpMode,
    /// The listener was the second address on the command line (socat
    /// takes them in either order): then `>` is the target's bytes.
    pub listener_second: bool,
}

impl Dump {
    /// Writes one block to stderr in a single write, so blocks do not mix
    /// with each other or with log lines. `from` is the offset of its first
    /// byte in its direction; an error writing stderr is not the
    /// connection's, and is dropped.
    pub fn write(&self, to_target: bool, from: u64, bytes: &[u8]) {
        let block = self.format(to_target, &timestamp(), from, bytes);
        let _ = std::io::stderr().lock().write_all(&block);
    }

    fn format(&self, to_target: bool, stamp: &str, from: u64, bytes: &[u8]) -> Vec<u8> {
        let prefix = if to_target != self.listener_second {
            '>'
        } else {
            '<'
        };
        let len = bytes.len() as u64;
        let mut out = format!(
            "{prefix} {stamp}  length={len} from={from} to={}\n",
            (from + len).saturating_sub(1)
        )
        .into_bytes();
        match self.mode {
            DumpMode::Text => text(&mut out, bytes),
            DumpMode::Hex => {
                for byte in bytes {
                    out.extend_from_slice(format!(" {byte:02x}").as_bytes());
                }
                out.push(b'\n');
            }
            DumpMode::Both => hex_and_text(&mut out, bytes),
        }
        out
    }
}

/// `-v`: printable ASCII as it is, newlines and tabs too, C escapes for
/// the other control characters socat names, `.` for the rest. No newline
/// is added: the next header follows the block's last byte.
fn text(out: &mut Vec<u8>, bytes: &[u8]) {
    for &byte in bytes {
        match byte {
            b'\t' | b'\n' => out.push(byte),
            0x07 => out.extend_from_slice(b"\\a"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0b => out.extend_from_slice(b"\\v"),
            0x0c => out.extend_from_slice(b"\\f"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\\' => out.extend_from_slice(b"\\\\"),
            0x20..=0x7e => out.push(byte),
            _ => out.push(b'.'),
        }
    }
}

/// `-v -x`: lines of up to 16 bytes, a line also ending after a newline
/// byte; the hex column padded to 16, two spaces, the same bytes as text
/// (`.` for anything not printable), and `--` after the block.
fn hex_and_text(out: &mut Vec<u8>, bytes: &[u8]) {
    const WIDTH: usize = 16;
    let mut rest = bytes;
    while !rest.is_empty() {
        let upto = rest[..rest.len().min(WIDTH)]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(rest.len().min(WIDTH), |i| i + 1);
        let (line, after) = rest.split_at(upto);
        for byte in line {
            out.extend_from_slice(format!(" {byte:02x}").as_bytes());
        }
        out.extend(std::iter::repeat_n(b' ', 3 * (WIDTH - line.len()) + 2));
        out.extend(line.iter().map(|&b| match b {
            0x20..=0x7e => b,
            _ => b'.',
        }));
        out.push(b'\n');
        rest = after;
    }
    out.extend_from_slice(b"--\n");
}

/// The local time as socat's header shows it: `2026/12/03 10:32:21.000972`.
fn timestamp() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let seconds = nix::libc::time_t::try_from(now.as_secs()).unwrap_or(0);
    // SAFETY: localtime_r writes one `tm` into the zeroed struct given and
    // reads only `seconds`; both live on this stack frame.
    let tm = unsafe {
        let mut tm: nix::libc::tm = std::mem::zeroed();
        nix::libc::localtime_r(&seconds, &mut tm);
        tm
    };
    format!(
        "{:04}/{:02}/{:02} {:02}:{:02}:{:02}.{:06}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec,
        now.subsec_micros()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAMP: &str = "2026/12/03 10:32:21.000972";

    fn dump(mode: DumpMode, to_target: bool, from: u64, bytes: &[u8]) -> String {
        let dump = Dump {
            mode,
            listener_second: false,
        };
        String::from_utf8(dump.format(to_target, STAMP, from, bytes)).expect("ASCII")
    }

    #[test]
    fn text_escapes_control_characters_as_socat() {
        assert_eq!(
            dump(DumpMode::Text, true, 0, b"GET /\r\n\x01\x7f\xff\tend\\\x07"),
            "> 2026/12/03 10:32:21.000972  length=16 from=0 to=15\nGET /\\r\n...\tend\\\\\\a"
        );
    }

    #[test]
    fn offsets_count_on_per_direction_and_the_arrow_follows_the_command_line() {
        assert_eq!(
            dump(DumpMode::Hex, false, 27, b"HTTP"),
            "< 2026/12/03 10:32:21.000972  length=4 from=27 to=30\n 48 54 54 50\n"
        );
        let swapped = Dump {
            mode: DumpMode::Hex,
            listener_second: true,
        };
        assert!(swapped.format(false, STAMP, 0, b"x").starts_with(b"> "));
    }

    #[test]
    fn both_puts_hex_beside_text_sixteen_bytes_or_a_line_at_a_time() {
        assert_eq!(
            dump(DumpMode::Both, true, 0, b"ab\ncdefghijklmnopqrstu"),
            concat!(
                "> 2026/12/03 10:32:21.000972  length=22 from=0 to=21\n",
                " 61 62 0a                                         ab.\n",
                " 63 64 65 66 67 68 69 6a 6b 6c 6d 6e 6f 70 71 72  cdefghijklmnopqr\n",
                " 73 74 75                                         stu\n",
                "--\n"
            )
        );
    }
}
