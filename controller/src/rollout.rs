//! Staged rollouts, the decisions: which device gets the new state when,
//! when a wave is done, when the rollout stops. Pure and synchronous: the
//! caller feeds it what the broker holds (each device's retained `desired`,
//! read with `peek_desired`, and its retained `reported`) and the time, and
//! carries out the actions it returns (`rollout_cmd` does the I/O).
//!
//! It keeps nothing that the broker does not hold, except what this run
//! itself did (the generation it signs, the devices it sent to and what they
//! had before), so a controller restarted in the middle continues from the
//! retained messages: a device whose retained desired state already has the
//! new content (same apps and `[rollout]`, any generation) is never sent it
//! again, and a wave whose devices all committed it is done at once.
//!
//! Waves are cumulative prefixes of the group sorted by device id, so the
//! same `--waves` over the same group always makes the same waves.

use skiff_common::protocol::{DesiredBody, DeviceId, Reported};
use skiff_common::validate::MAX_GENERATION;
use skiff_common::{DesiredState, Origin, RolloutFailure};
use std::collections::BTreeMap;
use std::ops::Range;
use std::time::Duration;
use tokio::time::Instant;

/// One part of `--waves`: how many devices the rollout has reached once this
/// wave is done (cumulative).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaveSize {
    Count(usize),
    Percent(u8),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WavesError {
    #[error("--waves is empty: give cumulative wave sizes such as 1,10%,100%")]
    Empty,
    #[error("--waves part {index} ({part:?}): {why}")]
    Part { index: usize, part: String, why: &'static str },
    #[error(
        "--waves part {index} ({part:?}) does not reach more devices than part {prev} ({prev_part:?}){group}: waves are cumulative, each must be larger than the one before"
    )]
    NotIncreasing { index: usize, part: String, prev: usize, prev_part: String, group: String },
}

/// A parsed `--waves`, in the order given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaveSpec {
    parts: Vec<(String, WaveSize)>,
}

/// Parses `1,10%,100%`: device counts (at least 1) and percentages (1% to
/// 100%) of the group, comma-separated, each larger than the one before.
pub fn parse_waves(text: &str) -> Result<WaveSpec, WavesError> {
    if text.trim().is_empty() {
        return Err(WavesError::Empty);
    }
    let mut parts: Vec<(String, WaveSize)> = Vec::new();
    for (i, raw) in text.split(',').enumerate() {
        let part = raw.trim();
        let bad = |why| WavesError::Part { index: i + 1, part: part.to_string(), why };
        let size = if part.is_empty() {
            return Err(bad("empty"));
        } else if let Some(p) = part.strip_suffix('%') {
            let p: u32 = p.parse().map_err(|_| bad("not a percentage (write e.g. 10%)"))?;
            if !(1..=100).contains(&p) {
                return Err(bad("a percentage of the group is 1% to 100%"));
            }
            WaveSize::Percent(p as u8)
        } else {
            let n: usize = part.parse().map_err(|_| bad("not a device count (N) or a percentage (N%)"))?;
            if n == 0 {
                return Err(bad("a wave has at least one device"));
            }
            WaveSize::Count(n)
        };
        // Parts of the same kind can be compared without the group.
        if let Some((j, (prev_part, _))) = parts.iter().enumerate().rev().find(|(_, (_, s))| {
            matches!(
                (s, size),
                (WaveSize::Count(a), WaveSize::Count(b)) if b <= *a
            ) || matches!((s, size), (WaveSize::Percent(a), WaveSize::Percent(b)) if b <= *a)
                || matches!(s, WaveSize::Percent(100))
        }) {
            return Err(WavesError::NotIncreasing {
                index: i + 1,
                part: part.to_string(),
                prev: j + 1,
                prev_part: prev_part.clone(),
                group: String::new(),
            });
        }
        parts.push((part.to_string(), size));
    }
    Ok(WaveSpec { parts })
}

