//! Device rules on cgroup v2: the `BPF_PROG_TYPE_CGROUP_DEVICE` program built
//! from the spec's `linux.resources.devices`, loaded and attached to the
//! container's cgroup with raw `bpf(2)` calls (no libbpf), and detached again.
//!
//! Why here: libcontainer 0.7 builds such a program only with its
//! `cgroupsv2_devices` feature, which links libbpf (C); without it v2 device
//! rules are silently not enforced. On cgroup v1 libcontainer writes
//! `devices.allow`/`devices.deny` and this module is not used.
//!
//! Contract:
//! - The rules are the spec's list followed by `STANDARD`, the rules
//!   libcontainer adds on v1 (so both versions allow the same devices). The
//!   spec's list must start with the deny-all rule: the program's default
//!   answer is deny, and a list that starts from "allow all" is refused.
//! - Later rules win, as writes to v1's `devices.allow`/`deny` do. An allow rule
//!   decides only when it covers every requested access; a deny rule decides
//!   when it covers any of them. So an access that only several allow rules
//!   cover together is refused (stricter than v1, never looser).
//! - Building the program (`Program::build`) is pure; `attach` and
//!   `detach_all` are the only I/O, through `crate::sys::bpf`.
//! - A start never goes on without the program: every failure is an error
//!   naming what the kernel refused.

use serde_json::Value;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

/// Device type of a rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    All,
    Char,
    Block,
}

/// Access bits as the kernel passes them (`BPF_DEVCG_ACC_*`).
pub const MKNOD: u8 = 1;
pub const READ: u8 = 2;
pub const WRITE: u8 = 4;
const RWM: u8 = MKNOD | READ | WRITE;

/// Device type as the kernel passes it (`BPF_DEVCG_DEV_*`).
const DEV_BLOCK: i32 = 1;
const DEV_CHAR: i32 = 2;

/// One rule of the device list. `None` for major or minor is `*`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rule {
    pub allow: bool,
    pub kind: Kind,
    pub major: Option<u32>,
    pub minor: Option<u32>,
    pub access: u8,
}

const fn allow(kind: Kind, major: Option<u32>, minor: Option<u32>, access: u8) -> Rule {
    Rule { allow: true, kind, major, minor, access }
}

/// What libcontainer 0.7 allows on top of the spec's list on cgroup v1
/// (libcgroups `default_devices` and `default_allow_devices`): mknod of any
/// node (opening it is another matter), null, zero, full, tty, urandom,
/// random, console, ptmx, the pts and tun/tap.
pub const STANDARD: &[Rule] = &[
    allow(Kind::Char, Some(1), Some(3), RWM),
    allow(Kind::Char, Some(1), Some(5), RWM),
    allow(Kind::Char, Some(1), Some(7), RWM),
    allow(Kind::Char, Some(5), Some(0), RWM),
    allow(Kind::Char, Some(1), Some(9), RWM),
    allow(Kind::Char, Some(1), Some(8), RWM),
    allow(Kind::Char, None, None, MKNOD),
    allow(Kind::Block, None, None, MKNOD),
    allow(Kind::Char, Some(5), Some(1), RWM),
    allow(Kind::Char, Some(136), None, RWM),
    allow(Kind::Char, Some(5), Some(2), RWM),
    allow(Kind::Char, Some(10), Some(200), RWM),
];

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("linux.resources.devices[{index}]: {reason}")]
    BadRule { index: usize, reason: String },
    #[error("linux.resources.devices must start with the deny-all rule")]
    NotDenyAll,
    #[error("loading the cgroup v2 device program: {source}{}{}", refusal_hint(.source), verifier_log(.log))]
    Load { source: std::io::Error, log: String },
    #[error("attaching the device program to cgroup {}: {source}{}", .path.display(), refusal_hint(.source))]
    Attach { path: PathBuf, source: std::io::Error },
    #[error("detaching the device programs of cgroup {}: {source}", .path.display())]
    Detach { path: PathBuf, source: std::io::Error },
}

