//! Where a capture's pcapng bytes go: a file (rotated by size, the oldest
//! removed beyond a count) or stdout.
//!
//! Blocks are gathered in a buffer and written whole by [`Sink::flush`]; a
//! failed write (a full disk) truncates the file back to the end of the
//! last block written whole, so what is on disk stays a valid capture, and
//! the error is returned for the capture to stop on. Every file starts with
//! the section header and every interface block, so each opens on its own.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use prometheus::IntCounter;
use thiserror::Error;

use crate::pcapng::{self, Interface, Section, Statistics};

/// Gathered bytes are written once there are this many, or at each flush.
const BUFFER_BYTES: usize = 256 * 1024;

#[derive(Debug, Error)]
pub enum SinkError {
    #[error("cannot write the capture to {path}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "capture stopped: writing {path} failed (the file holds every packet written before, a valid pcapng)"
    )]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot remove the old capture file {path}")]
    Remove {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Where to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    File(PathBuf),
    Stdout,
}

impl std::str::FromStr for Output {
    type Err = std::convert::Infallible;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(if text == "-" {
            Output::Stdout
        } else {
            Output::File(PathBuf::from(text))
        })
    }
}

/// Output and rotation.
#[derive(Debug, Clone)]
pub struct SinkOptions {
    pub output: Output,
    /// Start a new file once the current one would grow past this many bytes.
    pub rotate_size: Option<u64>,
    /// Keep at most this many files, removing the oldest.
    pub rotate_count: Option<u32>,
}

/// The file of rotation number `n`: `cap.pcapng` becomes `cap-00003.pcapng`.
pub fn rotated_path(base: &Path, n: u64) -> PathBuf {
    let stem = base
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = match base.extension() {
        Some(ext) => format!("{stem}-{n:05}.{}", ext.to_string_lossy()),
        None => format!("{stem}-{n:05}"),
    };
    base.with_file_name(name)
}

enum Target {
    File { file: File, path: PathBuf },
    Stdout(std::io::Stdout),
}

/// A pcapng output: one section per file, interfaces, packets, statistics.
pub struct Sink {
    options: SinkOptions,
    section: Section,
    interfaces: Vec<Interface>,
    target: Target,
    /// Rotation number of the current file.
    number: u64,
    /// Files written, oldest first (with rotation).
    files: VecDeque<PathBuf>,
    /// Bytes on disk in the current file: all whole blocks.
    written: u64,
    /// Packets in the current file.
    packets_in_file: u64,
    buffer: Vec<u8>,
    bytes_total: Option<IntCounter>,
}

impl Sink {
    /// Creates the first file (or takes stdout) and writes the section
    /// header, so an unwritable path fails here, before any packet.
    pub fn open(options: SinkOptions, section: Section) -> Result<Self, SinkError> {
        let target = match &options.output {
            Output::Stdout => Target::Stdout(std::io::stdout()),
            Output::File(path) => Self::create(&Self::path_of(&options, path, 0))?,
        };
        let mut sink = Sink {
            options,
            section,
            interfaces: Vec::new(),
            target,
            number: 0,
            files: VecDeque::new(),
            written: 0,
            packets_in_file: 0,
            buffer: Vec::with_capacity(BUFFER_BYTES),
            bytes_total: None,
        };
        if let Target::File { path, .. } = &sink.target {
            sink.files.push_back(path.clone());
        }
        sink.start_section();
        sink.flush()?;
        Ok(sink)
    }

    fn path_of(options: &SinkOptions, base: &Path, n: u64) -> PathBuf {
        if options.rotate_size.is_some() {
            rotated_path(base, n)
        } else {
            base.to_path_buf()
        }
    }

