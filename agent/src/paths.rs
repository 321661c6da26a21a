//! Where skiff keeps things. Flash (`state_dir`) holds only what must survive a
//! reboot: the desired state, images, volumes. Everything volatile (runtime
//! state, bundles, container upper layers, the API socket, logs by default)
//! lives under `run_dir`, a tmpfs. Every path can be overridden so tests run in
//! temp dirs side by side.
//!
//! The directories are skiff's own and private (0700): the desired state and
//! the logs carry secrets (env values hold tokens). `secure` makes them so at
//! agent start, also on an install an older version or a umask left readable.

use crate::fsutil::{private_dir, set_mode, PRIVATE_FILE};
use skiff_common::AppName;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct PathsError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

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

    /// Creates the state dir, the image store, the run dir and the log dir
    /// 0700 (fixing existing ones), and makes every regular file directly in
    /// the state dir (desired state, its previous generation, temp and lock
    /// files) and every log file 0600. The log dir must be skiff's own.
    pub fn secure(&self) -> Result<(), PathsError> {
        let err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| PathsError { path, source }
        };
        for dir in [&self.state_dir, &self.images(), &self.run_dir, &self.log_dir] {
            private_dir(dir).map_err(err(dir))?;
        }
        for dir in [&self.state_dir, &self.log_dir] {
            for entry in std::fs::read_dir(dir).map_err(err(dir))?.flatten() {
                let path = entry.path();
                // file_type() does not follow symlinks: a link is never chmodded.
                if entry.file_type().is_ok_and(|t| t.is_file()) {
                    set_mode(&path, PRIVATE_FILE).map_err(err(&path))?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    #[test]
    fn secure_creates_and_fixes_modes() {
        let d = tempfile::tempdir().unwrap();
        let p = Paths::new(Some(d.path().join("state")), Some(d.path().join("run")), None, None);
        std::fs::create_dir_all(p.images()).unwrap();
        let loose = |path: &Path, mode: u32| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap()
        };
        loose(&p.state_dir, 0o755);
        loose(&p.images(), 0o777);
        std::fs::write(p.state_dir.join("desired.skf"), b"x").unwrap();
        loose(&p.state_dir.join("desired.skf"), 0o644);
        p.secure().unwrap();
        std::fs::write(p.log_dir.join("web.log.1"), b"x").unwrap();
        loose(&p.log_dir.join("web.log.1"), 0o664);
        p.secure().unwrap();
        let mode = |path: PathBuf| std::fs::metadata(path).unwrap().mode() & 0o7777;
        assert_eq!(mode(p.state_dir.clone()), 0o700);
        assert_eq!(mode(p.images()), 0o700);
        assert_eq!(mode(p.run_dir.clone()), 0o700);
        assert_eq!(mode(p.log_dir.clone()), 0o700);
        assert_eq!(mode(p.state_dir.join("desired.skf")), 0o600);
        assert_eq!(mode(p.log_dir.join("web.log.1")), 0o600);
    }
}
