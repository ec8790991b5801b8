//! Classic BPF, the program libpcap compiles a tcpdump expression to,
//! translated into eBPF instructions for the capture filter stubs of the
//! observe program (`relay_pcap_filter_*` in observe.bpf.c; [`super::stub`]
//! writes them in).
//!
//! The translation keeps libpcap's semantics (`bpf_filter()` in its
//! bpf_filter.c) exactly, since the user wrote a tcpdump expression and
//! expects tcpdump's packets:
//!
//! - A, X are 32-bit (`w7`, `w8`; every ALU op is a 32-bit one, so the
//!   upper halves stay zero), the skb is kept in `r6`, the scratch memory
//!   `M[0..16]` is 64 bytes of this subprogram's stack, zeroed first;
//! - a packet load (`ld`/`ldh`/`ldb` `[k]` and `[x + k]`, `ldx 4*([k]&0xf)`)
//!   goes through `bpf_skb_load_bytes` into a stack slot, then is made
//!   big-endian: out of the packet, the filter rejects it, as libpcap does
//!   (the helper checks the bounds, so the verifier needs nothing more,
//!   and a non-linear skb reads the same as a linear one);
//! - division or modulo by X = 0 rejects; shifts by 32 or more give 0
//!   (libpcap's own rule; in eBPF such a shift is undefined);
//! - jumps become 32-bit compares (`JMP32`), so `k` is compared unsigned,
//!   as in classic BPF; `ret #k` and `ret a` leave their value in `w0`:
//!   nonzero is a match (libpcap returns the snap length).
//!
//! Linux's "ancillary" loads (`ld [k]` with `k` at or above `SKF_AD_OFF`):
//! libpcap built for Linux compiles `inbound`/`outbound` to a load of the
//! packet type (SKF_AD_PKTTYPE) and a test for PACKET_OUTGOING. At TC the
//! skb's own `pkt_type` says nothing of the kind on egress, so the stub
//! gets the direction (r2 on entry, kept in r9): egress loads
//! PACKET_OUTGOING, ingress the skb's `pkt_type` (host, broadcast, ...),
//! which is what a packet socket sees. Every other ancillary load is
//! refused (libpcap emits the others, VLAN tags among them, only for live
//! capture handles, never for the dead handle relay compiles with). Other
//! offsets that large are what they are to libpcap, offsets past any
//! packet.

use thiserror::Error;

/// One classic BPF instruction (`struct bpf_insn` of libpcap, same layout).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

impl Insn {
    pub const fn new(code: u16, jt: u8, jf: u8, k: u32) -> Self {
        Insn { code, jt, jf, k }
    }
}

/// One eBPF instruction (`struct bpf_insn` of the kernel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EbpfInsn {
    pub code: u8,
    pub dst: u8,
    pub src: u8,
    pub off: i16,
    pub imm: i32,
}

impl EbpfInsn {
    /// The 8 bytes the kernel reads, little-endian (x86_64, arm64).
    pub fn to_bytes(self) -> [u8; 8] {
        let mut out = [0u8; 8];
        out[0] = self.code;
        out[1] = (self.dst & 0x0f) | (self.src << 4);
        out[2..4].copy_from_slice(&self.off.to_le_bytes());
        out[4..8].copy_from_slice(&self.imm.to_le_bytes());
        out
    }

    /// `goto +0`: what the stubs are padded with (the verifier removes it).
    pub const NOP: EbpfInsn = EbpfInsn {
        code: JMP | JA,
        dst: 0,
        src: 0,
        off: 0,
        imm: 0,
    };
}

/// Why a classic program cannot be translated.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TranslateError {
    #[error(
        "the compiled filter uses classic BPF instruction {code:#06x} (at {at}), which relay cannot run in the kernel; report the expression"
    )]
    Unsupported { at: usize, code: u16 },
    #[error(
        "the compiled filter uses Linux's ancillary data (instruction {at}, offset {k:#x}), which relay cannot run in the kernel; report the expression"
    )]
    Ancillary { at: usize, k: u32 },
    #[error(
        "the compiled filter jumps out of the program (instruction {at}); report the expression"
    )]
    Jump { at: usize },
    #[error("the compiled filter is empty")]
    Empty,
    #[error(
        "the compiled filter runs past its last instruction (instruction {at} is not a return); report the expression"
    )]
    FallsOff { at: usize },
}

