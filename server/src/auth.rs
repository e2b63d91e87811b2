//! Who may do what. Three kinds of request, as an operator separates them:
//!
//! - **read** (queries, labels, rules, alerts and silences listed, metrics): any user of the web
//!   configuration's `basic_auth_users` (Prometheus' format, bcrypt hashes) when it has some,
//!   anyone otherwise;
//! - **write** (alerts and silences posted, changed or expired): those users too, limited to
//!   `auth.write_users` when that is set; spans are written with a bearer token of
//!   `auth.ingest_token_files` when any is set (gRPC metadata or the OTLP `authorization`
//!   header `OTEL_EXPORTER_OTLP_HEADERS` sets);
//! - **admin** (`/-/reload`): off unless `auth.enable_lifecycle` (Prometheus'
//!   `--web.enable-lifecycle`), then for the users of `auth.admin_users` when that is set.
//!
//! Secrets are compared in constant time (tokens as SHA-256 digests, passwords by bcrypt, a
//! verified password remembered as a digest so bcrypt's cost is paid once per credential). A
//! refusal is counted by reason and logged with the user name, never the secret. Token files
//! and users are re-read on `SIGHUP` and `POST /-/reload`.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

use crate::telemetry::Metrics;

#[cfg(test)]
mod tests;

/// Verified passwords remembered at most (a new one beyond forgets them all).
const MAX_REMEMBERED: usize = 1_024;

/// `[auth]`: who may write and administer; the users are the web configuration's.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Files of bearer tokens that may write spans, one per line (`#` starts a comment);
    /// empty: spans need no token.
    pub ingest_token_files: Vec<PathBuf>,
    /// Users (of `basic_auth_users`) who may post alerts and change silences; empty: every user.
    pub write_users: Vec<String>,
    /// Users who may use the admin endpoints (`/-/reload`); empty: every user.
    pub admin_users: Vec<String>,
    /// Whether the admin endpoints are served at all (Prometheus' `--web.enable-lifecycle`).
    pub enable_lifecycle: bool,
}

/// The credential a span writer authenticated with: the first 8 bytes of its token's digest
/// (never 0). A client id belongs to the credential that first used it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credential(pub u64);

/// What a request wants to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read.
    Read,
    /// Post alerts, change silences.
    Write,
    /// Reload.
    Admin,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No credentials where some are required (401).
    #[error("authentication required")]
    Missing,
    /// Credentials that do not match (401).
    #[error("invalid credentials")]
    Invalid,
    /// A user not allowed this kind of request (403).
    #[error("user {0:?} may not do this")]
    Forbidden(String),
    /// The admin endpoints are off (403).
    #[error("the lifecycle API is not enabled (auth.enable_lifecycle)")]
    LifecycleDisabled,
}

impl Refusal {
    /// The label of `tailscope_auth_failures_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Missing => "missing",
            Refusal::Invalid => "invalid",
            Refusal::Forbidden(_) => "forbidden",
            Refusal::LifecycleDisabled => "lifecycle_disabled",
        }
    }

    /// Whether the caller should authenticate (401) rather than give up (403).
    pub fn unauthenticated(&self) -> bool {
        matches!(self, Refusal::Missing | Refusal::Invalid)
    }
}

/// Why the credentials cannot be loaded: a file that cannot be read, or what it holds.
pub type AuthError = crate::files::FileError;

#[derive(Debug, Deserialize)]
struct UsersYaml {
    #[serde(default)]
    basic_auth_users: HashMap<String, String>,
}

#[derive(Debug, Default)]
struct Credentials {
    /// User → bcrypt hash.
    users: HashMap<String, String>,
    /// SHA-256 of each ingest token.
    tokens: Vec<[u8; 32]>,
}

/// The server's credentials and rules.
#[derive(Debug)]
pub struct Auth {
    config: AuthConfig,
    web_config: Option<PathBuf>,
    credentials: RwLock<Credentials>,
    /// Digests of (user, password, hash) verified already.
    verified: Mutex<HashSet<[u8; 32]>>,
    metrics: Arc<Metrics>,
}

impl Auth {
    /// Loads the users of `web_config` (if any) and the tokens of `config`.
    pub fn load(
        config: &AuthConfig,
        web_config: Option<&Path>,
        metrics: Arc<Metrics>,
    ) -> Result<Auth, AuthError> {
        let credentials = read_credentials(config, web_config)?;
        Ok(Auth {
            config: config.clone(),
            web_config: web_config.map(Path::to_owned),
            credentials: RwLock::new(credentials),
            verified: Mutex::new(HashSet::new()),
            metrics,
        })
    }

