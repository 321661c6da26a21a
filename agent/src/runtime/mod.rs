//! The runtime boundary: what the daemon calls to run containers.
//!
//! Containers are created by the shim (`shim.rs`), a single-threaded process
//! per container, never by the tokio process. This side prepares the shim's
//! input, spawns it, waits for its handshake, watches for the exit it records,
//! and stops containers (signals only; libcontainer's kill does not fork).
//! Spec building (`spec.rs`) is pure.
//!
//! Nothing here polls in steady state: a shim's exit (the agent's child or an
//! adopted one) and a stopping container's exit are awaited on pidfds
//! (`pidfd.rs`), and stops signal through a pidfd on the loop, no thread per
//! signal. Kernels without `pidfd_open` (before 5.3) fall back to reading
//! `/proc` and libcontainer's state on a timer (`wait_adopted_shim`,
//! `stop_by_polling`).

pub mod cgroups;
pub mod devices;
pub mod exec;
pub mod executor;
pub mod instance;
pub mod logs;
pub mod loopback;
pub mod pidfd;
pub mod shim;
pub mod spec;

use crate::image::ImageStore;
use crate::paths::Paths;
use crate::seccomp::{Arch, CapSet, Filter};
use instance::{Exit, ShimConfig, Started};
use libcontainer::container::Container;
use libcontainer::signal::Signal as LcSignal;
use pidfd::{PidfdError, ProcessFd, Signal};
use skiff_common::{AppName, AppSpec, ExitInfo};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("image {image}: {source}")]
    Image { image: String, source: crate::image::ImageError },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Start(String),
    #[error("the shim gave no answer within {0:?}")]
    Handshake(Duration),
    #[error("app {0}: {1} still runs: its files stay")]
    Busy(AppName, PathBuf),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RuntimeError + '_ {
    move |source| RuntimeError::Io { path: path.to_path_buf(), source }
}

/// A container found at start-up, left by a previous agent.
#[derive(Debug)]
pub struct Found {
    pub app: AppName,
    pub instance: u64,
    pub spec: AppSpec,
    pub image_digest: String,
    pub state: FoundState,
}

#[derive(Debug)]
pub enum FoundState {
    /// Still running under its shim.
    Running(Started),
    /// Exited while no agent was watching.
    Exited(ExitInfo),
    /// The shim is gone without recording an exit (killed): the container may
    /// linger. It is killed and counted as failed.
    Lost,
    /// The agent died before the container was started: nothing ran, nothing
    /// to count. The leftovers are removed and the app starts normally.
    NeverStarted,
}

pub struct Runtime {
    pub paths: Paths,
    images: Arc<ImageStore>,
    /// This binary, resolved once: shims and exec probes re-execute it.
    pub exe: PathBuf,
    pub log_cap: u64,
    /// Seccomp filters compiled so far, one per capability set that matters
    /// to the profile: compiled once, handed to every shim that needs one.
    filters: std::sync::Mutex<HashMap<CapSet, Filter>>,
    cgroup_version: std::sync::OnceLock<spec::CgroupVersion>,
    /// Memory limit of apps that set none (`--default-app-memory`).
    pub default_memory: Option<u64>,
}

/// Quarter seconds a stop keeps re-sending SIGKILL until the exit is recorded
/// (without pidfds only).
const STOP_RETRIES: u32 = 120;

/// How long a stop waits for the init to die after SIGKILL before it says so.
const KILL_WAIT: Duration = Duration::from_secs(30);

/// How long a shim may take to create and start a container.
const HANDSHAKE: Duration = Duration::from_secs(60);

/// How long a new agent waits for a shim that a dead agent left creating a container.
const SCAN_WAIT: Duration = Duration::from_secs(10);

impl Runtime {
    pub fn new(paths: Paths, images: Arc<ImageStore>, log_cap: u64) -> std::io::Result<Runtime> {
        let exe = std::env::current_exe()?;
        Ok(Runtime {
            paths,
            images,
            exe,
            log_cap,
            filters: std::sync::Mutex::new(HashMap::new()),
            cgroup_version: std::sync::OnceLock::new(),
            default_memory: None,
        })
    }