// Classic BPF (linux/filter.h, pcap/bpf.h).
const CLASS_LD: u16 = 0x00;
const CLASS_LDX: u16 = 0x01;
const CLASS_ST: u16 = 0x02;
const CLASS_STX: u16 = 0x03;
const CLASS_ALU: u16 = 0x04;
const CLASS_JMP: u16 = 0x05;
const CLASS_RET: u16 = 0x06;
const CLASS_MISC: u16 = 0x07;
const SIZE_W: u16 = 0x00;
const SIZE_H: u16 = 0x08;
const SIZE_B: u16 = 0x10;
const MODE_IMM: u16 = 0x00;
const MODE_ABS: u16 = 0x20;
const MODE_IND: u16 = 0x40;
const MODE_MEM: u16 = 0x60;
const MODE_LEN: u16 = 0x80;
const MODE_MSH: u16 = 0xa0;
const SRC_X: u16 = 0x08;
const RVAL_A: u16 = 0x10;
const MISC_TXA: u16 = 0x80;
/// Offsets from here up are Linux's ancillary data (SKF_AD_OFF, -4096).
const ANCILLARY: u32 = 0xffff_f000;
/// SKF_AD_OFF + SKF_AD_PKTTYPE
const AD_PKTTYPE: u32 = ANCILLARY + 4;
/// PACKET_OUTGOING (linux/if_packet.h)
const PACKET_OUTGOING: u32 = 4;
/// `__sk_buff.pkt_type`
const SKB_PKT_TYPE: i16 = 4;
/// enum relay_direction's RELAY_EGRESS
const EGRESS: i32 = 1;
/// Words of scratch memory (BPF_MEMWORDS).
const MEMWORDS: u32 = 16;

// eBPF (linux/bpf.h). The ALU and jump operation codes are the classic ones.
const LDX: u8 = 0x01;
const ST: u8 = 0x02;
const STX: u8 = 0x03;
const ALU: u8 = 0x04;
const JMP: u8 = 0x05;
const JMP32: u8 = 0x06;
const ALU64: u8 = 0x07;
const MEM: u8 = 0x60;
const W: u8 = 0x00;
const H: u8 = 0x08;
const B: u8 = 0x10;
const K: u8 = 0x00;
const X: u8 = 0x08;
const ADD: u8 = 0x00;
const DIV: u8 = 0x30;
const AND: u8 = 0x50;
const LSH: u8 = 0x60;
const RSH: u8 = 0x70;
const NEG: u8 = 0x80;
const MOD: u8 = 0x90;
const MOV: u8 = 0xb0;
const END: u8 = 0xd0;
const TO_BE: u8 = 0x08;
const JA: u8 = 0x00;
const JEQ: u8 = 0x10;
const JGT: u8 = 0x20;
const JGE: u8 = 0x30;
const JSET: u8 = 0x40;
const JNE: u8 = 0x50;
const JLT: u8 = 0xa0;
const JLE: u8 = 0xb0;
const CALL: u8 = 0x80;
const EXIT: u8 = 0x90;
/// BPF_FUNC_skb_load_bytes
const SKB_LOAD_BYTES: i32 = 26;

const R0: u8 = 0;
const R1: u8 = 1;
const R2: u8 = 2;
const R3: u8 = 3;
const R4: u8 = 4;
const SKB: u8 = 6;
const A: u8 = 7;
const XR: u8 = 8;
const DIRECTION: u8 = 9;
const FP: u8 = 10;
/// The stack slot packet loads land in.
const LOAD_SLOT: i16 = -8;
/// Where M[0] lives; M[i] is 4 * i above it.
const MEM_BASE: i16 = -8 - 4 * MEMWORDS as i16;

/// Where a jump goes, resolved once every instruction's place is known.
#[derive(Clone, Copy)]
enum Target {
    /// The first eBPF instruction of this classic instruction.
    Classic(usize),
    /// The shared `w0 = 0; exit` at the end.
    Reject,
}

struct Emitter {
    out: Vec<(EbpfInsn, Option<Target>)>,
}

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> EbpfInsn {
    EbpfInsn {
        code,
        dst,
        src,
        off,
        imm,
    }
}

impl Emitter {
    fn push(&mut self, i: EbpfInsn) {
        self.out.push((i, None));
    }

    fn jump(&mut self, i: EbpfInsn, to: Target) {
        self.out.push((i, Some(to)));
    }

    /// `w<dst> = k` (the 32-bit move zero-extends, so any u32 is exact).
    fn mov_k(&mut self, dst: u8, k: u32) {
        self.push(insn(ALU | MOV | K, dst, 0, 0, k as i32));
    }

    fn reject(&mut self) {
        self.jump(insn(JMP | JA, 0, 0, 0, 0), Target::Reject);
    }