fn verifier_log(log: &str) -> String {
    if log.is_empty() {
        String::new()
    } else {
        format!("; verifier: {log}")
    }
}

/// The fix for a host that refuses bpf(2); skiff does not run apps without
/// their device rules.
fn refusal_hint(e: &std::io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::ENOSYS) => {
            " (the agent must run as root with bpf(2) allowed (CAP_SYS_ADMIN or CAP_BPF, no seccomp \
             or LSM rule against bpf) on a kernel built with CONFIG_BPF_SYSCALL and CONFIG_CGROUP_BPF; \
             apps are not started without their device rules)"
        }
        _ => "",
    }
}

/// The rules the program enforces: the spec's `linux.resources.devices`,
/// then `STANDARD`.
pub fn rules_of_spec(spec: &Value) -> Result<Vec<Rule>, DeviceError> {
    let list = spec["linux"]["resources"]["devices"].as_array().map(Vec::as_slice).unwrap_or_default();
    let mut rules = list.iter().enumerate().map(|(i, r)| rule_of(i, r)).collect::<Result<Vec<_>, _>>()?;
    match rules.first() {
        Some(r)
            if !r.allow
                && r.kind == Kind::All
                && r.major.is_none()
                && r.minor.is_none()
                && r.access == RWM => {}
        _ => return Err(DeviceError::NotDenyAll),
    }
    rules.extend_from_slice(STANDARD);
    Ok(rules)
}

fn rule_of(index: usize, v: &Value) -> Result<Rule, DeviceError> {
    let bad = |reason: String| DeviceError::BadRule { index, reason };
    let allow = v["allow"].as_bool().ok_or_else(|| bad("`allow` must be true or false".into()))?;
    let kind = match v.get("type").map(|t| t.as_str()) {
        None | Some(Some("a")) => Kind::All,
        Some(Some("c")) | Some(Some("u")) => Kind::Char,
        Some(Some("b")) => Kind::Block,
        Some(t) => return Err(bad(format!("unknown type {t:?}"))),
    };
    let number = |key: &str| -> Result<Option<u32>, DeviceError> {
        match v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(n) => match n.as_i64() {
                Some(-1) => Ok(None),
                // The program compares with a 32-bit immediate, sign-extended.
                Some(n) if (0..=i64::from(i32::MAX)).contains(&n) => Ok(Some(n as u32)),
                _ => Err(bad(format!("`{key}` {n} is not a device number"))),
            },
        }
    };
    let (major, minor) = (number("major")?, number("minor")?);
    let access = match v.get("access").map(|a| a.as_str()) {
        None => RWM,
        Some(Some(s)) => {
            let mut bits = 0;
            for c in s.chars() {
                bits |= match c {
                    'r' => READ,
                    'w' => WRITE,
                    'm' => MKNOD,
                    _ => return Err(bad(format!("unknown access {c:?} in {s:?}"))),
                };
            }
            bits
        }
        Some(None) => return Err(bad("`access` must be a string".into())),
    };
    Ok(Rule { allow, kind, major, minor, access })
}

/// One eBPF instruction (`struct bpf_insn`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    pub code: u8,
    pub dst: u8,
    pub src: u8,
    pub off: i16,
    pub imm: i32,
}

// The opcodes the program uses (linux/bpf.h, bpf_common.h).
const LDX_MEM_W: u8 = 0x61; // dst = *(u32 *)(src + off)
const ALU_AND_K: u8 = 0x54; // dst32 &= imm
const ALU_RSH_K: u8 = 0x74; // dst32 >>= imm
const ALU_MOV_K: u8 = 0xb4; // dst32 = imm
const ALU_MOV_X: u8 = 0xbc; // dst32 = src32
const JMP_JEQ_K: u8 = 0x15; // if dst == imm: pc += off
const JMP_JNE_K: u8 = 0x55; // if dst != imm: pc += off
const JMP_JNE_X: u8 = 0x5d; // if dst != src: pc += off
const JMP_EXIT: u8 = 0x95;

