//! Keeps a flood of refused desired states from flooding the log, the events
//! and the `reported` topic. Pure: the caller passes the time.
//!
//! Refusals fall into classes: the reason with its variable parts (numbers,
//! key ids, quoted names) blotted out, so 500 garbage payloads are one class
//! and a bad signature is another. Per class, the first refusal is said at
//! once (one log line, one `rejected` event, `last_rejection`); the ones that
//! follow within `window` are only counted. When the window ends with a
//! count, the newest of them is said with that count (`due`), which opens the
//! next window; a refusal after a quiet window is said at once again. So each
//! class costs at most one notice per window, and every refusal is either
//! said or counted in the next notice of its class.
//!
//! At most `MAX_CLASSES` classes are tracked; refusals of further classes
//! share one overflow class, so the memory is bounded whatever arrives.

use skiff_common::protocol::Rejection;
use std::time::Duration;
use tokio::time::Instant;

/// How long a class stays quiet after a notice.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Classes tracked at once (the overflow class comes on top).
pub const MAX_CLASSES: usize = 16;
/// Bytes of a reason that make its class.
const KEY_LEN: usize = 120;
const OVERFLOW: &str = "*";

/// What to say now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// The refusal to say (the newest of its class).
    pub rejection: Rejection,
    /// Refusals of this class since its previous notice that were not said.
    pub similar: u64,
}

impl Notice {
    /// The rejection as it goes into `last_rejection`: the count appended.
    pub fn summary(&self) -> Rejection {
        if self.similar == 0 {
            return self.rejection.clone();
        }
        Rejection::new(
            self.rejection.generation,
            format!("{} ({} more like this not reported one by one)", self.rejection.reason, self.similar),
        )
    }
}

#[derive(Debug)]
struct Class {
    key: String,
    /// Until then refusals of this class are only counted.
    quiet_until: Instant,
    held: u64,
    newest: Option<Rejection>,
}

#[derive(Debug)]
pub struct Calm {
    window: Duration,
    classes: Vec<Class>,
}

impl Calm {
    /// `window` is capped at a year, so instants stay representable.
    pub fn new(window: Duration) -> Calm {
        Calm { window: window.min(Duration::from_secs(365 * 86_400)), classes: Vec::new() }
    }

    /// A refusal at `now`: `Some` to say it now, `None` when it was counted.
    pub fn offer(&mut self, r: Rejection, now: Instant) -> Option<Notice> {
        self.forget_quiet(now);
        let key = class_key(&r.reason);
        let i = match self.classes.iter().position(|c| c.key == key) {
            Some(i) => i,
            None => {
                let key = if self.classes.iter().filter(|c| c.key != OVERFLOW).count() < MAX_CLASSES {
                    key
                } else {
                    OVERFLOW.to_string()
                };
                match self.classes.iter().position(|c| c.key == key) {
                    Some(i) => i,
                    None => {
                        self.classes.push(Class { key, quiet_until: now, held: 0, newest: None });
                        self.classes.len() - 1
                    }
                }
            }
        };
        let window = self.window;
        let c = &mut self.classes[i];
        if now < c.quiet_until {
            c.held = c.held.saturating_add(1);
            c.newest = Some(r);
            return None;
        }
        // A window ended with a count that `due` did not collect: say it now.
        let similar = c.held;
        c.held = 0;
        c.newest = None;
        c.quiet_until = now.checked_add(window).unwrap_or(now);
        Some(Notice { rejection: r, similar })
    }

    /// When `due` next has something to say.
    pub fn next_due(&self) -> Option<Instant> {
        self.classes.iter().filter(|c| c.held > 0).map(|c| c.quiet_until).min()
    }

    /// The counts of every class whose window ended by `now`, each with the
    /// newest refusal it held; each opens a new window.
    pub fn due(&mut self, now: Instant) -> Vec<Notice> {
        let window = self.window;
        let mut out = Vec::new();
        for c in self.classes.iter_mut().filter(|c| c.held > 0 && now >= c.quiet_until) {
            if let Some(rejection) = c.newest.take() {
                out.push(Notice { rejection, similar: c.held - 1 });
            }
            c.held = 0;
            c.quiet_until = now.checked_add(window).unwrap_or(now);
        }
        self.forget_quiet(now);
        out
    }

    /// Drops classes with nothing held whose window has ended: they would
    /// say their next refusal at once anyway.
    fn forget_quiet(&mut self, now: Instant) {
        self.classes.retain(|c| c.held > 0 || now < c.quiet_until);
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.classes.len()
    }
}

