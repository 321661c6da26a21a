//! Observed state: what an app is doing right now. Shown by `skiff ps --json`
//! and sent up to the controller as `reported`, so it lives here.

use crate::name::AppName;
use serde::{Deserialize, Serialize};

/// How a container's main process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    /// Exit code when the process called exit.
    pub code: Option<i32>,
    /// Signal number when a signal ended it.
    pub signal: Option<i32>,
    /// The kernel's OOM killer ended it (the memory cgroup counted an oom_kill).
    pub oom_killed: bool,
}

impl ExitInfo {
    /// Exit code 0, no signal, no OOM kill.
    pub fn success(&self) -> bool {
        self.code == Some(0) && self.signal.is_none() && !self.oom_killed
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Being created.
    Starting,
    Running,
    /// SIGTERM sent, waiting for exit.
    Stopping,
    /// Exited, waiting out the restart delay.
    Backoff,
    /// Exited and not restarted (policy `never`, or `on-failure` after success).
    Exited,
    /// Could not be created (e.g. image missing); retried with backoff.
    Failed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Health {
    /// No probe configured for this.
    None,
    /// Not known yet (initial delay, startup probe still running).
    Unknown,
    Passing,
    Failing,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppStatus {
    pub name: AppName,
    pub phase: Phase,
    /// The container's init process, as the host sees it.
    pub pid: Option<i32>,
    /// Restarts since the agent (or the app's spec) last changed.
    pub restarts: u32,
    pub last_exit: Option<ExitInfo>,
    /// Liveness: failing means it is about to be restarted.
    pub live: Health,
    /// Readiness: reported, never acted on.
    pub ready: Health,
    /// The image as written in the desired state.
    pub image: String,
    /// The digest of the manifest the container runs, once created.
    pub image_digest: Option<String>,
    /// Last error creating or running it, if any.
    pub error: Option<String>,
}

/// An image pull in progress or failed, as reported while a desired state
/// waits for its images.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullStatus {
    /// The reference as written in the desired state.
    pub image: String,
    /// Bytes of the image's blobs on disk (verified or partial).
    pub done: u64,
    /// Bytes of all its blobs; 0 until the manifest is known.
    pub total: u64,
    /// Why the last attempt failed; it is retried with backoff.
    pub error: Option<String>,
}