    /// Loads `size` bytes at offset r2 of the packet into `dst`, big-endian,
    /// or rejects the packet when they are not all in it.
    fn load_at_r2(&mut self, dst: u8, size: u16) {
        let (bytes, width) = match size {
            SIZE_W => (4, W),
            SIZE_H => (2, H),
            _ => (1, B),
        };
        self.push(insn(ALU64 | MOV | X, R1, SKB, 0, 0));
        self.push(insn(ALU64 | MOV | X, R3, FP, 0, 0));
        self.push(insn(ALU64 | ADD | K, R3, 0, 0, i32::from(LOAD_SLOT)));
        self.mov_k(R4, bytes);
        self.push(insn(JMP | CALL, 0, 0, 0, SKB_LOAD_BYTES));
        self.jump(insn(JMP | JNE | K, R0, 0, 0, 0), Target::Reject);
        self.push(insn(LDX | MEM | width, dst, FP, LOAD_SLOT, 0));
        match bytes {
            4 => self.push(insn(ALU | END | TO_BE, dst, 0, 0, 32)),
            2 => self.push(insn(ALU | END | TO_BE, dst, 0, 0, 16)),
            _ => {}
        }
    }

    /// `[k]`: an offset past i32::MAX is never in a packet.
    fn load_abs(&mut self, dst: u8, size: u16, k: u32) {
        if k > i32::MAX as u32 {
            return self.reject();
        }
        self.mov_k(R2, k);
        self.load_at_r2(dst, size);
    }

    /// `[x + k]`, summed in 64 bits so it cannot wrap into the packet.
    fn load_ind(&mut self, size: u16, k: u32) {
        if k > i32::MAX as u32 {
            return self.reject();
        }
        self.push(insn(ALU | MOV | X, R2, XR, 0, 0));
        self.push(insn(ALU64 | ADD | K, R2, 0, 0, k as i32));
        self.jump(insn(JMP | JGT | K, R2, 0, 0, i32::MAX), Target::Reject);
        self.load_at_r2(A, size);
    }

    fn mem_slot(at: usize, code: u16, k: u32) -> Result<i16, TranslateError> {
        if k >= MEMWORDS {
            return Err(TranslateError::Unsupported { at, code });
        }
        Ok(MEM_BASE + 4 * k as i16)
    }
}

