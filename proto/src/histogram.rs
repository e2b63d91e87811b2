//! The latency histogram that tailscope records, merges, stores and sends: HdrHistogram's bucket
//! layout with exact count, sum, min and max, and a compact sparse encoding that is validated
//! before anything is counted.
//!
//! Counters live in chunks of one HDR bucket each (128 counters at 2 significant digits), which
//! are allocated only when a value lands in them, so a series whose latencies span two decades
//! costs about 7 KiB rather than the full range's 27 KiB.
//!
//! # Encoding (version 1)
//!
//! All integers are unsigned LEB128 varints:
//!
//! ```text
//! version (=1) | significant_digits | lowest | highest
//! total_count | sum (u128) | [min | max, when total_count > 0] | clamped_count
//! nonzero_buckets | nonzero_buckets × (index_gap | count)
//! ```
//!
//! `index_gap` is the distance from the previous non-zero bucket index minus one (the first is
//! the index itself); every count is positive and their sum equals `total_count`.

use std::fmt;
use std::ops::ControlFlow;

/// The largest number of counters a decoded layout may ask for; bounds what a hostile
/// histogram can make the decoder allocate.
pub const MAX_COUNTS_LEN: usize = 1 << 17;

const VERSION: u8 = 1;

/// Errors found while building a layout or decoding a histogram.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HistogramError {
    /// The bytes ended in the middle of a field.
    #[error("histogram truncated while reading {0}")]
    Truncated(&'static str),
    /// A varint is longer than its type allows.
    #[error("histogram field {0} is not a valid varint")]
    BadVarint(&'static str),
    /// The first byte names an encoding this build does not know.
    #[error("unknown histogram encoding version {0}")]
    UnknownVersion(u8),
    /// The layout parameters are out of range.
    #[error("invalid histogram layout: {0}")]
    InvalidLayout(String),
    /// The bucket list is inconsistent with the layout or the totals.
    #[error("inconsistent histogram: {0}")]
    Inconsistent(String),
    /// Bytes follow the last bucket.
    #[error("histogram has {0} trailing bytes")]
    TrailingBytes(usize),
}

/// Where values land: HdrHistogram's log-linear bucket layout for a precision and range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    significant_digits: u8,
    lowest: u64,
    highest: u64,
    unit_magnitude: u32,
    half_count_magnitude: u32,
    half_count: usize,
    sub_bucket_mask: u64,
    leading_zero_count_base: u32,
    chunk_count: usize,
}

impl Layout {
    /// tailscope's default: 2 significant digits (≤ 1 % relative error) over 1 µs .. 1 h, in
    /// nanoseconds.
    pub const DEFAULT_SIGNIFICANT_DIGITS: u8 = 2;
    /// The default lowest discernible value, 1 µs in nanoseconds.
    pub const DEFAULT_LOWEST: u64 = 1_000;
    /// The default highest trackable value, 1 h in nanoseconds.
    pub const DEFAULT_HIGHEST: u64 = 3_600_000_000_000;

    /// Builds the layout for `significant_digits` (1..=4) over `lowest ..= highest`.
    pub fn new(significant_digits: u8, lowest: u64, highest: u64) -> Result<Layout, HistogramError> {
        if !(1..=4).contains(&significant_digits) {
            return Err(HistogramError::InvalidLayout(format!(
                "significant digits must be 1..=4, got {significant_digits}"
            )));
        }
        if lowest == 0 {
            return Err(HistogramError::InvalidLayout("lowest value must be at least 1".into()));
        }
        if highest < lowest.saturating_mul(2) || highest > (1 << 62) {
            return Err(HistogramError::InvalidLayout(format!(
                "highest value {highest} must be at least twice the lowest {lowest} and at most 2^62"
            )));
        }
        let single_unit = 2 * 10u64.pow(u32::from(significant_digits));
        let sub_bucket_count_magnitude = 64 - (single_unit - 1).leading_zeros();
        let half_count_magnitude = sub_bucket_count_magnitude.max(1) - 1;
        let unit_magnitude = 63 - lowest.leading_zeros();
        if unit_magnitude + half_count_magnitude > 61 {
            return Err(HistogramError::InvalidLayout(format!(
                "lowest value {lowest} is too large for {significant_digits} significant digits"
            )));
        }
        let sub_bucket_count = 1u64 << (half_count_magnitude + 1);
        let mut smallest_untrackable = sub_bucket_count << unit_magnitude;
        let mut bucket_count = 1usize;
        while smallest_untrackable <= highest {
            if smallest_untrackable > u64::MAX / 2 {
                bucket_count += 1;
                break;
            }
            smallest_untrackable <<= 1;
            bucket_count += 1;
        }
        let half_count = 1usize << half_count_magnitude;
        let layout = Layout {
            significant_digits,
            lowest,
            highest,
            unit_magnitude,
            half_count_magnitude,
            half_count,
            sub_bucket_mask: (sub_bucket_count - 1) << unit_magnitude,
            leading_zero_count_base: 64 - unit_magnitude - half_count_magnitude - 1,
            chunk_count: bucket_count + 1,
        };
        if layout.counts_len() > MAX_COUNTS_LEN {
            return Err(HistogramError::InvalidLayout(format!(
                "layout needs {} counters, more than the limit of {MAX_COUNTS_LEN}",
                layout.counts_len()
            )));
        }
        Ok(layout)
    }

