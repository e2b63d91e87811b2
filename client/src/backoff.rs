//! Reconnect delays: exponential growth, capped, with full jitter (a uniformly random delay
//! between zero and the exponential bound), so a fleet of clients does not reconnect in step.

use std::time::Duration;

/// Exponential backoff with full jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    /// Delays bounded by `base · 2ⁿ` for the n-th consecutive failure, never above `cap`.
    pub fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff { base, cap: cap.max(base), attempt: 0 }
    }

    /// The bound of the next delay: `min(cap, base · 2ⁿ)`.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The next delay, uniformly random in `[0, ceiling]`; the bound then doubles.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        ceiling.mul_f64(fastrand::f64())
    }

    /// Back to the first delay (after a success).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Consecutive failures so far.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_stay_within_the_doubling_capped_bound() {
        let (base, cap) = (Duration::from_millis(100), Duration::from_secs(5));
        let mut b = Backoff::new(base, cap);
        let mut seen_low = false;
        for n in 0..40u32 {
            let bound = base.saturating_mul(1u32.checked_shl(n.min(31)).unwrap_or(u32::MAX)).min(cap);
            assert_eq!(b.ceiling(), bound);
            let d = b.next_delay();
            assert!(d <= bound, "attempt {n}: {d:?} > {bound:?}");
            seen_low |= d < bound / 2;
        }
        // Full jitter: delays spread over the whole range, not just near the bound.
        assert!(seen_low);
        assert_eq!(b.attempts(), 40);
        b.reset();
        assert_eq!(b.ceiling(), base);
    }

    #[test]
    fn jitter_covers_the_range_evenly() {
        let mut below_half = 0;
        for _ in 0..2_000 {
            let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(1));
            if b.next_delay() < Duration::from_millis(500) {
                below_half += 1;
            }
        }
        // Uniform on [0, 1 s]: about half below 500 ms (binomial, 2,000 draws; ±5 σ).
        assert!((890..=1_110).contains(&below_half), "{below_half}");
    }
}