    /// Re-reads users and tokens; on an error the running ones stay.
    pub fn reload(&self) -> Result<(), AuthError> {
        let credentials = read_credentials(&self.config, self.web_config.as_deref())?;
        *self.credentials.write() = credentials;
        self.verified.lock().clear();
        Ok(())
    }

    /// Checks an HTTP request's `Authorization` header for `access`; counts a refusal.
    pub fn check_http(&self, authorization: Option<&str>, access: Access) -> Result<(), Refusal> {
        let result = self.http(authorization, access);
        if let Err(refusal) = &result {
            self.refused(refusal, "http");
        }
        result
    }

    /// Checks a span writer's `Authorization` header (`Bearer <token>`); counts a refusal.
    /// The credential, when tokens are required.
    pub fn check_ingest(
        &self,
        authorization: Option<&str>,
        transport: &'static str,
    ) -> Result<Option<Credential>, Refusal> {
        let result = self.ingest(authorization);
        if let Err(refusal) = &result {
            self.refused(refusal, transport);
        }
        result
    }

    /// Counts and logs a refusal.
    fn refused(&self, refusal: &Refusal, listener: &'static str) {
        self.metrics.auth_failure(listener, refusal.reason());
        // The user's name (in a 403) helps; a secret is never logged.
        tracing::info!(listener, reason = refusal.reason(), refusal = %refusal, "request refused");
    }

    fn http(&self, authorization: Option<&str>, access: Access) -> Result<(), Refusal> {
        if access == Access::Admin && !self.config.enable_lifecycle {
            return Err(Refusal::LifecycleDisabled);
        }
        let user = {
            let credentials = self.credentials.read();
            if credentials.users.is_empty() {
                return Ok(());
            }
            let (user, password) = basic(authorization.ok_or(Refusal::Missing)?)?;
            let hash = credentials.users.get(&user).ok_or(Refusal::Invalid)?.clone();
            drop(credentials);
            if !self.verify(&user, &password, &hash) {
                return Err(Refusal::Invalid);
            }
            user
        };
        let allowed = match access {
            Access::Read => &[][..],
            Access::Write => &self.config.write_users[..],
            Access::Admin => &self.config.admin_users[..],
        };
        if allowed.is_empty() || allowed.contains(&user) {
            Ok(())
        } else {
            Err(Refusal::Forbidden(user))
        }
    }

    /// Whether `password` is `user`'s: bcrypt, paid once per credential.
    fn verify(&self, user: &str, password: &str, hash: &str) -> bool {
        let key = sha256(&[user.as_bytes(), &[0], password.as_bytes(), &[0], hash.as_bytes()]);
        if self.verified.lock().contains(&key) {
            return true;
        }
        if !bcrypt::verify(password, hash).unwrap_or(false) {
            return false;
        }
        let mut verified = self.verified.lock();
        if verified.len() >= MAX_REMEMBERED {
            verified.clear();
        }
        verified.insert(key);
        true
    }

    fn ingest(&self, authorization: Option<&str>) -> Result<Option<Credential>, Refusal> {
        let credentials = self.credentials.read();
        if credentials.tokens.is_empty() {
            return Ok(None);
        }
        let header = authorization.ok_or(Refusal::Missing)?;
        let token = strip_scheme(header, "bearer").ok_or(Refusal::Invalid)?;
        let digest = sha256(&[token.as_bytes()]);
        // Every token compared, each in constant time: neither which nor how much matched shows.
        let found = credentials.tokens.iter().fold(false, |found, t| found | constant_time_eq(t, &digest));
        if found {
            let id = u64::from_be_bytes(digest[..8].try_into().unwrap_or_default());
            Ok(Some(Credential(id.max(1))))
        } else {
            Err(Refusal::Invalid)
        }
    }
}

