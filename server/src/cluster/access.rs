//! How a node reaches NATS: the servers' addresses, TLS (the CA the servers' certificates are
//! checked against, and this node's own certificate for servers that verify clients) and one
//! way of authenticating (user and password, a token, an nkey, or a `.creds` file's user JWT).
//! Every file is read when the node starts, and a file that cannot be used stops it, named
//! with the key that names it. The secret files are read again at every reconnection: a
//! password, token, seed or credentials file rotated on disk and in NATS (whose reload closes
//! the connections of credentials it no longer takes) is used without a restart; so are this
//! node's client certificate and the CA the servers are verified against, read again at every
//! TLS handshake.
//!
//! Every byte one node sends another goes through NATS (the log, the names log, the claims,
//! the peer reads, the leases), so securing this connection secures the cluster's traffic.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_nats::{ConnectOptions, ServerAddr};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::DigitallySignedStruct;

use super::config::{set, ClusterConfig};
use super::ClusterError;
use crate::files::{self, FileError};
use crate::tls::pem;

/// What a node needs to connect to NATS, read from the configuration and its files.
#[derive(Clone)]
pub struct NatsAccess {
    addrs: Vec<ServerAddr>,
    tls: Option<rustls::ClientConfig>,
    auth: Auth,
}

/// One way of authenticating: where its secret is read from.
#[derive(Clone)]
enum Auth {
    Anonymous,
    User {
        user: String,
        password_file: PathBuf,
    },
    Token(PathBuf),
    NKey(PathBuf),
    /// A `.creds` file: a user JWT and the seed that signs for it.
    Creds(PathBuf),
}

impl Auth {
    /// What to answer a server's `nonce` with, the secret read from its file now.
    fn credentials(&self, nonce: &[u8]) -> Result<async_nats::Auth, ClusterError> {
        let mut auth = async_nats::Auth::new();
        match self {
            Auth::Anonymous => {}
            Auth::User { user, password_file } => {
                auth.username = Some(user.clone());
                auth.password = Some(secret("password_file", password_file)?);
            }
            Auth::Token(path) => auth.token = Some(secret("token_file", path)?),
            Auth::NKey(path) => {
                let seed = secret("nkey_seed_file", path)?;
                let (public, signature) = sign_nonce("nkey_seed_file", path, &seed, nonce)?;
                auth.signature = Some(signature);
                auth.nkey = Some(public);
            }
            Auth::Creds(path) => {
                let text = read_text("credentials_file", path)?;
                let (jwt, seed) = parse_creds(&text).ok_or_else(|| {
                    invalid(
                        "credentials_file",
                        path,
                        "no user JWT and nkey seed between `-----BEGIN ...-----` lines in it",
                    )
                })?;
                auth.signature = Some(sign_nonce("credentials_file", path, seed, nonce)?.1);
                auth.jwt = Some(jwt.to_owned());
            }
        }
        Ok(auth)
    }
}

impl fmt::Debug for NatsAccess {
    /// The addresses and the kinds of TLS and authentication, never a secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let auth = match &self.auth {
            Auth::Anonymous => "anonymous".to_owned(),
            Auth::User { user, .. } => format!("user {user:?}"),
            Auth::Token(_) => "token".to_owned(),
            Auth::NKey(_) => "nkey".to_owned(),
            Auth::Creds(_) => "credentials file".to_owned(),
        };
        f.debug_struct("NatsAccess")
            .field("addrs", &self.addrs)
            .field("tls", &self.tls.is_some())
            .field("auth", &format_args!("{auth}"))
            .finish()
    }
}

