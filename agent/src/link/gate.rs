//! The gate every `desired` message passes: signature, addressee, size and
//! generation. Pure; the driver acts on the verdict.
//!
//! A state is accepted only when it verifies (see `protocol::open_desired`,
//! which also validates it) and its generation is above the highest this
//! device has accepted or applied. The same generation again is a duplicate
//! (the broker redelivers the retained message on every subscribe),
//! acknowledged without noise. A lower one is a replay or an out-of-date
//! controller, and refused, unless it is a controller reset: a signed state
//! whose `replaces` is exactly the generation the device has now. A reset
//! moves the device to its (lower) generation; once the device has moved on
//! (to the reset's generation or past it), the same reset no longer matches
//! and is refused, so it cannot be replayed. Generations are bounded
//! (`validate::MAX_GENERATION`), so nothing here wraps; the reset is what
//! keeps a device that reached the bound (or any absurd generation) reachable.

use skiff_common::protocol::{open_desired_body, peek_desired, DeviceId, Rejection, VerifyingKey};
use skiff_common::DesiredState;

#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Accept(DesiredState),
    Duplicate,
    Reject(Rejection),
}

#[derive(Debug)]
pub struct Gate {
    device: DeviceId,
    key: VerifyingKey,
    highest: u64,
    /// The generation of the last reset accepted and not yet persisted:
    /// `raise` to it lowers `highest` instead of keeping the maximum.
    reset_to: Option<u64>,
}

impl Gate {
    pub fn new(device: DeviceId, key: VerifyingKey, highest: u64) -> Gate {
        Gate { device, key, highest, reset_to: None }
    }

    pub fn check(&mut self, payload: &[u8]) -> Verdict {
        let body = match open_desired_body(payload, &self.device, &self.key) {
            Ok(b) => b,
            Err(err) => {
                // What the payload claims, unverified: only to help a person match it up.
                let claimed = peek_desired(payload).ok().map(|(_, b)| b.state.generation);
                return Verdict::Reject(Rejection::new(claimed, format!("refused: {err}")));
            }
        };
        let g = body.state.generation;
        if g == self.highest {
            return Verdict::Duplicate;
        }
        match body.replaces {
            _ if g > self.highest => {
                self.reset_to = None;
                Verdict::Accept(body.state)
            }
            Some(r) if r == self.highest => {
                self.reset_to = Some(g);
                Verdict::Accept(body.state)
            }
            Some(r) => Verdict::Reject(Rejection::new(
                Some(g),
                format!(
                    "refused: a reset of generation {r} to {g}, but this device has generation {} (a replayed or out-of-date reset)",
                    self.highest
                ),
            )),
            None => Verdict::Reject(Rejection::new(
                Some(g),
                format!(
                    "refused: generation {g} is below {}, the newest this device has accepted (a replayed or out-of-date state; `skiffctl apply --reset` takes a device back)",
                    self.highest
                ),
            )),
        }
    }

    /// A state of this generation was persisted or applied. Keeps the
    /// highest, except for the generation of an accepted reset, which
    /// replaces it.
    pub fn raise(&mut self, generation: u64) {
        if self.reset_to == Some(generation) {
            self.reset_to = None;
            self.highest = generation;
        } else {
            self.highest = self.highest.max(generation);
        }
    }

