//! The server's integration tests, in one binary (each binary links RocksDB): real servers
//! in-process or as child processes on 127.0.0.1:0, real clients and real peers.
//!
//! The long scenarios — overload minutes, a receiver down for minutes, pauses, a full disk,
//! the Alertmanager timing comparison — are the soak suite: marked `#[ignore = "soak: …"]`,
//! they run with `cargo test --workspace --test it -- --ignored` (the test script
//! runs them after the fast suite).

#[path = "../common/mod.rs"]
mod common;

mod alerting;
mod auth;
mod bounded;
mod chaos;
mod cli;
mod client;
mod cluster;
mod crash;
mod incidents;
mod ingest;
mod malformed;
mod otlp;
mod overload;
mod pagers;
mod prometheus_api;
mod remote_write;
mod self_time;
mod tls;
mod topology;
