//! `tailscope-load run`: realistic traffic through the `tailscope` client crate, over a
//! simulated service graph where callers wait on their dependencies, so slowness propagates.
//!
//! The graph is a chain of `--services` services (frontend → checkout → payments → …), each
//! with `--operations` operations; a request to the frontend calls the same operation of the
//! next service, and so on. A span's duration is its service's own work plus the time it
//! waited for its dependency. Each service records its own work as a SERVER span whose peer is
//! its caller, and each call it makes as a CLIENT span whose peer is the callee (a timed-out
//! attempt ends, failed, at the timeout), so the server sees the service graph's edges. Requests are generated at `--rate` per second for `--duration`,
//! with their durations computed (not slept), and recorded by one client per service. A
//! scenario injects its failure during the middle third of the run and prints what and when.
//!
//! At the end, each service's exact client-side count and percentiles are compared with the
//! server's answer for the same window.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::IsTerminal;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tailscope::{Client, SpanKind, Status};

/// The failure a run injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Lognormal latencies everywhere, nothing injected.
    Steady,
    /// The frontend answers 990 of every 1,000 requests in 50 ms, 5 in 1 s and 5 in 5 s.
    MisleadingAverage,
    /// The deepest dependency goes from 100 ms to 500 ms.
    LatencySpike,
    /// The deepest dependency slows from 50 ms to 2 s; its caller times out after 1 s and
    /// retries at once, up to three attempts, multiplying the load on it.
    Cascade,
    /// The second service fails 30 % of its requests (callers fail with it).
    ErrorBurst,
    /// Every frontend request gets an operation name of its own.
    CardinalityBomb,
    /// The deepest dependency's spans arrive three minutes late.
    LateData,
}

/// Options of `run`.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// The scenario.
    #[arg(long, value_enum)]
    pub scenario: Scenario,
    /// Frontend requests per second.
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,
    /// How long to run (e.g. 30s, 2m).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Services in the call chain.
    #[arg(long, default_value_t = 3)]
    pub services: usize,
    /// Operations per service.
    #[arg(long, default_value_t = 2)]
    pub operations: usize,
    /// The server's gRPC endpoint.
    #[arg(long, default_value = "http://127.0.0.1:4317")]
    pub endpoint: String,
    /// The server's HTTP address (for its answers at the end).
    #[arg(long, default_value = "http://127.0.0.1:9797")]
    pub http: String,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
    /// No progress lines.
    #[arg(long)]
    pub quiet: bool,
    /// Skip the comparison with the server (which assumes the run's services had no other
    /// traffic in its window).
    #[arg(long = "no-compare", action = clap::ArgAction::SetFalse)]
    pub compare: bool,
    /// Random seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// How long to wait for the server's count of a service to reach the clients' before
    /// comparing (a cluster node may refuse a strong read while it catches up with the log).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub settle: Duration,
    /// Draw p50/p99/p99.9 over time per service from the server into this file (.svg or .png).
    #[arg(long)]
    pub plot: Option<std::path::PathBuf>,
}

const NAMES: [&str; 8] =
    ["frontend", "checkout", "payments", "ledger", "fraud", "inventory", "shipping", "email"];
/// How late `late-data` spans arrive.
const LATENESS: Duration = Duration::from_secs(180);
/// The cascade's caller timeout and attempts.
const TIMEOUT: Duration = Duration::from_secs(1);
const ATTEMPTS: usize = 3;

/// The name of service `i`.
pub fn service_name(i: usize) -> String {
    NAMES.get(i).map_or_else(|| format!("service-{i}"), |n| (*n).to_owned())
}

/// One recorded span.
#[derive(Debug, Clone)]
struct Call {
    service: usize,
    operation: String,
    duration: Duration,
    error: bool,
    late: bool,
    /// For a CLIENT span, the service called; else the SERVER span of `service`'s own work.
    callee: Option<usize>,
    /// Of a SERVER span, the time spent in its own code (its self time).
    own: Duration,
}

/// The simulated graph.
struct Sim {
    scenario: Scenario,
    depth: usize,
    operations: usize,
    rng: StdRng,
    requests: u64,
    block: Vec<u64>,
}

impl Sim {
    fn new(args: &RunArgs) -> Sim {
        let mut rng = StdRng::seed_from_u64(args.seed);
        // One block of the misleading average, shuffled once.
        let mut block: Vec<u64> = [vec![50u64; 990], vec![1000; 5], vec![5000; 5]].concat();
        for i in (1..block.len()).rev() {
            block.swap(i, rng.gen_range(0..=i));
        }
        Sim {
            scenario: args.scenario,
            depth: args.services.max(1),
            operations: args.operations.max(1),
            rng,
            requests: 0,
            block,
        }
    }

