//! Adaptive sampling: how many spans clients send in full.
//!
//! tailscope counts every span whether it arrives in full or folded into a client's histogram
//! delta, so sampling never changes counts or percentiles; it only bounds the full-span stream
//! (the spans that become exemplars) to a budget of spans per second.
//!
//! Every `interval` the sampler turns each series key's observed throughput (full and folded
//! spans, as an EMA) into a probability by **water-filling** the budget: keys below the fair
//! share keep everything, the rest share what is left equally, so low-volume keys are never
//! starved and the hottest keys are sampled hardest. When keys outnumber the budget the
//! per-key floor shrinks with it, so the total still meets the budget instead of overshooting
//! it. Decreases apply at once; increases are capped per interval (no oscillation). The
//! effective budget shrinks multiplicatively while the shard queues are above their high-water
//! mark and grows back additively once they drain. Each key's policy also carries its recent
//! p99, above which clients always send spans in full (as they always send errors).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tailscope_proto::histogram::{Histogram, Layout, Recorder};
use tailscope_proto::v1::{KeyPolicy, SeriesKey};

use crate::series::IdBuildHasher;
use crate::traffic::TrafficSink;

/// The sampler's configuration (`[sampling]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingConfig {
    /// Full spans per second all clients together may send.
    pub budget: f64,
    /// Full spans per second every key keeps at least (shrunk when keys outnumber the budget).
    pub min_per_key: f64,
    /// How often probabilities are recomputed.
    #[serde(with = "humantime_serde")]
    pub interval: std::time::Duration,
    /// Largest factor a key's probability may grow by per interval.
    pub max_increase: f64,
    /// Weight of the newest interval in the throughput average (0..1].
    pub ema_weight: f64,
    /// Fixed probabilities for chosen services or operations.
    pub overrides: Vec<SamplingOverride>,
}

/// A fixed probability for a service, or one of its operations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplingOverride {
    /// The service.
    pub service: String,
    /// The operation; every operation of the service when absent.
    #[serde(default)]
    pub operation: Option<String>,
    /// The probability, in [0, 1].
    pub probability: f64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig {
            budget: 20_000.0,
            min_per_key: 1.0,
            interval: std::time::Duration::from_secs(1),
            max_increase: 2.0,
            ema_weight: 0.5,
            overrides: Vec::new(),
        }
    }
}

impl SamplingConfig {
    /// Checks ranges; the error names the key.
    pub fn validate(&self) -> Result<(), String> {
        if !self.budget.is_finite() || self.budget <= 0.0 {
            return Err("sampling.budget must be positive".into());
        }
        if !self.min_per_key.is_finite() || self.min_per_key < 0.0 {
            return Err("sampling.min_per_key must not be negative".into());
        }
        if !self.max_increase.is_finite() || self.max_increase < 1.0 {
            return Err("sampling.max_increase must be at least 1".into());
        }
        if !(self.ema_weight > 0.0 && self.ema_weight <= 1.0) {
            return Err("sampling.ema_weight must be in (0, 1]".into());
        }
        if self.interval.is_zero() {
            return Err("sampling.interval must be positive".into());
        }
        for o in &self.overrides {
            if !(0.0..=1.0).contains(&o.probability) {
                return Err(format!(
                    "sampling.overrides: probability {} of {:?} is not in [0, 1]",
                    o.probability, o.service
                ));
            }
        }
        Ok(())
    }
}

/// Spans a key's p99 is estimated from.
const P99_SAMPLES: u64 = 2_000;

/// The most keys tracked; spans of further keys are kept in full (probability 1).
pub const MAX_KEYS: usize = 100_000;

/// How long a key may see no traffic before it is forgotten (it starts again at 1).
const IDLE_MILLIS: u64 = 600_000;

/// What the sampler knows of one key, as of its last interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KeyView {
    /// Spans per second observed (full and folded), averaged.
    pub observed_per_second: f64,
    /// Full spans per second received, averaged.
    pub kept_per_second: f64,
    /// The probability clients apply.
    pub probability: f64,
    /// Spans at least this slow are always sent in full (the recent p99), nanoseconds.
    pub always_keep_above_nanos: i64,
    /// The share of the key's spans at or above that (about 1 %).
    pub always_kept_share: f64,
}

impl Default for KeyView {
    fn default() -> Self {
        KeyView {
            observed_per_second: 0.0,
            kept_per_second: 0.0,
            probability: 1.0,
            always_keep_above_nanos: 0,
            always_kept_share: 0.0,
        }
    }
}

