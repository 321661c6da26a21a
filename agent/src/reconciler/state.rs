//! The reconciler's state machine: one record per app, driven by `step`.
//!
//! Per app it owns the desired spec, the container it believes exists (if
//! any), the restart counters and the probe state. Records exist for every
//! desired app and for every undesired app whose container is still being
//! stopped; an app is forgotten once it is neither desired nor has a container.
//!
//! Invariants:
//! - A record with no container (`Pending`, `Backoff`, `Failed`, `Exited`)
//!   always has a desired spec.
//! - A `Running` container's spec equals the desired spec: any change of the
//!   desired spec stops it at once.
//! - Instance numbers of an app only grow, across removals and adoptions
//!   (`instances` outlives the app records), so a container id is never reused
//!   and a late event of an old container can never be taken for a new one.
//! - Time only moves on `Tick`: other events never start a backoff-delayed
//!   container or fire a probe, they only (re)schedule; `next_deadline` says
//!   when a `Tick` is wanted.

use super::probes::{after, probe_of, Probes, Verdict};
use super::{Action, BackoffConfig, Event, Note, ProbeKind};
use skiff_common::{AppName, AppSpec, AppStatus, DesiredState, ExitInfo, Health, Phase};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use tokio::time::Instant;

/// Decides what to run; see the module docs of `reconciler` for the contract.
#[derive(Debug)]
pub struct Reconciler {
    backoff: BackoffConfig,
    generation: u64,
    /// A `Desired` has been applied. Before that, adopted containers are kept
    /// running as they are (their own spec stands in for the desired one).
    desired_known: bool,
    /// The first `Tick` has been seen. Until then no `Start` is sent: the
    /// daemon reports adopted containers after the desired state from disk,
    /// and starting a desired app before its running container is reported
    /// would run it twice.
    started_up: bool,
    apps: BTreeMap<AppName, App>,
    /// Highest instance used or seen per app, kept after an app is forgotten.
    instances: BTreeMap<AppName, u64>,
}

#[derive(Debug, Clone)]
struct Container {
    instance: u64,
    spec: AppSpec,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopWhy {
    /// The desired spec changed: start the desired one when it has exited.
    Replace,
    /// No longer desired: forget the app when it has exited.
    Remove,
    /// Liveness or startup failed: the restart policy decides, as for a failure.
    Unhealthy,
}

#[derive(Debug)]
enum State {
    /// To be started at the first `Tick` (start-up window, see `started_up`).
    Pending {
        since: Instant,
    },
    /// `Start` sent, waiting for `Started` or `StartFailed`.
    Starting(Container),
    Running {
        c: Container,
        pid: i32,
        since: Instant,
        probes: Probes,
    },
    /// `Stop` sent once, waiting for `Exited`. `live` is frozen for status.
    Stopping {
        c: Container,
        pid: i32,
        since: Instant,
        why: StopWhy,
        live: Health,
    },
    /// Exited; started again at `until`.
    Backoff {
        until: Instant,
    },
    /// Could not be started; tried again at `until`.
    Failed {
        until: Instant,
    },
    /// Exited and the restart policy says stay down.
    Exited,
}

#[derive(Debug)]
struct App {
    name: AppName,
    /// `None` once removed from the desired state (kept while it stops).
    desired: Option<AppSpec>,
    state: State,
    /// Starts after the first one since the spec last changed.
    restarts: u32,
    /// Consecutive restarts: the backoff exponent.
    streak: u32,
    last_exit: Option<ExitInfo>,
    /// Last start error; cleared by a successful start.
    error: Option<String>,
    /// Per probe kind: a failure has been noted and no success seen since.
    /// Kept across restarts so a crash-looping or constantly failing app
    /// notes one `ProbeFailed` per run of failures, not one per attempt.
    failing_noted: [bool; 3],
}

/// Whether a record survives the event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Keep,
    Forget,
}

