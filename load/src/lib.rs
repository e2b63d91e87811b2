//! `tailscope-load` as a library: the traffic scenarios and the demo, so tests can run them
//! against an in-process server.

pub mod api;
pub mod demo;
pub mod plot;
pub mod run;
