//! The one resolution policy: which resolutions a range is read at ([`levels`]), and which
//! windows of each make up the range of each step ([`pieces`]) — for PromQL's steps and the
//! `tail` endpoint's one range alike.
//!
//! A step at `t` with range `r` covers the 10 s windows that start in `[t − r, t)` (`t` rounded
//! up to whole seconds, so a window that began in the step's own second counts). Coarse
//! rollups are only used for whole coarse windows *inside* that range; its edges are read at
//! the finer resolutions. A range from 12:00:30 to 12:05:30 is therefore read as three 10 s
//! windows, four minutes and three 10 s windows — exactly the spans of the asked range, to the
//! 10 s grid, whether the query is instant or a range, aligned or not.
//!
//! With resolutions `L0 < L1 < … < Lk` (each a multiple of the one before) and the range
//! `[P0, Q0)` on the `L0` grid, level `j + 1` covers `[P(j+1), Q(j+1))` with
//! `P(j+1) = min(ceil(Pj), Qj)` and `Q(j+1) = max(floor(Qj), P(j+1))`, rounding to `L(j+1)`.
//! The pieces are the top level's `[Pk, Qk)` and, below it, a head `[Pj, P(j+1))` and a tail
//! `[Q(j+1), Qj)` per level: disjoint, each aligned to its level, together exactly `[P0, Q0)`.
//! Every bound is a non-decreasing function of the step's time, so each piece slides forward
//! from step to step and is kept by its own [`Slider`] (add what enters, subtract what leaves).

use tailscope_proto::histogram::{Checked, Histogram, Layout};

use crate::store::{Resolution, RetentionConfig};

#[cfg(test)]
mod tests;

/// One piece of a step's range: the level it is read at and its windows' starts `[lo, hi)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// Index into the levels.
    pub level: usize,
    /// First window start included.
    pub lo: i64,
    /// First window start no longer included.
    pub hi: i64,
}

/// The resolutions a range of `range` seconds starting at `from` is read at, finest first:
/// every one still retained at `from`, up to the coarsest that has at least five windows in the
/// range and (for steps `step` seconds apart; 0 for a single range) no more than one per step.
/// Coarser reads fewer windows; the finer ones read the range's edges ([`pieces`]).
pub fn levels(range: i64, step: i64, from: i64, now: i64, retention: &RetentionConfig) -> Vec<Resolution> {
    let retained = |r: Resolution| from >= now - r.retention(retention);
    let fits = |r: Resolution| r.seconds() * 5 <= range && (step == 0 || r.seconds() <= step);
    let available: Vec<Resolution> = Resolution::ALL.into_iter().filter(|&r| retained(r)).collect();
    let Some(&finest) = available.first() else { return vec![Resolution::H1] };
    let coarsest = available.iter().rev().find(|&&r| fits(r)).copied().unwrap_or(finest);
    available.into_iter().filter(|r| r.seconds() <= coarsest.seconds()).collect()
}

/// How one range `[start, end)` (seconds) is read: its levels, and the intervals of window
/// starts read at each, together exactly the range on the finest level's grid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangePlan {
    /// The resolutions read, finest first.
    pub levels: Vec<Resolution>,
    /// Per level, `[lo, hi)` of window starts (empty intervals left out).
    pub reads: Vec<(Resolution, i64, i64)>,
    /// First second covered (the start rounded up to the finest grid).
    pub start: i64,
    /// End (exclusive) of the covered range.
    pub end: i64,
}

impl RangePlan {
    /// The plan of `[start, end)` read at `now`.
    pub fn new(start: i64, end: i64, now: i64, retention: &RetentionConfig) -> RangePlan {
        let levels = levels(end - start, 0, start, now, retention);
        let seconds: Vec<i64> = levels.iter().map(|r| r.seconds()).collect();
        let all = pieces(&seconds, start, end);
        let reads = all.iter().filter(|p| p.lo < p.hi).map(|p| (levels[p.level], p.lo, p.hi)).collect();
        let (start, end) = match (all.iter().map(|p| p.lo).min(), all.iter().map(|p| p.hi).max()) {
            (Some(lo), Some(hi)) => (lo, hi),
            _ => (start, start),
        };
        RangePlan { levels, reads, start, end }
    }

    /// The coarsest resolution read.
    pub fn coarsest(&self) -> Resolution {
        self.levels.last().copied().unwrap_or(Resolution::H1)
    }
}

fn ceil_to(x: i64, step: i64) -> i64 {
    x.div_euclid(step) * step + if x.rem_euclid(step) == 0 { 0 } else { step }
}