    /// Creates and starts a container; returns its `Started` record, the image
    /// digest, and the shim child (to be awaited by `wait_exit`).
    pub async fn start(
        &self,
        spec: &AppSpec,
        instance: u64,
    ) -> Result<(Started, String, Child), RuntimeError> {
        let resolved = self
            .images
            .resolve(&spec.image)
            .map_err(|source| RuntimeError::Image { image: spec.image.to_string(), source })?;
        let dir = self.paths.instance(&spec.name, instance);
        if dir.exists() {
            // A leftover of an instance with the same number (agent state lost):
            // it has no running container, or scan() would have adopted it.
            let _ = crate::image::unmount_rootfs(&dir.join("rootfs"));
            std::fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
        }
        // Private whatever the umask: shim.json holds the app's environment.
        for d in [self.paths.apps(), self.paths.apps().join(spec.name.as_str()), dir.clone()] {
            crate::fsutil::private_dir(&d).map_err(io_err(&d))?;
        }
        for m in &spec.mounts {
            // Volumes are created on first use, like Docker's named volumes.
            if !Path::new(&m.source).exists()
                && m.source.starts_with(self.paths.state_dir.to_string_lossy().as_ref())
            {
                std::fs::create_dir_all(&m.source).map_err(io_err(Path::new(&m.source)))?;
            }
        }
        let container_id = Paths::container_id(&spec.name, instance);
        let stale = self.paths.containers().join(&container_id);
        if stale.exists() {
            force_delete(&stale).await;
        }
        let cfg = ShimConfig {
            spec: spec.clone(),
            instance,
            container_id,
            container_root: self.paths.containers(),
            cgroup_path: self.paths.cgroup(&spec.name),
            image_digest: resolved.digest.clone(),
            image_rootfs: resolved.rootfs.clone(),
            image_config: resolved.config.clone(),
            log_dir: self.paths.log_dir.clone(),
            log_cap: self.log_cap,
            seccomp: self.seccomp_filter(spec),
            default_memory: self.default_memory,
        };
        instance::write(&dir, instance::CONFIG, &cfg).map_err(io_err(&dir))?;
        let log_path = dir.join(instance::SHIM_LOG);
        let log = crate::fsutil::create_private(&log_path, true).map_err(io_err(&log_path))?;
        // The shim makes itself a session leader (so no Ctrl-C or hang-up meant
        // for the agent reaches it): it must not be made a group leader here.
        // Its stdout is only the handshake; its stderr is its own log file,
        // never the agent's stdio, so the agent's death cannot touch it.
        // A failed spawn (no pids, no memory) is this app's start failure.
        let mut child = Command::new(&self.exe)
            .arg("shim")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(false)
            .spawn()
            .map_err(io_err(&self.exe))?;
        let stdout = child.stdout.take().ok_or_else(|| RuntimeError::Start("shim has no stdout".into()))?;
        let mut line = String::new();
        let read = tokio::time::timeout(HANDSHAKE, BufReader::new(stdout).read_line(&mut line)).await;
        match read {
            Ok(Ok(_)) if line.starts_with("ok ") => {}
            Ok(_) => {
                let _ = child.wait().await;
                let msg = line.trim().strip_prefix("err ").unwrap_or("the shim exited without an answer");
                let _ = std::fs::remove_dir_all(&dir);
                return Err(RuntimeError::Start(msg.to_string()));
            }
            Err(_) => {
                let _ = child.kill().await;
                return Err(RuntimeError::Handshake(HANDSHAKE));
            }
        }
        let started: Started =
            instance::read(&dir, instance::STARTED).map_err(io_err(&dir))?.ok_or_else(|| {
                RuntimeError::Start("the shim reported success but wrote no started.json".into())
            })?;
        Ok((started, resolved.digest, child))
    }

