//! Intake: what the agent does with a desired state before the reconciler sees it.
//!
//! Pure and synchronous, like the reconciler: `Intake::step(input) -> Vec<Output>`.
//! The daemon feeds it what the link offers, what pulls and flash writes
//! answered and what the state file holds, and carries out the outputs.
//!
//! Contract with the daemon:
//! - `Input::Offered` carries a verified controller state and which of its images
//!   the store has now. The daemon keeps the link's `persisted` answer until an
//!   `Output::Answer` for that generation comes out (at most one per offer).
//! - `Output::Pull` is answered by `Input::Pulled`, `Output::Persist` by
//!   `Input::Persisted`. Pulls go one at a time: a new `Pull` only comes out
//!   after the previous one was answered.
//! - `Output::Apply` hands a state to the reconciler; `Output::Collect` lets the
//!   image store drop what neither that state nor the one before it uses (not
//!   after the first state of a run, whose predecessor is not known).
//!
//! Decisions:
//! - A controller state is persisted only once every image it needs is in the
//!   store (pulled first, in app order: `always` images each time a state is
//!   offered, `if-not-present` images when missing; a missing `never` image
//!   refuses the state). So the old containers run until the new images are
//!   complete, and a failed pull stops nothing.
//! - Persist before acknowledge: `Answer(Ok)` and `Apply` come out only after
//!   `Persisted(Ok)`. Any failure (pull or flash) is answered `Err`: the link
//!   keeps the message unacknowledged and offers it again with its backoff, and
//!   the next offer resumes the pull from the bytes already on disk.
//! - A newer offer replaces a pending one (its pull in flight goes on if the
//!   new state needs that image too); the replaced offer is answered `Err`.
//! - A state file reloaded from disk (`skiff apply`, start-up) is applied when
//!   its generation differs from the applied one (or nothing was applied yet);
//!   its images were pulled by `skiff apply` itself.

use skiff_common::protocol::EventKind;
use skiff_common::{DesiredState, ImageRef, Origin, PullPolicy};
use std::collections::BTreeSet;

#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// A verified controller state; `present`: which of its images the store has.
    Offered { state: DesiredState, present: BTreeSet<ImageRef> },
    /// A `Pull` ended.
    Pulled { image: ImageRef, result: Result<(), String> },
    /// A `Persist` ended.
    Persisted { generation: u64, result: Result<(), String> },
    /// The state file as `load` read it (start-up, after `skiff apply`, or a
    /// change seen on disk); `fell_back` says why the previous generation was used.
    Loaded { result: Result<(DesiredState, Option<String>), String> },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Pull this image into the store, then answer `Pulled`.
    Pull { image: ImageRef },
    /// Write this state to flash (on a blocking thread), then answer `Persisted`.
    Persist { state: DesiredState },
    /// Answer the link's offer of `generation`.
    Answer { generation: u64, result: Result<(), String> },
    /// Hand this state to the reconciler.
    Apply { state: DesiredState },
    /// Garbage-collect images that none of `keep` names.
    Collect { keep: BTreeSet<ImageRef> },
    /// For the log and the controller.
    Event { kind: EventKind, detail: String },
    /// Answer to a reload request: the generation now applied, or why not.
    Reloaded { result: Result<u64, String> },
}

/// A controller state waiting for its images or for flash.
#[derive(Debug)]
struct Pending {
    state: DesiredState,
    /// Images still to pull, in order.
    need: Vec<ImageRef>,
    persisting: bool,
}

#[derive(Debug)]
pub struct Intake {
    /// What the reconciler runs (generation 0: nothing applied yet).
    applied: DesiredState,
    pending: Option<Pending>,
    /// The pull in flight, if any (it may belong to a replaced offer).
    pulling: Option<ImageRef>,
}

impl Default for Intake {
    fn default() -> Self {
        Intake::new()
    }
}

impl Intake {
    pub fn new() -> Intake {
        Intake { applied: DesiredState::empty(), pending: None, pulling: None }
    }

    /// The generation handed to the reconciler last.
    pub fn applied(&self) -> &DesiredState {
        &self.applied
    }

    /// The generation waiting for images or flash, if any.
    pub fn pending_generation(&self) -> Option<u64> {
        self.pending.as_ref().map(|p| p.state.generation)
    }

    /// Images of the pending state still to pull (the one in flight first).
    pub fn waiting_for(&self) -> Vec<ImageRef> {
        self.pending.as_ref().map(|p| p.need.clone()).unwrap_or_default()
    }

    pub fn step(&mut self, input: Input) -> Vec<Output> {
        let mut out = Vec::new();
        match input {
            Input::Offered { state, present } => self.offered(state, &present, &mut out),
            Input::Pulled { image, result } => self.pulled(image, result, &mut out),
            Input::Persisted { generation, result } => self.persisted(generation, result, &mut out),
            Input::Loaded { result } => self.loaded(result, &mut out),
        }
        out
    }

