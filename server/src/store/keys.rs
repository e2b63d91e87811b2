//! The store's key and value codecs: big-endian, so that one series' windows within a
//! partition are one contiguous range and partitions sort by time.

use super::{Exemplar, Resolution};

/// Exemplars are partitioned by the hour, like 10-second windows.
pub(super) const EXEMPLAR_PARTITION_SECONDS: i64 = 3600;

/// The key of one series' window.
pub fn window_key(res: Resolution, series: u64, window_start: i64) -> [u8; 20] {
    let start = window_start.max(0);
    raw_key(start / res.partition_seconds(), series, start)
}

pub(super) fn raw_key(partition: i64, series: u64, t: i64) -> [u8; 20] {
    let mut k = [0u8; 20];
    let partition = u32::try_from(partition).unwrap_or(u32::MAX);
    k[..4].copy_from_slice(&partition.to_be_bytes());
    k[4..12].copy_from_slice(&series.to_be_bytes());
    k[12..].copy_from_slice(&(t.max(0) as u64).to_be_bytes());
    k
}

pub(super) fn window_of_key(key: &[u8]) -> Option<i64> {
    let b: [u8; 8] = key.get(12..20)?.try_into().ok()?;
    i64::try_from(u64::from_be_bytes(b)).ok()
}

impl Exemplar {
    /// Partition ‖ series ‖ window ‖ a mix of trace and span id (so spans that share a span id
    /// in different traces do not overwrite each other).
    pub(super) fn key(&self) -> [u8; 28] {
        let mut k = [0u8; 28];
        k[..20].copy_from_slice(&raw_key(
            self.window_start.max(0) / EXEMPLAR_PARTITION_SECONDS,
            self.series,
            self.window_start,
        ));
        let id = self.span_id ^ self.trace_id_low.rotate_left(21) ^ self.trace_id_high.rotate_left(42);
        k[20..].copy_from_slice(&id.to_be_bytes());
        k
    }

    pub(super) fn value(&self) -> [u8; 48] {
        let mut v = [0u8; 48];
        for (i, x) in [
            self.trace_id_high,
            self.trace_id_low,
            self.span_id,
            self.start_unix_nanos as u64,
            self.duration_nanos as u64,
            self.adjusted_count.to_bits(),
        ]
        .into_iter()
        .enumerate()
        {
            v[i * 8..i * 8 + 8].copy_from_slice(&x.to_be_bytes());
        }
        v
    }

    pub(super) fn decode(key: &[u8], value: &[u8]) -> Option<Exemplar> {
        let be =
            |b: &[u8], at: usize| b.get(at..at + 8).and_then(|x| x.try_into().ok()).map(u64::from_be_bytes);
        // Values written before adjusted counts were kept are 40 bytes long.
        if key.len() != 28 || (value.len() != 48 && value.len() != 40) {
            return None;
        }
        Some(Exemplar {
            series: be(key, 4)?,
            window_start: be(key, 12)? as i64,
            trace_id_high: be(value, 0)?,
            trace_id_low: be(value, 8)?,
            span_id: be(value, 16)?,
            start_unix_nanos: be(value, 24)? as i64,
            duration_nanos: be(value, 32)? as i64,
            adjusted_count: be(value, 40).map_or(0.0, f64::from_bits),
        })
    }
}
