//! The daemon's ports: the narrow interfaces through which it touches
//! containers, the state file and the image store, with the real adapters.
//! Tests drive the daemon through in-memory fakes of these (`tests.rs`).
//!
//! Blocking calls (`scan`, `forget`, `remove_app`, `load`, `save`, `present`,
//! `collect`) touch flash or the run dir: the daemon runs them on tokio's
//! blocking pool, never on its loop.

use crate::image::ImageStore;
use crate::paths::Paths;
use crate::rollout::Record;
use crate::runtime::instance::Started;
use crate::runtime::{Found, Runtime};
use crate::store::{RolloutFiles, StateStore};
use skiff_common::{AppName, AppSpec, DesiredState, ExitInfo, ImageRef, Probe};
use std::collections::BTreeSet;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

pub type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// `(bytes done, bytes total)` of a pull.
pub type Progress = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// A container that was created and started.
pub struct Running {
    pub pid: i32,
    /// The image digest it runs.
    pub digest: String,
    /// Resolves when the container has exited.
    pub exit: BoxFut<ExitInfo>,
}

pub trait Containers: Send + Sync + 'static {
    /// What a previous agent left (blocking; start-up only).
    fn scan(&self) -> Vec<Found>;
    fn start(&self, spec: AppSpec, instance: u64) -> BoxFut<Result<Running, String>>;
    /// Waits for the exit of an adopted container.
    fn watch(&self, app: AppName, instance: u64, started: Started) -> BoxFut<ExitInfo>;
    /// SIGTERM, then SIGKILL after `grace`; the exit is seen by `start`'s or `watch`'s future.
    fn stop(&self, app: AppName, instance: u64, grace: Duration) -> BoxFut<()>;
    /// One probe attempt within `probe.timeout`: passed, and what was seen.
    fn probe(&self, app: AppName, instance: u64, probe: Probe) -> BoxFut<(bool, String)>;
    /// Kills and deletes what a container whose shim died left.
    fn reap_lost(&self, app: AppName, instance: u64) -> BoxFut<()>;
    /// Removes an exited instance's runtime files (blocking).
    fn forget(&self, app: &AppName, instance: u64);
    /// Removes what a removed app left: its logs and run-dir leftovers (blocking).
    fn remove_app(&self, app: &AppName);
    /// The images containers on record run from, stopping ones included (blocking).
    fn images_in_use(&self) -> BTreeSet<ImageRef>;
}

pub trait States: Send + Sync + 'static {
    /// The stored state and, when the current file was unreadable, why the previous one is used.
    fn load(&self) -> Result<(DesiredState, Option<String>), String>;
    /// Writes a controller state with its own generation.
    fn save(&self, state: DesiredState) -> Result<(), String>;
    /// The file `skiff apply` writes (watched for changes).
    fn path(&self) -> PathBuf;
    /// The rollout record and the last good state (blocking).
    fn load_rollout(&self) -> RolloutFiles;
    /// Writes the rollout record (blocking).
    fn save_record(&self, record: &Record) -> Result<(), String>;
    /// Keeps `state` as the last good one, then writes `record` (blocking).
    fn commit(&self, state: &DesiredState, record: &Record) -> Result<(), String>;
}

/// The image side: look-ups, pulls and collection.
pub trait Images: Send + Sync + 'static {
    /// Which of `images` the store holds (blocking).
    fn present(&self, images: &[ImageRef]) -> BTreeSet<ImageRef>;
    /// Pulls `image` into the store.
    fn pull(&self, image: ImageRef, progress: Progress) -> BoxFut<Result<(), String>>;
    /// Removes images that none of `keep` names, and blobs nothing uses (blocking).
    fn collect(&self, keep: &BTreeSet<ImageRef>);
}

/// The real runtime: shims and libcontainer.
pub struct RealContainers(pub Arc<Runtime>);

impl Containers for RealContainers {
    fn scan(&self) -> Vec<Found> {
        self.0.scan()
    }

    fn start(&self, spec: AppSpec, instance: u64) -> BoxFut<Result<Running, String>> {
        let rt = self.0.clone();
        Box::pin(async move {
            let (started, digest, child) = rt.start(&spec, instance).await.map_err(|e| e.to_string())?;
            let pid = started.init_pid;
            let exit: BoxFut<ExitInfo> =
                Box::pin(async move { rt.wait_exit(&spec.name, instance, Some(child), started).await });
            Ok(Running { pid, digest, exit })
        })
    }

