//! The merge operator: a window's value is a list of histogram operands, added on read and
//! in compaction, so late data and retries are simply more operands.

use tailscope_proto::histogram::{Histogram, Layout};

/// The operator's name, fixed in every database it has written.
pub(super) const MERGE_OPERATOR: &str = "tailscope.histogram.v1";

/// Adds encoded histograms; corrupt ones are skipped and reported through `on_corrupt`, so one
/// bad operand never makes a key unreadable.
pub fn merge_values<'a>(
    layout: Layout,
    values: impl IntoIterator<Item = &'a [u8]>,
    mut on_corrupt: impl FnMut(),
) -> Vec<u8> {
    let mut values = values.into_iter();
    let Some(first) = values.next() else { return Histogram::new(layout).to_bytes() };
    let mut rest = values.peekable();
    // One valid operand and nothing to merge it with (a window written in one epoch, read
    // before compaction folded it): it already is the answer.
    if rest.peek().is_none() && Histogram::validate(first).is_ok() {
        return first.to_vec();
    }
    let all: Vec<&[u8]> = std::iter::once(first).chain(rest).collect();
    if let Some(merged) = Histogram::merge_encodings(&all) {
        return merged;
    }
    // An invalid operand (counted and skipped) or layouts that differ (re-recorded): densely.
    let mut acc: Option<Histogram> = None;
    for bytes in all {
        let ok = match acc.as_mut() {
            Some(h) => h.merge_encoded(bytes).is_ok(),
            None => Histogram::decode(bytes).map(|h| acc = Some(h)).is_ok(),
        };
        if !ok {
            on_corrupt();
        }
    }
    acc.unwrap_or_else(|| Histogram::new(layout)).to_bytes()
}
