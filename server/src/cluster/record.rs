//! Log records: a validated batch cut into one record per partition ([`split`]), and a record
//! turned back into the batch a store's pipeline admits ([`rebuild`]).
//!
//! A record names its series as counted (a name over its cardinality cap is already
//! `__overflow__`) and carries the gateway's classification instant, so what a store computes
//! from it does not depend on the store's own limits, clock or history.

use prost::Message;
use tailscope_proto::histogram::Histogram;
use tailscope_proto::v1::{LogRecord, LoggedDelta, PartitionBatch, SeriesKey, Span, SpanBatch, SpanStatus};

use crate::cardinality::OVERFLOW;
use crate::pipeline::{GroupRoute, RoutedDelta, ValidatedBatch};
use crate::series::{self, Kind, Measure, SeriesLabels, Status};

/// Cuts `batch` (routed among the cluster's partitions: a route's shard is its partition) into
/// one record per partition it touches, in ascending partition order, each encoded as a
/// [`LogRecord`]. The spans are encoded from the batch as they are, never copied into records
/// of their own first: a gateway's work per span is one encoding.
pub fn split(batch: &ValidatedBatch) -> Vec<(u32, Vec<u8>)> {
    struct Part<'a> {
        header: LogRecord,
        groups: Vec<(SeriesKey, &'a [Span])>,
    }
    let mut out: Vec<(u32, Part<'_>)> = batch
        .targets
        .iter()
        .map(|&p| {
            let header = LogRecord {
                client_id: batch.client_id,
                seq: batch.seq,
                now_unix_nanos: batch.now,
                groups: Vec::new(),
                deltas: Vec::new(),
            };
            (p, Part { header, groups: Vec::new() })
        })
        .collect();
    fn slot<'a, 'b>(out: &'b mut [(u32, Part<'a>)], p: u32) -> &'b mut Part<'a> {
        let i = out.partition_point(|(q, _)| *q < p);
        &mut out[i].1
    }
    let counted = |sent: &str, over: bool| if over { OVERFLOW.to_owned() } else { sent.to_owned() };
    for (group, route) in batch.batch.groups.iter().zip(&batch.groups) {
        let Some(key) = group.key.as_ref() else { continue };
        let key = SeriesKey {
            service: counted(&key.service, route.service_overflow),
            operation: counted(&key.operation, route.overflow),
            kind: route.kind as i32,
            peer: counted(&key.peer, route.peer_overflow),
        };
        slot(&mut out, route.shard).groups.push((key, &group.spans));
    }
    for delta in &batch.deltas {
        let l = &delta.labels;
        let status = match l.status {
            Status::Ok => SpanStatus::Ok,
            Status::Error => SpanStatus::Error,
        };
        slot(&mut out, delta.shard).header.deltas.push(LoggedDelta {
            key: Some(SeriesKey {
                service: l.service.clone(),
                operation: l.operation.clone(),
                kind: l.kind as i32,
                peer: l.peer.clone(),
            }),
            status: status as i32,
            self_time: l.measure == Measure::SelfTime,
            window_start_unix_seconds: delta.window_start,
            histogram: delta.histogram.to_bytes(),
        });
    }
    out.retain(|(_, r)| !r.groups.is_empty() || !r.header.deltas.is_empty());
    out.into_iter().map(|(p, part)| (p, encode_record(&part.header, &part.groups))).collect()
}

/// `header` (a record without groups) with `groups` as its field 4, encoded: what a
/// [`LogRecord`] holding them decodes from (its fields in another order, which protobuf
/// leaves free). Each span's length is computed once.
fn encode_record(header: &LogRecord, groups: &[(SeriesKey, &[Span])]) -> Vec<u8> {
    use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, message, WireType};
    let span_lens: Vec<usize> =
        groups.iter().flat_map(|(_, spans)| spans.iter().map(Message::encoded_len)).collect();
    let mut lens = span_lens.iter();
    let group_lens: Vec<usize> = groups
        .iter()
        .map(|(key, spans)| {
            let spans: usize = spans
                .iter()
                .zip(lens.by_ref())
                .map(|(_, &l)| key_len(2) + encoded_len_varint(l as u64) + l)
                .sum();
            message::encoded_len(1, key) + spans
        })
        .collect();
    let size = header.encoded_len()
        + group_lens.iter().map(|&l| key_len(4) + encoded_len_varint(l as u64) + l).sum::<usize>();
    let mut buf = Vec::with_capacity(size);
    header.encode_raw(&mut buf);
    let mut lens = span_lens.iter();
    for ((key, spans), &len) in groups.iter().zip(&group_lens) {
        encode_key(4, WireType::LengthDelimited, &mut buf);
        encode_varint(len as u64, &mut buf);
        message::encode(1, key, &mut buf);
        for (span, &l) in spans.iter().zip(lens.by_ref()) {
            encode_key(2, WireType::LengthDelimited, &mut buf);
            encode_varint(l as u64, &mut buf);
            span.encode_raw(&mut buf);
        }
    }
    debug_assert_eq!(buf.len(), size);
    buf
}

/// One log message: a [`PartitionBatch`] of `records` (each an encoded [`LogRecord`], as
/// [`split`] gives them), assembled without decoding them.
pub fn message(gateway: &str, gateway_seq: u64, partition: u32, records: &[Vec<u8>]) -> Vec<u8> {
    use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};
    let header = PartitionBatch { gateway: gateway.to_owned(), gateway_seq, partition, records: Vec::new() };
    let size = header.encoded_len()
        + records.iter().map(|r| key_len(4) + encoded_len_varint(r.len() as u64) + r.len()).sum::<usize>();
    let mut buf = Vec::with_capacity(size);
    header.encode_raw(&mut buf);
    for r in records {
        encode_key(4, WireType::LengthDelimited, &mut buf);
        encode_varint(r.len() as u64, &mut buf);
        buf.extend_from_slice(r);
    }
    buf
}

