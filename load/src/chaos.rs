//! `tailscope-load chaos`: a scenario's traffic against a real server process, with a fault
//! injected at a third of the run, then the exactness check: every span the clients recorded
//! counted by the server exactly once (nothing acknowledged lost, nothing doubled).
//!
//! Faults: `kill` — SIGKILL, then a restart on the same ports and data, as a supervisor would;
//! `pause` — SIGSTOP for `--pause`, then SIGCONT (a hung server: connections stay up, nothing
//! answers; the clients' ack timeout and breaker must notice).
//!
//! With `--cluster`, the target is a cluster: three `nats-server`s (from PATH) and two
//! tailscope nodes, the clients sending to node a and the answers read from node b (so the
//! check covers the log and the other node's store). `kill` and `pause` hit node a;
//! `nats-leader` SIGKILLs the NATS server leading partition 0's stream and restarts it after
//! `--pause`; `store-replace` SIGKILLs node b and starts an empty node in its place (same id
//! and ports, a new data directory), which takes its partitions from copies of node a's store
//! and reads their logs on from there.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tailscope_load::run::{run, Report, RunArgs, Scenario};

use tailscope_test_support::nats::NatsCluster;

use crate::child::{server_bin, ChildServer};

/// The fault to inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// SIGKILL the server, then restart it on the same ports and data.
    Kill,
    /// SIGSTOP the server for `--pause`, then SIGCONT.
    Pause,
    /// (`--cluster` only) SIGKILL the NATS server leading partition 0's stream; restart it
    /// after `--pause`.
    NatsLeader,
    /// (`--cluster` only) SIGKILL node b, whose answers are checked, and start an empty node
    /// in its place (same id and ports, a new data directory) after `--pause`.
    StoreReplace,
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The name it has on the command line.
        use clap::ValueEnum;
        f.write_str(self.to_possible_value().as_ref().map_or("", |v| v.get_name()))
    }
}

/// Options of `chaos`.
#[derive(Debug, clap::Args)]
pub struct ChaosArgs {
    /// The fault.
    #[arg(long, value_enum)]
    fault: Fault,
    /// The traffic.
    #[arg(long, value_enum, default_value = "steady")]
    scenario: Scenario,
    /// Frontend requests per second.
    #[arg(long, default_value_t = 500.0)]
    rate: f64,
    /// How long the traffic runs; the fault comes at a third of it.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// How long `pause` keeps the server stopped.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pause: Duration,
    /// Services in the call chain.
    #[arg(long, default_value_t = 3)]
    services: usize,
    /// Random seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The tailscope-server binary (default: next to this binary).
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Against a cluster: three `nats-server`s (from PATH) and two tailscope nodes; clients
    /// send to one node, the answers come from the other.
    #[arg(long)]
    cluster: bool,
    /// Print the outcome as JSON.
    #[arg(long)]
    json: bool,
}

/// What happened.
#[derive(Debug, serde::Serialize)]
struct Outcome {
    fault: Fault,
    /// Seconds into the run the fault came.
    at: f64,
    /// How long the server was gone (killed until serving again) or stopped, in seconds.
    out_for: f64,
    /// Every recorded span counted exactly once, none dropped by the clients.
    exact: bool,
    /// What did not match, per service.
    mismatches: Vec<String>,
    report: Report,
}

