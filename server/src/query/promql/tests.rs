use std::collections::BTreeMap;
use std::time::Duration;

use rand::{Rng, SeedableRng};

use super::*;
use crate::series::Status;
use crate::store::MemoryStore;
use tailscope_proto::histogram::Layout;

/// The shared in-memory store, recorded one span at a time.
type Mem = MemoryStore;

trait Span {
    fn span(&mut self, service: &str, operation: &str, status: Status, t: i64, nanos: u64);
}

impl Span for MemoryStore {
    fn span(&mut self, service: &str, operation: &str, status: Status, t: i64, nanos: u64) {
        let labels = SeriesLabels::new(service, operation, status);
        MemoryStore::record(self, labels, t, nanos, 1);
    }
}

const NOW: i64 = 1_800_000_000;

fn limits() -> Limits {
    Limits {
        max_series: 1000,
        max_points: 11_000,
        max_samples: 50_000_000,
        deadline: Instant::now() + Duration::from_secs(30),
    }
}

fn eval_at(mem: &Mem, q: &str, t: i64) -> Result<Value, EvalError> {
    let expr = promql_parser::parser::parse(q).map_err(EvalError::Unsupported)?;
    let steps = Steps::instant(t * 1000);
    let retention = RetentionConfig::default();
    let engine = Engine::new(mem, &steps, NOW, &retention, limits());
    let v = engine.eval(&expr)?;
    engine.materialized(v)
}

fn vector(mem: &Mem, q: &str) -> Vec<(Labels, f64)> {
    match eval_at(mem, q, NOW).unwrap_or_else(|e| panic!("{q}: {e}")) {
        Value::Vector(s) => s.into_iter().filter_map(|s| s.values[0].map(|v| (s.labels, v))).collect(),
        other => panic!("{q}: not a vector: {other:?}"),
    }
}

fn scalar(mem: &Mem, q: &str) -> f64 {
    match eval_at(mem, q, NOW).unwrap_or_else(|e| panic!("{q}: {e}")) {
        Value::Scalar(v) => v[0],
        other => panic!("{q}: not a scalar: {other:?}"),
    }
}

fn exact_quantile(values: &mut [u64], q: f64) -> f64 {
    values.sort_unstable();
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    values[rank - 1] as f64 / 1e9
}

fn close(got: f64, exact: f64) -> bool {
    (got - exact).abs() <= exact * Layout::default().relative_error() + 1e-9
}

/// Three services with different distributions over the five minutes before NOW.
fn traffic() -> (Mem, BTreeMap<&'static str, Vec<u64>>) {
    let mut r = rand::rngs::StdRng::seed_from_u64(5);
    let mut mem = Mem::default();
    let mut raw: BTreeMap<&'static str, Vec<u64>> = BTreeMap::new();
    for i in 0..30_000 {
        let t = NOW - 300 + (i % 300);
        let (service, v) = match i % 3 {
            0 => ("lognormal", {
                let z: f64 = (-2.0 * r.gen_range(1e-12f64..1.0).ln()).sqrt()
                    * (r.gen::<f64>() * std::f64::consts::TAU).cos();
                (20e6 * (0.7 * z).exp()) as u64
            }),
            1 => (
                "bimodal",
                if r.gen_bool(0.9) {
                    r.gen_range(5_000_000..6_000_000)
                } else {
                    r.gen_range(800_000_000..900_000_000)
                },
            ),
            _ => ("pareto", (10e6 / r.gen_range(1e-6f64..1.0).powf(1.0 / 1.1)) as u64),
        };
        let op = if i % 2 == 0 { "read" } else { "write" };
        mem.span(service, op, Status::Ok, t, v);
        raw.entry(service).or_default().push(v);
    }
    (mem, raw)
}

#[test]
fn grafana_save_and_test_gets_a_scalar() {
    let mem = Mem::default();
    assert_eq!(scalar(&mem, "1+1"), 2.0);
    assert_eq!(scalar(&mem, "(2 * 3) ^ 2 - 1 % 1"), 36.0);
    assert_eq!(scalar(&mem, "2 > bool 1"), 1.0);
    assert!(matches!(eval_at(&mem, "\"x\"", NOW), Ok(Value::Str(s)) if s == "x"));
}

#[test]
fn histogram_quantile_is_exact_per_series_and_summed() {
    let (mem, mut raw) = traffic();
    for (service, values) in raw.iter_mut() {
        for q in [0.5, 0.9, 0.99] {
            let exact = exact_quantile(values, q);
            let got = vector(
                &mem,
                &format!("histogram_quantile({q}, sum by (le, service) (rate(span_duration_seconds_bucket{{service=\"{service}\"}}[5m])))"),
            );
            assert_eq!(got.len(), 1);
            assert!(close(got[0].1, exact), "{service} q={q}: {} vs exact {exact}", got[0].1);
            assert_eq!(got[0].0.get("service").map(String::as_str), Some(*service));
        }
    }
    // As with native histograms, summing without `le` still merges histograms.
    let native =
        vector(&mem, "histogram_quantile(0.99, sum by (service) (rate(span_duration_seconds_bucket[5m])))");
    let classic = vector(
        &mem,
        "histogram_quantile(0.99, sum by (le, service) (rate(span_duration_seconds_bucket[5m])))",
    );
    assert_eq!(native, classic);
    // As numbers, such a sum keeps its classic meaning: the sum over all buckets.
    let over_le =
        vector(&mem, "sum by (service) (increase(span_duration_seconds_bucket{le=~\"1|\\\\+Inf\"}[5m]))");
    assert_eq!(over_le.len(), 3);
    for (labels, v) in &over_le {
        let values = &raw[labels["service"].as_str()];
        let expected = (values.iter().filter(|&&x| x <= 1_000_000_000).count() + values.len()) as f64;
        assert!((v - expected).abs() <= expected * 0.005, "{labels:?}: {v} vs {expected}");
    }
    // Not aggregated: one quantile per series (service × operation).
    let per_series = vector(&mem, "histogram_quantile(0.99, rate(span_duration_seconds_bucket[5m]))");
    assert_eq!(per_series.len(), 6);
    // Everything summed: the quantile of all values together.
    let mut all: Vec<u64> = raw.values().flatten().copied().collect();
    let got = vector(&mem, "histogram_quantile(0.99, sum by (le) (rate(span_duration_seconds_bucket[5m])))");
    assert!(close(got[0].1, exact_quantile(&mut all, 0.99)), "{got:?}");
}

