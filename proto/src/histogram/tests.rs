use super::*;
use rand::{Rng, SeedableRng};

fn rng() -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(7)
}

/// Heavy-tailed values in nanoseconds: lognormal body around 20 ms with a Pareto tail.
fn heavy_tailed(n: usize) -> Vec<u64> {
    let mut r = rng();
    (0..n)
        .map(|_| {
            let u: f64 = r.gen_range(1e-12..1.0);
            if r.gen_bool(0.97) {
                let z: f64 = (-2.0 * u.ln()).sqrt() * (r.gen::<f64>() * std::f64::consts::TAU).cos();
                (20e6 * (0.6 * z).exp()) as u64
            } else {
                (50e6 / u.powf(1.0 / 1.2)) as u64
            }
        })
        .collect()
}

#[test]
fn layout_matches_hdrhistogram_indexing() {
    let layout = Layout::default();
    let reference =
        hdrhistogram::Histogram::<u64>::new_with_bounds(Layout::DEFAULT_LOWEST, Layout::DEFAULT_HIGHEST, 2)
            .expect("reference histogram");
    assert_eq!(layout.counts_len(), reference.distinct_values());
    let mut r = rng();
    for _ in 0..100_000 {
        let v = r.gen_range(0..=Layout::DEFAULT_HIGHEST);
        let i = layout.index_of(v);
        assert_eq!(layout.lowest_equivalent(i), reference.lowest_equivalent(v), "value {v}");
        assert_eq!(layout.highest_equivalent(i), reference.highest_equivalent(v), "value {v}");
        assert!(layout.lowest_equivalent(i) <= v && v <= layout.highest_equivalent(i));
    }
}

#[test]
fn quantiles_are_within_precision_of_sorted_values() {
    let mut values = heavy_tailed(200_000);
    let mut h = Histogram::new(Layout::default());
    for &v in &values {
        h.record(v, 1);
    }
    values.sort_unstable();
    let err = h.layout().relative_error();
    for q in [0.0, 0.5, 0.9, 0.99, 0.999, 1.0] {
        let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
        let exact = values[rank - 1] as f64;
        let got = h.quantile(q).expect("non-empty") as f64;
        assert!((got - exact).abs() <= exact * err + 1.0, "q={q}: got {got}, exact {exact}");
    }
    assert_eq!(h.count(), values.len() as u64);
    assert_eq!(h.sum(), values.iter().map(|&v| u128::from(v)).sum::<u128>());
    assert_eq!(h.min(), values.first().copied());
    assert_eq!(h.max(), values.last().copied());
}

/// Tail quantiles are found from the top: the same bucket as counting from the bottom, for
/// every rank, with weights and small counts where off-by-ones would show.
#[test]
fn quantiles_counted_from_the_top_pick_the_bucket_counted_from_the_bottom() {
    let mut r = rng();
    for n in [1usize, 2, 3, 7, 100, 1001, 20_000] {
        let mut h = Histogram::new(Layout::default());
        for v in heavy_tailed(n) {
            h.record(v, r.gen_range(1..4));
        }
        let buckets: Vec<(usize, u64)> = h.iter_nonzero().collect();
        let total = h.count();
        let mut qs: Vec<f64> = (0..=200).map(|i| f64::from(i) / 200.0).collect();
        qs.extend([0.99, 0.999, 0.9999, 0.5 + f64::EPSILON, 1.0 - f64::EPSILON]);
        for q in qs {
            let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
            let mut seen = 0;
            let (index, _) = *buckets
                .iter()
                .find(|(_, c)| {
                    seen += c;
                    seen >= rank
                })
                .expect("rank within the count");
            let want = h.layout().median_equivalent(index).clamp(h.min().unwrap_or(0), h.max().unwrap_or(0));
            assert_eq!(h.quantile(q), Some(want), "n={n}, q={q}");
        }
    }
}

