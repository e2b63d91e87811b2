//! `[cluster]`: the settings of cluster mode (kept apart from the cluster's code, so the
//! configuration depends on nothing else of the server).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `[cluster]`: NATS JetStream as the partitioned, replicated log. Empty `nats`: single node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// NATS server URLs (`nats://127.0.0.1:4222`); any one is enough to connect, listing
    /// every server of the NATS cluster lets a node reconnect when one dies.
    pub nats: Vec<String>,
    /// The CA certificate (PEM) the NATS servers' certificates are checked against. Set: every
    /// connection to NATS is TLS, and one to a server without TLS is refused.
    pub tls_ca_file: PathBuf,
    /// This node's client certificate (PEM), for NATS servers that verify clients (`tls {
    /// verify: true }`); with `tls_key_file`.
    pub tls_cert_file: PathBuf,
    /// The key of `tls_cert_file` (PEM).
    pub tls_key_file: PathBuf,
    /// The NATS user this node connects as, with `password_file`.
    pub user: String,
    /// A file holding `user`'s password (surrounding whitespace ignored).
    pub password_file: PathBuf,
    /// A file holding the NATS authorization token; instead of `user`.
    pub token_file: PathBuf,
    /// A file holding this node's NATS nkey seed (`SU...`); instead of `user` or `token_file`.
    pub nkey_seed_file: PathBuf,
    /// A NATS credentials file (`.creds`: a user JWT and its nkey seed, as `nsc` writes them),
    /// for NATS in operator mode; instead of the others.
    pub credentials_file: PathBuf,
    /// This node's name: unique in the cluster (it names the node's gateway in message ids).
    pub node_id: String,
    /// The cluster's name: its streams are `<name>_p<N>`, their subjects `<name>.p.<N>`.
    pub name: String,
    /// Partitions (one stream each). Fixed when the cluster is created: every node must agree.
    pub partitions: u32,
    /// Copies JetStream keeps of each stream (1, 3 or 5 NATS servers).
    pub stream_replicas: usize,
    /// Store nodes that hold each partition (rendezvous hashing over the live stores); 0:
    /// every store holds every partition. With 2, any one store may be down and every query
    /// is still answered.
    pub replication_factor: usize,
    /// How long the log keeps messages: a store down longer re-reads from the oldest kept.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Bytes a partition's stream may hold; a full stream refuses publishes (JetStream's
    /// `discard: new`), so clients are told to back off rather than anything being dropped.
    /// JetStream reserves it on each of `stream_replicas` servers: `partitions` × this must
    /// fit the servers' `max_file_store`.
    pub max_bytes_per_partition: i64,
    /// Bytes the names log (`<name>_names`, where the gateways agree on the names under the
    /// caps) may hold, about 54 per name; once full, batches with names not yet agreed on are
    /// refused (RESOURCE_EXHAUSTED) and the others go on. Reserved like a partition's.
    pub max_names_bytes: i64,
    /// Most bytes of records a gateway coalesces into one message.
    pub max_message_bytes: usize,
    /// How a gateway compresses a log message before publishing it: `snappy` (when that makes
    /// it smaller; the message says so in a header) or `none`. Stores read both.
    pub log_compression: LogCompression,
    /// How long a node waits for NATS at start-up.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// What this node does; all four by default.
    pub roles: Vec<Role>,
    /// How long a strong read (`X-Read-Consistency: strong`) waits for this node's store to
    /// have written everything the log held when it was asked, before it is refused.
    #[serde(with = "humantime_serde")]
    pub strong_read_timeout: Duration,
    /// How long a store that is told to stop (SIGTERM) keeps reading and answering for its
    /// partitions while their other owners catch up; 0: it leaves at once.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
}

/// How log messages are compressed (`cluster.log_compression`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogCompression {
    /// Snappy (raw block format), as Kafka and Prometheus' remote write use it.
    Snappy,
    /// Published as encoded.
    None,
}

/// A part a cluster node plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Takes spans (native, OTLP gRPC and HTTP) and publishes them to the log.
    Gateway,
    /// Reads the partitions it owns from the log into its own store, and answers other
    /// nodes' reads of them.
    Store,
    /// Answers queries (the Prometheus API, `/api/v1/tail`, the service graph), reading each
    /// partition from a caught-up owner.
    Query,
    /// May hold the ruler lease and send alert notifications.
    Ruler,
}

impl Role {
    /// Every role: a node's default.
    pub const ALL: [Role; 4] = [Role::Gateway, Role::Store, Role::Query, Role::Ruler];

    /// Its name in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Gateway => "gateway",
            Role::Store => "store",
            Role::Query => "query",
            Role::Ruler => "ruler",
        }
    }
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            nats: Vec::new(),
            tls_ca_file: PathBuf::new(),
            tls_cert_file: PathBuf::new(),
            tls_key_file: PathBuf::new(),
            user: String::new(),
            password_file: PathBuf::new(),
            token_file: PathBuf::new(),
            nkey_seed_file: PathBuf::new(),
            credentials_file: PathBuf::new(),
            node_id: String::new(),
            name: "tailscope".into(),
            partitions: 16,
            stream_replicas: 3,
            replication_factor: 2,
            max_age: Duration::from_secs(24 * 3600),
            max_bytes_per_partition: 256 << 20,
            max_names_bytes: 128 << 20,
            max_message_bytes: 1 << 20,
            log_compression: LogCompression::Snappy,
            connect_timeout: Duration::from_secs(10),
            roles: Role::ALL.to_vec(),
            strong_read_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(20),
        }
    }
}

