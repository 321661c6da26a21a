//! The daemon's side of rollouts: which state the reconciler gets, the trial
//! of the generation on test, and the writes of the record and the last good
//! state. The decisions are `crate::rollout`'s; this only holds its state
//! between steps and queues the flash writes.
//!
//! Writes go, in order, to one writer thread: a commit must never be
//! overtaken by the record write that began the test, and the loop never
//! waits for flash.

use super::States;
use crate::rollout::{AtStart, PullWait, Record, Trial, Verdict};
use crate::store::RolloutFiles;
use skiff_common::{AppStatus, DesiredState, ImageRef, RolloutFailure, RolloutStatus};
use std::collections::BTreeSet;
use std::sync::Arc;
use tokio::time::Instant;
use tracing::{error, info, warn};

enum Write {
    Record(Record),
    Commit(Box<DesiredState>, Record),
}

pub(super) struct Rollouts {
    record: Record,
    good: Option<DesiredState>,
    trial: Option<Trial>,
    /// What the start-up decided for the stored generation, until it is applied.
    boot: Option<(u64, AtStart)>,
    /// The controller generation waiting for its images.
    pulls: Option<PullWait>,
    writes: std::sync::mpsc::Sender<Write>,
}

/// What the reconciler runs after a state was handed over.
pub(super) struct Handover {
    pub run: DesiredState,
    /// Set when the device went back to the last good generation.
    pub rolled_back: Option<String>,
}

impl Rollouts {
    /// Decides what the stored generation means at start (see `Record::at_start`)
    /// and starts the writer.
    pub fn new(states: Arc<dyn States>, files: RolloutFiles, stored: Option<(u64, bool)>) -> Rollouts {
        for p in &files.problems {
            warn!(problem = %p, "rollout file unreadable: ignored");
        }
        let (tx, rx) = std::sync::mpsc::channel::<Write>();
        std::thread::Builder::new()
            .name("rollout-writer".into())
            .spawn(move || {
                for w in rx {
                    let r = match &w {
                        Write::Record(r) => states.save_record(r),
                        Write::Commit(s, r) => states.commit(s, r),
                    };
                    if let Err(e) = r {
                        error!(error = %e, "rollout record not written");
                    }
                }
            })
            .ok();
        let mut me = Rollouts {
            record: files.record.clone().unwrap_or_default(),
            good: files.good,
            trial: None,
            boot: None,
            pulls: None,
            writes: tx,
        };
        if let Some((stored, rollback)) = stored {
            if stored == 0 && files.record.is_none() {
                // Nothing stored and nothing recorded: nothing to decide.
                return me;
            }
            let (what, next) = Record::at_start(files.record.as_ref(), stored, rollback, me.good.is_some());
            if let Some(next) = next {
                me.record = next;
                if files.record.is_none() || what == AtStart::Run && me.record.committed == stored {
                    // An upgrade (or a board with nothing to go back to): what
                    // is stored becomes the last good one when it is applied.
                    me.boot = Some((stored, AtStart::Run));
                    return me;
                }
                me.write(Write::Record(me.record.clone()));
            }
            if let AtStart::RunGood = what {
                if let Some(f) = &me.record.failed {
                    warn!(generation = f.generation, reason = %f.reason, "stored generation failed its test: running the last good one");
                }
            }
            me.boot = Some((stored, what));
        }
        me
    }

    fn write(&self, w: Write) {
        let _ = self.writes.send(w);
    }

    pub fn status(&self) -> RolloutStatus {
        self.record.status()
    }

    /// Images the last good state needs: kept by image collection.
    pub fn good_images(&self) -> BTreeSet<ImageRef> {
        self.good.iter().flat_map(|s| s.apps.iter().map(|a| a.image.clone())).collect()
    }