    /// The precision in significant decimal digits.
    pub fn significant_digits(&self) -> u8 {
        self.significant_digits
    }

    /// The lowest discernible value.
    pub fn lowest(&self) -> u64 {
        self.lowest
    }

    /// The highest trackable value; larger values are clamped to it and counted as clamped.
    pub fn highest(&self) -> u64 {
        self.highest
    }

    /// The number of counters of a fully populated histogram.
    pub fn counts_len(&self) -> usize {
        self.chunk_count * self.half_count
    }

    /// The largest relative error of a value reported from this layout (half a bucket's width
    /// relative to its lowest value, above the lowest discernible value).
    pub fn relative_error(&self) -> f64 {
        0.5 / self.half_count as f64
    }

    /// The counter index of `value` (which must be at most `highest`).
    #[inline]
    pub fn index_of(&self, value: u64) -> usize {
        let bucket = self.leading_zero_count_base - (value | self.sub_bucket_mask).leading_zeros();
        let sub = (value >> (bucket + self.unit_magnitude)) as usize;
        ((bucket as usize + 1) << self.half_count_magnitude) + sub - self.half_count
    }

    /// The smallest value that lands at counter `index`.
    #[inline]
    pub fn lowest_equivalent(&self, index: usize) -> u64 {
        let (bucket, sub) = self.bucket_and_sub(index);
        (sub as u64) << (bucket + self.unit_magnitude)
    }

    /// The largest value that lands at counter `index`.
    #[inline]
    pub fn highest_equivalent(&self, index: usize) -> u64 {
        let (bucket, _) = self.bucket_and_sub(index);
        self.lowest_equivalent(index) + (1u64 << (bucket + self.unit_magnitude)) - 1
    }

    /// The middle of counter `index`'s range: the value reported for it.
    #[inline]
    pub fn median_equivalent(&self, index: usize) -> u64 {
        let (bucket, _) = self.bucket_and_sub(index);
        self.lowest_equivalent(index) + ((1u64 << (bucket + self.unit_magnitude)) >> 1)
    }

    #[inline]
    fn bucket_and_sub(&self, index: usize) -> (u32, usize) {
        let chunk = index >> self.half_count_magnitude;
        let sub = (index & (self.half_count - 1)) + self.half_count;
        if chunk == 0 {
            (0, sub - self.half_count)
        } else {
            ((chunk - 1) as u32, sub)
        }
    }
}

impl Default for Layout {
    fn default() -> Self {
        #[allow(clippy::unwrap_used)] // constant, valid arguments
        Layout::new(Self::DEFAULT_SIGNIFICANT_DIGITS, Self::DEFAULT_LOWEST, Self::DEFAULT_HIGHEST).unwrap()
    }
}

/// A mergeable latency histogram with exact count, sum, min and max.
#[derive(Clone)]
pub struct Histogram {
    layout: Layout,
    chunks: Vec<Option<Box<[u64]>>>,
    total: u64,
    sum: u128,
    min: u64,
    max: u64,
    clamped: u64,
}

/// Equal when they count the same values: how the counters are allocated does not matter.
impl PartialEq for Histogram {
    fn eq(&self, other: &Histogram) -> bool {
        self.layout == other.layout
            && self.total == other.total
            && self.sum == other.sum
            && self.min() == other.min()
            && self.max() == other.max()
            && self.clamped == other.clamped
            && self.iter_nonzero().eq(other.iter_nonzero())
    }
}

impl Eq for Histogram {}

impl fmt::Debug for Histogram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Histogram")
            .field("count", &self.total)
            .field("sum", &self.sum)
            .field("min", &self.min())
            .field("max", &self.max())
            .field("clamped", &self.clamped)
            .finish()
    }
}

impl Histogram {
    /// An empty histogram with `layout`.
    pub fn new(layout: Layout) -> Histogram {
        Histogram {
            layout,
            chunks: vec![None; layout.chunk_count],
            total: 0,
            sum: 0,
            min: u64::MAX,
            max: 0,
            clamped: 0,
        }
    }