impl WaveSpec {
    /// The waves over a group of `n` devices: ranges of the sorted group.
    /// A count above the group is the whole group; a percentage is rounded
    /// up; a part that reaches no device more than the one before (`1,10%`
    /// over 6 devices) makes no wave; a part that reaches fewer is an error.
    pub fn resolve(&self, n: usize) -> Result<Vec<Range<usize>>, WavesError> {
        let mut out = Vec::new();
        let mut start = 0;
        let mut prev: Option<(usize, &str)> = None;
        for (i, (part, size)) in self.parts.iter().enumerate() {
            let end = match *size {
                WaveSize::Count(c) => c.min(n),
                WaveSize::Percent(p) => (n * p as usize).div_ceil(100),
            };
            if end < start {
                let (prev, prev_part) = prev.expect("start > 0 only after a part");
                return Err(WavesError::NotIncreasing {
                    index: i + 1,
                    part: part.clone(),
                    prev,
                    prev_part: prev_part.to_string(),
                    group: format!(" over a group of {n}"),
                });
            }
            if end > start {
                out.push(start..end);
                start = end;
                prev = Some((i + 1, part));
            }
        }
        Ok(out)
    }
}

/// What the broker holds for one device.
#[derive(Clone, Debug, Default)]
pub struct Seen {
    /// The retained desired state (signature not checked: only compared).
    pub desired: Option<DesiredBody>,
    pub reported: Option<Reported>,
    /// The schema of the reported payload; below 3 the agent predates
    /// rollouts and counts every generation as committed once applied.
    pub reported_schema: u8,
}

/// Where one device stands with the new content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Its retained desired state does not have the new content.
    NotSent,
    /// Sent as `generation`; the device has not taken it yet.
    Pending {
        generation: u64,
    },
    Testing {
        generation: u64,
    },
    /// `legacy`: an agent before rollouts, which has no testing phase.
    Committed {
        generation: u64,
        legacy: bool,
    },
    Failed {
        generation: u64,
        failure: RolloutFailure,
    },
    /// The device refused the state (bad signature, unknown key, ...).
    Refused {
        generation: u64,
        reason: String,
    },
}

impl Progress {
    pub fn generation(&self) -> Option<u64> {
        match self {
            Progress::NotSent => None,
            Progress::Pending { generation }
            | Progress::Testing { generation }
            | Progress::Committed { generation, .. }
            | Progress::Failed { generation, .. }
            | Progress::Refused { generation, .. } => Some(*generation),
        }
    }

    fn is_bad(&self) -> bool {
        matches!(self, Progress::Failed { .. } | Progress::Refused { .. })
    }

    /// A word for people and for JSON.
    pub fn word(&self) -> &'static str {
        match self {
            Progress::NotSent => "not-sent",
            Progress::Pending { .. } => "pending",
            Progress::Testing { .. } => "testing",
            Progress::Committed { .. } => "committed",
            Progress::Failed { failure, .. } if failure.rolled_back => "rolled-back",
            Progress::Failed { .. } => "failed",
            Progress::Refused { .. } => "refused",
        }
    }
}

/// Same apps and same `[rollout]` (everything a state says): the generation
/// and origin do not count.
pub fn same_content(a: &DesiredState, b: &DesiredState) -> bool {
    let plain = |s: &DesiredState| DesiredState { generation: 0, origin: Origin::Controller, ..s.clone() };
    plain(a) == plain(b)
}

/// Where `seen` stands with `target`'s content.
pub fn progress(target: &DesiredState, seen: &Seen) -> Progress {
    let Some(generation) =
        seen.desired.as_ref().filter(|d| same_content(&d.state, target)).map(|d| d.state.generation)
    else {
        return Progress::NotSent;
    };
    let Some(r) = &seen.reported else { return Progress::Pending { generation } };
    if let Some(f) = r.rollout.failed.as_ref().filter(|f| f.generation == generation) {
        return Progress::Failed { generation, failure: f.clone() };
    }
    if let Some(rej) = r.last_rejection.as_ref().filter(|j| j.generation == Some(generation)) {
        if r.generation_applied < generation {
            return Progress::Refused { generation, reason: rej.reason.clone() };
        }
    }
    if r.rollout.committed >= generation {
        return Progress::Committed { generation, legacy: seen.reported_schema < 3 };
    }
    if r.rollout.testing == Some(generation) {
        return Progress::Testing { generation };
    }
    Progress::Pending { generation }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RolloutError {
    #[error(
        "device {device} has generation {generation}, at or above the highest allowed ({MAX_GENERATION}); take it back with `skiffctl apply --reset`"
    )]
    Generation { device: DeviceId, generation: u64 },
}

/// How a rollout ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every device of every wave committed the new state.
    Committed,
    /// A device of the wave failed its test (rolled back or not) or refused the state.
    Failed,
    /// The wave did not commit within the timeout.
    TimedOut,
}

