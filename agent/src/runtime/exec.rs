//! `skiff probe-exec`: runs one command inside a running container and exits
//! with its status. Like the shim, a separate single-threaded process, because
//! entering a container forks. Used for exec probes; the agent reads the exit
//! code and the first bytes of output.

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::syscall::syscall::SyscallType;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use std::path::Path;
use std::time::Duration;

/// Exit code when the command did not finish within the timeout (as `timeout(1)`).
pub const TIMED_OUT: i32 = 124;
/// Exit code when the command could not be started at all.
pub const CANNOT_RUN: i32 = 125;

// This process has no tokio runtime (it must stay single-threaded to fork),
// so its deadline uses std's monotonic clock.
#[allow(clippy::disallowed_types)]
pub fn main(root: &Path, id: &str, timeout: Duration, args: Vec<String>) -> i32 {
    crate::sys::default_sigpipe();
    let built = ContainerBuilder::new(id.to_string(), SyscallType::default())
        .with_root_path(root)
        .map(|b| b.as_tenant().with_container_args(args).with_detach(true).build());
    crate::sys::ignore_sigpipe();
    let pid = match built {
        Ok(Ok(pid)) => pid,
        Ok(Err(e)) | Err(e) => {
            eprintln!("cannot run the probe in container {id}: {e}");
            return CANNOT_RUN;
        }
    };
    // A timeout too large for the clock (validation bounds it) waits a year.
    let now = std::time::Instant::now();
    let deadline =
        now.checked_add(timeout).or_else(|| now.checked_add(Duration::from_secs(365 * 86400))).unwrap_or(now);
    loop {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => return code,
            Ok(WaitStatus::Signaled(_, sig, _)) => return 128 + sig as i32,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                eprintln!("waitpid: {e}");
                return CANNOT_RUN;
            }
        }
        if std::time::Instant::now() >= deadline {
            let _ = kill(pid, Signal::SIGKILL);
            let _ = waitpid(pid, None);
            eprintln!("probe timed out after {timeout:?}");
            return TIMED_OUT;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