#[test]
fn rates_counts_and_sums() {
    let (mem, raw) = traffic();
    let total: f64 = raw.values().map(|v| v.len() as f64).sum();
    let sum = vector(&mem, "sum(increase(span_duration_seconds_count[5m]))");
    assert_eq!(sum[0].1, total);
    let rate = vector(&mem, "sum(rate(span_duration_seconds_count[5m]))");
    assert!((rate[0].1 - total / 300.0).abs() < 1e-9);
    let seconds: f64 = raw.values().flatten().map(|&v| v as f64 / 1e9).sum();
    let s = vector(&mem, "sum(increase(span_duration_seconds_sum[5m]))");
    assert!((s[0].1 - seconds).abs() < 1e-6 * seconds);
    // Mean latency per service as a vector/vector division.
    let mean = vector(
        &mem,
        "sum by (service) (rate(span_duration_seconds_sum[5m])) / sum by (service) (rate(span_duration_seconds_count[5m]))",
    );
    assert_eq!(mean.len(), 3);
    for (labels, m) in mean {
        let v = &raw[labels["service"].as_str()];
        let exact = v.iter().map(|&x| x as f64 / 1e9).sum::<f64>() / v.len() as f64;
        assert!((m - exact).abs() < 1e-9 * exact.max(1.0), "{labels:?}: {m} vs {exact}");
    }
}

#[test]
fn le_matchers_count_requests_below_a_bound() {
    let (mem, raw) = traffic();
    let below = raw["bimodal"].iter().filter(|&&v| v <= 300_000_000).count() as f64;
    let got =
        vector(&mem, "sum(increase(span_duration_seconds_bucket{service=\"bimodal\", le=\"0.3\"}[5m]))");
    assert_eq!(got[0].1, below);
    let ladder = vector(&mem, "sum by (le) (increase(span_duration_seconds_bucket{service=\"pareto\"}[5m]))");
    assert_eq!(ladder.len(), DEFAULT_LE.len());
    let inf = ladder.iter().find(|(l, _)| l["le"] == "+Inf").map(|(_, v)| *v);
    assert_eq!(inf, Some(raw["pareto"].len() as f64));
    // Cumulative: counts never decrease with le.
    let mut by_le: Vec<(f64, f64)> =
        ladder.iter().map(|(l, v)| (l["le"].replace("+Inf", "inf").parse().unwrap_or(0.0), *v)).collect();
    by_le.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert!(by_le.windows(2).all(|w| w[0].1 <= w[1].1), "{by_le:?}");
    // The error ratio pattern: errors over all.
    let ratio = vector(&mem, "sum(rate(span_duration_seconds_count{status=\"error\"}[5m])) / sum(rate(span_duration_seconds_count[5m]))");
    assert!(ratio.is_empty(), "no errors recorded, so no error series: {ratio:?}");
}

#[test]
fn aggregations_topk_and_comparisons() {
    let (mem, raw) = traffic();
    let counts = vector(&mem, "count(increase(span_duration_seconds_count[5m]))");
    assert_eq!(counts[0].1, 6.0);
    let top = vector(
        &mem,
        "topk(2, histogram_quantile(0.99, sum by (le, service) (rate(span_duration_seconds_bucket[5m]))))",
    );
    assert_eq!(top.len(), 2);
    let names: Vec<&str> = top.iter().map(|(l, _)| l["service"].as_str()).collect();
    assert!(names.contains(&"pareto") && names.contains(&"bimodal"), "{names:?}");
    let slow = vector(
        &mem,
        "histogram_quantile(0.99, sum by (le, service) (rate(span_duration_seconds_bucket[5m]))) > 0.5",
    );
    assert_eq!(slow.len(), 2);
    let flags = vector(&mem, "histogram_quantile(0.5, sum by (le, service) (rate(span_duration_seconds_bucket[5m]))) > bool 0.0195");
    assert_eq!(flags.len(), 3);
    assert_eq!(flags.iter().filter(|(_, v)| *v == 1.0).count(), 1, "{flags:?}");
    let by_op = vector(&mem, "max without (operation) (increase(span_duration_seconds_count[5m]))");
    assert_eq!(by_op.len(), 3);
    // One-to-one matching on a subset of labels: each operation's share of its service.
    let share = vector(
        &mem,
        "sum by (service) (increase(span_duration_seconds_count{operation=\"read\"}[5m])) / on (service) sum by (service) (increase(span_duration_seconds_count[5m]))",
    );
    assert_eq!(share.len(), 3);
    for (labels, v) in share {
        assert_eq!(labels.keys().collect::<Vec<_>>(), vec!["service"]);
        let n = raw[labels["service"].as_str()].len() as f64;
        assert!((v - (n / 2.0).ceil() / n).abs() < 0.01, "{labels:?}: {v}");
    }
}

#[test]
fn range_evaluation_slides_to_the_same_answers_as_instant_queries() {
    let (mem, _) = traffic();
    let q = "histogram_quantile(0.9, sum by (le, service) (rate(span_duration_seconds_bucket[1m])))";
    let expr = promql_parser::parser::parse(q).expect("parses");
    let steps = Steps::range((NOW - 290) * 1000, NOW * 1000, 10_000, 11_000).expect("steps");
    let retention = RetentionConfig::default();
    let engine = Engine::new(&mem, &steps, NOW, &retention, limits());
    let Value::Vector(series) = engine.eval(&expr).expect("eval") else { panic!("vector") };
    assert_eq!(series.len(), 3);
    for s in &series {
        for (i, &t) in steps.times().iter().enumerate() {
            let instant = match eval_at(&mem, q, t / 1000).expect("instant") {
                Value::Vector(v) => v.into_iter().find(|x| x.labels == s.labels).and_then(|x| x.values[0]),
                _ => None,
            };
            match (s.values[i], instant) {
                (Some(a), Some(b)) => assert!(close(a, b), "step {i}: {a} vs {b}"),
                (a, b) => assert_eq!(a.is_some(), b.is_some(), "step {i}: {a:?} vs {b:?}"),
            }
        }
    }
}

#[test]
fn set_operators_match_many_to_many_per_step() {
    let (mem, _) = traffic();
    let names = |q: &str| -> Vec<String> {
        vector(&mem, q).into_iter().map(|(l, _)| format!("{}/{}", l["service"], l["operation"])).collect()
    };
    let count = "sum by (service, operation) (rate(span_duration_seconds_count[5m]))";
    // Only the bimodal service has fewer than 16 requests per second under 500 ms.
    let slow = "sum by (service, operation) (rate(span_duration_seconds_bucket{le=\"0.5\"}[5m])) < 16";
    assert_eq!(names(slow), ["bimodal/read", "bimodal/write"]);
    assert_eq!(names(&format!("{count} and {slow}")), names(slow));
    assert_eq!(names(&format!("{count} and on (service) ({slow})")), names(slow));
    assert_eq!(names(&format!("{count} and on (operation) ({slow})")).len(), 6);
    let unless = names(&format!("{count} unless {slow}"));
    assert!(unless.iter().all(|n| !names(slow).contains(n)) && !unless.is_empty());
    assert_eq!(names(&format!("({slow}) or {count}")).len(), names(count).len());
    // The left side's values are kept.
    let and = vector(&mem, &format!("{count} and {slow}"));
    let plain: BTreeMap<_, _> = vector(&mem, count).into_iter().collect();
    assert!(and.iter().all(|(l, v)| plain[l] == *v));
}