/// Merging encodings as lists gives the bytes the dense merge gives: empty operands, one value,
/// clamped values, weights that saturate, many operands.
#[test]
fn encodings_merged_as_lists_equal_the_dense_merge_byte_for_byte() {
    let mut r = rng();
    for case in 0..400 {
        let operands = 1 + case % 7;
        let encodings: Vec<Vec<u8>> = (0..operands)
            .map(|_| {
                let mut h = Histogram::new(Layout::default());
                let n = match r.gen_range(0..5) {
                    0 => 0,
                    1 => 1,
                    _ => r.gen_range(2..300),
                };
                // At most four huge weights in one operand (which itself must stay a valid
                // encoding); several operands' may saturate the merged counts.
                let mut huge = 0;
                for v in heavy_tailed(n) {
                    let v = v.wrapping_add(r.gen_range(0..1000));
                    let v = if r.gen_bool(0.01) { Layout::DEFAULT_HIGHEST * 3 } else { v };
                    let w = if huge < 4 && r.gen_bool(0.05) {
                        huge += 1;
                        u64::MAX / 5
                    } else {
                        r.gen_range(1..5)
                    };
                    h.record(v, w);
                }
                h.to_bytes()
            })
            .collect();
        let refs: Vec<&[u8]> = encodings.iter().map(Vec::as_slice).collect();
        let mut dense = Histogram::decode(refs[0]).expect("valid");
        for e in &refs[1..] {
            dense.merge_encoded(e).expect("valid");
        }
        assert_eq!(Histogram::merge_encodings(&refs), Some(dense.to_bytes()), "case {case}");
    }
    // Another layout, or an invalid operand: not merged as lists.
    let a = Histogram::new(Layout::default()).to_bytes();
    let b = Histogram::new(Layout::new(3, 1_000, Layout::DEFAULT_HIGHEST).expect("layout")).to_bytes();
    assert_eq!(Histogram::merge_encodings(&[&a, &b]), None);
    assert_eq!(Histogram::merge_encodings(&[&a, &[0xff, 1, 2]]), None);
    assert_eq!(Histogram::merge_encodings(&[]), None);
}

#[test]
fn weighted_recording_counts_weight_times() {
    let mut a = Histogram::new(Layout::default());
    let mut b = Histogram::new(Layout::default());
    a.record(5_000_000, 7);
    for _ in 0..7 {
        b.record(5_000_000, 1);
    }
    assert_eq!(a, b);
    a.record(1, 0);
    assert_eq!(a.count(), 7);
}

#[test]
fn clamps_values_above_range_and_counts_them() {
    let mut h = Histogram::new(Layout::default());
    h.record(Layout::DEFAULT_HIGHEST * 10, 3);
    assert_eq!(h.clamped(), 3);
    assert_eq!(h.max(), Some(Layout::DEFAULT_HIGHEST));
    assert_eq!(h.count(), 3);
}

#[test]
fn merge_equals_recording_everything_in_one() {
    let values = heavy_tailed(10_000);
    let (left, right) = values.split_at(4_000);
    let mut all = Histogram::new(Layout::default());
    let mut a = Histogram::new(Layout::default());
    let mut b = Histogram::new(Layout::default());
    for &v in &values {
        all.record(v, 1);
    }
    left.iter().for_each(|&v| a.record(v, 1));
    right.iter().for_each(|&v| b.record(v, 1));
    a.merge(&b);
    assert_eq!(a, all);
    let mut c = Histogram::new(Layout::default());
    c.merge_encoded(&Histogram::decode(&all.to_bytes()).expect("decode").to_bytes()).expect("merge encoded");
    assert_eq!(c, all);
}

#[test]
fn merge_across_layouts_keeps_counts_and_stays_close() {
    let coarse = Layout::new(1, 1_000, Layout::DEFAULT_HIGHEST).expect("layout");
    let mut a = Histogram::new(Layout::default());
    let mut b = Histogram::new(coarse);
    b.record(123_456_789, 10);
    a.merge_encoded(&b.to_bytes()).expect("merge");
    assert_eq!(a.count(), 10);
    assert_eq!(a.sum(), 1_234_567_890);
    let p50 = a.quantile(0.5).expect("non-empty") as f64;
    assert!((p50 - 123_456_789.0).abs() / 123_456_789.0 < 0.05);
}