    /// The app's seccomp filter, from the cache when an app with the same
    /// capabilities had one compiled before. `None`: unconfined.
    fn seccomp_filter(&self, app: &AppSpec) -> Option<Filter> {
        if !spec::seccomp_confined(app) {
            return None;
        }
        let version = *self
            .cgroup_version
            .get_or_init(|| cgroups::Cgroups::detect().map(|c| c.version).unwrap_or(spec::CgroupVersion::V1));
        let names: Vec<&str> =
            spec::capabilities(app, version).into_iter().map(skiff_common::Capability::as_str).collect();
        let caps = CapSet::from_names(&names);
        let mut cache = self.filters.lock().unwrap_or_else(|p| p.into_inner());
        Some(cache.entry(caps).or_insert_with(|| Filter::compile(Arch::host(), caps)).clone())
    }

    /// Waits until the instance has exited and returns how. `child` is the shim
    /// when this agent spawned it (tokio waits for its children on a pidfd);
    /// an adopted shim is watched through a pidfd of its own. The shim writes
    /// exit.json before it exits: it is read once, after.
    pub async fn wait_exit(
        &self,
        app: &AppName,
        instance: u64,
        child: Option<Child>,
        started: Started,
    ) -> ExitInfo {
        let dir = self.paths.instance(app, instance);
        if let Some(mut child) = child {
            let _ = child.wait().await;
        } else {
            wait_adopted_shim(app, instance, &started).await;
        }
        match instance::read::<Exit>(&dir, instance::EXIT) {
            Ok(Some(e)) => e.exit,
            _ => {
                // The shim died without recording the exit: make sure nothing is left.
                tracing::warn!(app = %app, instance, "shim ended without recording an exit; killing what remains");
                force_delete(&self.paths.containers().join(Paths::container_id(app, instance))).await;
                let _ = crate::image::unmount_rootfs(&dir.join("rootfs"));
                ExitInfo { code: None, signal: None, oom_killed: false }
            }
        }
    }

    /// Sends SIGTERM to the container's init; after `grace`, SIGKILL (which
    /// ends every process in the container's pid namespace). Returns once the
    /// init has exited or the signals are sent; the exit is seen by `wait_exit`.
    pub async fn stop(&self, app: &AppName, instance: u64, grace: Duration) {
        let dir = self.paths.instance(app, instance);
        let started: Option<Started> = instance::read(&dir, instance::STARTED).ok().flatten();
        match started.as_ref().map(open_init) {
            Some(Ok(Some(init))) => stop_init(app, instance, &init, grace).await,
            // The init has exited, or its shim is gone and the exit watcher
            // (`wait_exit`) kills what remains: nothing to signal.
            Some(Ok(None)) => {}
            Some(Err(PidfdError::Unsupported)) => self.stop_by_polling(app, instance, grace).await,
            Some(Err(err)) => {
                tracing::warn!(app = %app, instance, %err, "cannot stop through a pidfd: signalling by pid");
                self.stop_by_polling(app, instance, grace).await
            }
            None => self.stop_by_polling(app, instance, grace).await,
        }
    }