#[test]
fn a_step_within_a_second_sees_the_window_that_began_in_that_second() {
    let mut mem = Mem::default();
    mem.span("svc", "op", Status::Ok, NOW, 1_000_000);
    let expr = promql_parser::parser::parse("sum(increase(span_duration_seconds_count[1m]))").unwrap();
    let retention = RetentionConfig::default();
    let at = |ms: i64| {
        let steps = Steps::instant(ms);
        let engine = Engine::new(&mem, &steps, NOW, &retention, limits());
        match engine.eval(&expr).and_then(|v| engine.materialized(v)).unwrap() {
            Value::Vector(v) => v.first().and_then(|s| s.values[0]),
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(at(NOW * 1000 - 1), None, "before the window began");
    assert_eq!(at(NOW * 1000 + 420), Some(1.0));
    assert_eq!(at(NOW * 1000 + 1000), Some(1.0));
}

#[test]
fn unsupported_constructs_are_named() {
    let (mem, _) = traffic();
    for (q, needle) in [
        ("abs(rate(span_duration_seconds_count[5m]))", "function abs()"),
        ("rate(span_duration_seconds_count[5m])[10m:1m]", "subqueries"),
        ("rate(span_duration_seconds_count[5m] @ 100)", "@ modifier"),
        ("rate(span_duration_seconds_count[5m]) and 1", "not allowed in binary scalar expression"),
        ("stddev(rate(span_duration_seconds_count[5m]))", "aggregation stddev()"),
        ("span_duration_seconds_count", "use rate() or increase()"),
        ("histogram_quantile(0.9, rate(span_duration_seconds_count[5m]))", "histogram_quantile()"),
        ("1 > 2", "BOOL modifier"),
        ("rate(span_duration_seconds_count{service=\"pareto\"}[5m]) / on (service) group_left rate(span_duration_seconds_count[5m])", "group_left"),
    ] {
        match eval_at(&mem, q, NOW) {
            Err(EvalError::Unsupported(m)) => assert!(m.contains(needle), "{q}: {m:?} lacks {needle:?}"),
            other => panic!("{q}: expected an unsupported error, got {other:?}"),
        }
    }
    // Unknown metrics select nothing, like in Prometheus.
    assert!(vector(&mem, "rate(http_requests_total[5m])").is_empty());
}

#[test]
fn limits_are_enforced_with_clear_errors() {
    let (mem, _) = traffic();
    let expr = promql_parser::parser::parse("rate(span_duration_seconds_count[5m])").expect("parses");
    let steps = Steps::instant(NOW * 1000);
    let retention = RetentionConfig::default();
    let tight = Limits { max_series: 2, ..limits() };
    let e = Engine::new(&mem, &steps, NOW, &retention, tight).eval(&expr).expect_err("too many series");
    assert!(
        matches!(e, EvalError::Execution(ref m) if m.contains("more than 2 series (query.max_series)")),
        "{e}"
    );
    let late = Limits { deadline: Instant::now() - Duration::from_secs(1), ..limits() };
    let e = Engine::new(&mem, &steps, NOW, &retention, late).eval(&expr).expect_err("timeout");
    assert!(matches!(e, EvalError::Timeout(_)), "{e}");
    let e = Steps::range(0, 20_000_000, 1000, 11_000).expect_err("too many points");
    assert!(e.to_string().contains("11,000 points"), "{e}");
}

#[test]
fn random_queries_never_panic() {
    let (mem, _) = traffic();
    let atoms = [
        "rate(span_duration_seconds_bucket[5m])",
        "increase(span_duration_seconds_count{service=~\"p.*\"}[1m])",
        "rate(span_duration_seconds_sum[30s] offset 1m)",
        "rate({__name__=~\"span_duration_seconds_.*\"}[5m])",
        "1",
        "-0.5",
        "NaN",
        "Inf",
        "span_duration_seconds_count",
        "\"s\"",
        "up",
    ];
    let wraps = [
        "sum by (le) ({})",
        "sum without (operation) ({})",
        "histogram_quantile(0.99, {})",
        "histogram_quantile(-1, {})",
        "topk(1, {})",
        "bottomk(2, {})",
        "avg({})",
        "min by (service) ({})",
        "count({})",
        "-({})",
        "({}) * 2",
        "({}) / ({})",
        "({}) > bool 0.1",
        "({}) < 3",
        "({}) + on (service) ({})",
        "({}) - ignoring (le) ({})",
    ];
    let mut r = rand::rngs::StdRng::seed_from_u64(11);
    for _ in 0..2_000 {
        let mut q = atoms[r.gen_range(0..atoms.len())].to_string();
        for _ in 0..r.gen_range(0..4) {
            let w = wraps[r.gen_range(0..wraps.len())];
            q = w.replace("{}", &q);
        }
        if r.gen_bool(0.2) {
            // Break it at a random place.
            let cut = r.gen_range(0..=q.len());
            q.truncate(cut);
            while !q.is_char_boundary(q.len()) {
                q.pop();
            }
        }
        let _ = eval_at(&mem, &q, NOW);
    }
}

/// Found by `cargo fuzz run promql`: promql-parser panics converting a huge duration literal;
/// `promql::parse` turns that into a parse error.
#[test]
fn a_duration_too_large_for_the_parser_is_an_error_not_a_panic() {
    let e = parse("span_duration_seconds_count[444444444444444444444444444444444444444444444490]")
        .expect_err("refused");
    assert!(e.contains("the PromQL parser failed"), "{e}");
    for d in ["444444444444444444444444444444444444444s", "99999999999999999999y", "1e400s"] {
        let _ = parse_duration(d);
    }
    assert_eq!(parse_duration("1m30s").expect("parses"), std::time::Duration::from_secs(90));
}

/// Spans every 7 s over three hours before NOW, with durations that change every window, so
/// reading one window too many or too few changes both count and quantiles.
fn three_hours() -> (Mem, Vec<(i64, u64)>) {
    let mut mem = Mem::default();
    let mut spans = Vec::new();
    let mut t = NOW - 3 * 3600;
    let mut i: u64 = 0;
    while t < NOW {
        let nanos = 1_000_000 + (i * 7_919 % 997) * 1_000_000;
        mem.span("api", "get", Status::Ok, t, nanos);
        spans.push((t, nanos));
        t += 7;
        i += 1;
    }
    (mem, spans)
}

/// The spans of the 10 s windows that start in `[t - range, t)`, t rounded up to a second.
fn in_window(spans: &[(i64, u64)], t_ms: i64, range: i64) -> Vec<u64> {
    let t = (t_ms + 999).div_euclid(1000);
    spans
        .iter()
        .filter(|(s, _)| (s - s.rem_euclid(10)) >= t - range && (s - s.rem_euclid(10)) < t)
        .map(|s| s.1)
        .collect()
}

#[test]
fn instant_queries_at_unaligned_times_read_exactly_the_asked_window() {
    let (mem, spans) = three_hours();
    let retention = RetentionConfig::default();
    for (range, label) in [(300, "5m"), (600, "10m"), (3600, "1h"), (5400, "90m")] {
        for t_ms in [
            (NOW - 30) * 1000,
            (NOW - 1) * 1000 + 420,
            (NOW - 3600 - 17) * 1000,
            (NOW - 600) * 1000 - 1,
            (NOW - 5) * 1000,
            NOW * 1000,
        ] {
            let mut exact = in_window(&spans, t_ms, range);
            let steps = Steps::instant(t_ms);
            let engine = Engine::new(&mem, &steps, NOW, &retention, limits());
            let eval = |q: &str| -> f64 {
                let expr = promql_parser::parser::parse(q).expect("parses");
                match engine.materialized(engine.eval(&expr).expect("eval")).expect("materialized") {
                    Value::Vector(v) => v[0].values[0].expect("a value"),
                    other => panic!("{q}: {other:?}"),
                }
            };
            let count = eval(&format!("sum(increase(span_duration_seconds_count[{label}]))"));
            assert_eq!(count, exact.len() as f64, "count over {label} at {t_ms}");
            for q in [0.5, 0.99] {
                let got = eval(&format!(
                    "histogram_quantile({q}, sum by (le) (rate(span_duration_seconds_bucket[{label}])))"
                ));
                let want = exact_quantile(&mut exact, q);
                assert!(close(got, want), "p{q} over {label} at {t_ms}: {got} vs exact {want}");
            }
        }
    }
}

#[test]
fn range_queries_at_unaligned_steps_read_exactly_each_steps_window() {
    let (mem, spans) = three_hours();
    let retention = RetentionConfig::default();
    // Steps of 60 s and 5 m starting 23.5 s past a minute, ranges from 5 m to 1 h.
    for (step, range, label) in [(60_000, 300, "5m"), (300_000, 3600, "1h"), (60_000, 1800, "30m")] {
        let start = (NOW - 7200) * 1000 + 23_500;
        let steps = Steps::range(start, NOW * 1000, step, 11_000).expect("steps");
        let engine = Engine::new(&mem, &steps, NOW, &retention, limits());
        let q = format!("sum(increase(span_duration_seconds_count[{label}]))");
        let expr = promql_parser::parser::parse(&q).expect("parses");
        let Value::Vector(v) = engine.eval(&expr).and_then(|v| engine.materialized(v)).expect("eval") else {
            panic!("vector")
        };
        let q99 =
            format!("histogram_quantile(0.99, sum by (le) (rate(span_duration_seconds_bucket[{label}])))");
        let expr = promql_parser::parser::parse(&q99).expect("parses");
        let Value::Vector(p99) =
            engine.materialized(engine.eval(&expr).expect("eval")).expect("materialized")
        else {
            panic!("vector")
        };
        for (i, &t) in steps.times().iter().enumerate() {
            let mut exact = in_window(&spans, t, range);
            assert_eq!(v[0].values[i], Some(exact.len() as f64), "{q} at step {i} ({t})");
            let want = exact_quantile(&mut exact, 0.99);
            let got = p99[0].values[i].expect("p99");
            assert!(close(got, want), "{q99} at step {i}: {got} vs {want}");
        }
    }
}

/// Nested expressions of random shapes up to far beyond the depth limit: each is refused naming
/// `query.max_depth` or parsed and evaluated — on a thread with the 2 MiB stack of the server's
/// runtime threads, so an accepted expression that could overflow a stack fails the test
/// instead of hiding behind the test harness's bigger stack.
#[test]
fn nested_queries_are_refused_or_evaluated_within_a_small_stack() {
    let handle = std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(|| {
            let (mem, _) = traffic();
            let wraps = [
                "sum({})",
                "({})",
                "-{}",
                "{} + 1",
                "1 * {}",
                "histogram_quantile(0.9, {})",
                "rate(span_duration_seconds_bucket[5m]) and {}",
                "max by (service) ({})",
            ];
            let mut r = rand::rngs::StdRng::seed_from_u64(23);
            let (mut refused, mut evaluated) = (0, 0);
            for _ in 0..200 {
                let mut q = "rate(span_duration_seconds_count[1m])".to_string();
                for _ in 0..r.gen_range(0..600) {
                    q = wraps[r.gen_range(0..wraps.len())].replace("{}", &q);
                }
                match parse(&q) {
                    Err(e) => {
                        assert!(e.contains("query.max_depth"), "{e}");
                        refused += 1;
                    }
                    Ok(expr) => {
                        let steps = Steps::instant(NOW * 1000);
                        let retention = RetentionConfig::default();
                        let engine = Engine::new(&mem, &steps, NOW, &retention, limits());
                        if let Ok(v) = engine.eval(&expr) {
                            let _ = engine.materialized(v);
                        }
                        evaluated += 1;
                    }
                }
            }
            assert!(refused > 0 && evaluated > 0, "{refused} refused, {evaluated} evaluated");
        })
        .expect("thread");
    handle.join().expect("no panic, no overflow");
}

fn native(mem: &Mem, q: &str, t: i64) -> Vec<NativeSeries> {
    match eval_at(mem, q, t).unwrap_or_else(|e| panic!("{q}: {e}")) {
        Value::Native(s) => s,
        other => panic!("{q}: not native histograms: {other:?}"),
    }
}

#[test]
fn native_histograms_are_read_by_name_and_by_the_histogram_functions() {
    let (mem, raw) = traffic();
    let all: Vec<u64> = raw.values().flatten().copied().collect();
    let total = all.len() as f64;
    // rate() of the native histogram: one histogram per series, its buckets summing to its count.
    let rates = native(&mem, "rate(span_duration_seconds[5m])", NOW);
    let classic_series = vector(&mem, "rate(span_duration_seconds_count[5m])");
    assert_eq!(rates.len(), classic_series.len());
    for s in &rates {
        let h = s.values[0].as_ref().expect("a sample");
        let in_buckets: f64 = h.buckets.iter().map(|b| b.2).sum();
        assert!((in_buckets - h.count).abs() < 1e-9 * h.count.max(1.0));
        assert!(h.buckets.windows(2).all(|w| w[0].1 < w[1].0), "ascending, disjoint");
        assert!(!s.labels.contains_key("__name__"));
    }
    let summed = native(&mem, "sum(increase(span_duration_seconds[5m]))", NOW);
    assert_eq!(summed.len(), 1);
    assert_eq!(summed[0].values[0].as_ref().map(|h| h.count), Some(total));
    // The functions, against the classic series and the raw spans.
    let count = vector(&mem, "sum(histogram_count(increase(span_duration_seconds[5m])))");
    assert_eq!(count[0].1, total);
    let classic = vector(&mem, "sum(increase(span_duration_seconds_count[5m]))");
    assert_eq!(count[0].1, classic[0].1);
    let sum = vector(&mem, "histogram_sum(sum(increase(span_duration_seconds[5m])))")[0].1;
    let exact_sum = all.iter().sum::<u64>() as f64 / 1e9;
    assert!((sum - exact_sum).abs() <= exact_sum * 0.01, "{sum} vs {exact_sum}");
    let avg = vector(&mem, "histogram_avg(sum(increase(span_duration_seconds[5m])))")[0].1;
    assert!((avg - exact_sum / total).abs() <= avg * 0.01);
    // An SLI: the share of spans at most 30 ms, exact to the bucket precision.
    let fraction = vector(&mem, "histogram_fraction(0, 0.03, sum(rate(span_duration_seconds[5m])))")[0].1;
    let exact = all.iter().filter(|&&v| v <= 30_000_000).count() as f64 / total;
    assert!((fraction - exact).abs() <= 0.01, "{fraction} vs {exact}");
    let mut values = all.clone();
    let p99 = vector(&mem, "histogram_quantile(0.99, sum(rate(span_duration_seconds[5m])))")[0].1;
    assert!(close(p99, exact_quantile(&mut values, 0.99)), "{p99}");
    // The classic bucket rates are histograms too.
    let from_buckets = vector(&mem, "sum(histogram_count(increase(span_duration_seconds_bucket[5m])))");
    assert_eq!(from_buckets[0].1, total);
}

#[test]
fn a_plain_native_selector_is_a_cumulative_counter() {
    let (mem, raw) = traffic();
    let total: usize = raw.values().map(Vec::len).sum();
    let at = |t: i64| -> f64 {
        native(&mem, "span_duration_seconds", t)
            .iter()
            .map(|s| s.values[0].as_ref().map_or(0.0, |h| h.count))
            .sum()
    };
    // Everything before t: nothing before the traffic, all of it after, monotone between.
    assert_eq!(at(NOW - 400), 0.0);
    let (a, b, c) = (at(NOW - 200), at(NOW - 100), at(NOW + 60));
    assert!(0.0 < a && a < b && b < c, "{a} {b} {c}");
    assert_eq!(c, total as f64);
    let labelled = native(&mem, r#"span_duration_seconds{service="lognormal"}"#, NOW + 60);
    assert!(labelled
        .iter()
        .all(|s| s.labels.get("__name__").map(String::as_str) == Some("span_duration_seconds")));
    let count: f64 = labelled.iter().map(|s| s.values[0].as_ref().map_or(0.0, |h| h.count)).sum();
    assert_eq!(count, raw["lognormal"].len() as f64);
}

#[test]
fn native_histograms_are_never_numbers_and_never_selected_unnamed() {
    let (mem, _) = traffic();
    for q in [
        "rate(span_duration_seconds[5m]) * 2",
        "max(rate(span_duration_seconds[5m]))",
        "-span_duration_seconds",
    ] {
        let err = eval_at(&mem, q, NOW).expect_err(q).to_string();
        assert!(err.contains("native histogram"), "{q}: {err}");
    }
    // A selector that does not name it keeps its float series only.
    let unnamed =
        vector(&mem, r#"sum(rate({service="lognormal", __name__=~"span_duration_seconds(_count)?"}[5m]))"#);
    let count = vector(&mem, r#"sum(rate(span_duration_seconds_count{service="lognormal"}[5m]))"#);
    assert_eq!(unnamed, count);
    let err = eval_at(&mem, "histogram_count(rate(span_duration_seconds_count[5m]))", NOW)
        .expect_err("not a histogram");
    assert!(err.to_string().contains("histogram_count() reads histograms"), "{err}");
}

/// frontend → checkout → payments, checkout → db:postgres, over the five minutes before NOW,
/// seen from both sides where both are instrumented; and series that are no edge.
fn service_graph() -> Mem {
    use crate::series::Kind;
    let mut mem = Mem::default();
    let mut record = |service: &str, kind: Kind, peer: &str, status: Status, t: i64, nanos: u64| {
        let labels = SeriesLabels { kind, peer: peer.into(), ..SeriesLabels::new(service, "call", status) };
        mem.record(labels, t, nanos, 1);
    };
    for i in 0..100 {
        let t = NOW - 300 + 3 * i;
        record("frontend", Kind::Client, "checkout", Status::Ok, t, 10_000_000);
        record("checkout", Kind::Server, "frontend", Status::Ok, t, 8_000_000);
        record("checkout", Kind::Unspecified, "", Status::Ok, t, 1_000_000);
        record("checkout", Kind::Client, "", Status::Ok, t, 1_000_000);
        if i < 50 {
            let status = if i < 5 { Status::Error } else { Status::Ok };
            record("checkout", Kind::Client, "payments", status, t, 2_100_000_000);
            record("payments", Kind::Server, "checkout", status, t, 2_000_000_000);
        }
        if i < 20 {
            record("checkout", Kind::Client, "db:postgres", Status::Ok, t, 3_000_000);
        }
    }
    mem
}

fn edge_values(mem: &Mem, q: &str) -> BTreeMap<(String, String), f64> {
    vector(mem, q)
        .into_iter()
        .map(|(l, v)| {
            ((l.get("client").cloned().unwrap_or_default(), l.get("server").cloned().unwrap_or_default()), v)
        })
        .collect()
}

#[test]
fn the_service_graph_reads_as_tempos_metrics() {
    let mem = service_graph();
    let edge = |c: &str, s: &str| (c.to_owned(), s.to_owned());
    let calls =
        edge_values(&mem, "sum by (client, server) (increase(traces_service_graph_request_total[5m]))");
    assert_eq!(
        calls,
        BTreeMap::from([
            (edge("checkout", "db:postgres"), 20.0),
            (edge("checkout", "payments"), 50.0),
            (edge("frontend", "checkout"), 100.0),
        ])
    );
    let failed = edge_values(
        &mem,
        "sum by (client, server) (increase(traces_service_graph_request_failed_total[5m]))",
    );
    assert_eq!(failed, BTreeMap::from([(edge("checkout", "payments"), 5.0)]));
    // The callee's view: only edges whose server side is instrumented.
    let served = edge_values(
        &mem,
        "sum by (client, server) (increase(traces_service_graph_request_server_seconds_count[5m]))",
    );
    assert_eq!(
        served,
        BTreeMap::from([(edge("checkout", "payments"), 50.0), (edge("frontend", "checkout"), 100.0)])
    );
    let p90 = edge_values(
        &mem,
        "histogram_quantile(0.9, sum(rate(traces_service_graph_request_server_seconds_bucket{server=\"payments\"}[5m])) by (le, client, server))",
    );
    assert!(close(p90[&edge("checkout", "payments")], 2.0), "{p90:?}");
    let waited = edge_values(&mem, "histogram_quantile(0.5, sum by (le, client, server) (rate(traces_service_graph_request_client_seconds_bucket[5m])))");
    assert!(close(waited[&edge("checkout", "payments")], 2.1), "{waited:?}");
    assert!(close(waited[&edge("frontend", "checkout")], 0.010), "{waited:?}");
    let sum = edge_values(&mem, "sum by (client, server) (increase(traces_service_graph_request_client_seconds_sum{client=\"frontend\"}[5m]))");
    assert!((sum[&edge("frontend", "checkout")] - 1.0).abs() < 1e-9, "{sum:?}");

    // A plain selector reads as a counter and keeps its name; connection_type marks the
    // database edge.
    let plain = vector(&mem, "traces_service_graph_request_total{client=\"checkout\"}");
    assert_eq!(plain.len(), 2, "{plain:?}");
    for (labels, v) in &plain {
        assert_eq!(labels.get("__name__").map(String::as_str), Some("traces_service_graph_request_total"));
        let db = labels.get("server").map(String::as_str) == Some("db:postgres");
        assert_eq!(labels.get("connection_type").map(String::as_str), db.then_some("database"), "{labels:?}");
        assert_eq!(*v, if db { 20.0 } else { 50.0 });
    }
    assert!(vector(
        &mem,
        "traces_service_graph_request_total{connection_type=\"database\", server=\"payments\"}"
    )
    .is_empty());

    // What Grafana's Tempo data source sends for its service map, for a one-hour range.
    for metric in [
        "traces_service_graph_request_server_seconds_sum",
        "traces_service_graph_request_total",
        "traces_service_graph_request_failed_total",
        "traces_service_graph_request_server_seconds_bucket",
    ] {
        let rates = vector(&mem, &format!("sum by (client, server) (rate({metric}[3600s]))"));
        assert!(!rates.is_empty(), "{metric}");
        let groups = vector(&mem, &format!("group by (client, connection_type, server) ({metric})"));
        assert!(!groups.is_empty() && groups.iter().all(|(_, v)| *v == 1.0), "{metric}: {groups:?}");
    }
    let joined = vector(
        &mem,
        "sum by (client, server) (rate(traces_service_graph_request_server_seconds_sum[3600s])) OR \
         sum by (client, server) (rate(traces_service_graph_request_total[3600s])) OR \
         sum by (client, server) (rate(traces_service_graph_request_failed_total[3600s]))",
    );
    assert_eq!(joined.len(), 3, "{joined:?}");
    let groups = vector(
        &mem,
        "group by (client, connection_type, server) (traces_service_graph_request_total) OR \
         group by (client, connection_type, server) (traces_service_graph_request_server_seconds_sum)",
    );
    assert_eq!(groups.len(), 3, "{groups:?}");
    // No series of the span histogram leaks into the graph, and the graph's names stay out
    // of span_duration_seconds.
    assert!(vector(&mem, "traces_service_graph_request_total{client=\"checkout\", server=\"\"}").is_empty());
    assert_eq!(
        vector(&mem, "sum(increase(span_duration_seconds_count{service=\"checkout\"}[5m]))")[0].1,
        200.0
    );
}

#[test]
fn label_replace_and_label_join_relabel_series_and_histograms() {
    let mem = service_graph();
    let get = |l: &Labels, k: &str| l.get(k).cloned().unwrap_or_default();
    // What the overview dashboard's Node Graph panel asks: one row per edge, with an id, a
    // source and a target.
    let edges = vector(
        &mem,
        "label_replace(label_replace(label_join(sum by (client, server) \
         (increase(traces_service_graph_request_total[5m])), \"id\", \"->\", \"client\", \"server\"), \
         \"source\", \"$1\", \"client\", \"(.*)\"), \"target\", \"$1\", \"server\", \"(.*)\")",
    );
    let rows: Vec<(String, String, String, f64)> =
        edges.iter().map(|(l, v)| (get(l, "id"), get(l, "source"), get(l, "target"), *v)).collect();
    assert_eq!(
        rows,
        vec![
            ("checkout->db:postgres".into(), "checkout".into(), "db:postgres".into(), 20.0),
            ("checkout->payments".into(), "checkout".into(), "payments".into(), 50.0),
            ("frontend->checkout".into(), "frontend".into(), "checkout".into(), 100.0),
        ]
    );
    // Capture groups, names and a regex that does not match (the series is unchanged); an
    // empty result removes the label.
    let kinds = vector(
        &mem,
        "label_replace(sum by (server) (increase(traces_service_graph_request_total[5m])), \"system\", \"${kind}\", \"server\", \"(?P<kind>[a-z]+):.*\")",
    );
    let systems: Vec<(String, String)> =
        kinds.iter().map(|(l, _)| (get(l, "server"), get(l, "system"))).collect();
    assert_eq!(
        systems,
        vec![
            ("checkout".into(), "".into()),
            ("db:postgres".into(), "db".into()),
            ("payments".into(), "".into())
        ]
    );
    let dropped = vector(
        &mem,
        "label_replace(sum by (client) (increase(traces_service_graph_request_total{client=\"frontend\"}[5m])), \"client\", \"\", \"client\", \".*\")",
    );
    assert_eq!(dropped, vec![(Labels::new(), 100.0)]);
    // Histograms stay histograms: a quantile reads through the relabelling.
    let p50 = vector(
        &mem,
        "histogram_quantile(0.5, label_replace(sum by (le, server) (rate(traces_service_graph_request_client_seconds_bucket[5m])), \"callee\", \"$1\", \"server\", \"(.*)\"))",
    );
    let payments = p50.iter().find(|(l, _)| get(l, "callee") == "payments").expect("payments");
    assert!(close(payments.1, 2.1), "{p50:?}");
    // Errors name what was wrong; a collision is refused as Prometheus refuses it.
    for (q, says) in [
        ("label_replace(vector(1), \"1bad\", \"x\", \"a\", \".*\")", "invalid label name"),
        ("label_replace(sum by (client) (increase(traces_service_graph_request_total[5m])), \"a\", \"x\", \"client\", \"(\")", "invalid regular expression"),
        ("label_replace(sum by (client) (increase(traces_service_graph_request_total[5m])), \"client\", \"same\", \"client\", \".*\")", "same labelset"),
        ("label_join(sum by (client) (increase(traces_service_graph_request_total[5m])), \"x\")", "at least 3"),
        ("label_join(1, \"x\", \"-\", \"a\")", "expected type vector"),
    ] {
        let err = eval_at(&mem, q, NOW).expect_err(q).to_string();
        assert!(err.contains(says), "{q}: {err}");
    }
}

#[test]
fn repeats_are_the_sub_expressions_and_selectors_more_than_one_rule_holds() {
    let exprs = |texts: &[&str]| texts.iter().map(|t| parse(t).unwrap()).collect::<Vec<_>>();
    let alone = exprs(&["rate(span_duration_seconds_count{service=\"a\"}[5m]) > 1", "vector(1)"]);
    assert!(!Repeats::of(&alone).any());
    // Two thresholds on one p99: its call, its sum and its selector repeat.
    let p99 = "histogram_quantile(0.99, sum by (le) (rate(span_duration_seconds_bucket{service=\"a\"}[5m])))";
    let thresholds = exprs(&[&format!("{p99} > 0.1"), &format!("{p99} > 0.5")]);
    let repeats = Repeats::of(&thresholds);
    assert!(repeats.any());
    let memo = Memo::new(0, 0, std::sync::Arc::new(repeats), 1 << 20);
    assert!(memo.repeats(&parse(p99).unwrap().to_string()));
    assert!(!memo.repeats(&parse(&format!("{p99} > 0.1")).unwrap().to_string()));
    assert!(memo.keeps_ranges());
    // Two quantiles of one selection share only the selection (and so its merged ranges).
    let quantiles = exprs(&[p99, &p99.replace("0.99", "0.5")]);
    let repeats = Repeats::of(&quantiles);
    let memo = Memo::new(0, 0, std::sync::Arc::new(repeats), 1 << 20);
    assert!(memo.keeps_ranges());
    assert!(!memo.repeats(&parse(p99).unwrap().to_string()));
    // One memo serves one instant only.
    assert!(memo.serves(&[0], 0));
    assert!(!memo.serves(&[0, 15_000], 0));
    assert!(!memo.serves(&[1000], 1));
}

/// `hours` up to `NOW` of one span every `every` seconds, taking the services and the operations
/// in turn (their counts coprime, so every pair gets spans), with durations of 1 ms to 1 s,
/// every `errors`-th span failed.
fn spread(hours: i64, every: i64, services: &[&str], operations: &[&str], errors: Option<u64>) -> Mem {
    let mut mem = Mem::default();
    let mut t = NOW - hours * 3600;
    let mut i: u64 = 0;
    while t < NOW {
        let (service, op) =
            (services[i as usize % services.len()], operations[i as usize % operations.len()]);
        let status = if errors.is_some_and(|e| i % e == 0) { Status::Error } else { Status::Ok };
        mem.span(service, op, status, t, 1_000_000 + (i * 7_919 % 997) * 1_000_000);
        t += every;
        i += 1;
    }
    mem
}

/// A source over the in-memory store that counts the reads the engine makes
/// ([`Source::merged_windows`] calls) and, `merging`, merges what they ask as a cluster's
/// owners do: per start, or per interval when asked for whole ones, given at the interval's
/// start.
struct Probe<'a> {
    mem: &'a Mem,
    merging: bool,
    reads: std::sync::atomic::AtomicUsize,
    /// Every read announced ([`Source::read_ahead`], one entry per group) and every read
    /// made, as (resolution, members, intervals, whole).
    announced: parking_lot::Mutex<Vec<ReadKey>>,
    made: parking_lot::Mutex<Vec<ReadKey>>,
}

type ReadKey = (crate::store::Resolution, Vec<u64>, Vec<(i64, i64)>, bool);

impl<'a> Probe<'a> {
    fn new(mem: &'a Mem, merging: bool) -> Probe<'a> {
        Probe {
            mem,
            merging,
            reads: Default::default(),
            announced: Default::default(),
            made: Default::default(),
        }
    }

    /// The reads made since the last call.
    fn reads(&self) -> usize {
        self.reads.swap(0, std::sync::atomic::Ordering::Relaxed)
    }
}

impl Source for Probe<'_> {
    fn series(&self) -> Result<Vec<(u64, SeriesLabels)>, StoreError> {
        self.mem.series()
    }
    fn select(&self, m: &[&Matcher], at_most: usize) -> Result<Vec<(u64, SeriesLabels)>, StoreError> {
        self.mem.select(m, at_most)
    }
    fn windows(
        &self,
        res: crate::store::Resolution,
        series: u64,
        start: i64,
        end: i64,
        f: &mut crate::store::WindowFn<'_>,
    ) -> Result<(), StoreError> {
        self.mem.windows(res, series, start, end, f)
    }
    fn merged_windows(
        &self,
        res: crate::store::Resolution,
        members: &[u64],
        intervals: &[(i64, i64)],
        whole: bool,
        f: &mut crate::store::WindowFn<'_>,
    ) -> Result<(), StoreError> {
        self.reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.made.lock().push((res, members.to_vec(), intervals.to_vec(), whole));
        if !self.merging {
            return self.mem.merged_windows(res, members, intervals, whole, f);
        }
        let mut merged: BTreeMap<i64, Histogram> = BTreeMap::new();
        for &m in members {
            self.mem.windows_in(res, m, intervals, &mut |start, b| {
                merged
                    .entry(crate::store::merged_at(intervals, start, whole))
                    .or_insert_with(|| Histogram::new(self.mem.layout()))
                    .merge(&Histogram::decode(b)?);
                Ok(())
            })?;
        }
        // Last first: the engine may not rely on the order.
        for (start, h) in merged.into_iter().rev() {
            f(start, &h.to_bytes())
                .map_err(|e| StoreError::Corrupt { what: "window", message: e.to_string() })?;
        }
        Ok(())
    }
    fn read_ahead(
        &self,
        res: crate::store::Resolution,
        groups: &[&[u64]],
        intervals: &[(i64, i64)],
        whole: bool,
    ) {
        let mut announced = self.announced.lock();
        announced.extend(groups.iter().map(|g| (res, g.to_vec(), intervals.to_vec(), whole)));
    }
    fn layout(&self) -> Layout {
        self.mem.layout()
    }
    fn exemplars(
        &self,
        series: u64,
        start: i64,
        end: i64,
    ) -> Result<Vec<crate::store::Exemplar>, StoreError> {
        self.mem.exemplars(series, start, end)
    }
}

#[test]
fn the_reads_announced_ahead_are_the_reads_that_follow_instant_and_range() {
    // Three hours of nine series in three services: a cluster asks each owner for what the
    // engine announces and hands it over only when a read asks exactly that.
    let mem = spread(3, 3, &["api", "db", "cache"], &["get", "put", "list"], None);
    let retention = RetentionConfig::default();
    let query = "histogram_quantile(0.99, sum by (le, service) (rate(span_duration_seconds_bucket[5m])))";
    for (steps, whole) in [
        (Steps::instant((NOW - 30) * 1000), true),
        (Steps::range((NOW - 3600) * 1000 + 7_500, NOW * 1000, 15_000, 11_000).expect("steps"), false),
    ] {
        let probe = Probe::new(&mem, true);
        let engine = Engine::new(&probe, &steps, NOW, &retention, limits());
        let expr = promql_parser::parser::parse(query).expect("parses");
        engine.materialized(engine.eval(&expr).expect("eval")).expect("materialized");
        let (mut announced, mut made) = (probe.announced.lock().clone(), probe.made.lock().clone());
        // Three groups, at two resolutions for the range (its steps' edges at 10 s).
        assert!(announced.len() >= 3, "{} reads announced", announced.len());
        assert!(announced.iter().all(|r| r.3 == whole), "whole intervals only for one step");
        announced.sort();
        made.sort();
        assert_eq!(announced, made, "whole {whole}: announced and made");
    }
}

#[test]
fn windows_merged_where_they_are_read_give_the_same_answers_instant_and_range() {
    // Three hours of six series in two services, every few seconds.
    let mem = spread(3, 3, &["api", "db"], &["get", "put", "list"], None);
    let merging = Probe::new(&mem, true);
    let retention = RetentionConfig::default();
    let queries = [
        "sum(increase(span_duration_seconds_count[5m]))",
        "sum by (service) (rate(span_duration_seconds_count[1h]))",
        "histogram_quantile(0.99, sum by (le, service) (rate(span_duration_seconds_bucket[1h])))",
        "histogram_quantile(0.5, sum by (le) (rate(span_duration_seconds_bucket[90m])))",
        "histogram_quantile(0.9, rate(span_duration_seconds_bucket[10m]))",
    ];
    let answers = |source: &dyn Source, steps: &Steps| -> Vec<String> {
        let engine = Engine::new(source, steps, NOW, &retention, limits());
        queries
            .iter()
            .map(|q| {
                let expr = promql_parser::parser::parse(q).expect("parses");
                format!("{:?}", engine.materialized(engine.eval(&expr).expect("eval")).expect("materialized"))
            })
            .collect()
    };
    let mut steps: Vec<Steps> = [(NOW - 30) * 1000, (NOW - 3600 - 17) * 1000 + 420, NOW * 1000]
        .into_iter()
        .map(Steps::instant)
        .collect();
    steps.push(Steps::range((NOW - 7200) * 1000 + 23_500, NOW * 1000, 60_000, 11_000).expect("steps"));
    steps.push(Steps::range((NOW - 7200) * 1000, NOW * 1000, 300_000, 11_000).expect("steps"));
    for s in &steps {
        let plain = answers(&mem, s);
        assert!(plain.iter().all(|a| a.contains("Some(")), "every query has values: {plain:?}");
        assert_eq!(answers(&merging, s), plain, "at {:?}", s.times().first());
    }
}

#[test]
fn a_sum_of_count_or_sum_series_reads_each_group_once_and_equals_the_sum_of_its_series() {
    // Two hours of 12 series in 3 services (4 operations each), and some errors.
    let mem = spread(2, 2, &["api", "db", "cache"], &["get", "put", "list", "scan"], Some(17));
    let series = mem.series().expect("series").len();
    assert!(series > 12, "{series} series");
    let retention = RetentionConfig::default();
    let steps = [
        Steps::instant((NOW - 30) * 1000),
        Steps::range((NOW - 3600) * 1000 + 7_500, NOW * 1000, 60_000, 100).expect("steps"),
    ];
    for steps in &steps {
        for (name, inner) in [
            ("count", "increase(span_duration_seconds_count[1h])"),
            ("sum", "rate(span_duration_seconds_sum[5m])"),
            ("sum over an hour", "increase(span_duration_seconds_sum[1h])"),
        ] {
            let probe = Probe::new(&mem, false);
            let engine = Engine::new(&probe, steps, NOW, &retention, limits());
            let run = |q: &str| -> Vec<Series> {
                let expr = promql_parser::parser::parse(q).expect("parses");
                match engine.eval(&expr).and_then(|v| engine.materialized(v)).expect("eval") {
                    Value::Vector(v) => v,
                    other => panic!("{q}: {other:?}"),
                }
            };
            let per_series = run(inner);
            let per_series_reads = probe.reads();
            assert_eq!(per_series.len(), series, "{name}");
            let summed = run(&format!("sum by (service) ({inner})"));
            let summed_reads = probe.reads();
            // One read per service where there was one per series (as many levels each).
            assert_eq!(summed_reads * series, per_series_reads * 3, "{name}: reads");
            assert_eq!(summed.len(), 3, "{name}");
            for s in &summed {
                let service = &s.labels["service"];
                assert_eq!(s.labels.len(), 1, "{name}: {:?}", s.labels);
                for (step, v) in s.values.iter().enumerate() {
                    let of_series: Vec<f64> = per_series
                        .iter()
                        .filter(|p| &p.labels["service"] == service)
                        .filter_map(|p| p.values[step])
                        .collect();
                    match v {
                        None => assert!(of_series.is_empty(), "{name} {service} step {step}"),
                        Some(v) => {
                            let expected: f64 = of_series.iter().sum();
                            assert!(
                                (v - expected).abs() <= 1e-9 * expected.abs().max(1.0),
                                "{name} {service} step {step}: {v} against {expected}"
                            );
                            assert!(*v > 0.0, "{name} {service} step {step}");
                        }
                    }
                }
            }
        }
    }
    // Counts stay numbers to the histogram functions, as before; an empty selection is empty.
    let err = eval_at(&mem, "histogram_quantile(0.9, sum(rate(span_duration_seconds_count[5m])))", NOW)
        .expect_err("a count is not a histogram");
    assert!(err.to_string().contains("its second argument must be"), "{err}");
    assert!(vector(&mem, "histogram_quantile(0.9, rate(span_duration_seconds_count{service=\"none\"}[5m]))")
        .is_empty());
}
