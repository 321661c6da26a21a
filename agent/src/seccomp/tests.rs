//! The generator checked by running its programs: a small classic-BPF
//! interpreter (what the kernel does with `seccomp_data`), and the kernel's
//! own static checks on a program.

use super::bpf::{RET_ALLOW, RET_ERRNO, RET_KILL_PROCESS};
use super::profile::{self, ArgCmp, Case, CmpOp, Plan, Verdict, AF_ALG, AF_VSOCK, ENOSYS, EPERM};
use super::*;

/// Docker's default capabilities (skiff's, see runtime/spec.rs).
const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

const HOSTS: [&[Arch]; 3] = [&[Arch::X86_64], &[Arch::Aarch64, Arch::Arm], &[Arch::Arm]];

/// What the kernel checks before it accepts a seccomp program
/// (bpf_check_classic + seccomp_check_filter), for what the generator emits.
fn check(p: &[Insn]) {
    assert!(!p.is_empty() && p.len() <= MAX_INSNS, "{} instructions", p.len());
    assert_eq!(p.last().unwrap().code, 0x06, "must end with a return");
    for (pc, i) in p.iter().enumerate() {
        match i.code {
            0x20 => assert!(i.k % 4 == 0 && i.k < 64, "load at {pc}: offset {}", i.k),
            0x54 | 0x06 => {}
            0x05 => assert!(pc + 1 + (i.k as usize) < p.len(), "ja at {pc} leaves the program"),
            0x15 | 0x25 | 0x35 => {
                assert!(pc + 1 + usize::from(i.jt.max(i.jf)) < p.len(), "jump at {pc} leaves the program")
            }
            c => panic!("unexpected opcode {c:#x} at {pc}"),
        }
    }
}

/// Runs `p` on one `seccomp_data` and returns the action.
fn run(p: &[Insn], arch: u32, nr: u32, args: [u64; 6]) -> u32 {
    let mut data = [0u8; 64];
    data[0..4].copy_from_slice(&nr.to_le_bytes());
    data[4..8].copy_from_slice(&arch.to_le_bytes());
    for (i, a) in args.iter().enumerate() {
        data[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_le_bytes());
    }
    let (mut pc, mut acc) = (0usize, 0u32);
    loop {
        let i = p[pc];
        pc += 1;
        let cond = |ok: bool| if ok { usize::from(i.jt) } else { usize::from(i.jf) };
        match i.code {
            0x20 => {
                let o = i.k as usize;
                acc = u32::from_le_bytes([data[o], data[o + 1], data[o + 2], data[o + 3]]);
            }
            0x54 => acc &= i.k,
            0x05 => pc += i.k as usize,
            0x15 => pc += cond(acc == i.k),
            0x25 => pc += cond(acc > i.k),
            0x35 => pc += cond(acc >= i.k),
            0x06 => return i.k,
            c => panic!("unexpected opcode {c:#x}"),
        }
    }
}

fn program(arches: &[Arch], caps: &[&str]) -> Vec<Insn> {
    let p = Filter::compile(arches, CapSet::from_names(caps)).insns().unwrap();
    check(&p);
    p
}

fn nr(arch: Arch, name: &str) -> u32 {
    arch.syscall(name).unwrap_or_else(|| panic!("{name} on {arch:?}"))
}

fn call(p: &[Insn], arch: Arch, name: &str, args: &[u64]) -> u32 {
    let mut a = [0u64; 6];
    a[..args.len()].copy_from_slice(args);
    run(p, arch.audit(), nr(arch, name), a)
}

const EPERM_RET: u32 = RET_ERRNO | EPERM as u32;
const ENOSYS_RET: u32 = RET_ERRNO | ENOSYS as u32;
const CLONE_NEWNS: u64 = 0x0002_0000;
const CLONE_NEWUSER: u64 = 0x1000_0000;
const CLONE_NEWNET: u64 = 0x4000_0000;
/// What glibc's pthread_create passes.
const THREAD_FLAGS: u64 = 0x003D_0F00;
const SIGCHLD: u64 = 17;