    /// The layout values are recorded with.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Records `value` `weight` times. Values above the layout's highest are recorded as the
    /// highest and counted as clamped. Never panics; counts saturate.
    #[inline]
    pub fn record(&mut self, value: u64, weight: u64) {
        if weight == 0 {
            return;
        }
        let value = if value > self.layout.highest {
            self.clamped = self.clamped.saturating_add(weight);
            self.layout.highest
        } else {
            value
        };
        self.add_at(self.layout.index_of(value), weight);
        self.total = self.total.saturating_add(weight);
        self.sum = self.sum.saturating_add(u128::from(value) * u128::from(weight));
        self.min = self.min.min(value);
        self.max = self.max.max(value);
    }

    #[inline]
    fn add_at(&mut self, index: usize, count: u64) {
        let chunk = index >> self.layout.half_count_magnitude;
        let offset = index & (self.layout.half_count - 1);
        let half = self.layout.half_count;
        let counters = self.chunks[chunk].get_or_insert_with(|| vec![0; half].into_boxed_slice());
        counters[offset] = counters[offset].saturating_add(count);
    }

    /// The number of values recorded (weighted).
    pub fn count(&self) -> u64 {
        self.total
    }

    /// The exact sum of the recorded values (weighted).
    pub fn sum(&self) -> u128 {
        self.sum
    }

    /// The smallest value recorded, if any.
    pub fn min(&self) -> Option<u64> {
        (self.total > 0).then_some(self.min)
    }

    /// The largest value recorded (after clamping), if any.
    pub fn max(&self) -> Option<u64> {
        (self.total > 0).then_some(self.max)
    }

    /// How many of the recorded values were above the layout's range and clamped.
    pub fn clamped(&self) -> u64 {
        self.clamped
    }