#[test]
fn round_trips_through_the_encoding() {
    let mut h = Histogram::new(Layout::default());
    assert_eq!(Histogram::decode(&h.to_bytes()).expect("empty"), h);
    for v in heavy_tailed(1_000) {
        h.record(v, 3);
    }
    let bytes = h.to_bytes();
    assert_eq!(Histogram::decode(&bytes).expect("decode"), h);
    // A sparse encoding: far smaller than the dense counters.
    assert!(bytes.len() < 1_000, "{} bytes", bytes.len());
}

#[test]
fn reset_keeps_nothing_counted() {
    let mut h = Histogram::new(Layout::default());
    h.record(10_000, 1);
    h.reset();
    assert!(h.is_empty());
    assert_eq!(h, Histogram::decode(&Histogram::new(Layout::default()).to_bytes()).expect("empty"));
}

#[test]
fn memory_grows_only_with_the_buckets_used() {
    let mut h = Histogram::new(Layout::default());
    for v in [1_000_000u64, 10_000_000, 100_000_000] {
        h.record(v, 1);
    }
    assert!(h.heap_bytes() < 4 * 1024, "{} bytes", h.heap_bytes());
}

#[test]
fn rejects_hostile_encodings_with_a_reason() {
    let mut good = Histogram::new(Layout::default());
    good.record(5_000, 2);
    let bytes = good.to_bytes();

    assert!(matches!(Histogram::decode(&[]), Err(HistogramError::Truncated("version"))));
    assert!(matches!(Histogram::decode(&[9]), Err(HistogramError::UnknownVersion(9))));
    // A layout asking for an enormous counter array.
    let mut huge = vec![1];
    put_varint(&mut huge, 4);
    put_varint(&mut huge, 1);
    put_varint(&mut huge, 1 << 62);
    assert!(matches!(Histogram::decode(&huge), Err(HistogramError::InvalidLayout(_))));
    // Counts that do not add up to the total.
    let mut lying = bytes.clone();
    lying[4 + varint_len(Layout::DEFAULT_HIGHEST)] = 3; // total 2 -> 3
    let err = Histogram::decode(&lying).expect_err("inconsistent");
    assert!(err.to_string().contains("add up"), "{err}");
    // Trailing garbage.
    let mut trailing = bytes.clone();
    trailing.push(0);
    assert_eq!(Histogram::decode(&trailing), Err(HistogramError::TrailingBytes(1)));
    // Truncation anywhere is an error, never a panic.
    for cut in 0..bytes.len() {
        assert!(Histogram::decode(&bytes[..cut]).is_err(), "cut at {cut}");
    }
    // A failed merge adds nothing.
    let mut target = good.clone();
    assert!(target.merge_encoded(&lying).is_err());
    assert_eq!(target, good);
}

fn varint_len(v: u64) -> usize {
    let mut out = Vec::new();
    put_varint(&mut out, v);
    out.len()
}

#[test]
fn random_bytes_never_panic() {
    let mut r = rng();
    let mut good = Histogram::new(Layout::default());
    for v in heavy_tailed(100) {
        good.record(v, 1);
    }
    let base = good.to_bytes();
    for _ in 0..20_000 {
        let mut bytes = base.clone();
        for _ in 0..r.gen_range(1..4) {
            let i = r.gen_range(0..bytes.len());
            bytes[i] = r.gen();
        }
        if let Ok(h) = Histogram::decode(&bytes) {
            let _ = h.quantile(0.99);
        }
        let random: Vec<u8> = (0..r.gen_range(0..64)).map(|_| r.gen()).collect();
        let _ = Histogram::decode(&random);
    }
}

