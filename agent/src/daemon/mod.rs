//! The agent's daemon loop: feeds events to the reconciler and carries out its
//! actions. Owns the tasks that start, stop and watch containers and run
//! probes, the local API socket, and the watch on the desired-state file.
//!
//! One task owns the `Intake` and the `Reconciler` (both pure); everything
//! else talks to it through one channel of inputs, so decisions are serial and
//! never race. The loop only carries out what they decide and never blocks:
//! starting, stopping and probing run in their own tasks, starts through a
//! concurrency limit; pulls run one at a time in a task; flash reads and writes
//! (the state file, image store look-ups) run on blocking threads and come back
//! as inputs. When the agent exits, containers keep running (their shims hold
//! them); the next agent adopts them.

use crate::api::{self, PsReply, Request, Response};
use crate::image::ImageStore;
use crate::intake::{self, Intake};
use crate::link::LinkHandle;
use crate::paths::Paths;
use crate::reconciler::{Action, BackoffConfig, Event, Note, Reconciler};
use crate::runtime::{FoundState, Runtime};
use crate::store::StateStore;
pub use ports::{
    BoxFut, Containers, Images, LocalImages, Progress, RealContainers, RegistryImages, Running, States,
};
use skiff_common::protocol::{EventKind, Reported};
use skiff_common::{AppName, AppStatus, DesiredState, ImageRef, Origin, Phase, PullStatus};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::time::Instant;
use tracing::{error, info, warn};

mod ports;
mod rollouts;
#[cfg(test)]
mod tests;

/// Containers being created at once, at most (a state with thousands of apps,
/// or a boot, starts them in waves; the loop, probes and the API stay free).
pub const START_CONCURRENCY: usize = 4;
/// How often pull progress is published while a pull runs.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

pub struct AgentConfig {
    pub paths: Paths,
    pub backoff: BackoffConfig,
    /// Bytes of log kept per app (current + rotated file).
    pub log_cap: u64,
    /// The controller link; `None` runs on the local desired state alone.
    pub link: Option<crate::link::LinkConfig>,
    /// How images are looked up, pulled and collected; `None`: the image store
    /// alone, with no registry (every pull fails with a clear reason).
    pub images: Option<Arc<dyn Images>>,
    /// systemd's notify socket, when the agent runs under systemd.
    pub notify: Option<crate::sdnotify::Notifier>,
    /// The parent cgroup's limits, set before the agent started (for `ps`).
    pub headroom: Option<crate::headroom::Headroom>,
}

/// What the loop is given: its ports, its settings, its link.
pub struct Parts {
    pub containers: Arc<dyn Containers>,
    pub states: Arc<dyn States>,
    pub images: Arc<dyn Images>,
    pub backoff: BackoffConfig,
    /// The API socket, bound.
    pub listener: UnixListener,
    /// Cgroup usage for `ps`, where the host has cgroups.
    pub usage: Option<Usage>,
    /// The controller link (reports and events go to it).
    pub link: Option<LinkHandle>,
    /// The verified states the link hands over.
    pub incoming: Option<mpsc::Receiver<crate::link::Incoming>>,
    /// The stored state (read before the link starts: its gate needs the
    /// generation), or why it could not be read.
    pub initial: Result<(DesiredState, Option<String>), String>,
    /// Told when the agent is ready and pinged from the loop (systemd).
    pub notify: Option<crate::sdnotify::Notifier>,
    /// The reserve and the apps' budget, shown by `ps`.
    pub headroom: Option<crate::headroom::Headroom>,
    /// The rollout record and the last good state, as read at start.
    pub rollout: crate::store::RolloutFiles,
}

/// The longest `READY=1` waits for the apps of the stored state to be created
/// (a slow board with many apps must not run into systemd's start timeout).
const READY_WAIT: Duration = Duration::from_secs(60);

enum Input {
    Event(Box<Event>),
    /// Re-read the desired-state file; answer with the generation now applied.
    Reload(Option<oneshot::Sender<Result<u64, String>>>),
    /// What the state file held, read on a blocking thread.
    Loaded(Result<(DesiredState, Option<String>), String>),
    /// The image digest a freshly started container runs.
    Digest(AppName, String),
    /// From the controller link.
    Link(crate::link::Incoming),
    /// A controller state and which of its images the store has.
    Offered(Box<DesiredState>, BTreeSet<ImageRef>),
    Pulled(ImageRef, Result<(), String>),
    Persisted(u64, Result<(), String>),
    /// Pull progress moved: publish it.
    Progress,
    /// Time to ping systemd's watchdog, or to stop waiting for the apps before `READY=1`.
    Timer,
}