/// What an app's handlers need besides the app itself.
struct Env<'a> {
    now: Instant,
    backoff: BackoffConfig,
    may_start: bool,
    instances: &'a mut BTreeMap<AppName, u64>,
    out: &'a mut Vec<Action>,
}

impl Env<'_> {
    fn next_instance(&mut self, app: &AppName) -> u64 {
        let n = self.instances.entry(app.clone()).or_insert(0);
        *n += 1;
        *n
    }

    fn saw_instance(&mut self, app: &AppName, instance: u64) {
        let n = self.instances.entry(app.clone()).or_insert(0);
        *n = (*n).max(instance);
    }

    fn note(&mut self, note: Note) {
        self.out.push(Action::Note(note));
    }
}

fn kind_index(kind: ProbeKind) -> usize {
    match kind {
        ProbeKind::Startup => 0,
        ProbeKind::Liveness => 1,
        ProbeKind::Readiness => 2,
    }
}

/// Health to show when no container is probed: unknown if the probe exists.
fn unprobed(probe: Option<&skiff_common::Probe>) -> Health {
    if probe.is_some() {
        Health::Unknown
    } else {
        Health::None
    }
}

impl Reconciler {
    pub fn new(backoff: BackoffConfig) -> Self {
        Reconciler {
            backoff,
            generation: 0,
            desired_known: false,
            started_up: false,
            apps: BTreeMap::new(),
            instances: BTreeMap::new(),
        }
    }

    /// Generation of the last `Desired` applied; 0 before any.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Applies one event at time `now` and returns what to do, in app-name order.
    pub fn step(&mut self, event: Event, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        match event {
            Event::Desired(state) => self.on_desired(state, now, &mut out),
            Event::Tick => {
                self.started_up = true;
                let mut env = Env {
                    now,
                    backoff: self.backoff,
                    may_start: true,
                    instances: &mut self.instances,
                    out: &mut out,
                };
                for app in self.apps.values_mut() {
                    app.on_tick(&mut env);
                }
            }
            Event::Adopted { app, instance, spec, pid, running_since } => {
                self.on_adopted(app, instance, spec, pid, running_since, now, &mut out)
            }
            Event::AdoptedExited { app, instance, spec, exit } => {
                self.on_adopted_exited(app, instance, spec, exit, now, &mut out)
            }
            Event::Started { app, instance, pid } => {
                self.with_app(&app, now, &mut out, |a, env| {
                    a.on_started(instance, pid, env);
                    Fate::Keep
                });
            }
            Event::StartFailed { app, instance, error } => {
                self.with_app(&app, now, &mut out, |a, env| a.on_start_failed(instance, error, env));
            }
            Event::Exited { app, instance, exit } => {
                self.with_app(&app, now, &mut out, |a, env| a.on_exited(instance, exit, env));
            }
            Event::ProbeResult { app, instance, kind, ok, detail } => {
                self.with_app(&app, now, &mut out, |a, env| {
                    a.on_probe_result(instance, kind, ok, detail, env);
                    Fate::Keep
                });
            }
        }
        out
    }

