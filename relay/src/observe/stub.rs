//! Writing a translated filter into the observe object before it loads:
//! the elibpcap way (ptcpdump), done on the ELF bytes because aya 0.14
//! loads programs only from an object.
//!
//! observe.bpf.c defines one stub function per link type
//! (`relay_pcap_filter_ether`, `relay_pcap_filter_raw`): a run of
//! `goto +0`, then `r0 = 1; exit`, with no relocation inside. The
//! translation is written at the end of the stub's bytes and the rest stays
//! `goto +0`, which the verifier removes (so the size of the slot costs
//! nothing per packet). The filter is then an ordinary BPF-to-BPF call
//! from the capture path: no tail call (which would never come back to
//! sample and copy the packet), no second program to load and keep.

use thiserror::Error;

use object::{Object, ObjectSection, ObjectSymbol};

use super::cbpf::EbpfInsn;

/// The stub for frames with an Ethernet header.
pub const ETHER: &str = "relay_pcap_filter_ether";
/// The stub for frames that start at the IP header.
pub const RAW: &str = "relay_pcap_filter_raw";

#[derive(Debug, Error)]
pub enum StubError {
    #[error(
        "the embedded eBPF object has no filter stub `{0}` (stale relay-ebpf/obj? run `cargo xtask build-ebpf`)"
    )]
    Missing(&'static str),
    #[error("the embedded eBPF object cannot be read: {0}")]
    Elf(String),
    #[error(
        "the filter stub `{stub}` holds {slots} instructions, the filter needs {needed}; it was checked when the filter was parsed (stale relay-ebpf/obj? run `cargo xtask build-ebpf`)"
    )]
    TooSmall {
        stub: &'static str,
        slots: usize,
        needed: usize,
    },
    #[error(
        "the filter stub `{0}` is not the padding relay expects (stale relay-ebpf/obj? run `cargo xtask build-ebpf`)"
    )]
    NotPadding(&'static str),
}

/// An object's bytes, 8-byte aligned as aya's ELF parser needs.
pub struct Object8 {
    words: Vec<u64>,
    len: usize,
}

impl Object8 {
    pub fn new(bytes: &[u8]) -> Self {
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        let mut object = Object8 {
            words: Vec::new(),
            len: bytes.len(),
        };
        for (word, chunk) in words.iter_mut().zip(bytes.chunks(8)) {
            let mut le = [0u8; 8];
            le[..chunk.len()].copy_from_slice(chunk);
            *word = u64::from_ne_bytes(le);
        }
        object.words = words;
        object
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the Vec holds words.len() * 8 initialized bytes, len is
        // at most that, and u8 has no alignment or validity requirement.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast::<u8>(), self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in bytes(), and the borrow of self is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast::<u8>(), self.len) }
    }
}

/// Where a stub's instructions are in the file: (offset, bytes).
fn locate(object: &[u8], stub: &'static str) -> Result<(usize, usize), StubError> {
    let file = object::File::parse(object).map_err(|e| StubError::Elf(e.to_string()))?;
    let symbol = file
        .symbols()
        .find(|s| s.name() == Ok(stub))
        .ok_or(StubError::Missing(stub))?;
    let section = symbol
        .section_index()
        .and_then(|i| file.section_by_index(i).ok())
        .ok_or(StubError::Missing(stub))?;
    let (section_at, section_len) = section.file_range().ok_or(StubError::Missing(stub))?;
    let (at, len) = (symbol.address(), symbol.size());
    if at.checked_add(len).is_none_or(|end| end > section_len) || len % 8 != 0 {
        return Err(StubError::Elf(format!(
            "symbol {stub} lies outside its section"
        )));
    }
    let start = usize::try_from(section_at + at).map_err(|e| StubError::Elf(e.to_string()))?;
    let len = usize::try_from(len).map_err(|e| StubError::Elf(e.to_string()))?;
    Ok((start, len))
}

/// Writes `program` into the stub `stub` of `object`.
pub fn patch(
    object: &mut Object8,
    stub: &'static str,
    program: &[EbpfInsn],
) -> Result<(), StubError> {
    let (start, len) = locate(object.bytes(), stub)?;
    let slots = len / 8;
    if program.len() > slots {
        return Err(StubError::TooSmall {
            stub,
            slots,
            needed: program.len(),
        });
    }
    let bytes = &mut object.bytes_mut()[start..start + len];
    // The padding, then `r0 = 1` and `exit`: anything else means the
    // object and this code disagree about the stub.
    let nop = EbpfInsn::NOP.to_bytes();
    let padded = bytes
        .chunks(8)
        .take(slots.saturating_sub(2))
        .all(|i| i == nop);
    let tail_ok = slots >= 2 && bytes[len - 8] == 0x95 && bytes[len - 16] == 0xb7;
    if !padded || !tail_ok {
        return Err(StubError::NotPadding(stub));
    }
    let pad = slots - program.len();
    for (slot, chunk) in bytes.chunks_mut(8).enumerate() {
        let insn = if slot < pad {
            EbpfInsn::NOP
        } else {
            program[slot - pad]
        };
        chunk.copy_from_slice(&insn.to_bytes());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::filter::{Filter, LinkType, MAX_EBPF_INSNS};

    #[test]
    fn both_stubs_hold_the_longest_filter_the_parser_accepts() {
        let object = Object8::new(crate::observe::object());
        for stub in [ETHER, RAW] {
            let (_, len) = locate(object.bytes(), stub).unwrap();
            assert_eq!(len / 8, MAX_EBPF_INSNS, "{stub}");
        }
    }

    #[test]
    fn a_patched_stub_ends_with_the_translation_after_the_padding() {
        let mut object = Object8::new(crate::observe::object());
        let program = Filter::parse("tcp port 80")
            .unwrap()
            .program(LinkType::Ethernet)
            .unwrap()
            .unwrap();
        patch(&mut object, ETHER, &program).unwrap();
        let (start, len) = locate(object.bytes(), ETHER).unwrap();
        let bytes = &object.bytes()[start..start + len];
        let written: Vec<u8> = program.iter().flat_map(|i| i.to_bytes()).collect();
        assert_eq!(&bytes[len - written.len()..], &written[..]);
        assert!(
            bytes[..len - written.len()]
                .chunks(8)
                .all(|i| i == EbpfInsn::NOP.to_bytes())
        );
        // The other stub is untouched, and patching twice is refused (the
        // padding is gone), rather than writing over a filter.
        let (raw_at, raw_len) = locate(object.bytes(), RAW).unwrap();
        let original = Object8::new(crate::observe::object());
        assert_eq!(
            &object.bytes()[raw_at..raw_at + raw_len],
            &original.bytes()[raw_at..raw_at + raw_len]
        );
        assert!(matches!(
            patch(&mut object, ETHER, &program),
            Err(StubError::NotPadding(ETHER))
        ));
    }
}