// Registers: r1 the context (then scratch), r2 type, r3 access, r4 major, r5 minor.
const R0: u8 = 0;
const R1: u8 = 1;
const R2: u8 = 2;
const R3: u8 = 3;
const R4: u8 = 4;
const R5: u8 = 5;

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn { code, dst, src, off, imm }
}

impl Insn {
    /// The kernel's layout: code, the two 4-bit registers (a C bit-field, so
    /// their order follows the byte order), offset, immediate.
    pub fn to_bytes(self) -> [u8; 8] {
        let regs = if cfg!(target_endian = "little") {
            (self.dst & 0xf) | (self.src << 4)
        } else {
            (self.dst << 4) | (self.src & 0xf)
        };
        let mut b = [0u8; 8];
        b[0] = self.code;
        b[1] = regs;
        b[2..4].copy_from_slice(&self.off.to_ne_bytes());
        b[4..8].copy_from_slice(&self.imm.to_ne_bytes());
        b
    }
}

/// A device program: answers 1 (allow) or 0 (deny, the open or mknod fails
/// with EPERM) for a (type, major, minor, access) request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Program {
    pub insns: Vec<Insn>,
}

impl Program {
    /// Compiles `rules` (see the module contract). Each rule becomes a block
    /// of tests, each jumping past the block when it fails, then `return allow`.
    /// The blocks run from the last rule to the first; nothing matched: deny.
    pub fn build(rules: &[Rule]) -> Program {
        let mut insns = vec![
            insn(LDX_MEM_W, R2, R1, 0, 0),
            insn(ALU_AND_K, R2, 0, 0, 0xffff),
            insn(LDX_MEM_W, R3, R1, 0, 0),
            insn(ALU_RSH_K, R3, 0, 0, 16),
            insn(LDX_MEM_W, R4, R1, 4, 0),
            insn(LDX_MEM_W, R5, R1, 8, 0),
        ];
        for rule in rules.iter().rev() {
            // Each test is a few instructions whose last one jumps past the
            // block (offset patched once the block's length is known).
            let mut tests: Vec<Vec<Insn>> = Vec::new();
            match rule.kind {
                Kind::All => {}
                Kind::Char => tests.push(vec![insn(JMP_JNE_K, R2, 0, 0, DEV_CHAR)]),
                Kind::Block => tests.push(vec![insn(JMP_JNE_K, R2, 0, 0, DEV_BLOCK)]),
            }
            if rule.access & RWM != RWM {
                let last = if rule.allow {
                    // Every requested bit must be in the rule's access.
                    insn(JMP_JNE_X, R1, R3, 0, 0)
                } else {
                    // Any requested bit in the rule's access.
                    insn(JMP_JEQ_K, R1, 0, 0, 0)
                };
                tests.push(vec![
                    insn(ALU_MOV_X, R1, R3, 0, 0),
                    insn(ALU_AND_K, R1, 0, 0, i32::from(rule.access & RWM)),
                    last,
                ]);
            }
            if let Some(m) = rule.major {
                tests.push(vec![insn(JMP_JNE_K, R4, 0, 0, m as i32)]);
            }
            if let Some(m) = rule.minor {
                tests.push(vec![insn(JMP_JNE_K, R5, 0, 0, m as i32)]);
            }
            let unconditional = tests.is_empty();
            let mut block: Vec<Insn> = tests.into_iter().flatten().collect();
            block.push(insn(ALU_MOV_K, R0, 0, 0, i32::from(rule.allow)));
            block.push(insn(JMP_EXIT, 0, 0, 0, 0));
            let len = block.len();
            for (i, ins) in block.iter_mut().enumerate() {
                if matches!(ins.code, JMP_JNE_K | JMP_JNE_X | JMP_JEQ_K) {
                    // Past the block: the rest of it after this instruction.
                    ins.off = (len - i - 1) as i16;
                }
            }
            insns.extend(block);
            if unconditional {
                // Matches everything: the earlier rules are never reached.
                return Program { insns };
            }
        }
        insns.push(insn(ALU_MOV_K, R0, 0, 0, 0));
        insns.push(insn(JMP_EXIT, 0, 0, 0, 0));
        Program { insns }
    }

