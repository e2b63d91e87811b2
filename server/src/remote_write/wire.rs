//! Prometheus remote write 1.0 on the wire: the `prometheus.WriteRequest` messages (the subset
//! tailscope sends: labels, float samples and integer native histograms), snappy block
//! compression, and the mapping of tailscope's histogram buckets onto a native histogram's
//! exponential buckets.

use std::collections::BTreeMap;

/// `prometheus.WriteRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WriteRequest {
    /// The series.
    #[prost(message, repeated, tag = "1")]
    pub timeseries: Vec<TimeSeries>,
}

/// `prometheus.TimeSeries`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TimeSeries {
    /// Sorted by name, `__name__` included.
    #[prost(message, repeated, tag = "1")]
    pub labels: Vec<Label>,
    /// Float samples.
    #[prost(message, repeated, tag = "2")]
    pub samples: Vec<Sample>,
    /// Native histogram samples.
    #[prost(message, repeated, tag = "4")]
    pub histograms: Vec<Histogram>,
}

/// `prometheus.Label`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Label {
    /// Its name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// Its value.
    #[prost(string, tag = "2")]
    pub value: String,
}

/// `prometheus.Sample`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Sample {
    /// The value.
    #[prost(double, tag = "1")]
    pub value: f64,
    /// Milliseconds since the epoch.
    #[prost(int64, tag = "2")]
    pub timestamp: i64,
}

/// `prometheus.Histogram`, integer counts only.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Histogram {
    /// `count_int`: every observation, the zero bucket's included.
    #[prost(uint64, tag = "1")]
    pub count_int: u64,
    /// Sum of the observations.
    #[prost(double, tag = "3")]
    pub sum: f64,
    /// Bucket schema: each power of two is split into 2^schema buckets.
    #[prost(sint32, tag = "4")]
    pub schema: i32,
    /// Width of the zero bucket.
    #[prost(double, tag = "5")]
    pub zero_threshold: f64,
    /// `zero_count_int`.
    #[prost(uint64, tag = "6")]
    pub zero_count_int: u64,
    /// Runs of consecutive positive buckets.
    #[prost(message, repeated, tag = "11")]
    pub positive_spans: Vec<BucketSpan>,
    /// Each positive bucket's count as the difference to the one before.
    #[prost(sint64, repeated, tag = "12")]
    pub positive_deltas: Vec<i64>,
    /// `reset_hint`: 0, unknown (the receiver detects resets).
    #[prost(int32, tag = "14")]
    pub reset_hint: i32,
    /// Milliseconds since the epoch.
    #[prost(int64, tag = "15")]
    pub timestamp: i64,
}

/// `prometheus.BucketSpan`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct BucketSpan {
    /// Gap to the previous span (or the first bucket's index).
    #[prost(sint32, tag = "1")]
    pub offset: i32,
    /// How many consecutive buckets.
    #[prost(uint32, tag = "2")]
    pub length: u32,
}

/// Prometheus' default zero-bucket width: only zero durations land in it.
pub const ZERO_THRESHOLD: f64 = 2.938_735_877_055_719e-39;

/// The index of the native bucket of `schema` holding `value` (> 0): bucket `i` holds
/// `(2^((i-1)/2^schema), 2^(i/2^schema)]`.
pub fn native_index(value: f64, schema: i32) -> i32 {
    let scaled = value.log2() * 2f64.powi(schema);
    // Bounds are exact powers: values right at one belong to the bucket below.
    let i = scaled.ceil();
    i.clamp(f64::from(i32::MIN), f64::from(i32::MAX)) as i32
}

/// A native histogram sample of `buckets` (index → count).
pub fn native_histogram(
    buckets: &BTreeMap<i32, u64>,
    zero: u64,
    sum: f64,
    schema: i32,
    timestamp: i64,
) -> Histogram {
    let mut spans: Vec<BucketSpan> = Vec::new();
    let mut deltas = Vec::with_capacity(buckets.len());
    let (mut previous_index, mut previous_count): (Option<i32>, i64) = (None, 0);
    for (&index, &count) in buckets {
        match previous_index {
            Some(p) if index == p + 1 => {
                if let Some(last) = spans.last_mut() {
                    last.length += 1;
                }
            }
            Some(p) => spans.push(BucketSpan { offset: index - p - 1, length: 1 }),
            None => spans.push(BucketSpan { offset: index, length: 1 }),
        }
        let count = i64::try_from(count).unwrap_or(i64::MAX);
        deltas.push(count - previous_count);
        previous_count = count;
        previous_index = Some(index);
    }
    Histogram {
        count_int: buckets.values().sum::<u64>() + zero,
        sum,
        schema,
        zero_threshold: ZERO_THRESHOLD,
        zero_count_int: zero,
        positive_spans: spans,
        positive_deltas: deltas,
        reset_hint: 0,
        timestamp,
    }
}

/// A request's body: the protobuf encoding, snappy-compressed (block format).
pub fn encode(request: &WriteRequest) -> Result<Vec<u8>, snap::Error> {
    snap::raw::Encoder::new().compress_vec(&prost::Message::encode_to_vec(request))
}
