//! The ingest door: every protocol — the native `tailscope.v1.Ingest/Stream`, OTLP over gRPC
//! and over HTTP — turns what it receives into a [`SpanBatch`] and hands it to
//! [`IngestService::submit`], which validates it, admits it to the pipeline (through the
//! [`Admit`] seam) and says what became of it in a [`Receipt`] or an [`IngestError`]. The
//! error maps once to a gRPC status ([`IngestError::grpc_status`]) and once to an HTTP status
//! ([`IngestError::http_status`]); the adapters only translate their wire format.
//!
//! Where to add a protocol: a file under `ingest/` (a folder per protocol with a file per
//! transport, as `otlp/{grpc,http}.rs`), converting to a `SpanBatch` and calling `submit` —
//! and [`IngestService::durable`] when the protocol answers only once the spans are on disk.

pub mod native;
pub mod otlp;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tailscope_proto::histogram::Histogram;
use tailscope_proto::v1::{HistogramDelta, SeriesKey, SpanBatch, Throttle};

use crate::cardinality::{Names, NamesRefused, SharedNames, OVERFLOW};
use crate::clock::Clock;
use crate::config::IngestConfig;
use crate::pipeline::{Admission, Admit, GroupRoute, RoutedDelta, ValidatedBatch};
use crate::sampling::Sampler;
use crate::series::SpanReject;
use crate::series::{self, SeriesLabels, Status as SpanStatus};
use crate::telemetry::{Form, Metrics, Outcome, Reason, SideLabel};

pub use crate::series::MAX_LABEL_BYTES;

/// Who sent a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A tailscope client on the native stream: it has a client id and numbers its batches,
    /// so a resend is recognised and counted once.
    Native,
    /// An OpenTelemetry exporter: anonymous, at least once (OTLP's own contract).
    Otlp,
}

impl Origin {
    /// `msg` about batch `seq`: native batches are named by their seq; an OTLP export has none
    /// of its own.
    fn name(self, seq: u64, msg: &str) -> String {
        match self {
            Origin::Native => format!("batch seq {seq}: {msg}"),
            Origin::Otlp => msg.to_owned(),
        }
    }
}

/// Why a batch was not taken. Each variant maps to one gRPC code and one HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IngestError {
    /// Malformed: the sender must fix it (INVALID_ARGUMENT, HTTP 400).
    #[error("{0}")]
    Invalid(String),
    /// Larger than a limit: split it (RESOURCE_EXHAUSTED, HTTP 413).
    #[error("{0}")]
    TooLarge(String),
    /// The pipeline is full: send again after a backoff (RESOURCE_EXHAUSTED, HTTP 429).
    #[error("{0}")]
    Overloaded(String),
    /// The store cannot write: send again after a backoff (UNAVAILABLE, HTTP 503).
    #[error("{0}")]
    StoreUnavailable(String),
    /// The server is shutting down: send again to it or another (UNAVAILABLE, HTTP 503).
    #[error("server is shutting down; send again")]
    Draining,
    /// Numbered implausibly far past the client's watermark (INVALID_ARGUMENT, HTTP 400).
    #[error("{0}")]
    SeqGap(String),
    /// The client id belongs to another credential (PERMISSION_DENIED, HTTP 403).
    #[error("{0}")]
    NotOwner(String),
    /// This cluster node takes no spans: send them to a gateway (UNAVAILABLE, HTTP 503).
    #[error("{0}")]
    NotGateway(String),
}

