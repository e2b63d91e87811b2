use std::collections::BTreeMap;

use super::wire::{self, WriteRequest};
use super::*;
use crate::clock::ManualClock;
use crate::series::Status;
use crate::store::WindowDelta;
use tailscope_proto::histogram::Layout;

#[test]
fn native_buckets_follow_the_schema() {
    for schema in [-4, 0, 3, 7, 8] {
        assert_eq!(wire::native_index(1.0, schema), 0, "1 is a bucket's upper bound");
        // 2 is the upper bound of bucket 2^schema (for a negative schema, 2 is inside bucket 1).
        assert_eq!(wire::native_index(2.0, schema), if schema >= 0 { 1 << schema } else { 1 });
    }
    // Schema 7: each bucket is 2^(1/128) ≈ 0.54 % wide; 0.05 s lies in bucket ⌈log2(0.05)·128⌉.
    assert_eq!(wire::native_index(0.05, 7), (0.05f64.log2() * 128.0).ceil() as i32);
    let buckets: BTreeMap<i32, u64> = [(-3, 4), (-2, 1), (2, 7)].into_iter().collect();
    let h = wire::native_histogram(&buckets, 2, 1.5, 7, 1_000);
    assert_eq!((h.count_int, h.zero_count_int, h.schema, h.timestamp), (14, 2, 7, 1_000));
    assert_eq!(
        h.positive_spans,
        vec![wire::BucketSpan { offset: -3, length: 2 }, wire::BucketSpan { offset: 3, length: 1 }]
    );
    assert_eq!(h.positive_deltas, vec![4, -3, 6]);
}

fn config(form: HistogramForm) -> RemoteWriteConfig {
    RemoteWriteConfig {
        url: "http://127.0.0.1:9/api/v1/write".into(),
        histograms: form,
        buckets: vec![0.01, 0.1, 1.0],
        send_interval: Duration::from_secs(10),
        ..RemoteWriteConfig::default()
    }
}

fn delta(series: u64, values_ms: &[u64]) -> WindowDelta {
    let mut h = Histogram::new(Layout::default());
    for &ms in values_ms {
        h.record(ms * 1_000_000, 1);
    }
    WindowDelta { series, window_start: 1_800_000_000, histogram: h.to_bytes() }
}

/// Every request queued so far, decoded.
fn drain(w: &RemoteWriter) -> Vec<WriteRequest> {
    let mut q = w.queue.lock();
    let out = q
        .requests
        .drain(..)
        .map(|p| {
            let raw = snap::raw::Decoder::new().decompress_vec(&p.body).expect("snappy");
            <WriteRequest as prost::Message>::decode(raw.as_slice()).expect("protobuf")
        })
        .collect();
    q.samples = 0;
    out
}

fn value(requests: &[WriteRequest], name: &str, le: Option<&str>) -> Vec<(f64, i64)> {
    requests
        .iter()
        .flat_map(|r| &r.timeseries)
        .filter(|t| {
            let get = |k: &str| t.labels.iter().find(|l| l.name == k).map(|l| l.value.as_str());
            get("__name__") == Some(name) && get("le") == le
        })
        .flat_map(|t| t.samples.iter().map(|s| (s.value, s.timestamp)))
        .collect()
}

