//! The circuit breaker around the server connection: after repeated failures it opens, and
//! while open the client makes no connection attempts at all and folds every span into
//! histograms, so a dead server costs the host nothing per span. After a pause it lets one
//! probe through (half-open); success closes it, failure opens it again.

use std::time::{Duration, Instant};

/// The breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BreakerState {
    /// Connected or trying to: spans are sent in full.
    #[default]
    Closed,
    /// Failing: no attempts until the pause is over.
    Open,
    /// One probe attempt is allowed.
    HalfOpen,
}

impl BreakerState {
    pub(crate) fn as_u8(self) -> u8 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        }
    }

    pub(crate) fn from_u8(v: u8) -> BreakerState {
        match v {
            1 => BreakerState::Open,
            2 => BreakerState::HalfOpen,
            _ => BreakerState::Closed,
        }
    }
}

/// A consecutive-failure circuit breaker.
#[derive(Debug, Clone)]
pub struct Breaker {
    state: BreakerState,
    failures: u32,
    threshold: u32,
    open_for: Duration,
    opened_at: Option<Instant>,
}

impl Breaker {
    /// Opens after `threshold` consecutive failures, for `open_for` each time.
    pub fn new(threshold: u32, open_for: Duration) -> Breaker {
        Breaker {
            state: BreakerState::Closed,
            failures: 0,
            threshold: threshold.max(1),
            open_for,
            opened_at: None,
        }
    }

    /// The current state (an open breaker whose pause is over reports half-open).
    pub fn state(&self, now: Instant) -> BreakerState {
        match (self.state, self.opened_at) {
            (BreakerState::Open, Some(at)) if now.saturating_duration_since(at) >= self.open_for => {
                BreakerState::HalfOpen
            }
            (s, _) => s,
        }
    }

    /// Whether an attempt may be made now; moves an open breaker whose pause is over to
    /// half-open.
    pub fn allow(&mut self, now: Instant) -> bool {
        self.state = self.state(now);
        self.state != BreakerState::Open
    }

    /// An attempt succeeded.
    pub fn on_success(&mut self) {
        self.state = BreakerState::Closed;
        self.failures = 0;
        self.opened_at = None;
    }

    /// An attempt failed.
    pub fn on_failure(&mut self, now: Instant) {
        self.failures = self.failures.saturating_add(1);
        let trip = match self.state(now) {
            BreakerState::HalfOpen => true,
            BreakerState::Closed => self.failures >= self.threshold,
            BreakerState::Open => false,
        };
        if trip {
            self.state = BreakerState::Open;
            self.opened_at = Some(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_probes_half_open_and_closes_on_success() {
        let t0 = Instant::now();
        let pause = Duration::from_secs(5);
        let mut b = Breaker::new(3, pause);
        assert!(b.allow(t0));
        b.on_failure(t0);
        b.on_failure(t0);
        assert_eq!(b.state(t0), BreakerState::Closed);
        b.on_failure(t0);
        assert_eq!(b.state(t0), BreakerState::Open);
        assert!(!b.allow(t0 + Duration::from_secs(4)));
        // The pause is over: one probe.
        assert!(b.allow(t0 + pause));
        assert_eq!(b.state(t0 + pause), BreakerState::HalfOpen);
        // The probe fails: open again, for a new pause from now.
        let t1 = t0 + pause;
        b.on_failure(t1);
        assert_eq!(b.state(t1 + Duration::from_secs(1)), BreakerState::Open);
        assert!(!b.allow(t1 + Duration::from_secs(1)));
        assert!(b.allow(t1 + pause));
        b.on_success();
        assert_eq!(b.state(t1 + pause), BreakerState::Closed);
        // Closed again: it takes the full threshold to open it.
        b.on_failure(t1 + pause);
        assert_eq!(b.state(t1 + pause), BreakerState::Closed);
    }

    #[test]
    fn state_round_trips_through_its_atomic_form() {
        for s in [BreakerState::Closed, BreakerState::Open, BreakerState::HalfOpen] {
            assert_eq!(BreakerState::from_u8(s.as_u8()), s);
        }
    }
}