/// Shared read-only view for the API.
#[derive(Default)]
struct View {
    generation: u64,
    apps: Vec<AppStatus>,
    pulls: Vec<PullStatus>,
    link: Option<tokio::sync::watch::Receiver<crate::link::LinkStatus>>,
    rollout: Option<skiff_common::RolloutStatus>,
}

/// Runs a blocking closure on tokio's blocking pool and sends its result to the loop.
fn off_loop<T: Send + 'static>(
    tx: &mpsc::UnboundedSender<Input>,
    work: impl FnOnce() -> T + Send + 'static,
    into: impl FnOnce(T) -> Input + Send + 'static,
) {
    let tx = tx.clone();
    tokio::spawn(async move {
        if let Ok(v) = tokio::task::spawn_blocking(work).await {
            let _ = tx.send(into(v));
        }
    });
}

/// The agent on this host: real containers, the state file, the image store.
pub async fn run(cfg: AgentConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let paths = cfg.paths.clone();
    // Private dirs and files (0700/0600), also on an install a umask or an older version left readable.
    paths.secure()?;
    let store_dir = paths.images();
    let images = Arc::new(tokio::task::spawn_blocking(move || ImageStore::open(&store_dir)).await??);
    let image_port: Arc<dyn Images> =
        cfg.images.clone().unwrap_or_else(|| Arc::new(LocalImages(images.clone())));
    let mut runtime = Runtime::new(paths.clone(), images.clone(), cfg.log_cap)?;
    runtime.default_memory = cfg.headroom.as_ref().and_then(|h| h.default_app_memory);
    let runtime = Arc::new(runtime);
    let states: Arc<dyn States> = Arc::new(StateStore::new(&paths.state_dir));
    let listener = bind_socket(&paths)?;
    let socket = paths.socket();
    let s = states.clone();
    let (initial, rollout) = tokio::task::spawn_blocking(move || (s.load(), s.load_rollout())).await?;
    let generation = initial.as_ref().map_or(0, |(s, _)| s.generation);
    let (link, incoming) = match cfg.link {
        Some(lc) => {
            let (handle, incoming) = crate::link::spawn(lc, generation)?;
            (Some(handle), Some(incoming))
        }
        None => (None, None),
    };
    let parts = Parts {
        containers: Arc::new(RealContainers(runtime)),
        states,
        images: image_port,
        backoff: cfg.backoff,
        listener,
        usage: Some(Usage { cgroups: crate::runtime::cgroups::Cgroups::detect(), paths: paths.clone() }),
        link,
        incoming,
        initial,
        notify: cfg.notify,
        headroom: cfg.headroom,
        rollout,
    };
    let r = run_with(parts, shutdown).await;
    let _ = std::fs::remove_file(&socket);
    r
}