    /// `stop` where there are no pidfds: libcontainer's kill on a thread,
    /// exit.json looked for on a timer, SIGKILL sent again until it shows.
    async fn stop_by_polling(&self, app: &AppName, instance: u64, grace: Duration) {
        let root = self.paths.containers().join(Paths::container_id(app, instance));
        let dir = self.paths.instance(app, instance);
        signal(&root, LcSignal::try_from("SIGTERM").ok(), false).await;
        let deadline = deadline_after(tokio::time::Instant::now(), grace);
        while tokio::time::Instant::now() < deadline {
            if dir.join(instance::EXIT).exists() || !root.exists() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tracing::info!(app = %app, instance, ?grace, "did not stop within its grace period: SIGKILL");
        // SIGKILL to the init is enough: every container has its own pid
        // namespace, and when its init dies the kernel kills everything in it.
        // libcontainer's kill-all freezes the cgroup meanwhile, which races the
        // shim's cgroup removal (rmdir fails while frozen tasks remain).
        signal(&root, LcSignal::try_from("SIGKILL").ok(), false).await;
        // A signal can be lost: libcontainer's state file is rewritten in place
        // and may not load at that instant (seen under load after an agent was
        // killed mid-apply: the app stayed "stopping" for good). Until the exit
        // is recorded, send it again, and to the init's pid as well while its
        // shim lives (so the pid is still the container's).
        for round in 1..=STOP_RETRIES {
            tokio::time::sleep(Duration::from_millis(250)).await;
            if dir.join(instance::EXIT).exists() || !root.exists() {
                return;
            }
            if round % 4 == 0 {
                tracing::warn!(app = %app, instance, "still running after SIGKILL: sending it again");
                signal(&root, LcSignal::try_from("SIGKILL").ok(), false).await;
                if let Ok(Some(s)) = instance::read::<Started>(&dir, instance::STARTED) {
                    if instance::shim_alive(&s) {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(s.init_pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
            }
        }
    }

    /// Removes an instance's runtime files once its exit has been handled.
    pub fn forget(&self, app: &AppName, instance: u64) {
        let dir = self.paths.instance(app, instance);
        let _ = crate::image::unmount_rootfs(&dir.join("rootfs"));
        let _ = std::fs::remove_dir_all(&dir);
        // The app's directory goes with its last instance (fails while others remain).
        if let Some(app_dir) = dir.parent() {
            let _ = std::fs::remove_dir(app_dir);
        }
    }

    /// Everything a previous agent left under the run dir.
    /// The images of every container instance on record (running, being
    /// stopped, or exited and not yet forgotten). Only reads: unlike `scan`,
    /// safe while the agent runs.
    pub fn images_in_use(&self) -> std::collections::BTreeSet<skiff_common::ImageRef> {
        let mut out = std::collections::BTreeSet::new();
        let Ok(apps) = std::fs::read_dir(self.paths.apps()) else { return out };
        for app_dir in apps.flatten() {
            let Ok(instances) = std::fs::read_dir(app_dir.path()) else { continue };
            for inst in instances.flatten() {
                if let Ok(Some(cfg)) = instance::read::<ShimConfig>(&inst.path(), instance::CONFIG) {
                    out.insert(cfg.spec.image);
                }
            }
        }
        out
    }

    pub fn scan(&self) -> Vec<Found> {
        let mut out = Vec::new();
        let Ok(apps) = std::fs::read_dir(self.paths.apps()) else { return out };
        for app_dir in apps.flatten() {
            let Ok(app) = AppName::try_from(app_dir.file_name().to_string_lossy().as_ref()) else { continue };
            let Ok(instances) = std::fs::read_dir(app_dir.path()) else { continue };
            for inst in instances.flatten() {
                let dir = inst.path();
                let Ok(instance) = inst.file_name().to_string_lossy().parse::<u64>() else { continue };
                let cfg: Option<ShimConfig> = instance::read(&dir, instance::CONFIG).ok().flatten();
                let Some(cfg) = cfg else {
                    let _ = std::fs::remove_dir_all(&dir);
                    continue;
                };
                let state = self.classify(&dir, &cfg);
                out.push(Found {
                    app: app.clone(),
                    instance,
                    spec: cfg.spec,
                    image_digest: cfg.image_digest,
                    state,
                });
            }
        }
        out.sort_by(|a, b| (&a.app, a.instance).cmp(&(&b.app, b.instance)));
        out
    }

    /// What became of one instance a previous agent left. When nothing is
    /// recorded yet but its shim lives, the previous agent died while that
    /// shim was creating the container: wait (up to `SCAN_WAIT`, blocking,
    /// at start-up only) for the shim's record rather than take a container
    /// being born for lost; a shim still silent after that is killed.
    fn classify(&self, dir: &Path, cfg: &ShimConfig) -> FoundState {
        let shim: Option<instance::ShimPid> = instance::read(dir, instance::SHIM_PID).ok().flatten();
        let mut waited = Duration::ZERO;
        loop {
            let exit: Option<Exit> = instance::read(dir, instance::EXIT).ok().flatten();
            let started: Option<Started> = instance::read(dir, instance::STARTED).ok().flatten();
            match (exit, started) {
                (Some(e), _) => return FoundState::Exited(e.exit),
                (None, Some(s)) if instance::shim_alive(&s) => return FoundState::Running(s),
                (None, Some(_)) => return FoundState::Lost,
                (None, None) => {}
            }
            match shim {
                Some(p) if p.alive() && waited < SCAN_WAIT => {
                    std::thread::sleep(Duration::from_millis(20));
                    waited += Duration::from_millis(20);
                    continue;
                }
                Some(p) if p.alive() => {
                    tracing::warn!(dir = %dir.display(), pid = p.pid, "shim still starting after {SCAN_WAIT:?}: killing it");
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(p.pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    return FoundState::Lost;
                }
                _ => {}
            }
            // A bundle or libcontainer state means creation had begun.
            return if dir.join("bundle").exists() || self.paths.containers().join(&cfg.container_id).exists()
            {
                FoundState::Lost
            } else {
                FoundState::NeverStarted
            };
        }
    }

    /// Removes what an app that left the desired state leaves behind: its logs
    /// (current and rotated) and its run directory `apps/<app>/` with any
    /// instance leftovers (root file systems unmounted first). For the daemon,
    /// once the app's last instance has exited; while an instance still runs
    /// nothing is removed (`Busy`). Volumes are the app's data and stay.
    pub fn remove_app_files(&self, app: &AppName) -> Result<(), RuntimeError> {
        let app_dir = self.paths.apps().join(app.as_str());
        let instances: Vec<PathBuf> = match std::fs::read_dir(&app_dir) {
            Ok(rd) => rd.flatten().map(|e| e.path()).collect(),
            Err(_) => Vec::new(),
        };
        for dir in &instances {
            let started: Option<Started> = instance::read(dir, instance::STARTED).ok().flatten();
            let shim: Option<instance::ShimPid> = instance::read(dir, instance::SHIM_PID).ok().flatten();
            let live = started.is_some_and(|s| instance::shim_alive(&s)) || shim.is_some_and(|p| p.alive());
            if live && !dir.join(instance::EXIT).exists() {
                return Err(RuntimeError::Busy(app.clone(), dir.clone()));
            }
        }
        let mut first_err = None;
        let mut keep = |r: Result<(), RuntimeError>| {
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        };
        for dir in &instances {
            let _ = crate::image::unmount_rootfs(&dir.join("rootfs"));
            keep(remove_all(dir));
        }
        keep(remove_all(&app_dir));
        for log in [
            logs::current(&self.paths.log_dir, app.as_str()),
            logs::rotated(&self.paths.log_dir, app.as_str()),
        ] {
            match std::fs::remove_file(&log) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    keep(Err(RuntimeError::Io { path: log.clone(), source: e }))
                }
                _ => {}
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Kills and deletes what a lost shim left behind.
    pub async fn reap_lost(&self, app: &AppName, instance: u64) {
        force_delete(&self.paths.containers().join(Paths::container_id(app, instance))).await;
    }
}

/// Waits until an adopted shim (not this agent's child) has exited.
async fn wait_adopted_shim(app: &AppName, instance: u64, started: &Started) {
    match ProcessFd::open(started.shim_pid, || instance::shim_alive(started)) {
        Ok(Some(shim)) => shim.exited().await,
        Ok(None) => {}
        Err(err) => {
            // Kernels before 5.3; or no file descriptor to spare, where polling
            // is better than losing the exit.
            if !matches!(err, PidfdError::Unsupported) {
                tracing::warn!(app = %app, instance, %err, "cannot watch the shim through a pidfd: polling /proc");
            }
            while instance::shim_alive(started) {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// A pidfd on the container's init, if it still runs under its shim.
/// The init is the shim's child (libcontainer clones it with CLONE_PARENT),
/// and the shim is the process `started` recorded: a pid the init left and
/// another process took fails one of these.
fn open_init(started: &Started) -> Result<Option<ProcessFd>, PidfdError> {
    ProcessFd::open(started.init_pid, || {
        instance::shim_alive(started) && instance::process_parent(started.init_pid) == Some(started.shim_pid)
    })
}

/// SIGTERM through the init's pidfd, SIGKILL after `grace`; waits on the
/// pidfd, so a stop costs no thread and no wake-up until the exit.
async fn stop_init(app: &AppName, instance: u64, init: &ProcessFd, grace: Duration) {
    let send = |sig: Signal| {
        if let Err(err) = init.signal(sig) {
            tracing::warn!(app = %app, instance, pid = init.pid(), %err, ?sig, "signalling the container's init");
        }
    };
    send(Signal::TERM);
    let deadline = deadline_after(tokio::time::Instant::now(), grace);
    if tokio::time::timeout_at(deadline, init.exited()).await.is_ok() {
        return;
    }
    tracing::info!(app = %app, instance, ?grace, "did not stop within its grace period: SIGKILL");
    // SIGKILL to the init is enough: every container has its own pid
    // namespace, and when its init dies the kernel kills everything in it.
    // Through the pidfd it cannot be lost nor reach another process; an
    // init in uninterruptible sleep dies when it leaves it.
    send(Signal::KILL);
    if tokio::time::timeout(KILL_WAIT, init.exited()).await.is_err() {
        tracing::warn!(app = %app, instance, pid = init.pid(), "still running {KILL_WAIT:?} after SIGKILL");
    }
}

/// `now + d` for a `d` from input (a stop grace, a probe timeout): a year on
/// instead of a panic when it would overflow the clock. Validation bounds
/// these durations already; this keeps a missed case from crashing the agent.
pub(crate) fn deadline_after(now: tokio::time::Instant, d: Duration) -> tokio::time::Instant {
    const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);
    now.checked_add(d).or_else(|| now.checked_add(YEAR)).unwrap_or(now)
}

fn remove_all(dir: &Path) -> Result<(), RuntimeError> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(RuntimeError::Io { path: dir.to_path_buf(), source: e })
        }
        _ => Ok(()),
    }
}

/// Runs `f` on a thread of its own and awaits it; when the OS refuses a
/// thread (thread or pid exhaustion), runs it inline instead. Not tokio's
/// `spawn_blocking`, which panics then (and panics abort the agent).
/// `None` if `f` panicked.
async fn off_loop<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let job = Arc::new(std::sync::Mutex::new(Some(f)));
    let (tx, rx) = tokio::sync::oneshot::channel();
    let theirs = job.clone();
    let spawned = std::thread::Builder::new().name("runtime-io".into()).spawn(move || {
        let f = theirs.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(f) = f {
            let _ = tx.send(f());
        }
    });
    if spawned.is_err() {
        let f = job.lock().unwrap_or_else(|p| p.into_inner()).take();
        return f.map(|f| f());
    }
    rx.await.ok()
}

async fn signal(root: &Path, sig: Option<LcSignal>, all: bool) {
    let Some(sig) = sig else { return };
    let root = root.to_path_buf();
    off_loop(move || {
        if let Ok(mut c) = Container::load(root) {
            // Fails harmlessly when the container has just exited.
            let _ = c.kill(sig, all);
        }
    })
    .await;
}

/// SIGKILLs every process of a container and deletes its state and cgroup.
async fn force_delete(root: &Path) {
    let root = root.to_path_buf();
    off_loop(move || {
        if let Ok(mut c) = Container::load(root.clone()) {
            let _ = c.delete(true);
        }
        let _ = std::fs::remove_dir_all(&root);
    })
    .await;
}

#[cfg(test)]
mod deadline_tests {
    use super::*;

    #[test]
    fn a_huge_duration_gives_a_far_deadline_not_a_panic() {
        let now = tokio::time::Instant::now();
        assert_eq!(deadline_after(now, Duration::from_secs(3)), now + Duration::from_secs(3));
        for d in [Duration::MAX, Duration::from_secs(u64::MAX), Duration::from_secs(i64::MAX as u64)] {
            assert!(deadline_after(now, d) >= now + Duration::from_secs(365 * 24 * 3600), "{d:?}");
        }
    }
}
