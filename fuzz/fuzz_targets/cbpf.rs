//! The classic-to-eBPF translator on arbitrary classic programs (not only
//! what libpcap emits): it translates or refuses, never panics, and every
//! jump it emits lands inside the program.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay::observe::cbpf::{self, Insn};

/// BPF_JMP class and the opcodes without a target (call, exit).
const JMP: u8 = 0x05;
const JMP32: u8 = 0x06;
const CALL: u8 = 0x80;
const EXIT: u8 = 0x90;

fuzz_target!(|data: &[u8]| {
    let program: Vec<Insn> = data
        .chunks_exact(8)
        .take(4096)
        .map(|c| {
            Insn::new(
                u16::from_le_bytes([c[0], c[1]]),
                c[2],
                c[3],
                u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
            )
        })
        .collect();
    let Ok(out) = cbpf::translate(&program) else {
        return;
    };
    let len = out.len() as i64;
    for (at, insn) in out.iter().enumerate() {
        let class = insn.code & 0x07;
        let op = insn.code & 0xf0;
        if (class == JMP || class == JMP32) && op != CALL && op != EXIT {
            let target = at as i64 + 1 + i64::from(insn.off);
            assert!(
                (0..len).contains(&target),
                "instruction {at} jumps to {target}, outside 0..{len}"
            );
        }
    }
    let last = out.last().expect("a translation is never empty");
    assert!(
        last.code == (JMP | EXIT) || (last.code & 0x07 == JMP && last.code & 0xf0 == 0),
        "the program does not end in exit or a jump: {last:?}"
    );
});