/// The loop itself, on whatever ports it is given.
pub async fn run_with(parts: Parts, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let Parts {
        containers,
        states,
        images,
        backoff,
        listener,
        usage,
        link,
        incoming,
        initial,
        notify,
        headroom,
        rollout,
    } = parts;
    let (tx, mut rx) = mpsc::unbounded_channel::<Input>();
    let view = Arc::new(Mutex::new(View::default()));
    tokio::spawn(serve_api(listener, tx.clone(), view.clone(), usage.map(Arc::new), headroom));
    tokio::spawn(watch_state_file(states.path(), tx.clone()));

    let mut rec = Reconciler::new(backoff);
    let stored = initial.as_ref().ok().map(|(s, _)| (s.generation, s.rollout.rollback));
    let mut rollouts = rollouts::Rollouts::new(states.clone(), rollout, stored);
    let mut intake = Intake::new();
    let mut digests: HashMap<AppName, String> = HashMap::new();
    let pulls: Arc<Mutex<BTreeMap<String, PullStatus>>> = Arc::default();
    let mut ex = Executor {
        containers: containers.clone(),
        tx: tx.clone(),
        starts: Arc::new(Semaphore::new(START_CONCURRENCY)),
        images: images.clone(),
        states: states.clone(),
        pulls: pulls.clone(),
        answers: HashMap::new(),
        reload_replies: Vec::new(),
    };

    // Start-up: the stored desired state, then whatever a previous agent left running.
    match &initial {
        Ok((state, why)) => {
            if let Some(why) = why {
                warn!(%why, "desired state unreadable: running the previous generation");
            }
            info!(generation = state.generation, apps = state.apps.len(), "desired state loaded");
        }
        Err(e) => error!(
            error = %e,
            "no usable desired state on flash: keeping what runs until a new state comes (skiff apply or the controller)"
        ),
    }
    let unreadable = initial.is_err();
    if let Some(mut incoming) = incoming {
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(i) = incoming.recv().await {
                if tx.send(Input::Link(i)).is_err() {
                    return;
                }
            }
        });
    }
    if let Some(l) = &link {
        view.lock().unwrap_or_else(|p| p.into_inner()).link = Some(l.status());
    }
    let mut reported: Option<ReportKey> = None;
    let now = Instant::now();
    let mut actions = Vec::new();
    if let Ok(initial) = initial {
        for out in intake.step(intake::Input::Loaded { result: Ok(initial) }) {
            actions.extend(ex.carry_out_intake(out, &mut rec, &mut rollouts, now, link.as_ref()));
        }
    }
    publish(&rec, &digests, &pulls, &view, &rollouts);
    let c = containers.clone();
    let found = tokio::task::spawn_blocking(move || c.scan()).await?;
    if unreadable {
        // Nothing on flash says what should run: what ran goes on (generation 0,
        // so any state from `skiff apply` or the controller replaces it).
        let mut apps: BTreeMap<AppName, skiff_common::AppSpec> = BTreeMap::new();
        for f in found.iter().filter(|f| !matches!(f.state, FoundState::NeverStarted)) {
            apps.insert(f.app.clone(), f.spec.clone());
        }
        let state = DesiredState { apps: apps.into_values().collect(), ..DesiredState::empty() };
        actions.extend(rec.step(Event::Desired(state), now));
    }
    for found in found {
        digests.insert(found.app.clone(), found.image_digest.clone());
        let ev = match found.state {
            FoundState::Running(s) => {
                info!(app = %found.app, instance = found.instance, pid = s.init_pid, "adopting running container");
                let running_since = since(s.started_boot_ms, now);
                ex.watch(found.app.clone(), found.instance, s);
                Event::Adopted {
                    app: found.app,
                    instance: found.instance,
                    spec: found.spec,
                    pid: s.init_pid,
                    running_since,
                }
            }
            FoundState::Exited(exit) => {
                ex.forget(&found.app, found.instance);
                Event::AdoptedExited { app: found.app, instance: found.instance, spec: found.spec, exit }
            }
            FoundState::NeverStarted => {
                ex.forget(&found.app, found.instance);
                continue;
            }
            FoundState::Lost => {
                warn!(app = %found.app, instance = found.instance, "container lost its shim; killing it");
                containers.reap_lost(found.app.clone(), found.instance).await;
                ex.forget(&found.app, found.instance);
                let exit = skiff_common::ExitInfo { code: None, signal: None, oom_killed: false };
                Event::AdoptedExited { app: found.app, instance: found.instance, spec: found.spec, exit }
            }
        };
        actions.extend(rec.step(ev, now));
    }
    rollouts.feed(&actions);
    ex.carry_out(actions, link.as_ref());
    judge(&mut rollouts, &mut rec, &intake, &mut ex, now, link.as_ref());
    publish(&rec, &digests, &pulls, &view, &rollouts);
    report(intake.applied(), &view, link.as_ref(), &mut reported);

    // systemd: READY once the stored state's apps are adopted or created (or
    // READY_WAIT passed); watchdog pings from this loop, so a hung loop misses them.
    let mut ready_by = notify.as_ref().map(|_| now + READY_WAIT);
    let mut pings = notify.as_ref().and_then(|n| n.ping_every()).map(|every| {
        let mut i = tokio::time::interval_at(now + every, every);
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    });
    tell_if_ready(notify.as_ref(), &mut ready_by, &rec, &pulls, now);

    tokio::pin!(shutdown);
    loop {
        let deadline = rec.next_deadline();
        let input = tokio::select! {
            _ = &mut shutdown => break,
            i = rx.recv() => i,
            _ = sleep_until(deadline) => Some(Input::Event(Box::new(Event::Tick))),
            _ = sleep_until(rollouts.deadline()) => Some(Input::Event(Box::new(Event::Tick))),
            _ = sleep_until(ready_by) => Some(Input::Timer),
            _ = tick(pings.as_mut()) => Some(Input::Timer),
        };
        let Some(input) = input else { break };
        let now = Instant::now();
        let mut actions = Vec::new();
        let outs = match input {
            Input::Event(ev) => {
                let ev = *ev;
                let exited = match &ev {
                    Event::Exited { app, instance, .. } => Some((app.clone(), *instance)),
                    _ => None,
                };
                actions = rec.step(ev, now);
                if let Some((app, instance)) = exited {
                    ex.forget(&app, instance);
                }
                Vec::new()
            }
            Input::Digest(app, digest) => {
                digests.insert(app, digest);
                Vec::new()
            }
            Input::Link(crate::link::Incoming::Desired { state, persisted })
                if !rollouts.offered(&state, now) =>
            {
                // A generation that failed its rollout: taken, and not tried again.
                let _ = persisted.send(Ok(()));
                Vec::new()
            }
            Input::Link(crate::link::Incoming::Desired { state, persisted }) => {
                // Which images are here is a read of the store: off the loop.
                ex.answers.insert(state.generation, persisted);
                let port = images.clone();
                let wanted: Vec<ImageRef> = state.apps.iter().map(|a| a.image.clone()).collect();
                off_loop(&tx, move || port.present(&wanted), move |p| Input::Offered(Box::new(state), p));
                Vec::new()
            }
            Input::Offered(state, present) => intake.step(intake::Input::Offered { state: *state, present }),
            Input::Pulled(image, result) => intake.step(intake::Input::Pulled { image, result }),
            Input::Persisted(generation, result) => {
                intake.step(intake::Input::Persisted { generation, result })
            }
            Input::Reload(reply) => {
                ex.reload_replies.extend(reply);
                let s = states.clone();
                off_loop(&tx, move || s.load(), Input::Loaded);
                Vec::new()
            }
            Input::Loaded(result) => intake.step(intake::Input::Loaded { result }),
            Input::Progress => Vec::new(),
            Input::Timer => {
                if let (Some(n), Some(_)) = (&notify, &pings) {
                    n.ping();
                }
                Vec::new()
            }
        };
        for out in outs {
            actions.extend(ex.carry_out_intake(out, &mut rec, &mut rollouts, now, link.as_ref()));
        }
        rollouts.feed(&actions);
        ex.carry_out(actions, link.as_ref());
        judge(&mut rollouts, &mut rec, &intake, &mut ex, now, link.as_ref());
        publish(&rec, &digests, &pulls, &view, &rollouts);
        report(intake.applied(), &view, link.as_ref(), &mut reported);
        tell_if_ready(notify.as_ref(), &mut ready_by, &rec, &pulls, now);
    }
    info!("agent stopping; containers keep running");
    if let Some(n) = &notify {
        n.stopping();
    }
    Ok(())
}