    fn watch(&self, app: AppName, instance: u64, started: Started) -> BoxFut<ExitInfo> {
        let rt = self.0.clone();
        Box::pin(async move { rt.wait_exit(&app, instance, None, started).await })
    }

    fn stop(&self, app: AppName, instance: u64, grace: Duration) -> BoxFut<()> {
        let rt = self.0.clone();
        Box::pin(async move { rt.stop(&app, instance, grace).await })
    }

    fn probe(&self, app: AppName, instance: u64, probe: Probe) -> BoxFut<(bool, String)> {
        let rt = self.0.clone();
        Box::pin(async move {
            let id = Paths::container_id(&app, instance);
            let seccomp = rt.paths.instance(&app, instance).join(crate::runtime::instance::SECCOMP);
            crate::probe::run(&probe, &rt.exe, &rt.paths.containers(), &id, &seccomp).await
        })
    }

    fn reap_lost(&self, app: AppName, instance: u64) -> BoxFut<()> {
        let rt = self.0.clone();
        Box::pin(async move { rt.reap_lost(&app, instance).await })
    }

    fn forget(&self, app: &AppName, instance: u64) {
        self.0.forget(app, instance)
    }

    fn remove_app(&self, app: &AppName) {
        if let Err(err) = self.0.remove_app_files(app) {
            tracing::warn!(app = %app, %err, "removing the files of a removed app");
        }
    }

    fn images_in_use(&self) -> BTreeSet<ImageRef> {
        self.0.images_in_use()
    }
}

impl States for StateStore {
    fn load(&self) -> Result<(DesiredState, Option<String>), String> {
        StateStore::load(self).map(|l| (l.state, l.fell_back)).map_err(|e| e.to_string())
    }

    fn save(&self, state: DesiredState) -> Result<(), String> {
        let generation = state.generation;
        StateStore::save(self, state, Some(generation)).map(|_| ()).map_err(|e| e.to_string())
    }

    fn path(&self) -> PathBuf {
        StateStore::path(self)
    }

    fn load_rollout(&self) -> RolloutFiles {
        StateStore::load_rollout(self)
    }

    fn save_record(&self, record: &Record) -> Result<(), String> {
        StateStore::save_record(self, record).map_err(|e| e.to_string())
    }

    fn commit(&self, state: &DesiredState, record: &Record) -> Result<(), String> {
        StateStore::commit(self, state, record).map_err(|e| e.to_string())
    }
}

/// The image store with no registry: sideloaded images only.
pub struct LocalImages(pub Arc<ImageStore>);

impl Images for LocalImages {
    fn present(&self, images: &[ImageRef]) -> BTreeSet<ImageRef> {
        images.iter().filter(|i| self.0.resolve(i).is_ok()).cloned().collect()
    }

    fn pull(&self, image: ImageRef, _: Progress) -> BoxFut<Result<(), String>> {
        Box::pin(async move {
            Err(format!("image {image} is not on this device and this agent has no registry configured"))
        })
    }

    fn collect(&self, _: &BTreeSet<ImageRef>) {}
}

/// The image store and a registry client: pulls over the air.
pub struct RegistryImages {
    pub store: ImageStore,
    pub client: Arc<skiff_registry::Client>,
}

impl Images for RegistryImages {
    fn present(&self, images: &[ImageRef]) -> BTreeSet<ImageRef> {
        images.iter().filter(|i| self.store.contains(i)).cloned().collect()
    }

    fn pull(&self, image: ImageRef, progress: Progress) -> BoxFut<Result<(), String>> {
        let (store, client) = (self.store.clone(), self.client.clone());
        Box::pin(async move {
            let report = move |p: crate::image::PullProgress| progress(p.done, p.total);
            // The intake decided that a pull is needed: resolve the reference again.
            crate::image::pull(&store, &client, &image, crate::image::PullPolicy::Always, &report)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    }

    fn collect(&self, keep: &BTreeSet<ImageRef>) {
        let keep: Vec<ImageRef> = keep.iter().cloned().collect();
        match self.store.gc(&keep) {
            Ok(report) => tracing::info!(?report, "images collected"),
            Err(err) => tracing::warn!(%err, "collecting unused images"),
        }
    }
}