    fn lognormal(&mut self, median_ms: f64, sigma: f64) -> Duration {
        // Box-Muller.
        let u: f64 = self.rng.gen_range(1e-12..1.0);
        let v: f64 = self.rng.gen();
        let z = (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos();
        Duration::from_secs_f64(median_ms * (sigma * z).exp() / 1e3)
    }

    /// One frontend request at `injecting` (whether the scenario's failure is on).
    fn request(&mut self, injecting: bool, out: &mut Vec<Call>) {
        self.requests += 1;
        let op = self.rng.gen_range(0..self.operations);
        if self.scenario == Scenario::MisleadingAverage {
            let ms = self.block[(self.requests % 1000) as usize];
            out.push(Call {
                service: 0,
                operation: format!("GET /op-{op}"),
                duration: Duration::from_millis(ms),
                error: false,
                late: false,
                callee: None,
                own: Duration::from_millis(ms),
            });
            return;
        }
        let root_op = if self.scenario == Scenario::CardinalityBomb {
            format!("GET /item/{}", self.requests)
        } else {
            format!("GET /op-{op}")
        };
        self.call(0, op, root_op, injecting, out);
    }

    /// Service `i` serving operation `op`: its own work plus its dependency's time.
    fn call(
        &mut self,
        i: usize,
        op: usize,
        name: String,
        injecting: bool,
        out: &mut Vec<Call>,
    ) -> (Duration, bool) {
        let leaf = i + 1 == self.depth;
        let own = match (self.scenario, leaf) {
            (Scenario::LatencySpike, true) => self.lognormal(if injecting { 500.0 } else { 100.0 }, 0.1),
            (Scenario::Cascade, true) => self.lognormal(if injecting { 2000.0 } else { 50.0 }, 0.1),
            _ => self.lognormal(10.0, 0.4),
        };
        let mut error = self.scenario == Scenario::ErrorBurst
            && injecting
            && i == 1.min(self.depth - 1)
            && self.rng.gen_bool(0.3);
        let mut waited = Duration::ZERO;
        if !leaf {
            let child_op = format!("GET /op-{op}");
            let calls_leaf = i + 2 == self.depth;
            if self.scenario == Scenario::Cascade && calls_leaf {
                // Time out after 1 s and retry at once: the retry storm.
                let mut ok = false;
                for _ in 0..ATTEMPTS {
                    let (d, e) = self.call(i + 1, op, child_op.clone(), injecting, out);
                    let failed = d > TIMEOUT || e;
                    out.push(Call::client(i, &child_op, d.min(TIMEOUT), failed));
                    if !failed {
                        waited += d;
                        ok = true;
                        break;
                    }
                    waited += d.min(TIMEOUT);
                }
                error |= !ok;
            } else {
                let (d, e) = self.call(i + 1, op, child_op.clone(), injecting, out);
                out.push(Call::client(i, &child_op, d, e));
                waited += d;
                error |= e;
            }
        }
        let duration = own + waited;
        let late = self.scenario == Scenario::LateData && injecting && leaf;
        out.push(Call { service: i, operation: name, duration, error, late, callee: None, own });
        (duration, error)
    }
}

impl Call {
    /// Service `caller`'s call to the next one, as the caller waited for it.
    fn client(caller: usize, operation: &str, duration: Duration, error: bool) -> Call {
        Call {
            service: caller,
            operation: operation.to_owned(),
            duration,
            error,
            late: false,
            callee: Some(caller + 1),
            own: Duration::ZERO,
        }
    }
}

/// What the client side saw of one service.
#[derive(Debug)]
struct Seen {
    hist: hdrhistogram::Histogram<u64>,
    errors: u64,
    sum_ns: u128,
}

impl Seen {
    fn new() -> Seen {
        Seen {
            hist: hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000_000, 3).unwrap_or_else(|_| {
                hdrhistogram::Histogram::new(3)
                    .unwrap_or_else(|_| unreachable!("3 significant digits are valid"))
            }),
            errors: 0,
            sum_ns: 0,
        }
    }
}

/// One service's line of the summary.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ServiceReport {
    /// The service.
    pub service: String,
    /// Spans the clients recorded.
    pub client_count: u64,
    /// Failed spans the clients recorded.
    pub client_errors: u64,
    /// Exact client-side mean, p50, p99, p99.9 (seconds; HdrHistogram at 3 digits).
    pub client_mean: f64,
    /// p50.
    pub client_p50: f64,
    /// p99.
    pub client_p99: f64,
    /// p99.9.
    pub client_p999: f64,
    /// The server's count for the same window.
    pub server_count: f64,
    /// The server's failed spans.
    pub server_errors: f64,
    /// The server's p50.
    pub server_p50: f64,
    /// The server's p99.
    pub server_p99: f64,
    /// The server's p99.9.
    pub server_p999: f64,
}

