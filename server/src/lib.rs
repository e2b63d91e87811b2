//! tailscope: a tail-latency aggregator. Services stream spans over gRPC; tailscope keeps exact,
//! mergeable latency histograms per series and time window in an embedded RocksDB and answers
//! queries over HTTP.
//!
//! The modules read as the data flow: [`ingest`] → [`pipeline`] (shards) → [`store`];
//! [`http`] → [`query`] → [`store`]. In cluster mode [`cluster`] puts a replicated log between
//! ingest and the pipeline. [`app`] wires them together; `main.rs` only parses flags.

pub mod alerting;
pub mod app;
pub mod auth;
pub mod cardinality;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod files;
pub mod http;
pub mod ingest;
pub mod listener;
pub mod pipeline;
pub mod query;
pub mod reload;
pub mod remote_write;
pub mod sampling;
pub mod series;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod traffic;

pub use app::{Server, StartError};
pub use config::Config;
