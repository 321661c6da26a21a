//! The only place skiff uses `unsafe`: process-wide signal dispositions that
//! nix exposes as unsafe because they affect every thread, loading a
//! seccomp filter (a raw prctl with a pointer to the program), handing a
//! file descriptor to tokio's reactor (unsafe since tokio 1.54: the caller
//! vouches that the descriptor stays open and the same), and the raw `bpf(2)`
//! calls of the cgroup v2 device program (`bpf`).
#![allow(unsafe_code)]

use nix::sys::signal::{signal, SigHandler, Signal};
use std::os::fd::OwnedFd;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// Restores SIGPIPE to the default. Rust ignores SIGPIPE at start-up and an
/// ignored disposition survives exec, so a container forked while it is
/// ignored would never die of a broken pipe (`yes | head` would spin).
pub fn default_sigpipe() {
    // SAFETY: SIG_DFL installs no handler code; called from the single-threaded shim.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
}

/// Ignores SIGPIPE again (Rust's own default), so the shim gets EPIPE, not death.
pub fn ignore_sigpipe() {
    // SAFETY: SIG_IGN installs no handler code; called from the single-threaded shim.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigIgn) };
}

/// Loads a seccomp filter into the calling thread; it survives exec and is
/// inherited by every child. The kernel takes it only with no_new_privs set
/// or CAP_SYS_ADMIN held (EACCES otherwise).
pub fn install_seccomp(insns: &[crate::seccomp::Insn]) -> std::io::Result<()> {
    let len = u16::try_from(insns.len()).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut filter: Vec<libc::sock_filter> =
        insns.iter().map(|i| libc::sock_filter { code: i.code, jt: i.jt, jf: i.jf, k: i.k }).collect();
    let prog = libc::sock_fprog { len, filter: filter.as_mut_ptr() };
    // SAFETY: `prog` points to `filter`, both alive for the call; the kernel
    // copies the program and keeps no pointer to it.
    let rc = unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER as libc::c_ulong,
            &prog as *const libc::sock_fprog as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Registers `fd` with tokio's reactor for readability (a pidfd: readable
/// once its process has exited). Must run inside a runtime with I/O enabled.
pub fn watch_readable(fd: OwnedFd) -> std::io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the `OwnedFd` moves into the AsyncFd, which owns it from then
    // on: the descriptor stays open and refers to the same file until the
    // AsyncFd is dropped, and `as_raw_fd` always returns that descriptor.
    unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(std::io::Error::from)
}

/// The five `bpf(2)` commands the cgroup v2 device program needs, raw (no
/// libbpf). Every call passes a zeroed 128-byte `union bpf_attr`: larger than
/// any field used here, so the kernel's own writes stay inside it. Linux 6.17
/// writes `query.revision` (offset 56) on `BPF_PROG_QUERY` whatever attr size
/// it is given (runc f017afb); a kernel whose attr is smaller than 128 bytes
/// accepts the larger size because the tail is zero.
pub mod bpf {
    use std::ffi::CStr;
    use std::io;
    use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

    const PROG_LOAD: libc::c_long = 5;
    const PROG_ATTACH: libc::c_long = 8;
    const PROG_DETACH: libc::c_long = 9;
    const PROG_GET_FD_BY_ID: libc::c_long = 13;
    const PROG_QUERY: libc::c_long = 16;
    const PROG_TYPE_CGROUP_DEVICE: u32 = 15;
    const CGROUP_DEVICE: u32 = 6;
    const F_ALLOW_MULTI: u32 = 2;

    #[repr(C, align(8))]
    struct Attr([u8; 128]);

    impl Attr {
        fn new() -> Attr {
            Attr([0; 128])
        }
        fn u32(&mut self, off: usize, v: u32) -> &mut Attr {
            self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
            self
        }
        fn u64(&mut self, off: usize, v: u64) -> &mut Attr {
            self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
            self
        }
        fn get_u32(&self, off: usize) -> u32 {
            u32::from_ne_bytes([self.0[off], self.0[off + 1], self.0[off + 2], self.0[off + 3]])
        }
    }

    fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
        loop {
            // SAFETY: `attr` is a live, writable 128-byte buffer and the size
            // passed is its size; every pointer stored in it (instructions,
            // license, log, id array) is owned by the caller and outlives the
            // call; the kernel keeps none of them afterwards.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    cmd,
                    attr as *mut Attr,
                    std::mem::size_of::<Attr>() as libc::c_uint,
                )
            };
            if rc >= 0 {
                return Ok(rc);
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                return Err(e);
            }
        }
    }

    fn owned(fd: libc::c_long) -> OwnedFd {
        // SAFETY: the kernel just returned this fd to us and nothing else owns it.
        unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) }
    }

    /// Loads a `BPF_PROG_TYPE_CGROUP_DEVICE` program (`insns`: 8-byte
    /// `struct bpf_insn`s). On failure, the verifier's log when it has one.
    /// EAGAIN (the verifier interrupted) is retried; EPERM once more after
    /// lifting RLIMIT_MEMLOCK (kernels before 5.11 charge programs to it).
    pub fn load_cgroup_device(insns: &[u8], license: &CStr) -> Result<OwnedFd, (io::Error, String)> {
        let load = |log: Option<&mut Vec<u8>>| {
            let mut attr = Attr::new();
            attr.u32(0, PROG_TYPE_CGROUP_DEVICE)
                .u32(4, (insns.len() / 8) as u32)
                .u64(8, insns.as_ptr() as u64)
                .u64(16, license.as_ptr() as u64);
            if let Some(log) = log {
                attr.u32(24, 1).u32(28, log.len() as u32).u64(32, log.as_mut_ptr() as u64);
            }
            attr.0[48..57].copy_from_slice(b"skiff_dev");
            bpf(PROG_LOAD, &mut attr)
        };
        let mut result = load(None);
        for _ in 0..5 {
            match &result {
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => result = load(None),
                _ => break,
            }
        }
        if matches!(&result, Err(e) if e.raw_os_error() == Some(libc::EPERM)) && raise_memlock() {
            result = load(None);
        }
        match result {
            Ok(fd) => Ok(owned(fd)),
            Err(e) => {
                // Again with the log, only to explain the refusal.
                let mut log = vec![0u8; 16 * 1024];
                let _ = load(Some(&mut log));
                let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
                let text = String::from_utf8_lossy(&log[..end]).trim().replace('\n', "; ");
                Err((e, text))
            }
        }
    }

    fn raise_memlock() -> bool {
        let inf = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
        // SAFETY: `inf` is a valid rlimit read by the call only.
        unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &inf) == 0 }
    }

    fn attach_attr(cgroup: BorrowedFd, prog: BorrowedFd, flags: u32) -> Attr {
        let mut attr = Attr::new();
        attr.u32(0, cgroup.as_raw_fd() as u32)
            .u32(4, prog.as_raw_fd() as u32)
            .u32(8, CGROUP_DEVICE)
            .u32(12, flags);
        attr
    }

    /// Attaches `prog` to the cgroup directory `cgroup` with BPF_F_ALLOW_MULTI.
    pub fn attach_cgroup_device(cgroup: BorrowedFd, prog: BorrowedFd) -> io::Result<()> {
        bpf(PROG_ATTACH, &mut attach_attr(cgroup, prog, F_ALLOW_MULTI)).map(drop)
    }

    pub fn detach_cgroup_device(cgroup: BorrowedFd, prog: BorrowedFd) -> io::Result<()> {
        bpf(PROG_DETACH, &mut attach_attr(cgroup, prog, 0)).map(drop)
    }

    /// The ids of the device programs attached to `cgroup` itself.
    pub fn query_cgroup_device(cgroup: BorrowedFd) -> io::Result<Vec<u32>> {
        let mut cap = 64usize;
        loop {
            let mut ids = vec![0u32; cap];
            let mut attr = Attr::new();
            attr.u32(0, cgroup.as_raw_fd() as u32)
                .u32(4, CGROUP_DEVICE)
                .u64(16, ids.as_mut_ptr() as u64)
                .u32(24, cap as u32);
            match bpf(PROG_QUERY, &mut attr) {
                Ok(_) => {
                    ids.truncate((attr.get_u32(24) as usize).min(cap));
                    return Ok(ids);
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && cap < 1 << 16 => {
                    cap = (attr.get_u32(24) as usize).max(cap * 2);
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub fn prog_fd_by_id(id: u32) -> io::Result<OwnedFd> {
        let mut attr = Attr::new();
        attr.u32(0, id);
        bpf(PROG_GET_FD_BY_ID, &mut attr).map(owned)
    }
}