    #[cfg(test)]
    pub fn highest(&self) -> u64 {
        self.highest
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skiff_common::protocol::{
        seal_desired, seal_desired_body, seal_desired_unvalidated, DesiredBody, SigningKey,
    };
    use skiff_common::Origin;

    fn setup() -> (SigningKey, DeviceId, Gate) {
        let k = SigningKey::from_bytes(&[3; 32]);
        let d = DeviceId::try_from("pi-1").unwrap();
        let g = Gate::new(d.clone(), k.verifying_key(), 5);
        (k, d, g)
    }

    fn state(generation: u64) -> DesiredState {
        DesiredState { generation, origin: Origin::Controller, ..DesiredState::empty() }
    }

    #[test]
    fn newer_is_accepted_same_is_duplicate_older_is_refused() {
        let (k, d, mut g) = setup();
        let p = |n| seal_desired(&k, &d, &state(n)).unwrap();
        assert_eq!(g.check(&p(6)), Verdict::Accept(state(6)));
        assert_eq!(g.check(&p(5)), Verdict::Duplicate);
        let Verdict::Reject(r) = g.check(&p(4)) else { panic!() };
        assert_eq!(r.generation, Some(4));
        assert!(r.reason.starts_with("refused: generation 4 is below 5,"), "{}", r.reason);
        g.raise(6);
        g.raise(2);
        assert_eq!(g.highest(), 6);
        assert_eq!(g.check(&p(6)), Verdict::Duplicate);
    }

    #[test]
    fn a_signed_state_that_breaks_an_invariant_is_refused_naming_app_and_field() {
        let (k, d, mut g) = setup();
        let mut s = skiff_common::toml_file::parse("[[app]]\nname = \"web\"\nimage = \"busybox\"\n").unwrap();
        s.generation = 6;
        s.origin = Origin::Controller;
        s.apps[0].stop_grace = std::time::Duration::MAX;
        // Signed as a buggy or compromised controller would: seal_desired itself refuses it.
        assert!(seal_desired(&k, &d, &s).is_err());
        let body = DesiredBody { device: d.clone(), state: s, replaces: None };
        let payload = seal_desired_unvalidated(&k, &body).unwrap();
        let Verdict::Reject(r) = g.check(&payload) else { panic!() };
        assert_eq!(r.generation, Some(6));
        assert_eq!(r.reason, "refused: invalid desired state: app \"web\": stop_grace: must be at most 10m");
        // The security settings go through the same checks.
        let mut s = skiff_common::toml_file::parse("[[app]]\nname = \"web\"\nimage = \"busybox\"\n").unwrap();
        s.generation = 7;
        s.origin = Origin::Controller;
        s.apps[0].security.cap_add = vec![skiff_common::Capability::SysAdmin; 2];
        let body = DesiredBody { device: d.clone(), state: s, replaces: None };
        let Verdict::Reject(r) = g.check(&seal_desired_unvalidated(&k, &body).unwrap()) else { panic!() };
        assert_eq!(
            r.reason,
            "refused: invalid desired state: app \"web\": cap_add: CAP_SYS_ADMIN is listed twice"
        );
    }

    #[test]
    fn a_reset_takes_the_device_back_once_and_cannot_be_replayed() {
        let (k, d, mut g) = setup();
        let max = skiff_common::validate::MAX_GENERATION;
        let normal = |n| seal_desired(&k, &d, &state(n)).unwrap();
        let reset = |n, replaces| {
            seal_desired_body(
                &k,
                &DesiredBody { device: d.clone(), state: state(n), replaces: Some(replaces) },
            )
            .unwrap()
        };
        // Driven to the highest generation there is.
        assert_eq!(g.check(&normal(max)), Verdict::Accept(state(max)));
        g.raise(max);
        // Past it: refused by validation, nothing wraps.
        let mut over = state(max);
        over.generation = max + 1;
        let body = DesiredBody { device: d.clone(), state: over, replaces: None };
        let Verdict::Reject(r) = g.check(&seal_desired_unvalidated(&k, &body).unwrap()) else { panic!() };
        assert!(
            r.reason.contains("generation 9007199254740992 is above the highest allowed"),
            "{}",
            r.reason
        );
        // A reset that names the wrong current generation is refused.
        let Verdict::Reject(r) = g.check(&reset(7, max - 1)) else { panic!() };
        assert!(r.reason.contains("replayed or out-of-date reset"), "{}", r.reason);
        // The right one is accepted, and persisting it lowers the bar.
        let r7 = reset(7, max);
        assert_eq!(g.check(&r7), Verdict::Accept(state(7)));
        g.raise(max); // a report still in flight changes nothing
        g.raise(7);
        assert_eq!(g.highest(), 7);
        // Redelivered by the broker: a duplicate. Then the device moves on.
        assert_eq!(g.check(&r7), Verdict::Duplicate);
        assert_eq!(g.check(&normal(8)), Verdict::Accept(state(8)));
        g.raise(8);
        assert_eq!(g.check(&normal(7)), Verdict::Reject(Rejection::new(Some(7), g_below(7, 8))));
        // Replayed now, the reset no longer matches.
        let Verdict::Reject(r) = g.check(&r7) else { panic!() };
        assert_eq!(r.generation, Some(7));
        assert!(r.reason.contains("this device has generation 8"), "{}", r.reason);
        // A reset with a higher generation is just a newer state.
        assert_eq!(g.check(&reset(9, 1)), Verdict::Accept(state(9)));
    }

    fn g_below(g: u64, highest: u64) -> String {
        format!("refused: generation {g} is below {highest}, the newest this device has accepted (a replayed or out-of-date state; `skiffctl apply --reset` takes a device back)")
    }

    #[test]
    fn forged_and_garbage_are_refused_with_a_reason() {
        let (_, d, mut g) = setup();
        let other = SigningKey::from_bytes(&[4; 32]);
        let forged = seal_desired(&other, &d, &state(9)).unwrap();
        let Verdict::Reject(r) = g.check(&forged) else { panic!() };
        assert_eq!(r.generation, Some(9));
        assert!(r.reason.contains("key"), "{}", r.reason);
        let Verdict::Reject(r) = g.check(b"hello") else { panic!() };
        assert_eq!(r.generation, None);
        assert!(r.reason.contains("too short"), "{}", r.reason);
    }
}
