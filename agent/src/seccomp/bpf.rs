//! Compiles resolved plans into one classic BPF program for seccomp.
//!
//! Layout (forward order):
//!
//! ```text
//! ld arch; jeq A1 -> section 1; jeq A2 -> section 2; ...; ret KILL_PROCESS
//! section: ld nr; a binary search over number ranges (jge nodes) whose
//!          leaves are the shared returns or a syscall's argument checks
//! argument checks: per case, the comparisons in turn (hi then lo word on
//!          64-bit architectures); the first case that holds decides, none: EPERM
//! shared returns: ALLOW, ERRNO(EPERM), ERRNO(...), KILL_PROCESS
//! ```
//!
//! The program is assembled back to front, so every jump target already has
//! its place when the jump is written; a conditional jump whose target lies
//! beyond the 8-bit offset goes through an unconditional `ja` (32-bit offset)
//! placed right after it. Only little-endian architectures are handled (the
//! word order of the 64-bit arguments in `seccomp_data`).

use super::profile::{ArgCmp, CmpOp, Plan, Verdict, EPERM};
use super::{Arch, Insn};
use std::collections::BTreeMap;

const LD_W_ABS: u16 = 0x20;
const ALU_AND_K: u16 = 0x54;
const JA: u16 = 0x05;
const JEQ: u16 = 0x15;
const JGT: u16 = 0x25;
const JGE: u16 = 0x35;
const RET_K: u16 = 0x06;

pub const RET_KILL_PROCESS: u32 = 0x8000_0000;
pub const RET_ERRNO: u32 = 0x0005_0000;
pub const RET_ALLOW: u32 = 0x7FFF_0000;

/// Offsets in `struct seccomp_data`.
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
fn off_arg_lo(index: u8) -> u32 {
    16 + 8 * u32::from(index)
}

/// A place in the program, counted from its end (see `Asm`).
type Label = usize;

/// Back-to-front assembler: `rev` holds the program reversed, and the label
/// of an instruction is `rev.len()` just after it was pushed.
struct Asm {
    rev: Vec<Insn>,
}

impl Asm {
    fn push(&mut self, code: u16, jt: u8, jf: u8, k: u32) -> Label {
        self.rev.push(Insn { code, jt, jf, k });
        self.rev.len()
    }

    /// Distance from the instruction pushed next to `to`.
    fn dist(&self, to: Label) -> usize {
        self.rev.len() - to
    }

    fn ret(&mut self, k: u32) -> Label {
        self.push(RET_K, 0, 0, k)
    }

    fn ld(&mut self, off: u32) -> Label {
        self.push(LD_W_ABS, 0, 0, off)
    }

    fn and(&mut self, k: u32) -> Label {
        self.push(ALU_AND_K, 0, 0, k)
    }

    fn ja(&mut self, to: Label) -> Label {
        let k = u32::try_from(self.dist(to)).expect("BPF program beyond 2^32 instructions");
        self.push(JA, 0, 0, k)
    }

    /// `if A <op> k goto jt else goto jf`.
    fn jump(&mut self, op: u16, k: u32, mut jt: Label, mut jf: Label) -> Label {
        // One trampoline pushed moves the other target one further: keep a margin.
        if self.dist(jt) > 254 || self.dist(jf) > 254 {
            if self.dist(jt) > 254 {
                jt = self.ja(jt);
            }
            if self.dist(jf) > 254 {
                jf = self.ja(jf);
            }
        }
        let (t, f) = (self.dist(jt) as u8, self.dist(jf) as u8);
        self.push(op, t, f, k)
    }

    /// Makes the instruction pushed next continue at `to`.
    fn goto(&mut self, to: Label) {
        if to != self.rev.len() {
            self.ja(to);
        }
    }

    fn finish(mut self) -> Vec<Insn> {
        self.rev.reverse();
        self.rev
    }
}

/// The shared returns, placed at the end of the program.
struct Returns {
    allow: Label,
    kill: Label,
    errno: BTreeMap<u16, Label>,
}

impl Returns {
    fn verdict(&mut self, asm: &mut Asm, v: Verdict) -> Label {
        match v {
            Verdict::Allow => self.allow,
            Verdict::Errno(e) => *self.errno.entry(e).or_insert_with(|| asm.ret(RET_ERRNO | u32::from(e))),
        }
    }
}