impl ClusterConfig {
    /// Whether cluster mode is on.
    pub fn enabled(&self) -> bool {
        !self.nats.is_empty()
    }

    /// Checks the values (only when cluster mode is on); names what is wrong.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !self.enabled() {
            return Ok(());
        }
        let token =
            |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !token(&self.node_id) {
            return Err((
                "cluster.node_id",
                format!("{:?} must be letters, digits, '-' or '_', and not empty", self.node_id),
            ));
        }
        if !token(&self.name) {
            return Err((
                "cluster.name",
                format!("{:?} must be letters, digits, '-' or '_', and not empty", self.name),
            ));
        }
        if !(1..=1024).contains(&self.partitions) {
            return Err(("cluster.partitions", format!("{} must be between 1 and 1024", self.partitions)));
        }
        if !matches!(self.stream_replicas, 1 | 3 | 5) {
            return Err(("cluster.stream_replicas", format!("{} must be 1, 3 or 5", self.stream_replicas)));
        }
        if self.max_bytes_per_partition < 1 << 20 {
            return Err(("cluster.max_bytes_per_partition", "must be at least 1 MiB".into()));
        }
        if self.max_names_bytes < 1 << 20 {
            return Err(("cluster.max_names_bytes", "must be at least 1 MiB".into()));
        }
        if self.max_message_bytes < 1024 {
            return Err(("cluster.max_message_bytes", "must be at least 1024".into()));
        }
        if self.max_age < Duration::from_secs(60) {
            return Err(("cluster.max_age", "must be at least 1m".into()));
        }
        if !(Duration::from_millis(10)..=Duration::from_secs(600)).contains(&self.strong_read_timeout) {
            return Err(("cluster.strong_read_timeout", "must be between 10ms and 10m".into()));
        }
        if self.drain_timeout > Duration::from_secs(600) {
            return Err(("cluster.drain_timeout", "must be at most 10m (0: no drain)".into()));
        }
        if self.roles.is_empty() {
            return Err(("cluster.roles", "must name at least one of gateway, store, query, ruler".into()));
        }
        if self.replication_factor > 64 {
            return Err((
                "cluster.replication_factor",
                format!("{} must be at most 64 (0: every store)", self.replication_factor),
            ));
        }
        for url in &self.nats {
            url.parse::<async_nats::ServerAddr>()
                .map_err(|e| ("cluster.nats", format!("{url:?} is not a NATS server address: {e}")))?;
        }
        self.validate_access()
    }

    /// How this node proves itself to NATS: a client certificate comes with its key and a CA,
    /// a password with its user, and at most one way of authenticating is named.
    fn validate_access(&self) -> Result<(), (&'static str, String)> {
        match (set(&self.tls_cert_file), set(&self.tls_key_file)) {
            (Some(_), None) => return Err(("cluster.tls_key_file", "required with cluster.tls_cert_file".into())),
            (None, Some(_)) => return Err(("cluster.tls_cert_file", "required with cluster.tls_key_file".into())),
            (Some(_), Some(_)) if set(&self.tls_ca_file).is_none() => {
                return Err((
                    "cluster.tls_ca_file",
                    "required with cluster.tls_cert_file (the CA the NATS servers' certificates are checked against)"
                        .into(),
                ))
            }
            _ => {}
        }
        match (self.user.is_empty(), set(&self.password_file)) {
            (false, None) => return Err(("cluster.password_file", "required with cluster.user".into())),
            (true, Some(_)) => return Err(("cluster.user", "required with cluster.password_file".into())),
            _ => {}
        }
        let named: Vec<&str> = [
            (!self.user.is_empty()).then_some("cluster.user"),
            set(&self.token_file).map(|_| "cluster.token_file"),
            set(&self.nkey_seed_file).map(|_| "cluster.nkey_seed_file"),
            set(&self.credentials_file).map(|_| "cluster.credentials_file"),
        ]
        .into_iter()
        .flatten()
        .collect();
        if let [first, second, ..] = named[..] {
            return Err((first, format!("and {second} both name a way to authenticate to NATS; keep one")));
        }
        Ok(())
    }

    /// Whether this node plays `role` (always, on a single node).
    pub fn has(&self, role: Role) -> bool {
        !self.enabled() || self.roles.contains(&role)
    }

    /// The roles as configured: `[store, query]`.
    pub fn roles_text(&self) -> String {
        let names: Vec<&str> = self.roles.iter().map(|r| r.as_str()).collect();
        format!("[{}]", names.join(", "))
    }

    /// The stream of partition `p`.
    pub fn stream(&self, p: u32) -> String {
        format!("{}_p{p}", self.name)
    }

    /// The subject of partition `p`.
    pub fn subject(&self, p: u32) -> String {
        format!("{}.p.{p}", self.name)
    }
}

/// `path` when it is set (not empty).
pub fn set(path: &Path) -> Option<&Path> {
    (!path.as_os_str().is_empty()).then_some(path)
}