/// The header naming how a log message's payload is compressed; without it, the payload is the
/// [`PartitionBatch`] as encoded.
pub const ENCODING_HEADER: &str = "Tailscope-Encoding";

/// [`ENCODING_HEADER`]'s value for a payload in Snappy's raw block format.
pub const SNAPPY: &str = "snappy";

/// The most bytes a compressed log message may say it holds: a gateway's messages hold
/// `cluster.max_message_bytes` and one batch more, far below it. A payload claiming more is
/// refused before anything is allocated for it.
pub const MAX_DECOMPRESSED_BYTES: usize = 256 << 20;

/// `message` Snappy-compressed, or `None` when that would not make it smaller.
pub fn compress(message: &[u8]) -> Option<Vec<u8>> {
    let packed = snap::raw::Encoder::new().compress_vec(message).ok()?;
    (packed.len() < message.len()).then_some(packed)
}

/// Why a log message's payload cannot be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unreadable {
    /// It names a compression this build does not know (a newer gateway's): it is kept, to be
    /// read once the store is upgraded.
    UnknownEncoding(String),
    /// It does not decompress or claims too much: skipped, as an undecodable message is.
    Corrupt(String),
}

/// The [`PartitionBatch`] bytes of a payload published with `encoding` ([`ENCODING_HEADER`]).
pub fn decompress(payload: &bytes::Bytes, encoding: Option<&str>) -> Result<bytes::Bytes, Unreadable> {
    match encoding {
        None => Ok(payload.clone()),
        Some(SNAPPY) => {
            let len = snap::raw::decompress_len(payload)
                .map_err(|e| Unreadable::Corrupt(format!("snappy: {e}")))?;
            if len > MAX_DECOMPRESSED_BYTES {
                return Err(Unreadable::Corrupt(format!(
                    "snappy: it claims {len} bytes, more than the {MAX_DECOMPRESSED_BYTES} a log message may hold"
                )));
            }
            let plain = snap::raw::Decoder::new()
                .decompress_vec(payload)
                .map_err(|e| Unreadable::Corrupt(format!("snappy: {e}")))?;
            Ok(plain.into())
        }
        Some(other) => Err(Unreadable::UnknownEncoding(other.to_owned())),
    }
}

/// The records of a log message: its `payload` decompressed as its `headers`'
/// [`ENCODING_HEADER`] says, then decoded (a payload that does not decode is
/// [`Unreadable::Corrupt`] too).
pub fn open(
    payload: &bytes::Bytes,
    headers: Option<&async_nats::HeaderMap>,
) -> Result<PartitionBatch, Unreadable> {
    let encoding = headers.and_then(|h| h.get(ENCODING_HEADER)).map(|v| v.as_str());
    PartitionBatch::decode(decompress(payload, encoding)?)
        .map_err(|e| Unreadable::Corrupt(format!("protobuf: {e}")))
}

/// The batch a store admits for `record` of partition `partition`, routed among `shards`
/// shards. Its client id is the (client, partition) one ([`super::client_key`]). A record that
/// does not hold together (no key, an undecodable histogram) is named in the error.
pub fn rebuild(record: LogRecord, partition: u32, shards: usize) -> Result<ValidatedBatch, String> {
    let client_id = super::client_key(record.client_id, partition);
    let mut routes = Vec::with_capacity(record.groups.len());
    let mut targets = Vec::new();
    for (i, group) in record.groups.iter().enumerate() {
        let key = group.key.as_ref().ok_or_else(|| format!("group {i}: no key"))?;
        let route = GroupRoute::counted(
            crate::series::group_hash(&key.service, &key.operation),
            &key.service,
            &key.operation,
            Kind::from_wire(key.kind),
            &key.peer,
            &group.spans,
            shards,
        );
        targets.push(route.shard);
        routes.push(route);
    }
    let mut deltas = Vec::with_capacity(record.deltas.len());
    for (i, delta) in record.deltas.into_iter().enumerate() {
        let key = delta.key.ok_or_else(|| format!("delta {i}: no key"))?;
        let histogram = Histogram::decode(&delta.histogram).map_err(|e| format!("delta {i}: {e}"))?;
        let kind = Kind::from_wire(key.kind);
        let labels = SeriesLabels {
            kind,
            peer: key.peer,
            ..SeriesLabels::new(key.service, key.operation, Status::from_wire(delta.status))
        };
        let labels = if delta.self_time { labels.self_time() } else { labels };
        let hash = series::group_hash(&labels.service, &labels.operation);
        let shard = series::partition(hash, shards) as u32;
        targets.push(shard);
        deltas.push(RoutedDelta {
            key: hash,
            shard,
            series: labels.id(),
            labels,
            window_start: delta.window_start_unix_seconds,
            histogram,
        });
    }
    targets.sort_unstable();
    targets.dedup();
    let batch = SpanBatch {
        client_id: record.client_id,
        seq: record.seq,
        groups: record.groups,
        ..Default::default()
    };
    Ok(ValidatedBatch {
        client_id,
        seq: record.seq,
        now: record.now_unix_nanos,
        batch,
        groups: routes,
        deltas,
        targets,
        owner: 0,
    })
}
