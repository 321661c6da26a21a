//! The files of one container instance under `<run>/apps/<app>/<instance>/`
//! (tmpfs). They are the hand-over between the agent, the shim, and the next
//! agent after a restart:
//!
//! ```text
//! shim.json     written by the agent before it spawns the shim: what to run
//! shim.pid      written by the shim first thing: its pid and start time, so a
//!               new agent can tell a shim still creating the container
//! started.json  written by the shim once the container runs: pids, start time
//! exit.json     written by the shim when the container has exited and is deleted
//! *.reserve     space for started.json and exit.json, taken before the
//!               container starts so a full run dir cannot lose either record
//! seccomp.json  written by the shim before the container starts: the seccomp
//!               filter the app runs under (`null`: unconfined), which exec
//!               probes load too
//! shim.log      the shim's own messages (rate-limited and capped)
//! rootfs/       the container's root (overlay mount or copy), removed on exit
//! bundle/       config.json for libcontainer
//! ```
//! Every file is written atomically, so a reader sees all of it or none.

use crate::fsutil::atomic_write;
use crate::image::ImageConfig;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use skiff_common::{AppSpec, ExitInfo};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ShimConfig {
    pub spec: AppSpec,
    pub instance: u64,
    pub container_id: String,
    pub container_root: PathBuf,
    pub cgroup_path: String,
    pub image_digest: String,
    pub image_rootfs: PathBuf,
    pub image_config: ImageConfig,
    pub log_dir: PathBuf,
    pub log_cap: u64,
    /// The app's seccomp filter, compiled by the agent (once per capability
    /// set); `None` when the app runs unconfined.
    #[serde(default)]
    pub seccomp: Option<crate::seccomp::Filter>,
    /// The agent's `--default-app-memory`, for an app that sets no memory
    /// limit (kept apart from `spec`, which stays what the user asked for).
    #[serde(default)]
    pub default_memory: Option<u64>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Started {
    pub init_pid: i32,
    pub shim_pid: i32,
    /// Start time of the shim process in clock ticks since boot (/proc/<pid>/stat
    /// field 22): tells a live shim from a recycled pid.
    pub shim_start_ticks: u64,
    /// CLOCK_BOOTTIME when the container started, in milliseconds.
    pub started_boot_ms: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    pub exit: ExitInfo,
    pub exited_boot_ms: u64,
}

/// The shim process, recorded by itself before it does anything else.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShimPid {
    pub pid: i32,
    pub start_ticks: u64,
}

impl ShimPid {
    pub fn alive(&self) -> bool {
        process_start_ticks(self.pid) == Some(self.start_ticks)
    }
}

pub const CONFIG: &str = "shim.json";
pub const SHIM_PID: &str = "shim.pid";
pub const STARTED: &str = "started.json";
pub const EXIT: &str = "exit.json";
pub const SHIM_LOG: &str = "shim.log";
pub const SECCOMP: &str = "seccomp.json";

pub fn write<T: Serialize>(dir: &Path, name: &str, value: &T) -> io::Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    atomic_write(&dir.join(name), &bytes)
}

/// Bytes kept for a reserved record: far more than an `Exit` or `Started` needs.
pub const RESERVE_BYTES: usize = 4096;

fn reserve_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.reserve"))
}

/// Takes the space for record `name` now, so that `write_reserved` needs no
/// new space later: a file of `RESERVE_BYTES` spaces (JSON readers skip
/// trailing white space).
pub fn reserve(dir: &Path, name: &str) -> io::Result<()> {
    let path = reserve_path(dir, name);
    let mut f = crate::fsutil::create_private(&path, true)?;
    f.write_all(&[b' '; RESERVE_BYTES])?;
    f.sync_all()
}

/// Writes record `name` into its reserved file, in place (no new blocks), and
/// renames it into place: a reader sees all of it or none, even when the file
/// system is full. Without a reservation (or if it fails) this is `write`.
pub fn write_reserved<T: Serialize>(dir: &Path, name: &str, value: &T) -> io::Result<()> {
    let bytes = serde_json::to_vec(value).map_err(io::Error::other)?;
    let reserved = reserve_path(dir, name);
    let in_place = || -> io::Result<()> {
        if bytes.len() > RESERVE_BYTES {
            return Err(io::Error::other("record larger than its reservation"));
        }
        let mut f = std::fs::OpenOptions::new().write(true).open(&reserved)?;
        if f.metadata()?.len() < RESERVE_BYTES as u64 {
            return Err(io::Error::other("reservation is short"));
        }
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&reserved, dir.join(name))?;
        crate::fsutil::sync_dir(dir)
    };
    match in_place() {
        Ok(()) => Ok(()),
        Err(_) => write(dir, name, value),
    }
}

/// `Ok(None)` when the file does not exist.
pub fn read<T: DeserializeOwned>(dir: &Path, name: &str) -> io::Result<Option<T>> {
    match std::fs::read(dir.join(name)) {
        Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
            io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", dir.join(name).display()))
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Milliseconds of CLOCK_BOOTTIME: monotonic, counts suspend, survives no reboot.
pub fn boot_ms() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000)
        .unwrap_or(0)
}

/// Start time of a process (clock ticks since boot), `None` if it is gone or
/// a zombie (an orphaned shim waits for a PID 1 that may reap it late).
pub fn process_start_ticks(pid: i32) -> Option<u64> {
    // Field 22; the iterator starts at field 4.
    live_stat_field(pid, 22 - 4)
}

/// Parent of a process (field 4 of /proc/<pid>/stat), `None` if it is gone or a zombie.
pub fn process_parent(pid: i32) -> Option<i32> {
    live_stat_field(pid, 0)
}

/// Field `n + 4` of /proc/<pid>/stat, `None` if the process is gone or a zombie.
fn live_stat_field<T: std::str::FromStr>(pid: i32, n: usize) -> Option<T> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; fields after its ')' are plain.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split(' ');
    if matches!(fields.next(), Some("Z") | Some("X")) {
        return None;
    }
    fields.nth(n)?.parse().ok()
}

/// Whether the shim recorded in `s` is still the same live process.
pub fn shim_alive(s: &Started) -> bool {
    process_start_ticks(s.shim_pid) == Some(s.shim_start_ticks)
}