impl IngestError {
    /// The batch-refusal reason counted in `tailscope_batches_rejected_total`.
    fn reason(&self) -> Option<&'static str> {
        match self {
            IngestError::Invalid(_) => Some("invalid"),
            IngestError::TooLarge(_) => Some("oversized"),
            IngestError::Overloaded(_) => Some("overloaded"),
            IngestError::StoreUnavailable(_) => Some("store_unavailable"),
            IngestError::SeqGap(_) => Some("seq_gap"),
            IngestError::NotOwner(_) => Some("not_owner"),
            IngestError::NotGateway(_) => Some("not_gateway"),
            IngestError::Draining => None,
        }
    }

    /// The gRPC status of this error.
    pub fn grpc_status(&self) -> tonic::Status {
        let code = match self {
            IngestError::Invalid(_) | IngestError::SeqGap(_) => tonic::Code::InvalidArgument,
            IngestError::NotOwner(_) => tonic::Code::PermissionDenied,
            IngestError::TooLarge(_) | IngestError::Overloaded(_) => tonic::Code::ResourceExhausted,
            IngestError::StoreUnavailable(_) | IngestError::Draining | IngestError::NotGateway(_) => {
                tonic::Code::Unavailable
            }
        };
        tonic::Status::new(code, self.to_string())
    }

    /// The HTTP status of this error, and the seconds to send with `Retry-After` when the
    /// sender should try again (OTLP/HTTP's throttling contract).
    pub fn http_status(&self) -> (u16, Option<u32>) {
        match self {
            IngestError::Invalid(_) | IngestError::SeqGap(_) => (400, None),
            IngestError::NotOwner(_) => (403, None),
            IngestError::TooLarge(_) => (413, None),
            IngestError::Overloaded(_) => (429, Some(1)),
            IngestError::StoreUnavailable(_) => (503, Some(5)),
            IngestError::Draining => (503, Some(1)),
            IngestError::NotGateway(_) => (503, None),
        }
    }
}

/// What became of a submitted batch.
#[derive(Debug, Default)]
pub struct Receipt {
    /// The epoch it is durable with ([`IngestService::durable`] waits for it).
    pub epoch: u64,
    /// It was a resend of a batch already accepted: not counted again.
    pub duplicate: bool,
    /// Its counts (empty for a duplicate).
    pub(crate) stats: BatchStats,
}

/// The ingest service: the one door every protocol adapter submits through.
#[derive(Debug, Clone)]
pub struct IngestService {
    pipeline: Arc<dyn Admit>,
    metrics: Arc<Metrics>,
    sampler: Arc<Sampler>,
    clock: Arc<dyn Clock>,
    max_spans: usize,
    max_span_weight: u32,
    throttle_high_water: f64,
    cardinality: Arc<crate::cardinality::Cardinality>,
    /// Client/server pairing of OpenTelemetry spans.
    pairing: Arc<otlp::pairing::Pairing>,
    /// Why every batch is refused (a cluster node without the gateway role).
    refusing: Option<Arc<str>>,
    /// Where a cluster's gateways agree on names (`cardinality` then only counts what they
    /// agreed on); none on one node, whose `cardinality` decides alone.
    names: Option<Arc<dyn SharedNames>>,
    /// Where a cluster's gateways agree on which credential a client id belongs to; none on
    /// one node, whose pipeline keeps it with the client's watermark.
    owners: Option<Arc<dyn SharedOwners>>,
}

/// Where a cluster's gateways agree on which credential a client id belongs to: the first
/// to use it, whichever gateway it used.
pub trait SharedOwners: Send + Sync + std::fmt::Debug {
    /// Resolves once `client` is known to belong to `owner` (a credential's digest, never 0):
    /// claimed for it now, or by it before.
    fn claim(
        &self,
        client: u64,
        owner: u64,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), OwnerRefused>> + Send + '_>>;
}

/// Why a client id could not be claimed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnerRefused {
    /// It belongs to another credential.
    Another,
    /// Whose it is could not be read now (the words say why).
    Unavailable(String),
}

impl IngestService {
    /// A service admitting into `pipeline`.
    pub fn new(
        pipeline: Arc<dyn Admit>,
        metrics: Arc<Metrics>,
        clock: Arc<dyn Clock>,
        config: &IngestConfig,
        sampler: Arc<Sampler>,
        cardinality: Arc<crate::cardinality::Cardinality>,
    ) -> IngestService {
        IngestService {
            pipeline,
            metrics,
            sampler,
            clock,
            max_spans: config.max_spans_per_batch,
            max_span_weight: config.max_span_weight.max(1),
            throttle_high_water: config.throttle_high_water,
            cardinality,
            pairing: Arc::default(),
            refusing: None,
            names: None,
            owners: None,
        }
    }

    /// The same service checking that a client id belongs to the credential sending it
    /// through `owners`, which every gateway of a cluster shares.
    pub fn shared_owners(mut self, owners: Arc<dyn SharedOwners>) -> IngestService {
        self.owners = Some(owners);
        self
    }

    /// The same service counting spans under the names the cluster's gateways agree on
    /// through `names`, rather than under the ones its own `cardinality` picks.
    pub fn shared_names(mut self, names: Arc<dyn SharedNames>) -> IngestService {
        self.names = Some(names);
        self
    }