/// What a plan says, evaluated directly (the reference for the compiled program).
fn reference(plan: &Plan, wide: bool, nr: u32, args: [u64; 6]) -> u32 {
    let Some(cases) = plan.get(&nr) else { return EPERM_RET };
    for case in cases {
        let holds = case.args.iter().all(|c| {
            let a = if wide && !c.low32 {
                args[usize::from(c.index)]
            } else {
                args[usize::from(c.index)] & 0xFFFF_FFFF
            };
            match c.op {
                CmpOp::Eq(v) => a == v,
                CmpOp::Lt(v) => a < v,
                CmpOp::Gt(v) => a > v,
                CmpOp::MaskedEq { mask, value } => a & mask == value,
            }
        });
        if holds {
            return match case.verdict {
                Verdict::Allow => RET_ALLOW,
                Verdict::Errno(e) => RET_ERRNO | u32::from(e),
            };
        }
    }
    EPERM_RET
}

const PROBES: [u64; 12] =
    [0, 1, 8, 38, 39, 40, 41, 0xFFFF_FFFF, 0x1_0000_0002, CLONE_NEWUSER | SIGCHLD, THREAD_FLAGS, u64::MAX];

#[test]
fn programs_pass_the_kernel_checks_and_follow_the_plan() {
    let cap_sets: [&[&str]; 4] = [&[], DEFAULT_CAPS, &["CAP_SYS_ADMIN"], &["CAP_SYS_PTRACE", "CAP_PERFMON"]];
    for arches in HOSTS {
        for caps in cap_sets {
            let p = program(arches, caps);
            for &arch in arches {
                let plan = profile::resolve(arch, CapSet::from_names(caps));
                for n in (0..600).chain(0xF_0000..0xF_0010).chain([0x4000_0000, u32::MAX]) {
                    for a in PROBES {
                        let args = [a, a, 0, 0, 0, 0];
                        assert_eq!(
                            run(&p, arch.audit(), n, args),
                            reference(&plan, arch.is_64bit(), n, args),
                            "{arch:?} nr {n} arg {a:#x} caps {caps:?}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn default_profile_on_x86_64() {
    let x = Arch::X86_64;
    let p = program(&[x], DEFAULT_CAPS);
    for name in ["read", "write", "execve", "exit_group", "futex", "arch_prctl", "chroot", "rseq"] {
        assert_eq!(call(&p, x, name, &[]), RET_ALLOW, "{name}");
    }
    for name in
        ["mount", "umount2", "unshare", "setns", "keyctl", "add_key", "request_key", "perf_event_open", "bpf"]
    {
        assert_eq!(call(&p, x, name, &[]), EPERM_RET, "{name}");
    }
    assert_eq!(call(&p, x, "reboot", &[]), EPERM_RET);
    assert_eq!(call(&p, x, "clone3", &[]), ENOSYS_RET);
    assert_eq!(call(&p, x, "clone", &[THREAD_FLAGS]), RET_ALLOW);
    assert_eq!(call(&p, x, "clone", &[SIGCHLD]), RET_ALLOW);
    for flag in [CLONE_NEWUSER, CLONE_NEWNS, CLONE_NEWNET] {
        assert_eq!(call(&p, x, "clone", &[SIGCHLD | flag]), EPERM_RET, "{flag:#x}");
    }
    for af in [1, 2, 10, 16, 17, 39, 41, 44] {
        assert_eq!(call(&p, x, "socket", &[af, 1, 0]), RET_ALLOW, "family {af}");
    }
    assert_eq!(call(&p, x, "socket", &[AF_ALG, 5, 0]), EPERM_RET);
    assert_eq!(call(&p, x, "socket", &[AF_VSOCK, 1, 0]), EPERM_RET);
    // The kernel reads an int: a high word does not hide AF_ALG.
    assert_eq!(call(&p, x, "socket", &[AF_ALG | 1 << 32, 5, 0]), EPERM_RET);
    assert_eq!(call(&p, x, "socket", &[2 | 1 << 32, 1, 0]), RET_ALLOW);
    assert_eq!(call(&p, x, "clone", &[CLONE_NEWUSER | 1 << 32]), EPERM_RET);
    for pers in [0, 8, 0x20000, 0x20008, 0xFFFF_FFFF] {
        assert_eq!(call(&p, x, "personality", &[pers]), RET_ALLOW, "{pers:#x}");
    }
    assert_eq!(call(&p, x, "personality", &[0x0040_0000]), EPERM_RET, "READ_IMPLIES_EXEC");
    // x32 calls (bit 30) and i386 calls are not allowed on an x86_64 host.
    assert_eq!(run(&p, x.audit(), 0x4000_0000, [0; 6]), EPERM_RET);
    assert_eq!(run(&p, 0x4000_0003, 3, [0; 6]), RET_KILL_PROCESS);
    assert_eq!(run(&p, Arch::Aarch64.audit(), 63, [0; 6]), RET_KILL_PROCESS);
    // Without CAP_SYS_CHROOT, no chroot.
    let none = program(&[x], &[]);
    assert_eq!(call(&none, x, "chroot", &[]), EPERM_RET);
}

#[test]
fn capabilities_open_their_groups() {
    let x = Arch::X86_64;
    let admin = program(&[x], &["CAP_SYS_ADMIN"]);
    assert_eq!(call(&admin, x, "clone", &[CLONE_NEWUSER | SIGCHLD]), RET_ALLOW);
    assert_eq!(call(&admin, x, "clone3", &[]), RET_ALLOW);
    assert_eq!(call(&admin, x, "mount", &[]), RET_ALLOW);
    assert_eq!(call(&admin, x, "unshare", &[]), RET_ALLOW);
    assert_eq!(call(&admin, x, "keyctl", &[]), EPERM_RET, "keyctl is never allowed");
    let tracer = program(&[x], &["CAP_SYS_PTRACE", "CAP_SYS_TIME"]);
    assert_eq!(call(&tracer, x, "kcmp", &[]), RET_ALLOW);
    assert_eq!(call(&tracer, x, "clock_settime", &[]), RET_ALLOW);
    assert_eq!(call(&tracer, x, "mount", &[]), EPERM_RET);
    let plain = program(&[x], DEFAULT_CAPS);
    assert_eq!(call(&plain, x, "kcmp", &[]), EPERM_RET);
    assert_eq!(call(&plain, x, "ptrace", &[]), RET_ALLOW, "ptrace is allowed from kernel 4.8 on");
    assert_eq!(CapSet::from_names(DEFAULT_CAPS).names(), ["CAP_SYS_CHROOT"]);
}

#[test]
fn aarch64_host_checks_armhf_calls_on_their_own() {
    let (a64, a32) = (Arch::Aarch64, Arch::Arm);
    let p = program(&[a64, a32], DEFAULT_CAPS);
    assert_eq!(call(&p, a64, "read", &[]), RET_ALLOW);
    assert_eq!(run(&p, a64.audit(), 63, [0; 6]), RET_ALLOW, "read is 63 on aarch64");
    assert_eq!(run(&p, a32.audit(), 3, [0; 6]), RET_ALLOW, "read is 3 on arm");
    // 281 is socket on arm, something else (not allowed) on aarch64.
    assert_eq!(run(&p, a32.audit(), 281, [2, 1, 0, 0, 0, 0]), RET_ALLOW);
    for arch in [a64, a32] {
        assert_eq!(call(&p, arch, "socket", &[AF_ALG]), EPERM_RET, "{arch:?}");
        assert_eq!(call(&p, arch, "socket", &[AF_VSOCK]), EPERM_RET, "{arch:?}");
        assert_eq!(call(&p, arch, "clone", &[SIGCHLD | CLONE_NEWUSER]), EPERM_RET, "{arch:?}");
        assert_eq!(call(&p, arch, "clone", &[THREAD_FLAGS]), RET_ALLOW, "{arch:?}");
        assert_eq!(call(&p, arch, "clone3", &[]), ENOSYS_RET, "{arch:?}");
        for name in ["unshare", "mount", "keyctl", "add_key", "perf_event_open"] {
            assert_eq!(call(&p, arch, name, &[]), EPERM_RET, "{name} on {arch:?}");
        }
    }
    // What armhf libcs need: TLS set-up, cache flushes, time64 calls.
    for name in ["set_tls", "cacheflush", "clock_gettime64", "futex_time64", "_llseek", "mmap2", "fstat64"] {
        assert_eq!(call(&p, a32, name, &[]), RET_ALLOW, "{name}");
    }
    // The arm numbers beyond the table and x86_64 calls are not let through.
    assert_eq!(run(&p, a32.audit(), 0xF_0006, [0; 6]), EPERM_RET, "get_tls is not in the profile");
    assert_eq!(run(&p, Arch::X86_64.audit(), 0, [0; 6]), RET_KILL_PROCESS);
    // An armv7 host has the arm section alone.
    let v7 = program(&[a32], DEFAULT_CAPS);
    assert_eq!(call(&v7, a32, "set_tls", &[]), RET_ALLOW);
    assert_eq!(run(&v7, a64.audit(), 63, [0; 6]), RET_KILL_PROCESS);
}

#[test]
fn every_profile_name_is_known_somewhere_or_listed_here() {
    // Names of architectures skiff does not run on, or calls these three lack.
    const ELSEWHERE: &[&str] = &[
        "fadvise64_64",
        "ipc",
        "riscv_flush_icache",
        "riscv_hwprobe",
        "s390_pci_mmio_read",
        "s390_pci_mmio_write",
        "s390_runtime_instr",
        "socketcall",
        "stime",
        "swapcontext",
        "sync_file_range2",
        "umount",
        "waitpid",
    ];
    let all = [Arch::X86_64, Arch::Aarch64, Arch::Arm];
    for name in profile::all_names() {
        let known = all.iter().any(|a| a.syscall(name).is_some());
        assert_eq!(known, !ELSEWHERE.contains(&name), "{name}");
    }
    for arch in all {
        let t = arch.table();
        assert!(t.windows(2).all(|w| w[0].0 < w[1].0), "{arch:?} table must be sorted");
    }
}

#[test]
fn long_jumps_go_through_trampolines() {
    // 160 syscalls with argument checks push shared returns far out of reach
    // of 8-bit jump offsets.
    let mut plan = Plan::new();
    for n in 0..200u32 {
        let cmp = |op| ArgCmp { index: (n % 6) as u8, op, low32: n % 7 == 0 };
        let cases = vec![
            Case { args: vec![cmp(CmpOp::Eq(u64::from(n) << 20))], verdict: Verdict::Allow },
            Case { args: vec![cmp(CmpOp::Gt(1 << 40)), cmp(CmpOp::Lt(1 << 41))], verdict: Verdict::Errno(7) },
        ];
        if n % 5 != 0 {
            plan.insert(n * 3, cases);
        }
    }
    for arch in [Arch::X86_64, Arch::Arm] {
        let p = bpf::compile(&[(arch, plan.clone())]);
        check(&p);
        assert!(p.iter().any(|i| i.code == 0x05), "expected trampolines");
        for n in 0..620u32 {
            for a in [0, 1, u64::from(n / 3) << 20, (1 << 40) + 5, 1 << 41] {
                let args = [a; 6];
                assert_eq!(
                    run(&p, arch.audit(), n, args),
                    reference(&plan, arch.is_64bit(), n, args),
                    "{arch:?} {n} {a:#x}"
                );
            }
        }
    }
}

#[test]
fn filters_travel_as_text() {
    let f = Filter::compile(&[Arch::Aarch64, Arch::Arm], CapSet::from_names(DEFAULT_CAPS));
    let json = serde_json::to_string(&f).unwrap();
    let back: Filter = serde_json::from_str(&json).unwrap();
    assert_eq!(back, f);
    assert!(back.insns().unwrap().len() < 1024, "{} instructions", back.insns().unwrap().len());
    let bad = Filter { caps: f.caps, program: "00112233445566".into() };
    assert_eq!(bad.insns(), Err(FilterError::Encoding));
    let empty = Filter { caps: f.caps, program: String::new() };
    assert_eq!(empty.insns(), Err(FilterError::Length(0)));
}
