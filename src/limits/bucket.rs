//! A token bucket: `rate` requests a second on average, `burst` at once. Pure: the time is
//! passed in, so the rule is tested without a clock.

use std::time::Instant;

/// One bucket (one socket, or the back end's API key).
#[derive(Debug, Clone)]
pub struct Bucket {
    /// Tokens added per second; 0 = unlimited.
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A full bucket: a new client may send its burst at once.
    pub fn new(rate: u32, burst: u32, now: Instant) -> Bucket {
        Bucket {
            rate: f64::from(rate),
            burst: f64::from(burst),
            tokens: f64::from(burst),
            last: now,
        }
    }

    /// Takes one token; false when the bucket is empty (the request is refused).
    pub fn take(&mut self, now: Instant) -> bool {
        if self.rate == 0.0 {
            return true;
        }
        // A clock read out of order (another thread's `now`) adds nothing.
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn rate_limit_allows_the_burst_then_refuses() {
        let t0 = Instant::now();
        let mut b = Bucket::new(10, 5, t0);
        for i in 0..5 {
            assert!(b.take(t0), "request {i} of the burst");
        }
        assert!(!b.take(t0), "the sixth at once is refused");
    }

    #[test]
    fn rate_limit_refills_at_the_rate_up_to_the_burst() {
        let t0 = Instant::now();
        let mut b = Bucket::new(10, 5, t0);
        for _ in 0..5 {
            b.take(t0);
        }
        let t1 = t0 + Duration::from_millis(100);
        assert!(b.take(t1), "one token after 1/rate");
        assert!(!b.take(t1));
        // A long pause refills to the burst, not beyond.
        let t2 = t1 + Duration::from_secs(60);
        let taken = (0..100).filter(|_| b.take(t2)).count();
        assert_eq!(taken, 5);
    }

    #[test]
    fn rate_limit_zero_rate_is_unlimited() {
        let t0 = Instant::now();
        let mut b = Bucket::new(0, 0, t0);
        assert!((0..10_000).all(|_| b.take(t0)));
    }

    #[test]
    fn rate_limit_sustained_rate_is_the_configured_one() {
        let t0 = Instant::now();
        let mut b = Bucket::new(100, 10, t0);
        // One request every millisecond for 10 s: 100/s of them pass, plus the burst.
        let passed = (0..10_000)
            .filter(|i| b.take(t0 + Duration::from_millis(*i)))
            .count();
        assert!((1000..=1011).contains(&passed), "{passed}");
    }
}