    /// The same service refusing every batch with UNAVAILABLE and `why` (a cluster node that
    /// is not a gateway).
    pub fn refusing(mut self, why: &str) -> IngestService {
        self.refusing = Some(why.into());
        self
    }

    /// Validates and admits one batch. Refusals are counted here, so adapters only translate.
    pub async fn submit(&self, batch: SpanBatch, origin: Origin) -> Result<Receipt, IngestError> {
        self.submit_as(batch, origin, 0).await
    }

    /// [`IngestService::submit`] for a sender that authenticated as `owner` (a digest of its
    /// credential; 0: none): a client id belongs to the credential that first used it.
    pub async fn submit_as(
        &self,
        batch: SpanBatch,
        origin: Origin,
        owner: u64,
    ) -> Result<Receipt, IngestError> {
        self.submit_decided(batch, origin, owner, None).await
    }

    /// [`IngestService::submit_as`] of a batch whose names' decisions were already found
    /// (`decided`, from [`IngestService::names_ahead`]; a decision never changes), so they are
    /// not looked up once more before validation counts them.
    async fn submit_decided(
        &self,
        batch: SpanBatch,
        origin: Origin,
        owner: u64,
        decided: Option<Vec<Decided>>,
    ) -> Result<Receipt, IngestError> {
        if let Some(why) = &self.refusing {
            let e = IngestError::NotGateway(origin.name(batch.seq, why));
            self.refused(&e, 0);
            return Err(e);
        }
        let mut batch = batch;
        if origin == Origin::Otlp {
            self.pair(&mut batch);
        }
        if let Err(e) = self.claim_client(&batch, origin, owner).await {
            self.refused(&e, 0);
            return Err(e);
        }
        let decided = match decided {
            Some(decided) => Some(decided),
            None => match self.agree_on_names(&batch, origin).await {
                Ok(decided) => decided,
                Err(e) => {
                    self.refused(&e, 0);
                    return Err(e);
                }
            },
        };
        let mut stats = BatchStats::default();
        let seq = batch.seq;
        let validated = match self.validate(batch, &mut stats, origin, decided.as_deref()) {
            Ok(mut v) => {
                v.owner = owner;
                Arc::new(v)
            }
            Err(e) => {
                self.refused(&e, 0);
                return Err(e);
            }
        };
        let named = |msg: &str| origin.name(seq, msg);
        let (admission, epoch) = self.admit(Arc::clone(&validated)).await;
        let refused = match admission {
            Admission::Accepted => {
                // A sampler the pipeline's shards tell per epoch is not told here as well.
                if !self.sampler.is_fed_by_epochs() {
                    self.observe(&validated);
                }
                self.record_accepted(&stats);
                return Ok(Receipt { epoch, duplicate: false, stats });
            }
            Admission::Duplicate => {
                self.metrics.batches.get_or_create(&Outcome { result: "duplicate" }).inc();
                return Ok(Receipt { epoch, duplicate: true, stats: BatchStats::default() });
            }
            Admission::Overloaded => IngestError::Overloaded(named(&match self.pipeline.stalled() {
                Some(stall) => format!("{stall}; send again after a backoff"),
                None => "ingest is at capacity (shard queues full, or the epoch being filled holds its bound of windows while the last one is written); send again after a backoff".into(),
            })),
            Admission::StoreUnavailable => IngestError::StoreUnavailable(named(
                "the store cannot write right now; send again after a backoff",
            )),
            Admission::Draining => IngestError::Draining,
            Admission::NotOwner => IngestError::NotOwner(named(&not_owner(validated.client_id))),
            Admission::SeqGap { watermark, limit } => IngestError::SeqGap(named(&format!(
                "seq is more than ingest.max_seq_gap ({limit}) past client {}'s accepted watermark {watermark}: a client numbers its batches one by one and resends from its watermark",
                validated.client_id
            ))),
        };
        self.refused(&refused, stats.accepted);
        Err(refused)
    }

    /// Waits until the batch of `receipt` is durable, asking for its epoch to be written now
    /// (group commit) rather than at the next flush interval.
    pub async fn durable(&self, receipt: &Receipt) -> Result<(), IngestError> {
        let mut durable = self.pipeline.subscribe();
        self.pipeline.hurry();
        let written = durable.wait_for(|d| d.epoch >= receipt.epoch || d.closed).await;
        if written.map(|d| d.epoch < receipt.epoch).unwrap_or(true) {
            return Err(IngestError::Draining);
        }
        Ok(())
    }

