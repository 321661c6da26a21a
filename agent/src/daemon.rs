//! The agent's daemon loop: feeds events to the reconciler and carries out its
//! actions. Owns the tasks that start, stop and watch containers and run
//! probes, the local API socket, and the watch on the desired-state file.
//!
//! One task owns the `Reconciler`; everything else talks to it through one
//! channel of events, so decisions are serial and never race. The loop never
//! blocks on a container: starting, stopping and probing run in their own
//! tasks. When the agent exits, containers keep running (their shims hold
//! them); the next agent adopts them.

use crate::api::{self, PsReply, Request, Response};
use crate::image::ImageStore;
use crate::link::LinkHandle;
use crate::paths::Paths;
use crate::reconciler::{Action, BackoffConfig, Event, Note, Reconciler};
use crate::runtime::{FoundState, Runtime};
use crate::store::StateStore;
use skiff_common::protocol::{EventKind, Reported};
use skiff_common::{AppName, AppStatus, Origin};
use std::collections::HashMap;
use std::future::Future;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{error, info, warn};

pub struct AgentConfig {
    pub paths: Paths,
    pub backoff: BackoffConfig,
    /// Bytes of log kept per app (current + rotated file).
    pub log_cap: u64,
    /// The controller link; `None` runs on the local desired state alone.
    pub link: Option<crate::link::LinkConfig>,
}

enum Input {
    Event(Box<Event>),
    /// Re-read the desired-state file; answer with the generation now applied.
    Reload(Option<tokio::sync::oneshot::Sender<Result<u64, String>>>),
    /// The image digest a freshly started container runs.
    Digest(AppName, String),
    /// From the controller link.
    Link(crate::link::Incoming),
}

/// Shared read-only view for the API.
#[derive(Default)]
struct View {
    generation: u64,
    apps: Vec<AppStatus>,
    link: Option<tokio::sync::watch::Receiver<crate::link::LinkStatus>>,
}

