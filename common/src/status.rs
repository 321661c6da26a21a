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

/// Where the device's rollout stands: the last good generation, the one on
/// test, and the last one that failed its test and was rolled back.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutStatus {
    /// The last good generation: committed after its test (0: none yet).
    pub committed: u64,
    /// The generation running on test, not yet trusted.
    pub testing: Option<u64>,
    /// The last generation that failed its test, and why.
    pub failed: Option<RolloutFailure>,
}

/// A generation that failed its test.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutFailure {
    pub generation: u64,
    /// The app that failed, when one did (a boot loop names none).
    pub app: Option<AppName>,
    /// What happened, for a person (at most a few hundred bytes).
    pub reason: String,
    /// The device went back to `committed` (false: `rollback = false`, or
    /// there was no good generation to go back to; the failed one runs on).
    pub rolled_back: bool,
}