fn read_credentials(config: &AuthConfig, web_config: Option<&Path>) -> Result<Credentials, AuthError> {
    let mut credentials = Credentials::default();
    if let Some(path) = web_config {
        let text = crate::files::read_to_string(path)?;
        // The rest of the file is the TLS loader's; only the users are read here.
        let y: UsersYaml = serde_yaml::from_str(&text)
            .map_err(|e| AuthError::Invalid { path: path.to_owned(), message: e.to_string() })?;
        for (user, hash) in y.basic_auth_users {
            if hash.parse::<bcrypt::HashParts>().is_err() {
                return Err(AuthError::Invalid {
                    path: path.to_owned(),
                    message: format!("basic_auth_users.{user}: not a bcrypt hash (make one with `htpasswd -nBC 10 \"\" | tr -d ':'`)"),
                });
            }
            credentials.users.insert(user, hash);
        }
    }
    for path in &config.ingest_token_files {
        let text = crate::files::read_to_string(path)?;
        let before = credentials.tokens.len();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
            credentials.tokens.push(sha256(&[line.as_bytes()]));
        }
        if credentials.tokens.len() == before {
            return Err(AuthError::Invalid {
                path: path.clone(),
                message: "no token in it (one per line)".into(),
            });
        }
    }
    let known: HashSet<&String> = credentials.users.keys().collect();
    for (key, names) in [("auth.write_users", &config.write_users), ("auth.admin_users", &config.admin_users)]
    {
        if let Some(unknown) = names.iter().find(|n| !known.contains(n)) {
            let path = web_config.map_or_else(|| PathBuf::from("server.web_config_file"), Path::to_owned);
            return Err(AuthError::Invalid {
                path,
                message: format!("{key} names {unknown:?}, who is not among basic_auth_users"),
            });
        }
    }
    Ok(credentials)
}

/// The user and password of a `Basic` authorization.
fn basic(header: &str) -> Result<(String, String), Refusal> {
    use base64::Engine as _;
    let encoded = strip_scheme(header, "basic").ok_or(Refusal::Invalid)?;
    let decoded =
        base64::engine::general_purpose::STANDARD.decode(encoded.trim()).map_err(|_| Refusal::Invalid)?;
    let text = String::from_utf8(decoded).map_err(|_| Refusal::Invalid)?;
    let (user, password) = text.split_once(':').ok_or(Refusal::Invalid)?;
    Ok((user.to_owned(), password.to_owned()))
}

/// What follows `scheme ` (case-insensitive) in an authorization header.
fn strip_scheme<'a>(header: &'a str, scheme: &str) -> Option<&'a str> {
    let (given, rest) = header.trim().split_once(' ')?;
    given.eq_ignore_ascii_case(scheme).then_some(rest.trim())
}

fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        ctx.update(p);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// Equality of two digests, in time independent of where they differ.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What an HTTP request to the API wants: the admin endpoints, changes to alerts and
/// silences (Alertmanager's API v2, anything but GET), or reading.
pub fn access_of(method: &axum::http::Method, path: &str) -> Access {
    use axum::http::Method;
    if path == "/-/reload" {
        Access::Admin
    } else if path.starts_with("/api/v2/") && method != Method::GET && method != Method::HEAD {
        Access::Write
    } else {
        Access::Read
    }
}

fn header(request: &axum::extract::Request) -> Option<&str> {
    request.headers().get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok())
}

fn refused(refusal: &Refusal) -> axum::response::Response {
    use axum::http::{header, StatusCode};
    use axum::response::IntoResponse;
    if refusal.unauthenticated() {
        (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Basic realm=\"tailscope\"")],
            format!("{refusal}\n"),
        )
            .into_response()
    } else {
        (StatusCode::FORBIDDEN, format!("{refusal}\n")).into_response()
    }
}

/// The HTTP API's guard (an axum middleware).
pub async fn guard_http(
    axum::extract::State(auth): axum::extract::State<Arc<Auth>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let access = access_of(request.method(), request.uri().path());
    match auth.check_http(header(&request), access) {
        Ok(()) => next.run(request).await,
        Err(refusal) => refused(&refusal),
    }
}

/// OTLP/HTTP's guard: a bearer token of `auth.ingest_token_files` (an axum middleware).
pub async fn guard_otlp_http(
    axum::extract::State(auth): axum::extract::State<Arc<Auth>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    // A browser's CORS preflight carries no credentials.
    if request.method() == axum::http::Method::OPTIONS {
        return next.run(request).await;
    }
    match auth.check_ingest(header(&request), "otlp_http") {
        Ok(_) => next.run(request).await,
        Err(refusal) => refused(&refusal),
    }
}

/// The gRPC services' guard: a bearer token in the `authorization` metadata.
#[derive(Debug, Clone)]
pub struct GrpcGuard(pub Arc<Auth>);

impl tonic::service::Interceptor for GrpcGuard {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let header = request.metadata().get("authorization").and_then(|v| v.to_str().ok());
        match self.0.check_ingest(header, "grpc") {
            Ok(credential) => {
                if let Some(c) = credential {
                    request.extensions_mut().insert(c);
                }
                Ok(request)
            }
            Err(refusal) => Err(tonic::Status::unauthenticated(refusal.to_string())),
        }
    }
}