    /// In a cluster with authentication on, checks (claims when new) that the client id of
    /// `batch` belongs to `owner`, the sending credential, across every gateway.
    async fn claim_client(&self, batch: &SpanBatch, origin: Origin, owner: u64) -> Result<(), IngestError> {
        let Some(owners) = self.owners.as_ref().filter(|_| owner != 0 && batch.client_id != 0) else {
            return Ok(());
        };
        let why = match tokio::time::timeout(CLUSTER_PATIENCE, owners.claim(batch.client_id, owner)).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(OwnerRefused::Another)) => {
                return Err(IngestError::NotOwner(origin.name(batch.seq, &not_owner(batch.client_id))));
            }
            Ok(Err(OwnerRefused::Unavailable(why))) => why,
            Err(_) => format!("no answer within {CLUSTER_PATIENCE:?}; NATS electing a leader?"),
        };
        Err(IngestError::StoreUnavailable(origin.name(
            batch.seq,
            &format!(
                "whose client id {} is could not be read ({why}); send again after a backoff",
                batch.client_id
            ),
        )))
    }

    /// In a cluster, proposes the names of `batch` this gateway has not decided yet and waits
    /// (at most [`CLUSTER_PATIENCE`]) until they are agreed on; then the decisions of every
    /// group and delta (`None` on one node, where validation admits the names itself, or when
    /// some are still undecided, which validation then refuses).
    async fn agree_on_names(
        &self,
        batch: &SpanBatch,
        origin: Origin,
    ) -> Result<Option<Vec<Decided>>, IngestError> {
        let Some(shared) = &self.names else { return Ok(None) };
        let undecided = match self.decide(batch) {
            Ok(decided) => return Ok(Some(decided)),
            Err(undecided) => undecided,
        };
        let n = undecided.len();
        let refused = match tokio::time::timeout(CLUSTER_PATIENCE, shared.propose(undecided)).await {
            Ok(Ok(())) => return Ok(self.decide(batch).ok()),
            Ok(Err(refused)) => refused,
            Err(_) => NamesRefused::Unavailable(format!(
                "no answer within {CLUSTER_PATIENCE:?}; NATS electing a leader?"
            )),
        };
        let why =
            format!("{n} new names could not be agreed on with the cluster's other gateways ({refused})");
        Err(match refused {
            NamesRefused::Full(_) => IngestError::Overloaded(origin.name(batch.seq, &why)),
            NamesRefused::Unavailable(_) => IngestError::StoreUnavailable(
                origin.name(batch.seq, &format!("{why}; send again after a backoff")),
            ),
        })
    }

    /// In a cluster, how this gateway counts the names of every group and then every delta of
    /// `batch` (in that order), or, when some are not decided yet, those names, each once. One
    /// look-up per group: validation takes the decisions instead of looking again. A key that
    /// is not valid gets a placeholder (validation refuses it, naming its place).
    fn decide(&self, batch: &SpanBatch) -> Result<Vec<Decided>, Vec<Names>> {
        let keys =
            batch.groups.iter().map(|g| g.key.as_ref()).chain(batch.deltas.iter().map(|d| d.key.as_ref()));
        let mut decided = Vec::with_capacity(batch.groups.len() + batch.deltas.len());
        let mut seen = std::collections::HashSet::new();
        let mut undecided = Vec::new();
        for key in keys {
            let Ok((service, operation, _, peer)) = check_key(key) else {
                decided.push(Decided::default());
                continue;
            };
            match self.counted(service, operation, peer) {
                Some(c) => decided.push(Decided {
                    key: c.key,
                    service_over: overflowed(c.service, service),
                    operation_over: overflowed(c.operation, operation),
                    peer_over: overflowed(c.peer, peer),
                }),
                None if seen.insert((service, operation, peer)) => undecided.push(Names {
                    service: service.into(),
                    operation: operation.into(),
                    peer: peer.into(),
                }),
                None => {}
            }
        }
        if undecided.is_empty() {
            Ok(decided)
        } else {
            Err(undecided)
        }
    }

    /// A head start on the new names of a batch a stream has read but not submitted yet (an
    /// earlier batch of the stream may still wait): the decisions of its names when every one
    /// is decided, or else the proposal of those that are not, to be awaited before submitting
    /// it (only a hint — submitting looks again and refuses what is still undecided). `None`
    /// on one node.
    fn names_ahead(&self, batch: &SpanBatch) -> Option<NamesAhead<'_>> {
        let shared = self.names.as_ref()?;
        Some(match self.decide(batch) {
            Ok(decided) => NamesAhead::Decided(decided),
            Err(undecided) => NamesAhead::Proposed(Box::pin(async move {
                let _ = tokio::time::timeout(CLUSTER_PATIENCE, shared.propose(undecided)).await;
            })),
        })
    }

    /// The service, operation, series key and peer a span group sent with `service`,
    /// `operation` and `peer` is counted under: on one node as its `cardinality` admits them;
    /// in a cluster as the gateways agreed, `None` when they have not yet.
    fn counted<'a>(&self, service: &'a str, operation: &'a str, peer: &'a str) -> Option<Counted<'a>> {
        let c = &self.cardinality;
        if self.names.is_none() {
            let (service, operation, key) = c.admit(service, operation);
            return Some(Counted { service, operation, key, peer: c.admit_peer(service, peer) });
        }
        let (service, operation, key) = c.decided(service, operation)?;
        Some(Counted { service, operation, key, peer: c.decided_peer(service, peer)? })
    }

    /// [`IngestService::counted`], or what `decided` (found for these very names) says.
    fn counted_as<'a>(
        &self,
        decided: Option<Decided>,
        service: &'a str,
        operation: &'a str,
        peer: &'a str,
    ) -> Option<Counted<'a>> {
        let Some(d) = decided else { return self.counted(service, operation, peer) };
        let or_overflow = |over: bool, sent: &'a str| if over { OVERFLOW } else { sent };
        Some(Counted {
            service: or_overflow(d.service_over, service),
            operation: or_overflow(d.operation_over, operation),
            key: d.key,
            peer: or_overflow(d.peer_over, peer),
        })
    }

    /// Counts a request an adapter could not turn into a batch (`reason`: why, as a label of
    /// `tailscope_batches_rejected_total`).
    pub fn count_undecodable(&self, reason: &'static str) {
        self.metrics.reject_batch(reason);
    }

    /// Counts a refused batch (`spans`: the spans it carried, when refused for overload).
    fn refused(&self, e: &IngestError, spans: u64) {
        let Some(reason) = e.reason() else { return };
        self.metrics.reject_batch(reason);
        if matches!(e, IngestError::Overloaded(_) | IngestError::StoreUnavailable(_)) {
            self.metrics.spans_throttled.get_or_create(&Reason { reason }).inc_by(spans);
        }
    }
}