#[tokio::test]
async fn deltas_become_cumulative_counters_with_a_zero_sample_first() {
    let clock = Arc::new(ManualClock::new(1_800_000_100 * 1_000_000_000));
    let (_stop_tx, stop) = watch::channel(false);
    let metrics = Arc::new(Metrics::new());
    let (w, _tasks) = RemoteWriter::start(config(HistogramForm::Both), clock.clone(), metrics.clone(), stop)
        .expect("starts");
    let labels = SeriesLabels::new("checkout", "pay", Status::Ok);
    let id = labels.id();
    let write =
        |series: Vec<(u64, SeriesLabels)>, windows| EpochWrite { series, windows, ..EpochWrite::default() };
    w.written(&write(vec![(id, labels.clone())], vec![delta(id, &[5, 50, 500, 5_000])]));
    w.snapshot();
    let first = drain(&w);
    let ts = 1_800_000_100_000;
    assert_eq!(
        value(&first, "span_duration_seconds_bucket", Some("0.01")),
        vec![(0.0, ts - 10_000), (1.0, ts)]
    );
    assert_eq!(value(&first, "span_duration_seconds_bucket", Some("1")), vec![(0.0, ts - 10_000), (3.0, ts)]);
    assert_eq!(
        value(&first, "span_duration_seconds_bucket", Some("+Inf")),
        vec![(0.0, ts - 10_000), (4.0, ts)]
    );
    assert_eq!(value(&first, "span_duration_seconds_count", None), vec![(0.0, ts - 10_000), (4.0, ts)]);
    let sum = value(&first, "span_duration_seconds_sum", None)[1].0;
    assert!((sum - 5.555).abs() < 5.555 * 0.01, "{sum}");
    // Labels are sorted by name and carry every series label.
    let t = &first[0].timeseries[0];
    let names: Vec<&str> = t.labels.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["__name__", "le", "operation", "service", "span_kind", "status"]);
    // The native histogram: a zero sample, then every span in schema-7 buckets.
    let native = first
        .iter()
        .flat_map(|r| &r.timeseries)
        .find(|t| t.labels.iter().any(|l| l.value == "span_duration_seconds"))
        .expect("native series");
    assert_eq!(native.histograms.len(), 2);
    assert_eq!((native.histograms[0].count_int, native.histograms[1].count_int), (0, 4));
    assert_eq!(native.histograms[1].positive_spans.iter().map(|s| s.length).sum::<u32>(), 4);

    // Later deltas add up, late ones too; no zero sample again.
    clock.advance(10_000_000_000);
    w.written(&write(Vec::new(), vec![delta(id, &[7, 8])]));
    w.snapshot();
    let second = drain(&w);
    assert_eq!(value(&second, "span_duration_seconds_bucket", Some("0.01")), vec![(3.0, ts + 10_000)]);
    assert_eq!(value(&second, "span_duration_seconds_count", None), vec![(6.0, ts + 10_000)]);

    // A series idle for series_idle is no longer sent; its labels stay for the deltas that
    // come before the pipeline names it again, and it starts over from zero.
    clock.advance(601_000_000_000);
    w.snapshot();
    assert!(drain(&w).iter().all(|r| r.timeseries.is_empty()));
    w.written(&write(Vec::new(), vec![delta(id, &[9])]));
    w.snapshot();
    let again = drain(&w);
    let ts = ts + 611_000;
    assert_eq!(value(&again, "span_duration_seconds_count", None), vec![(0.0, ts - 10_000), (1.0, ts)]);
    // A delta of a series whose labels were never seen is counted, not sent unnamed.
    w.written(&write(Vec::new(), vec![delta(42, &[1])]));
    let text = metrics.encode();
    assert!(
        text.contains(
            r#"tailscope_remote_write_samples_dropped_total{remote="127.0.0.1:9",reason="unlabelled"} 1"#
        ),
        "{text}"
    );
}

#[tokio::test]
async fn a_full_queue_drops_its_oldest_requests_and_counts_them() {
    let clock = Arc::new(ManualClock::new(1_800_000_100 * 1_000_000_000));
    let (_stop_tx, stop) = watch::channel(false);
    let metrics = Arc::new(Metrics::new());
    let c =
        RemoteWriteConfig { queue_capacity: 10, max_samples_per_send: 10, ..config(HistogramForm::Classic) };
    let (w, _tasks) = RemoteWriter::start(c, clock, metrics.clone(), stop).expect("starts");
    for i in 0..3 {
        w.enqueue(vec![i], 4);
    }
    let q = w.queue.lock();
    assert_eq!(q.requests.iter().map(|p| p.body[0]).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(q.samples, 8);
    drop(q);
    let text = metrics.encode();
    assert!(text.contains(r#"reason="queue_full"} 4"#), "{text}");
}

#[test]
fn bad_targets_are_refused_naming_the_key() {
    let ok = config(HistogramForm::Classic);
    assert_eq!(ok.validate(), Ok(()));
    let tenant =
        RemoteWriteConfig { headers: [("X-Scope-OrgID".into(), "team-a".into())].into(), ..ok.clone() };
    assert_eq!(tenant.validate(), Ok(()));
    assert_eq!(ok.display_name(), "127.0.0.1:9");
    for (bad, says) in [
        (RemoteWriteConfig { url: "ftp://x/".into(), ..ok.clone() }, "scheme ftp"),
        (RemoteWriteConfig { url: "not a url".into(), ..ok.clone() }, "url"),
        (RemoteWriteConfig { buckets: vec![0.1, 0.1], ..ok.clone() }, "strictly increasing"),
        (RemoteWriteConfig { buckets: vec![], ..ok.clone() }, "buckets"),
        (RemoteWriteConfig { buckets: vec![f64::NAN], ..ok.clone() }, "buckets"),
        (RemoteWriteConfig { native_schema: 9, ..ok.clone() }, "native_schema"),
        (RemoteWriteConfig { send_interval: Duration::from_millis(10), ..ok.clone() }, "send_interval"),
        (RemoteWriteConfig { queue_capacity: 1, ..ok.clone() }, "queue_capacity"),
        (RemoteWriteConfig { min_backoff: Duration::from_secs(9), ..ok.clone() }, "min_backoff"),
        (
            RemoteWriteConfig { headers: [("Content-Encoding".into(), "gzip".into())].into(), ..ok.clone() },
            "set by tailscope",
        ),
        (
            RemoteWriteConfig { headers: [("bad name".into(), "x".into())].into(), ..ok.clone() },
            "header name",
        ),
        (
            RemoteWriteConfig { headers: [("X-Scope-OrgID".into(), "a\nb".into())].into(), ..ok.clone() },
            "header value",
        ),
    ] {
        let err = bad.validate().expect_err("refused");
        assert!(err.contains(says), "{err} should say {says}");
    }
}
