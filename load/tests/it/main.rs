//! The load tool's integration tests, in one binary: its scenarios, `demo`, `chaos`,
//! `freshness` and `compare` commands against real servers on 127.0.0.1:0.

mod chaos;
mod compare;
mod demo;
mod freshness;
mod scenarios;