#[test]
fn subtract_undoes_merge_and_keeps_quantiles_within_precision() {
    let values = heavy_tailed(20_000);
    let (old, new) = values.split_at(10_000);
    let mut window = Histogram::new(Layout::default());
    let mut leaving = Histogram::new(Layout::default());
    let mut staying = Histogram::new(Layout::default());
    old.iter().for_each(|&v| leaving.record(v, 1));
    new.iter().for_each(|&v| staying.record(v, 1));
    window.merge(&leaving);
    window.merge(&staying);
    assert!(window.subtract(&leaving));
    assert_eq!(window.count(), staying.count());
    assert_eq!(window.sum(), staying.sum());
    assert!(window.iter_nonzero().eq(staying.iter_nonzero()));
    for q in [0.5, 0.99, 0.999] {
        let (a, b) = (window.quantile(q).expect("a") as f64, staying.quantile(q).expect("b") as f64);
        assert!((a - b).abs() <= b * window.layout().relative_error() * 2.0, "q={q}: {a} vs {b}");
    }
    assert!(window.subtract(&staying));
    assert!(window.is_empty());
    assert_eq!(window.quantile(0.5), None);
    let other = Histogram::new(Layout::new(3, 1_000, Layout::DEFAULT_HIGHEST).expect("layout"));
    assert!(!window.subtract(&other));
}

#[test]
fn checked_windows_add_and_subtract_like_histograms() {
    let values = heavy_tailed(30_000);
    let parts: Vec<Histogram> = values
        .chunks(10_000)
        .map(|c| {
            let mut h = Histogram::new(Layout::default());
            c.iter().for_each(|&v| h.record(v, 1));
            h
        })
        .collect();
    let bytes: Vec<Vec<u8>> = parts.iter().map(Histogram::to_bytes).collect();
    let checked: Vec<Checked> = bytes.iter().map(|b| Checked::new(b).expect("valid")).collect();
    assert_eq!((checked[0].count(), checked[0].len()), (10_000, bytes[0].len()));
    let (mut by_checked, mut by_merge) =
        (Histogram::new(Layout::default()), Histogram::new(Layout::default()));
    for ((c, b), h) in checked.iter().zip(&bytes).zip(&parts) {
        by_checked.add_checked(c, b);
        by_merge.merge(h);
    }
    assert_eq!(by_checked, by_merge);
    // Slide: drop the first part, the rest must equal their own merge (counts, sum, buckets).
    assert!(by_checked.subtract_checked(&checked[0], &bytes[0]));
    assert!(by_merge.subtract(&parts[0]));
    assert_eq!(by_checked.count(), 20_000);
    assert!(by_checked.iter_nonzero().eq(by_merge.iter_nonzero()));
    assert_eq!(by_checked.quantile(0.99), by_merge.quantile(0.99));
    assert!(by_checked.subtract_checked(&checked[1], &bytes[1]));
    assert!(by_checked.subtract_checked(&checked[2], &bytes[2]));
    assert!(by_checked.is_empty());
    // Another layout is refused, not mis-subtracted; hostile bytes are never checked.
    let mut other = Histogram::new(Layout::new(3, 1_000, Layout::DEFAULT_HIGHEST).expect("layout"));
    other.add_checked(&checked[0], &bytes[0]);
    assert_eq!(other.count(), 10_000);
    assert!(!other.subtract_checked(&checked[0], &bytes[0]));
    assert!(Checked::new(&[1, 2, 3]).is_err());
    // Bytes that are not the checked ones count garbage but never panic.
    let mut h = Histogram::new(Layout::default());
    h.add_checked(&checked[0], &[0xff; 64]);
    h.add_checked(&checked[0], &[]);
    h.subtract_checked(&checked[1], &[0xff; 64]);
    // A trusted header reads the same totals; a lying bucket list is not its problem, but
    // must not panic either.
    let trusted = Checked::trusted(&bytes[0]).expect("header");
    assert_eq!((trusted.count(), trusted.len()), (checked[0].count(), checked[0].len()));
    let mut lying = bytes[0].clone();
    let n = lying.len();
    lying[n - 2..].copy_from_slice(&[0xff, 0x7f]);
    assert!(Checked::new(&lying).is_err());
    let mut h = Histogram::new(Layout::default());
    h.add_checked(&Checked::trusted(&lying).expect("header"), &lying);
    assert!(Checked::trusted(&[1, 2]).is_err());
}

