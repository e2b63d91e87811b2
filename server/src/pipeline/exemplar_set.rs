//! The example spans a shard keeps per open (series, window): the slowest, the first few
//! failed, and one chosen uniformly at random (reservoir sampling). Held for every open window
//! of every series — three or so per series at a time — so its size is the memory of a million
//! series: one small vector of the distinct spans kept, each marked with the roles it holds,
//! sized to what it holds (a window with one span costs one 56-byte slot).

use crate::store::Exemplar;

#[cfg(test)]
mod tests;

/// The slowest spans kept per series and window.
pub const SLOWEST: usize = 3;
/// The failed spans kept per series and window.
pub const ERRORS: usize = 3;

const SLOW: u8 = 1;
const FAILED: u8 = 2;
const RANDOM: u8 = 4;

/// One kept span, without its series and window (the set's key says them).
#[derive(Debug, Clone, Copy)]
struct Slot {
    trace_id_high: u64,
    trace_id_low: u64,
    span_id: u64,
    start_unix_nanos: i64,
    duration_nanos: i64,
    adjusted_count: f64,
    /// `SLOW | FAILED | RANDOM`: why it is kept; never 0 between offers.
    roles: u8,
}

/// The example spans of one series and window.
#[derive(Debug, Default)]
pub struct ExemplarSet {
    slots: Vec<Slot>,
    seen: u64,
}

impl ExemplarSet {
    /// How many spans were offered.
    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// Offers one span of the window; `rng` is a generator state, never 0 (advanced once per
    /// offer).
    pub fn offer(&mut self, e: &Exemplar, error: bool, rng: &mut u64) {
        self.seen += 1;
        // xorshift64*: cheap, and only has to be fair, not unpredictable.
        *rng ^= *rng >> 12;
        *rng ^= *rng << 25;
        *rng ^= *rng >> 27;
        let random = rng.wrapping_mul(0x2545_f491_4f6c_dd1d) % self.seen == 0;
        // One pass: the new pick takes the random role from whoever held it; count the failed
        // and the slowest, and find the fastest of the slowest (the first, on a tie).
        let (mut failed, mut slow, mut fastest) = (0, 0, None::<(usize, i64)>);
        for (i, s) in self.slots.iter_mut().enumerate() {
            if random {
                s.roles &= !RANDOM;
            }
            failed += usize::from(s.roles & FAILED != 0);
            if s.roles & SLOW != 0 {
                slow += 1;
                if fastest.is_none_or(|(_, d)| s.duration_nanos < d) {
                    fastest = Some((i, s.duration_nanos));
                }
            }
        }
        let mut roles = if random { RANDOM } else { 0 };
        if error && failed < ERRORS {
            roles |= FAILED;
        }
        // The slot the new span should take if it ends up empty: the evicted slowest keeps its
        // place, so ties among the slowest are broken as a list replaced in place would.
        let mut evicted = None;
        if slow < SLOWEST {
            roles |= SLOW;
        } else if let Some((i, _)) = fastest.filter(|&(_, d)| e.duration_nanos > d) {
            self.slots[i].roles &= !SLOW;
            roles |= SLOW;
            evicted = Some(i);
        }
        if roles != 0 {
            let slot = Slot {
                trace_id_high: e.trace_id_high,
                trace_id_low: e.trace_id_low,
                span_id: e.span_id,
                start_unix_nanos: e.start_unix_nanos,
                duration_nanos: e.duration_nanos,
                adjusted_count: e.adjusted_count,
                roles,
            };
            let free = evicted
                .filter(|&i| self.slots[i].roles == 0)
                .or_else(|| self.slots.iter().position(|s| s.roles == 0));
            match free {
                Some(i) => self.slots[i] = slot,
                None => {
                    // Grown one at a time: most windows keep one or two spans.
                    self.slots.reserve_exact(1);
                    self.slots.push(slot);
                }
            }
        }
        // A span that lost its last role to this one (and whose place this one did not take).
        if self.slots.iter().any(|s| s.roles == 0) {
            self.slots.retain(|s| s.roles != 0);
        }
    }

    /// The kept spans of `series`' window starting at `window_start`, each once, in id order.
    pub fn into_exemplars(self, series: u64, window_start: i64, out: &mut Vec<Exemplar>) {
        let mut kept: Vec<Exemplar> = self
            .slots
            .iter()
            .map(|s| Exemplar {
                series,
                window_start,
                trace_id_high: s.trace_id_high,
                trace_id_low: s.trace_id_low,
                span_id: s.span_id,
                start_unix_nanos: s.start_unix_nanos,
                duration_nanos: s.duration_nanos,
                adjusted_count: s.adjusted_count,
            })
            .collect();
        // Two offers may carry the same ids (a sender that repeats them): kept once.
        kept.sort_by_key(|e| (e.trace_id_high, e.trace_id_low, e.span_id));
        kept.dedup_by_key(|e| (e.trace_id_high, e.trace_id_low, e.span_id));
        out.extend(kept);
    }
}
