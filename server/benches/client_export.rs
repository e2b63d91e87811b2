//! The client's own cost of exporting: a real in-process tailscope server, one thread recording
//! 1 M spans/s for 10 s through `tailscope::Client::record`, everything sent in full. Reports
//! the CPU time of the client's exporter thread and of the recording thread per million spans
//! (from /proc), and the peak RSS of the whole process (server included, so an upper bound).
//!
//! `cargo bench -p tailscope-server --bench client_export`; `TAILSCOPE_BENCH_BUDGET=10000`
//! sets the server's sampling budget (full spans per second; 1 % of the offered load) to
//! compare the server's CPU with sampling against without (the default budget here is
//! unlimited).
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use tailscope::{Client, Status};
use tailscope_server::{Config, Server};

/// CPU seconds (user + system) of the threads whose name starts with `prefix`.
fn thread_cpu(prefix: &str) -> f64 {
    let ticks = 100.0; // USER_HZ on Linux
    let mut total = 0.0;
    for entry in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if !comm.trim_end().starts_with(prefix) {
            continue;
        }
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let after = &stat[stat.rfind(')').map_or(0, |i| i + 2)..];
        let fields: Vec<&str> = after.split(' ').collect();
        let utime: f64 = fields[11].parse().unwrap();
        let stime: f64 = fields[12].parse().unwrap();
        total += (utime + stime) / ticks;
    }
    total
}

/// CPU seconds (user + system) of the whole process.
fn process_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let after = &stat[stat.rfind(')').map_or(0, |i| i + 2)..];
    let fields: Vec<&str> = after.split(' ').collect();
    (fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap()) / 100.0
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap();
    kb / 1024.0
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.server.grpc_addr = "127.0.0.1:0".parse().unwrap();
    config.server.http_addr = "127.0.0.1:0".parse().unwrap();
    config.server.otlp_http_addr = "127.0.0.1:0".parse().unwrap();
    config.server.data_dir = dir.path().to_path_buf();
    config.sampling.budget =
        std::env::var("TAILSCOPE_BENCH_BUDGET").ok().and_then(|b| b.parse().ok()).unwrap_or(1e12);
    let server = runtime.block_on(Server::start(config)).unwrap();
    let client = Client::builder()
        .endpoint(format!("http://{}", server.grpc_addr()))
        .service("bench")
        .build()
        .unwrap();
    // Connected before the clock starts.
    runtime.block_on(client.flush()).unwrap();

    let (rate, seconds) = (1_000_000u64, 10u64);
    let recorder = std::thread::Builder::new()
        .name("bench-recorder".into())
        .spawn({
            let client = client.clone();
            move || {
                let ops = ["GET /a", "GET /b", "POST /c", "GET /d", "PUT /e"];
                let started = Instant::now();
                let mut n = 0u64;
                while n < rate * seconds {
                    // 1,000 spans per millisecond, paced to the wall clock.
                    let due = started + Duration::from_micros(n * 1_000_000 / rate);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    for i in 0..1_000u64 {
                        client.record(
                            ops[(i % 5) as usize],
                            Duration::from_micros(200 + (n + i) % 5_000),
                            Status::Ok,
                        );
                    }
                    n += 1_000;
                }
                (started.elapsed(), thread_cpu("bench-recorder"))
            }
        })
        .unwrap();
    let exporter_before = thread_cpu("tailscope-expor");
    let process_before = process_cpu();
    let (elapsed, recorder_cpu) = recorder.join().unwrap();
    runtime.block_on(client.flush_within(Duration::from_secs(60))).unwrap();
    let exporter_cpu = thread_cpu("tailscope-expor") - exporter_before;
    let server_cpu = process_cpu() - process_before - exporter_cpu - recorder_cpu;
    let stats = client.stats();
    let millions = stats.recorded as f64 / 1e6;
    println!(
        "recorded {} spans in {:.2} s ({:.2} M spans/s offered)",
        stats.recorded,
        elapsed.as_secs_f64(),
        millions / elapsed.as_secs_f64()
    );
    println!(
        "sent in full {} folded {} acked {} dropped {}",
        stats.sent,
        stats.folded,
        stats.acked,
        stats.dropped_queue_full + stats.dropped_fold_full + stats.dropped_rejected
    );
    println!("exporter thread: {:.3} CPU-s per million spans", exporter_cpu / millions);
    println!(
        "recording thread (record() calls and pacing): {:.3} CPU-s per million spans",
        recorder_cpu / millions
    );
    println!("server (everything else in the process): {:.3} CPU-s per million spans", server_cpu / millions);
    println!("peak RSS of the process (server included): {:.0} MiB", peak_rss_mib());
    runtime.block_on(client.shutdown(Duration::from_secs(10))).ok();
    runtime.block_on(server.shutdown());
}
