use super::*;
use rand::{Rng, SeedableRng};

#[test]
fn water_filling_keeps_small_keys_whole_and_meets_the_budget() {
    let rates = [1.0, 5.0, 50.0, 1_000.0, 10_000.0];
    let a = allocate(&rates, 1_000.0, 2.0);
    assert_eq!(&a[..3], &[1.0, 5.0, 50.0]);
    assert!((a[3] - 472.0).abs() < 1e-9 && (a[4] - 472.0).abs() < 1e-9, "{a:?}");
    assert!((a.iter().sum::<f64>() - 1_000.0).abs() < 1e-9);
    // Under the budget: everything is kept.
    assert_eq!(allocate(&rates, 1e6, 2.0), rates.to_vec());
    // Keys outnumber the budget: the floor shrinks so the total does not overshoot.
    let many = vec![10.0; 1_000];
    let a = allocate(&many, 100.0, 1.0);
    assert!((a.iter().sum::<f64>() - 100.0).abs() < 1e-6);
    assert!(a.iter().all(|&x| (x - 0.1).abs() < 1e-9));
    assert!(allocate(&[], 10.0, 1.0).is_empty());
}

/// Zipf throughputs over `n` keys summing to `total` spans/s.
fn zipf(n: usize, s: f64, total: f64) -> Vec<f64> {
    let weights: Vec<f64> = (1..=n).map(|k| 1.0 / (k as f64).powf(s)).collect();
    let sum: f64 = weights.iter().sum();
    weights.iter().map(|w| total * w / sum).collect()
}

/// Drives `sampler` one second: every key's spans arrive, full with its probability (drawn
/// per span, as consistent sampling by random trace ids does) or when slower than its p99 (the
/// slowest 1 %), folded otherwise. Returns the full spans received.
fn second(sampler: &Sampler, rates: &[f64], r: &mut rand::rngs::StdRng) -> f64 {
    let mut full_total = 0.0;
    for (k, &rate) in rates.iter().enumerate() {
        let key = k as u64 + 1;
        let n = rate.floor() as u64 + u64::from(r.gen_bool(rate.fract()));
        let p = sampler.keys.get(&key).map_or(1.0, |s| s.view.lock().probability);
        let s = sampler.state(key, "svc", &format!("op{k}")).expect("tracked");
        let slow = s.view.lock().always_keep_above_nanos;
        let mut recent = s.recent.lock();
        let mut full = 0;
        for _ in 0..n {
            // Durations uniform over 1..100 ms: the slowest 1 % are above the p99.
            let d: u64 = r.gen_range(1_000_000..100_000_000);
            recent.record(d, 1);
            if (slow > 0 && d >= slow as u64) || r.gen_bool(p) {
                full += 1;
            }
        }
        drop(recent);
        s.observed.fetch_add(n, Ordering::Relaxed);
        s.kept.fetch_add(full, Ordering::Relaxed);
        full_total += full as f64;
    }
    sampler.tick(1.0, false);
    full_total
}

#[test]
fn a_thousand_zipf_keys_converge_to_the_budget_and_keep_their_floor() {
    let budget = 5_000.0;
    let sampler = Sampler::new(SamplingConfig { budget, ..SamplingConfig::default() });
    let rates = zipf(1_000, 1.1, 200_000.0);
    let mut r = rand::rngs::StdRng::seed_from_u64(5);
    let mut received = Vec::new();
    for _ in 0..40 {
        received.push(second(&sampler, &rates, &mut r));
    }
    println!("full spans per second: {received:?}");
    // After a 10-second warm-up, every second stays within ±10 % of the budget.
    for (t, &got) in received.iter().enumerate().skip(10) {
        assert!(
            (got - budget).abs() <= budget * 0.1,
            "second {t}: {got} full spans for a budget of {budget}"
        );
    }
    // Every key keeps at least its floor (1 span/s, or all it has).
    for (k, &rate) in rates.iter().enumerate() {
        let v = *sampler.keys.get(&(k as u64 + 1)).expect("key").view.lock();
        let expected = v.probability * v.observed_per_second;
        assert!(expected >= rate.min(1.0) * 0.9, "key {k}: rate {rate}, probability {}", v.probability);
    }
    // The hottest key is sampled hardest.
    let p = |k: u64| sampler.keys.get(&k).expect("key").view.lock().probability;
    assert!(p(1) < p(100) && p(100) <= p(1_000), "{} {} {}", p(1), p(100), p(1_000));
}

#[test]
fn a_traffic_shift_converges_within_a_few_intervals() {
    let budget = 2_000.0;
    let sampler = Sampler::new(SamplingConfig { budget, ..SamplingConfig::default() });
    let mut rates = zipf(100, 1.0, 20_000.0);
    let mut r = rand::rngs::StdRng::seed_from_u64(6);
    for _ in 0..20 {
        second(&sampler, &rates, &mut r);
    }
    // A quiet key becomes ten times the hottest.
    rates[50] = 60_000.0;
    let mut settled_after = None;
    let mut after = Vec::new();
    for t in 1..=20 {
        let got = second(&sampler, &rates, &mut r);
        after.push(got);
        if (got - budget).abs() <= budget * 0.1 {
            settled_after.get_or_insert(t);
        } else {
            settled_after = None;
        }
    }
    println!("full spans per second after the shift: {after:?}");
    let t = settled_after.expect("converged and stayed");
    println!("converged {t} intervals after the shift");
    assert!(t <= 5, "{t}");
}

