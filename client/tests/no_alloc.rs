//! Recording allocates nothing once an operation name is known: counted by a global allocator
//! that counts every allocation of the process (the exporter is idle: no server, and its next
//! turn is an hour away).
#![allow(clippy::unwrap_used)]

use std::alloc::System;
use std::time::Duration;

use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use tailscope::{Client, Ids, Status};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

#[test]
fn recording_a_span_allocates_nothing() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let client = Client::builder()
        .endpoint(format!("http://{closed}"))
        .service("alloc")
        .configure(|c| {
            c.poll_interval = Duration::from_secs(3600);
            c.max_batch_delay = Duration::from_secs(3600);
            c.backoff_base = Duration::from_secs(3600);
        })
        .build()
        .unwrap();
    // Let the exporter's first turn (one failed connection attempt) finish, and learn the names.
    std::thread::sleep(Duration::from_millis(500));
    client.record("GET /a", Duration::from_micros(5), Status::Ok);
    drop(client.start("GET /b"));

    let region = Region::new(GLOBAL);
    for i in 0..10_000u64 {
        client.record("GET /a", Duration::from_micros(i), Status::Ok);
        let mut guard = client.start("GET /b");
        if i % 10 == 0 {
            guard.error();
        }
        drop(guard);
        client.record_with(
            "GET /a",
            Duration::from_micros(i),
            Status::Error,
            Ids { trace_id: 7, span_id: 8, parent_span_id: 9 },
        );
    }
    let stats = region.change();
    assert_eq!((stats.allocations, stats.reallocations), (0, 0), "{stats:?}");
    assert_eq!(client.stats().recorded, 30_002);
}
