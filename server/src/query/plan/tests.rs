use rand::{Rng, SeedableRng};

use super::*;

const LEVELS: [i64; 3] = [10, 60, 3600];

fn covered(levels: &[i64], pieces: &[Piece]) -> Vec<i64> {
    // Every 10 s window start a piece covers, expanding coarse windows into their 10 s parts.
    let mut out = Vec::new();
    for p in pieces {
        let len = levels[p.level];
        assert!(p.lo <= p.hi, "{p:?}");
        if p.lo < p.hi {
            assert_eq!(p.lo.rem_euclid(len), 0, "{p:?} not aligned");
            assert_eq!(p.hi.rem_euclid(len), 0, "{p:?} not aligned");
        }
        let mut w = p.lo;
        while w < p.hi {
            out.extend((0..len / levels[0]).map(|k| w + k * levels[0]));
            w += len;
        }
    }
    out.sort_unstable();
    out
}

fn expected(from: i64, to: i64) -> Vec<i64> {
    (from.div_euclid(10) - 1..=to.div_euclid(10) + 1)
        .map(|k| k * 10)
        .filter(|&w| w >= from && w < to)
        .collect()
}

#[test]
fn an_unaligned_five_minutes_is_read_as_edges_and_whole_minutes() {
    // 12:00:25 .. 12:05:25 with minutes and 10 s windows.
    let t0 = 1_800_000_000; // a whole hour
    let p = pieces(&LEVELS[..2], t0 + 25, t0 + 325);
    assert_eq!(
        p,
        vec![
            Piece { level: 1, lo: t0 + 60, hi: t0 + 300 },
            Piece { level: 0, lo: t0 + 30, hi: t0 + 60 },
            Piece { level: 0, lo: t0 + 300, hi: t0 + 330 },
        ]
    );
}

#[test]
fn pieces_cover_exactly_the_range_on_the_finest_grid() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for _ in 0..20_000 {
        let from = rng.gen_range(-100_000..100_000);
        let to = from + rng.gen_range(0..30_000);
        for k in 1..=3 {
            let levels = &LEVELS[..k];
            let p = pieces(levels, from, to);
            assert_eq!(p.len(), 2 * k - 1);
            assert_eq!(covered(levels, &p), expected(from, to), "[{from}, {to}) over {levels:?}: {p:?}");
        }
    }
}

#[test]
fn every_bound_moves_forward_with_the_step() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for _ in 0..500 {
        let range = rng.gen_range(1..20_000);
        let mut t = rng.gen_range(-50_000..50_000);
        let mut last = pieces(&LEVELS, t - range, t);
        for _ in 0..200 {
            t += rng.gen_range(0..400);
            let next = pieces(&LEVELS, t - range, t);
            for (a, b) in last.iter().zip(&next) {
                assert!(b.lo >= a.lo && b.hi >= a.hi, "range {range}, t {t}: {a:?} -> {b:?}");
            }
            last = next;
        }
    }
}

#[test]
fn sliders_sum_the_windows_of_their_piece() {
    let layout = Layout::default();
    let mut w = Windows::default();
    for start in (0..600).step_by(10) {
        let mut h = Histogram::new(layout);
        h.record(1_000 * (start as u64 + 1), 1);
        let bytes = h.to_bytes();
        w.push(start, Checked::new(&bytes).unwrap(), &bytes);
    }
    let mut s = Slider::new(layout);
    for (lo, hi) in [(0, 0), (0, 50), (20, 60), (20, 60), (200, 590), (580, 1000), (1000, 1000)] {
        s.advance(&w, lo, hi);
        let want = (0..600).step_by(10).filter(|&x| x >= lo && x < hi).count() as u64;
        assert_eq!(s.histogram().count(), want, "[{lo}, {hi})");
        assert_eq!(s.holds_windows(), want > 0);
    }
}