    fn offered(&mut self, state: DesiredState, present: &BTreeSet<ImageRef>, out: &mut Vec<Output>) {
        let generation = state.generation;
        if let Some(old) = self.pending.take() {
            if old.state.generation != generation {
                out.push(Output::Answer {
                    generation: old.state.generation,
                    result: Err(format!("superseded by generation {generation}")),
                });
            }
        }
        let mut need = Vec::new();
        let mut refused = Vec::new();
        for app in &state.apps {
            let here = present.contains(&app.image);
            let pull = match app.pull {
                PullPolicy::Always => true,
                PullPolicy::IfNotPresent => !here,
                PullPolicy::Never => {
                    if !here {
                        refused.push(format!(
                            "app {}: image {} is not on this device and its pull policy is never",
                            app.name, app.image
                        ));
                    }
                    false
                }
            };
            if pull && !need.contains(&app.image) {
                need.push(app.image.clone());
            }
        }
        if !refused.is_empty() {
            out.push(Output::Answer { generation, result: Err(refused.join("; ")) });
            return;
        }
        // A pull in flight that this state needs goes first: it is not started twice.
        if let Some(p) = &self.pulling {
            if let Some(i) = need.iter().position(|n| n == p) {
                let img = need.remove(i);
                need.insert(0, img);
            }
        }
        self.pending = Some(Pending { state, need, persisting: false });
        self.advance(out);
    }

    fn pulled(&mut self, image: ImageRef, result: Result<(), String>, out: &mut Vec<Output>) {
        if self.pulling.as_ref() == Some(&image) {
            self.pulling = None;
        }
        if let Some(p) = &mut self.pending {
            if p.need.first() == Some(&image) {
                match result {
                    Ok(()) => {
                        p.need.remove(0);
                    }
                    Err(e) => {
                        let generation = p.state.generation;
                        self.pending = None;
                        out.push(Output::Answer { generation, result: Err(format!("pulling {image}: {e}")) });
                        return;
                    }
                }
            }
        }
        self.advance(out);
    }

    /// Starts the next pull, or the write once nothing is left to pull.
    fn advance(&mut self, out: &mut Vec<Output>) {
        let Some(p) = &mut self.pending else { return };
        if p.persisting {
            return;
        }
        match p.need.first() {
            Some(next) => {
                if self.pulling.is_none() {
                    self.pulling = Some(next.clone());
                    out.push(Output::Pull { image: next.clone() });
                }
            }
            None => {
                p.persisting = true;
                out.push(Output::Persist { state: p.state.clone() });
            }
        }
    }

    fn persisted(&mut self, generation: u64, result: Result<(), String>, out: &mut Vec<Output>) {
        let Some(p) = self.pending.take_if(|p| p.persisting && p.state.generation == generation) else {
            return;
        };
        match result {
            Ok(()) => {
                out.push(Output::Answer { generation, result: Ok(()) });
                if self.applied.origin == Origin::Local && self.applied.generation > 0 {
                    out.push(Output::Event {
                        kind: EventKind::Replacing,
                        detail: format!(
                            "local desired state (generation {}) replaced by the controller's generation {generation}; it is kept as desired.prev.skf",
                            self.applied.generation
                        ),
                    });
                }
                self.apply(p.state, out);
            }
            Err(e) => out.push(Output::Answer { generation, result: Err(e) }),
        }
    }

    fn loaded(&mut self, result: Result<(DesiredState, Option<String>), String>, out: &mut Vec<Output>) {
        match result {
            Ok((state, fell_back)) => {
                if let Some(why) = fell_back {
                    out.push(Output::Event {
                        kind: EventKind::Error,
                        detail: format!("desired state unreadable, running the previous generation: {why}"),
                    });
                }
                let generation = state.generation;
                if generation != self.applied.generation || self.applied.generation == 0 {
                    self.apply(state, out);
                }
                out.push(Output::Reloaded { result: Ok(generation) });
            }
            Err(e) => {
                out.push(Output::Event {
                    kind: EventKind::Error,
                    detail: format!("cannot read the desired state; keeping what runs: {e}"),
                });
                out.push(Output::Reloaded { result: Err(e) });
            }
        }
    }