/// The outcome of a run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// The scenario.
    pub scenario: String,
    /// What was injected, when (seconds since the start).
    pub injected: Vec<(f64, String)>,
    /// Frontend requests made.
    pub requests: u64,
    /// Spans recorded per frontend request, outside and during the injection.
    pub spans_per_request: (f64, f64),
    /// Per service.
    pub services: Vec<ServiceReport>,
    /// Sum of the clients' stats: recorded, sent, acked, folded, dropped.
    pub clients: BTreeMap<String, u64>,
}

fn sum_stats(clients: &[Client]) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for c in clients {
        let s = c.stats();
        let dropped = s.dropped_queue_full + s.dropped_fold_full + s.dropped_rejected + s.dropped_unacked;
        for (k, v) in [
            ("recorded", s.recorded),
            ("sent", s.sent),
            ("acked", s.acked),
            ("folded", s.folded),
            ("dropped", dropped),
            ("reconnects", s.reconnects),
            ("ack_timeouts", s.ack_timeouts),
        ] {
            *m.entry(k.to_owned()).or_insert(0) += v;
        }
    }
    m
}

fn describe(scenario: Scenario, depth: usize) -> (String, String) {
    let leaf = service_name(depth.max(1) - 1);
    match scenario {
        Scenario::Steady => ("nothing injected (lognormal latencies)".into(), String::new()),
        Scenario::MisleadingAverage => (
            "frontend: every 1,000 requests 990 × 50 ms, 5 × 1 s, 5 × 5 s (mean 79.5 ms)".into(),
            String::new(),
        ),
        Scenario::LatencySpike => (format!("{leaf}: latency 100 ms → 500 ms"), format!("{leaf}: latency back to 100 ms")),
        Scenario::Cascade => (
            format!(
                "{leaf}: latency 50 ms → 2 s; its caller times out after 1 s and retries at once ({ATTEMPTS} attempts)"
            ),
            format!("{leaf}: latency back to 50 ms"),
        ),
        Scenario::ErrorBurst => (
            format!("{}: 30 % of requests fail (callers fail with them)", service_name(1.min(depth.max(1) - 1))),
            "errors stop".into(),
        ),
        Scenario::CardinalityBomb => ("frontend: a new operation name per request".into(), String::new()),
        Scenario::LateData => (
            format!("{leaf}: spans arrive {} s late", LATENESS.as_secs()),
            format!("{leaf}: spans on time again"),
        ),
    }
}

