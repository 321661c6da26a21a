//! Process handles (pidfds): how the agent learns that a shim or a
//! container's init has exited, and how it signals one.
//!
//! A pidfd names one process for good. It turns readable when that process
//! exits, whether or not it is the agent's child (an adopted shim is not), and
//! a signal sent through it can never reach a later process that was given
//! the same pid. Waiting on one costs nothing until the exit: tokio's reactor
//! watches it with every other file descriptor.
//!
//! Invariants: a handle is only made for the process the caller means (its
//! identity is checked after the fd is opened, while the fd pins it), and an
//! exit is only reported once the kernel says so. This module never reads
//! `/proc` on a timer; the one polling fallback, for kernels without
//! `pidfd_open` (before Linux 5.3, `PidfdError::Unsupported`), is the caller's.
//! rustix wraps the syscalls; the reactor registration is in `sys.rs`.

use rustix::io::Errno;
use rustix::process::{pidfd_open, pidfd_send_signal, Pid, PidfdFlags};
use std::os::fd::{AsFd, OwnedFd};
use tokio::io::unix::AsyncFd;

pub use rustix::process::Signal;

#[derive(Debug, thiserror::Error)]
pub enum PidfdError {
    /// The kernel has no `pidfd_open` (ENOSYS): Linux before 5.3.
    #[error("this kernel has no pidfd_open (Linux 5.3 or later needed)")]
    Unsupported,
    #[error("pidfd_open({pid}): {source}")]
    Open { pid: i32, source: std::io::Error },
    #[error("watching the pidfd of {pid}: {source}")]
    Watch { pid: i32, source: std::io::Error },
}

/// One process, watched by the tokio reactor.
#[derive(Debug)]
pub struct ProcessFd {
    fd: AsyncFd<OwnedFd>,
    pid: i32,
}

impl ProcessFd {
    /// A handle on the process that has `pid` now, if `is_it` (which may look
    /// at `/proc/<pid>`: its start time, its parent) says it is the one meant.
    /// `Ok(None)`: that process is gone, or `pid` belongs to another one.
    /// Must run inside a tokio runtime with I/O enabled.
    pub fn open(pid: i32, is_it: impl FnOnce() -> bool) -> Result<Option<ProcessFd>, PidfdError> {
        let Some(raw) = Pid::from_raw(pid) else { return Ok(None) };
        // No PIDFD_NONBLOCK (5.10+): the fd is only polled, never read.
        let fd = match pidfd_open(raw, PidfdFlags::empty()) {
            Ok(fd) => fd,
            Err(Errno::SRCH) => return Ok(None),
            Err(Errno::NOSYS) => return Err(PidfdError::Unsupported),
            Err(e) => return Err(PidfdError::Open { pid, source: e.into() }),
        };
        // What `is_it` read under /proc/<pid> was this fd's process only if
        // that process still lives after the look (the fd keeps its pid from
        // being given to another process while it does).
        if !is_it() || exited_now(&fd) {
            return Ok(None);
        }
        let fd = crate::sys::watch_readable(fd).map_err(|source| PidfdError::Watch { pid, source })?;
        Ok(Some(ProcessFd { fd, pid }))
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Resolves once the process has exited (a zombie not yet reaped counts).
    pub async fn exited(&self) {
        loop {
            match self.fd.readable().await {
                // The reactor may report readiness that is gone by now: the
                // kernel's word decides.
                Ok(mut ready) => {
                    if exited_now(self.fd.get_ref()) {
                        return;
                    }
                    ready.clear_ready();
                }
                // The reactor is shutting down (the runtime goes away with
                // this task). Never report an exit that did not happen: the
                // caller would clean up a running container.
                Err(_) => {
                    if exited_now(self.fd.get_ref()) {
                        return;
                    }
                    std::future::pending::<()>().await;
                }
            }
        }
    }

    /// Whether the process has exited, without waiting.
    pub fn has_exited(&self) -> bool {
        exited_now(self.fd.get_ref())
    }

    /// Sends `sig` to this process and no other. `Ok(false)`: it had exited.
    pub fn signal(&self, sig: Signal) -> std::io::Result<bool> {
        match pidfd_send_signal(self.fd.get_ref(), sig) {
            Ok(()) => Ok(true),
            Err(Errno::SRCH) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

/// A pidfd polls readable once its process has exited.
fn exited_now(fd: &OwnedFd) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(n) if n > 0 => {
            fds[0].revents().is_some_and(|r| r.intersects(PollFlags::POLLIN | PollFlags::POLLHUP))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};
    use std::time::Duration;

    const NOT_YET: Duration = Duration::from_millis(300);
    const SOON: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn wakes_when_a_child_exits_and_not_before() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let h = ProcessFd::open(child.id() as i32, || true).unwrap().expect("a live child");
        assert!(tokio::time::timeout(NOT_YET, h.exited()).await.is_err(), "woke while it runs");
        assert!(!h.has_exited());
        child.kill().unwrap();
        tokio::time::timeout(SOON, h.exited()).await.expect("woken by the exit");
        // Not reaped yet (a zombie): exited all the same.
        assert!(h.has_exited());
        child.wait().unwrap();
        assert!(h.has_exited());
    }

    /// An adopted shim is not the agent's child: its exit wakes the watcher too.
    #[tokio::test]
    async fn wakes_when_a_process_that_is_not_our_child_exits() {
        // The shell starts the sleep in the background and exits at once:
        // the sleep is reparented away from this process.
        let out = Command::new("sh")
            .args(["-c", "sleep 1 </dev/null >/dev/null 2>&1 & echo $!"])
            .stdout(Stdio::piped())
            .output()
            .unwrap();
        let pid: i32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        let h = ProcessFd::open(pid, || true).unwrap().expect("the orphan runs");
        assert!(nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None).is_err(), "not our child");
        tokio::time::timeout(SOON, h.exited()).await.expect("woken by the orphan's exit");
    }

    #[tokio::test]
    async fn signals_reach_the_process_and_never_a_later_one() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let h = ProcessFd::open(child.id() as i32, || true).unwrap().unwrap();
        assert!(h.signal(Signal::TERM).unwrap());
        let status = child.wait().unwrap();
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGTERM));
        tokio::time::timeout(SOON, h.exited()).await.unwrap();
        // Reaped: its pid may be anyone's now, the handle reaches no one.
        assert!(!h.signal(Signal::KILL).unwrap());
    }

    #[tokio::test]
    async fn a_gone_or_wrong_process_gives_no_handle() {
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        child.wait().unwrap();
        assert!(ProcessFd::open(pid, || true).unwrap().is_none(), "reaped process");
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        assert!(ProcessFd::open(child.id() as i32, || false).unwrap().is_none(), "identity refused");
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(ProcessFd::open(0, || true).unwrap().is_none());
    }
}