/// Translates a classic program into the body of a filter stub: entered
/// with the skb in r1 and the direction in r2, it returns nonzero in w0
/// when the packet matches.
pub fn translate(program: &[Insn]) -> Result<Vec<EbpfInsn>, TranslateError> {
    if program.is_empty() {
        return Err(TranslateError::Empty);
    }
    let mut e = Emitter { out: Vec::new() };
    e.push(insn(ALU64 | MOV | X, SKB, R1, 0, 0));
    e.push(insn(ALU64 | MOV | X, DIRECTION, R2, 0, 0));
    e.mov_k(A, 0);
    e.mov_k(XR, 0);
    let uses_mem = program.iter().any(|i| {
        let class = i.code & 0x07;
        (matches!(class, CLASS_LD | CLASS_LDX) && i.code & 0xe0 == MODE_MEM)
            || matches!(class, CLASS_ST | CLASS_STX)
    });
    if uses_mem {
        for word in 0..MEMWORDS as i16 {
            e.push(insn(ST | MEM | W, FP, 0, MEM_BASE + 4 * word, 0));
        }
    }
    // The kernel refuses unreachable instructions; classic programs may
    // have some (libpcap's optimizer leaves few), so those are left out.
    let reachable = reachable(program);
    let mut starts = Vec::with_capacity(program.len());
    let mut rejects = false;
    for (at, i) in program.iter().enumerate() {
        starts.push(e.out.len());
        if !reachable[at] {
            continue;
        }
        let (code, k) = (i.code, i.k);
        let unsupported = TranslateError::Unsupported { at, code };
        let class = code & 0x07;
        // Classic BPF ends every path in a return (the kernel's own checker
        // demands it); a last instruction that is not one would run on into
        // whatever follows the stub. Found by the `cbpf` fuzz target.
        if at + 1 == program.len() && class != CLASS_RET && class != CLASS_JMP {
            return Err(TranslateError::FallsOff { at });
        }
        match class {
            CLASS_LD | CLASS_LDX => {
                let dst = if class == CLASS_LD { A } else { XR };
                let (size, mode) = (code & 0x18, code & 0xe0);
                if class == CLASS_LD && mode == MODE_ABS && k == AD_PKTTYPE {
                    e.push(insn(JMP32 | JNE | K, DIRECTION, 0, 2, EGRESS));
                    e.mov_k(A, PACKET_OUTGOING);
                    e.push(insn(JMP | JA, 0, 0, 1, 0));
                    e.push(insn(LDX | MEM | W, A, SKB, SKB_PKT_TYPE, 0));
                    continue;
                }
                if class == CLASS_LD && mode == MODE_ABS && k >= ANCILLARY {
                    return Err(TranslateError::Ancillary { at, k });
                }
                match (class, mode) {
                    (_, MODE_IMM) => e.mov_k(dst, k),
                    (_, MODE_LEN) if size == SIZE_W => {
                        // __sk_buff.len, at offset 0 of the context.
                        e.push(insn(LDX | MEM | W, dst, SKB, 0, 0));
                    }
                    (_, MODE_MEM) => {
                        let slot = Emitter::mem_slot(at, code, k)?;
                        e.push(insn(LDX | MEM | W, dst, FP, slot, 0));
                    }
                    (CLASS_LD, MODE_ABS) if size != 0x18 => e.load_abs(A, size, k),
                    (CLASS_LD, MODE_IND) if size != 0x18 => e.load_ind(size, k),
                    (CLASS_LDX, MODE_MSH) if size == SIZE_B => {
                        e.load_abs(XR, SIZE_B, k);
                        e.push(insn(ALU | AND | K, XR, 0, 0, 0xf));
                        e.push(insn(ALU | LSH | K, XR, 0, 0, 2));
                    }
                    _ => return Err(unsupported),
                }
            }
            CLASS_ST | CLASS_STX => {
                let slot = Emitter::mem_slot(at, code, k)?;
                let src = if class == CLASS_ST { A } else { XR };
                e.push(insn(STX | MEM | W, FP, src, slot, 0));
            }
            CLASS_ALU => {
                let op = (code & 0xf0) as u8;
                let by_x = code & SRC_X != 0;
                match op {
                    NEG => e.push(insn(ALU | NEG, A, 0, 0, 0)),
                    DIV | MOD if by_x => {
                        // libpcap: division by zero rejects the packet.
                        e.jump(insn(JMP32 | JEQ | K, XR, 0, 0, 0), Target::Reject);
                        e.push(insn(ALU | op | X, A, XR, 0, 0));
                    }
                    DIV | MOD if k == 0 => e.reject(),
                    LSH | RSH if by_x => {
                        // libpcap: a shift by 32 or more gives 0.
                        e.push(insn(JMP32 | JLT | K, XR, 0, 2, 32));
                        e.mov_k(A, 0);
                        e.push(insn(JMP | JA, 0, 0, 1, 0));
                        e.push(insn(ALU | op | X, A, XR, 0, 0));
                    }
                    LSH | RSH if k >= 32 => e.mov_k(A, 0),
                    0x00 | 0x10 | 0x20 | DIV | 0x40 | AND | LSH | RSH | MOD | 0xa0 => {
                        if by_x {
                            e.push(insn(ALU | op | X, A, XR, 0, 0));
                        } else {
                            e.push(insn(ALU | op | K, A, 0, 0, k as i32));
                        }
                    }
                    _ => return Err(unsupported),
                }
            }
            CLASS_JMP => {
                let op = (code & 0xf0) as u8;
                let target = |skip: u32| -> Result<Target, TranslateError> {
                    let to = at as u64 + 1 + u64::from(skip);
                    if to >= program.len() as u64 {
                        return Err(TranslateError::Jump { at });
                    }
                    Ok(Target::Classic(to as usize))
                };
                if op == JA {
                    e.jump(insn(JMP | JA, 0, 0, 0, 0), target(k)?);
                    continue;
                }
                if !matches!(op, JEQ | JGT | JGE | JSET) {
                    return Err(unsupported);
                }
                let (jt, jf) = (target(i.jt.into())?, target(i.jf.into())?);
                let (src_kind, src, imm) = if code & SRC_X != 0 {
                    (X, XR, 0)
                } else {
                    (K, 0, k as i32)
                };
                if i.jt == i.jf {
                    e.jump(insn(JMP | JA, 0, 0, 0, 0), jt);
                    continue;
                }
                // Falling through on "true" is common (jt = 0): test the
                // opposite and jump to the false branch, one jump fewer.
                let negated = match op {
                    JEQ => Some(JNE),
                    JGT => Some(JLE),
                    JGE => Some(JLT),
                    _ => None,
                };
                match negated {
                    Some(not) if i.jt == 0 => {
                        e.jump(insn(JMP32 | not | src_kind, A, src, 0, imm), jf);
                    }
                    _ => {
                        e.jump(insn(JMP32 | op | src_kind, A, src, 0, imm), jt);
                        // `goto +0` when the false branch is next: removed by the verifier.
                        e.jump(insn(JMP | JA, 0, 0, 0, 0), jf);
                    }
                }
            }
            CLASS_RET => {
                match code & 0x18 {
                    0 => e.mov_k(R0, k),
                    RVAL_A => e.push(insn(ALU | MOV | X, R0, A, 0, 0)),
                    _ => return Err(unsupported),
                }
                e.push(insn(JMP | EXIT, 0, 0, 0, 0));
            }
            CLASS_MISC => {
                if code & 0xf8 == MISC_TXA {
                    e.push(insn(ALU | MOV | X, A, XR, 0, 0));
                } else if code & 0xf8 == 0 {
                    e.push(insn(ALU | MOV | X, XR, A, 0, 0));
                } else {
                    return Err(unsupported);
                }
            }
            _ => return Err(unsupported),
        }
    }
    let reject_at = e.out.len();
    rejects |= e.out.iter().any(|(_, t)| matches!(t, Some(Target::Reject)));
    if rejects {
        e.mov_k(R0, 0);
        e.push(insn(JMP | EXIT, 0, 0, 0, 0));
    }
    let mut out = Vec::with_capacity(e.out.len());
    for (pc, (mut i, target)) in e.out.into_iter().enumerate() {
        if let Some(target) = target {
            let to = match target {
                Target::Classic(n) => starts[n],
                Target::Reject => reject_at,
            };
            // Every jump goes forward; a filter that fits a stub fits an i16.
            i.off = i16::try_from(to as i64 - pc as i64 - 1)
                .map_err(|_| TranslateError::Jump { at: pc })?;
        }
        out.push(i);
    }
    Ok(out)
}