    fn create(path: &Path) -> Result<Target, SinkError> {
        let file = File::create(path).map_err(|source| SinkError::Open {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Target::File {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Counts every byte written in `relay_observe_pcap_bytes_written_total`.
    pub fn count_bytes(&mut self, counter: IntCounter) {
        self.bytes_total = Some(counter);
    }

    /// The file being written (None for stdout).
    pub fn path(&self) -> Option<&Path> {
        match &self.target {
            Target::File { path, .. } => Some(path),
            Target::Stdout(_) => None,
        }
    }

    fn start_section(&mut self) {
        pcapng::section_header(&mut self.buffer, &self.section);
        for interface in &self.interfaces {
            pcapng::interface_description(&mut self.buffer, interface);
        }
    }

    /// Adds an interface; its number is what packets and statistics name.
    pub fn add_interface(&mut self, interface: Interface) -> u32 {
        pcapng::interface_description(&mut self.buffer, &interface);
        self.interfaces.push(interface);
        u32::try_from(self.interfaces.len() - 1).unwrap_or(u32::MAX)
    }

    /// True when a packet block of `len` bytes would take the current file
    /// past `--rotate-size` (a file always takes at least one packet).
    pub fn rotation_due(&self, len: usize) -> bool {
        match (self.options.rotate_size, &self.target) {
            (Some(limit), Target::File { .. }) => {
                self.packets_in_file > 0 && self.written + (self.buffer.len() + len) as u64 > limit
            }
            _ => false,
        }
    }

    pub fn packet(&mut self, packet: &pcapng::Packet<'_>) -> Result<(), SinkError> {
        pcapng::enhanced_packet(&mut self.buffer, packet);
        self.packets_in_file += 1;
        if self.buffer.len() >= BUFFER_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    /// Interface statistics blocks, one per entry, with a comment each.
    pub fn statistics(&mut self, stats: &[(Statistics, String)]) {
        for (stat, comment) in stats {
            pcapng::interface_statistics(&mut self.buffer, stat, comment);
        }
    }

    /// A decryption secrets block with NSS key log lines.
    pub fn key_log(&mut self, lines: &[u8]) {
        pcapng::tls_key_log(&mut self.buffer, lines);
    }

    /// Ends the current file with `stats` and starts the next one; removes
    /// the oldest beyond `--rotate-count`.
    pub fn rotate(&mut self, stats: &[(Statistics, String)]) -> Result<(), SinkError> {
        self.statistics(stats);
        self.flush()?;
        let Output::File(base) = &self.options.output else {
            return Ok(());
        };
        self.number += 1;
        let path = Self::path_of(&self.options, base, self.number);
        self.target = Self::create(&path)?;
        self.files.push_back(path);
        self.written = 0;
        self.packets_in_file = 0;
        if let Some(keep) = self.options.rotate_count {
            while self.files.len() > keep.max(1) as usize {
                if let Some(old) = self.files.pop_front() {
                    std::fs::remove_file(&old).map_err(|source| SinkError::Remove {
                        path: old.display().to_string(),
                        source,
                    })?;
                }
            }
        }
        self.start_section();
        self.flush()
    }

    /// Writes what is gathered. On failure the file is cut back to the end
    /// of the last block written whole, so it keeps every packet that fit.
    pub fn flush(&mut self) -> Result<(), SinkError> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let (done, result) = match &mut self.target {
            Target::File { file, .. } => write_some(file, &self.buffer),
            Target::Stdout(out) => {
                let (done, result) = write_some(out, &self.buffer);
                (done, result.and_then(|()| out.flush()))
            }
        };
        let kept = match &result {
            Ok(()) => done,
            Err(_) => whole_blocks(&self.buffer, done),
        };
        self.written += kept as u64;
        if let Some(counter) = &self.bytes_total {
            counter.inc_by(kept as u64);
        }
        self.buffer.clear();
        let Err(source) = result else {
            return Ok(());
        };
        let path = match &self.target {
            Target::File { file, path } => {
                // Best effort: a partial block at the end would make readers
                // complain about the whole file.
                let _ = file.set_len(self.written);
                path.display().to_string()
            }
            Target::Stdout(_) => "stdout".to_string(),
        };
        Err(SinkError::Write { path, source })
    }
}

/// Writes `bytes` until done or an error; how many were written either way.
fn write_some(out: &mut impl Write, bytes: &[u8]) -> (usize, std::io::Result<()>) {
    let mut done = 0;
    while done < bytes.len() {
        match out.write(&bytes[done..]) {
            Ok(0) => return (done, Err(std::io::ErrorKind::WriteZero.into())),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return (done, Err(e)),
        }
    }
    (done, Ok(()))
}

/// The length of the whole pcapng blocks at the start of `buffer` that fit
/// in its first `written` bytes.
fn whole_blocks(buffer: &[u8], written: usize) -> usize {
    let mut end = 0;
    while let Some(len) = buffer
        .get(end + 4..end + 8)
        .and_then(|b| b.try_into().ok())
        .map(|b| u32::from_le_bytes(b) as usize)
    {
        if len == 0 || end + len > written {
            break;
        }
        end += len;
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotated_names_keep_the_extension() {
        assert_eq!(
            rotated_path(Path::new("/tmp/web.pcapng"), 3),
            PathBuf::from("/tmp/web-00003.pcapng")
        );
        assert_eq!(
            rotated_path(Path::new("cap"), 12),
            PathBuf::from("cap-00012")
        );
    }

    #[test]
    fn a_short_write_keeps_the_whole_blocks_only() {
        let mut buffer = Vec::new();
        for data in [&[1u8; 10][..], &[2u8; 30][..]] {
            pcapng::enhanced_packet(
                &mut buffer,
                &pcapng::Packet {
                    interface: 0,
                    timestamp_ns: 0,
                    original_len: 0,
                    data,
                    direction: pcapng::Direction::Inbound,
                },
            );
        }
        let first = u32::from_le_bytes(buffer[4..8].try_into().unwrap()) as usize;
        assert_eq!(whole_blocks(&buffer, buffer.len()), buffer.len());
        assert_eq!(whole_blocks(&buffer, buffer.len() - 1), first);
        assert_eq!(whole_blocks(&buffer, first - 1), 0);
    }

    #[test]
    fn unwritable_path_fails_at_open() {
        let err = Sink::open(
            SinkOptions {
                output: Output::File(PathBuf::from("/nonexistent-dir/x.pcapng")),
                rotate_size: None,
                rotate_count: None,
            },
            Section::default(),
        )
        .err()
        .expect("no such directory");
        assert!(
            err.to_string().contains("/nonexistent-dir/x.pcapng"),
            "{err}"
        );
    }
}