impl NatsAccess {
    /// Reads `config`'s NATS addresses, certificates and secret files.
    pub fn load(config: &ClusterConfig) -> Result<NatsAccess, ClusterError> {
        let addrs = config
            .nats
            .iter()
            .map(|u| u.parse::<ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ClusterError::Connect { urls: config.nats.clone(), message: e.to_string() })?;
        let tls = match set(&config.tls_ca_file) {
            None => None,
            Some(ca) => Some(client_tls(ca, set(&config.tls_cert_file).zip(set(&config.tls_key_file)))?),
        };
        let auth = if !config.user.is_empty() {
            Auth::User { user: config.user.clone(), password_file: config.password_file.clone() }
        } else if let Some(path) = set(&config.token_file) {
            Auth::Token(path.to_owned())
        } else if let Some(path) = set(&config.nkey_seed_file) {
            Auth::NKey(path.to_owned())
        } else if let Some(path) = set(&config.credentials_file) {
            Auth::Creds(path.to_owned())
        } else {
            Auth::Anonymous
        };
        // Read (and a seed signed with) once now, so a file that cannot be used stops the start.
        auth.credentials(b"tailscope")?;
        Ok(NatsAccess { addrs, tls, auth })
    }

    /// The servers to connect to.
    pub fn addrs(&self) -> Vec<ServerAddr> {
        self.addrs.clone()
    }

    /// Options for a connection named `name`, with this node's TLS and credentials (the secret
    /// read from its file at each connection and reconnection).
    pub fn options(&self, name: String) -> ConnectOptions {
        let options = match &self.auth {
            Auth::Anonymous => ConnectOptions::new(),
            auth => {
                let auth = auth.clone();
                ConnectOptions::with_auth_callback(move |nonce| {
                    let auth = auth.clone();
                    async move { auth.credentials(&nonce).map_err(async_nats::AuthError::new) }
                })
            }
        };
        let options = options.name(name);
        match &self.tls {
            Some(tls) => options.require_tls(true).tls_client_config(tls.clone()),
            None => options,
        }
    }
}

/// The user JWT and the nkey seed of a NATS credentials file: the first two lines that each
/// stand alone between two lines of dashes (`-----BEGIN NATS USER JWT-----` ...).
fn parse_creds(text: &str) -> Option<(&str, &str)> {
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let fence = |l: &str| l.len() >= 6 && l.starts_with("---") && l.ends_with("---");
    let mut found =
        lines.windows(3).filter(|w| fence(w[0]) && fence(w[2]) && !w[1].is_empty() && !fence(w[1]));
    let jwt = found.next()?[1];
    let seed = found.next()?[1];
    Some((jwt, seed))
}

/// The text of the secret file `path` (named by `cluster.<key>`), without surrounding
/// whitespace; an empty one is refused.
fn secret(key: &'static str, path: &Path) -> Result<String, ClusterError> {
    let text = read_text(key, path)?;
    let text = text.trim();
    if text.is_empty() {
        return Err(invalid(key, path, "it is empty"));
    }
    Ok(text.to_owned())
}

/// The public key of `seed` (from the file `path`, named by `cluster.<key>`) and its signature
/// of `nonce`.
fn sign_nonce(
    key: &'static str,
    path: &Path,
    seed: &str,
    nonce: &[u8],
) -> Result<(String, Vec<u8>), ClusterError> {
    let not_seed = |e: nkeys::error::Error| invalid(key, path, format!("not an nkey seed: {e}"));
    let pair = nkeys::KeyPair::from_seed(seed).map_err(not_seed)?;
    Ok((pair.public_key(), pair.sign(nonce).map_err(not_seed)?))
}

/// The error of a file `path` (named by `cluster.<key>`) whose content is wrong.
fn invalid(key: &'static str, path: &Path, message: impl Into<String>) -> ClusterError {
    ClusterError::Access { key, error: FileError::invalid(path, message) }
}

/// The bytes of the file `path`, named by `cluster.<key>`.
fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, ClusterError> {
    files::read(path).map_err(|error| ClusterError::Access { key, error })
}

/// The text of the file `path`, named by `cluster.<key>`.
fn read_text(key: &'static str, path: &Path) -> Result<String, ClusterError> {
    files::read_to_string(path).map_err(|error| ClusterError::Access { key, error })
}

/// What a set of files gives (a CA's verifier, a certified key), read again each time it is
/// used — at a TLS handshake, a few per node — so files renewed on disk take effect from the
/// next connection on without a restart. Files that cannot be used then are logged and what
/// was last read is used.
struct Reread<T> {
    what: &'static str,
    read: Box<dyn Fn() -> Result<T, ClusterError> + Send + Sync>,
    last: parking_lot::Mutex<Arc<T>>,
}

