//! Rollouts on the device: a new generation is on test until it has proved
//! itself, and the device goes back to the last good one by itself when it
//! fails, link or no link.
//!
//! Pure and synchronous, like the reconciler: the daemon feeds it the apps'
//! status after every step (and the reconciler's notes), with the current
//! monotonic time, and carries out the verdicts. Two parts:
//!
//! - `Trial`: the test of one generation. It passes when every app the
//!   generation adds or changes has been running and ready (startup, liveness and readiness
//!   probes where defined), or finished successfully (a one-shot app with
//!   restart `never`/`on-failure`), with no restart, for `rollout.stable`. It
//!   fails at once when an app cannot be created, exits (any exit an app is
//!   restarted after counts: "no restart"), or is killed by its liveness or
//!   startup probe; and when `rollout.deadline`, counted from the moment the
//!   generation was handed over, passes without the window completing (the
//!   app not ready is named).
//! - `Record`: what survives a reboot (`rollout.skf`): the last good
//!   generation, the one on test with the number of agent starts it has seen,
//!   and the last failure. `Record::at_start` decides, from the record and the
//!   generation on flash, what the agent runs at start: a generation that
//!   failed is never run again (no ping-pong; only a newer generation is
//!   tried), a generation on test resumes its test, and one that has seen
//!   `MAX_STARTS` agent starts without passing (a board rebooting in a loop
//!   during the test) has failed.
//!
//! A generation with no last good one to go back to (the first state of a
//! board, or an agent upgraded from a release without rollouts) is committed
//! at once: there is nothing safer to run.

use crate::reconciler::{Note, ProbeKind};
use serde::{Deserialize, Serialize};
use skiff_common::status::RolloutFailure;
use skiff_common::validate::MAX_GENERATION;
use skiff_common::{AppName, AppStatus, DesiredState, Health, Phase, RestartPolicy, Rollout, RolloutStatus};
use std::collections::BTreeMap;
use tokio::time::Instant;

/// Agent starts a generation on test may see; the one after it has failed.
pub const MAX_STARTS: u32 = 3;
/// Longest failure reason kept and reported.
pub const REASON_MAX: usize = 300;

/// What is kept on flash across reboots. `testing`, when set, is never equal
/// to `committed`, and a `failed` generation is never on test.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The last good generation (0: none yet).
    pub committed: u64,
    /// The generation on test, and how many agent starts it has seen (the
    /// start it was handed over in counts as none).
    pub testing: Option<(u64, u32)>,
    /// The last generation that failed its test.
    pub failed: Option<RolloutFailure>,
}

/// What the agent runs at start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AtStart {
    /// The stored generation, trusted (committed, or nothing to go back to).
    Run,
    /// The stored generation, on test (handed over now, or resumed).
    Test,
    /// The last good generation: the stored one failed (now or before).
    RunGood,
}

impl Record {
    /// Checks what a decoded record claims: a CRC proves only who wrote it.
    pub fn validate(&self) -> Result<(), String> {
        let big = |g: u64| g > MAX_GENERATION;
        if big(self.committed) {
            return Err(format!("committed generation {} is out of range", self.committed));
        }
        if let Some((g, starts)) = self.testing {
            if big(g) || g == self.committed || starts > MAX_STARTS {
                return Err(format!("generation on test {g} (starts {starts}) is not possible"));
            }
        }
        if let Some(f) = &self.failed {
            if big(f.generation)
                || f.reason.len() > REASON_MAX
                || self.testing.is_some_and(|(g, _)| g == f.generation)
            {
                return Err(format!("failed generation {} is not possible", f.generation));
            }
        }
        Ok(())
    }