/// The class of a reason: every word holding a digit (numbers, hex key ids,
/// CRCs) becomes `#`, every quoted part `"…"`, cut to `KEY_LEN` bytes.
pub fn class_key(reason: &str) -> String {
    let mut out = String::new();
    let mut chars = reason.chars().peekable();
    while let Some(ch) = chars.next() {
        if out.len() >= KEY_LEN {
            break;
        }
        if ch == '"' {
            // Up to the closing quote (escaped quotes included) or the end.
            let mut escaped = false;
            for c in chars.by_ref() {
                match c {
                    '\\' if !escaped => escaped = true,
                    '"' if !escaped => break,
                    _ => escaped = false,
                }
            }
            out.push_str("\"…\"");
        } else if ch.is_alphanumeric() {
            let mut word = String::from(ch);
            while let Some(&c) = chars.peek() {
                if !c.is_alphanumeric() {
                    break;
                }
                word.push(c);
                chars.next();
            }
            if word.chars().any(|c| c.is_ascii_digit()) {
                out.push('#');
            } else {
                out.push_str(&word);
            }
        } else {
            out.push(ch);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rej(reason: &str) -> Rejection {
        Rejection::new(None, reason)
    }

    #[test]
    fn variable_parts_do_not_make_new_classes() {
        let k = class_key("refused: envelope: payload of 300000 bytes is over the limit of 262144");
        assert_eq!(k, "refused: envelope: payload of # bytes is over the limit of #");
        assert_eq!(
            class_key("refused: desired state is signed with key 0a1b2c, this device trusts key ff00aa1"),
            "refused: desired state is signed with key #, this device trusts key #"
        );
        assert_eq!(
            class_key(r#"addressed to device "pi-2", this is "pi-1""#),
            r#"addressed to device "…", this is "…""#
        );
        assert_eq!(class_key(r#"app "a\"b" bad"#), r#"app "…" bad"#);
        assert_eq!(class_key("unterminated \"quote"), "unterminated \"…\"");
        assert_ne!(
            class_key("refused: not a skiff envelope"),
            class_key("refused: signature does not verify")
        );
        assert!(class_key(&"x ".repeat(1000)).len() <= KEY_LEN + 4);
    }

    #[test]
    fn one_notice_per_window_per_class_with_the_count() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut c = Calm::new(s(10));
        let first = c.offer(rej("refused: bad 1"), t0).expect("first is said");
        assert_eq!(first.similar, 0);
        assert_eq!(first.summary(), rej("refused: bad 1"));
        // Another class is said at once too.
        assert!(c.offer(rej("refused: other"), t0).is_some());
        for n in 2..=500 {
            assert_eq!(c.offer(rej(&format!("refused: bad {n}")), t0 + Duration::from_millis(n)), None);
        }
        assert_eq!(c.next_due(), Some(t0 + s(10)));
        assert!(c.due(t0 + s(9)).is_empty(), "not before the window ends");
        let due = c.due(t0 + s(10));
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].rejection, rej("refused: bad 500"));
        assert_eq!(due[0].similar, 498, "499 held: the newest is said, 498 counted");
        assert_eq!(due[0].summary().reason, "refused: bad 500 (498 more like this not reported one by one)");
        assert_eq!(c.next_due(), None);
        // The summary opened a window: the next one is held again ...
        assert_eq!(c.offer(rej("refused: bad 501"), t0 + s(15)), None);
        assert_eq!(c.next_due(), Some(t0 + s(20)));
        // ... and if nobody collected it, the next offer after the window carries it.
        let late = c.offer(rej("refused: bad 502"), t0 + s(30)).expect("said");
        assert_eq!((late.rejection, late.similar), (rej("refused: bad 502"), 1));
        assert_eq!(c.next_due(), None);
    }

    #[test]
    fn a_quiet_class_is_said_at_once_and_forgotten() {
        let t0 = Instant::now();
        let mut c = Calm::new(Duration::from_secs(10));
        assert!(c.offer(rej("refused: x"), t0).is_some());
        assert!(c.due(t0 + Duration::from_secs(11)).is_empty());
        assert_eq!(c.tracked(), 0);
        assert!(c.offer(rej("refused: x"), t0 + Duration::from_secs(11)).is_some());
    }

    #[test]
    fn classes_are_bounded_and_the_rest_share_one() {
        let t0 = Instant::now();
        let mut c = Calm::new(Duration::from_secs(10));
        let words =
            ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"];
        let mut said = 0;
        for a in words {
            for b in words {
                if c.offer(rej(&format!("refused: {a} {b}")), t0).is_some() {
                    said += 1;
                }
            }
        }
        // 16 classes and one overflow class, each said once.
        assert_eq!(said, MAX_CLASSES + 1);
        assert_eq!(c.tracked(), MAX_CLASSES + 1);
        let due = c.due(t0 + Duration::from_secs(10));
        assert_eq!(due.len(), 1, "only the overflow class held some");
        assert_eq!(due[0].similar, 100 - MAX_CLASSES as u64 - 1 - 1);
    }

    #[test]
    fn counts_saturate_and_far_instants_do_not_panic() {
        let t0 = Instant::now();
        let mut c = Calm::new(Duration::MAX);
        assert!(c.offer(rej("x"), t0).is_some());
        assert_eq!(c.offer(rej("x"), t0 + Duration::from_secs(300 * 86_400)), None);
        assert!(c.offer(rej("x"), t0 + Duration::from_secs(1 << 40)).is_some());
        c.classes[0].held = u64::MAX;
        assert_eq!(c.offer(rej("x"), t0 + Duration::from_secs(1 << 40)), None);
        assert_eq!(c.classes[0].held, u64::MAX);
    }
}