#[test]
fn fast_scans_agree_with_the_iterator() {
    let mut h = Histogram::new(Layout::default());
    heavy_tailed(5_000).iter().for_each(|&v| h.record(v, 1));
    let mut seen = 0u64;
    for (i, n) in h.iter_nonzero() {
        seen += n;
        let v = h.layout().highest_equivalent(i);
        assert_eq!(h.count_at_most(v), seen, "at index {i}");
    }
    assert_eq!(h.nonzero_count(), h.iter_nonzero().count());
}

#[test]
fn varints_round_trip_to_the_edge_of_64_bits() {
    for v in [0, 1, 127, 128, 300, 1 << 35, u64::MAX - 1, u64::MAX] {
        let mut out = Vec::new();
        put_varint(&mut out, v);
        assert_eq!(Reader { bytes: &out, pos: 0 }.varint("v"), Ok(v));
    }
    let mut over = Vec::new();
    put_varint_u128(&mut over, u128::from(u64::MAX) + 1);
    assert_eq!(Reader { bytes: &over, pos: 0 }.varint("v"), Err(HistogramError::BadVarint("v")));
    assert_eq!(Reader { bytes: &[0x80, 0x80], pos: 0 }.varint("v"), Err(HistogramError::Truncated("v")));
}

#[test]
fn a_recorder_encodes_what_a_histogram_of_the_same_values_encodes() {
    let mut r = rng();
    let layout = Layout::default();
    for case in 0..400 {
        // Below, at and past the point where a recorder turns dense.
        let n = match case % 4 {
            0 => r.gen_range(0..8),
            1 => r.gen_range(0..Recorder::SPARSE_VALUES),
            2 => Recorder::SPARSE_VALUES + r.gen_range(0..3),
            _ => r.gen_range(0..3 * Recorder::SPARSE_VALUES),
        };
        let mut dense = Histogram::new(layout);
        let mut sparse = Recorder::new(layout);
        // Few distinct values in some cases (equal buckets summed), any in the others, with
        // weights of 0, huge weights, and values past the highest (clamped).
        let few = case % 3 == 0;
        for _ in 0..n {
            let value = match r.gen_range(0..20) {
                0 => layout.highest() + r.gen_range(1..1000),
                1 => 0,
                _ if few => r.gen_range(0..5) * 1_000_000,
                _ => 10f64.powf(r.gen_range(0.0..10.0)) as u64,
            };
            let weight = match r.gen_range(0..10) {
                0 => 0,
                1 => u64::MAX / 4096,
                _ => r.gen_range(1..100),
            };
            dense.record(value, weight);
            sparse.record(value, weight);
        }
        if case % 10 == 9 {
            let mut other = Histogram::new(layout);
            other.record(r.gen_range(1..1_000_000_000), 3);
            dense.merge(&other);
            sparse.merge(&other);
        }
        // What it hands a visitor fills the same buckets again (how the sampler reads it).
        let mut replayed = Histogram::new(layout);
        sparse.for_each_value(|value, weight| replayed.record(value, weight));
        assert_eq!(replayed.count(), dense.count(), "case {case}");
        assert!(replayed.iter_nonzero().eq(dense.iter_nonzero()), "case {case}: buckets replayed");
        let bytes = sparse.to_bytes();
        assert_eq!(bytes, dense.to_bytes(), "case {case}: {n} values");
        assert_eq!(Histogram::decode(&bytes).expect("decodes"), dense, "case {case}");
    }
}
