//! `tailscope-load freshness`: how long after its acknowledgement a span can be queried.
//!
//! One probe at a time: a batch of one span on a series of its own is streamed to the gRPC
//! address; once the server acknowledges it durable, the query address (the same server, or
//! another node of a cluster) is asked for the series' count until the probe is in it. The
//! time from the acknowledgement to the first answer that counts the probe is the probe's
//! freshness; the time from send to acknowledgement is reported next to it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use rand::Rng;
use tailscope_proto::v1::ingest_client::IngestClient;
use tailscope_proto::v1::{SeriesGroup, SeriesKey, Span, SpanBatch};

use crate::child::{server_bin, ChildServer};
use crate::pressure::now_nanos;

/// Options of `freshness`.
#[derive(Debug, clap::Args)]
pub struct FreshnessArgs {
    /// Probes to send, one at a time.
    #[arg(long, default_value_t = 200)]
    probes: u64,
    /// Pause between two probes, in milliseconds, plus a random share of `--jitter-ms` (so
    /// probes land anywhere in the server's flush interval, not right after the last flush).
    #[arg(long, default_value_t = 50)]
    pause_ms: u64,
    /// The most a pause is lengthened at random, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    jitter_ms: u64,
    /// How often the query address is asked while a probe is not yet visible, in milliseconds.
    #[arg(long, default_value_t = 5)]
    poll_ms: u64,
    /// The longest a probe may stay invisible before the run fails, in seconds.
    #[arg(long, default_value_t = 30)]
    give_up_secs: u64,
    /// The gRPC address probes are sent to; by default a server is started (its
    /// `TAILSCOPE_*` environment is this process's, so a `TAILSCOPE_CLUSTER_*` environment
    /// starts a cluster node).
    #[arg(long, requires = "http")]
    grpc: Option<SocketAddr>,
    /// The HTTP address asked for the probes (another node of the cluster, or the same one).
    #[arg(long, requires = "grpc")]
    http: Option<SocketAddr>,
    /// The tailscope-server binary to start (default: next to this binary).
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Ask with `X-Read-Consistency: strong`: each query waits until the node has written
    /// everything the log held when it was asked (cluster mode), so a probe is visible to the
    /// first query after its acknowledgement and the cost shows in that query's time.
    #[arg(long)]
    strong: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `freshness` and prints what it measured.
pub async fn run(args: FreshnessArgs) -> anyhow::Result<()> {
    if args.probes == 0 {
        bail!("--probes must be at least 1");
    }
    let _data;
    let _server;
    let (grpc, http) = match (args.grpc, args.http) {
        (Some(g), Some(h)) => (g, h),
        _ => {
            let bin = server_bin(args.server_bin.as_deref())?;
            _data = tempfile::tempdir()?;
            let server = ChildServer::start(&bin, _data.path(), "127.0.0.1:0", "127.0.0.1:0", &[])?;
            let addrs = (server.grpc, server.http);
            _server = server;
            addrs
        }
    };
    let m = measure(&args, grpc, http).await?;
    let reads = if args.strong { "strong" } else { "eventual" };
    if args.json {
        let v = serde_json::json!({
            "probes": args.probes,
            "poll_ms": args.poll_ms,
            "ack_ms": Summary::of(&m.ack).json(),
            "visible_after_ack_ms": Summary::of(&m.visible).json(),
            "visible_at_ack": m.at_ack,
            "strong": args.strong,
            "first_query_ms": Summary::of(&m.first_query).json(),
        });
        println!("{v}");
    } else {
        let (from, to) = (args.pause_ms, args.pause_ms + args.jitter_ms);
        println!("probes                 {} (one at a time, {from}–{to} ms apart)", args.probes);
        println!("send → durable ack     {}", Summary::of(&m.ack));
        println!("ack → visible          {} (polled every {} ms)", Summary::of(&m.visible), args.poll_ms);
        println!("visible at the ack     {} of {}", m.at_ack, args.probes);
        println!("first query after ack  {} ({reads} reads)", Summary::of(&m.first_query));
    }
    Ok(())
}

/// p50, p99 and max of a histogram of microseconds, in milliseconds.
struct Summary([f64; 3]);

impl Summary {
    fn of(h: &Histogram<u64>) -> Summary {
        let ms = |us: u64| us as f64 / 1000.0;
        Summary([ms(h.value_at_quantile(0.5)), ms(h.value_at_quantile(0.99)), ms(h.max())])
    }