#[derive(Debug)]
struct KeyState {
    service: String,
    operation: String,
    observed: AtomicU64,
    kept: AtomicU64,
    recent: Mutex<Histogram>,
    view: Mutex<KeyView>,
    fixed: Option<f64>,
    /// Milliseconds of traffic it has been idle for.
    idle_millis: AtomicU64,
}

impl KeyState {
    /// Counts `full` spans that came in full and `folded` that a client folded.
    fn count(&self, full: u64, folded: u64) {
        self.observed.fetch_add(full.saturating_add(folded), Ordering::Relaxed);
        self.kept.fetch_add(full, Ordering::Relaxed);
    }
}

/// The layout of each key's recent-durations histogram: one significant digit (±6 %) is
/// plenty for an always-keep threshold, and it needs 16 counters per power of two instead of
/// 128 — about 0.8 KB instead of 6 KB for a key whose durations span six powers of two, which
/// adds up with 100,000 keys. (It did not measurably change CPU per span at 10,000 keys per
/// batch; see BENCHMARKS.md.)
fn recent_layout() -> Layout {
    Layout::new(1, 1_000, 3_600_000_000_000).unwrap_or_default()
}

/// The adaptive sampler.
#[derive(Debug)]
pub struct Sampler {
    config: SamplingConfig,
    keys: DashMap<u64, Arc<KeyState>, IdBuildHasher>,
    effective_budget: Mutex<f64>,
    /// The part of the configured budget this sampler spends (a cluster gateway's part of
    /// the cluster's budget, shared among the live gateways; 1 on a single node).
    share: Mutex<f64>,
    generation: AtomicU64,
    /// When the pipeline tells the traffic per epoch ([`Sampler::fed_by_epochs`]): the
    /// seconds of traffic told since the last tick, which rates are taken over.
    epochs: Option<Mutex<f64>>,
}

impl Sampler {
    /// A sampler with `config` (validated).
    pub fn new(config: SamplingConfig) -> Sampler {
        let budget = config.budget;
        Sampler {
            config,
            keys: DashMap::default(),
            effective_budget: Mutex::new(budget),
            share: Mutex::new(1.0),
            generation: AtomicU64::new(0),
            epochs: None,
        }
    }

    /// The sampler of a pipeline that tells it the traffic its shards recorded, per epoch (as
    /// a [`TrafficSink`]): a key's rate is what the epochs told since the last tick over the
    /// time they were admitted in, and a tick that no epoch ended before leaves rates as
    /// they were (a tick's own interval would count an epoch in one tick and none in the next).
    pub fn fed_by_epochs(mut self) -> Sampler {
        self.epochs = Some(Mutex::new(0.0));
        self
    }

    /// Whether it is told the traffic per epoch (and so must not be told it at admission too).
    pub fn is_fed_by_epochs(&self) -> bool {
        self.epochs.is_some()
    }

    /// Calls `f` with the key's state, creating it on first sight (up to [`MAX_KEYS`]). The
    /// state is used under the map's read guard, not cloned out: an `Arc` clone and drop per
    /// call made two streams sending the same keys bounce its reference count between cores.
    fn with_state(&self, key: u64, service: &str, operation: &str, f: impl FnOnce(&KeyState)) {
        if let Some(s) = self.keys.get(&key) {
            f(&s);
            return;
        }
        if let Some(s) = self.state(key, service, operation) {
            f(&s);
        }
    }

    fn state(&self, key: u64, service: &str, operation: &str) -> Option<Arc<KeyState>> {
        if let Some(s) = self.keys.get(&key) {
            return Some(s.clone());
        }
        if self.keys.len() >= MAX_KEYS {
            return None;
        }
        let fixed = self
            .config
            .overrides
            .iter()
            .filter(|o| o.service == service && o.operation.as_deref().is_none_or(|op| op == operation))
            .max_by_key(|o| o.operation.is_some())
            .map(|o| o.probability);
        let state = Arc::new(KeyState {
            service: service.to_owned(),
            operation: operation.to_owned(),
            observed: AtomicU64::new(0),
            kept: AtomicU64::new(0),
            recent: Mutex::new(Histogram::new(recent_layout())),
            view: Mutex::new(KeyView { probability: fixed.unwrap_or(1.0), ..KeyView::default() }),
            fixed,
            idle_millis: AtomicU64::new(0),
        });
        Some(self.keys.entry(key).or_insert(state).clone())
    }

