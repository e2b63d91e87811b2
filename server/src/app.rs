//! Starting and stopping a whole server: store, pipeline, flusher, retention, and the gRPC and
//! HTTP listeners. Tests start it in-process on `127.0.0.1:0`.

use std::net::SocketAddr;
use std::sync::Arc;

use tailscope_proto::v1::ingest_server::IngestServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::alerting::Alerting;
use crate::clock::{Clock, SystemClock};
use crate::cluster::config::Role;
use crate::config::Config;
use crate::http::{self, AppState};
use crate::ingest::otlp::{grpc::OtlpService, http as otlp_http};
use crate::ingest::IngestService;
use crate::pipeline::{Admit, Pipeline};
use crate::sampling::Sampler;
use crate::store::{Store, StoreError};
use crate::telemetry::Metrics;

/// HTTP/2 receive window per ingest stream.
const GRPC_STREAM_WINDOW: u32 = 4 << 20;
/// HTTP/2 receive window per connection.
const GRPC_CONNECTION_WINDOW: u32 = 16 << 20;

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// A listener could not bind.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The data directory could not be created.
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The users of the web configuration or an ingest token file are invalid.
    #[error("credentials: {0}")]
    Auth(crate::auth::AuthError),
    /// The web configuration (TLS) is invalid, or a certificate it names.
    #[error("web configuration: {0}")]
    Tls(crate::tls::TlsError),
    /// A rule file or the notifier configuration is invalid.
    #[error("alerting: {0}")]
    Alerting(#[from] crate::alerting::AlertingError),
    /// A remote-write target cannot be set up (its http_config file).
    #[error("remote_write {name}: {message}")]
    RemoteWrite {
        /// The target.
        name: String,
        /// What was wrong.
        message: String,
    },
    /// Cluster mode could not start (NATS, its streams).
    #[error("cluster: {0}")]
    Cluster(#[from] crate::cluster::ClusterError),
    /// The store could not be opened.
    #[error("cannot open the store in {path}: {source}")]
    Store {
        /// The directory.
        path: std::path::PathBuf,
        /// Why.
        source: StoreError,
    },
}

/// A running server.
#[derive(Debug)]
pub struct Server {
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    otlp_http_addr: SocketAddr,
    stop: watch::Sender<bool>,
    flusher: JoinHandle<()>,
    grpc: JoinHandle<()>,
    http: JoinHandle<()>,
    background: Vec<JoinHandle<()>>,
    store: Store,
    metrics: Arc<Metrics>,
    reloader: crate::reload::Reloader,
    /// A cluster store's drain, run before it stops.
    drain: Option<crate::cluster::drain::Drain>,
}

impl Server {
    /// Starts a server with the system clock.
    pub async fn start(config: Config) -> Result<Server, StartError> {
        Server::start_with_clock(config, Arc::new(SystemClock)).await
    }

    /// Starts a server whose notion of "now" comes from `clock`.
    pub async fn start_with_clock(config: Config, clock: Arc<dyn Clock>) -> Result<Server, StartError> {
        config.validate()?;
        let layout = config.histogram.layout()?;
        let dir = &config.server.data_dir;
        std::fs::create_dir_all(dir).map_err(|source| StartError::DataDir { path: dir.clone(), source })?;
        let metrics = Arc::new(Metrics::new());
        let store = Store::open(dir, layout, &metrics)
            .map_err(|source| StartError::Store { path: dir.clone(), source })?;
        let (pipeline, shard_tasks) =
            Pipeline::start(&config.ingest, store.clone(), metrics.clone(), clock.clone())
                .map_err(|source| StartError::Store { path: dir.clone(), source })?;

        let tls = if config.server.web_config_file.as_os_str().is_empty() {
            None
        } else {
            crate::tls::Tls::load(&config.server.web_config_file).map_err(StartError::Tls)?.map(Arc::new)
        };
        let web_config = (!config.server.web_config_file.as_os_str().is_empty())
            .then_some(config.server.web_config_file.as_path());
        let auth = Arc::new(
            crate::auth::Auth::load(&config.auth, web_config, metrics.clone()).map_err(StartError::Auth)?,
        );
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr).await.map_err(|source| StartError::Bind { addr, source })
        };
        let grpc_listener = bind(config.server.grpc_addr).await?;
        let http_listener = bind(config.server.http_addr).await?;
        let otlp_http_listener = bind(config.server.otlp_http_addr).await?;
        let local =
            |l: &TcpListener, addr| l.local_addr().map_err(|source| StartError::Bind { addr, source });
        let grpc_addr = local(&grpc_listener, config.server.grpc_addr)?;
        let http_addr = local(&http_listener, config.server.http_addr)?;
        let otlp_http_addr = local(&otlp_http_listener, config.server.otlp_http_addr)?;

        let (stop, stop_rx) = watch::channel(false);
        let mut remote_tasks = Vec::new();
        for target in &config.remote_write {
            let (writer, tasks) = crate::remote_write::RemoteWriter::start(
                target.clone(),
                clock.clone(),
                metrics.clone(),
                stop_rx.clone(),
            )
            .map_err(|message| StartError::RemoteWrite { name: target.display_name(), message })?;
            pipeline.add_sink(writer);
            remote_tasks.extend(tasks);
        }
        let limits = crate::listener::ConnectionLimits {
            max_connections: config.server.max_connections,
            header_read_timeout: config.server.header_read_timeout,
            handshake_timeout: config.server.handshake_timeout,
            shutdown_timeout: config.server.shutdown_timeout,
        };
        let flusher = tokio::spawn(pipeline.clone().run_flusher(
            config.ingest.flush_interval,
            stop_rx.clone(),
            config.server.shutdown_timeout,
        ));

        // One node decides names by what it stored; a cluster's gateways by the names log.
        let known = match config.cluster.enabled() {
            true => Vec::new(),
            false => store.series().map_err(|source| StartError::Store { path: dir.clone(), source })?,
        };
        let cardinality = Arc::new(crate::cardinality::Cardinality::new(
            config.ingest.max_services,
            config.ingest.max_operations_per_service,
            config.ingest.max_peers_per_service,
            known.iter().map(|(_, l)| (l.service.as_str(), l.operation.as_str(), l.peer.as_str())),
        ));
        let (mut shared_names, mut shared_owners) = (None, None);

        // Cluster mode: batches go to the log, and this node's consumers feed the pipeline.
        let mut cluster_tasks = Vec::new();
        let mut ruler = None;
        let mut read_barrier = None;
        let mut cluster_status = None;
        let mut drain = None;
        let mut assignment = None;
        let mut sources: Arc<dyn crate::query::Sources> = Arc::new(store.clone());
        let mut max_batch_bytes = config.ingest.max_batch_bytes;
        let admit: Arc<dyn Admit> = if config.cluster.enabled() {
            let mut cluster = crate::cluster::Cluster::start(
                &config.cluster,
                crate::cluster::Bound { grpc: grpc_addr, http: http_addr, otlp_http: otlp_http_addr },
                crate::cluster::GatewayLimits {
                    max_batch_bytes: config.ingest.max_batch_bytes,
                    queue_capacity: config.ingest.queue_capacity,
                    max_seq_gap: config.ingest.max_seq_gap,
                    client_idle_timeout: config.ingest.client_idle_timeout,
                },
                cardinality.clone(),
                store.clone(),
                pipeline.clone(),
                metrics.clone(),
                stop_rx.clone(),
                config.server.shutdown_timeout,
            )
            .await?;
            let gateway = cluster.gateway();
            max_batch_bytes = cluster.max_batch_bytes();
            ruler = Some(cluster.ruler());
            read_barrier = cluster.read_barrier();
            cluster_status = Some(cluster.status());
            if let Some(s) = cluster.sources() {
                sources = s;
            }
            drain = cluster.take_drain();
            assignment = Some(cluster.assignment());
            shared_names = cluster.names();
            shared_owners = cluster.owners();
            cluster_tasks = cluster.tasks;
            gateway
        } else {
            pipeline.clone()
        };

        // A single node's shards record every span admitted: they tell the sampler per epoch.
        // A cluster node's record only the partitions it stores, so its gateway tells it.
        let sampler = Sampler::new(config.sampling.clone());
        let sampler = Arc::new(if config.cluster.enabled() { sampler } else { sampler.fed_by_epochs() });
        if sampler.is_fed_by_epochs() {
            pipeline.feed_traffic(sampler.clone());
        }
        // The live gateways share the budget: each spends its part.
        if let Some(mut owners) = assignment {
            let sampler = sampler.clone();
            cluster_tasks.push(tokio::spawn(async move {
                loop {
                    let gateways = owners.borrow_and_update().as_ref().map_or(0, |a| a.gateways());
                    sampler.set_share(1.0 / gateways.max(1) as f64);
                    if owners.changed().await.is_err() {
                        return;
                    }
                }
            }));
        }
        let ingest = IngestService::new(
            admit.clone(),
            metrics.clone(),
            clock.clone(),
            &config.ingest,
            sampler.clone(),
            cardinality,
        );
        let ingest = match shared_names {
            Some(names) => ingest.shared_names(names),
            None => ingest,
        };
        let ingest = match shared_owners {
            Some(owners) => ingest.shared_owners(owners),
            None => ingest,
        };
        let ingest = if config.cluster.has(Role::Gateway) {
            ingest
        } else {
            ingest.refusing(&format!(
                "this node takes no spans (cluster.roles = {}); send them to a gateway node",
                config.cluster.roles_text()
            ))
        };
        let otlp_http_routes = otlp_http::router(
            ingest.clone(),
            otlp_http::HttpConfig {
                max_body_bytes: max_batch_bytes,
                cors_origins: config.server.otlp_http_cors_origins.clone(),
            },
        );
        // OTLP/HTTP, like gRPC, ends once the pipeline has closed (exports in flight answered).
        let (otlp_stop, otlp_stop_rx) = watch::channel(false);
        let mut otlp_closed = admit.subscribe();
        tokio::spawn(async move {
            let _ = otlp_closed.wait_for(|s| s.closed).await;
            let _ = otlp_stop.send(true);
        });
        let otlp_http_routes = otlp_http_routes
            .layer(axum::middleware::from_fn_with_state(auth.clone(), crate::auth::guard_otlp_http));
        let otlp_http = tokio::spawn(crate::listener::serve_http(
            otlp_http_listener,
            otlp_http_routes,
            limits,
            metrics.clone(),
            tls.clone(),
            otlp_stop_rx,
        ));
        let guard = crate::auth::GrpcGuard(auth.clone());
        let otlp = OtlpService::new(ingest.clone(), max_batch_bytes);
        let otlp = tonic::service::interceptor::InterceptedService::new(otlp, guard.clone());
        let ingest = IngestServer::new(ingest)
            .max_decoding_message_size(max_batch_bytes)
            .max_encoding_message_size(1024 * 1024);
        let ingest = tonic::service::interceptor::InterceptedService::new(ingest, guard);
        // gRPC ends once the pipeline has closed every stream (after the final flush).
        let mut closed = admit.subscribe();
        let grpc_incoming =
            crate::listener::grpc_incoming(grpc_listener, limits, metrics.clone(), tls.clone());
        let grpc = tokio::spawn(async move {
            let shutdown = async move {
                let _ = closed.wait_for(|s| s.closed).await;
            };
            // HTTP/2's default 64 KiB stream window allows about one batch in flight per
            // stream; larger receive windows let a client pipeline (memory stays bounded by
            // the connection window per client).
            let result = tonic::transport::Server::builder()
                .initial_stream_window_size(Some(GRPC_STREAM_WINDOW))
                .initial_connection_window_size(Some(GRPC_CONNECTION_WINDOW))
                .add_service(ingest)
                .add_service(otlp)
                .serve_with_incoming_shutdown(grpc_incoming, shutdown)
                .await;
            if let Err(e) = result {
                tracing::error!(error = %e, "gRPC listener failed");
            }
        });

        let external_url = if config.alerting.external_url.is_empty() {
            format!("http://{http_addr}")
        } else {
            config.alerting.external_url.clone()
        };
        let (alerting, alerting_tasks) = Alerting::start(
            &config.alerting,
            crate::alerting::Delivery { external_url, leader: ruler },
            store.clone(),
            sources.clone(),
            clock.clone(),
            config.retention.clone(),
            metrics.clone(),
            stop_rx.clone(),
        )
        .map_err(StartError::Alerting)?;

        let reloader = crate::reload::Reloader::new(alerting.clone(), tls.clone(), auth.clone());
        let state = AppState {
            pipeline: pipeline.clone(),
            store: store.clone(),
            sources,
            metrics: metrics.clone(),
            clock: clock.clone(),
            retention: config.retention.clone(),
            sampler: sampler.clone(),
            alerting: alerting.clone(),
            query: config.query.clone(),
            queries: Arc::new(tokio::sync::Semaphore::new(config.query.max_concurrency)),
            reloader: reloader.clone(),
            auth: auth.clone(),
            read_barrier,
            cluster: cluster_status,
            refusing_queries: (!config.cluster.has(Role::Query)).then(|| {
                format!(
                    "this node answers no queries (cluster.roles = {}); ask a node with the query role",
                    config.cluster.roles_text()
                )
                .into()
            }),
        };
        let http = tokio::spawn(crate::listener::serve_http(
            http_listener,
            http::router(state),
            limits,
            metrics.clone(),
            tls.clone(),
            stop_rx.clone(),
        ));

        let mut background = shard_tasks;
        background.extend(cluster_tasks);
        background.extend(remote_tasks);
        background.push(otlp_http);
        background.extend(alerting_tasks);
        background.push(tokio::spawn(run_sampler(
            sampler,
            pipeline.clone(),
            config.sampling.interval,
            config.ingest.throttle_high_water,
            metrics.clone(),
            stop_rx.clone(),
        )));
        background.push(tokio::spawn(run_retention(
            store.clone(),
            pipeline.clone(),
            config.clone(),
            clock,
            metrics.clone(),
            stop_rx,
        )));
        tracing::info!(%grpc_addr, %http_addr, %otlp_http_addr, data_dir = %dir.display(), shards = pipeline.shard_count(), "tailscope started");
        Ok(Server {
            grpc_addr,
            http_addr,
            otlp_http_addr,
            stop,
            flusher,
            grpc,
            http,
            background,
            store,
            metrics,
            reloader,
            drain,
        })
    }

    /// The bound gRPC address.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// The bound HTTP address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The bound OTLP/HTTP address.
    pub fn otlp_http_addr(&self) -> SocketAddr {
        self.otlp_http_addr
    }

    /// The store (for tests and benchmarks).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The self-metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Re-reads the certificates, the rule files and the notifier configuration (what SIGHUP
    /// does); on an error the running configuration of that part stays.
    pub fn reload(&self) -> Result<(), crate::reload::ReloadError> {
        self.reloader.reload()
    }

    /// Shuts down gracefully: a cluster store first drains (hands its partitions on, see
    /// [`crate::cluster::drain`]); then it stops accepting batches, writes and acknowledges
    /// everything accepted, closes the streams and listeners, and closes the store.
    pub async fn shutdown(self) {
        if let Some(drain) = &self.drain {
            drain.run().await;
        }
        let _ = self.stop.send(true);
        let _ = self.flusher.await;
        tracing::debug!("shutdown: the last epoch is written");
        let _ = self.grpc.await;
        tracing::debug!("shutdown: gRPC closed");
        let _ = self.http.await;
        tracing::debug!("shutdown: HTTP closed");
        for (i, t) in self.background.into_iter().enumerate() {
            let _ = t.await;
            tracing::debug!(task = i, "shutdown: background task ended");
        }
        if let Err(e) = self.store.sync() {
            tracing::error!(error = %e, "cannot sync the write-ahead log at shutdown");
        }
        tracing::info!("tailscope stopped");
    }
}

