//! The gate every `desired` message passes: signature, addressee, size and
//! generation. Pure; the driver acts on the verdict.
//!
//! A state is accepted only when it verifies (see `protocol::open_desired`)
//! and its generation is above the highest this device has accepted or
//! applied. The same generation again is a duplicate (the broker redelivers
//! the retained message on every subscribe), acknowledged without noise. A
//! lower one is a replay or an out-of-date controller, and refused.

use skiff_common::protocol::{open_desired, peek_desired, DeviceId, Rejection, VerifyingKey};
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
}

impl Gate {
    pub fn new(device: DeviceId, key: VerifyingKey, highest: u64) -> Gate {
        Gate { device, key, highest }
    }

    pub fn check(&self, payload: &[u8]) -> Verdict {
        match open_desired(payload, &self.device, &self.key) {
            Err(err) => {
                // What the payload claims, unverified: only to help a person match it up.
                let claimed = peek_desired(payload).ok().map(|(_, b)| b.state.generation);
                Verdict::Reject(Rejection::new(claimed, format!("refused: {err}")))
            }
            Ok(s) if s.generation == self.highest => Verdict::Duplicate,
            Ok(s) if s.generation < self.highest => Verdict::Reject(Rejection::new(
                Some(s.generation),
                format!(
                    "refused: generation {} is below {}, the newest this device has accepted (a replayed or out-of-date state)",
                    s.generation, self.highest
                ),
            )),
            Ok(s) => Verdict::Accept(s),
        }
    }

    /// A state of this generation was persisted or applied.
    pub fn raise(&mut self, generation: u64) {
        self.highest = self.highest.max(generation);
    }

    #[cfg(test)]
    pub fn highest(&self) -> u64 {
        self.highest
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skiff_common::protocol::{seal_desired, seal_desired_unvalidated, DesiredBody, SigningKey};
    use skiff_common::Origin;

    fn setup() -> (SigningKey, DeviceId, Gate) {
        let k = SigningKey::from_bytes(&[3; 32]);
        let d = DeviceId::try_from("pi-1").unwrap();
        let g = Gate::new(d.clone(), k.verifying_key(), 5);
        (k, d, g)
    }

    fn state(generation: u64) -> DesiredState {
        DesiredState { generation, origin: Origin::Controller, apps: vec![] }
    }

    #[test]
    fn newer_is_accepted_same_is_duplicate_older_is_refused() {
        let (k, d, mut g) = setup();
        let p = |n| seal_desired(&k, &d, &state(n)).unwrap();
        assert_eq!(g.check(&p(6)), Verdict::Accept(state(6)));
        assert_eq!(g.check(&p(5)), Verdict::Duplicate);
        let Verdict::Reject(r) = g.check(&p(4)) else { panic!() };
        assert_eq!(r.generation, Some(4));
        assert!(r.reason.contains("below 5"), "{}", r.reason);
        g.raise(6);
        g.raise(2);
        assert_eq!(g.highest(), 6);
        assert_eq!(g.check(&p(6)), Verdict::Duplicate);
    }

    #[test]
    fn a_signed_state_that_breaks_an_invariant_is_refused_naming_app_and_field() {
        let (k, d, g) = setup();
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
    }

    #[test]
    fn forged_and_garbage_are_refused_with_a_reason() {
        let (_, d, g) = setup();
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