    /// What to run at start for the `stored` generation (whose `rollout.rollback`
    /// is `rollback`), given whether the last good state is on flash, and the
    /// record to write (when it changed). `None` for `self`: no record yet (a
    /// new board or an upgrade). With `rollback` off, starts are counted but
    /// never make the generation fail.
    pub fn at_start(
        record: Option<&Record>,
        stored: u64,
        rollback: bool,
        have_good: bool,
    ) -> (AtStart, Option<Record>) {
        let Some(r) = record else {
            // Whatever ran before rollouts existed is what is trusted now.
            return (AtStart::Run, Some(Record { committed: stored, testing: None, failed: None }));
        };
        if r.failed.as_ref().is_some_and(|f| f.generation == stored) {
            let rolled_back = r.failed.as_ref().is_some_and(|f| f.rolled_back);
            return (if rolled_back && have_good { AtStart::RunGood } else { AtStart::Run }, None);
        }
        if stored == r.committed {
            return (AtStart::Run, None);
        }
        if !have_good {
            // Nothing to go back to: trusted as it is.
            let next = Record { committed: stored, testing: None, failed: r.failed.clone() };
            return (AtStart::Run, Some(next));
        }
        match r.testing {
            Some((g, starts)) if g == stored => {
                let starts = (starts + 1).min(MAX_STARTS);
                if starts >= MAX_STARTS && rollback {
                    let failed = RolloutFailure {
                        generation: stored,
                        app: None,
                        reason: format!("the agent started {starts} times while this generation was on test"),
                        rolled_back: true,
                    };
                    let next = Record { committed: r.committed, testing: None, failed: Some(failed) };
                    (AtStart::RunGood, Some(next))
                } else {
                    // Written only when the count moved (it stops at MAX_STARTS).
                    let next = Record { testing: Some((g, starts)), ..r.clone() };
                    let changed = next != *r;
                    (AtStart::Test, changed.then_some(next))
                }
            }
            // A generation stored while no agent ran (`skiff apply` offline,
            // or a power cut between the state and the record): on test now.
            _ => (AtStart::Test, Some(Record { testing: Some((stored, 0)), ..r.clone() })),
        }
    }

    /// The record once `generation` was handed over for test.
    pub fn begin(&self, generation: u64) -> Record {
        Record { testing: Some((generation, 0)), ..self.clone() }
    }

    /// The record once `generation` passed.
    pub fn commit(&self, generation: u64) -> Record {
        Record { committed: generation, testing: None, failed: self.failed.clone() }
    }

    /// The record once a generation failed.
    pub fn fail(&self, failure: RolloutFailure) -> Record {
        Record { committed: self.committed, testing: None, failed: Some(failure) }
    }

    pub fn status(&self) -> RolloutStatus {
        RolloutStatus {
            committed: self.committed,
            testing: self.testing.map(|(g, _)| g),
            failed: self.failed.clone(),
        }
    }
}

/// The end of a test.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Passed: the generation is the last good one now.
    Commit { generation: u64 },
    /// Failed; `failure.rolled_back` says whether to go back to the last good one.
    Fail(RolloutFailure),
}

/// The test of one generation.
#[derive(Debug)]
pub struct Trial {
    generation: u64,
    policy: Rollout,
    /// Restart policies of the generation's apps: which exits are a failure.
    apps: BTreeMap<AppName, RestartPolicy>,
    deadline: Instant,
    /// Since when every app has been healthy.
    stable_since: Option<Instant>,
    /// Restart counts seen last, per app: a growing count is a restart.
    restarts: BTreeMap<AppName, u32>,
    /// The last thing a note said went wrong, per app (the reason given).
    trouble: BTreeMap<AppName, String>,
    /// Set when there is a good generation to go back to.
    can_roll_back: bool,
    /// An app its liveness or startup probe is killing: failed, whatever its exit.
    killed: Option<AppName>,
}

