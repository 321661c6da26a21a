//! Docker's default seccomp profile as data (moby/profiles `seccomp/default.json`,
//! 2026-06, Apache-2.0), for the architectures skiff runs on. No I/O, no BPF:
//! `resolve` turns the rules and an app's capabilities into one verdict plan
//! per syscall, which `bpf.rs` compiles.
//!
//! Differences from Docker, on purpose: no s390/ppc/mips/riscv rules (skiff
//! does not run there); i386 and x32 calls on x86_64 hosts are not allowed
//! (Docker allows them; skiff's x86_64 builds are for development and CI);
//! the ptrace group that Docker adds from kernel 4.8 on is always in (older
//! kernels are not supported).

use super::Arch;

/// Compares syscall argument `index`: the full 64 bits on 64-bit
/// architectures unless `low32`, the low 32 bits on 32-bit ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArgCmp {
    pub index: u8,
    pub op: CmpOp,
    /// The kernel reads only the low 32 bits of this argument (an `int`), so
    /// only they are compared. libseccomp (and so Docker) compares all 64:
    /// `socket(AF_ALG | 1 << 32, ..)` passes Docker's `domain > AF_VSOCK`
    /// rule on x86_64 and the kernel then makes an AF_ALG socket.
    pub low32: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmpOp {
    Eq(u64),
    /// Unsigned.
    Lt(u64),
    /// Unsigned.
    Gt(u64),
    /// `arg & mask == value`.
    MaskedEq {
        mask: u64,
        value: u64,
    },
}

/// What a matching rule does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Errno(u16),
}

pub const EPERM: u16 = 1;
pub const ENOSYS: u16 = 38;

/// Capabilities that change the profile, as bits of `CapSet`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cap {
    SysAdmin,
    SysBoot,
    SysChroot,
    SysModule,
    SysPacct,
    SysPtrace,
    SysRawio,
    SysTime,
    SysTtyConfig,
    SysNice,
    Syslog,
    Bpf,
    Perfmon,
    DacReadSearch,
}

impl Cap {
    const ALL: [(Cap, &'static str); 14] = [
        (Cap::SysAdmin, "CAP_SYS_ADMIN"),
        (Cap::SysBoot, "CAP_SYS_BOOT"),
        (Cap::SysChroot, "CAP_SYS_CHROOT"),
        (Cap::SysModule, "CAP_SYS_MODULE"),
        (Cap::SysPacct, "CAP_SYS_PACCT"),
        (Cap::SysPtrace, "CAP_SYS_PTRACE"),
        (Cap::SysRawio, "CAP_SYS_RAWIO"),
        (Cap::SysTime, "CAP_SYS_TIME"),
        (Cap::SysTtyConfig, "CAP_SYS_TTY_CONFIG"),
        (Cap::SysNice, "CAP_SYS_NICE"),
        (Cap::Syslog, "CAP_SYSLOG"),
        (Cap::Bpf, "CAP_BPF"),
        (Cap::Perfmon, "CAP_PERFMON"),
        (Cap::DacReadSearch, "CAP_DAC_READ_SEARCH"),
    ];
}

/// The profile-relevant part of a capability set: two apps with the same
/// `CapSet` get the same filter.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct CapSet(u16);

impl CapSet {
    /// From capability names as the OCI spec writes them (`CAP_SYS_ADMIN`);
    /// names the profile does not care about are ignored.
    pub fn from_names<S: AsRef<str>>(names: &[S]) -> CapSet {
        let mut bits = 0u16;
        for n in names {
            if let Some(i) = Cap::ALL.iter().position(|(_, name)| *name == n.as_ref()) {
                bits |= 1 << i;
            }
        }
        CapSet(bits)
    }

    pub fn has(self, cap: Cap) -> bool {
        let i = Cap::ALL.iter().position(|(c, _)| *c == cap).unwrap_or(0);
        self.0 & (1 << i) != 0
    }

    pub fn names(self) -> Vec<&'static str> {
        Cap::ALL.iter().enumerate().filter(|(i, _)| self.0 & (1 << i) != 0).map(|(_, (_, n))| *n).collect()
    }
}

/// Every syscall name the profile mentions (for tests).
#[cfg(test)]
pub fn all_names() -> Vec<&'static str> {
    RULES.iter().flat_map(|r| r.names.iter().copied()).collect()
}

/// One rule of the profile.
struct Rule {
    names: &'static [&'static str],
    verdict: Verdict,
    /// All must hold.
    args: &'static [ArgCmp],
    /// Only on these architectures (empty: all).
    arches: &'static [Arch],
    /// Only when the app has this capability.
    with_cap: Option<Cap>,
    /// Only when the app lacks this capability.
    without_cap: Option<Cap>,
}

