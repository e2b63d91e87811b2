use super::*;

/// The choice as three separate lists make it (the slowest replaced in place, the first
/// failed, the reservoir's pick): what the set must keep, span for span.
#[derive(Default)]
struct Lists {
    slowest: Vec<Exemplar>,
    errors: Vec<Exemplar>,
    random: Option<Exemplar>,
    seen: u64,
}

impl Lists {
    fn offer(&mut self, e: Exemplar, error: bool, rng: &mut u64) {
        self.seen += 1;
        *rng ^= *rng >> 12;
        *rng ^= *rng << 25;
        *rng ^= *rng >> 27;
        if rng.wrapping_mul(0x2545_f491_4f6c_dd1d) % self.seen == 0 {
            self.random = Some(e);
        }
        if error && self.errors.len() < ERRORS {
            self.errors.push(e);
        }
        if self.slowest.len() < SLOWEST {
            self.slowest.push(e);
        } else if let Some(min) = self.slowest.iter_mut().min_by_key(|x| x.duration_nanos) {
            if e.duration_nanos > min.duration_nanos {
                *min = e;
            }
        }
    }

    fn kept(self) -> Vec<(u64, i64)> {
        let mut all: Vec<Exemplar> = self.slowest;
        all.extend(self.errors);
        all.extend(self.random);
        let mut ids: Vec<(u64, i64)> = all.iter().map(|e| (e.span_id, e.duration_nanos)).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

fn span(id: u64, duration: i64) -> Exemplar {
    Exemplar {
        series: 7,
        window_start: 1_700_000_000,
        trace_id_high: id.rotate_left(17),
        trace_id_low: !id,
        span_id: id,
        start_unix_nanos: 1_700_000_000_000_000_000 + id as i64,
        duration_nanos: duration,
        adjusted_count: 1.0 + (id % 3) as f64,
    }
}

fn next(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[test]
fn keeps_the_spans_three_lists_would_keep() {
    let mut seed = 11u64;
    for case in 0..2_000 {
        let n = 1 + next(&mut seed) % if case % 4 == 0 { 400 } else { 12 };
        let error_rate = next(&mut seed) % 4;
        let (mut set, mut lists) = (ExemplarSet::default(), Lists::default());
        let (mut rng_a, mut rng_b) = (case + 1, case + 1);
        for i in 0..n {
            // Distinct durations: which of two equally slow spans is replaced is a tie the
            // lists and the set may break differently.
            let duration = ((next(&mut seed) % 1_000_000) * 1_000 + i) as i64;
            let error = next(&mut seed) % 4 < error_rate;
            set.offer(&span(i, duration), error, &mut rng_a);
            lists.offer(span(i, duration), error, &mut rng_b);
            assert!(set.slots.iter().all(|s| s.roles != 0), "case {case}: an empty slot");
            assert!(set.slots.len() <= SLOWEST + ERRORS + 1, "case {case}: {} slots", set.slots.len());
        }
        assert_eq!(rng_a, rng_b, "one draw per offer");
        let mut out = vec![span(u64::MAX, 0)];
        set.into_exemplars(7, 1_700_000_000, &mut out);
        assert_eq!(out[0].span_id, u64::MAX, "what was in `out` stays");
        let got: Vec<(u64, i64)> = out[1..].iter().map(|e| (e.span_id, e.duration_nanos)).collect();
        let mut sorted = got.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, lists.kept(), "case {case}: {n} spans");
        for e in &out[1..] {
            assert_eq!(*e, span(e.span_id, e.duration_nanos), "case {case}: fields kept whole");
        }
    }
}

#[test]
fn a_window_with_one_span_holds_one_slot_and_repeated_ids_come_out_once() {
    let mut set = ExemplarSet::default();
    let mut rng = 1;
    set.offer(&span(1, 5), false, &mut rng);
    assert_eq!((set.slots.len(), set.slots.capacity()), (1, 1));
    // The same span again (a sender repeating its ids), failed this time.
    set.offer(&span(1, 5), true, &mut rng);
    let mut out = Vec::new();
    set.into_exemplars(7, 1_700_000_000, &mut out);
    assert_eq!(out, vec![span(1, 5)]);
}