/// One device in the final summary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    pub device: DeviceId,
    /// 1-based; 0 for devices of the group in no wave.
    pub wave: usize,
    pub progress: Progress,
    /// Its agent reports a schema before rollouts (such an agent refuses
    /// states of schema 3: it must be upgraded first).
    pub legacy: bool,
}

/// What `--abort-on-failure` did to the stopped wave.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Abort {
    /// Sent their previous desired state again under `generation`.
    pub resent: Vec<DeviceId>,
    pub generation: u64,
    /// Not sent: this run does not know their previous state (an earlier
    /// run sent them the new one) or they had none.
    pub unknown: Vec<DeviceId>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub verdict: Verdict,
    /// The 1-based wave it ended in (the last one when committed).
    pub wave: usize,
    pub waves: usize,
    pub generation: Option<u64>,
    /// Every device of the group, in order.
    pub rows: Vec<Row>,
    pub abort: Option<Abort>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// A wave begins (1-based), with its devices.
    WaveStarted {
        wave: usize,
        devices: Vec<DeviceId>,
    },
    /// Sign `state` (its generation set) for `device` and publish it retained.
    Send {
        device: DeviceId,
        state: DesiredState,
        rollback: bool,
    },
    /// A device of the wave moved on (pending, testing, committed, failed).
    Progress {
        device: DeviceId,
        progress: Progress,
    },
    WaveDone {
        wave: usize,
    },
    /// Nothing to do until a message comes, or until `until`.
    Wait {
        until: Instant,
    },
    /// The rollout is over: committed, or stopped in a wave.
    Done(Outcome),
}

pub struct Planner {
    devices: Vec<DeviceId>,
    waves: Vec<Range<usize>>,
    target: DesiredState,
    timeout: Duration,
    abort_on_failure: bool,
    seen: BTreeMap<DeviceId, Seen>,
    wave: usize,
    wave_started: Option<Instant>,
    /// The generation this run signs the new state with, chosen at the first send.
    generation: Option<u64>,
    /// What each device sent to by this run had before.
    previous: BTreeMap<DeviceId, Option<DesiredBody>>,
    announced: BTreeMap<DeviceId, Progress>,
    done: bool,
}

impl Planner {
    /// `devices` sorted and unique; `waves` from `WaveSpec::resolve` over them.
    pub fn new(
        devices: Vec<DeviceId>,
        waves: Vec<Range<usize>>,
        target: DesiredState,
        timeout: Duration,
        abort_on_failure: bool,
    ) -> Planner {
        let seen = devices.iter().map(|d| (d.clone(), Seen::default())).collect();
        Planner {
            devices,
            waves,
            target,
            timeout,
            abort_on_failure,
            seen,
            wave: 0,
            wave_started: None,
            generation: None,
            previous: BTreeMap::new(),
            announced: BTreeMap::new(),
            done: false,
        }
    }

    /// A retained desired state of `device` (`None`: cleared or unreadable).
    pub fn desired(&mut self, device: &DeviceId, body: Option<DesiredBody>) {
        if let Some(s) = self.seen.get_mut(device) {
            s.desired = body;
        }
    }

    pub fn reported(&mut self, device: &DeviceId, reported: Reported, schema: u8) {
        if let Some(s) = self.seen.get_mut(device) {
            s.reported = Some(reported);
            s.reported_schema = schema;
        }
    }

    /// The device's progress as of the last message.
    pub fn progress_of(&self, device: &DeviceId) -> Progress {
        self.seen.get(device).map_or(Progress::NotSent, |s| progress(&self.target, s))
    }

    /// One above every generation the group has or had, and at least
    /// `unix_now` (which keeps growing when the broker forgot everything),
    /// as `skiffctl apply` picks it.
    fn next_generation(&self, unix_now: u64) -> Result<u64, RolloutError> {
        let mut newest: Option<(&DeviceId, u64)> = None;
        for (d, s) in &self.seen {
            let r = s.reported.as_ref();
            let gens = [
                s.desired.as_ref().map(|b| b.state.generation),
                r.map(|r| r.generation_applied),
                r.map(|r| r.rollout.committed),
                r.and_then(|r| r.rollout.testing),
                r.and_then(|r| r.rollout.failed.as_ref().map(|f| f.generation)),
                self.generation,
            ];
            for g in gens.into_iter().flatten() {
                if newest.is_none_or(|(_, n)| g > n) {
                    newest = Some((d, g));
                }
            }
        }
        let Some((device, newest)) = newest else { return Ok(unix_now.clamp(1, MAX_GENERATION)) };
        match newest.checked_add(1).filter(|g| *g <= MAX_GENERATION) {
            Some(g) => Ok(g.max(unix_now).min(MAX_GENERATION)),
            None => Err(RolloutError::Generation { device: device.clone(), generation: newest }),
        }
    }