    /// A state handed over by the intake (start-up, `skiff apply`, the controller).
    pub fn handover(&mut self, state: DesiredState, now: Instant) -> Handover {
        let g = state.generation;
        let plan = match self.boot.take() {
            Some((stored, what)) if stored == g => Some(what),
            _ => None,
        };
        let plan = plan.unwrap_or_else(|| {
            if g == self.record.committed && self.good.is_some() {
                AtStart::Run
            } else if self.record.failed.as_ref().is_some_and(|f| f.generation == g && f.rolled_back) {
                AtStart::RunGood
            } else if self.good.is_none() {
                AtStart::Run
            } else {
                AtStart::Test
            }
        });
        self.trial = None;
        if self.pulls.as_ref().is_some_and(|w| w.generation() <= g) {
            self.pulls = None;
        }
        match plan {
            AtStart::Run => {
                if self.record.committed != g || self.good.is_none() {
                    // Trusted as it comes: nothing to go back to.
                    info!(generation = g, "committed: no last good generation to test it against");
                    self.commit(&state);
                } else if self.record.testing.is_some() {
                    self.record.testing = None;
                    self.write(Write::Record(self.record.clone()));
                }
                Handover { run: state, rolled_back: None }
            }
            AtStart::Test => {
                if self.record.testing.map(|(t, _)| t) != Some(g) {
                    self.record = self.record.begin(g);
                    self.write(Write::Record(self.record.clone()));
                }
                info!(generation = g, stable = ?state.rollout.stable, deadline = ?state.rollout.deadline, "generation on test");
                self.trial = Some(Trial::begin(&state, self.good.as_ref(), now));
                Handover { run: state, rolled_back: None }
            }
            AtStart::RunGood => match self.good.clone() {
                Some(good) => {
                    let why = self.record.failed.as_ref().map(|f| f.reason.clone()).unwrap_or_default();
                    Handover { run: good, rolled_back: Some(why) }
                }
                None => Handover { run: state, rolled_back: None },
            },
        }
    }

    fn commit(&mut self, state: &DesiredState) {
        self.record = self.record.commit(state.generation);
        if state.generation == 0 {
            self.good = None;
            self.write(Write::Record(self.record.clone()));
        } else {
            self.good = Some(state.clone());
            self.write(Write::Commit(Box::new(state.clone()), self.record.clone()));
        }
    }

    /// A controller state was offered: `false` when it is a generation that
    /// already failed (it is not tried again; the offer is answered as taken).
    pub fn offered(&mut self, state: &DesiredState, now: Instant) -> bool {
        if self.record.failed.as_ref().is_some_and(|f| f.generation == state.generation) {
            info!(generation = state.generation, "generation failed before: not tried again");
            return false;
        }
        if self.pulls.as_ref().is_none_or(|w| w.generation() != state.generation) {
            self.pulls = Some(PullWait::new(state, now));
        }
        true
    }

    /// The intake could not take `generation` (a pull failed): the failure,
    /// recorded, once its images are past the deadline.
    pub fn not_taken(&mut self, generation: u64, reason: &str, now: Instant) -> Option<RolloutFailure> {
        let w = self.pulls.as_ref().filter(|w| w.generation() == generation)?;
        let failure = w.failed(reason, now)?;
        self.pulls = None;
        warn!(generation, reason = %failure.reason, "generation given up: its images did not come in time");
        self.record = self.record.fail(failure.clone());
        self.write(Write::Record(self.record.clone()));
        Some(failure)
    }

    /// Shows the trial the reconciler's notes among `actions`.
    pub fn feed(&mut self, actions: &[crate::reconciler::Action]) {
        if let Some(t) = &mut self.trial {
            for a in actions {
                if let crate::reconciler::Action::Note(n) = a {
                    t.note(n);
                }
            }
        }
    }

    /// When the trial next needs a look with no new event.
    pub fn deadline(&self) -> Option<Instant> {
        self.trial.as_ref().map(Trial::next_deadline)
    }

    /// Judges the apps' status; on a verdict, records it and returns it with
    /// the state to run instead when the device goes back.
    /// `status` is asked for only while a generation is on test.
    pub fn observe(
        &mut self,
        applied: &DesiredState,
        status: impl FnOnce() -> Vec<AppStatus>,
        now: Instant,
    ) -> Option<(Verdict, Option<DesiredState>)> {
        let trial = self.trial.as_mut()?;
        if trial.generation() != applied.generation {
            return None;
        }
        let verdict = trial.observe(&status(), now)?;
        self.trial = None;
        match &verdict {
            Verdict::Commit { generation } => {
                info!(generation, "generation passed its test: committed as the last good one");
                self.commit(applied);
                Some((verdict, None))
            }
            Verdict::Fail(f) => {
                self.record = self.record.fail(f.clone());
                self.write(Write::Record(self.record.clone()));
                let back = if f.rolled_back { self.good.clone() } else { None };
                match &back {
                    Some(good) => warn!(
                        generation = f.generation, app = ?f.app, reason = %f.reason, back_to = good.generation,
                        "generation failed its test: rolling back"
                    ),
                    None => warn!(
                        generation = f.generation, app = ?f.app, reason = %f.reason,
                        "generation failed its test; not rolled back (rollback is off or nothing to go back to)"
                    ),
                }
                Some((verdict, back))
            }
        }
    }
}