/// Runs the traffic, injects the fault, checks the counts; an error if they are not exact.
pub async fn chaos(args: ChaosArgs) -> anyhow::Result<()> {
    let bin = server_bin(args.server_bin.as_deref())?;
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    anyhow::ensure!(
        args.cluster || !matches!(args.fault, Fault::NatsLeader | Fault::StoreReplace),
        "--fault {} needs --cluster (a single node has no NATS and no other store)",
        args.fault
    );
    // In a cluster: NATS, node a (the clients' and the fault's) and node b (the answers').
    let cluster = if args.cluster { Some(Cluster::start(dir.path())?) } else { None };
    let env = cluster.as_ref().map_or_else(Vec::new, |c| c.env("a"));
    let server = ChildServer::start(&bin, &data, "127.0.0.1:0", "127.0.0.1:0", &env)?;
    let other = match &cluster {
        Some(c) => {
            Some(ChildServer::start(&bin, &dir.path().join("b"), "127.0.0.1:0", "127.0.0.1:0", &c.env("b"))?)
        }
        None => None,
    };
    let (grpc, http) = (server.grpc, other.as_ref().map_or(server.http, |b| b.http));
    let other_env = cluster.as_ref().map_or_else(Vec::new, |c| c.env("b"));
    let other = Arc::new(std::sync::Mutex::new(other));
    let own_http = server.http;
    let server = Arc::new(std::sync::Mutex::new(server));
    let nats = cluster.map(|c| Arc::new(std::sync::Mutex::new(c)));
    let run_args = RunArgs {
        scenario: args.scenario,
        rate: args.rate,
        duration: args.duration,
        services: args.services,
        operations: 2,
        endpoint: format!("http://{grpc}"),
        http: format!("http://{http}"),
        json: false,
        quiet: args.json,
        compare: true,
        seed: args.seed,
        // The other node applies what the log acknowledged a moment later.
        settle: if args.cluster { Duration::from_secs(30) } else { Duration::ZERO },
        plot: None,
    };
    let at = args.duration / 3;
    let started = Instant::now();
    let injector = {
        let (server, fault, pause, nats) = (server.clone(), args.fault, args.pause, nats.clone());
        let (other, empty) = (other.clone(), dir.path().join("b-replacement"));
        let quiet = args.json;
        tokio::task::spawn_blocking(move || -> anyhow::Result<f64> {
            std::thread::sleep(at);
            let say = |line: String| {
                if !quiet {
                    println!("t={:6.1}s  chaos: {line}", started.elapsed().as_secs_f64());
                }
            };
            let mut guard = server.lock().map_err(|_| anyhow::anyhow!("server handle poisoned"))?;
            let gone = Instant::now();
            match fault {
                Fault::Kill => {
                    say(format!("SIGKILL to the server (pid {})", guard.pid()));
                    guard.kill();
                    // A supervisor restarts it on the same ports and data.
                    let deadline = Instant::now() + Duration::from_secs(30);
                    *guard = loop {
                        match ChildServer::start(&bin, &data, &grpc.to_string(), &own_http.to_string(), &env)
                        {
                            Ok(s) => break s,
                            Err(e) if Instant::now() < deadline => {
                                say(format!("restart failed ({e}); retrying"));
                                std::thread::sleep(Duration::from_millis(200));
                            }
                            Err(e) => return Err(e.context("cannot restart the server")),
                        }
                    };
                    say(format!("restarted (pid {}) after {:.2?}", guard.pid(), gone.elapsed()));
                }
                Fault::Pause => {
                    let pid = guard.pid().to_string();
                    let signal = |sig: &str| -> anyhow::Result<()> {
                        let ok = std::process::Command::new("kill").args([sig, &pid]).status()?.success();
                        anyhow::ensure!(ok, "kill {sig} {pid} failed");
                        Ok(())
                    };
                    say(format!("SIGSTOP to the server (pid {pid}) for {:?}", pause));
                    signal("-STOP")?;
                    std::thread::sleep(pause);
                    signal("-CONT")?;
                    say("SIGCONT".into());
                }
                Fault::NatsLeader => {
                    let nats = nats.context("no NATS cluster")?;
                    let mut nats = nats.lock().map_err(|_| anyhow::anyhow!("NATS handle poisoned"))?;
                    let leader =
                        nats.cluster.leader_of(&nats.stream0).context("no NATS server leads partition 0")?;
                    say(format!(
                        "SIGKILL to NATS server {} (leader of {})",
                        nats.cluster.servers[leader].name, nats.stream0
                    ));
                    nats.cluster.kill(leader);
                    std::thread::sleep(pause);
                    nats.cluster.start_server(leader);
                    say(format!("NATS server {} restarted", nats.cluster.servers[leader].name));
                }
                Fault::StoreReplace => {
                    let mut other = other.lock().map_err(|_| anyhow::anyhow!("node b's handle poisoned"))?;
                    let b = other.as_mut().context("no node b")?;
                    let (b_grpc, b_http) = (b.grpc.to_string(), b.http.to_string());
                    say(format!("SIGKILL to node b (pid {}); its data is left behind", b.pid()));
                    b.kill();
                    std::thread::sleep(pause);
                    let deadline = Instant::now() + Duration::from_secs(30);
                    *b = loop {
                        match ChildServer::start(&bin, &empty, &b_grpc, &b_http, &other_env) {
                            Ok(s) => break s,
                            Err(e) if Instant::now() < deadline => {
                                say(format!("start failed ({e}); retrying"));
                                std::thread::sleep(Duration::from_millis(200));
                            }
                            Err(e) => return Err(e.context("cannot start the replacement of node b")),
                        }
                    };
                    say(format!("an empty node b started in its place (pid {})", b.pid()));
                }
            }
            Ok(gone.elapsed().as_secs_f64())
        })
    };
    // With --json, the outcome below is the only output.
    let mut out: Box<dyn std::io::Write + Send> =
        if args.json { Box::new(std::io::sink()) } else { Box::new(std::io::stdout()) };
    let report = run(&run_args, &mut *out).await?;
    let out_for = injector.await.context("the fault injector failed")??;

    let mut mismatches = Vec::new();
    let dropped = report.clients["dropped"];
    if dropped > 0 {
        mismatches.push(format!("the clients dropped {dropped} spans"));
    }
    for s in &report.services {
        if s.server_count != s.client_count as f64 || s.server_errors != s.client_errors as f64 {
            mismatches.push(format!(
                "{}: recorded {} ({} failed), the server counted {} ({} failed)",
                s.service, s.client_count, s.client_errors, s.server_count, s.server_errors
            ));
        }
    }
    let outcome = Outcome {
        fault: args.fault,
        at: at.as_secs_f64(),
        out_for,
        exact: mismatches.is_empty(),
        mismatches,
        report,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&outcome)?);
    } else if outcome.exact {
        println!(
            "chaos {}: exact — every span recorded was counted once (server out for {:.2} s)",
            outcome.fault, outcome.out_for
        );
    }
    anyhow::ensure!(outcome.exact, "chaos {}: not exact: {}", outcome.fault, outcome.mismatches.join("; "));
    Ok(())
}