/// One comparison; returns its entry point.
fn compare(asm: &mut Asm, wide: bool, c: ArgCmp, yes: Label, no: Label) -> Label {
    let wide = wide && !c.low32;
    let lo_off = off_arg_lo(c.index);
    let hi_off = lo_off + 4;
    let split = |v: u64| (v as u32, (v >> 32) as u32);
    match c.op {
        CmpOp::Eq(v) => {
            let (lo, hi) = split(v);
            if !wide && hi != 0 {
                return no;
            }
            asm.jump(JEQ, lo, yes, no);
            let lo_entry = asm.ld(lo_off);
            if !wide {
                return lo_entry;
            }
            asm.jump(JEQ, hi, lo_entry, no);
            asm.ld(hi_off)
        }
        CmpOp::MaskedEq { mask, value } => {
            let (mlo, mhi) = split(mask);
            let (vlo, vhi) = split(value);
            if (!wide || mhi == 0) && vhi & mhi != vhi {
                // The high word is all zeros (32-bit) or masked away: it can only match zero.
                return no;
            }
            asm.jump(JEQ, vlo, yes, no);
            asm.and(mlo);
            let lo_entry = asm.ld(lo_off);
            if !wide || mhi == 0 {
                return lo_entry;
            }
            asm.jump(JEQ, vhi, lo_entry, no);
            asm.and(mhi);
            asm.ld(hi_off)
        }
        CmpOp::Lt(v) => {
            let (lo, hi) = split(v);
            if !wide && hi != 0 {
                return yes;
            }
            asm.jump(JGE, lo, no, yes);
            let lo_entry = asm.ld(lo_off);
            if !wide {
                return lo_entry;
            }
            let eq = asm.jump(JEQ, hi, lo_entry, yes);
            asm.jump(JGT, hi, no, eq);
            asm.ld(hi_off)
        }
        CmpOp::Gt(v) => {
            let (lo, hi) = split(v);
            if !wide && hi != 0 {
                return no;
            }
            asm.jump(JGT, lo, yes, no);
            let lo_entry = asm.ld(lo_off);
            if !wide {
                return lo_entry;
            }
            let eq = asm.jump(JEQ, hi, lo_entry, no);
            asm.jump(JGT, hi, yes, eq);
            asm.ld(hi_off)
        }
    }
}

/// One architecture's section; returns its entry point.
fn section(asm: &mut Asm, rets: &mut Returns, arch: Arch, plan: &Plan) -> Label {
    let deny = rets.verdict(asm, Verdict::Errno(EPERM));
    // Where each listed syscall goes: a shared return or its argument checks.
    let mut targets: Vec<(u32, Label)> = Vec::with_capacity(plan.len());
    for (&nr, cases) in plan {
        let mut next = deny;
        for case in cases.iter().rev() {
            let mut t = rets.verdict(asm, case.verdict);
            for c in case.args.iter().rev() {
                t = compare(asm, arch.is_64bit(), *c, t, next);
            }
            next = t;
        }
        targets.push((nr, next));
    }
    // Number ranges [start, next start) with one target each, covering all u32.
    let mut ranges: Vec<(u32, Label)> = vec![(0, deny)];
    for (nr, target) in targets {
        match ranges.last_mut() {
            Some(last) if last.0 == nr => last.1 = target,
            _ => ranges.push((nr, target)),
        }
        if nr < u32::MAX {
            ranges.push((nr + 1, deny));
        }
    }
    ranges.dedup_by(|later, earlier| later.1 == earlier.1);
    let entry = tree(asm, &ranges);
    asm.goto(entry);
    asm.ld(OFF_NR)
}

/// Binary search over `ranges` (sorted by start, the first starting at 0).
fn tree(asm: &mut Asm, ranges: &[(u32, Label)]) -> Label {
    if ranges.len() == 1 {
        return ranges[0].1;
    }
    let mid = ranges.len() / 2;
    let right = tree(asm, &ranges[mid..]);
    let left = tree(asm, &ranges[..mid]);
    asm.jump(JGE, ranges[mid].0, right, left)
}

/// The whole program for `arches`, one plan each.
pub fn compile(sections: &[(Arch, Plan)]) -> Vec<Insn> {
    let mut asm = Asm { rev: Vec::new() };
    let kill = asm.ret(RET_KILL_PROCESS);
    let allow = asm.ret(RET_ALLOW);
    let mut rets = Returns { allow, kill, errno: BTreeMap::new() };
    let entries: Vec<(Arch, Label)> =
        sections.iter().map(|(arch, plan)| (*arch, section(&mut asm, &mut rets, *arch, plan))).collect();
    let mut next = rets.kill;
    for (arch, entry) in entries.iter().rev() {
        next = asm.jump(JEQ, arch.audit(), *entry, next);
    }
    asm.goto(next);
    asm.ld(OFF_ARCH);
    asm.finish()
}