/// Runs a scenario and compares with the server. `out` receives the progress and the summary.
pub async fn run(args: &RunArgs, out: &mut (dyn std::io::Write + Send)) -> anyhow::Result<Report> {
    let depth = if args.scenario == Scenario::MisleadingAverage { 1 } else { args.services.max(1) };
    let clients: Vec<Client> = (0..depth)
        .map(|i| Client::builder().endpoint(args.endpoint.clone()).service(service_name(i)).build())
        .collect::<Result<_, _>>()
        .context("cannot build the clients")?;
    let mut sim = Sim::new(args);
    let mut seen: Vec<Seen> = (0..depth).map(|_| Seen::new()).collect();
    let total = args.duration.as_secs_f64();
    let (from, to) = (total / 3.0, 2.0 * total / 3.0);
    let (on, off) = describe(args.scenario, depth);
    let always =
        matches!(args.scenario, Scenario::Steady | Scenario::MisleadingAverage | Scenario::CardinalityBomb);
    let mut injected = Vec::new();
    let start_wall = SystemTime::now();
    let started = Instant::now();
    // On a terminal the rates go to a progress bar on stderr; elsewhere (pipes, logs, tests)
    // they are printed as lines, once a second.
    let bar = (!args.quiet && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(args.duration.as_millis() as u64);
        if let Ok(style) = indicatif::ProgressStyle::with_template("{elapsed:>3} [{bar:20}] {msg}") {
            bar.set_style(style.progress_chars("=> "));
        }
        bar
    });
    let say = |out: &mut (dyn std::io::Write + Send), line: String| match &bar {
        Some(bar) => bar.suspend(|| writeln!(out, "{line}")),
        None => writeln!(out, "{line}"),
    };
    if always {
        say(out, format!("t=   0.0s  {on}"))?;
        injected.push((0.0, on.clone()));
    }
    let mut calls = Vec::new();
    let (mut spans_in, mut req_in, mut spans_out, mut req_out) = (0u64, 0u64, 0u64, 0u64);
    let mut last_progress = Instant::now();
    let mut last_stats = sum_stats(&clients);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut phase = 0;
    loop {
        tick.tick().await;
        let t = started.elapsed().as_secs_f64();
        if t >= total {
            break;
        }
        if !always && phase == 0 && t >= from {
            say(out, format!("t={t:6.1}s  injecting: {on}"))?;
            injected.push((t, on.clone()));
            phase = 1;
        }
        if !always && phase == 1 && t >= to {
            say(out, format!("t={t:6.1}s  restored: {off}"))?;
            injected.push((t, off.clone()));
            phase = 2;
        }
        let injecting = phase == 1;
        let due = (args.rate * t) as u64;
        while sim.requests < due {
            calls.clear();
            sim.request(injecting, &mut calls);
            // Spans per request count the services' own work (the calls are their edges).
            let own = calls.iter().filter(|c| c.callee.is_none()).count() as u64;
            if injecting {
                req_in += 1;
                spans_in += own;
            } else {
                req_out += 1;
                spans_out += own;
            }
            for c in &calls {
                let status = if c.error { Status::Error } else { Status::Ok };
                let client = &clients[c.service];
                if let Some(callee) = c.callee {
                    client.record_peer(
                        &c.operation,
                        SpanKind::Client,
                        &service_name(callee),
                        c.duration,
                        status,
                    );
                    continue;
                }
                if c.late {
                    let start = SystemTime::now() - LATENESS - c.duration;
                    client.record_at(&c.operation, start, c.duration, status);
                } else if args.scenario == Scenario::MisleadingAverage {
                    client.record(&c.operation, c.duration, status);
                } else {
                    // Its own work, served for its caller (the frontend's callers are users).
                    let caller = c.service.checked_sub(1).map(service_name).unwrap_or_default();
                    client.record_served(&c.operation, &caller, c.duration, c.own, status);
                }
                let s = &mut seen[c.service];
                let ns = c.duration.as_nanos() as u64;
                let _ = s.hist.record(ns.clamp(1, 3_600_000_000_000));
                s.sum_ns += u128::from(ns);
                s.errors += u64::from(c.error);
            }
        }
        if !args.quiet && last_progress.elapsed() >= Duration::from_secs(1) {
            let now = sum_stats(&clients);
            let secs = last_progress.elapsed().as_secs_f64();
            let rate = |k: &str| (now[k] - last_stats[k]) as f64 / secs;
            let rates = format!(
                "spans sent {:>8.0}/s  acked {:>8.0}/s  folded {:>7.0}/s  dropped {}",
                rate("sent"),
                rate("acked"),
                rate("folded"),
                now["dropped"]
            );
            match &bar {
                Some(bar) => {
                    bar.set_position(started.elapsed().as_millis() as u64);
                    bar.set_message(rates);
                }
                None => writeln!(out, "t={t:6.1}s  requests {:>7.0}/s  {rates}", args.rate)?,
            }
            last_stats = now;
            last_progress = Instant::now();
        }
    }
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    for c in &clients {
        // Long enough for a client whose breaker opened (a paused server) to probe again.
        c.shutdown(Duration::from_secs(60)).await.context("a client could not flush")?;
    }
    let stats = sum_stats(&clients);

    // The server's answer for the whole run (and the late spans' minutes before it).
    let end = SystemTime::now();
    let since = start_wall
        - if args.scenario == Scenario::LateData {
            LATENESS + Duration::from_secs(10)
        } else {
            Duration::ZERO
        };
    let range = end.duration_since(since).unwrap_or_default().as_secs() + 20;
    let at = end.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs_f64();
    // Strong reads: a cluster node answers only once it has written everything the log
    // acknowledged (a single node always has).
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("x-read-consistency", reqwest::header::HeaderValue::from_static("strong"));
    let http = reqwest::Client::builder().default_headers(headers).build()?;
    let mut services = Vec::new();
    for (i, s) in seen.iter().enumerate().filter(|_| args.compare) {
        let name = service_name(i);
        let q = |expr: String| {
            let http = http.clone();
            let base = args.http.trim_end_matches('/').to_owned();
            async move { query(&http, &base, &expr, at).await }
        };
        let sel = format!("{{service=\"{name}\"}}");
        let quantile = |phi: f64| {
            format!("histogram_quantile({phi}, sum by (le) (increase(span_duration_seconds_bucket{sel}[{range}s])))")
        };
        let n = s.hist.len();
        let settled = Instant::now() + args.settle;
        // A cluster node may refuse a strong read while it catches up with the log (after a
        // NATS failover): asked again until `settle` has passed.
        let count = loop {
            let asked = q(format!("sum(increase(span_duration_seconds_count{sel}[{range}s]))")).await;
            let late = Instant::now() >= settled;
            match asked {
                Ok(count) if late || count.unwrap_or(0.0) >= n as f64 => break count,
                Err(e) if late => return Err(e),
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        let errors = q(format!(
            "sum(increase(span_duration_seconds_count{{service=\"{name}\",status=\"error\"}}[{range}s]))"
        ))
        .await?;
        let secs = |ns: u64| ns as f64 / 1e9;
        services.push(ServiceReport {
            service: name,
            client_count: n,
            client_errors: s.errors,
            client_mean: if n > 0 { s.sum_ns as f64 / n as f64 / 1e9 } else { f64::NAN },
            client_p50: secs(s.hist.value_at_quantile(0.5)),
            client_p99: secs(s.hist.value_at_quantile(0.99)),
            client_p999: secs(s.hist.value_at_quantile(0.999)),
            server_count: count.unwrap_or(0.0),
            server_errors: errors.unwrap_or(0.0),
            server_p50: q(quantile(0.5)).await?.unwrap_or(f64::NAN),
            server_p99: q(quantile(0.99)).await?.unwrap_or(f64::NAN),
            server_p999: q(quantile(0.999)).await?.unwrap_or(f64::NAN),
        });
    }
    let per = |spans: u64, reqs: u64| if reqs > 0 { spans as f64 / reqs as f64 } else { 0.0 };
    let report = Report {
        scenario: format!("{:?}", args.scenario),
        injected,
        requests: sim.requests,
        spans_per_request: (per(spans_out, req_out), per(spans_in, req_in)),
        services,
        clients: stats,
    };
    if let Some(path) = &args.plot {
        let names: Vec<String> = (0..depth).map(service_name).collect();
        let data = crate::plot::fetch(&args.http, &names, start_wall, end).await?;
        let title = format!(
            "{:?} at {} requests/s, injected from {from:.0} s to {to:.0} s (10-second windows)",
            args.scenario, args.rate
        );
        crate::plot::draw(path, &title, &data)?;
        writeln!(out, "plot: {}", path.display())?;
    }
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    } else if args.compare {
        write!(out, "{}", table(&report))?;
    } else {
        writeln!(out, "{}", summary_line(&report))?;
    }
    Ok(report)
}

