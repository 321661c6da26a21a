//! `skiff probe-exec`: runs one command inside a running container and exits
//! with its status. Like the shim, a separate single-threaded process, because
//! entering a container forks. Used for exec probes; the agent reads the exit
//! code and the first bytes of output.
//!
//! A probe never leaves a process behind: the command runs as a session leader
//! in the container (libcontainer's init calls setsid), and when it exits or
//! times out every live process of that session is SIGKILLed, whatever it
//! forked. Only a process that made a session of its own escapes. It runs as
//! the app's user, with the app's capabilities and no-new-privileges setting.
//!
//! The command runs under the app's seccomp filter, loaded the same way as
//! for the app (`executor.rs`), from the file the app's shim recorded.

use super::executor::SandboxExecutor;
use crate::seccomp::{Filter, Insn};
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container;
use libcontainer::oci_spec::runtime::Spec;
use libcontainer::syscall::syscall::SyscallType;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

/// Exit code when the command did not finish within the timeout (as `timeout(1)`).
pub const TIMED_OUT: i32 = 124;
/// Exit code when the command could not be started at all.
pub const CANNOT_RUN: i32 = 125;

/// To stderr (the agent's pipe); a closed pipe (the agent died) is ignored.
fn say(msg: &str) {
    let _ = writeln!(std::io::stderr(), "{msg}");
}

// This process has no tokio runtime (it must stay single-threaded to fork),
// so its deadline uses std's monotonic clock.
#[allow(clippy::disallowed_types)]
pub fn main(root: &Path, id: &str, seccomp: Option<&Path>, timeout: Duration, args: Vec<String>) -> i32 {
    // Its own session: a Ctrl-C meant for the agent must not end it before it
    // has cleaned up. (The agent does not make it a group leader.)
    let _ = nix::unistd::setsid();
    let filter = match seccomp.map(load_filter).transpose() {
        Ok(f) => f.flatten(),
        Err(e) => {
            say(&format!("cannot run the probe in container {id}: {e}"));
            return CANNOT_RUN;
        }
    };
    crate::sys::default_sigpipe();
    let built = ContainerBuilder::new(id.to_string(), SyscallType::default())
        .with_root_path(root)
        .map(|b| b.with_executor(SandboxExecutor::new(filter)))
        .map(|b| {
            let (uid, gid) = init_user(root, id).unzip();
            b.as_tenant().with_container_args(args).with_user(uid).with_group(gid).with_detach(true).build()
        });
    crate::sys::ignore_sigpipe();
    let pid = match built {
        Ok(Ok(pid)) => pid,
        Ok(Err(e)) | Err(e) => {
            say(&format!("cannot run the probe in container {id}: {e}"));
            return CANNOT_RUN;
        }
    };
    let start = std::time::Instant::now();
    let outcome = loop {
        // WNOWAIT: the command stays an unreaped zombie until its session is
        // killed, so its pid (the session's id) cannot be reused meanwhile.
        match waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT) {
            Ok(WaitStatus::Exited(_, code)) => break Ok(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => break Ok(128 + sig as i32),
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => break Err(format!("waitid: {e}")),
        }
        if start.elapsed() >= timeout {
            break Err(format!("probe timed out after {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    kill_session(pid.as_raw());
    let _ = waitpid(pid, None);
    match outcome {
        Ok(code) => code,
        Err(msg) => {
            say(&msg);
            if start.elapsed() >= timeout {
                TIMED_OUT
            } else {
                CANNOT_RUN
            }
        }
    }
}

/// The uid and gid the container's own process runs as (the app's `user`).
/// libcontainer runs a tenant as root unless told otherwise; a probe runs as
/// the app does, as `docker exec` does. `None` when the container cannot be
/// read, and then the builder fails on it too.
fn init_user(root: &Path, id: &str) -> Option<(u32, u32)> {
    let container = Container::load(root.join(id)).ok()?;
    let spec = Spec::load(container.bundle().join("config.json")).ok()?;
    let user = spec.process().as_ref()?.user();
    Some((user.uid(), user.gid()))
}

/// The filter the app runs under, as its shim recorded it (`seccomp.json`):
/// the probe gets the same. A missing file is a container started by an older
/// agent, which runs unconfined itself.
fn load_filter(path: &Path) -> Result<Option<Vec<Insn>>, String> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let filter: Option<Filter> =
        serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    filter.map(|f| f.insns()).transpose().map_err(|e| format!("{}: {e}", path.display()))
}

/// SIGKILLs every live process of session `sid` and returns once none is left
/// (or after about a second). The others go first, so that a waiting parent
/// in the session (a shell) can reap them; what is orphaned is reaped by the
/// container's init, as any orphan there.
pub fn kill_session(sid: i32) {
    for round in 0..100 {
        let members = session_members(sid);
        if members.is_empty() {
            return;
        }
        for pid in members {
            if round > 0 || pid != sid {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Live (not zombie) processes whose session id is `sid`.
fn session_members(sid: i32) -> Vec<i32> {
    let Ok(procs) = std::fs::read_dir("/proc") else { return Vec::new() };
    procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| stat_session(&stat))
                .is_some_and(|(state, session)| session == sid && !matches!(state, 'Z' | 'X'))
        })
        .collect()
}

/// State and session id from a `/proc/<pid>/stat` line.
fn stat_session(stat: &str) -> Option<(char, i32)> {
    // The command name (field 2) may hold spaces and parentheses; what
    // follows its last ')' is plain: state ppid pgrp session ...
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let mut f = rest.split(' ');
    let state = f.next()?.chars().next()?;
    let session = f.nth(2)?.parse().ok()?;
    Some((state, session))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_state_and_session() {
        let stat = "4242 (sh (x) y) S 4200 4242 4241 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 123 0 0";
        assert_eq!(stat_session(stat), Some(('S', 4241)));
        assert_eq!(stat_session("1 (init) Z 0 1 1"), Some(('Z', 1)));
        assert_eq!(stat_session("garbage"), None);
    }
}