/// The pieces of the range `[from, to)` (seconds) over `levels` (window lengths in seconds,
/// finest first, each a multiple of the one before), always `2·levels − 1` of them in the same
/// order: the top level's, then per level below it its head and its tail. Empty pieces have
/// `lo == hi`.
pub fn pieces(levels: &[i64], from: i64, to: i64) -> Vec<Piece> {
    let Some(&finest) = levels.first() else { return Vec::new() };
    let mut p = ceil_to(from, finest);
    let mut q = ceil_to(to, finest).max(p);
    let mut bounds = vec![(p, q)];
    for &len in &levels[1..] {
        let next_p = ceil_to(p, len).min(q);
        let next_q = (q.div_euclid(len) * len).max(next_p);
        p = next_p;
        q = next_q;
        bounds.push((p, q));
    }
    let top = levels.len() - 1;
    let mut out = vec![Piece { level: top, lo: bounds[top].0, hi: bounds[top].1 }];
    for j in (0..top).rev() {
        out.push(Piece { level: j, lo: bounds[j].0, hi: bounds[j + 1].0 });
        out.push(Piece { level: j, lo: bounds[j + 1].1, hi: bounds[j].1 });
    }
    out
}

/// Windows of one level, sorted by start, kept encoded side by side in one buffer.
#[derive(Debug, Default)]
pub struct Windows {
    entries: Vec<(i64, Checked, usize)>,
    bytes: Vec<u8>,
}

impl Windows {
    /// Adds a window (in any order; [`Windows::sort`] before sliding).
    pub fn push(&mut self, start: i64, checked: Checked, bytes: &[u8]) {
        self.entries.push((start, checked, self.bytes.len()));
        self.bytes.extend_from_slice(bytes);
    }

    /// Sorts by start, stably: a window's members keep their order.
    pub fn sort(&mut self) {
        self.entries.sort_by_key(|(w, _, _)| *w);
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes.len()
    }

    /// The indexes of the windows starting in `[lo, hi)`.
    pub fn range(&self, lo: i64, hi: i64) -> std::ops::Range<usize> {
        let from = self.entries.partition_point(|(s, _, _)| *s < lo);
        let to = self.entries.partition_point(|(s, _, _)| *s < hi);
        from..to.max(from)
    }

    /// Adds window `i` to `acc`.
    pub fn add(&self, i: usize, acc: &mut Histogram) {
        let (_, c, at) = &self.entries[i];
        acc.add_checked(c, &self.bytes[*at..*at + c.len()]);
    }

    /// Subtracts window `i` (added before) from `acc`; false when its layout differs.
    pub fn subtract(&self, i: usize, acc: &mut Histogram) -> bool {
        let (_, c, at) = &self.entries[i];
        acc.subtract_checked(c, &self.bytes[*at..*at + c.len()])
    }
}

/// A running sum of the windows whose start lies in `[lo, hi)`, where both bounds only move
/// forward.
#[derive(Debug)]
pub struct Slider {
    acc: Histogram,
    lo: usize,
    hi: usize,
}

impl Slider {
    /// An empty sum of histograms of `layout`.
    pub fn new(layout: Layout) -> Slider {
        Slider { acc: Histogram::new(layout), lo: 0, hi: 0 }
    }

    /// Moves to the windows of `w` starting in `[lo, hi)`; both must not be less than the last
    /// call's.
    pub fn advance(&mut self, w: &Windows, lo: i64, hi: i64) {
        let e = &w.entries;
        let leaving = e[self.lo..self.hi].iter().take_while(|(s, _, _)| *s < lo).count();
        if leaving * 2 > self.hi - self.lo {
            // Most of the range moves on: start over rather than subtract.
            self.acc.reset();
            self.lo += leaving;
            (self.lo..self.hi).for_each(|i| w.add(i, &mut self.acc));
        }
        while self.lo < self.hi && e[self.lo].0 < lo {
            if !w.subtract(self.lo, &mut self.acc) {
                // Windows of another layout (a changed configuration): re-merge the rest.
                self.acc.reset();
                (self.lo + 1..self.hi).for_each(|i| w.add(i, &mut self.acc));
            }
            self.lo += 1;
        }
        while self.hi < e.len() && e[self.hi].0 < hi {
            if e[self.hi].0 >= lo {
                w.add(self.hi, &mut self.acc);
            } else {
                self.lo = self.hi + 1;
            }
            self.hi += 1;
        }
    }

    /// Whether any window is in the sum (a window may hold no spans and still count).
    pub fn holds_windows(&self) -> bool {
        self.lo < self.hi
    }

    /// The sum.
    pub fn histogram(&self) -> &Histogram {
        &self.acc
    }

    /// The sum, to add windows to for a moment (they must be subtracted again, or the sum
    /// rebuilt with [`Slider::rebuild`]).
    pub fn histogram_mut(&mut self) -> &mut Histogram {
        &mut self.acc
    }

    /// Recomputes the sum of its current windows from scratch.
    pub fn rebuild(&mut self, w: &Windows) {
        self.acc.reset();
        (self.lo..self.hi).for_each(|i| w.add(i, &mut self.acc));
    }
}