    /// The earliest time a `Tick` would change something; `None` if nothing
    /// is scheduled. May be in the past (tick at once).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.apps.values().filter_map(App::next_deadline).min()
    }

    /// Observed state of every known app, sorted by name. `image_digest` is
    /// left `None`: the daemon knows it, the reconciler does not.
    pub fn status(&self) -> Vec<AppStatus> {
        self.apps.values().map(App::status).collect()
    }

    /// Runs `f` on a known app; events about unknown apps are ignored.
    fn with_app(
        &mut self,
        name: &AppName,
        now: Instant,
        out: &mut Vec<Action>,
        f: impl FnOnce(&mut App, &mut Env) -> Fate,
    ) {
        let mut env = Env {
            now,
            backoff: self.backoff,
            may_start: self.started_up,
            instances: &mut self.instances,
            out,
        };
        let Some(app) = self.apps.get_mut(name) else {
            return;
        };
        if f(app, &mut env) == Fate::Forget {
            self.apps.remove(name);
        }
    }

    fn on_desired(&mut self, state: DesiredState, now: Instant, out: &mut Vec<Action>) {
        self.generation = state.generation;
        self.desired_known = true;
        let mut wanted: BTreeMap<AppName, AppSpec> =
            state.apps.into_iter().map(|a| (a.name.clone(), a)).collect();
        let names: BTreeSet<AppName> = self.apps.keys().chain(wanted.keys()).cloned().collect();
        let mut env = Env {
            now,
            backoff: self.backoff,
            may_start: self.started_up,
            instances: &mut self.instances,
            out,
        };
        for name in names {
            let spec = wanted.remove(&name);
            let fate = match (self.apps.get_mut(&name), spec) {
                (None, Some(spec)) => {
                    let mut app = App::new(name.clone(), Some(spec), State::Exited);
                    app.launch(false, &mut env);
                    self.apps.insert(name.clone(), app);
                    Fate::Keep
                }
                (Some(app), Some(spec)) => {
                    app.set_spec(spec, &mut env);
                    Fate::Keep
                }
                (Some(app), None) => app.remove(&mut env),
                (None, None) => Fate::Keep,
            };
            if fate == Fate::Forget {
                self.apps.remove(&name);
            }
        }
    }

    #[allow(clippy::too_many_arguments)] // the fields of `Event::Adopted`, plus time and output
    fn on_adopted(
        &mut self,
        name: AppName,
        instance: u64,
        spec: AppSpec,
        pid: i32,
        running_since: Instant,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let desired_known = self.desired_known;
        let mut env = Env {
            now,
            backoff: self.backoff,
            may_start: self.started_up,
            instances: &mut self.instances,
            out,
        };
        env.saw_instance(&name, instance);
        if let Some(app) = self.apps.get_mut(&name) {
            app.adopt(instance, spec, pid, running_since, &mut env);
            return;
        }
        // Unknown app: before any desired state keep it running as it is; after
        // one, it is not desired, so stop it and forget it once it has exited.
        let desired = (!desired_known).then(|| spec.clone());
        let mut app = App::new(name.clone(), desired, State::Exited);
        let probes = Probes::new(&spec, running_since);
        app.state = State::Running { c: Container { instance, spec }, pid, since: running_since, probes };
        if desired_known {
            app.stop(StopWhy::Remove, &mut env);
        }
        self.apps.insert(name, app);
    }

    fn on_adopted_exited(
        &mut self,
        name: AppName,
        instance: u64,
        spec: AppSpec,
        exit: ExitInfo,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let desired_known = self.desired_known;
        let mut env = Env {
            now,
            backoff: self.backoff,
            may_start: self.started_up,
            instances: &mut self.instances,
            out,
        };
        env.saw_instance(&name, instance);
        if let Some(app) = self.apps.get_mut(&name) {
            app.adopted_exit(spec, exit, &mut env);
            return;
        }
        env.note(Note::Exited { app: name.clone(), exit });
        if desired_known {
            // Not desired: there is nothing left to stop.
            env.note(Note::Removed { app: name });
            return;
        }
        let mut app = App::new(name.clone(), Some(spec), State::Exited);
        app.last_exit = Some(exit);
        app.after_exit(exit.success(), Duration::ZERO, &mut env);
        self.apps.insert(name, app);
    }
}

impl App {
    fn new(name: AppName, desired: Option<AppSpec>, state: State) -> App {
        App {
            name,
            desired,
            state,
            restarts: 0,
            streak: 0,
            last_exit: None,
            error: None,
            failing_noted: [false; 3],
        }
    }

    fn container(&self) -> Option<&Container> {
        match &self.state {
            State::Starting(c) | State::Running { c, .. } | State::Stopping { c, .. } => Some(c),
            _ => None,
        }
    }