    fn json(&self) -> serde_json::Value {
        let [p50, p99, max] = self.0;
        serde_json::json!({"p50": p50, "p99": p99, "max": max})
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [p50, p99, max] = self.0;
        write!(f, "p50 {p50:.1} ms  p99 {p99:.1} ms  max {max:.1} ms")
    }
}

/// What the probes measured, in microseconds.
struct Measured {
    ack: Histogram<u64>,
    visible: Histogram<u64>,
    /// Probes the first query after their acknowledgement already counted.
    at_ack: u64,
    /// How long the first query after each acknowledgement took.
    first_query: Histogram<u64>,
}

async fn measure(args: &FreshnessArgs, grpc: SocketAddr, http: SocketAddr) -> anyhow::Result<Measured> {
    let mut rng = rand::thread_rng();
    let client_id: u64 = rng.gen_range(1..u64::MAX);
    // A series of this run's own, so a previous run's spans never count.
    let operation = format!("probe-{client_id:016x}");
    let mut client = IngestClient::connect(format!("http://{grpc}")).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut replies = client.stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
    let query = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
    let mut ack = Histogram::<u64>::new(3)?;
    let mut visible = Histogram::<u64>::new(3)?;
    let mut at_ack = 0;
    let mut first_query = Histogram::<u64>::new(3)?;
    for seq in 1..=args.probes {
        let now = now_nanos();
        let batch = SpanBatch {
            client_id,
            seq,
            groups: vec![SeriesGroup {
                key: Some(SeriesKey {
                    service: "tailscope-freshness".into(),
                    operation: operation.clone(),
                    ..Default::default()
                }),
                spans: vec![Span {
                    start_unix_nanos: now - 1_000_000,
                    duration_nanos: 1_000_000,
                    span_id: seq,
                    ..Default::default()
                }],
            }],
            deltas: vec![],
        };
        let sent = Instant::now();
        tx.send(batch).await.context("the ingest stream closed")?;
        loop {
            let reply = replies.message().await?.context("the ingest stream ended")?;
            if reply.durable_seq >= seq {
                break;
            }
        }
        let acked = Instant::now();
        ack.record(acked.duration_since(sent).as_micros() as u64)?;
        let mut first = true;
        loop {
            let asked = Instant::now();
            let counted = count(&query, http, &operation, args.strong).await?;
            if first {
                first_query.record(asked.elapsed().as_micros() as u64)?;
            }
            if counted >= seq {
                break;
            }
            first = false;
            if acked.elapsed() > Duration::from_secs(args.give_up_secs) {
                bail!("probe {seq} was acknowledged but not visible at {http} after {} s", args.give_up_secs);
            }
            tokio::time::sleep(Duration::from_millis(args.poll_ms)).await;
        }
        if first {
            at_ack += 1;
            visible.record(0)?;
        } else {
            visible.record(acked.elapsed().as_micros() as u64)?;
        }
        let jitter = if args.jitter_ms > 0 { rng.gen_range(0..args.jitter_ms) } else { 0 };
        tokio::time::sleep(Duration::from_millis(args.pause_ms + jitter)).await;
    }
    Ok(Measured { ack, visible, at_ack, first_query })
}

/// The probe series' count over the last ten minutes, as `/api/v1/tail` answers it (a strong
/// or an eventual read).
async fn count(
    http: &reqwest::Client,
    addr: SocketAddr,
    operation: &str,
    strong: bool,
) -> anyhow::Result<u64> {
    let now = now_nanos() / 1_000_000_000;
    let url = format!(
        "http://{addr}/api/v1/tail?service=tailscope-freshness&operation={operation}&start={}&end={}",
        now - 600,
        now + 60
    );
    let consistency = if strong { "strong" } else { "eventual" };
    let v: serde_json::Value = http
        .get(&url)
        .header("X-Read-Consistency", consistency)
        .send()
        .await
        .with_context(|| format!("cannot reach {addr}"))?
        .json()
        .await?;
    if v["status"] != "success" {
        bail!("{url}: {v}");
    }
    Ok(v["data"]["series"].as_array().map_or(0, |rows| rows.iter().filter_map(|r| r["count"].as_u64()).sum()))
}
