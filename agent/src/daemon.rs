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
use crate::paths::Paths;
use crate::reconciler::{Action, BackoffConfig, Event, Note, Reconciler};
use crate::runtime::{FoundState, Runtime};
use crate::store::StateStore;
use skiff_common::{AppName, AppStatus};
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
}

enum Input {
    Event(Box<Event>),
    /// Re-read the desired-state file; answer with the generation now applied.
    Reload(Option<tokio::sync::oneshot::Sender<Result<u64, String>>>),
    /// The image digest a freshly started container runs.
    Digest(AppName, String),
}

/// Shared read-only view for the API.
#[derive(Default)]
struct View {
    generation: u64,
    apps: Vec<AppStatus>,
}

pub async fn run(cfg: AgentConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let paths = cfg.paths.clone();
    for dir in [&paths.state_dir, &paths.run_dir, &paths.log_dir] {
        std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
    }
    std::fs::set_permissions(&paths.run_dir, std::fs::Permissions::from_mode(0o700))?;
    let images = Arc::new(ImageStore::open(&paths.images())?);
    let runtime = Arc::new(Runtime::new(paths.clone(), images, cfg.log_cap)?);
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
    ex.carry_out(actions);
    publish(&rec, &digests, &view);

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
            Input::Reload(reply) => match store.load() {
                Ok(l) => {
                    if let Some(why) = &l.fell_back {
                        warn!(%why, "desired state unreadable: using the previous generation");
                    }
                    let generation = l.state.generation;
                    let actions = if generation != rec.generation() || rec.generation() == 0 {
                        info!(generation, apps = l.state.apps.len(), "desired state changed");
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
        ex.carry_out(actions);
        publish(&rec, &digests, &view);
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

    fn carry_out(&mut self, actions: Vec<Action>) {
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
                        let exe = std::env::current_exe().unwrap_or_default();
                        let id = Paths::container_id(&app, instance);
                        let (ok, detail) = crate::probe::run(&probe, &exe, &rt.paths.containers(), &id).await;
                        Self::send(&tx, Event::ProbeResult { app, instance, kind, ok, detail });
                    });
                }
                Action::Note(n) => log_note(&n),
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
                    let (generation, apps) = {
                        let v = view.lock().unwrap_or_else(|p| p.into_inner());
                        (v.generation, v.apps.clone())
                    };
                    let usage = usage.of(&apps);
                    Response::Ps(PsReply { generation, apps, usage })
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