const fn allow(names: &'static [&'static str]) -> Rule {
    Rule { names, verdict: Verdict::Allow, args: &[], arches: &[], with_cap: None, without_cap: None }
}

const fn allow_if(names: &'static [&'static str], args: &'static [ArgCmp]) -> Rule {
    Rule { names, verdict: Verdict::Allow, args, arches: &[], with_cap: None, without_cap: None }
}

const fn allow_on(names: &'static [&'static str], arches: &'static [Arch]) -> Rule {
    Rule { names, verdict: Verdict::Allow, args: &[], arches, with_cap: None, without_cap: None }
}

const fn allow_with(names: &'static [&'static str], cap: Cap) -> Rule {
    Rule { names, verdict: Verdict::Allow, args: &[], arches: &[], with_cap: Some(cap), without_cap: None }
}

/// socket's domain and personality's persona are ints; clone uses the low 32
/// bits of its flags (the rest are clone3's).
const fn arg0(op: CmpOp) -> ArgCmp {
    ArgCmp { index: 0, op, low32: true }
}

/// Namespace flags of clone(2): CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC |
/// NEWUSER | NEWPID | NEWNET.
pub const CLONE_NS_MASK: u64 = 0x7E02_0000;
pub const AF_ALG: u64 = 38;
pub const AF_VSOCK: u64 = 40;