    fn apply(&mut self, state: DesiredState, out: &mut Vec<Output>) {
        // The first state of a run is the one on flash: the generation before it
        // is not known here, so nothing is collected until the state changes.
        let collect = self.applied.generation != 0;
        let keep: BTreeSet<ImageRef> =
            self.applied.apps.iter().chain(state.apps.iter()).map(|a| a.image.clone()).collect();
        self.applied = state.clone();
        out.push(Output::Apply { state });
        if collect {
            out.push(Output::Collect { keep });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skiff_common::toml_file;

    fn state(generation: u64, origin: Origin, apps: &[(&str, &str, &str)]) -> DesiredState {
        let mut text = String::new();
        for (name, image, pull) in apps {
            text.push_str(&format!("[[app]]\nname = \"{name}\"\nimage = \"{image}\"\npull = \"{pull}\"\n"));
        }
        let mut s = toml_file::parse(&text).unwrap();
        s.generation = generation;
        s.origin = origin;
        s
    }

    fn img(s: &str) -> ImageRef {
        ImageRef::try_from(s).unwrap()
    }

    fn present(list: &[&str]) -> BTreeSet<ImageRef> {
        list.iter().map(|s| img(s)).collect()
    }

    fn keep(list: &[&str]) -> Output {
        Output::Collect { keep: present(list) }
    }

    #[test]
    fn images_present_persist_then_answer_then_apply() {
        let mut i = Intake::new();
        let s = state(5, Origin::Controller, &[("web", "web:1", "if-not-present")]);
        let out = i.step(Input::Offered { state: s.clone(), present: present(&["web:1"]) });
        assert_eq!(out, vec![Output::Persist { state: s.clone() }]);
        let out = i.step(Input::Persisted { generation: 5, result: Ok(()) });
        // The first state of a run: nothing is collected (its predecessor is unknown).
        assert_eq!(
            out,
            vec![Output::Answer { generation: 5, result: Ok(()) }, Output::Apply { state: s.clone() }]
        );
        assert_eq!(i.applied().generation, 5);
    }

    #[test]
    fn missing_images_are_pulled_one_at_a_time_before_anything_is_written() {
        let mut i = Intake::new();
        let s = state(
            7,
            Origin::Controller,
            &[("a", "a:2", "if-not-present"), ("b", "b:2", "if-not-present"), ("c", "a:2", "if-not-present")],
        );
        let out = i.step(Input::Offered { state: s.clone(), present: present(&[]) });
        assert_eq!(out, vec![Output::Pull { image: img("a:2") }]);
        let out = i.step(Input::Pulled { image: img("a:2"), result: Ok(()) });
        assert_eq!(out, vec![Output::Pull { image: img("b:2") }]);
        assert_eq!(i.waiting_for(), vec![img("b:2")]);
        let out = i.step(Input::Pulled { image: img("b:2"), result: Ok(()) });
        assert_eq!(out, vec![Output::Persist { state: s }]);
    }

    #[test]
    fn a_failed_pull_answers_err_and_the_next_offer_pulls_again() {
        let mut i = Intake::new();
        let s = state(7, Origin::Controller, &[("a", "a:2", "if-not-present")]);
        i.step(Input::Offered { state: s.clone(), present: present(&[]) });
        let out = i.step(Input::Pulled { image: img("a:2"), result: Err("connection reset".into()) });
        assert_eq!(
            out,
            vec![Output::Answer { generation: 7, result: Err("pulling a:2: connection reset".into()) }]
        );
        assert_eq!(i.pending_generation(), None);
        assert_eq!(i.applied().generation, 0, "nothing applied: the old containers keep running");
        let out = i.step(Input::Offered { state: s, present: present(&[]) });
        assert_eq!(out, vec![Output::Pull { image: img("a:2") }]);
    }

    #[test]
    fn always_pulls_even_when_present_and_never_refuses_when_missing() {
        let mut i = Intake::new();
        let s = state(3, Origin::Controller, &[("a", "a:1", "always")]);
        let out = i.step(Input::Offered { state: s, present: present(&["a:1"]) });
        assert_eq!(out, vec![Output::Pull { image: img("a:1") }]);

        let mut i = Intake::new();
        let s = state(3, Origin::Controller, &[("a", "a:1", "never"), ("b", "b:1", "never")]);
        let out = i.step(Input::Offered { state: s.clone(), present: present(&["b:1"]) });
        assert_eq!(
            out,
            vec![Output::Answer {
                generation: 3,
                result: Err("app a: image a:1 is not on this device and its pull policy is never".into())
            }]
        );
        let out = i.step(Input::Offered { state: s.clone(), present: present(&["a:1", "b:1"]) });
        assert_eq!(out, vec![Output::Persist { state: s }]);
    }

    #[test]
    fn a_newer_offer_supersedes_and_keeps_the_pull_in_flight() {
        let mut i = Intake::new();
        let s1 =
            state(1, Origin::Controller, &[("a", "a:1", "if-not-present"), ("b", "b:1", "if-not-present")]);
        assert_eq!(
            i.step(Input::Offered { state: s1, present: present(&[]) }),
            vec![Output::Pull { image: img("a:1") }]
        );
        // Generation 2 needs b:1 first in app order, but a:1 is already coming.
        let s2 =
            state(2, Origin::Controller, &[("b", "b:1", "if-not-present"), ("c", "a:1", "if-not-present")]);
        let out = i.step(Input::Offered { state: s2.clone(), present: present(&[]) });
        assert_eq!(
            out,
            vec![Output::Answer { generation: 1, result: Err("superseded by generation 2".into()) }]
        );
        assert_eq!(i.waiting_for(), vec![img("a:1"), img("b:1")]);
        let out = i.step(Input::Pulled { image: img("a:1"), result: Ok(()) });
        assert_eq!(out, vec![Output::Pull { image: img("b:1") }]);
        let out = i.step(Input::Pulled { image: img("b:1"), result: Ok(()) });
        assert_eq!(out, vec![Output::Persist { state: s2 }]);
    }

    #[test]
    fn a_pull_of_a_replaced_offer_that_the_new_one_does_not_need_is_waited_out() {
        let mut i = Intake::new();
        let s1 = state(1, Origin::Controller, &[("a", "a:1", "if-not-present")]);
        i.step(Input::Offered { state: s1, present: present(&[]) });
        let s2 = state(2, Origin::Controller, &[("b", "b:1", "if-not-present")]);
        let out = i.step(Input::Offered { state: s2, present: present(&[]) });
        // One pull at a time: b:1 starts once a:1 has ended, whatever its outcome.
        assert_eq!(
            out,
            vec![Output::Answer { generation: 1, result: Err("superseded by generation 2".into()) }]
        );
        let out = i.step(Input::Pulled { image: img("a:1"), result: Err("cut".into()) });
        assert_eq!(out, vec![Output::Pull { image: img("b:1") }]);
    }

    #[test]
    fn a_failed_write_is_answered_err_and_nothing_is_applied() {
        let mut i = Intake::new();
        let s = state(4, Origin::Controller, &[("a", "a:1", "if-not-present")]);
        i.step(Input::Offered { state: s, present: present(&["a:1"]) });
        let out = i.step(Input::Persisted { generation: 4, result: Err("No space left on device".into()) });
        assert_eq!(
            out,
            vec![Output::Answer { generation: 4, result: Err("No space left on device".into()) }]
        );
        assert_eq!(i.applied().generation, 0);
        // A late answer for a state no longer pending changes nothing.
        assert_eq!(i.step(Input::Persisted { generation: 4, result: Ok(()) }), vec![]);
    }

    #[test]
    fn a_controller_state_over_a_local_one_says_so_and_keeps_both_generations_images() {
        let mut i = Intake::new();
        let local = state(2, Origin::Local, &[("a", "a:1", "if-not-present")]);
        let out = i.step(Input::Loaded { result: Ok((local.clone(), None)) });
        assert_eq!(out, vec![Output::Apply { state: local }, Output::Reloaded { result: Ok(2) }]);
        let s = state(9, Origin::Controller, &[("a", "a:2", "if-not-present")]);
        i.step(Input::Offered { state: s.clone(), present: present(&["a:2"]) });
        let out = i.step(Input::Persisted { generation: 9, result: Ok(()) });
        assert_eq!(out.len(), 4, "{out:?}");
        assert!(
            matches!(&out[1], Output::Event { kind: EventKind::Replacing, detail } if detail.contains("generation 2"))
        );
        assert_eq!(out[2], Output::Apply { state: s });
        assert_eq!(out[3], keep(&["a:1", "a:2"]));
    }

    #[test]
    fn reloads_apply_only_a_new_generation_and_report_why_they_fell_back() {
        let mut i = Intake::new();
        let s = state(3, Origin::Local, &[("a", "a:1", "if-not-present")]);
        i.step(Input::Loaded { result: Ok((s.clone(), None)) });
        assert_eq!(
            i.step(Input::Loaded { result: Ok((s.clone(), None)) }),
            vec![Output::Reloaded { result: Ok(3) }]
        );
        let out = i.step(Input::Loaded { result: Ok((s, Some("CRC mismatch".into()))) });
        assert!(
            matches!(&out[0], Output::Event { kind: EventKind::Error, detail } if detail.ends_with("CRC mismatch"))
        );
        let out = i.step(Input::Loaded { result: Err("permission denied".into()) });
        assert_eq!(out[1], Output::Reloaded { result: Err("permission denied".into()) });
        assert_eq!(i.applied().generation, 3);
        // Nothing stored yet (generation 0) is still applied once, so start-up runs.
        let mut i = Intake::new();
        let out = i.step(Input::Loaded { result: Ok((DesiredState::empty(), None)) });
        assert_eq!(out[0], Output::Apply { state: DesiredState::empty() });
    }
}
