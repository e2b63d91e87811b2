//! `tailscope-load` as a library: the traffic scenarios, so tests can run them against an
//! in-process server.

pub mod run;