    /// The mean of the recorded values.
    pub fn mean(&self) -> Option<f64> {
        (self.total > 0).then(|| self.sum as f64 / self.total as f64)
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Heap bytes held by the counters.
    pub fn heap_bytes(&self) -> usize {
        self.chunks.capacity() * std::mem::size_of::<Option<Box<[u64]>>>()
            + self.chunks.iter().flatten().count() * self.layout.half_count * 8
    }

    /// The non-zero counters as `(index, count)`, in index order.
    pub fn iter_nonzero(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        let half = self.layout.half_count;
        self.chunks.iter().enumerate().flat_map(move |(c, chunk)| {
            chunk.iter().flat_map(move |counters| {
                counters.iter().enumerate().filter(|(_, &n)| n > 0).map(move |(i, &n)| (c * half + i, n))
            })
        })
    }

    /// Calls `f` with each non-zero counter as `(index, count)`, in index order, until it
    /// breaks. Plain loops: several times faster than [`Histogram::iter_nonzero`].
    #[inline]
    fn try_nonzero<B>(&self, mut f: impl FnMut(usize, u64) -> ControlFlow<B>) -> Option<B> {
        let half = self.layout.half_count;
        for (c, chunk) in self.chunks.iter().enumerate() {
            let Some(counters) = chunk else { continue };
            for (i, &n) in counters.iter().enumerate() {
                if n != 0 {
                    if let ControlFlow::Break(b) = f(c * half + i, n) {
                        return Some(b);
                    }
                }
            }
        }
        None
    }

    /// The index of the counter where the counts, taken upwards (or downwards when `down`),
    /// reach `n`. A chunk whose whole count falls short is passed with one sum (in u128:
    /// counters may be anything a hostile encoding held).
    fn nth_counted(&self, n: u64, down: bool) -> Option<usize> {
        // The i-th of `len` positions in the direction of the count.
        let at = |i: usize, len: usize| if down { len - 1 - i } else { i };
        let (half, chunks) = (self.layout.half_count, self.chunks.len());
        let (n, mut seen) = (u128::from(n), 0u128);
        for c in (0..chunks).map(|i| at(i, chunks)) {
            let Some(counters) = &self.chunks[c] else { continue };
            let whole: u128 = counters.iter().map(|&x| u128::from(x)).sum();
            if seen + whole < n {
                seen += whole;
                continue;
            }
            return (0..counters.len())
                .map(|i| at(i, counters.len()))
                .find(|&i| {
                    seen += u128::from(counters[i]);
                    seen >= n
                })
                .map(|i| c * half + i);
        }
        None
    }

    fn nonzero_count(&self) -> usize {
        self.chunks.iter().flatten().map(|c| c.iter().filter(|&&n| n != 0).count()).sum()
    }

    /// The value at quantile `q` (0..=1) by nearest rank: the middle of the bucket holding the
    /// ⌈q·count⌉-th smallest value, kept within the exact min and max. `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        if self.total == 0 {
            return None;
        }
        let q = if q.is_nan() { 0.0 } else { q.clamp(0.0, 1.0) };
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        // The bucket holding the rank-th value is the lowest whose counts and those below it
        // reach `rank` — or, counted from the top, the highest whose counts and those above it
        // reach `total - rank + 1`. The tail quantiles a latency query asks for are found from
        // the top, past a few chunks instead of nearly all of them.
        let found = if q > 0.5 {
            self.nth_counted(self.total - rank + 1, true)
        } else {
            self.nth_counted(rank, false)
        };
        Some(found.map_or(self.max, |index| self.layout.median_equivalent(index).clamp(self.min, self.max)))
    }

    /// How many recorded values are at most `value`, counting whole buckets: a bucket counts
    /// when its highest equivalent value is at most `value`.
    pub fn count_at_most(&self, value: u64) -> u64 {
        if self.total == 0 || value < self.min {
            return 0;
        }
        if value >= self.max {
            return self.total;
        }
        let mut below = 0u64;
        self.try_nonzero(|i, n| {
            if self.layout.highest_equivalent(i) > value {
                return ControlFlow::Break(());
            }
            below = below.saturating_add(n);
            ControlFlow::Continue(())
        });
        below
    }

    /// Adds `other` into this histogram. Layouts may differ: then each of `other`'s buckets is
    /// re-recorded at its median value.
    pub fn merge(&mut self, other: &Histogram) {
        if other.total == 0 {
            return;
        }
        if other.layout == self.layout {
            for (c, chunk) in other.chunks.iter().enumerate() {
                if let Some(src) = chunk {
                    let half = self.layout.half_count;
                    let dst = self.chunks[c].get_or_insert_with(|| vec![0; half].into_boxed_slice());
                    for (d, s) in dst.iter_mut().zip(src.iter()) {
                        *d = d.saturating_add(*s);
                    }
                }
            }
        } else {
            for (index, n) in other.iter_nonzero() {
                let v = other.layout.median_equivalent(index).min(self.layout.highest);
                self.add_at(self.layout.index_of(v), n);
            }
        }
        self.absorb_stats(other.total, other.sum, other.min, other.max, other.clamped);
    }

    /// Removes `other`, which must have been merged into this histogram before (the sliding
    /// window of a range query: add the window entering, subtract the one leaving). Counts, sum
    /// and the clamped count are exact afterwards; min and max stay as bounds (they may be
    /// wider than the remaining values), which keeps quantiles within the layout's precision.
    /// Layouts must match; a histogram of another layout is ignored and `false` returned.
    pub fn subtract(&mut self, other: &Histogram) -> bool {
        if other.layout != self.layout {
            return false;
        }
        for (c, chunk) in other.chunks.iter().enumerate() {
            if let (Some(src), Some(dst)) = (chunk, self.chunks[c].as_mut()) {
                for (d, s) in dst.iter_mut().zip(src.iter()) {
                    *d = d.saturating_sub(*s);
                }
            }
        }
        self.total = self.total.saturating_sub(other.total);
        self.sum = self.sum.saturating_sub(other.sum);
        self.clamped = self.clamped.saturating_sub(other.clamped);
        if self.total == 0 {
            self.reset();
        }
        true
    }

    fn absorb_stats(&mut self, total: u64, sum: u128, min: u64, max: u64, clamped: u64) {
        self.total = self.total.saturating_add(total);
        self.sum = self.sum.saturating_add(sum);
        self.min = self.min.min(min);
        self.max = self.max.max(max.min(self.layout.highest));
        self.clamped = self.clamped.saturating_add(clamped);
    }

    /// Clears all counts, keeping the allocated chunks for reuse.
    pub fn reset(&mut self) {
        for counters in self.chunks.iter_mut().flatten() {
            counters.fill(0);
        }
        self.total = 0;
        self.sum = 0;
        self.min = u64::MAX;
        self.max = 0;
        self.clamped = 0;
    }

    /// Appends the encoding of this histogram to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let stats =
            Stats { total: self.total, sum: self.sum, min: self.min, max: self.max, clamped: self.clamped };
        stats.encode_head(&self.layout, self.nonzero_count(), out);
        let mut next = 0usize;
        self.try_nonzero(|index, n| {
            put_varint(out, (index - next) as u64);
            put_varint(out, n);
            next = index + 1;
            ControlFlow::<()>::Continue(())
        });
    }

    /// The encoding of this histogram.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(48 + 4 * self.nonzero_count());
        self.encode(&mut out);
        out
    }

    /// Decodes and validates an encoded histogram.
    pub fn decode(bytes: &[u8]) -> Result<Histogram, HistogramError> {
        let parsed = Parsed::parse(bytes)?;
        let mut h = Histogram::new(parsed.layout);
        parsed.apply(&mut h);
        Ok(h)
    }

    /// Checks an encoded histogram as [`Histogram::decode`] does, without decoding it.
    pub fn validate(bytes: &[u8]) -> Result<(), HistogramError> {
        Parsed::parse(bytes).map(|_| ())
    }

    /// The encoding of the sum of `encodings` — byte for byte what decoding the first, adding
    /// the others with [`Histogram::merge_encoded`] and encoding the result gives — made by
    /// merging their bucket lists as lists, without a histogram's dense counters (allocating,
    /// zeroing and scanning those was most of a read of windows that still hold several merge
    /// operands). `None` when one is invalid or their layouts differ: merge them densely then.
    pub fn merge_encodings(encodings: &[&[u8]]) -> Option<Vec<u8>> {
        let parsed: Vec<Parsed<'_>> =
            encodings.iter().map(|e| Parsed::parse(e).ok()).collect::<Option<_>>()?;
        let layout = parsed.first()?.layout;
        if parsed.iter().any(|p| p.layout != layout) {
            return None;
        }
        let mut stats = Stats { total: 0, sum: 0, min: u64::MAX, max: 0, clamped: 0 };
        // Each operand's list is sorted: they are merged pairwise, round by round.
        let mut runs: Vec<Vec<(usize, u64)>> = Vec::with_capacity(parsed.len());
        for p in parsed {
            if p.total == 0 {
                continue; // as `apply`: an empty histogram adds nothing, not even a stray sum
            }
            stats.total = stats.total.saturating_add(p.total);
            stats.sum = stats.sum.saturating_add(p.sum);
            stats.min = stats.min.min(p.min);
            stats.max = stats.max.max(p.max.min(layout.highest));
            stats.clamped = stats.clamped.saturating_add(p.clamped);
            let mut r = p.buckets;
            let mut next = 0usize;
            let mut run = Vec::with_capacity(p.nonzero);
            for _ in 0..p.nonzero {
                // Validated by parse: these reads cannot fail.
                let index = next.saturating_add(r.varint("index_gap").unwrap_or(0) as usize);
                run.push((index, r.varint("count").unwrap_or(0)));
                next = index.saturating_add(1);
            }
            runs.push(run);
        }
        while runs.len() > 1 {
            let mut merged = Vec::with_capacity(runs.len().div_ceil(2));
            let mut pairs = runs.into_iter();
            while let Some(a) = pairs.next() {
                merged.push(match pairs.next() {
                    Some(b) => merge_runs(&a, &b),
                    None => a,
                });
            }
            runs = merged;
        }
        let buckets = runs.pop().unwrap_or_default();
        let mut out = Vec::with_capacity(48 + 4 * buckets.len());
        stats.encode_head(&layout, buckets.len(), &mut out);
        let mut next = 0usize;
        for (index, n) in buckets {
            put_varint(&mut out, (index - next) as u64);
            put_varint(&mut out, n);
            next = index + 1;
        }
        Some(out)
    }

    /// Validates an encoded histogram and adds it into this one. Nothing is added when the
    /// encoding is invalid.
    pub fn merge_encoded(&mut self, bytes: &[u8]) -> Result<(), HistogramError> {
        let parsed = Parsed::parse(bytes)?;
        parsed.apply(self);
        Ok(())
    }
}