/// Counts of one batch, applied to the metrics only once the batch is accepted.
#[derive(Debug, Default)]
pub(crate) struct BatchStats {
    pub(crate) accepted: u64,
    pub(crate) clamped: u64,
    pub(crate) rejected: [u64; SpanReject::ALL.len()],
    /// Refused span records, unweighted (what OTLP's `partial_success` counts).
    pub(crate) rejected_records: u64,
    /// Spans that arrived folded in histogram deltas.
    pub(crate) folded: u64,
    /// Spans counted under `__overflow__` (their service or operation reached its cap).
    pub(crate) overflowed: u64,
    /// Span records whose weight was above `ingest.max_span_weight` and was cut to it.
    pub(crate) weight_clamped: u64,
    /// The series keys (group hashes) of the batch.
    pub(crate) keys: Vec<u64>,
}

impl IngestService {
    /// Validates `batch` and computes its routes. Per-span problems are counted in `stats`;
    /// problems with the batch itself are returned as an error naming what was wrong.
    fn validate(
        &self,
        mut batch: SpanBatch,
        stats: &mut BatchStats,
        origin: Origin,
        decided: Option<&[Decided]>,
    ) -> Result<ValidatedBatch, IngestError> {
        // One span may stand for many (its adjusted count under sampling), but not for
        // billions: a weight above the limit is cut to it and counted.
        for span in batch.groups.iter_mut().flat_map(|g| g.spans.iter_mut()) {
            if span.weight > self.max_span_weight {
                span.weight = self.max_span_weight;
                stats.weight_clamped += 1;
            }
        }
        let seq = batch.seq;
        let named = |msg: String| origin.name(seq, &msg);
        let bad = |msg: String| IngestError::Invalid(named(msg));
        if batch.client_id == 0 && origin == Origin::Native {
            return Err(bad("client_id must not be 0".into()));
        }
        if seq == 0 {
            return Err(IngestError::Invalid("batch seq must be at least 1".into()));
        }
        let spans: usize = batch.groups.iter().map(|g| g.spans.len()).sum();
        if spans > self.max_spans {
            return Err(IngestError::TooLarge(named(format!(
                "{spans} spans, more than the limit of {} (ingest.max_spans_per_batch); split the batch",
                self.max_spans
            ))));
        }
        let now = self.clock.now_nanos();
        let limits = self.pipeline.limits();
        let highest = self.pipeline.layout().highest();
        let shards = self.pipeline.shard_count();
        let mut targets = Vec::new();
        let mut groups = Vec::with_capacity(batch.groups.len());
        for (i, group) in batch.groups.iter().enumerate() {
            let (sent_service, sent_operation, kind, sent_peer) =
                check_key(group.key.as_ref()).map_err(|m| bad(format!("group {i}: {m}")))?;
            let Counted { service, operation, key, peer } = self
                .counted_as(decided.and_then(|d| d.get(i).copied()), sent_service, sent_operation, sent_peer)
                .ok_or_else(|| not_agreed(named(format!("group {i}"))))?;
            let service_overflow = overflowed(service, sent_service);
            let overflow = overflowed(operation, sent_operation);
            let peer_overflow = overflowed(peer, sent_peer);
            if overflow || service_overflow || peer_overflow {
                stats.overflowed += group.spans.iter().map(|s| u64::from(s.weight.max(1))).sum::<u64>();
            }
            let route = GroupRoute {
                overflow,
                service_overflow,
                peer_overflow,
                ..GroupRoute::counted(key, service, operation, kind, peer, &group.spans, shards)
            };
            targets.push(route.shard);
            stats.keys.push(route.key);
            groups.push(route);
            for span in &group.spans {
                let weight = u64::from(span.weight.max(1));
                match limits.classify(span.start_unix_nanos, span.duration_nanos, now) {
                    Ok(_) => {
                        stats.accepted += weight;
                        if span.duration_nanos as u64 > highest {
                            stats.clamped += weight;
                        }
                    }
                    Err(reason) => {
                        stats.rejected[reason.index()] += weight;
                        stats.rejected_records += 1;
                    }
                }
            }
        }
        let mut deltas = Vec::with_capacity(batch.deltas.len());
        for (i, delta) in batch.deltas.iter().enumerate() {
            let (sent_service, sent_operation, kind, sent_peer) =
                check_key(delta.key.as_ref()).map_err(|m| bad(format!("delta {i}: {m}")))?;
            let at = batch.groups.len() + i;
            let Counted { service, operation, key: hash, peer } = self
                .counted_as(decided.and_then(|d| d.get(at).copied()), sent_service, sent_operation, sent_peer)
                .ok_or_else(|| not_agreed(named(format!("delta {i}"))))?;
            let overflow = overflowed(service, sent_service)
                || overflowed(operation, sent_operation)
                || overflowed(peer, sent_peer);
            let histogram = Histogram::decode(&delta.histogram)
                .map_err(|e| bad(format!("delta {i} ({service}/{operation}): {e}")))?;
            let window = delta.window_start_unix_seconds;
            if window.rem_euclid(tailscope_proto::BASE_WINDOW_SECONDS) != 0 {
                return Err(bad(format!(
                    "delta {i} ({service}/{operation}): window_start_unix_seconds {window} is not a multiple of {}",
                    tailscope_proto::BASE_WINDOW_SECONDS
                )));
            }
            // A window is in range when any instant of it is.
            let window_nanos = window.saturating_mul(1_000_000_000);
            let last = window_nanos.saturating_add(tailscope_proto::BASE_WINDOW_SECONDS * 1_000_000_000 - 1);
            let fits = limits.window_of(last, now).is_ok() || limits.window_of(window_nanos, now).is_ok();
            // Counts are the sender's word: a hostile one must not overflow the batch's totals.
            let count = histogram.count();
            let overflows = |total: u64| {
                total.checked_add(count).ok_or_else(|| {
                    bad(format!(
                        "delta {i} ({service}/{operation}): a count of {count} overflows the batch's total"
                    ))
                })
            };
            if !fits {
                let reason = limits.window_of(window_nanos, now).err().unwrap_or(SpanReject::TooOld);
                stats.rejected[reason.index()] = overflows(stats.rejected[reason.index()])?;
                continue;
            }
            if histogram.is_empty() {
                continue;
            }
            stats.accepted = overflows(stats.accepted)?;
            stats.clamped = stats.clamped.saturating_add(histogram.clamped());
            if overflow {
                stats.overflowed = stats.overflowed.saturating_add(count);
            }
            let self_times = self_histogram(delta, kind, count)
                .map_err(|e| bad(format!("delta {i} ({service}/{operation}): self_histogram: {e}")))?;
            let status = SpanStatus::from_wire(delta.status);
            stats.folded = stats.folded.saturating_add(count);
            stats.keys.push(hash);
            let shard = series::partition(hash, shards) as u32;
            targets.push(shard);
            let labels =
                SeriesLabels { kind, peer: peer.to_owned(), ..SeriesLabels::new(service, operation, status) };
            if let Some(histogram) = self_times {
                let labels = labels.self_time();
                deltas.push(RoutedDelta {
                    key: hash,
                    shard,
                    series: labels.id(),
                    labels,
                    window_start: window,
                    histogram,
                });
            }
            deltas.push(RoutedDelta {
                key: hash,
                shard,
                series: labels.id(),
                labels,
                window_start: window,
                histogram,
            });
        }
        targets.sort_unstable();
        targets.dedup();
        Ok(ValidatedBatch { client_id: batch.client_id, seq, now, batch, groups, deltas, targets, owner: 0 })
    }

