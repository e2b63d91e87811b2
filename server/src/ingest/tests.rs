//! The ingest door against a fake [`Admit`]: validation, the outcome of admission and the one
//! mapping of errors to gRPC and HTTP, without a pipeline or a store.

use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;
use tailscope_proto::histogram::Layout;
use tailscope_proto::v1::{SeriesGroup, Span};
use tokio::sync::watch;

use super::*;
use crate::clock::ManualClock;
use crate::pipeline::DurableState;
use crate::series::SpanLimits;

const NOW: i64 = 1_800_000_000_000_000_000;

/// Admits with a fixed outcome and remembers what it was offered.
#[derive(Debug)]
struct FakeAdmit {
    outcome: Option<Admission>,
    offered: AtomicUsize,
    admitted: Mutex<Vec<Arc<ValidatedBatch>>>,
    durable: watch::Sender<DurableState>,
}

impl FakeAdmit {
    /// `None`: the queues stay full (every offer is handed back).
    fn new(outcome: Option<Admission>) -> Arc<FakeAdmit> {
        Arc::new(FakeAdmit {
            outcome,
            offered: AtomicUsize::new(0),
            admitted: Mutex::new(Vec::new()),
            durable: watch::Sender::new(DurableState::default()),
        })
    }
}

impl Admit for FakeAdmit {
    fn admit(&self, batch: Arc<ValidatedBatch>) -> Result<(Admission, u64), Arc<ValidatedBatch>> {
        self.offered.fetch_add(1, Ordering::Relaxed);
        let Some(outcome) = self.outcome else { return Err(batch) };
        self.admitted.lock().push(batch);
        Ok((outcome, 7))
    }
    fn subscribe(&self) -> watch::Receiver<DurableState> {
        self.durable.subscribe()
    }
    fn hurry(&self) {
        // Durable at once: the epoch the fake names.
        self.durable.send_modify(|d| d.epoch = 7);
    }
    fn durable_seq(&self, _: u64) -> u64 {
        0
    }
    fn is_duplicate(&self, _: u64, _: u64) -> bool {
        false
    }
    fn is_settled(&self, _: u64) -> bool {
        true
    }
    fn pressure(&self) -> f64 {
        0.0
    }
    fn shard_count(&self) -> usize {
        4
    }
    fn layout(&self) -> Layout {
        Layout::default()
    }
    fn limits(&self) -> SpanLimits {
        {
            let c = IngestConfig::default();
            SpanLimits::new(c.allowed_lateness, c.max_future_skew, c.max_span_duration)
        }
    }
}

fn service(admit: Arc<FakeAdmit>, config: IngestConfig) -> IngestService {
    IngestService::new(
        admit,
        Arc::new(Metrics::new()),
        Arc::new(ManualClock::new(NOW)),
        &config,
        Arc::new(Sampler::new(crate::sampling::SamplingConfig::default())),
        Arc::new(crate::cardinality::Cardinality::new(0, 0, 0, [])),
    )
}

fn span(duration: i64, weight: u32) -> Span {
    Span { start_unix_nanos: NOW - 1_000_000_000, duration_nanos: duration, weight, ..Default::default() }
}

fn batch(client_id: u64, spans: Vec<Span>) -> SpanBatch {
    SpanBatch {
        client_id,
        seq: 1,
        groups: vec![SeriesGroup {
            key: Some(SeriesKey { service: "api".into(), operation: "GET /".into(), ..Default::default() }),
            spans,
        }],
        deltas: Vec::new(),
    }
}

#[tokio::test]
async fn an_accepted_batch_is_counted_and_becomes_durable() {
    let admit = FakeAdmit::new(Some(Admission::Accepted));
    let ingest = service(admit.clone(), IngestConfig::default());
    let receipt =
        ingest.submit(batch(5, vec![span(1_000, 0), span(-1, 0), span(2_000, 3)]), Origin::Native).await;
    let receipt = receipt.expect("accepted");
    assert!(!receipt.duplicate);
    assert_eq!(receipt.epoch, 7);
    assert_eq!(receipt.stats.accepted, 4, "one span, and one of weight 3");
    assert_eq!(receipt.stats.rejected[SpanReject::NegativeDuration.index()], 1);
    assert_eq!(admit.admitted.lock().len(), 1);
    ingest.durable(&receipt).await.expect("durable");
}

