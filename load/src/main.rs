//! `tailscope-load`: drives traffic at a tailscope server and measures it.
//!
//! `tailscope-load run --scenario NAME` drives realistic traffic and failure scenarios through
//! the client crate and compares the clients' exact percentiles with the server's (see
//! [`tailscope_load::run`]).
//!
//! `tailscope-load chaos --fault kill|pause` runs a scenario against a server process, breaks
//! it at a third of the run, and checks that every recorded span was counted exactly once.
//!
//! `tailscope-load compare` loads the same spans into tailscope and a real Prometheus and asks
//! both the same quantile queries, measuring latency, CPU and bytes next to the exact answers.
//!
//! `tailscope-load pressure` reads the server's peak RSS and ingest acknowledgement latency
//! while the heaviest requests its limits allow run, phase by phase, next to idle.
//!
//! `tailscope-load freshness` sends one-span probes and measures the time from a probe's
//! durable acknowledgement to the first query (on the same server or another cluster node)
//! that counts it.
//!
//! `tailscope-load bench` measures maximum ingest throughput with pre-encoded batches over K
//! connections, and the server's CPU-seconds per million spans and peak RSS, read from
//! `/proc/<pid>` of a server it starts as a child process (or one given by `--grpc` and `--pid`).

mod bench;
mod chaos;
mod child;
mod compare;
mod freshness;
mod pressure;

use clap::{Parser, Subcommand};

/// Traffic, benchmarks and accuracy checks for tailscope.
#[derive(Debug, Parser)]
#[command(name = "tailscope-load", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Maximum ingest throughput and server cost per million spans.
    Bench(bench::BenchArgs),
    /// The same spans in tailscope and in a real Prometheus (backfilled with promtool; with
    /// --native also a native-histogram Prometheus fed by remote write), asked the same quantile
    /// queries: latency, CPU per query, bytes and error against the exact quantiles.
    Compare(compare::CompareArgs),
    /// A traffic scenario through the client crate, compared with the server's answers.
    Run(tailscope_load::run::RunArgs),
    /// A fault (SIGKILL and restart, or SIGSTOP) injected into a server process under a
    /// scenario's traffic, then every recorded span checked to be counted exactly once.
    Chaos(chaos::ChaosArgs),
    /// Server memory and ingest acknowledgement latency while the heaviest requests the
    /// limits allow run (widest query, label and series walks, alert posts), next to idle.
    Pressure(pressure::PressureArgs),
    /// How long after its durable acknowledgement a span is answered by a query (on the same
    /// server, or on another node of a cluster), probe by probe.
    Freshness(freshness::FreshnessArgs),
    /// tailscope in a minute: an embedded server, the example rules, a webhook receiver that
    /// prints grouped alerts, and steady → latency-spike → cascade traffic.
    Demo(tailscope_load::demo::DemoArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cli.command {
        Command::Bench(args) => runtime.block_on(bench::run(args)),
        Command::Run(args) => runtime.block_on(async {
            let mut stdout = std::io::stdout();
            tailscope_load::run::run(&args, &mut stdout).await.map(|_| ())
        }),
        Command::Compare(args) => runtime.block_on(compare::run(args)),
        Command::Chaos(args) => runtime.block_on(chaos::chaos(args)),
        Command::Pressure(args) => runtime.block_on(pressure::run(args)),
        Command::Freshness(args) => runtime.block_on(freshness::run(args)),
        Command::Demo(args) => runtime.block_on(async {
            let out = std::sync::Arc::new(tokio::sync::Mutex::new(Vec::new()));
            tailscope_load::demo::demo(&args, out, true).await.map(|_| ())
        }),
    }
}