/// Two sorted bucket lists as one, equal indexes summed (saturating).
fn merge_runs(a: &[(usize, u64)], b: &[(usize, u64)]) -> Vec<(usize, u64)> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        let (x, y) = (a[i], b[j]);
        if x.0 < y.0 {
            out.push(x);
            i += 1;
        } else if y.0 < x.0 {
            out.push(y);
            j += 1;
        } else {
            out.push((x.0, x.1.saturating_add(y.1)));
            i += 1;
            j += 1;
        }
    }
    out.extend_from_slice(&a[i..]);
    out.extend_from_slice(&b[j..]);
    out
}

/// A validated encoding, ready to be applied.
struct Parsed<'a> {
    layout: Layout,
    total: u64,
    sum: u128,
    min: u64,
    max: u64,
    clamped: u64,
    nonzero: usize,
    buckets: Reader<'a>,
}

impl<'a> Parsed<'a> {
    fn parse(bytes: &'a [u8]) -> Result<Parsed<'a>, HistogramError> {
        let parsed = Parsed::parse_header(bytes)?;
        parsed.validate_buckets()?;
        Ok(parsed)
    }

    /// Reads and checks the fields before the bucket list.
    fn parse_header(bytes: &'a [u8]) -> Result<Parsed<'a>, HistogramError> {
        let mut r = Reader { bytes, pos: 0 };
        let version = r.byte("version")?;
        if version != VERSION {
            return Err(HistogramError::UnknownVersion(version));
        }
        let digits = r.varint("significant_digits")?;
        let lowest = r.varint("lowest")?;
        let highest = r.varint("highest")?;
        let digits = u8::try_from(digits).map_err(|_| {
            HistogramError::InvalidLayout(format!("significant digits must be 1..=4, got {digits}"))
        })?;
        let layout = Layout::new(digits, lowest, highest)?;
        let total = r.varint("total_count")?;
        let sum = r.varint_u128("sum")?;
        let (min, max) = if total > 0 { (r.varint("min")?, r.varint("max")?) } else { (u64::MAX, 0) };
        let clamped = r.varint("clamped_count")?;
        let nonzero = r.varint("nonzero_buckets")?;
        if total > 0 && min > max {
            return Err(HistogramError::Inconsistent(format!("min {min} is above max {max}")));
        }
        if max > layout.highest {
            return Err(HistogramError::Inconsistent(format!(
                "max {max} is above the layout's highest value {}",
                layout.highest
            )));
        }
        if clamped > total {
            return Err(HistogramError::Inconsistent(format!(
                "clamped count {clamped} is above the total count {total}"
            )));
        }
        if nonzero > layout.counts_len() as u64 {
            return Err(HistogramError::Inconsistent(format!(
                "{nonzero} non-zero buckets, but the layout has only {}",
                layout.counts_len()
            )));
        }
        Ok(Parsed { layout, total, sum, min, max, clamped, nonzero: nonzero as usize, buckets: r })
    }

    /// Walks the bucket list once to validate it fully before anything is applied.
    fn validate_buckets(&self) -> Result<(), HistogramError> {
        let (layout, total, bytes) = (self.layout, self.total, self.buckets.bytes);
        let mut r = self.buckets.clone();
        let mut next = 0u64;
        let mut counted = 0u64;
        for _ in 0..self.nonzero {
            let gap = r.varint("index_gap")?;
            let n = r.varint("count")?;
            let index = next.checked_add(gap).filter(|&i| i < layout.counts_len() as u64);
            let Some(index) = index else {
                return Err(HistogramError::Inconsistent(format!(
                    "bucket index beyond the layout's {} counters",
                    layout.counts_len()
                )));
            };
            if n == 0 {
                return Err(HistogramError::Inconsistent(format!("bucket {index} has a zero count")));
            }
            counted = counted
                .checked_add(n)
                .ok_or_else(|| HistogramError::Inconsistent("bucket counts overflow 64 bits".into()))?;
            next = index + 1;
        }
        if counted != total {
            return Err(HistogramError::Inconsistent(format!(
                "bucket counts add up to {counted}, but the total count says {total}"
            )));
        }
        if r.pos != bytes.len() {
            return Err(HistogramError::TrailingBytes(bytes.len() - r.pos));
        }
        Ok(())
    }

    fn apply(mut self, h: &mut Histogram) {
        let same = self.layout == h.layout;
        let mut next = 0usize;
        for _ in 0..self.nonzero {
            // Validated by parse: these reads cannot fail.
            let gap = self.buckets.varint("index_gap").unwrap_or(0) as usize;
            let n = self.buckets.varint("count").unwrap_or(0);
            let index = next.saturating_add(gap);
            next = index.saturating_add(1);
            if same {
                if index < h.layout.counts_len() {
                    h.add_at(index, n);
                }
            } else {
                let v = self.layout.median_equivalent(index.min(self.layout.counts_len() - 1));
                h.add_at(h.layout.index_of(v.min(h.layout.highest)), n);
            }
        }
        if self.total > 0 {
            h.absorb_stats(self.total, self.sum, self.min, self.max, self.clamped);
        }
    }

    /// Subtracts what [`Parsed::apply`] added; the layouts must be equal.
    fn unapply(mut self, h: &mut Histogram) {
        let half = h.layout.half_count;
        let mut next = 0usize;
        for _ in 0..self.nonzero {
            let gap = self.buckets.varint("index_gap").unwrap_or(0) as usize;
            let n = self.buckets.varint("count").unwrap_or(0);
            let index = next.saturating_add(gap);
            next = index.saturating_add(1);
            let chunk = index >> h.layout.half_count_magnitude;
            if let Some(Some(counters)) = h.chunks.get_mut(chunk) {
                let c = &mut counters[index & (half - 1)];
                *c = c.saturating_sub(n);
            }
        }
        h.total = h.total.saturating_sub(self.total);
        h.sum = h.sum.saturating_sub(self.sum);
        h.clamped = h.clamped.saturating_sub(self.clamped);
        if h.total == 0 {
            h.reset();
        }
    }
}

/// The totals an encoding starts with.
struct Stats {
    total: u64,
    sum: u128,
    min: u64,
    max: u64,
    clamped: u64,
}

impl Stats {
    /// Appends the version, layout, totals and the number of non-zero counters that follow.
    fn encode_head(&self, layout: &Layout, nonzero: usize, out: &mut Vec<u8>) {
        out.push(VERSION);
        put_varint(out, u64::from(layout.significant_digits));
        put_varint(out, layout.lowest);
        put_varint(out, layout.highest);
        put_varint(out, self.total);
        put_varint_u128(out, self.sum);
        if self.total > 0 {
            put_varint(out, self.min);
            put_varint(out, self.max);
        }
        put_varint(out, self.clamped);
        put_varint(out, nonzero as u64);
    }
}

/// A histogram being filled for a short while, then encoded once: the delta of one series and
/// window within one flush epoch. Values are appended as they come, with no counter array to
/// allocate and touch, and counted into buckets only when encoded; past
/// [`Recorder::SPARSE_VALUES`] values (or on a merge) it turns into a [`Histogram`]. Its
/// encoding is the one the [`Histogram`] of the same values has.
#[derive(Debug)]
pub struct Recorder {
    layout: Layout,
    /// `(value, weight)` as recorded, while no histogram was needed.
    values: Vec<(u64, u64)>,
    dense: Option<Histogram>,
}

impl Recorder {
    /// The most values kept unbucketed (16 bytes each).
    pub const SPARSE_VALUES: usize = 512;

    /// An empty recorder with `layout`.
    pub fn new(layout: Layout) -> Recorder {
        Recorder { layout, values: Vec::new(), dense: None }
    }

    /// Records `value` `weight` times, as [`Histogram::record`] does.
    #[inline]
    pub fn record(&mut self, value: u64, weight: u64) {
        if weight == 0 {
            return;
        }
        match &mut self.dense {
            Some(h) => h.record(value, weight),
            None if self.values.len() < Self::SPARSE_VALUES => self.values.push((value, weight)),
            None => self.densify().record(value, weight),
        }
    }

    /// Adds `other` into it.
    pub fn merge(&mut self, other: &Histogram) {
        self.densify().merge(other);
    }

    /// Calls `f` with what it recorded, as `(value, weight)`: the values themselves while
    /// they are kept apart, each non-empty bucket's highest equivalent value once bucketed.
    pub fn for_each_value(&self, mut f: impl FnMut(u64, u64)) {
        match &self.dense {
            Some(h) => h.iter_nonzero().for_each(|(i, n)| f(self.layout.highest_equivalent(i), n)),
            None => self.values.iter().for_each(|&(v, w)| f(v, w)),
        }
    }

    fn densify(&mut self) -> &mut Histogram {
        let values = &mut self.values;
        let layout = self.layout;
        self.dense.get_or_insert_with(|| {
            let mut h = Histogram::new(layout);
            for (value, weight) in values.drain(..) {
                h.record(value, weight);
            }
            h
        })
    }

    /// Appends the encoding of what it recorded to `out`.
    pub fn encode(mut self, out: &mut Vec<u8>) {
        if let Some(h) = &self.dense {
            return h.encode(out);
        }
        let layout = self.layout;
        let mut stats = Stats { total: 0, sum: 0, min: u64::MAX, max: 0, clamped: 0 };
        // Each value is replaced by its counter index, then equal indexes are summed.
        for (value, weight) in self.values.iter_mut() {
            let v = if *value > layout.highest {
                stats.clamped = stats.clamped.saturating_add(*weight);
                layout.highest
            } else {
                *value
            };
            stats.total = stats.total.saturating_add(*weight);
            stats.sum = stats.sum.saturating_add(u128::from(v) * u128::from(*weight));
            stats.min = stats.min.min(v);
            stats.max = stats.max.max(v);
            *value = layout.index_of(v) as u64;
        }
        self.values.sort_unstable_by_key(|&(index, _)| index);
        let mut buckets = 0;
        for i in 0..self.values.len() {
            let (index, weight) = self.values[i];
            if buckets > 0 && self.values[buckets - 1].0 == index {
                let n = &mut self.values[buckets - 1].1;
                *n = n.saturating_add(weight);
            } else {
                self.values[buckets] = (index, weight);
                buckets += 1;
            }
        }
        self.values.truncate(buckets);
        stats.encode_head(&layout, buckets, out);
        let mut next = 0u64;
        for &(index, n) in &self.values {
            put_varint(out, index - next);
            put_varint(out, n);
            next = index + 1;
        }
    }

    /// Its encoding.
    pub fn to_bytes(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(48 + 4 * self.values.len());
        self.encode(&mut out);
        out
    }
}

/// The header of an encoded histogram validated once, so the encoding can be added to and
/// subtracted from histograms again and again without being checked or decoded into counters
/// of its own (the sliding window of a range query holds its windows this way, their bytes
/// side by side in one buffer).
///
/// It describes the bytes it was made from; given other bytes it never panics, but counts
/// garbage.
#[derive(Debug, Clone, Copy)]
pub struct Checked {
    len: usize,
    buckets_at: usize,
    layout: Layout,
    total: u64,
    sum: u128,
    min: u64,
    max: u64,
    clamped: u64,
    nonzero: usize,
}

impl Checked {
    /// Validates `bytes` as [`Histogram::decode`] does.
    pub fn new(bytes: &[u8]) -> Result<Checked, HistogramError> {
        Ok(Checked::from_parsed(bytes, Parsed::parse(bytes)?))
    }

    /// Checks only the fields before the bucket list: for bytes that were validated on their
    /// way into a store that checksums them (tailscope's own windows), read back many at a
    /// time. Bucket lists that are nevertheless wrong count wrongly but never panic.
    pub fn trusted(bytes: &[u8]) -> Result<Checked, HistogramError> {
        Ok(Checked::from_parsed(bytes, Parsed::parse_header(bytes)?))
    }

    fn from_parsed(bytes: &[u8], p: Parsed<'_>) -> Checked {
        Checked {
            len: bytes.len(),
            buckets_at: p.buckets.pos,
            layout: p.layout,
            total: p.total,
            sum: p.sum,
            min: p.min,
            max: p.max,
            clamped: p.clamped,
            nonzero: p.nonzero,
        }
    }

    /// The number of values it counts.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// The length of the encoding.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it counts nothing.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    fn parsed<'a>(&self, bytes: &'a [u8]) -> Parsed<'a> {
        Parsed {
            layout: self.layout,
            total: self.total,
            sum: self.sum,
            min: self.min,
            max: self.max,
            clamped: self.clamped,
            nonzero: self.nonzero,
            buckets: Reader { bytes, pos: self.buckets_at },
        }
    }
}

impl Histogram {
    /// Adds the checked encoding `bytes`, like [`Histogram::merge_encoded`] without checking
    /// it again.
    pub fn add_checked(&mut self, c: &Checked, bytes: &[u8]) {
        c.parsed(bytes).apply(self);
    }

