//! Self time: a span's duration minus the time it spent waiting on the calls it made (its
//! child CLIENT and PRODUCER spans). Calls that overlap — a parallel fan-out, a call that
//! started while another ran — count once: what is taken away is the length of the union of
//! the calls, clipped to the span. The client crate keeps a span's calls in [`Calls`] (no
//! allocation); the server's OTLP ingest sorts the calls an export carries and asks
//! [`covered`].

/// How many disjoint intervals [`Calls`] keeps before it joins the two closest.
pub const MAX_INTERVALS: usize = 8;

/// The length of the union of `intervals` (`[start, end)` in nanoseconds) inside
/// `[start, end)`. Sorts `intervals` in place; empty and inverted intervals count nothing.
pub fn covered(start: i64, end: i64, intervals: &mut [(i64, i64)]) -> i64 {
    intervals.sort_unstable();
    let mut total = 0i64;
    // The end of the union so far, clipped to the span.
    let mut reached = start;
    for &(a, b) in intervals.iter() {
        let (a, b) = (a.max(reached), b.min(end));
        if b > a {
            total = total.saturating_add(b - a);
            reached = b;
        }
    }
    total
}

/// The self time of a span from `start` to `end` that waited on `intervals`: at least 1 ns
/// (0 is the wire's "unknown"), at most the span's duration.
pub fn self_time(start: i64, end: i64, intervals: &mut [(i64, i64)]) -> i64 {
    let duration = end.saturating_sub(start).max(0);
    duration.saturating_sub(covered(start, end, intervals)).max(1)
}

/// The calls a span made, as at most [`MAX_INTERVALS`] disjoint intervals, kept without
/// allocating. Sequential calls that touch join into one; past the limit the two intervals
/// with the smallest gap between them are joined, so the gap counts as waiting (self time is
/// then under-, never over-, stated by at most that gap).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Calls {
    spans: [(i64, i64); MAX_INTERVALS],
    len: usize,
}

impl Calls {
    /// No calls.
    pub const fn new() -> Calls {
        Calls { spans: [(0, 0); MAX_INTERVALS], len: 0 }
    }

    /// Whether no call was added.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds a call from `start` to `end` (nanoseconds).
    pub fn add(&mut self, start: i64, end: i64) {
        if end <= start {
            return;
        }
        let (mut a, mut b) = (start, end);
        // Take out every interval it touches and grow it by them.
        let mut i = 0;
        while i < self.len {
            let (s, e) = self.spans[i];
            if s <= b && a <= e {
                a = a.min(s);
                b = b.max(e);
                self.len -= 1;
                self.spans[i] = self.spans[self.len];
            } else {
                i += 1;
            }
        }
        if self.len == MAX_INTERVALS {
            self.join_closest();
        }
        self.spans[self.len] = (a, b);
        self.len += 1;
    }

    /// Joins the two intervals with the smallest gap between them.
    fn join_closest(&mut self) {
        let spans = &mut self.spans[..self.len];
        spans.sort_unstable();
        let Some(at) = (1..spans.len()).min_by_key(|&i| spans[i].0 - spans[i - 1].1) else {
            return;
        };
        spans[at - 1].1 = spans[at - 1].1.max(spans[at].1);
        for i in at..spans.len() - 1 {
            spans[i] = spans[i + 1];
        }
        self.len -= 1;
    }

    /// Adds every call of `other`.
    pub fn absorb(&mut self, other: &Calls) {
        for &(start, end) in &other.spans[..other.len] {
            self.add(start, end);
        }
    }

    /// The self time of a span from `start` to `end` that made these calls (see
    /// [`self_time`]).
    pub fn self_time(&self, start: i64, end: i64) -> i64 {
        let mut spans = self.spans;
        self_time(start, end, &mut spans[..self.len])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_and_sequential_calls_count_once() {
        // A 100 ns span: calls 10–30 and 20–50 overlap (40 ns), 60–70 follows.
        let mut calls = [(60, 70), (10, 30), (20, 50)];
        assert_eq!(covered(0, 100, &mut calls), 50);
        assert_eq!(self_time(0, 100, &mut calls), 50);
        // Calls sticking out of the span are clipped to it.
        assert_eq!(covered(0, 100, &mut [(-50, 10), (90, 500)]), 20);
        // A span that only waited reads as 1 ns, not as the wire's "unknown".
        assert_eq!(self_time(0, 100, &mut [(0, 100)]), 1);
        assert_eq!(self_time(0, 100, &mut []), 100);
        assert_eq!(covered(0, 100, &mut [(30, 20), (40, 40)]), 0);
    }

    #[test]
    fn calls_join_and_stay_within_their_bound() {
        let mut calls = Calls::new();
        assert!(calls.is_empty());
        calls.add(10, 20);
        calls.add(20, 30); // touches: one interval
        calls.add(15, 25); // inside
        assert_eq!(calls.len, 1);
        assert_eq!(calls.self_time(0, 100), 80);
        // A fan-out of eleven disjoint calls of 2 ns, 10 ns apart.
        let mut fan = Calls::new();
        for i in 0..11 {
            fan.add(i * 10, i * 10 + 2);
        }
        assert_eq!(fan.len, MAX_INTERVALS);
        // Three gaps of 8 ns were joined: self time is understated by exactly them.
        assert_eq!(fan.self_time(0, 200), 200 - 22 - 3 * 8);
        // The same calls in another order give the same answer.
        let mut back = Calls::new();
        for i in (0..11).rev() {
            back.add(i * 10, i * 10 + 2);
        }
        assert_eq!(back.self_time(0, 200), fan.self_time(0, 200));
        // Empty and inverted calls are nothing.
        let mut none = Calls::new();
        none.add(5, 5);
        none.add(9, 3);
        assert!(none.is_empty());
    }
}