    /// Gives OpenTelemetry spans the other end of their calls ([`otlp::pairing`]), counted.
    fn pair(&self, batch: &mut SpanBatch) {
        let paired = self.pairing.pair(batch, self.clock.now_nanos());
        let m = &self.metrics;
        for (side, n, unpaired) in [
            ("server", paired.servers, paired.servers_unpaired),
            ("client", paired.clients, paired.clients_unpaired),
        ] {
            if n > 0 {
                m.topology_paired_spans.get_or_create(&SideLabel { side }).inc_by(n);
            }
            if unpaired > 0 {
                m.topology_unpaired_spans.get_or_create(&SideLabel { side }).inc_by(unpaired);
            }
        }
    }

    /// Feeds the sampler with what an admitted batch carried (refused batches are not traffic
    /// the budget has to cover): a cluster gateway's way; a single node's shards tell the
    /// sampler what they recorded instead ([`crate::traffic::TrafficSink`]).
    fn observe(&self, batch: &ValidatedBatch) {
        for (group, route) in batch.batch.groups.iter().zip(&batch.groups) {
            let Some(key) = group.key.as_ref() else { continue };
            let service = if route.service_overflow { OVERFLOW } else { key.service.as_str() };
            let operation = if route.overflow { OVERFLOW } else { key.operation.as_str() };
            self.sampler.observe_full(
                route.key,
                service,
                operation,
                group.spans.iter().map(|s| (s.duration_nanos, u64::from(s.weight.max(1)))),
            );
        }
        for delta in batch.deltas.iter().filter(|d| d.labels.measure == series::Measure::Duration) {
            self.sampler.observe_folded(
                delta.key,
                &delta.labels.service,
                &delta.labels.operation,
                &delta.histogram,
            );
        }
    }