    /// Removes the checked encoding `bytes` added before, like [`Histogram::subtract`]. Layouts
    /// must match; one of another layout is ignored and `false` returned.
    pub fn subtract_checked(&mut self, c: &Checked, bytes: &[u8]) -> bool {
        if c.layout != self.layout {
            return false;
        }
        c.parsed(bytes).unapply(self);
        true
    }
}

#[derive(Clone)]
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn byte(&mut self, field: &'static str) -> Result<u8, HistogramError> {
        let b = *self.bytes.get(self.pos).ok_or(HistogramError::Truncated(field))?;
        self.pos += 1;
        Ok(b)
    }

    #[inline]
    fn varint(&mut self, field: &'static str) -> Result<u64, HistogramError> {
        // Most varints here (bucket gaps and counts) are one byte.
        if let Some(&b) = self.bytes.get(self.pos) {
            if b < 0x80 {
                self.pos += 1;
                return Ok(u64::from(b));
            }
        }
        let v = self.varint_u128(field)?;
        u64::try_from(v).map_err(|_| HistogramError::BadVarint(field))
    }

    fn varint_u128(&mut self, field: &'static str) -> Result<u128, HistogramError> {
        let mut v: u128 = 0;
        for shift in (0..128).step_by(7) {
            let b = self.byte(field)?;
            let bits = u128::from(b & 0x7f);
            if shift == 126 && bits > 0b11 {
                return Err(HistogramError::BadVarint(field));
            }
            v |= bits << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(HistogramError::BadVarint(field))
    }
}

fn put_varint(out: &mut Vec<u8>, v: u64) {
    put_varint_u128(out, u128::from(v));
}

fn put_varint_u128(out: &mut Vec<u8>, mut v: u128) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

#[cfg(test)]
mod tests;