#[tokio::test]
async fn a_weight_above_the_limit_is_cut_to_it() {
    let admit = FakeAdmit::new(Some(Admission::Accepted));
    let config = IngestConfig { max_span_weight: 10, ..IngestConfig::default() };
    let ingest = service(admit.clone(), config);
    let receipt = ingest.submit(batch(5, vec![span(1_000, u32::MAX)]), Origin::Otlp).await.expect("accepted");
    assert_eq!((receipt.stats.accepted, receipt.stats.weight_clamped), (10, 1));
    assert_eq!(admit.admitted.lock()[0].batch.groups[0].spans[0].weight, 10);
}

#[tokio::test]
async fn malformed_batches_are_refused_naming_what_is_wrong() {
    let admit = FakeAdmit::new(Some(Admission::Accepted));
    let config = IngestConfig { max_spans_per_batch: 2, ..IngestConfig::default() };
    let ingest = service(admit.clone(), config);
    let e = ingest.submit(batch(0, vec![span(1, 0)]), Origin::Native).await.expect_err("no client id");
    assert_eq!(e, IngestError::Invalid("batch seq 1: client_id must not be 0".into()));
    // Anonymous is what OTLP is.
    ingest.submit(batch(0, vec![span(1, 0)]), Origin::Otlp).await.expect("anonymous OTLP");
    let e = ingest.submit(batch(5, vec![span(1, 0); 3]), Origin::Native).await.expect_err("too many");
    assert!(matches!(&e, IngestError::TooLarge(m) if m.contains("ingest.max_spans_per_batch")), "{e:?}");
    let mut unnamed = batch(5, vec![span(1, 0)]);
    unnamed.groups[0].key =
        Some(SeriesKey { service: String::new(), operation: "x".into(), ..Default::default() });
    let e = ingest.submit(unnamed, Origin::Otlp).await.expect_err("empty service");
    assert_eq!(e, IngestError::Invalid("group 0: empty service name".into()), "OTLP errors carry no seq");
}

#[tokio::test]
async fn admission_outcomes_become_errors_with_one_mapping() {
    for (outcome, want) in [
        (Some(Admission::StoreUnavailable), (tonic::Code::Unavailable, 503, Some(5))),
        (Some(Admission::Draining), (tonic::Code::Unavailable, 503, Some(1))),
        (None, (tonic::Code::ResourceExhausted, 429, Some(1))),
    ] {
        let admit = FakeAdmit::new(outcome);
        let ingest = service(admit.clone(), IngestConfig::default());
        let e = ingest.submit(batch(5, vec![span(1, 0)]), Origin::Native).await.expect_err("refused");
        let (status, retry) = e.http_status();
        assert_eq!((e.grpc_status().code(), status, retry), want, "{e:?}");
        if outcome.is_none() {
            // The queues stayed full for the whole patience: offered again and again.
            assert!(admit.offered.load(Ordering::Relaxed) > 1);
        }
    }
    let e = IngestError::Invalid("x".into());
    assert_eq!((e.grpc_status().code(), e.http_status()), (tonic::Code::InvalidArgument, (400, None)));
    let e = IngestError::TooLarge("x".into());
    assert_eq!((e.grpc_status().code(), e.http_status()), (tonic::Code::ResourceExhausted, (413, None)));
}

#[tokio::test]
async fn a_duplicate_is_acknowledged_and_not_counted() {
    let admit = FakeAdmit::new(Some(Admission::Duplicate));
    let ingest = service(admit, IngestConfig::default());
    let receipt = ingest.submit(batch(5, vec![span(1, 0)]), Origin::Native).await.expect("ok");
    assert!(receipt.duplicate);
    assert_eq!(receipt.stats.accepted, 0);
}

/// Names agreed on at once, as a gateway alone on its names log would: applied to the
/// gateway's own `Cardinality` in the order proposed.
#[derive(Debug)]
struct AppliedAtOnce(Arc<crate::cardinality::Cardinality>);

impl SharedNames for AppliedAtOnce {
    fn propose(
        &self,
        names: Vec<Names>,
    ) -> Pin<Box<dyn Future<Output = Result<(), NamesRefused>> + Send + '_>> {
        for n in &names {
            self.0.apply(n);
        }
        Box::pin(async { Ok(()) })
    }
}