    fn record_accepted(&self, stats: &BatchStats) {
        let m = &self.metrics;
        m.batches.get_or_create(&Outcome { result: "accepted" }).inc();
        m.spans_accepted.inc_by(stats.accepted);
        m.spans_received.get_or_create(&Form { form: "full" }).inc_by(stats.accepted - stats.folded);
        m.spans_received.get_or_create(&Form { form: "folded" }).inc_by(stats.folded);
        m.spans_clamped.inc_by(stats.clamped);
        m.spans_overflowed.inc_by(stats.overflowed);
        m.span_weights_clamped.inc_by(stats.weight_clamped);
        for reason in SpanReject::ALL {
            let n = stats.rejected[reason.index()];
            if n > 0 {
                m.spans_rejected.get_or_create(&Reason { reason: reason.as_str() }).inc_by(n);
            }
        }
    }

    fn throttle(&self) -> Option<Throttle> {
        let pressure = self.pipeline.pressure();
        (pressure >= self.throttle_high_water).then(|| Throttle {
            delay_millis: (100.0 * pressure / self.throttle_high_water.max(0.01)) as u32,
            reason: format!("shard queues {:.0}% full", pressure * 100.0),
        })
    }
}

/// How long a batch waits for space in full shard queues before it is refused. While it
/// waits, the stream is not read, so HTTP/2 flow control pushes back on the client: short
/// bursts are absorbed, sustained overload is refused with RESOURCE_EXHAUSTED.
const ADMISSION_PATIENCE: std::time::Duration = std::time::Duration::from_millis(250);