/// Allowed unconditionally on every architecture that has them.
const ALLOWED: &[&str] = &[
    "accept",
    "accept4",
    "access",
    "adjtimex",
    "alarm",
    "bind",
    "brk",
    "cachestat",
    "capget",
    "capset",
    "chdir",
    "chmod",
    "chown",
    "chown32",
    "clock_adjtime",
    "clock_adjtime64",
    "clock_getres",
    "clock_getres_time64",
    "clock_gettime",
    "clock_gettime64",
    "clock_nanosleep",
    "clock_nanosleep_time64",
    "close",
    "close_range",
    "connect",
    "copy_file_range",
    "creat",
    "dup",
    "dup2",
    "dup3",
    "epoll_create",
    "epoll_create1",
    "epoll_ctl",
    "epoll_ctl_old",
    "epoll_pwait",
    "epoll_pwait2",
    "epoll_wait",
    "epoll_wait_old",
    "eventfd",
    "eventfd2",
    "execve",
    "execveat",
    "exit",
    "exit_group",
    "faccessat",
    "faccessat2",
    "fadvise64",
    "fadvise64_64",
    "fallocate",
    "fanotify_mark",
    "fchdir",
    "fchmod",
    "fchmodat",
    "fchmodat2",
    "fchown",
    "fchown32",
    "fchownat",
    "fcntl",
    "fcntl64",
    "fdatasync",
    "fgetxattr",
    "flistxattr",
    "flock",
    "fork",
    "fremovexattr",
    "fsetxattr",
    "fstat",
    "fstat64",
    "fstatat64",
    "fstatfs",
    "fstatfs64",
    "fsync",
    "ftruncate",
    "ftruncate64",
    "futex",
    "futex_requeue",
    "futex_time64",
    "futex_wait",
    "futex_waitv",
    "futex_wake",
    "futimesat",
    "getcpu",
    "getcwd",
    "getdents",
    "getdents64",
    "getegid",
    "getegid32",
    "geteuid",
    "geteuid32",
    "getgid",
    "getgid32",
    "getgroups",
    "getgroups32",
    "getitimer",
    "getpeername",
    "getpgid",
    "getpgrp",
    "getpid",
    "getppid",
    "getpriority",
    "getrandom",
    "getresgid",
    "getresgid32",
    "getresuid",
    "getresuid32",
    "getrlimit",
    "get_robust_list",
    "getrusage",
    "getsid",
    "getsockname",
    "getsockopt",
    "get_thread_area",
    "gettid",
    "gettimeofday",
    "getuid",
    "getuid32",
    "getxattr",
    "getxattrat",
    "inotify_add_watch",
    "inotify_init",
    "inotify_init1",
    "inotify_rm_watch",
    "io_cancel",
    "ioctl",
    "io_destroy",
    "io_getevents",
    "io_pgetevents",
    "io_pgetevents_time64",
    "ioprio_get",
    "ioprio_set",
    "io_setup",
    "io_submit",
    "ipc",
    "kill",
    "landlock_add_rule",
    "landlock_create_ruleset",
    "landlock_restrict_self",
    "lchown",
    "lchown32",
    "lgetxattr",
    "link",
    "linkat",
    "listen",
    "listmount",
    "listxattr",
    "listxattrat",
    "llistxattr",
    "_llseek",
    "lremovexattr",
    "lseek",
    "lsetxattr",
    "lstat",
    "lstat64",
    "madvise",
    "map_shadow_stack",
    "membarrier",
    "memfd_create",
    "memfd_secret",
    "mincore",
    "mkdir",
    "mkdirat",
    "mknod",
    "mknodat",
    "mlock",
    "mlock2",
    "mlockall",
    "mmap",
    "mmap2",
    "mprotect",
    "mq_getsetattr",
    "mq_notify",
    "mq_open",
    "mq_timedreceive",
    "mq_timedreceive_time64",
    "mq_timedsend",
    "mq_timedsend_time64",
    "mq_unlink",
    "mremap",
    "mseal",
    "msgctl",
    "msgget",
    "msgrcv",
    "msgsnd",
    "msync",
    "munlock",
    "munlockall",
    "munmap",
    "name_to_handle_at",
    "nanosleep",
    "newfstatat",
    "_newselect",
    "open",
    "openat",
    "openat2",
    "pause",
    "pidfd_open",
    "pidfd_send_signal",
    "pipe",
    "pipe2",
    "pkey_alloc",
    "pkey_free",
    "pkey_mprotect",
    "poll",
    "ppoll",
    "ppoll_time64",
    "prctl",
    "pread64",
    "preadv",
    "preadv2",
    "prlimit64",
    "process_mrelease",
    "pselect6",
    "pselect6_time64",
    "pwrite64",
    "pwritev",
    "pwritev2",
    "read",
    "readahead",
    "readlink",
    "readlinkat",
    "readv",
    "recv",
    "recvfrom",
    "recvmmsg",
    "recvmmsg_time64",
    "recvmsg",
    "remap_file_pages",
    "removexattr",
    "removexattrat",
    "rename",
    "renameat",
    "renameat2",
    "restart_syscall",
    "riscv_hwprobe",
    "rmdir",
    "rseq",
    "rt_sigaction",
    "rt_sigpending",
    "rt_sigprocmask",
    "rt_sigqueueinfo",
    "rt_sigreturn",
    "rt_sigsuspend",
    "rt_sigtimedwait",
    "rt_sigtimedwait_time64",
    "rt_tgsigqueueinfo",
    "sched_getaffinity",
    "sched_getattr",
    "sched_getparam",
    "sched_get_priority_max",
    "sched_get_priority_min",
    "sched_getscheduler",
    "sched_rr_get_interval",
    "sched_rr_get_interval_time64",
    "sched_setaffinity",
    "sched_setattr",
    "sched_setparam",
    "sched_setscheduler",
    "sched_yield",
    "seccomp",
    "select",
    "semctl",
    "semget",
    "semop",
    "semtimedop",
    "semtimedop_time64",
    "send",
    "sendfile",
    "sendfile64",
    "sendmmsg",
    "sendmsg",
    "sendto",
    "setfsgid",
    "setfsgid32",
    "setfsuid",
    "setfsuid32",
    "setgid",
    "setgid32",
    "setgroups",
    "setgroups32",
    "setitimer",
    "setpgid",
    "setpriority",
    "setregid",
    "setregid32",
    "setresgid",
    "setresgid32",
    "setresuid",
    "setresuid32",
    "setreuid",
    "setreuid32",
    "setrlimit",
    "set_robust_list",
    "setsid",
    "setsockopt",
    "set_thread_area",
    "set_tid_address",
    "setuid",
    "setuid32",
    "setxattr",
    "setxattrat",
    "shmat",
    "shmctl",
    "shmdt",
    "shmget",
    "shutdown",
    "sigaltstack",
    "signalfd",
    "signalfd4",
    "sigprocmask",
    "sigreturn",
    "socketcall",
    "socketpair",
    "splice",
    "stat",
    "stat64",
    "statfs",
    "statfs64",
    "statmount",
    "statx",
    "symlink",
    "symlinkat",
    "sync",
    "sync_file_range",
    "syncfs",
    "sysinfo",
    "tee",
    "tgkill",
    "time",
    "timer_create",
    "timer_delete",
    "timer_getoverrun",
    "timer_gettime",
    "timer_gettime64",
    "timer_settime",
    "timer_settime64",
    "timerfd_create",
    "timerfd_gettime",
    "timerfd_gettime64",
    "timerfd_settime",
    "timerfd_settime64",
    "times",
    "tkill",
    "truncate",
    "truncate64",
    "ugetrlimit",
    "umask",
    "uname",
    "unlink",
    "unlinkat",
    "uretprobe",
    "utime",
    "utimensat",
    "utimensat_time64",
    "utimes",
    "vfork",
    "vmsplice",
    "wait4",
    "waitid",
    "waitpid",
    "write",
    "writev",
];

