//! Reconnect delays: capped exponential backoff with equal jitter.
//!
//! Pure: the caller passes how long the last connection held and a random
//! fraction, and gets the delay back. rumqttc retries at once on its own, which
//! on a fleet turns a broker restart into a reconnect storm; the jitter spreads
//! the devices out, the cap bounds how long a device stays away.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff { min, max: max.max(min), failures: 0 }
    }

    /// The delay before the next attempt, after a failure. `held` is how long
    /// the connection that just ended was up (`None`: it never came up). A
    /// connection that held longer than the longest delay counts as healthy, so
    /// the next delay starts over from `min`; one that drops right after its
    /// CONNACK (a duplicate client id, a broker that kicks) keeps growing.
    /// `jitter` is a fraction in [0, 1]: the delay is half fixed, half random.
    pub fn next_delay(&mut self, held: Option<Duration>, jitter: f64) -> Duration {
        if held.is_some_and(|h| h >= self.max) {
            self.failures = 0;
        }
        let factor = 1u32.checked_shl(self.failures).unwrap_or(u32::MAX);
        let step = self.min.saturating_mul(factor).min(self.max);
        self.failures = self.failures.saturating_add(1).min(32);
        let half = step / 2;
        half + half.mul_f64(jitter.clamp(0.0, 1.0))
    }

    /// Success: the next failure waits `min` again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn doubles_up_to_the_cap_with_jitter_in_the_upper_half() {
        let mut b = Backoff::new(S, 60 * S);
        let full: Vec<_> = (0..10).map(|_| b.next_delay(None, 1.0)).collect();
        assert_eq!(full[..7], [1, 2, 4, 8, 16, 32, 60].map(|s| s * S));
        assert!(full[7..].iter().all(|d| *d == 60 * S));
        let mut b = Backoff::new(S, 60 * S);
        assert_eq!(b.next_delay(None, 0.0), S / 2);
        assert_eq!(b.next_delay(None, 0.5), S + S / 2);
        // Out-of-range jitter cannot shorten or stretch the delay past its band.
        assert_eq!(b.next_delay(None, -3.0), 2 * S);
        assert_eq!(b.next_delay(None, 7.0), 8 * S);
    }

    #[test]
    fn a_long_connection_starts_over_a_short_one_does_not() {
        let mut b = Backoff::new(S, 10 * S);
        for _ in 0..5 {
            b.next_delay(None, 1.0);
        }
        assert_eq!(b.next_delay(Some(S), 1.0), 10 * S);
        assert_eq!(b.next_delay(Some(10 * S), 1.0), S);
        assert_eq!(b.next_delay(None, 1.0), 2 * S);
    }

    #[test]
    fn never_overflows() {
        let mut b = Backoff::new(Duration::from_secs(u64::MAX / 4), Duration::MAX);
        for _ in 0..100 {
            b.next_delay(None, 1.0);
        }
        let mut b = Backoff::new(Duration::ZERO, Duration::ZERO);
        assert_eq!(b.next_delay(None, 1.0), Duration::ZERO);
    }
}