/// Requests, spans per request and the clients' counters.
pub fn summary_line(r: &Report) -> String {
    let c = &r.clients;
    format!(
        "{} frontend requests; spans per request {:.2} (during the injection {:.2}); clients recorded {}, sent {}, acked {}, folded {}, dropped {}",
        r.requests, r.spans_per_request.0, r.spans_per_request.1, c["recorded"], c["sent"], c["acked"], c["folded"], c["dropped"]
    )
}

/// The end-of-run table.
pub fn table(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "\n{}", summary_line(r));
    let _ = writeln!(
        s,
        "{:<12} {:>9} {:>9} {:>7} {:>7} {:>9} {:>9} {:>7} {:>9} {:>9} {:>7}",
        "service", "count", "server", "errors", "server", "p50", "server", "Δ", "p99", "server", "Δ"
    );
    let diff = |a: f64, b: f64| if a > 0.0 { format!("{:+.2}%", (b - a) / a * 100.0) } else { "-".into() };
    for v in &r.services {
        let _ = writeln!(
            s,
            "{:<12} {:>9} {:>9.0} {:>7} {:>7.0} {:>8.1}ms {:>8.1}ms {:>7} {:>8.1}ms {:>8.1}ms {:>7}",
            v.service,
            v.client_count,
            v.server_count,
            v.client_errors,
            v.server_errors,
            v.client_p50 * 1e3,
            v.server_p50 * 1e3,
            diff(v.client_p50, v.server_p50),
            v.client_p99 * 1e3,
            v.server_p99 * 1e3,
            diff(v.client_p99, v.server_p99),
        );
    }
    s
}

/// One instant query's single value (`None` when the result is empty).
async fn query(http: &reqwest::Client, base: &str, expr: &str, at: f64) -> anyhow::Result<Option<f64>> {
    let data = crate::api::api(
        http,
        base,
        "/api/v1/query",
        &[("query", expr.to_owned()), ("time", format!("{at:.3}"))],
    )
    .await?;
    Ok(data["result"][0]["value"][1].as_str().and_then(|x| x.parse().ok()))
}
