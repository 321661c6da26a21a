//! A token bucket in bytes per second, shared by every download of an agent.

use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// Caps the total download rate of all fetches that hold a clone of it. Cheap to
/// clone (shared state). Uses tokio's clock, so tests can pause time.
#[derive(Clone, Debug)]
pub struct RateLimiter {
    inner: Arc<Mutex<Bucket>>,
}

#[derive(Debug)]
struct Bucket {
    rate: u64,
    burst: u64,
    /// Bytes that may pass now; negative while callers wait for their turn.
    tokens: i128,
    last: Instant,
}

impl RateLimiter {
    /// `bytes_per_sec` (at least 1). The bucket holds a quarter second of traffic
    /// (at least 16 KiB), so a rate holds over any window longer than that.
    pub fn new(bytes_per_sec: u64) -> RateLimiter {
        let rate = bytes_per_sec.max(1);
        let burst = (rate / 4).max(16 * 1024);
        RateLimiter { inner: Arc::new(Mutex::new(Bucket { rate, burst, tokens: 0, last: Instant::now() })) }
    }

    /// Parses a rate as `--pull-rate` takes it: `256KiB/s`, `1MB/s`, `2Mi`, `65536`
    /// (bytes per second; `Ki`/`Mi`/`Gi` powers of 1024, `K`/`M`/`G` of 1000).
    pub fn parse(s: &str) -> Result<RateLimiter, String> {
        let t = s.trim();
        let t = t.strip_suffix("/s").unwrap_or(t);
        let t = t.strip_suffix('B').unwrap_or(t);
        let n = skiff_common::quantity::parse_bytes(t)
            .map_err(|_| format!("{s:?} is not a rate (write e.g. 256KiB/s or 1MB/s)"))?;
        if n == 0 {
            return Err(format!("{s:?}: a rate must be above 0"));
        }
        Ok(RateLimiter::new(n))
    }

    pub fn rate(&self) -> u64 {
        self.lock().rate
    }

    /// Waits until `n` bytes may pass. Callers take their bytes in turn: each one
    /// reserves its share at once and sleeps until the bucket has refilled it.
    pub async fn acquire(&self, n: u64) {
        let wait = {
            let mut b = self.lock();
            let now = Instant::now();
            let elapsed = now.saturating_duration_since(b.last);
            b.last = now;
            let refill = (elapsed.as_nanos()).saturating_mul(b.rate as u128) / 1_000_000_000;
            let refill = i128::try_from(refill).unwrap_or(i128::MAX);
            b.tokens = b.tokens.saturating_add(refill).min(b.burst as i128);
            b.tokens = b.tokens.saturating_sub(n as i128);
            if b.tokens >= 0 {
                Duration::ZERO
            } else {
                let nanos = (-b.tokens).saturating_mul(1_000_000_000) / b.rate as i128;
                Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
            }
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Bucket> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn holds_the_rate_for_one_and_for_many() {
        let r = RateLimiter::new(100_000);
        let start = Instant::now();
        for _ in 0..100 {
            r.acquire(10_000).await;
        }
        // 1 MB at 100 kB/s: 10 s, less the bucket's start (empty) = 10 s.
        let t = start.elapsed().as_secs_f64();
        assert!((9.9..=10.1).contains(&t), "{t}");

        let start = Instant::now();
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let r = r.clone();
                tokio::spawn(async move {
                    for _ in 0..25 {
                        r.acquire(10_000).await;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let t = start.elapsed().as_secs_f64();
        assert!((9.9..=10.1).contains(&t), "shared: {t}");
    }

    #[test]
    fn parses_rates() {
        assert_eq!(RateLimiter::parse("256KiB/s").unwrap().rate(), 256 * 1024);
        assert_eq!(RateLimiter::parse("1MB/s").unwrap().rate(), 1_000_000);
        assert_eq!(RateLimiter::parse("2Mi").unwrap().rate(), 2 << 20);
        assert_eq!(RateLimiter::parse("65536").unwrap().rate(), 65536);
        for bad in ["", "0", "fast", "1TB/s", "-1"] {
            assert!(RateLimiter::parse(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn idle_time_gives_only_a_burst() {
        let r = RateLimiter::new(100_000);
        tokio::time::sleep(Duration::from_secs(60)).await;
        let start = Instant::now();
        r.acquire(25_000).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
        r.acquire(100_000).await;
        let t = start.elapsed().as_secs_f64();
        assert!((0.99..=1.01).contains(&t), "{t}");
        let huge = RateLimiter::new(u64::MAX);
        huge.acquire(u64::MAX).await;
    }
}