/// Three `nats-server`s for `--cluster`, and what a node needs to join them.
struct Cluster {
    cluster: NatsCluster,
    /// Partition 0's stream.
    stream0: String,
}

impl Cluster {
    fn start(dir: &std::path::Path) -> anyhow::Result<Cluster> {
        let bin = tailscope_test_support::on_path("nats-server")
            .context("--cluster needs nats-server on PATH (Debian: apt-get install nats-server)")?;
        let cluster = NatsCluster::start(&bin, &dir.join("nats"), 3);
        Ok(Cluster { cluster, stream0: "chaos_p0".into() })
    }

    /// The environment of node `id`.
    fn env(&self, id: &str) -> Vec<(&'static str, String)> {
        vec![
            ("TAILSCOPE_CLUSTER_NATS", self.cluster.urls()),
            ("TAILSCOPE_CLUSTER_NODE_ID", id.to_owned()),
            ("TAILSCOPE_CLUSTER_NAME", "chaos".to_owned()),
            ("TAILSCOPE_CLUSTER_PARTITIONS", "4".to_owned()),
            ("TAILSCOPE_CLUSTER_MAX_BYTES_PER_PARTITION", (64u64 << 20).to_string()),
            ("TAILSCOPE_INGEST_FLUSH_INTERVAL", "200ms".to_owned()),
        ]
    }
}