async fn run_retention(
    store: Store,
    pipeline: Arc<Pipeline>,
    config: Config,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(config.retention.interval);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|&s| s) => return,
        }
        let (store, retention, now) = (store.clone(), config.retention.clone(), clock.now_seconds());
        let idle = config.ingest.client_idle_timeout.as_secs() as i64;
        if idle > 0 {
            pipeline.forget_idle_clients(now - idle);
        }
        match tokio::task::spawn_blocking(move || store.apply_retention(now, &retention)).await {
            Ok(Ok(report)) => {
                if report.series_retired > 0 {
                    metrics.series_retired.inc_by(report.series_retired);
                    tracing::info!(
                        series = report.series_retired,
                        "retention retired series past every resolution"
                    );
                }
                for (res, n) in report.deleted {
                    metrics.retention_partitions_deleted.inc_by(n);
                    tracing::info!(
                        resolution = res.name(),
                        partitions = n,
                        "retention deleted expired partitions"
                    );
                }
            }
            Ok(Err(e)) => tracing::error!(error = %e, "retention failed"),
            Err(e) => tracing::error!(error = %e, "retention task failed"),
        }
    }
}

/// Recomputes sampling probabilities every `interval`; shard queues above `high_water` count
/// as overload.
async fn run_sampler(
    sampler: Arc<Sampler>,
    pipeline: Arc<Pipeline>,
    interval: std::time::Duration,
    high_water: f64,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut last = std::time::Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|&s| s) => return,
        }
        let seconds = last.elapsed().as_secs_f64().max(1e-3);
        last = std::time::Instant::now();
        sampler.tick(seconds, pipeline.pressure() >= high_water);
        metrics.sampling_budget.set(sampler.effective_budget());
        metrics.sampling_keys.set(sampler.snapshot().len() as i64);
    }
}