/// Sends `READY=1` (once: `ready_by` is then cleared) when no app is being
/// created or replaced any more, or when `ready_by` has passed.
fn tell_if_ready(
    notify: Option<&crate::sdnotify::Notifier>,
    ready_by: &mut Option<Instant>,
    rec: &Reconciler,
    pulls: &Mutex<BTreeMap<String, PullStatus>>,
    now: Instant,
) {
    let (Some(n), Some(by)) = (notify, *ready_by) else { return };
    let apps = rec.status();
    let busy = apps.iter().any(|a| matches!(a.phase, Phase::Starting | Phase::Stopping));
    if busy && now < by {
        return;
    }
    let running = apps.iter().filter(|a| a.phase == Phase::Running).count();
    let pulling = pulls.lock().unwrap_or_else(|p| p.into_inner()).len();
    let mut status = format!("generation {}: {running}/{} apps running", rec.generation(), apps.len());
    if pulling > 0 {
        status.push_str(&format!(", {pulling} image pulls"));
    }
    n.ready(&status);
    info!(%status, "ready (told systemd)");
    *ready_by = None;
}

/// The next tick of `interval`, or never.
async fn tick(interval: Option<&mut tokio::time::Interval>) {
    match interval {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Converts a CLOCK_BOOTTIME stamp into the tokio clock.
fn since(boot_ms: u64, now: Instant) -> Instant {
    let age = crate::runtime::instance::boot_ms().saturating_sub(boot_ms);
    now.checked_sub(Duration::from_millis(age)).unwrap_or(now)
}

type ReportKey = (u64, Origin, Vec<AppStatus>, Vec<PullStatus>, skiff_common::RolloutStatus);

/// Lets the trial judge the apps after a step; carries out its verdict: the
/// events, and the last good state handed to the reconciler on a rollback.
fn judge(
    rollouts: &mut rollouts::Rollouts,
    rec: &mut Reconciler,
    intake: &Intake,
    ex: &mut Executor,
    now: Instant,
    link: Option<&LinkHandle>,
) {
    let Some((verdict, back)) = rollouts.observe(intake.applied(), || rec.status(), now) else { return };
    let (kind, app, detail) = match verdict {
        crate::rollout::Verdict::Commit { generation } => {
            (EventKind::Committed, None, format!("generation {generation} passed its test"))
        }
        crate::rollout::Verdict::Fail(f) => {
            let back_to =
                back.as_ref().map(|b| format!("; back to generation {}", b.generation)).unwrap_or_default();
            let kind = if back.is_some() { EventKind::RolledBack } else { EventKind::Error };
            (kind, f.app, format!("generation {} failed its test: {}{back_to}", f.generation, f.reason))
        }
    };
    if let Some(l) = link {
        l.event(kind, app, detail);
    }
    if let Some(good) = back {
        let actions = rec.step(Event::Desired(good), now);
        rollouts.feed(&actions);
        ex.carry_out(actions, link);
    }
}

/// Sends the observed state up when it changed since the last report (the
/// link itself re-sends the newest one on every reconnect). The generation
/// reported is the newest one handed over (also when it failed its test and
/// the last good one runs: `rollout` says so), so the controller's re-sends
/// of a failed generation are recognised and not tried again.
fn report(
    applied: &DesiredState,
    view: &Mutex<View>,
    link: Option<&LinkHandle>,
    last: &mut Option<ReportKey>,
) {
    let Some(link) = link else { return };
    let (apps, pulls, rollout) = {
        let v = view.lock().unwrap_or_else(|p| p.into_inner());
        (v.apps.clone(), v.pulls.clone(), v.rollout.clone().unwrap_or_default())
    };
    let origin = applied.origin;
    let now = (applied.generation, origin, apps, pulls, rollout);
    if last.as_ref() == Some(&now) {
        return;
    }
    link.report(Reported {
        device: link.device().clone(),
        generation_applied: now.0,
        origin,
        apps: now.2.clone(),
        pulls: now.3.clone(),
        rollout: now.4.clone(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        last_rejection: None,
        sent_unix: 0,
    });
    *last = Some(now);
}

fn publish(
    rec: &Reconciler,
    digests: &HashMap<AppName, String>,
    pulls: &Mutex<BTreeMap<String, PullStatus>>,
    view: &Mutex<View>,
    rollouts: &rollouts::Rollouts,
) {
    let mut apps = rec.status();
    for a in &mut apps {
        a.image_digest = digests.get(&a.name).cloned();
    }
    let pulls: Vec<PullStatus> = pulls.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
    let mut v = view.lock().unwrap_or_else(|p| p.into_inner());
    v.generation = rec.generation();
    v.apps = apps;
    v.pulls = pulls;
    v.rollout = Some(rollouts.status());
}

struct Executor {
    containers: Arc<dyn Containers>,
    tx: mpsc::UnboundedSender<Input>,
    /// Permits to create a container; held from create until started.
    starts: Arc<Semaphore>,
    images: Arc<dyn Images>,
    states: Arc<dyn States>,
    /// Pulls in flight or failed, by image, for `ps` and `reported`.
    pulls: Arc<Mutex<BTreeMap<String, PullStatus>>>,
    /// The link's `persisted` answers, by generation, until the intake answers.
    answers: HashMap<u64, oneshot::Sender<Result<(), String>>>,
    /// `skiff apply` waiting for the reload it asked for.
    reload_replies: Vec<oneshot::Sender<Result<u64, String>>>,
}

impl Executor {
    fn send(tx: &mpsc::UnboundedSender<Input>, ev: Event) {
        let _ = tx.send(Input::Event(Box::new(ev)));
    }

    /// Carries out one intake decision; returns the reconciler's actions when
    /// it hands a state on.
    fn carry_out_intake(
        &mut self,
        out: intake::Output,
        rec: &mut Reconciler,
        rollouts: &mut rollouts::Rollouts,
        now: Instant,
        link: Option<&LinkHandle>,
    ) -> Vec<Action> {
        match out {
            intake::Output::Pull { image } => {
                self.pull(image);
                Vec::new()
            }
            intake::Output::Persist { state } => {
                let states = self.states.clone();
                let generation = state.generation;
                info!(generation, apps = state.apps.len(), "persisting the controller's desired state");
                off_loop(&self.tx, move || states.save(state), move |r| Input::Persisted(generation, r));
                Vec::new()
            }
            intake::Output::Answer { generation, result } => {
                if let Err(reason) = &result {
                    if let Some(f) = rollouts.not_taken(generation, reason, now) {
                        if let Some(l) = link {
                            let detail = format!("generation {generation} given up: {}", f.reason);
                            l.event(EventKind::RolledBack, f.app, detail);
                        }
                        // Taken as far as the link goes: the controller learns
                        // from the report that it failed, and need not re-send it.
                        if let Some(tx) = self.answers.remove(&generation) {
                            let _ = tx.send(Ok(()));
                        }
                        return Vec::new();
                    }
                }
                match &result {
                    Ok(()) => info!(generation, "desired state from the controller persisted"),
                    Err(reason) => warn!(generation, %reason, "controller's desired state not taken (yet)"),
                }
                if let Some(tx) = self.answers.remove(&generation) {
                    let _ = tx.send(result);
                }
                Vec::new()
            }
            intake::Output::Apply { state } => {
                info!(generation = state.generation, apps = state.apps.len(), "applying the desired state");
                let handover = rollouts.handover(state, now);
                if let (Some(why), Some(l)) = (&handover.rolled_back, link) {
                    let detail = format!(
                        "generation {} is not run again ({why}); running generation {}",
                        rollouts.status().failed.map(|f| f.generation).unwrap_or_default(),
                        handover.run.generation
                    );
                    l.event(EventKind::RolledBack, None, detail);
                }
                rec.step(Event::Desired(handover.run), now)
            }
            intake::Output::Collect { mut keep } => {
                // The last good state's images stay: a rollback needs them.
                keep.extend(rollouts.good_images());
                let (images, containers) = (self.images.clone(), self.containers.clone());
                tokio::task::spawn_blocking(move || {
                    // What a container still runs from (one being stopped, or one a
                    // restart mid-update left) stays, whatever the states say.
                    keep.extend(containers.images_in_use());
                    images.collect(&keep)
                });
                Vec::new()
            }
            intake::Output::Event { kind, detail } => {
                warn!(%detail, "{}", kind.as_str());
                if let Some(l) = link {
                    l.event(kind, None, detail);
                }
                Vec::new()
            }
            intake::Output::Reloaded { result } => {
                for r in self.reload_replies.drain(..) {
                    let _ = r.send(result.clone());
                }
                Vec::new()
            }
        }
    }

    /// Runs one pull in a task; its progress goes to the shared table, its end
    /// to the loop.
    fn pull(&self, image: ImageRef) {
        let key = image.to_string();
        let table = self.pulls.clone();
        // A failure stays shown while the next attempt has moved no byte.
        set_pull(&table, &key, |_| {});
        let progress: Progress = {
            let (table, key, tx) = (table.clone(), key.clone(), self.tx.clone());
            let last = Arc::new(Mutex::new(None::<Instant>));
            Arc::new(move |done, total| {
                set_pull(&table, &key, |p| {
                    if done > p.done {
                        p.error = None;
                    }
                    p.done = done;
                    p.total = total;
                });
                let mut l = last.lock().unwrap_or_else(|p| p.into_inner());
                let now = Instant::now();
                if l.is_none_or(|t| now.duration_since(t) >= PROGRESS_EVERY) {
                    *l = Some(now);
                    let _ = tx.send(Input::Progress);
                }
            })
        };
        let (images, tx) = (self.images.clone(), self.tx.clone());
        info!(%image, "pulling");
        tokio::spawn(async move {
            let result = images.pull(image.clone(), progress).await;
            match &result {
                Ok(()) => {
                    info!(%image, "pulled");
                    table.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
                }
                Err(e) => {
                    warn!(%image, error = %e, "pull failed");
                    set_pull(&table, &key, |p| p.error = Some(e.clone()));
                }
            }
            let _ = tx.send(Input::Pulled(image, result));
        });
    }

    fn carry_out(&mut self, actions: Vec<Action>, link: Option<&LinkHandle>) {
        for a in actions {
            match a {
                Action::Start { app, instance, spec } => {
                    let c = self.containers.clone();
                    let tx = self.tx.clone();
                    let starts = self.starts.clone();
                    tokio::spawn(async move {
                        // Held until the container runs (or failed to): a storm of
                        // starts goes through in waves of START_CONCURRENCY.
                        let permit = starts.acquire_owned().await;
                        let started = c.start(spec, instance).await;
                        drop(permit);
                        match started {
                            Ok(running) => {
                                let _ = tx.send(Input::Digest(app.clone(), running.digest));
                                Self::send(
                                    &tx,
                                    Event::Started { app: app.clone(), instance, pid: running.pid },
                                );
                                let exit = running.exit.await;
                                Self::send(&tx, Event::Exited { app, instance, exit });
                            }
                            Err(error) => Self::send(&tx, Event::StartFailed { app, instance, error }),
                        }
                    });
                }
                Action::Stop { app, instance, grace } => {
                    tokio::spawn(self.containers.stop(app, instance, grace));
                }
                Action::Probe { app, instance, kind, probe } => {
                    let fut = self.containers.probe(app.clone(), instance, probe);
                    let tx = self.tx.clone();
                    tokio::spawn(async move {
                        let (ok, detail) = fut.await;
                        Self::send(&tx, Event::ProbeResult { app, instance, kind, ok, detail });
                    });
                }
                Action::Note(n) => {
                    log_note(&n);
                    if let Note::Removed { app } = &n {
                        let (c, app) = (self.containers.clone(), app.clone());
                        tokio::task::spawn_blocking(move || c.remove_app(&app));
                    }
                    if let Some(l) = link {
                        let (kind, app, detail) = note_event(&n);
                        l.event(kind, Some(app), detail);
                    }
                }
            }
        }
    }

    fn watch(&self, app: AppName, instance: u64, started: crate::runtime::instance::Started) {
        let exit = self.containers.watch(app.clone(), instance, started);
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let exit = exit.await;
            Self::send(&tx, Event::Exited { app, instance, exit });
        });
    }

    /// Removes an ended instance's files, off the loop.
    fn forget(&self, app: &AppName, instance: u64) {
        let (c, app) = (self.containers.clone(), app.clone());
        tokio::task::spawn_blocking(move || c.forget(&app, instance));
    }
}

fn set_pull(table: &Mutex<BTreeMap<String, PullStatus>>, key: &str, f: impl FnOnce(&mut PullStatus)) {
    let mut t = table.lock().unwrap_or_else(|p| p.into_inner());
    let entry = t.entry(key.to_string()).or_insert_with(|| PullStatus {
        image: key.to_string(),
        done: 0,
        total: 0,
        error: None,
    });
    f(entry);
}

fn log_note(n: &Note) {
    match n {
        Note::Started { app, instance, pid } => info!(app = %app, instance, pid, "started"),
        Note::StartFailed { app, error } => warn!(app = %app, %error, "start failed"),
        Note::Exited { app, exit } => {
            info!(app = %app, code = ?exit.code, signal = ?exit.signal, oom_killed = exit.oom_killed, "exited")
        }
        Note::Restarting { app, delay, restarts } => {
            info!(app = %app, ?delay, restarts, "restarting after delay")
        }
        Note::ProbeFailed { app, kind, detail } => warn!(app = %app, ?kind, %detail, "probe failed"),
        Note::Unhealthy { app, kind } => warn!(app = %app, ?kind, "unhealthy: killing the container"),
        Note::ReadyChanged { app, ready } => info!(app = %app, ready, "readiness changed"),
        Note::Replacing { app } => info!(app = %app, "spec changed: replacing the container"),
        Note::Removed { app } => info!(app = %app, "removed"),
    }
}

/// A reconciler note as a controller event.
fn note_event(n: &Note) -> (EventKind, AppName, String) {
    match n {
        Note::Started { app, instance, pid } => {
            (EventKind::Started, app.clone(), format!("instance {instance}, pid {pid}"))
        }
        Note::StartFailed { app, error } => (EventKind::StartFailed, app.clone(), error.clone()),
        Note::Exited { app, exit } if exit.oom_killed => {
            (EventKind::OomKilled, app.clone(), "killed by the OOM killer".into())
        }
        Note::Exited { app, exit } => (
            EventKind::Exited,
            app.clone(),
            match (exit.code, exit.signal) {
                (Some(c), _) => format!("exit code {c}"),
                (None, Some(s)) => format!("signal {s}"),
                _ => "lost (its shim died)".into(),
            },
        ),
        Note::Restarting { app, delay, restarts } => {
            (EventKind::Restarting, app.clone(), format!("restart {restarts} in {delay:?}"))
        }
        Note::ProbeFailed { app, kind, detail } => {
            (EventKind::ProbeFailed, app.clone(), format!("{kind:?}: {detail}"))
        }
        Note::Unhealthy { app, kind } => {
            (EventKind::Unhealthy, app.clone(), format!("{kind:?} probe failed: killing"))
        }
        Note::ReadyChanged { app, ready } => {
            (EventKind::ReadyChanged, app.clone(), format!("ready: {ready}"))
        }
        Note::Replacing { app } => (EventKind::Replacing, app.clone(), "spec changed".into()),
        Note::Removed { app } => (EventKind::Removed, app.clone(), String::new()),
    }
}

fn bind_socket(paths: &Paths) -> anyhow::Result<UnixListener> {
    let path = paths.socket();
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            anyhow::bail!("another agent is already running on {}", path.display());
        }
        std::fs::remove_file(&path)?;
    }
    let listener = UnixListener::bind(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Reads what running apps use from their cgroups, for `ps`.
pub struct Usage {
    cgroups: Option<crate::runtime::cgroups::Cgroups>,
    paths: Paths,
}

impl Usage {
    fn of(&self, apps: &[AppStatus]) -> Vec<api::Usage> {
        let Some(cg) = &self.cgroups else { return Vec::new() };
        apps.iter()
            .filter(|a| a.pid.is_some())
            .map(|a| {
                let path = self.paths.cgroup(&a.name);
                api::Usage {
                    name: a.name.to_string(),
                    cpu_seconds: cg.cpu_usage_ns(&path).map(|ns| ns as f64 / 1e9),
                    memory_bytes: cg.memory_bytes(&path),
                    pids: cg.pids(&path),
                }
            })
            .collect()
    }
}

async fn serve_api(
    listener: UnixListener,
    tx: mpsc::UnboundedSender<Input>,
    view: Arc<Mutex<View>>,
    usage: Option<Arc<Usage>>,
    headroom: Option<crate::headroom::Headroom>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let tx = tx.clone();
        let view = view.clone();
        let usage = usage.clone();
        let headroom = headroom.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut r = BufReader::new(r);
            let reply = match api::read_request(&mut r).await {
                Err(message) => Response::Error { message },
                Ok(Request::Ps) => {
                    let (generation, apps, link, pulls, rollout) = {
                        let v = view.lock().unwrap_or_else(|p| p.into_inner());
                        let link = v.link.as_ref().map(|l| {
                            let s = l.borrow();
                            api::LinkState {
                                connected: s.connected,
                                connects: s.connects,
                                last_error: s.last_error.clone(),
                            }
                        });
                        (v.generation, v.apps.clone(), link, v.pulls.clone(), v.rollout.clone())
                    };
                    let usage = usage.as_ref().map(|u| u.of(&apps)).unwrap_or_default();
                    Response::Ps(Box::new(PsReply {
                        generation,
                        apps,
                        usage,
                        link,
                        pulls,
                        headroom,
                        rollout,
                    }))
                }
                Ok(Request::Reload) => {
                    let (otx, orx) = tokio::sync::oneshot::channel();
                    let _ = tx.send(Input::Reload(Some(otx)));
                    match orx.await {
                        Ok(Ok(generation)) => Response::Reloaded { generation },
                        Ok(Err(message)) => Response::Error { message },
                        Err(_) => Response::Error { message: "agent is shutting down".into() },
                    }
                }
            };
            let mut line = serde_json::to_string(&reply).unwrap_or_default();
            line.push('\n');
            let _ = w.write_all(line.as_bytes()).await;
        });
    }
}

/// Polls the desired-state file once a second (a stat, no read, no write) so
/// a state written while the agent was busy, or by hand, is picked up.
async fn watch_state_file(path: std::path::PathBuf, tx: mpsc::UnboundedSender<Input>) {
    let stamp = |p: &std::path::Path| {
        std::fs::metadata(p).ok().map(|m| (m.ino(), m.mtime_nsec(), m.mtime(), m.len()))
    };
    let mut last = stamp(&path);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = stamp(&path);
        if now != last {
            last = now;
            if tx.send(Input::Reload(None)).is_err() {
                return;
            }
        }
    }
}
