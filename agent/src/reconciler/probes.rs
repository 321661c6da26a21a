//! Probe bookkeeping for one running container, with kubelet semantics.
//!
//! Owns, per probe kind, when the next attempt is due, whether one is in
//! flight, the consecutive success/failure counts and the resulting health.
//! It only decides; the caller (`state`) turns verdicts into notes and stops.
//!
//! Invariants:
//! - At most one attempt per kind is in flight: an attempt is only due again
//!   `period` after its result arrived (not after it was sent), so a slow
//!   probe spaces the next one out instead of piling them up.
//! - With a startup probe, liveness and readiness are not scheduled until the
//!   startup probe has passed once; they then fire at
//!   `max(startup passed, start + initial_delay)` (kubelet counts the initial
//!   delay from the container start). A passed startup probe never runs again.
//! - Liveness and startup pass on one success (Kubernetes rejects any other
//!   success threshold for them); readiness honours `success_threshold`.

use super::ProbeKind;
use skiff_common::{AppSpec, Health, Probe};
use std::time::Duration;
use tokio::time::Instant;

/// The order in which due probes of one container are emitted.
const KINDS: [ProbeKind; 3] = [ProbeKind::Startup, ProbeKind::Liveness, ProbeKind::Readiness];

/// The spec's probe of this kind, if it has one.
pub(super) fn probe_of(spec: &AppSpec, kind: ProbeKind) -> Option<&Probe> {
    match kind {
        ProbeKind::Startup => spec.startup.as_ref(),
        ProbeKind::Liveness => spec.liveness.as_ref(),
        ProbeKind::Readiness => spec.readiness.as_ref(),
    }
}

/// `t + d`, saturating: a huge (but validly decoded) duration must not panic
/// the agent; a year from now is "never" for a probe or a backoff.
pub(super) fn after(t: Instant, d: Duration) -> Instant {
    const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);
    t.checked_add(d).or_else(|| t.checked_add(YEAR)).unwrap_or(t)
}

/// What a probe result means for the container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Nothing anyone outside needs to hear beyond the attempt itself.
    Nothing,
    /// Readiness flipped to this value.
    ReadyChanged(bool),
    /// Liveness or startup reached its failure threshold: kill the container.
    Kill,
}

#[derive(Debug, Clone)]
struct Slot {
    /// When the next attempt is due; `None` while one is in flight, while
    /// gated by the startup probe, or (startup) after it passed.
    due: Option<Instant>,
    in_flight: bool,
    successes: u32,
    failures: u32,
    health: Health,
}

impl Slot {
    fn new(due: Option<Instant>) -> Slot {
        Slot { due, in_flight: false, successes: 0, failures: 0, health: Health::Unknown }
    }
}

#[derive(Debug, Clone)]
pub(super) struct Probes {
    /// When the container started; initial delays count from here.
    since: Instant,
    startup: Option<Slot>,
    liveness: Option<Slot>,
    readiness: Option<Slot>,
}

impl Probes {
    /// Probes of a container of `spec` that started at `since` (in the past
    /// for an adopted container, so its first probes may already be due).
    pub(super) fn new(spec: &AppSpec, since: Instant) -> Probes {
        let first = |p: &Probe| Some(after(since, p.initial_delay));
        let gated = spec.startup.is_some();
        let gated_first = |p: &Probe| if gated { None } else { first(p) };
        Probes {
            since,
            startup: spec.startup.as_ref().map(|p| Slot::new(first(p))),
            liveness: spec.liveness.as_ref().map(|p| Slot::new(gated_first(p))),
            readiness: spec.readiness.as_ref().map(|p| Slot::new(gated_first(p))),
        }
    }

    fn slot(&self, kind: ProbeKind) -> Option<&Slot> {
        match kind {
            ProbeKind::Startup => self.startup.as_ref(),
            ProbeKind::Liveness => self.liveness.as_ref(),
            ProbeKind::Readiness => self.readiness.as_ref(),
        }
    }

    fn slot_mut(&mut self, kind: ProbeKind) -> Option<&mut Slot> {
        match kind {
            ProbeKind::Startup => self.startup.as_mut(),
            ProbeKind::Liveness => self.liveness.as_mut(),
            ProbeKind::Readiness => self.readiness.as_mut(),
        }
    }

    /// The kinds due at `now`, marked in flight, in `KINDS` order.
    pub(super) fn fire(&mut self, now: Instant) -> Vec<ProbeKind> {
        let mut kinds = Vec::new();
        for kind in KINDS {
            if let Some(slot) = self.slot_mut(kind) {
                if !slot.in_flight && slot.due.is_some_and(|d| d <= now) {
                    slot.in_flight = true;
                    slot.due = None;
                    kinds.push(kind);
                }
            }
        }
        kinds
    }

    /// The earliest time an attempt is due.
    pub(super) fn next_due(&self) -> Option<Instant> {
        KINDS.iter().filter_map(|&k| self.slot(k).and_then(|s| s.due)).min()
    }

    pub(super) fn live(&self) -> Health {
        self.liveness.as_ref().map_or(Health::None, |s| s.health)
    }

    pub(super) fn ready(&self) -> Health {
        self.readiness.as_ref().map_or(Health::None, |s| s.health)
    }

    /// Records the result of the attempt in flight. `None` when no attempt of
    /// this kind is in flight (a duplicate or unexpected result): ignore it.
    pub(super) fn record(
        &mut self,
        spec: &AppSpec,
        kind: ProbeKind,
        ok: bool,
        now: Instant,
    ) -> Option<Verdict> {
        let probe = probe_of(spec, kind)?;
        let slot = self.slot_mut(kind)?;
        if !slot.in_flight {
            return None;
        }
        slot.in_flight = false;
        if ok {
            slot.failures = 0;
            slot.successes = slot.successes.saturating_add(1);
        } else {
            slot.successes = 0;
            slot.failures = slot.failures.saturating_add(1);
        }
        let failed_out = !ok && slot.failures >= probe.failure_threshold.max(1);
        slot.due = Some(after(now, probe.period));
        let verdict = match kind {
            ProbeKind::Startup | ProbeKind::Liveness if ok => {
                slot.health = Health::Passing;
                Verdict::Nothing
            }
            ProbeKind::Startup | ProbeKind::Liveness if failed_out => {
                slot.health = Health::Failing;
                Verdict::Kill
            }
            ProbeKind::Startup | ProbeKind::Liveness => Verdict::Nothing,
            ProbeKind::Readiness => {
                let was_ready = slot.health == Health::Passing;
                if ok && slot.successes >= probe.success_threshold.max(1) {
                    slot.health = Health::Passing;
                } else if failed_out {
                    slot.health = Health::Failing;
                }
                let ready = slot.health == Health::Passing;
                if ready != was_ready {
                    Verdict::ReadyChanged(ready)
                } else {
                    Verdict::Nothing
                }
            }
        };
        if kind == ProbeKind::Startup && ok {
            slot.due = None;
            self.ungate(spec, now);
        }
        Some(verdict)
    }

    /// Startup passed at `now`: schedule liveness and readiness.
    fn ungate(&mut self, spec: &AppSpec, now: Instant) {
        let since = self.since;
        for kind in [ProbeKind::Liveness, ProbeKind::Readiness] {
            if let (Some(probe), Some(slot)) = (probe_of(spec, kind), self.slot_mut(kind)) {
                slot.due = Some(after(since, probe.initial_delay).max(now));
            }
        }
    }
}