/// A batch of one span per (service, operation, peer) given, with a delta for the first.
fn named_batch(seq: u64, names: &[(&str, &str, &str)]) -> SpanBatch {
    let key = |(service, operation, peer): &(&str, &str, &str)| SeriesKey {
        service: (*service).into(),
        operation: (*operation).into(),
        peer: (*peer).into(),
        kind: if peer.is_empty() { 0 } else { tailscope_proto::v1::SpanKind::Client as i32 },
    };
    let mut histogram = Histogram::new(Layout::default());
    histogram.record(1_000_000, 2);
    SpanBatch {
        client_id: 9,
        seq,
        groups: names
            .iter()
            .map(|n| SeriesGroup { key: Some(key(n)), spans: vec![span(1_000, 0)] })
            .collect(),
        deltas: names
            .first()
            .map(|n| HistogramDelta {
                key: Some(key(n)),
                window_start_unix_seconds: (NOW / 1_000_000_000) / 10 * 10 - 10,
                histogram: histogram.to_bytes(),
                ..Default::default()
            })
            .into_iter()
            .collect(),
    }
}

#[tokio::test]
async fn a_gateway_counts_with_the_decisions_it_looked_up_once_as_one_node_counts() {
    // Caps of 2 services, 2 operations and 1 peer per service: the later names overflow.
    let caps = || Arc::new(crate::cardinality::Cardinality::new(2, 2, 1, []));
    let one_node = FakeAdmit::new(Some(Admission::Accepted));
    let single = IngestService::new(
        one_node.clone(),
        Arc::new(Metrics::new()),
        Arc::new(ManualClock::new(NOW)),
        &IngestConfig::default(),
        Arc::new(Sampler::new(crate::sampling::SamplingConfig::default())),
        caps(),
    );
    let gateway_admit = FakeAdmit::new(Some(Admission::Accepted));
    let names = caps();
    let gateway = IngestService::new(
        gateway_admit.clone(),
        Arc::new(Metrics::new()),
        Arc::new(ManualClock::new(NOW)),
        &IngestConfig::default(),
        Arc::new(Sampler::new(crate::sampling::SamplingConfig::default())),
        names.clone(),
    )
    .shared_names(Arc::new(AppliedAtOnce(names)));
    let batches = [
        named_batch(1, &[("cart", "add", ""), ("cart", "add", "db"), ("cart", "list", "")]),
        named_batch(
            2,
            &[("cart", "remove", ""), ("search", "q", "idx"), ("search", "q", "cache"), ("users", "get", "")],
        ),
        named_batch(
            3,
            &[("users", "get", ""), ("cart", "remove", ""), ("search", "q", "cache"), ("cart", "add", "db")],
        ),
    ];
    for (i, b) in batches.into_iter().enumerate() {
        single.submit(b.clone(), Origin::Native).await.expect("accepted by one node");
        if i == 2 {
            // Every name of the last batch is decided by now: the stream's read-ahead hands its
            // decisions to submitting, which does not look them up again.
            let Some(NamesAhead::Decided(decided)) = gateway.names_ahead(&b) else {
                panic!("the names of batch {} were not all decided", b.seq)
            };
            assert_eq!(decided.len(), b.groups.len() + b.deltas.len());
            gateway
                .submit_decided(b, Origin::Native, 0, Some(decided))
                .await
                .expect("accepted by the gateway");
        } else {
            gateway.submit(b, Origin::Native).await.expect("accepted by the gateway");
        }
    }
    let routes = |admit: &FakeAdmit| -> Vec<String> {
        admit
            .admitted
            .lock()
            .iter()
            .flat_map(|v| {
                let groups = v.groups.iter().map(|g| {
                    format!(
                        "{:x} {:x} {:x} {} {} {}",
                        g.key, g.ok_series, g.shard, g.overflow, g.service_overflow, g.peer_overflow
                    )
                });
                let deltas = v.deltas.iter().map(|d| format!("{:x} {:x} {:?}", d.key, d.series, d.labels));
                groups.chain(deltas).collect::<Vec<_>>()
            })
            .collect()
    };
    let (want, got) = (routes(&one_node), routes(&gateway_admit));
    assert_eq!(want.len(), 14);
    assert_eq!(got, want);
    // The caps did bite: overflowed services, operations and peers among them.
    assert!(want.iter().any(|r| r.ends_with("true false false")), "{want:?}");
    assert!(
        want.iter().any(|r| r.ends_with("false true false") || r.ends_with("true true false")),
        "{want:?}"
    );
    assert!(want.iter().any(|r| r.ends_with("false false true")), "{want:?}");
}
