//! `tailscope-server`: flags, logging and signals; everything else lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tailscope_server::config::{Config, Overrides};
use tailscope_server::Server;

/// jemalloc (the default feature) for every allocation of the process (RocksDB's C++ ones
/// too), with background threads that return freed memory to the system; the C library's
/// allocator keeps the transient peaks of a backfill or of wide queries resident, and its
/// arena locks are contended when one thread frees what another allocated. Measured
/// (BENCHMARKS.md): 0.64–0.93 GiB against 1.76 GiB after the same backfill
/// (`tailscope-load pressure`), and 9–18 % less CPU per OTLP span, 15–30 % less per native span
/// at 10,000 series (`tailscope-load bench`).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// tailscope: a tail-latency aggregator with exact percentiles.
#[derive(Debug, Parser)]
#[command(name = "tailscope-server", version)]
struct Cli {
    /// TOML configuration file (see tailscope.example.toml).
    #[arg(long, env = "TAILSCOPE_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// gRPC listen address (ingest and OTLP); overrides the file and TAILSCOPE_GRPC_ADDR.
    #[arg(long)]
    grpc_addr: Option<std::net::SocketAddr>,
    /// HTTP listen address (query API, health, metrics); overrides TAILSCOPE_HTTP_ADDR.
    #[arg(long)]
    http_addr: Option<std::net::SocketAddr>,
    /// OTLP/HTTP listen address (POST /v1/traces); overrides TAILSCOPE_OTLP_HTTP_ADDR.
    #[arg(long)]
    otlp_http_addr: Option<std::net::SocketAddr>,
    /// Data directory of the embedded store; overrides TAILSCOPE_DATA_DIR.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Prometheus' web configuration file (TLS for every listener); overrides
    /// TAILSCOPE_SERVER_WEB_CONFIG_FILE.
    #[arg(long)]
    web_config_file: Option<PathBuf>,
    /// Log format: text or json. Levels come from TAILSCOPE_LOG (e.g. "info,tailscope_server=debug").
    #[arg(long, env = "TAILSCOPE_LOG_FORMAT", default_value = "text")]
    log_format: String,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Prints the effective configuration (file, then environment) or says precisely what is wrong.
    CheckConfig {
        /// The configuration file to check.
        file: PathBuf,
    },
    /// Validates Prometheus rule files (syntax, expressions tailscope can evaluate, templates);
    /// prints what each holds, or names the file, group, rule and problem.
    CheckRules {
        /// Rule files (or directories of them).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

fn check_rules(files: &[PathBuf]) -> ExitCode {
    let paths = match tailscope_server::alerting::expand_rule_paths(files) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    let mut failed = false;
    for path in paths {
        match tailscope_server::alerting::rules::RuleGroup::load_file(&path) {
            Ok(groups) => {
                let rules: usize = groups.iter().map(|g| g.rules.len()).sum();
                println!(
                    "Checking {}\n  SUCCESS: {} groups, {rules} rules found",
                    path.display(),
                    groups.len()
                );
            }
            Err(e) => {
                eprintln!("Checking {}\n  FAILED: {e}", path.display());
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::CheckRules { files }) = &cli.command {
        return check_rules(files);
    }
    if let Some(Command::CheckConfig { file }) = &cli.command {
        return match Config::load(Some(file), std::env::vars(), &Overrides::default()) {
            Ok(config) => {
                print!("{}", config.to_toml());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        };
    }
    init_logging(&cli.log_format);
    let overrides = Overrides {
        grpc_addr: cli.grpc_addr,
        http_addr: cli.http_addr,
        otlp_http_addr: cli.otlp_http_addr,
        data_dir: cli.data_dir.clone(),
        web_config_file: cli.web_config_file.clone(),
    };
    let config = match Config::load(cli.config.as_deref(), std::env::vars(), &overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async move {
        // Watched before the server starts serving: a SIGHUP sent as soon as it answers (a
        // reload right after start) must find the handler, not the default action, which ends
        // the process; and watched once, so none is lost between two reloads.
        let mut signals = Signals::watch();
        let server = match Server::start(config).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                return ExitCode::FAILURE;
            }
        };
        while let Signal::Reload = signals.next().await {
            tracing::info!("SIGHUP: reloading certificates, rule files and the notifier configuration");
            if let Err(e) = server.reload() {
                tracing::error!(error = %e, "reload failed; the running configuration stays");
            }
        }
        tracing::info!("shutting down: flushing and acknowledging accepted batches");
        server.shutdown().await;
        ExitCode::SUCCESS
    });
    // Everything accepted is written by now. Work still running on blocking threads (a query
    // whose client was cut off by the shutdown) is cancelled, not waited for: dropping the
    // runtime would wait for it without bound.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    code
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TAILSCOPE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

enum Signal {
    Reload,
    Stop,
}

/// The signals the server acts on, each watched from when it is made.
struct Signals {
    hangup: Option<tokio::signal::unix::Signal>,
    terminate: Option<tokio::signal::unix::Signal>,
    interrupt: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn watch() -> Signals {
        use tokio::signal::unix::SignalKind;
        Signals {
            hangup: watched(SignalKind::hangup(), "cannot watch SIGHUP; reload with POST /-/reload"),
            terminate: watched(SignalKind::terminate(), "cannot watch SIGTERM; stopping on SIGINT only"),
            interrupt: watched(SignalKind::interrupt(), "cannot watch SIGINT; stopping on SIGTERM only"),
        }
    }

    async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = delivered(&mut self.hangup) => Signal::Reload,
            _ = delivered(&mut self.terminate) => Signal::Stop,
            _ = delivered(&mut self.interrupt) => Signal::Stop,
        }
    }
}

/// The signal's stream, or `None` after logging `unavailable` if it cannot be watched.
fn watched(kind: tokio::signal::unix::SignalKind, unavailable: &str) -> Option<tokio::signal::unix::Signal> {
    match tokio::signal::unix::signal(kind) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "{unavailable}");
            None
        }
    }
}

/// Resolves when the signal arrives; never if it is not watched.
async fn delivered(signal: &mut Option<tokio::signal::unix::Signal>) {
    match signal {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending::<()>().await,
    }
}