impl Trial {
    /// Starts the test of `state` at `now`, against the last good state.
    /// Only the apps `state` adds or changes are judged: one that runs as it
    /// did in the good generation (a crash loop it already had included) is
    /// not the new generation's doing, and going back would not mend it.
    pub fn begin(state: &DesiredState, good: Option<&DesiredState>, now: Instant) -> Trial {
        let changed = |a: &&skiff_common::AppSpec| good.and_then(|g| g.app(&a.name)) != Some(*a);
        Trial {
            generation: state.generation,
            policy: state.rollout,
            apps: state.apps.iter().filter(changed).map(|a| (a.name.clone(), a.restart)).collect(),
            deadline: now.checked_add(state.rollout.deadline).unwrap_or(now),
            stable_since: None,
            restarts: BTreeMap::new(),
            trouble: BTreeMap::new(),
            can_roll_back: good.is_some(),
            killed: None,
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Remembers why an app is in trouble, for the reason of a failure.
    pub fn note(&mut self, n: &Note) {
        let (app, why) = match n {
            Note::StartFailed { app, error } => (app, format!("could not be created: {error}")),
            Note::ProbeFailed { app, kind, detail } => {
                (app, format!("{} probe failed: {detail}", kind_str(*kind)))
            }
            Note::Unhealthy { app, kind } => {
                let kind = kind_str(*kind);
                // "killed by its liveness probe (connection refused)" when the failure said why.
                let detail = self
                    .trouble
                    .get(app)
                    .and_then(|t| t.strip_prefix(kind))
                    .and_then(|t| t.strip_prefix(" probe failed: "))
                    .map(|d| format!(" ({d})"))
                    .unwrap_or_default();
                (app, format!("killed by its {kind} probe{detail}"))
            }
            _ => return,
        };
        if self.apps.contains_key(app) {
            if matches!(n, Note::Unhealthy { .. }) {
                self.killed.get_or_insert(app.clone());
            }
            self.trouble.insert(app.clone(), clip(why));
        }
    }

    /// The earliest time `observe` could decide something with no new status.
    pub fn next_deadline(&self) -> Instant {
        match self.stable_since {
            Some(t) => t.checked_add(self.policy.stable).unwrap_or(self.deadline).min(self.deadline),
            None => self.deadline,
        }
    }

    /// Judges the apps' status (sorted by name, as `Reconciler::status` gives
    /// it) at `now`: a verdict, or `None` while the test goes on.
    pub fn observe(&mut self, status: &[AppStatus], now: Instant) -> Option<Verdict> {
        if let Some(app) = self.killed.clone() {
            let reason = self.trouble.get(&app).cloned().unwrap_or_default();
            return Some(self.fail(Some(app), reason));
        }
        let mut first_unready: Option<&AppName> = None;
        for (name, restart) in &self.apps {
            // `status` is sorted by name (the reconciler's order): a search, not a scan.
            let found = status.binary_search_by(|s| s.name.cmp(name)).ok().map(|i| &status[i]);
            let Some(s) = found else {
                first_unready.get_or_insert(name);
                continue;
            };
            let restarted = self.restarts.get(name).is_some_and(|r| s.restarts > *r);
            self.restarts.insert(name.clone(), s.restarts);
            if let Some(reason) = self.failure_of(s, *restart, restarted) {
                return Some(self.fail(Some(name.clone()), reason));
            }
            if !healthy(s) {
                first_unready.get_or_insert(name);
            }
        }
        match first_unready {
            Some(name) => {
                self.stable_since = None;
                if now >= self.deadline {
                    let why = self.trouble.get(name).map(|t| format!(": {t}")).unwrap_or_default();
                    let reason = format!(
                        "not running and ready within the rollout deadline of {}{why}",
                        skiff_common::quantity::format_duration(self.policy.deadline)
                    );
                    let name = name.clone();
                    return Some(self.fail(Some(name), reason));
                }
                None
            }
            None => {
                let since = *self.stable_since.get_or_insert(now);
                if now.saturating_duration_since(since) >= self.policy.stable {
                    return Some(Verdict::Commit { generation: self.generation });
                }
                if now >= self.deadline {
                    return Some(self.fail(
                        None,
                        format!(
                            "not stable for {} within the rollout deadline of {}",
                            skiff_common::quantity::format_duration(self.policy.stable),
                            skiff_common::quantity::format_duration(self.policy.deadline)
                        ),
                    ));
                }
                None
            }
        }
    }

    /// Why `s` has failed the test, if it has.
    fn failure_of(&self, s: &AppStatus, restart: RestartPolicy, restarted: bool) -> Option<String> {
        let trouble = self.trouble.get(&s.name);
        let exit = s.last_exit.map(|e| match (e.code, e.signal) {
            _ if e.oom_killed => "was killed by the OOM killer".to_string(),
            (Some(c), _) => format!("exited with code {c}"),
            (None, Some(sig)) => format!("was killed by signal {sig}"),
            _ => "was lost (its shim died)".to_string(),
        });
        // A kill by a probe or a failed create says more than the exit it caused.
        let said = |fallback: Option<String>| {
            let told =
                trouble.filter(|t| t.starts_with("killed by") || t.starts_with("could not be created"));
            clip(told.cloned().or(fallback).unwrap_or_else(|| "restarted".into()))
        };
        match s.phase {
            Phase::Failed => Some(said(s.error.clone().map(|e| format!("could not be created: {e}")))),
            Phase::Backoff => Some(said(exit.clone())),
            Phase::Exited => {
                let done = s.last_exit.is_some_and(|e| e.success()) && restart != RestartPolicy::Always;
                (!done).then(|| said(exit.clone()))
            }
            Phase::Running | Phase::Starting | Phase::Stopping if restarted => Some(said(exit.clone())),
            _ => None,
        }
    }

    fn fail(&self, app: Option<AppName>, reason: String) -> Verdict {
        Verdict::Fail(RolloutFailure {
            generation: self.generation,
            app,
            reason: clip(reason),
            rolled_back: self.policy.rollback && self.can_roll_back,
        })
    }
}

/// A controller generation waiting for its images (the old generation runs
/// meanwhile). When its pulls still fail after `rollout.deadline`, counted
/// from its first offer, it has failed: the device stays on what it runs.
#[derive(Debug)]
pub struct PullWait {
    generation: u64,
    since: Instant,
    policy: Rollout,
    images: Vec<(AppName, skiff_common::ImageRef)>,
}

impl PullWait {
    pub fn new(state: &DesiredState, now: Instant) -> PullWait {
        PullWait {
            generation: state.generation,
            since: now,
            policy: state.rollout,
            images: state.apps.iter().map(|a| (a.name.clone(), a.image.clone())).collect(),
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// An attempt failed at `now` with `reason` (which names the image): the
    /// failure once the deadline has passed. Never with `rollback = false`:
    /// such a state is tried until its images come.
    pub fn failed(&self, reason: &str, now: Instant) -> Option<RolloutFailure> {
        if !self.policy.rollback || now.saturating_duration_since(self.since) < self.policy.deadline {
            return None;
        }
        let app = self
            .images
            .iter()
            .find(|(_, image)| reason.contains(&format!("pulling {image}:")))
            .map(|(app, _)| app.clone());
        Some(RolloutFailure {
            generation: self.generation,
            app,
            reason: clip(format!(
                "images not pulled within the rollout deadline of {}: {reason}",
                skiff_common::quantity::format_duration(self.policy.deadline)
            )),
            rolled_back: true,
        })
    }
}

/// Running and ready (or finished as it should): what the window waits for.
fn healthy(s: &AppStatus) -> bool {
    match s.phase {
        Phase::Running => {
            matches!(s.ready, Health::Passing | Health::None)
                && matches!(s.live, Health::Passing | Health::None)
        }
        Phase::Exited => s.last_exit.is_some_and(|e| e.success()),
        _ => false,
    }
}

fn kind_str(k: ProbeKind) -> &'static str {
    match k {
        ProbeKind::Startup => "startup",
        ProbeKind::Liveness => "liveness",
        ProbeKind::Readiness => "readiness",
    }
}

fn clip(s: String) -> String {
    skiff_common::protocol::clip(s, REASON_MAX)
}

#[cfg(test)]
mod tests;
