//! The only place skiff uses `unsafe`: process-wide signal dispositions that
//! nix exposes as unsafe because they affect every thread, loading a
//! seccomp filter (a raw prctl with a pointer to the program), and handing a
//! file descriptor to tokio's reactor (unsafe since tokio 1.54: the caller
//! vouches that the descriptor stays open and the same).
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