const RULES: &[Rule] = &[
    allow(ALLOWED),
    allow(&["process_vm_readv", "process_vm_writev", "ptrace"]),
    // Every address family but AF_ALG (kernel crypto) and AF_VSOCK.
    allow_if(&["socket"], &[arg0(CmpOp::Lt(AF_ALG))]),
    allow_if(&["socket"], &[arg0(CmpOp::Eq(39))]),
    allow_if(&["socket"], &[arg0(CmpOp::Gt(AF_VSOCK))]),
    // PER_LINUX, UNAME26, PER_LINUX32, UNAME26|PER_LINUX32, and the query.
    allow_if(&["personality"], &[arg0(CmpOp::Eq(0))]),
    allow_if(&["personality"], &[arg0(CmpOp::Eq(8))]),
    allow_if(&["personality"], &[arg0(CmpOp::Eq(0x20000))]),
    allow_if(&["personality"], &[arg0(CmpOp::Eq(0x20008))]),
    allow_if(&["personality"], &[arg0(CmpOp::Eq(0xFFFF_FFFF))]),
    allow_on(
        &[
            "arm_fadvise64_64",
            "arm_sync_file_range",
            "sync_file_range2",
            "breakpoint",
            "cacheflush",
            "set_tls",
        ],
        &[Arch::Arm, Arch::Aarch64],
    ),
    allow_on(&["arch_prctl", "modify_ldt"], &[Arch::X86_64]),
    allow_with(&["open_by_handle_at"], Cap::DacReadSearch),
    allow_with(
        &[
            "bpf",
            "clone",
            "clone3",
            "fanotify_init",
            "fsconfig",
            "fsmount",
            "fsopen",
            "fspick",
            "lookup_dcookie",
            "lsm_get_self_attr",
            "lsm_list_modules",
            "lsm_set_self_attr",
            "mount",
            "mount_setattr",
            "move_mount",
            "open_tree",
            "perf_event_open",
            "quotactl",
            "quotactl_fd",
            "setdomainname",
            "sethostname",
            "setns",
            "syslog",
            "umount",
            "umount2",
            "unshare",
        ],
        Cap::SysAdmin,
    ),
    // Threads and forks, but no new namespaces.
    Rule {
        names: &["clone"],
        verdict: Verdict::Allow,
        args: &[arg0(CmpOp::MaskedEq { mask: CLONE_NS_MASK, value: 0 })],
        arches: &[],
        with_cap: None,
        without_cap: Some(Cap::SysAdmin),
    },
    // clone3 passes its flags in memory, out of the filter's reach: ENOSYS
    // makes glibc and musl fall back to clone, which is checked.
    Rule {
        names: &["clone3"],
        verdict: Verdict::Errno(ENOSYS),
        args: &[],
        arches: &[],
        with_cap: None,
        without_cap: Some(Cap::SysAdmin),
    },
    allow_with(&["reboot"], Cap::SysBoot),
    allow_with(&["chroot"], Cap::SysChroot),
    allow_with(&["delete_module", "init_module", "finit_module"], Cap::SysModule),
    allow_with(&["acct"], Cap::SysPacct),
    allow_with(
        &["kcmp", "pidfd_getfd", "process_madvise", "process_vm_readv", "process_vm_writev", "ptrace"],
        Cap::SysPtrace,
    ),
    allow_with(&["iopl", "ioperm"], Cap::SysRawio),
    allow_with(&["settimeofday", "stime", "clock_settime", "clock_settime64"], Cap::SysTime),
    allow_with(&["vhangup"], Cap::SysTtyConfig),
    allow_with(&["get_mempolicy", "mbind", "set_mempolicy", "set_mempolicy_home_node"], Cap::SysNice),
    allow_with(&["syslog"], Cap::Syslog),
    allow_with(&["bpf"], Cap::Bpf),
    allow_with(&["perf_event_open"], Cap::Perfmon),
];

/// One way a syscall can be decided: if every comparison holds, `verdict`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Case {
    pub args: Vec<ArgCmp>,
    pub verdict: Verdict,
}

/// The plan for one architecture: syscall number -> cases, tried in order;
/// when none matches (or the number is not listed), `Errno(EPERM)`.
pub type Plan = std::collections::BTreeMap<u32, Vec<Case>>;

/// The profile for `arch` and an app holding `caps`.
pub fn resolve(arch: Arch, caps: CapSet) -> Plan {
    let mut plan = Plan::new();
    for rule in RULES {
        if !rule.arches.is_empty() && !rule.arches.contains(&arch) {
            continue;
        }
        if rule.with_cap.is_some_and(|c| !caps.has(c)) || rule.without_cap.is_some_and(|c| caps.has(c)) {
            continue;
        }
        for name in rule.names {
            // Names an architecture does not have are skipped, as libseccomp does.
            let Some(nr) = arch.syscall(name) else { continue };
            let cases = plan.entry(nr).or_default();
            // After an unconditional case, later ones can never be reached.
            if cases.last().is_some_and(|c: &Case| c.args.is_empty()) {
                continue;
            }
            cases.push(Case { args: rule.args.to_vec(), verdict: rule.verdict });
        }
    }
    plan
}