/// Which instructions some path from the first reaches (jumps go forward
/// only, so one pass decides; a jump out of the program is refused later).
fn reachable(program: &[Insn]) -> Vec<bool> {
    let mut seen = vec![false; program.len()];
    let mark = |seen: &mut Vec<bool>, to: u64| {
        if let Some(slot) = usize::try_from(to).ok().and_then(|to| seen.get_mut(to)) {
            *slot = true;
        }
    };
    if let Some(first) = seen.first_mut() {
        *first = true;
    }
    for (at, i) in program.iter().enumerate() {
        if !seen[at] {
            continue;
        }
        let next = at as u64 + 1;
        match (i.code & 0x07, (i.code & 0xf0) as u8) {
            (CLASS_RET, _) => {}
            (CLASS_JMP, JA) => mark(&mut seen, next + u64::from(i.k)),
            (CLASS_JMP, _) => {
                mark(&mut seen, next + u64::from(i.jt));
                mark(&mut seen, next + u64::from(i.jf));
            }
            _ => mark(&mut seen, next),
        }
    }
    seen
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A model of the kernel's eBPF machine for the instructions
    /// [`translate`] emits: registers, a 512-byte stack, the skb as a byte
    /// slice (its length at context offset 0), `bpf_skb_load_bytes`.
    pub(crate) fn run(program: &[EbpfInsn], packet: &[u8]) -> u32 {
        run_as(program, packet, 0)
    }

    /// [`run`] with a direction (0 ingress, 1 egress), the skb's
    /// `pkt_type` being PACKET_HOST.
    pub(crate) fn run_as(program: &[EbpfInsn], packet: &[u8], direction: u64) -> u32 {
        const STACK: u64 = 1 << 40;
        const CTX: u64 = 1 << 41;
        let mut r = [0u64; 11];
        let mut stack = [0u8; 512];
        r[1] = CTX;
        r[2] = direction;
        r[10] = STACK + 512;
        let slot = |addr: u64, len: usize| -> usize {
            let at = addr
                .checked_sub(STACK)
                .expect("stack access below the stack") as usize;
            assert!(at + len <= 512, "stack access past the frame");
            at
        };
        let mut pc = 0usize;
        loop {
            let i = program[pc];
            pc += 1;
            let (d, s) = (usize::from(i.dst), usize::from(i.src));
            let class = i.code & 0x07;
            let src_val = if i.code & X != 0 {
                r[s]
            } else {
                i.imm as i64 as u64
            };
            match class {
                ALU | ALU64 => {
                    let op = i.code & 0xf0;
                    if op == END {
                        let v = r[d];
                        r[d] = match i.imm {
                            16 => u64::from((v as u16).swap_bytes()),
                            32 => u64::from((v as u32).swap_bytes()),
                            _ => panic!("END {}", i.imm),
                        };
                        continue;
                    }
                    let wide = class == ALU64;
                    let (a, b) = if wide {
                        (r[d], src_val)
                    } else {
                        (r[d] & 0xffff_ffff, src_val & 0xffff_ffff)
                    };
                    let bits = if wide { 64 } else { 32 };
                    let v = match op {
                        0x00 => a.wrapping_add(b),
                        0x10 => a.wrapping_sub(b),
                        0x20 => a.wrapping_mul(b),
                        DIV => a.checked_div(b).unwrap_or(0),
                        0x40 => a | b,
                        AND => a & b,
                        LSH => {
                            assert!(b < bits, "shift by {b}");
                            a << b
                        }
                        RSH => {
                            assert!(b < bits, "shift by {b}");
                            a >> b
                        }
                        NEG => a.wrapping_neg(),
                        MOD => a.checked_rem(b).unwrap_or(a),
                        0xa0 => a ^ b,
                        MOV => b,
                        _ => panic!("ALU op {op:#x}"),
                    };
                    r[d] = if wide { v } else { v & 0xffff_ffff };
                }
                JMP | JMP32 => {
                    let op = i.code & 0xf0;
                    if op == EXIT {
                        return r[0] as u32;
                    }
                    if op == CALL {
                        assert_eq!(i.imm, SKB_LOAD_BYTES);
                        assert_eq!(r[1], CTX);
                        let (off, len) = (r[2] as usize, r[4] as usize);
                        let at = slot(r[3], len);
                        r[0] = match packet.get(off..off.saturating_add(len)) {
                            Some(bytes) if r[2] <= i32::MAX as u64 => {
                                stack[at..at + len].copy_from_slice(bytes);
                                0
                            }
                            _ => -14i64 as u64,
                        };
                        continue;
                    }
                    let (a, b) = if class == JMP32 {
                        (r[d] & 0xffff_ffff, src_val & 0xffff_ffff)
                    } else {
                        (r[d], src_val)
                    };
                    let taken = match op {
                        JA => true,
                        JEQ => a == b,
                        JGT => a > b,
                        JGE => a >= b,
                        JSET => a & b != 0,
                        JNE => a != b,
                        JLT => a < b,
                        JLE => a <= b,
                        _ => panic!("JMP op {op:#x}"),
                    };
                    if taken {
                        pc = (pc as i64 + i64::from(i.off)) as usize;
                    }
                }
                LDX => {
                    let addr = r[s].wrapping_add(i.off as i64 as u64);
                    if addr == CTX {
                        r[d] = packet.len() as u64;
                        continue;
                    }
                    if addr == CTX + 4 {
                        r[d] = 0; // PACKET_HOST
                        continue;
                    }
                    let len = match i.code & 0x18 {
                        W => 4,
                        H => 2,
                        _ => 1,
                    };
                    let at = slot(addr, len);
                    let mut word = [0u8; 8];
                    word[..len].copy_from_slice(&stack[at..at + len]);
                    r[d] = u64::from_le_bytes(word);
                }
                STX | ST => {
                    let addr = r[d].wrapping_add(i.off as i64 as u64);
                    let at = slot(addr, 4);
                    let v = if class == STX {
                        r[s] as u32
                    } else {
                        i.imm as u32
                    };
                    stack[at..at + 4].copy_from_slice(&v.to_le_bytes());
                }
                _ => panic!("class {class:#x}"),
            }
        }
    }

    unsafe extern "C" {
        /// libpcap's own interpreter (pcap/bpf.h).
        fn bpf_filter(insns: *const Insn, packet: *const u8, wirelen: u32, buflen: u32) -> u32;
    }

    /// What libpcap's `bpf_filter()` returns for `program` on `packet`.
    pub(crate) fn libpcap(program: &[Insn], packet: &[u8]) -> u32 {
        let len = u32::try_from(packet.len()).expect("test packets are small");
        // SAFETY: Insn is #[repr(C)]-compatible with struct bpf_insn
        // (u16, u8, u8, u32: checked by the size assertion), the program
        // ends with a `ret` (every one in these tests does, which is what
        // bpf_filter needs to stay inside it), and the packet is `len` bytes.
        assert_eq!(std::mem::size_of::<Insn>(), 8);
        unsafe { bpf_filter(program.as_ptr(), packet.as_ptr(), len, len) }
    }

    const RET_A: Insn = Insn::new(0x16, 0, 0, 0);

    fn packet() -> Vec<u8> {
        (0u8..64)
            .map(|b| b.wrapping_mul(37).wrapping_add(5))
            .collect()
    }

    /// Runs `program` both ways on `packet` and checks they agree; returns the result.
    fn agree(program: &[Insn], packet: &[u8]) -> u32 {
        let ebpf = translate(program).expect("translates");
        let (ours, theirs) = (run(&ebpf, packet), libpcap(program, packet));
        assert_eq!(
            ours,
            theirs,
            "program {program:x?} on {} bytes: translation {ours}, libpcap {theirs}",
            packet.len()
        );
        ours
    }

    #[test]
    fn loads_are_big_endian_and_bounded_by_the_packet() {
        let p = packet();
        let ld = |code: u16, k: u32| [Insn::new(code, 0, 0, k), RET_A];
        // ld [k], ldh [k], ldb [k]
        assert_eq!(
            agree(&ld(0x20, 4), &p),
            u32::from_be_bytes([p[4], p[5], p[6], p[7]])
        );
        assert_eq!(
            agree(&ld(0x28, 10), &p),
            u32::from(u16::from_be_bytes([p[10], p[11]]))
        );
        assert_eq!(agree(&ld(0x30, 63), &p), u32::from(p[63]));
        // One byte past the end, and far past it: rejected.
        for (code, k) in [
            (0x20, 61),
            (0x28, 63),
            (0x30, 64),
            (0x20, 0x8000_0000),
            (0x30, 0x7fff_ffff),
        ] {
            assert_eq!(agree(&ld(code, k), &p), 0, "{code:#x} [{k}]");
        }
        // ld #k, ld len, ldx len (then txa).
        assert_eq!(agree(&ld(0x00, 0xdead_beef), &p), 0xdead_beef);
        assert_eq!(agree(&ld(0x80, 0), &p), 64);
        assert_eq!(
            agree(
                &[Insn::new(0x81, 0, 0, 0), Insn::new(0x87, 0, 0, 0), RET_A],
                &p
            ),
            64
        );
    }

    #[test]
    fn indexed_loads_and_msh_use_x() {
        let p = packet();
        // ldx 4*([k]&0xf); txa; ret a
        let msh = [Insn::new(0xb1, 0, 0, 14), Insn::new(0x87, 0, 0, 0), RET_A];
        assert_eq!(agree(&msh, &p), u32::from(p[14] & 0xf) * 4);
        assert_eq!(agree(&[Insn::new(0xb1, 0, 0, 64), RET_A], &p), 0);
        for (code, x, k) in [
            (0x40u16, 8u32, 2u32),
            (0x48, 30, 30),
            (0x50, 0, 63),
            (0x50, 1, 63),
            (0x40, u32::MAX, 4),
            (0x48, 4, u32::MAX),
        ] {
            let prog = [Insn::new(0x01, 0, 0, x), Insn::new(code, 0, 0, k), RET_A];
            agree(&prog, &p);
        }
    }

    #[test]
    fn alu_operations_match_libpcap_for_k_and_x() {
        let p = packet();
        let values = [
            0u32,
            1,
            2,
            7,
            31,
            32,
            33,
            0x8000_0000,
            0xffff_ffff,
            0x1234_5678,
        ];
        // add sub mul div or and lsh rsh mod xor
        for op in [
            0x00u16, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x90, 0xa0,
        ] {
            for a in values {
                for b in values {
                    let by_k = [
                        Insn::new(0x00, 0, 0, a),
                        Insn::new(0x04 | op, 0, 0, b),
                        RET_A,
                    ];
                    // libpcap refuses to compile a division by constant 0 (and shifts
                    // by 32 are undefined in its C), so only X is tested there.
                    let k_undefined = (matches!(op, 0x30 | 0x90) && b == 0)
                        || (matches!(op, 0x60 | 0x70) && b >= 32);
                    if !k_undefined {
                        agree(&by_k, &p);
                    }
                    let by_x = [
                        Insn::new(0x00, 0, 0, a),
                        Insn::new(0x01, 0, 0, b),
                        Insn::new(0x0c | op, 0, 0, 0),
                        RET_A,
                    ];
                    agree(&by_x, &p);
                }
            }
        }
        // neg
        assert_eq!(
            agree(
                &[Insn::new(0x00, 0, 0, 5), Insn::new(0x84, 0, 0, 0), RET_A],
                &p
            ),
            5u32.wrapping_neg()
        );
    }

    #[test]
    fn jumps_compare_unsigned_32_bits() {
        let p = packet();
        let values = [0u32, 1, 0x7fff_ffff, 0x8000_0000, 0xffff_ffff];
        // jeq jgt jge jset, k and x; ret #1 on true, #0 on false (jf 1 skips it),
        // and the falling-through variants (jt 0).
        for op in [0x10u16, 0x20, 0x30, 0x40] {
            for a in values {
                for b in values {
                    for (jt, jf) in [(0u8, 1u8), (1, 0)] {
                        let (t, f) = if jt == 0 { (1, 0) } else { (0, 1) };
                        let by_k = [
                            Insn::new(0x00, 0, 0, a),
                            Insn::new(0x05 | op, jt, jf, b),
                            Insn::new(0x06, 0, 0, t),
                            Insn::new(0x06, 0, 0, f),
                        ];
                        agree(&by_k, &p);
                        let by_x = [
                            Insn::new(0x00, 0, 0, a),
                            Insn::new(0x01, 0, 0, b),
                            Insn::new(0x0d | op, jt, jf, 0),
                            Insn::new(0x06, 0, 0, t),
                            Insn::new(0x06, 0, 0, f),
                        ];
                        agree(&by_x, &p);
                    }
                }
            }
        }
        // ja k, and a conditional whose branches meet.
        let ja = [
            Insn::new(0x05, 0, 0, 1),
            Insn::new(0x06, 0, 0, 0),
            Insn::new(0x06, 0, 0, 9),
        ];
        assert_eq!(agree(&ja, &p), 9);
        let same = [
            Insn::new(0x15, 1, 1, 0),
            Insn::new(0x06, 0, 0, 0),
            Insn::new(0x06, 0, 0, 3),
        ];
        assert_eq!(agree(&same, &p), 3);
    }

    #[test]
    fn scratch_memory_tax_txa_and_returns() {
        let p = packet();
        // ld #7; st M[15]; ldx #0; ld #1; ldx M[15]; txa; ret a
        let prog = [
            Insn::new(0x00, 0, 0, 7),
            Insn::new(0x02, 0, 0, 15),
            Insn::new(0x01, 0, 0, 0),
            Insn::new(0x00, 0, 0, 1),
            Insn::new(0x61, 0, 0, 15),
            Insn::new(0x87, 0, 0, 0),
            RET_A,
        ];
        assert_eq!(agree(&prog, &p), 7);
        // ld #9; tax; stx M[0]; ld M[0]; ret a; and ret x
        let prog = [
            Insn::new(0x00, 0, 0, 9),
            Insn::new(0x07, 0, 0, 0),
            Insn::new(0x03, 0, 0, 0),
            Insn::new(0x60, 0, 0, 0),
            RET_A,
        ];
        assert_eq!(agree(&prog, &p), 9);
        // `ret x` is no instruction of libpcap's (its interpreter aborts on it).
        assert!(translate(&[Insn::new(0x0e, 0, 0, 0)]).is_err());
        assert_eq!(agree(&[Insn::new(0x06, 0, 0, 262_144)], &p), 262_144);
    }

    #[test]
    fn what_cannot_run_in_the_kernel_is_refused() {
        // The packet type is the direction's (tcpdump's `inbound`: `ldb [pkttype]; jeq #4`).
        let inbound = [
            Insn::new(0x30, 0, 0, AD_PKTTYPE),
            Insn::new(0x15, 0, 1, PACKET_OUTGOING),
            Insn::new(0x06, 0, 0, 0),
            Insn::new(0x06, 0, 0, 1),
        ];
        let ebpf = translate(&inbound).unwrap();
        assert_eq!(run_as(&ebpf, &packet(), 0), 1);
        assert_eq!(run_as(&ebpf, &packet(), 1), 0);
        // Other ancillary loads (SKF_AD_OFF + SKF_AD_VLAN_TAG_PRESENT).
        let prog = [Insn::new(0x30, 0, 0, 0xffff_f02c), RET_A];
        assert_eq!(
            translate(&prog),
            Err(TranslateError::Ancillary {
                at: 0,
                k: 0xffff_f02c
            })
        );
        // M[16] does not exist; a jump past the end; an unknown class member.
        assert!(matches!(
            translate(&[Insn::new(0x02, 0, 0, 16), RET_A]),
            Err(TranslateError::Unsupported { at: 0, .. })
        ));
        assert_eq!(
            translate(&[Insn::new(0x05, 0, 0, 5), RET_A]),
            Err(TranslateError::Jump { at: 0 })
        );
        assert!(translate(&[Insn::new(0xc4, 0, 0, 0), RET_A]).is_err());
        assert_eq!(translate(&[]), Err(TranslateError::Empty));
    }

    /// The `cbpf` fuzz target's first find: a reachable last instruction
    /// that is not a return fell off the end of the translation.
    #[test]
    fn a_program_that_runs_past_its_end_is_refused() {
        let program = [
            Insn::new(0x80, 0, 0, 0),
            Insn::new(0x25, 0, 1, 64),
            Insn::new(0x06, 0, 0, 25),
            Insn::new(0x00, 0, 37, 100_663_296),
        ];
        assert_eq!(translate(&program), Err(TranslateError::FallsOff { at: 3 }));
        // What no path reaches is left out (the verifier refuses it), and
        // so is the shared rejection when nothing rejects.
        let dead = [
            Insn::new(0x05, 0, 0, 1),
            Insn::new(0x30, 0, 0, 3),
            Insn::new(0x06, 0, 0, 7),
        ];
        let ebpf = translate(&dead).unwrap();
        assert!(!ebpf.iter().any(|i| i.imm == SKB_LOAD_BYTES), "{ebpf:?}");
        assert_eq!(ebpf.iter().filter(|i| i.code == JMP | EXIT).count(), 1);
        assert_eq!(run(&ebpf, &packet()), 7);
    }
}