impl IngestService {
    /// Offers a batch, waiting up to [`ADMISSION_PATIENCE`] for queue space; also returns the
    /// epoch an accepted batch is durable with.
    async fn admit(&self, mut batch: Arc<ValidatedBatch>) -> (Admission, u64) {
        let deadline = tokio::time::Instant::now() + ADMISSION_PATIENCE;
        loop {
            match self.pipeline.admit(batch) {
                Ok(outcome) => return outcome,
                Err(_) if tokio::time::Instant::now() >= deadline => return (Admission::Overloaded, 0),
                Err(back) => batch = back,
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    }
}

/// How long a batch waits for the cluster's gateways to agree (on its new names, on whose
/// its client id is) before it is refused (UNAVAILABLE: send again). Below the 5 s a client
/// waits for a reply.
const CLUSTER_PATIENCE: std::time::Duration = std::time::Duration::from_secs(3);

/// Why a batch naming `client` is refused to a credential that does not own it.
fn not_owner(client: u64) -> String {
    format!("client id {client} belongs to another credential (the one that first used it)")
}

/// The names one span group is counted under ([`IngestService::counted`]).
struct Counted<'a> {
    service: &'a str,
    operation: &'a str,
    /// The [`series::group_hash`] of `service` and `operation`.
    key: u64,
    peer: &'a str,
}

/// How a gateway counts one group's or delta's names, found before validation
/// ([`IngestService::decide`]): the group hash as counted and which names went over their caps
/// (counted as [`OVERFLOW`]).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Decided {
    key: u64,
    service_over: bool,
    operation_over: bool,
    peer_over: bool,
}

/// What [`IngestService::names_ahead`] found of a batch read ahead.
pub(crate) enum NamesAhead<'a> {
    /// Every name is decided: these are the decisions, group by group then delta by delta.
    Decided(Vec<Decided>),
    /// Some are not: their proposal, to await before submitting the batch.
    Proposed(Pin<Box<dyn Future<Output = ()> + Send + 'a>>),
}

/// The refusal of a batch whose names (of `what`) the gateways have not agreed on. Once
/// [`IngestService::agree_on_names`] answered every name is decided (a decision never goes
/// back), so this is a refusal in place of a guess, not a path taken.
fn not_agreed(what: String) -> IngestError {
    IngestError::StoreUnavailable(format!(
        "{what}: its names are not yet agreed on with the cluster's other gateways; send again"
    ))
}

/// Whether admission counted a name as something else than the `sent` one: it hands back the
/// very reference it was given unless the name went over its cap, so comparing the references
/// is enough (and spares a string compare per name and group).
fn overflowed(counted: &str, sent: &str) -> bool {
    !std::ptr::eq(counted, sent)
}

/// The self-time histogram a delta carries, when it is one of the service's own work and not
/// empty. It times some of the spans its histogram counts, so it can count no more of them.
fn self_histogram(
    delta: &HistogramDelta,
    kind: series::Kind,
    spans: u64,
) -> Result<Option<Histogram>, String> {
    if delta.self_histogram.is_empty() || kind.is_outgoing() {
        return Ok(None);
    }
    let histogram = Histogram::decode(&delta.self_histogram).map_err(|e| e.to_string())?;
    if histogram.count() > spans {
        return Err(format!(
            "counts {} spans, more than the {spans} the delta's histogram counts",
            histogram.count()
        ));
    }
    Ok((!histogram.is_empty()).then_some(histogram))
}

fn check_key(key: Option<&SeriesKey>) -> Result<(&str, &str, series::Kind, &str), String> {
    let key = key.ok_or("missing series key")?;
    for (name, value) in [("service", &key.service), ("operation", &key.operation)] {
        if value.is_empty() {
            return Err(format!("empty {name} name"));
        }
        if value.len() > MAX_LABEL_BYTES {
            return Err(format!("{name} name is {} bytes, longer than {MAX_LABEL_BYTES}", value.len()));
        }
    }
    if key.peer.len() > MAX_LABEL_BYTES {
        return Err(format!("peer name is {} bytes, longer than {MAX_LABEL_BYTES}", key.peer.len()));
    }
    Ok((&key.service, &key.operation, series::Kind::from_wire(key.kind), &key.peer))
}

#[cfg(test)]
mod tests;