    pub fn bytes(&self) -> Vec<u8> {
        self.insns.iter().flat_map(|i| i.to_bytes()).collect()
    }
}

/// Loads `program` and attaches it to the cgroup directory `cgroup` (next to
/// any program already there: `BPF_F_ALLOW_MULTI`, every one must allow).
/// The program stays attached after the returned fd is closed; it goes with
/// `detach_all` or with the cgroup.
pub fn attach(cgroup: &Path, program: &Program) -> Result<OwnedFd, DeviceError> {
    let prog = crate::sys::bpf::load_cgroup_device(&program.bytes(), c"Apache-2.0")
        .map_err(|(source, log)| DeviceError::Load { source, log })?;
    let attach_err = |source| DeviceError::Attach { path: cgroup.to_path_buf(), source };
    let dir = open_dir(cgroup).map_err(attach_err)?;
    crate::sys::bpf::attach_cgroup_device(dir.as_fd(), prog.as_fd()).map_err(attach_err)?;
    Ok(prog)
}

/// The ids of the device programs attached to the cgroup directory `cgroup`.
pub fn attached(cgroup: &Path) -> std::io::Result<Vec<u32>> {
    crate::sys::bpf::query_cgroup_device(open_dir(cgroup)?.as_fd())
}

/// Detaches every device program from the cgroup directory `cgroup`; returns
/// how many there were.
pub fn detach_all(cgroup: &Path) -> Result<usize, DeviceError> {
    let err = |source| DeviceError::Detach { path: cgroup.to_path_buf(), source };
    let dir = open_dir(cgroup).map_err(err)?;
    let ids = crate::sys::bpf::query_cgroup_device(dir.as_fd()).map_err(err)?;
    for id in &ids {
        let prog = crate::sys::bpf::prog_fd_by_id(*id).map_err(err)?;
        crate::sys::bpf::detach_cgroup_device(dir.as_fd(), prog.as_fd()).map_err(err)?;
    }
    Ok(ids.len())
}