    /// Starts the desired spec, or parks it until the start-up window closes.
    /// `restart`: counts as a restart (after an exit or a failed start).
    fn launch(&mut self, restart: bool, env: &mut Env) {
        let Some(spec) = self.desired.clone() else {
            return;
        };
        if !env.may_start {
            self.state = State::Pending { since: env.now };
            return;
        }
        if restart {
            self.restarts = self.restarts.saturating_add(1);
        }
        let instance = env.next_instance(&self.name);
        env.out.push(Action::Start { app: self.name.clone(), instance, spec: spec.clone() });
        self.state = State::Starting(Container { instance, spec });
    }

    /// Sends `Stop` to the running container; anything else is left alone.
    fn stop(&mut self, why: StopWhy, env: &mut Env) {
        let state = std::mem::replace(&mut self.state, State::Exited);
        let State::Running { c, pid, since, probes } = state else {
            self.state = state;
            return;
        };
        // A container on its way out serves nothing any more.
        if probes.ready() == Health::Passing {
            env.note(Note::ReadyChanged { app: self.name.clone(), ready: false });
        }
        let live = match (why, probes.live()) {
            (StopWhy::Unhealthy, Health::None) => Health::None,
            (StopWhy::Unhealthy, _) => Health::Failing,
            (_, live) => live,
        };
        env.out.push(Action::Stop { app: self.name.clone(), instance: c.instance, grace: c.spec.stop_grace });
        self.state = State::Stopping { c, pid, since, why, live };
    }

    /// The backoff delay for the next restart; a run of at least
    /// `reset_after` starts the series over.
    fn next_delay(&mut self, ran: Duration, cfg: &BackoffConfig) -> Duration {
        if ran >= cfg.reset_after {
            self.streak = 0;
        }
        let delay = 2u32
            .checked_pow(self.streak)
            .and_then(|m| cfg.base.checked_mul(m))
            .map_or(cfg.max, |d| d.min(cfg.max));
        self.streak = self.streak.saturating_add(1);
        delay
    }

    /// The container of the desired spec is gone after running for `ran`:
    /// back off and restart, or stay down, as the restart policy says.
    fn after_exit(&mut self, success: bool, ran: Duration, env: &mut Env) {
        let Some(spec) = &self.desired else { return };
        if !spec.restart.restarts_after(success) {
            self.state = State::Exited;
            return;
        }
        let delay = self.next_delay(ran, &env.backoff);
        env.note(Note::Restarting {
            app: self.name.clone(),
            delay,
            restarts: self.restarts.saturating_add(1),
        });
        self.state = State::Backoff { until: after(env.now, delay) };
    }

    fn set_spec(&mut self, spec: AppSpec, env: &mut Env) {
        if self.desired.as_ref() == Some(&spec) {
            return;
        }
        self.desired = Some(spec);
        self.restarts = 0;
        self.streak = 0;
        self.failing_noted = [false; 3];
        match &mut self.state {
            // Started or StartFailed will see the new spec.
            State::Pending { .. } | State::Starting(_) => {}
            State::Running { .. } => {
                env.note(Note::Replacing { app: self.name.clone() });
                self.stop(StopWhy::Replace, env);
            }
            State::Stopping { why, .. } => {
                if *why != StopWhy::Replace {
                    *why = StopWhy::Replace;
                    env.note(Note::Replacing { app: self.name.clone() });
                }
            }
            // No container to replace.
            State::Backoff { .. } | State::Failed { .. } | State::Exited => self.launch(false, env),
        }
    }

    fn remove(&mut self, env: &mut Env) -> Fate {
        self.desired = None;
        match &mut self.state {
            State::Pending { .. } | State::Backoff { .. } | State::Failed { .. } | State::Exited => {
                env.note(Note::Removed { app: self.name.clone() });
                Fate::Forget
            }
            State::Starting(_) => Fate::Keep,
            State::Running { .. } => {
                self.stop(StopWhy::Remove, env);
                Fate::Keep
            }
            State::Stopping { why, .. } => {
                *why = StopWhy::Remove;
                Fate::Keep
            }
        }
    }

