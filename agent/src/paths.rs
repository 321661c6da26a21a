//! Where skiff keeps things. Flash (`state_dir`) holds only what must survive a
//! reboot: the desired state, images, volumes. Everything volatile (runtime
//! state, bundles, container upper layers, the API socket, logs by default)
//! lives under `run_dir`, a tmpfs. Every path can be overridden so tests run in
//! temp dirs side by side.

use skiff_common::AppName;
use std::path::PathBuf;

#[derive(Clone, Debug)]
pub struct Paths {
    /// Flash: `/var/lib/skiff`.
    pub state_dir: PathBuf,
    /// tmpfs: `/run/skiff`.
    pub run_dir: PathBuf,
    /// Per-app logs; `<run_dir>/logs` unless set.
    pub log_dir: PathBuf,
    /// Parent cgroup of every app: containers live at `/<cgroup_root>/<app>`.
    pub cgroup_root: String,
}

impl Paths {
    pub const DEFAULT_STATE: &'static str = "/var/lib/skiff";
    pub const DEFAULT_RUN: &'static str = "/run/skiff";

    pub fn new(
        state_dir: Option<PathBuf>,
        run_dir: Option<PathBuf>,
        log_dir: Option<PathBuf>,
        cgroup_root: Option<String>,
    ) -> Paths {
        let state_dir = state_dir.unwrap_or_else(|| Self::DEFAULT_STATE.into());
        let run_dir = run_dir.unwrap_or_else(|| Self::DEFAULT_RUN.into());
        let log_dir = log_dir.unwrap_or_else(|| run_dir.join("logs"));
        Paths { state_dir, run_dir, log_dir, cgroup_root: cgroup_root.unwrap_or_else(|| "skiff".into()) }
    }

    pub fn images(&self) -> PathBuf {
        self.state_dir.join("images")
    }

    /// Per-container runtime directories: `<run>/apps/<app>/<instance>`.
    pub fn apps(&self) -> PathBuf {
        self.run_dir.join("apps")
    }

    pub fn instance(&self, app: &AppName, instance: u64) -> PathBuf {
        self.apps().join(app.as_str()).join(instance.to_string())
    }

    /// libcontainer's state root.
    pub fn containers(&self) -> PathBuf {
        self.run_dir.join("containers")
    }

    pub fn socket(&self) -> PathBuf {
        self.run_dir.join("skiff.sock")
    }

    pub fn cgroup(&self, app: &AppName) -> String {
        format!("/{}/{}", self.cgroup_root, app)
    }

    pub fn container_id(app: &AppName, instance: u64) -> String {
        format!("{app}.{instance}")
    }
}
