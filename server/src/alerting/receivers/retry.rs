//! What every integration shares: a timeout per request, retries with exponential backoff and
//! full jitter on connection errors and on the statuses the integration calls retryable,
//! bounded by a deadline, and a circuit breaker per integration so a dead receiver costs one
//! probe per cool-down instead of a timeout per notification. Every attempt is counted.

use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::http_config::HttpConfig;
use super::Request;
use crate::telemetry::{AttemptLabel, Metrics};

/// First retry delay; doubled per attempt up to [`MAX_BACKOFF`].
const BASE_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Consecutive failures that open a breaker.
pub(super) const BREAKER_THRESHOLD: u32 = 5;

/// Why a delivery failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    /// The receiver answered with a status not worth retrying.
    #[error("{url}: {detail} (not retried)")]
    Refused {
        /// Where it was posted.
        url: String,
        /// The answer.
        detail: String,
    },
    /// Retryable failures until the deadline.
    #[error("{url}: {detail} (gave up after {attempts} attempts)")]
    GaveUp {
        /// Where it was posted.
        url: String,
        /// The last failure.
        detail: String,
        /// Attempts made (those the breaker refused included).
        attempts: u32,
    },
}

/// A circuit breaker: open after [`BREAKER_THRESHOLD`] consecutive failures, for `cool_down`;
/// then one probe decides (half-open).
#[derive(Debug)]
pub struct Breaker {
    state: Mutex<BreakerState>,
    cool_down: Duration,
}

#[derive(Debug, Default)]
struct BreakerState {
    failures: u32,
    open_until: Option<Instant>,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(cool_down: Duration) -> Breaker {
        Breaker { state: Mutex::new(BreakerState::default()), cool_down }
    }

    /// Whether a request may go out now (closed, or half-open after the cool-down).
    pub fn allow(&self) -> bool {
        let mut s = self.state.lock();
        match s.open_until {
            Some(t) if Instant::now() < t => false,
            Some(_) => {
                // Half-open: this caller probes; others wait for its verdict.
                s.open_until = Some(Instant::now() + self.cool_down);
                true
            }
            None => true,
        }
    }

    /// Records an attempt's outcome.
    pub fn record(&self, ok: bool) {
        let mut s = self.state.lock();
        if ok {
            *s = BreakerState::default();
        } else {
            s.failures += 1;
            if s.failures >= BREAKER_THRESHOLD {
                s.open_until = Some(Instant::now() + self.cool_down);
            }
        }
    }

    /// Whether the breaker is open.
    pub fn is_open(&self) -> bool {
        self.state.lock().open_until.is_some()
    }
}

/// The outcome of one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attempt {
    /// 2xx.
    Success,
    /// A status the integration retries (5xx, 429 by default).
    ServerError,
    /// Another status: the body will not get better, not retried.
    ClientError,
    /// Could not connect or the connection broke: retried.
    ConnectionError,
    /// No answer within the timeout: retried.
    Timeout,
    /// The breaker is open: not sent.
    BreakerOpen,
}

impl Attempt {
    fn label(self) -> &'static str {
        match self {
            Attempt::Success => "success",
            Attempt::ServerError => "server_error",
            Attempt::ClientError => "client_error",
            Attempt::ConnectionError => "connection_error",
            Attempt::Timeout => "timeout",
            Attempt::BreakerOpen => "breaker_open",
        }
    }

    fn retryable(self) -> bool {
        !matches!(self, Attempt::Success | Attempt::ClientError)
    }
}

/// How requests of one integration go out.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// The integration's client and credentials.
    pub http: &'a HttpConfig,
    /// Its receiver's name (for metrics).
    pub receiver: &'a str,
    /// The integration's breaker.
    pub breaker: &'a Breaker,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Where attempts are counted.
    pub metrics: &'a Metrics,
}

/// Posts `request` until it succeeds, fails for good, or `deadline` passes; `retryable` tells
/// which statuses are worth another attempt.
pub async fn deliver(
    target: Target<'_>,
    request: &Request,
    retryable: &(dyn Fn(u16) -> bool + Sync),
    deadline: Instant,
) -> Result<(), DeliveryError> {
    let Target { http, receiver, breaker, timeout, metrics } = target;
    let mut attempt = 0u32;
    loop {
        let (outcome, detail) = if breaker.allow() {
            let req = http.authorize(http.client.post(&request.url).json(&request.body).timeout(timeout));
            let (outcome, detail) = match req.send().await {
                Ok(resp) => {
                    let status = resp.status();
                    let outcome = if status.is_success() {
                        Attempt::Success
                    } else if retryable(status.as_u16()) {
                        Attempt::ServerError
                    } else {
                        Attempt::ClientError
                    };
                    (outcome, format!("HTTP {status}"))
                }
                Err(e) if e.is_timeout() => (Attempt::Timeout, format!("no answer within {timeout:?}")),
                Err(e) => (Attempt::ConnectionError, e.to_string()),
            };
            // A refusal means the receiver is up (the notification is what it refuses).
            breaker.record(matches!(outcome, Attempt::Success | Attempt::ClientError));
            (outcome, detail)
        } else {
            (Attempt::BreakerOpen, "circuit breaker open".to_owned())
        };
        metrics
            .notification_attempts
            .get_or_create(&AttemptLabel { receiver: receiver.to_owned(), result: outcome.label() })
            .inc();
        if outcome == Attempt::Success {
            return Ok(());
        }
        if !outcome.retryable() {
            return Err(DeliveryError::Refused { url: request.url.clone(), detail });
        }
        let backoff = BASE_BACKOFF.saturating_mul(1 << attempt.min(16)).min(MAX_BACKOFF);
        // Full jitter: anywhere between zero and the backoff, so receivers coming back are not
        // hit by every sender at once.
        let wait = backoff.mul_f64(jitter());
        if Instant::now() + wait >= deadline {
            return Err(DeliveryError::GaveUp { url: request.url.clone(), detail, attempts: attempt + 1 });
        }
        tokio::time::sleep(wait).await;
        attempt += 1;
    }
}

/// A uniform number in [0, 1) from the clock's low bits mixed (no RNG state to share).
fn jitter() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64 ^ d.as_secs());
    (xxhash_rust::xxh3::xxh3_64(&nanos.to_le_bytes()) >> 11) as f64 / (1u64 << 53) as f64
}