    fn on_tick(&mut self, env: &mut Env) {
        match &mut self.state {
            State::Pending { .. } => self.launch(false, env),
            State::Backoff { until } | State::Failed { until } if *until <= env.now => self.launch(true, env),
            State::Running { c, probes, .. } => {
                for kind in probes.fire(env.now) {
                    if let Some(probe) = probe_of(&c.spec, kind) {
                        env.out.push(Action::Probe {
                            app: self.name.clone(),
                            instance: c.instance,
                            kind,
                            probe: probe.clone(),
                        });
                    }
                }
            }
            _ => {}
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        match &self.state {
            State::Pending { since } => Some(*since),
            State::Backoff { until } | State::Failed { until } => Some(*until),
            State::Running { probes, .. } => probes.next_due(),
            State::Starting(_) | State::Stopping { .. } | State::Exited => None,
        }
    }

    fn on_started(&mut self, instance: u64, pid: i32, env: &mut Env) {
        let c = match &self.state {
            State::Starting(c) if c.instance == instance => c.clone(),
            _ => return,
        };
        env.note(Note::Started { app: self.name.clone(), instance, pid });
        self.error = None;
        let probes = Probes::new(&c.spec, env.now);
        let wanted = self.desired.as_ref().map(|d| *d == c.spec);
        self.state = State::Running { c, pid, since: env.now, probes };
        // The desired state changed while it was being created.
        match wanted {
            None => self.stop(StopWhy::Remove, env),
            Some(false) => {
                env.note(Note::Replacing { app: self.name.clone() });
                self.stop(StopWhy::Replace, env);
            }
            Some(true) => {}
        }
    }

    fn on_start_failed(&mut self, instance: u64, error: String, env: &mut Env) -> Fate {
        let c = match &self.state {
            State::Starting(c) if c.instance == instance => c.clone(),
            _ => return Fate::Keep,
        };
        env.note(Note::StartFailed { app: self.name.clone(), error: error.clone() });
        self.error = Some(error);
        match &self.desired {
            None => {
                env.note(Note::Removed { app: self.name.clone() });
                Fate::Forget
            }
            Some(d) if *d != c.spec => {
                self.launch(false, env);
                Fate::Keep
            }
            // Retried whatever the restart policy: it never ran, and what was
            // missing (an image, a device) may appear later.
            Some(_) => {
                let delay = self.next_delay(Duration::ZERO, &env.backoff);
                env.note(Note::Restarting {
                    app: self.name.clone(),
                    delay,
                    restarts: self.restarts.saturating_add(1),
                });
                self.state = State::Failed { until: after(env.now, delay) };
                Fate::Keep
            }
        }
    }

    fn on_exited(&mut self, instance: u64, exit: ExitInfo, env: &mut Env) -> Fate {
        if self.container().is_none_or(|c| c.instance != instance) {
            return Fate::Keep;
        }
        self.last_exit = Some(exit);
        env.note(Note::Exited { app: self.name.clone(), exit });
        let state = std::mem::replace(&mut self.state, State::Exited);
        let (spec, ran) = match &state {
            State::Starting(c) => (&c.spec, Duration::ZERO),
            State::Running { c, since, .. } | State::Stopping { c, since, .. } => {
                (&c.spec, env.now.saturating_duration_since(*since))
            }
            _ => return Fate::Keep, // unreachable: it has a container
        };
        let Some(desired) = &self.desired else {
            env.note(Note::Removed { app: self.name.clone() });
            return Fate::Forget;
        };
        if desired != spec {
            // Replaced: the new spec starts at once, counters already reset.
            self.launch(false, env);
            return Fate::Keep;
        }
        match state {
            State::Running { probes, .. } => {
                if probes.ready() == Health::Passing {
                    env.note(Note::ReadyChanged { app: self.name.clone(), ready: false });
                }
                self.after_exit(exit.success(), ran, env);
            }
            // Kubelet: a liveness kill is a failure, whatever the exit code.
            State::Stopping { why: StopWhy::Unhealthy, .. } => self.after_exit(false, ran, env),
            // Stopped for a replacement or removal that was then undone: the
            // desired spec is wanted, start it afresh.
            State::Stopping { .. } => self.launch(false, env),
            _ => self.after_exit(exit.success(), ran, env),
        }
        Fate::Keep
    }

    fn on_probe_result(&mut self, instance: u64, kind: ProbeKind, ok: bool, detail: String, env: &mut Env) {
        let State::Running { c, probes, .. } = &mut self.state else {
            return;
        };
        if c.instance != instance {
            return;
        }
        let Some(verdict) = probes.record(&c.spec, kind, ok, env.now) else {
            return;
        };
        let noted = &mut self.failing_noted[kind_index(kind)];
        if ok {
            *noted = false;
        } else if !*noted {
            *noted = true;
            env.note(Note::ProbeFailed { app: self.name.clone(), kind, detail });
        }
        match verdict {
            Verdict::Nothing => {}
            Verdict::ReadyChanged(ready) => env.note(Note::ReadyChanged { app: self.name.clone(), ready }),
            Verdict::Kill => {
                env.note(Note::Unhealthy { app: self.name.clone(), kind });
                self.stop(StopWhy::Unhealthy, env);
            }
        }
    }

    /// A container found running at start-up.
    fn adopt(&mut self, instance: u64, spec: AppSpec, pid: i32, since: Instant, env: &mut Env) {
        if let Some(c) = self.container() {
            // A second container of one app (a crash mid-replacement, or a
            // start raced the adoption): keep the one already tracked.
            if c.instance != instance {
                env.out.push(Action::Stop { app: self.name.clone(), instance, grace: spec.stop_grace });
            }
            return;
        }
        let probes = Probes::new(&spec, since);
        let wanted = self.desired.as_ref() == Some(&spec);
        self.state = State::Running { c: Container { instance, spec }, pid, since, probes };
        if !wanted {
            env.note(Note::Replacing { app: self.name.clone() });
            self.stop(StopWhy::Replace, env);
        }
    }

    /// A container that exited while no agent ran.
    fn adopted_exit(&mut self, spec: AppSpec, exit: ExitInfo, env: &mut Env) {
        if self.container().is_some() {
            return;
        }
        self.last_exit = Some(exit);
        env.note(Note::Exited { app: self.name.clone(), exit });
        // With another spec desired, the pending start of that spec stands.
        if self.desired.as_ref() == Some(&spec) {
            self.after_exit(exit.success(), Duration::ZERO, env);
        }
    }

    fn status(&self) -> AppStatus {
        let spec = self
            .desired
            .as_ref()
            .or(self.container().map(|c| &c.spec))
            .expect("an app record has a desired spec or a container");
        let (phase, pid, live, ready) = match &self.state {
            State::Running { pid, probes, .. } => (Phase::Running, Some(*pid), probes.live(), probes.ready()),
            State::Stopping { pid, live, c, .. } => {
                (Phase::Stopping, Some(*pid), *live, unprobed(c.spec.readiness.as_ref()))
            }
            other => {
                let phase = match other {
                    State::Backoff { .. } => Phase::Backoff,
                    State::Failed { .. } => Phase::Failed,
                    State::Exited => Phase::Exited,
                    _ => Phase::Starting,
                };
                let spec = self.container().map_or(spec, |c| &c.spec);
                (phase, None, unprobed(spec.liveness.as_ref()), unprobed(spec.readiness.as_ref()))
            }
        };
        AppStatus {
            name: self.name.clone(),
            phase,
            pid,
            restarts: self.restarts,
            last_exit: self.last_exit,
            live,
            ready,
            image: spec.image.to_string(),
            image_digest: None,
            error: self.error.clone(),
        }
    }
}