    /// Counts spans of a key that arrived in full, with their durations.
    pub fn observe_full(
        &self,
        key: u64,
        service: &str,
        operation: &str,
        durations: impl Iterator<Item = (i64, u64)>,
    ) {
        self.with_state(key, service, operation, |s| {
            let mut recent = s.recent.lock();
            let mut n = 0;
            for (d, weight) in durations {
                recent.record(d.max(0) as u64, weight);
                n += weight;
            }
            drop(recent);
            s.count(n, 0);
        });
    }

    /// Counts spans of a key a client folded into a histogram delta.
    pub fn observe_folded(&self, key: u64, service: &str, operation: &str, folded: &Histogram) {
        self.with_state(key, service, operation, |s| {
            s.recent.lock().merge(folded);
            s.count(0, folded.count());
        });
    }

    /// Recomputes every key's probability from the last `seconds` of traffic (or from the
    /// epochs told since the last tick, when [`Sampler::fed_by_epochs`]: with none, only the
    /// budget moves and the probabilities wait for traffic); `overloaded` shrinks the
    /// effective budget, its absence lets it grow back.
    pub fn tick(&self, seconds: f64, overloaded: bool) {
        let seconds = match &self.epochs {
            None => Some(seconds),
            Some(told) => Some(std::mem::take(&mut *told.lock())).filter(|&s| s > 0.0),
        };
        let budget = {
            let cap = self.config.budget * *self.share.lock();
            let mut eff = self.effective_budget.lock();
            *eff =
                if overloaded { (*eff * 0.5).max(cap * 0.01).min(cap) } else { (*eff + cap * 0.1).min(cap) };
            *eff
        };
        let Some(seconds) = seconds else { return };
        let alpha = self.config.ema_weight;
        let states: Vec<(u64, Arc<KeyState>)> =
            self.keys.iter().map(|e| (*e.key(), e.value().clone())).collect();
        let mut rates = Vec::with_capacity(states.len());
        for (_, s) in &states {
            let observed = s.observed.swap(0, Ordering::Relaxed) as f64 / seconds;
            let kept = s.kept.swap(0, Ordering::Relaxed) as f64 / seconds;
            let mut recent = s.recent.lock();
            // From at least P99_SAMPLES spans (however many intervals that takes): the top of
            // the bucket holding the p99, and the share of spans above it — what the
            // always-keep rule will send in full if the key's latencies stay as they are.
            let slow = (recent.count() >= P99_SAMPLES).then(|| slow_rule(&recent)).flatten();
            if slow.is_some() {
                recent.reset();
            }
            drop(recent);
            let mut v = s.view.lock();
            let first = v.observed_per_second == 0.0 && v.kept_per_second == 0.0;
            let ema = |old: f64, new: f64| if first { new } else { alpha * new + (1.0 - alpha) * old };
            v.observed_per_second = ema(v.observed_per_second, observed);
            v.kept_per_second = ema(v.kept_per_second, kept);
            if let Some((above, share)) = slow {
                v.always_keep_above_nanos = above;
                v.always_kept_share = share;
            }
            if observed == 0.0 {
                s.idle_millis.fetch_add((seconds * 1e3) as u64, Ordering::Relaxed);
            } else {
                s.idle_millis.store(0, Ordering::Relaxed);
            }
            // Spans above the key's p99 are kept whatever the probability: that 1 % of its
            // traffic is set aside before the budget is shared; the probability covers the rest.
            rates.push(if s.fixed.is_some() {
                (0.0, 0.0)
            } else {
                (v.observed_per_second, v.always_kept_share)
            });
        }
        // Keys with a fixed probability spend from the budget first, then the slow spans.
        let fixed_spend: f64 =
            states.iter().filter_map(|(_, s)| s.fixed.map(|p| p * s.view.lock().observed_per_second)).sum();
        let slow_spend: f64 = rates.iter().map(|(r, share)| r * share).sum();
        let sampled: Vec<f64> = rates.iter().map(|(r, share)| r * (1.0 - share)).collect();
        let left = (budget - fixed_spend - slow_spend).max(0.0);
        let allocation = allocate(&sampled, left, self.config.min_per_key);
        for ((_, s), (rate, alloc)) in states.iter().zip(sampled.iter().zip(allocation)) {
            let mut v = s.view.lock();
            v.probability = match s.fixed {
                Some(p) => p,
                None => {
                    let target = if *rate <= 0.0 { 1.0 } else { (alloc / rate).clamp(0.0, 1.0) };
                    if target <= v.probability {
                        target
                    } else {
                        target.min(v.probability.max(1e-6) * self.config.max_increase)
                    }
                }
            };
        }
        // Keys idle for ten minutes are forgotten (bounded memory); they start again at 1.
        self.keys.retain(|_, s| s.idle_millis.load(Ordering::Relaxed) < IDLE_MILLIS);
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Bumps each time probabilities were recomputed.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The effective budget (the configured one, shrunk under overload).
    pub fn effective_budget(&self) -> f64 {
        *self.effective_budget.lock()
    }

    /// The configured budget.
    pub fn budget(&self) -> f64 {
        self.config.budget
    }

    /// Spends `share` (in (0, 1]) of the configured budget from the next tick on: a cluster
    /// gateway's part when `1 / share` gateways share the budget, as Mimir and Tempo divide a
    /// global rate limit among their distributors. Anything else counts as 1.
    pub fn set_share(&self, share: f64) {
        *self.share.lock() = if share.is_finite() && share > 0.0 { share.min(1.0) } else { 1.0 };
    }

    /// The part of the configured budget spent.
    pub fn share(&self) -> f64 {
        *self.share.lock()
    }

    /// The policies of `keys` (group hashes) for a client.
    pub fn policies(&self, keys: impl Iterator<Item = u64>) -> Vec<KeyPolicy> {
        keys.filter_map(|k| self.keys.get(&k).map(|s| s.clone()))
            .map(|s| {
                let v = *s.view.lock();
                KeyPolicy {
                    key: Some(SeriesKey {
                        service: s.service.clone(),
                        operation: s.operation.clone(),
                        ..Default::default()
                    }),
                    probability: v.probability,
                    always_keep_above_nanos: v.always_keep_above_nanos,
                }
            })
            .collect()
    }

    /// Every key with its view, sorted by service and operation.
    pub fn snapshot(&self) -> Vec<(String, String, KeyView)> {
        let mut out: Vec<(String, String, KeyView)> =
            self.keys.iter().map(|e| (e.service.clone(), e.operation.clone(), *e.view.lock())).collect();
        out.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        out
    }
}

impl TrafficSink for Sampler {
    fn track(&self, key: u64, service: &str, operation: &str) {
        if !self.keys.contains_key(&key) {
            self.state(key, service, operation);
        }
    }