pub async fn run(cfg: AgentConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let paths = cfg.paths.clone();
    for dir in [&paths.state_dir, &paths.run_dir, &paths.log_dir] {
        std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
    }
    std::fs::set_permissions(&paths.run_dir, std::fs::Permissions::from_mode(0o700))?;
    let images = Arc::new(ImageStore::open(&paths.images())?);
    let runtime = Arc::new(Runtime::new(paths.clone(), images.clone(), cfg.log_cap)?);
    let store = StateStore::new(&paths.state_dir);

    let (tx, mut rx) = mpsc::unbounded_channel::<Input>();
    let view = Arc::new(Mutex::new(View::default()));
    let listener = bind_socket(&paths)?;
    let usage = Usage { cgroups: crate::runtime::cgroups::Cgroups::detect(), paths: paths.clone() };
    tokio::spawn(serve_api(listener, tx.clone(), view.clone(), Arc::new(usage)));
    tokio::spawn(watch_state_file(store.path(), tx.clone()));

    let mut rec = Reconciler::new(cfg.backoff);
    let mut digests: HashMap<AppName, String> = HashMap::new();
    let mut ex = Executor { runtime: runtime.clone(), tx: tx.clone() };

    // Start-up: the stored desired state, then whatever a previous agent left running.
    let loaded = store.load()?;
    if let Some(why) = &loaded.fell_back {
        warn!(%why, "desired state unreadable: running the previous generation");
    }
    info!(generation = loaded.state.generation, apps = loaded.state.apps.len(), "desired state loaded");
    let mut origin = loaded.state.origin;
    let link = match cfg.link {
        Some(lc) => {
            let (handle, mut incoming) = crate::link::spawn(lc, loaded.state.generation)?;
            let tx = tx.clone();
            tokio::spawn(async move {
                while let Some(i) = incoming.recv().await {
                    if tx.send(Input::Link(i)).is_err() {
                        return;
                    }
                }
            });
            view.lock().unwrap_or_else(|p| p.into_inner()).link = Some(handle.status());
            Some(handle)
        }
        None => None,
    };
    let mut reported: Option<(u64, Origin, Vec<AppStatus>)> = None;
    let now = Instant::now();
    let mut actions = rec.step(Event::Desired(loaded.state), now);
    for found in runtime.scan() {
        digests.insert(found.app.clone(), found.image_digest.clone());
        let ev = match found.state {
            FoundState::Running(s) => {
                info!(app = %found.app, instance = found.instance, pid = s.init_pid, "adopting running container");
                let running_since = since(s.started_boot_ms, now);
                ex.watch(found.app.clone(), found.instance, None, s);
                Event::Adopted {
                    app: found.app,
                    instance: found.instance,
                    spec: found.spec,
                    pid: s.init_pid,
                    running_since,
                }
            }
            FoundState::Exited(exit) => {
                runtime.forget(&found.app, found.instance);
                Event::AdoptedExited { app: found.app, instance: found.instance, spec: found.spec, exit }
            }
            FoundState::NeverStarted => {
                runtime.forget(&found.app, found.instance);
                continue;
            }
            FoundState::Lost => {
                warn!(app = %found.app, instance = found.instance, "container lost its shim; killing it");
                runtime.reap_lost(&found.app, found.instance).await;
                runtime.forget(&found.app, found.instance);
                let exit = skiff_common::ExitInfo { code: None, signal: None, oom_killed: false };
                Event::AdoptedExited { app: found.app, instance: found.instance, spec: found.spec, exit }
            }
        };
        actions.extend(rec.step(ev, now));
    }
    ex.carry_out(actions, link.as_ref());
    publish(&rec, &digests, &view);
    report(&rec, &view, origin, link.as_ref(), &mut reported);

    tokio::pin!(shutdown);
    loop {
        let deadline = rec.next_deadline();
        let input = tokio::select! {
            _ = &mut shutdown => break,
            i = rx.recv() => i,
            _ = sleep_until(deadline) => Some(Input::Event(Box::new(Event::Tick))),
        };
        let Some(input) = input else { break };
        let now = Instant::now();
        let actions = match input {
            Input::Event(ev) => {
                let ev = *ev;
                let exited = match &ev {
                    Event::Exited { app, instance, .. } => Some((app.clone(), *instance)),
                    _ => None,
                };
                let actions = rec.step(ev, now);
                if let Some((app, instance)) = exited {
                    runtime.forget(&app, instance);
                }
                actions
            }
            Input::Digest(app, digest) => {
                digests.insert(app, digest);
                Vec::new()
            }
            Input::Link(crate::link::Incoming::Desired { state, persisted }) => {
                let generation = state.generation;
                // The new images must be here before anything old is stopped.
                // Until they are, the state is not persisted: the link keeps it
                // unacknowledged, says why, and offers it again with backoff.
                let missing: Vec<String> = state
                    .apps
                    .iter()
                    .filter(|a| images.resolve(&a.image).is_err())
                    .map(|a| format!("app {}: image {} is not on this device", a.name, a.image))
                    .collect();
                if !missing.is_empty() {
                    let reason = missing.join("; ");
                    warn!(generation, %reason, "controller's desired state waits for its images");
                    let _ = persisted.send(Err(reason));
                    continue;
                }
                let superseded = (origin == Origin::Local && rec.generation() > 0).then(|| rec.generation());
                // Persist before acknowledging: the link acks the broker only on Ok.
                match store.save(state.clone(), Some(generation)) {
                    Ok(_) => {
                        let _ = persisted.send(Ok(()));
                        info!(generation, apps = state.apps.len(), "desired state from the controller");
                        if let (Some(l), Some(local)) = (&link, superseded) {
                            l.event(
                                EventKind::Replacing,
                                None,
                                format!("local desired state (generation {local}) replaced by the controller's generation {generation}; it is kept as desired.prev.skf"),
                            );
                        }
                        origin = Origin::Controller;
                        rec.step(Event::Desired(state), now)
                    }
                    Err(e) => {
                        error!(%e, generation, "cannot persist the controller's desired state");
                        let _ = persisted.send(Err(e.to_string()));
                        Vec::new()
                    }
                }
            }
            Input::Reload(reply) => match store.load() {
                Ok(l) => {
                    if let Some(why) = &l.fell_back {
                        warn!(%why, "desired state unreadable: using the previous generation");
                    }
                    let generation = l.state.generation;
                    let actions = if generation != rec.generation() || rec.generation() == 0 {
                        info!(generation, apps = l.state.apps.len(), "desired state changed");
                        origin = l.state.origin;
                        rec.step(Event::Desired(l.state), now)
                    } else {
                        Vec::new()
                    };
                    if let Some(r) = reply {
                        let _ = r.send(Ok(generation));
                    }
                    actions
                }
                Err(e) => {
                    error!(%e, "cannot read the desired state; keeping what runs");
                    if let Some(r) = reply {
                        let _ = r.send(Err(e.to_string()));
                    }
                    Vec::new()
                }
            },
        };
        ex.carry_out(actions, link.as_ref());
        publish(&rec, &digests, &view);
        report(&rec, &view, origin, link.as_ref(), &mut reported);
    }
    info!("agent stopping; containers keep running");
    Ok(())
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

/// Sends the observed state up when it changed since the last report (the
/// link itself re-sends the newest one on every reconnect).
fn report(
    rec: &Reconciler,
    view: &Mutex<View>,
    origin: Origin,
    link: Option<&LinkHandle>,
    last: &mut Option<(u64, Origin, Vec<AppStatus>)>,
) {
    let Some(link) = link else { return };
    let apps = view.lock().unwrap_or_else(|p| p.into_inner()).apps.clone();
    let now = (rec.generation(), origin, apps);
    if last.as_ref() == Some(&now) {
        return;
    }
    link.report(Reported {
        device: link.device().clone(),
        generation_applied: now.0,
        origin,
        apps: now.2.clone(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        last_rejection: None,
        sent_unix: 0,
        pulls: Vec::new(),
    });
    *last = Some(now);
}

fn publish(rec: &Reconciler, digests: &HashMap<AppName, String>, view: &Mutex<View>) {
    let mut apps = rec.status();
    for a in &mut apps {
        a.image_digest = digests.get(&a.name).cloned();
    }
    let mut v = view.lock().unwrap_or_else(|p| p.into_inner());
    v.generation = rec.generation();
    v.apps = apps;
}

struct Executor {
    runtime: Arc<Runtime>,
    tx: mpsc::UnboundedSender<Input>,
}

impl Executor {
    fn send(tx: &mpsc::UnboundedSender<Input>, ev: Event) {
        let _ = tx.send(Input::Event(Box::new(ev)));
    }

    fn carry_out(&mut self, actions: Vec<Action>, link: Option<&LinkHandle>) {
        for a in actions {
            match a {
                Action::Start { app, instance, spec } => {
                    let rt = self.runtime.clone();
                    let tx = self.tx.clone();
                    tokio::spawn(async move {
                        match rt.start(&spec, instance).await {
                            Ok((started, digest, child)) => {
                                let _ = tx.send(Input::Digest(app.clone(), digest));
                                Self::send(
                                    &tx,
                                    Event::Started { app: app.clone(), instance, pid: started.init_pid },
                                );
                                let exit = rt.wait_exit(&app, instance, Some(child), started).await;
                                Self::send(&tx, Event::Exited { app, instance, exit });
                            }
                            Err(e) => {
                                Self::send(&tx, Event::StartFailed { app, instance, error: e.to_string() })
                            }
                        }
                    });
                }
                Action::Stop { app, instance, grace } => {
                    let rt = self.runtime.clone();
                    tokio::spawn(async move { rt.stop(&app, instance, grace).await });
                }
                Action::Probe { app, instance, kind, probe } => {
                    let rt = self.runtime.clone();
                    let tx = self.tx.clone();
                    tokio::spawn(async move {
                        let id = Paths::container_id(&app, instance);
                        let (ok, detail) =
                            crate::probe::run(&probe, &rt.exe, &rt.paths.containers(), &id).await;
                        Self::send(&tx, Event::ProbeResult { app, instance, kind, ok, detail });
                    });
                }
                Action::Note(n) => {
                    log_note(&n);
                    if let Some(l) = link {
                        let (kind, app, detail) = note_event(&n);
                        l.event(kind, Some(app), detail);
                    }
                }
            }
        }
    }

    fn watch(
        &self,
        app: AppName,
        instance: u64,
        child: Option<tokio::process::Child>,
        started: crate::runtime::instance::Started,
    ) {
        let rt = self.runtime.clone();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let exit = rt.wait_exit(&app, instance, child, started).await;
            Self::send(&tx, Event::Exited { app, instance, exit });
        });
    }
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
struct Usage {
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
    usage: Arc<Usage>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let tx = tx.clone();
        let view = view.clone();
        let usage = usage.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut r = BufReader::new(r);
            let reply = match api::read_request(&mut r).await {
                Err(message) => Response::Error { message },
                Ok(Request::Ps) => {
                    let (generation, apps, link) = {
                        let v = view.lock().unwrap_or_else(|p| p.into_inner());
                        let link = v.link.as_ref().map(|l| {
                            let s = l.borrow();
                            api::LinkState {
                                connected: s.connected,
                                connects: s.connects,
                                last_error: s.last_error.clone(),
                            }
                        });
                        (v.generation, v.apps.clone(), link)
                    };
                    let usage = usage.of(&apps);
                    Response::Ps(PsReply { generation, apps, usage, link })
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
