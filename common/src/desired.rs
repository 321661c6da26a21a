//! The desired state: what should run on a device. These types are trusted:
//! they are only built by the validator in `toml_file` (from a person's file)
//! or decoded from a checked envelope (`codec`). Apps are kept sorted by name.

use crate::name::{AppName, ImageRef};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// Where a desired state came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Origin {
    /// `skiff apply` on the device.
    Local,
    /// Signed by the controller and received over MQTT.
    Controller,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredState {
    /// Grows with every change; a state is never replaced by one with a lower number.
    pub generation: u64,
    pub origin: Origin,
    /// Sorted by name, names unique.
    pub apps: Vec<AppSpec>,
}

impl DesiredState {
    pub fn empty() -> Self {
        DesiredState { generation: 0, origin: Origin::Local, apps: Vec::new() }
    }

    pub fn app(&self, name: &AppName) -> Option<&AppSpec> {
        self.apps.iter().find(|a| &a.name == name)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppSpec {
    pub name: AppName,
    pub image: ImageRef,
    /// When the image is fetched from its registry.
    pub pull: PullPolicy,
    /// Replaces the image's entrypoint and command when set.
    pub command: Option<Vec<String>>,
    /// Added to (and overriding) the image's environment.
    pub env: BTreeMap<String, String>,
    /// Working directory; the image's when unset.
    pub workdir: Option<String>,
    pub restart: RestartPolicy,
    pub network: NetworkMode,
    pub mounts: Vec<Mount>,
    /// Host device paths passed through and allowed in the device cgroup.
    pub devices: Vec<String>,
    pub resources: Resources,
    pub liveness: Option<Probe>,
    pub readiness: Option<Probe>,
    pub startup: Option<Probe>,
    /// Time between SIGTERM and SIGKILL when the app is stopped.
    pub stop_grace: Duration,
}

/// When an app's image is pulled from its registry. Append only: postcard
/// numbers the variants.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum PullPolicy {
    /// Pulled when the store does not hold the reference (`if-not-present`).
    #[default]
    IfNotPresent,
    /// Pulled again (the tag re-resolved) on every apply of a new generation (`always`).
    Always,
    /// Never pulled: the image must be loaded on the device (`never`).
    Never,
}

impl PullPolicy {
    pub const ALL: [PullPolicy; 3] = [PullPolicy::IfNotPresent, PullPolicy::Always, PullPolicy::Never];

    /// The word the TOML file uses.
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::IfNotPresent => "if-not-present",
            PullPolicy::Always => "always",
            PullPolicy::Never => "never",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

impl RestartPolicy {
    /// Whether an exit with this outcome leads to a restart. `success` is an
    /// exit with code 0 (not a signal, not an OOM kill).
    pub fn restarts_after(self, success: bool) -> bool {
        match self {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => !success,
            RestartPolicy::Never => false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NetworkMode {
    /// Shares the host's network namespace.
    Host,
    /// A private network namespace with no interfaces but loopback.
    None,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    /// Absolute host path.
    pub source: String,
    /// Absolute path in the container.
    pub target: String,
    pub readonly: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// CPU quota in thousandths of a core (`cpus = 0.5` is 500).
    pub cpu_millis: Option<u32>,
    /// Memory limit in bytes.
    pub memory_bytes: Option<u64>,
    /// Maximum number of processes and threads.
    pub pids: Option<u32>,
}

/// A probe with Kubernetes semantics.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    pub action: ProbeAction,
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    /// Consecutive failures that make the probe failed.
    pub failure_threshold: u32,
    /// Consecutive successes that make the probe passed again.
    pub success_threshold: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProbeAction {
    /// GET http://127.0.0.1:port/path; 200-399 passes.
    Http { port: u16, path: String },
    /// A TCP connect to 127.0.0.1:port passes.
    Tcp { port: u16 },
    /// The command, run inside the container, exits 0.
    Exec(Vec<String>),
}

impl Probe {
    pub const DEFAULT_PERIOD: Duration = Duration::from_secs(10);
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
    pub const DEFAULT_FAILURE_THRESHOLD: u32 = 3;
}

impl AppSpec {
    pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);
}