    fn recorded(&self, key: u64, full: u64, folded: u64, durations: &Recorder) {
        // A key past MAX_KEYS is not tracked (its spans are kept in full).
        let Some(s) = self.keys.get(&key) else { return };
        let mut recent = s.recent.lock();
        durations.for_each_value(|value, weight| recent.record(value, weight));
        drop(recent);
        s.count(full, folded);
    }

    fn covered(&self, seconds: f64) {
        if let Some(told) = &self.epochs {
            *told.lock() += seconds;
        }
    }
}

/// The always-keep rule of a key from its recent durations: spans at or above the first value
/// past the bucket holding the p99, and the share of spans that are.
fn slow_rule(recent: &Histogram) -> Option<(i64, f64)> {
    let p99 = recent.quantile(0.99)?;
    let layout = recent.layout();
    let top = layout.highest_equivalent(layout.index_of(p99.min(layout.highest())));
    let above = recent.count() - recent.count_at_most(top);
    let at = i64::try_from(top.saturating_add(1)).unwrap_or(i64::MAX);
    Some((at, above as f64 / recent.count() as f64))
}

/// Splits `budget` over keys with throughputs `rates` by water-filling: a key below the fair
/// share gets all it has, the rest split what is left equally. Every key gets at least
/// `min(rate, floor)`, with the floor shrunk to `budget / keys` when keys outnumber the budget.
/// The allocations add up to `budget`, or to the total throughput when it is below.
pub fn allocate(rates: &[f64], budget: f64, floor: f64) -> Vec<f64> {
    let n = rates.len();
    let mut out = vec![0.0; n];
    if n == 0 {
        return out;
    }
    let floor = floor.min(budget / n as f64);
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| rates[a].total_cmp(&rates[b]));
    let mut left = budget;
    for (i, &k) in order.iter().enumerate() {
        let share = (left / (n - i) as f64).max(floor);
        let a = rates[k].max(0.0).min(share);
        out[k] = a;
        left = (left - a).max(0.0);
    }
    out
}

#[cfg(test)]
mod tests;