#[test]
fn overload_halves_the_budget_and_recovery_adds_it_back() {
    let sampler = Sampler::new(SamplingConfig { budget: 1_000.0, ..SamplingConfig::default() });
    for _ in 0..3 {
        sampler.tick(1.0, true);
    }
    assert_eq!(sampler.effective_budget(), 125.0);
    for _ in 0..5 {
        sampler.tick(1.0, false);
    }
    assert_eq!(sampler.effective_budget(), 625.0);
    for _ in 0..10 {
        sampler.tick(1.0, false);
    }
    assert_eq!(sampler.effective_budget(), 1_000.0);
    // Never below 1 % however long the overload.
    for _ in 0..100 {
        sampler.tick(1.0, true);
    }
    assert_eq!(sampler.effective_budget(), 10.0);
}

#[test]
fn overrides_fix_probabilities_and_p99_becomes_the_always_keep_rule() {
    let config = SamplingConfig {
        budget: 10.0,
        overrides: vec![SamplingOverride { service: "pay".into(), operation: None, probability: 1.0 }],
        ..SamplingConfig::default()
    };
    let sampler = Sampler::new(config);
    let durations: Vec<(i64, u64)> = (1..=2_000).map(|i| (i * 500_000, 1)).collect();
    sampler.observe_full(1, "pay", "POST /charge", durations.iter().copied());
    sampler.observe_full(2, "search", "GET /q", durations.iter().copied());
    sampler.tick(1.0, false);
    let policies = sampler.policies([1, 2, 3].into_iter());
    assert_eq!(policies.len(), 2);
    assert_eq!(policies[0].probability, 1.0);
    assert!(policies[1].probability < 0.02, "{}", policies[1].probability);
    let p99 = policies[1].always_keep_above_nanos as f64;
    // The recent histograms keep one significant digit: within 1/16 of the exact p99.
    assert!((p99 - 990e6).abs() <= 990e6 / 16.0, "{p99}");
    assert!(SamplingConfig { budget: 0.0, ..SamplingConfig::default() }.validate().is_err());
    assert!(SamplingConfig::default().validate().is_ok());
}

#[test]
fn fed_by_epochs_rates_are_taken_over_the_time_the_epochs_told_and_wait_for_them() {
    let sampler = Sampler::new(SamplingConfig { budget: 100.0, ..SamplingConfig::default() }).fed_by_epochs();
    let layout = Layout::new(3, 1_000, 3_600_000_000_000).unwrap();
    let mut durations = Recorder::new(layout);
    for i in 1..=2_000u64 {
        durations.record(i * 500_000, 1);
    }
    // 2,000 spans of one key in an epoch (1,500 in full, 500 folded), another key's 10 spans.
    sampler.track(1, "search", "GET /q");
    sampler.recorded(1, 1_500, 500, &durations);
    sampler.track(2, "search", "GET /");
    let mut few = Recorder::new(layout);
    few.record(1_000_000, 10);
    sampler.recorded(2, 10, 0, &few);
    // Ticks before the epoch has told its time: rates wait, probabilities stay at 1.
    sampler.tick(0.2, false);
    sampler.tick(0.2, false);
    assert_eq!(sampler.generation(), 0, "no recomputation without traffic told");
    assert!(sampler.policies([1, 2].into_iter()).iter().all(|p| p.probability == 1.0));
    // The epoch covered two seconds: 1,000 and 5 spans per second, whatever the ticks' own.
    sampler.covered(2.0);
    sampler.tick(0.2, false);
    let view = |key: u64| {
        let names = if key == 1 { "GET /q" } else { "GET /" };
        sampler.snapshot().into_iter().find(|(_, op, _)| op == names).unwrap().2
    };
    assert_eq!(view(1).observed_per_second, 1_000.0);
    assert_eq!(view(1).kept_per_second, 750.0);
    assert_eq!(view(2).observed_per_second, 5.0);
    let policies = sampler.policies([1, 2].into_iter());
    assert_eq!(policies[1].probability, 1.0, "a key under its fair share keeps everything");
    assert!(policies[0].probability < 0.1, "{}", policies[0].probability);
    // The p99 of the durations told (990 ms, one significant digit).
    let p99 = policies[0].always_keep_above_nanos as f64;
    assert!((p99 - 990e6).abs() <= 990e6 / 16.0, "{p99}");
    // A key told of without being tracked (past the cap of keys) is not counted.
    sampler.recorded(99, 5, 5, &few);
    assert!(sampler.policies([99].into_iter()).is_empty());
}

#[test]
fn a_gateway_spends_its_share_of_the_budget_and_moves_with_it() {
    let sampler = Sampler::new(SamplingConfig { budget: 1_000.0, ..SamplingConfig::default() });
    // Four live gateways: a quarter each, at once.
    sampler.set_share(0.25);
    sampler.tick(1.0, false);
    assert_eq!(sampler.effective_budget(), 250.0);
    // Overload halves the share's budget; recovery grows back to the share, not past it.
    sampler.tick(1.0, true);
    assert_eq!(sampler.effective_budget(), 125.0);
    for _ in 0..20 {
        sampler.tick(1.0, false);
    }
    assert_eq!(sampler.effective_budget(), 250.0);
    // Two gateways again: the budget grows to half, by a tenth of that half per tick.
    sampler.set_share(0.5);
    sampler.tick(1.0, false);
    assert_eq!(sampler.effective_budget(), 300.0);
    for _ in 0..4 {
        sampler.tick(1.0, false);
    }
    assert_eq!(sampler.effective_budget(), 500.0);
    // Nonsense counts as the whole budget.
    for share in [0.0, -1.0, f64::NAN, 3.0] {
        sampler.set_share(share);
        assert_eq!(sampler.share(), 1.0, "{share}");
    }
}