fn open_dir(path: &Path) -> std::io::Result<OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY).open(path)?;
    Ok(OwnedFd::from(f))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Runs `p` on one request the way the kernel would, for the opcodes the
    /// builder emits (anything else fails the test).
    fn run(p: &Program, dev_type: i32, major: u32, minor: u32, access: u8) -> u64 {
        let ctx: [u32; 3] = [((access as u32) << 16) | dev_type as u32, major, minor];
        let mut r = [0u64; 11];
        let mut pc = 0usize;
        for _ in 0..10_000 {
            let i = p.insns[pc];
            let (d, s) = (i.dst as usize, i.src as usize);
            let imm = i.imm as i64 as u64;
            let jump = |taken: bool| if taken { i.off as isize } else { 0 };
            let mut next = 1isize;
            match i.code {
                LDX_MEM_W => {
                    assert_eq!(s, 1, "loads only from the context");
                    r[d] = u64::from(ctx[(i.off / 4) as usize]);
                }
                ALU_AND_K => r[d] = (r[d] as u32 & i.imm as u32) as u64,
                ALU_RSH_K => r[d] = (r[d] as u32 >> i.imm) as u64,
                ALU_MOV_K => r[d] = i.imm as u32 as u64,
                ALU_MOV_X => r[d] = r[s] as u32 as u64,
                JMP_JEQ_K => next += jump(r[d] == imm),
                JMP_JNE_K => next += jump(r[d] != imm),
                JMP_JNE_X => next += jump(r[d] != r[s]),
                JMP_EXIT => return r[0],
                c => panic!("opcode {c:#x} at {pc}"),
            }
            pc = (pc as isize + next) as usize;
        }
        panic!("no exit");
    }

    fn spec(devices: Value) -> Value {
        json!({"linux": {"resources": {"devices": devices}}})
    }

    const C: i32 = DEV_CHAR;
    const B: i32 = DEV_BLOCK;

    #[test]
    fn the_default_app_gets_the_standard_devices_and_mknod_only() {
        let rules = rules_of_spec(&spec(json!([{"allow": false, "access": "rwm"}]))).unwrap();
        let p = Program::build(&rules);
        let table: &[(i32, u32, u32, u8, u64)] = &[
            (C, 1, 3, READ | WRITE, 1),   // null
            (C, 1, 5, READ, 1),           // zero
            (C, 1, 7, WRITE, 1),          // full
            (C, 1, 8, READ, 1),           // random
            (C, 1, 9, READ, 1),           // urandom
            (C, 5, 0, READ | WRITE, 1),   // tty
            (C, 5, 1, WRITE, 1),          // console
            (C, 5, 2, READ | WRITE, 1),   // ptmx
            (C, 136, 7, READ | WRITE, 1), // a pts
            (C, 10, 200, READ, 1),        // tun
            (C, 1, 1, MKNOD, 1),          // mknod of anything
            (B, 8, 0, MKNOD, 1),
            (C, 1, 1, READ, 0),   // /dev/mem
            (C, 1, 11, WRITE, 0), // kmsg
            (C, 1, 1, MKNOD | READ, 0),
            (B, 8, 0, READ, 0),
            (B, 1, 3, READ, 0), // a block device with null's numbers
            (C, 10, 237, READ, 0),
            (C, 4, 64, READ | WRITE, 0),
        ];
        for &(t, major, minor, access, want) in table {
            assert_eq!(run(&p, t, major, minor, access), want, "{t} {major}:{minor} access {access}");
        }
    }

    #[test]
    fn listed_devices_are_allowed_and_later_rules_win() {
        let s = spec(json!([
            {"allow": false, "access": "rwm"},
            {"allow": true, "type": "c", "major": 1, "minor": 11, "access": "rwm"},
            {"allow": true, "type": "b", "major": 8, "access": "r"},
            {"allow": true, "type": "c", "major": 4, "minor": 64, "access": "rw"},
            {"allow": false, "type": "c", "major": 4, "minor": 64, "access": "w"},
        ]));
        let p = Program::build(&rules_of_spec(&s).unwrap());
        assert_eq!(run(&p, C, 1, 11, WRITE), 1);
        assert_eq!(run(&p, C, 1, 11, READ | WRITE), 1);
        assert_eq!(run(&p, C, 1, 12, WRITE), 0);
        assert_eq!(run(&p, B, 8, 3, READ), 1, "any minor");
        assert_eq!(run(&p, B, 8, 3, READ | WRITE), 0, "write not allowed");
        assert_eq!(run(&p, C, 8, 3, READ), 0, "type matters");
        assert_eq!(run(&p, C, 4, 64, READ), 1);
        assert_eq!(run(&p, C, 4, 64, WRITE), 0, "the later deny wins");
        assert_eq!(run(&p, C, 4, 64, READ | WRITE), 0);
        assert_eq!(run(&p, C, 4, 64, MKNOD), 1, "the standard mknod rule");
        // An allow-all at the end makes everything before it dead code.
        let open = spec(json!([{"allow": false, "access": "rwm"}, {"allow": true, "access": "rwm"}]));
        let rules: Vec<Rule> = rules_of_spec(&open).unwrap()[..2].to_vec();
        let p = Program::build(&rules);
        assert_eq!(p.insns.len(), 6 + 2);
        assert_eq!(run(&p, B, 8, 0, READ | WRITE), 1);
    }

    #[test]
    fn bad_lists_are_refused() {
        assert!(matches!(rules_of_spec(&spec(json!([]))), Err(DeviceError::NotDenyAll)));
        assert!(matches!(rules_of_spec(&json!({})), Err(DeviceError::NotDenyAll)));
        let allow_first = spec(json!([{"allow": true, "access": "rwm"}, {"allow": false, "access": "rwm"}]));
        assert!(matches!(rules_of_spec(&allow_first), Err(DeviceError::NotDenyAll)));
        let partial = spec(json!([{"allow": false, "access": "rw"}]));
        assert!(matches!(rules_of_spec(&partial), Err(DeviceError::NotDenyAll)));
        for (bad, what) in [
            (json!({"allow": true, "type": "x"}), "unknown type"),
            (json!({"allow": true, "type": "c", "access": "rwx"}), "unknown access"),
            (json!({"allow": true, "type": "c", "major": -2}), "not a device number"),
            (json!({"allow": true, "type": "c", "minor": 1u64 << 32}), "not a device number"),
            (json!({"type": "c"}), "`allow`"),
        ] {
            let err = rules_of_spec(&spec(json!([{"allow": false, "access": "rwm"}, bad]))).unwrap_err();
            assert!(err.to_string().starts_with("linux.resources.devices[1]: "), "{err}");
            assert!(err.to_string().contains(what), "{err}");
        }
        // -1 and a missing number are both "any".
        let any = spec(
            json!([{"allow": false, "access": "rwm"}, {"allow": true, "type": "c", "major": -1, "minor": 3}]),
        );
        assert_eq!(rules_of_spec(&any).unwrap()[1], allow(Kind::Char, None, Some(3), RWM));
    }

    #[test]
    fn a_host_refusing_bpf_gets_the_fix_named() {
        let e =
            DeviceError::Load { source: std::io::Error::from_raw_os_error(libc::EPERM), log: String::new() };
        let msg = e.to_string();
        assert!(msg.starts_with("loading the cgroup v2 device program: Operation not permitted"), "{msg}");
        assert!(msg.contains("CAP_BPF") && msg.contains("CONFIG_CGROUP_BPF"), "{msg}");
        assert!(msg.contains("not started without their device rules"), "{msg}");
        let e = DeviceError::Load {
            source: std::io::Error::from_raw_os_error(libc::EINVAL),
            log: "R0 !read_ok".into(),
        };
        assert_eq!(
            e.to_string(),
            "loading the cgroup v2 device program: Invalid argument (os error 22); verifier: R0 !read_ok"
        );
        let e = DeviceError::Attach {
            path: "/sys/fs/cgroup/skiff/web".into(),
            source: std::io::Error::from_raw_os_error(libc::EACCES),
        };
        assert!(e
            .to_string()
            .starts_with("attaching the device program to cgroup /sys/fs/cgroup/skiff/web: "));
        assert!(e.to_string().contains("CONFIG_CGROUP_BPF"));
    }

    #[test]
    fn instructions_have_the_kernel_layout() {
        let i = insn(LDX_MEM_W, R4, R1, 4, 0).to_bytes();
        if cfg!(target_endian = "little") {
            assert_eq!(i, [0x61, 0x14, 4, 0, 0, 0, 0, 0]);
        }
        let j = insn(JMP_JNE_K, R5, 0, 3, 200).to_bytes();
        assert_eq!(j[0], 0x55);
        assert_eq!(i16::from_ne_bytes([j[2], j[3]]), 3);
        assert_eq!(i32::from_ne_bytes([j[4], j[5], j[6], j[7]]), 200);
        let p = Program::build(STANDARD);
        assert_eq!(p.bytes().len(), p.insns.len() * 8);
        // Every jump lands inside the program and every path ends in exit.
        for (pc, i) in p.insns.iter().enumerate() {
            if matches!(i.code, JMP_JNE_K | JMP_JNE_X | JMP_JEQ_K) {
                assert!(pc + 1 + (i.off as usize) < p.insns.len());
            }
        }
        assert_eq!(p.insns.last().unwrap().code, JMP_EXIT);
    }
}