    /// What to do now. Call it after every message and when a `Wait` ends.
    pub fn step(&mut self, now: Instant, unix_now: u64) -> Result<Vec<Action>, RolloutError> {
        let mut out = Vec::new();
        if self.done {
            return Ok(out);
        }
        loop {
            let Some(range) = self.waves.get(self.wave).cloned() else {
                self.done = true;
                out.push(Action::Done(self.outcome(Verdict::Committed, None)));
                return Ok(out);
            };
            let wave_no = self.wave + 1;
            let started = *self.wave_started.get_or_insert_with(|| {
                out.push(Action::WaveStarted {
                    wave: wave_no,
                    devices: self.devices[range.clone()].to_vec(),
                });
                now
            });
            let mut all_committed = true;
            let mut bad = false;
            for device in &self.devices[range.clone()] {
                let p = self.progress_of(device);
                if p == Progress::NotSent && !self.previous.contains_key(device) {
                    let generation = match self.generation {
                        Some(g) => g,
                        None => {
                            let g = self.next_generation(unix_now)?;
                            self.generation = Some(g);
                            g
                        }
                    };
                    let mut state = self.target.clone();
                    state.generation = generation;
                    self.previous.insert(device.clone(), self.seen[device].desired.clone());
                    out.push(Action::Send { device: device.clone(), state, rollback: false });
                }
                if p != Progress::NotSent && self.announced.get(device) != Some(&p) {
                    self.announced.insert(device.clone(), p.clone());
                    out.push(Action::Progress { device: device.clone(), progress: p.clone() });
                }
                all_committed &= matches!(p, Progress::Committed { .. });
                bad |= p.is_bad();
            }
            if bad {
                let abort =
                    if self.abort_on_failure { Some(self.abort(range, unix_now, &mut out)?) } else { None };
                self.done = true;
                out.push(Action::Done(self.outcome(Verdict::Failed, abort)));
                return Ok(out);
            }
            if !all_committed {
                let until = started + self.timeout;
                if now >= until {
                    self.done = true;
                    out.push(Action::Done(self.outcome(Verdict::TimedOut, None)));
                } else {
                    out.push(Action::Wait { until });
                }
                return Ok(out);
            }
            out.push(Action::WaveDone { wave: wave_no });
            self.wave += 1;
            self.wave_started = None;
        }
    }

    /// Sends every device of the wave that has the new state what it had
    /// before, under a generation above all.
    fn abort(
        &mut self,
        range: Range<usize>,
        unix_now: u64,
        out: &mut Vec<Action>,
    ) -> Result<Abort, RolloutError> {
        let generation = self.next_generation(unix_now)?;
        let mut abort = Abort { generation, ..Abort::default() };
        for device in &self.devices[range] {
            // Sent by this run counts even before the broker echoed it.
            if self.progress_of(device) == Progress::NotSent && !self.previous.contains_key(device) {
                continue;
            }
            match self.previous.get(device).cloned().flatten() {
                Some(prev) => {
                    let mut state = prev.state;
                    state.generation = generation;
                    out.push(Action::Send { device: device.clone(), state, rollback: true });
                    abort.resent.push(device.clone());
                }
                None => abort.unknown.push(device.clone()),
            }
        }
        Ok(abort)
    }

    fn outcome(&self, verdict: Verdict, abort: Option<Abort>) -> Outcome {
        let wave_of = |i: usize| self.waves.iter().position(|r| r.contains(&i)).map_or(0, |w| w + 1);
        let rows = self
            .devices
            .iter()
            .enumerate()
            .map(|(i, d)| Row {
                device: d.clone(),
                wave: wave_of(i),
                progress: self.progress_of(d),
                legacy: self.seen[d].reported.is_some() && self.seen[d].reported_schema < 3,
            })
            .collect();
        Outcome {
            verdict,
            wave: (self.wave + 1).min(self.waves.len()),
            waves: self.waves.len(),
            generation: self.generation,
            rows,
            abort,
        }
    }
}

#[cfg(test)]
mod tests;