impl<T> Reread<T> {
    /// Reads once now; an error names the file and its key.
    fn new(
        what: &'static str,
        read: impl Fn() -> Result<T, ClusterError> + Send + Sync + 'static,
    ) -> Result<Self, ClusterError> {
        let first = read()?;
        Ok(Reread { what, read: Box::new(read), last: parking_lot::Mutex::new(Arc::new(first)) })
    }

    /// What the files give now (or, when they cannot be used, what they gave last).
    fn current(&self) -> Arc<T> {
        let mut last = self.last.lock();
        match (self.read)() {
            Ok(now) => *last = Arc::new(now),
            Err(e) => {
                tracing::warn!(error = %e, what = self.what, "cannot be read again; using the last one read")
            }
        }
        last.clone()
    }

    /// What the files gave last, without reading them.
    fn last(&self) -> Arc<T> {
        self.last.lock().clone()
    }
}

impl<T> fmt::Debug for Reread<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reread").field("what", &self.what).finish_non_exhaustive()
    }
}

/// A TLS client configuration trusting the CA in `ca`, presenting `client` (certificate and
/// key files) when given.
fn client_tls(ca: &Path, client: Option<(&Path, &Path)>) -> Result<rustls::ClientConfig, ClusterError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = ServerRoots::load(ca.to_owned(), provider.clone())?;
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("tls_ca_file", ca, e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(roots));
    let Some((cert, key)) = client else { return Ok(builder.with_no_client_auth()) };
    let (cert, key) = (cert.to_owned(), key.to_owned());
    let resolver =
        Reread::new("the NATS client certificate", move || read_certified(&cert, &key, &provider))?;
    Ok(builder.with_client_cert_resolver(Arc::new(ClientCert(resolver))))
}

/// The CA the NATS servers' certificates are verified against, read again at every TLS
/// handshake (so a CA rotated on disk is trusted from the next connection on); each check is
/// rustls' own WebPKI verification with those roots.
#[derive(Debug)]
struct ServerRoots(Reread<Arc<WebPkiServerVerifier>>);

impl ServerRoots {
    /// Reads the CA in `ca` once; an error names the file.
    fn load(ca: PathBuf, provider: Arc<rustls::crypto::CryptoProvider>) -> Result<ServerRoots, ClusterError> {
        Ok(ServerRoots(Reread::new("the NATS servers' CA", move || read_roots(&ca, &provider))?))
    }
}

impl ServerCertVerifier for ServerRoots {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0.current().verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.last().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.last().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.last().supported_verify_schemes()
    }
}

/// A verifier trusting the CA certificates in `ca`.
fn read_roots(
    ca: &Path,
    provider: &Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<WebPkiServerVerifier>, ClusterError> {
    let err = |message: String| invalid("tls_ca_file", ca, message);
    let roots = pem::roots(&read("tls_ca_file", ca)?).map_err(err)?;
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| err(e.to_string()))
}

/// This node's client certificate, read from its files again at every TLS handshake, so a
/// renewed certificate is presented from the next connection on without a restart.
#[derive(Debug)]
struct ClientCert(Reread<CertifiedKey>);

impl ResolvesClientCert for ClientCert {
    fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The certificate chain in `cert` with the key in `key`, checked to fit each other.
fn read_certified(
    cert: &Path,
    key: &Path,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<CertifiedKey, ClusterError> {
    let chain =
        pem::certificates(&read("tls_cert_file", cert)?).map_err(|e| invalid("tls_cert_file", cert, e))?;
    let private =
        pem::private_key(&read("tls_key_file", key)?).map_err(|e| invalid("tls_key_file", key, e))?;
    CertifiedKey::from_der(chain, private, provider)
        .map_err(|e| invalid("tls_key_file", key, format!("does not fit cluster.tls_cert_file: {e}")))
}

#[cfg(test)]
mod tests;
