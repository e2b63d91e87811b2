//! TLS on every listener, configured the way Prometheus is: a web configuration file
//! (`server.web_config_file`, Prometheus' `--web.config.file`) whose `tls_server_config` names
//! the certificate, its key and, for mutual TLS, the client CA and `client_auth_type`. The file
//! an operator already has for Prometheus works here; keys this server does not implement are
//! refused by name rather than ignored.
//!
//! The certificate is re-read on `SIGHUP` and `POST /-/reload`: new connections get the new
//! one, open connections keep theirs. A reload that fails keeps the running certificate.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use serde::Deserialize;
use tokio_rustls::TlsAcceptor;

pub mod pem;

#[cfg(test)]
mod tests;

/// Why the web configuration cannot be used: a file that cannot be read, or a key in it that
/// is wrong.
pub type TlsError = crate::files::FileError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WebConfigYaml {
    tls_server_config: Option<TlsServerYaml>,
    /// Read by `auth`.
    #[serde(default)]
    #[allow(dead_code)]
    basic_auth_users: Option<serde_yaml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsServerYaml {
    cert_file: PathBuf,
    key_file: PathBuf,
    #[serde(default)]
    client_auth_type: Option<String>,
    #[serde(default)]
    client_ca_file: Option<PathBuf>,
    #[serde(default)]
    min_version: Option<String>,
    #[serde(default)]
    max_version: Option<String>,
}

/// What a listener speaks inside TLS, announced by ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    /// HTTP/1.1: the HTTP API and OTLP/HTTP.
    Http1,
    /// HTTP/2: the gRPC port.
    H2,
}

/// The server configurations of one certificate: for HTTP/1.1 and for HTTP/2 listeners.
type Configs = (Arc<ServerConfig>, Arc<ServerConfig>);

/// The listeners' TLS configuration, reloadable.
#[derive(Debug)]
pub struct Tls {
    path: PathBuf,
    configs: RwLock<Configs>,
}

impl Tls {
    /// Reads the web configuration file at `path`; `None` when it configures no TLS.
    pub fn load(path: &Path) -> Result<Option<Tls>, TlsError> {
        Ok(build(path)?.map(|configs| Tls { path: path.to_owned(), configs: RwLock::new(configs) }))
    }

    /// Re-reads the file and the certificates it names; on an error the running ones stay.
    pub fn reload(&self) -> Result<(), TlsError> {
        match build(&self.path)? {
            Some(configs) => {
                *self.configs.write() = configs;
                Ok(())
            }
            None => Err(invalid(
                &self.path,
                "tls_server_config: removed while the server runs with TLS (restart to serve plaintext)",
            )),
        }
    }

    /// An acceptor with the current certificate, for a listener speaking `alpn`.
    pub fn acceptor(&self, alpn: Alpn) -> TlsAcceptor {
        let configs = self.configs.read();
        TlsAcceptor::from(match alpn {
            Alpn::Http1 => configs.0.clone(),
            Alpn::H2 => configs.1.clone(),
        })
    }
}

use crate::files::read;

fn invalid(path: &Path, message: impl Into<String>) -> TlsError {
    TlsError::invalid(path, message)
}

/// The server configurations (HTTP/1.1, HTTP/2) the file describes.
fn build(path: &Path) -> Result<Option<Configs>, TlsError> {
    let text = crate::files::read_to_string(path)?;
    let y: WebConfigYaml = serde_yaml::from_str(&text).map_err(|e| invalid(path, e.to_string()))?;
    let Some(t) = y.tls_server_config else { return Ok(None) };
    // Relative paths are relative to the web configuration file, as in Prometheus.
    let base = path.parent().unwrap_or(Path::new("."));
    let resolve = |p: &Path| if p.is_absolute() { p.to_owned() } else { base.join(p) };
    let cert_path = resolve(&t.cert_file);
    let certs = pem::certificates(&read(&cert_path)?)
        .map_err(|e| invalid(path, format!("tls_server_config.cert_file {}: {e}", cert_path.display())))?;
    let key_path = resolve(&t.key_file);
    let key = pem::private_key(&read(&key_path)?)
        .map_err(|e| invalid(path, format!("tls_server_config.key_file {}: {e}", key_path.display())))?;
    let versions: Vec<&'static rustls::SupportedProtocolVersion> = {
        let rank = |v: &Option<String>, key: &str, default: u8| -> Result<u8, TlsError> {
            match v.as_deref() {
                None => Ok(default),
                Some("TLS12") => Ok(12),
                Some("TLS13") => Ok(13),
                Some(other) => {
                    Err(invalid(path, format!("tls_server_config.{key}: {other:?} is not TLS12 or TLS13")))
                }
            }
        };
        let (min, max) = (rank(&t.min_version, "min_version", 12)?, rank(&t.max_version, "max_version", 13)?);
        [(12, &rustls::version::TLS12), (13, &rustls::version::TLS13)]
            .into_iter()
            .filter(|(v, _)| (min..=max).contains(v))
            .map(|(_, p)| p)
            .collect()
    };
    if versions.is_empty() {
        return Err(invalid(path, "tls_server_config: min_version is above max_version"));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client_roots = |what: &str| -> Result<Arc<RootCertStore>, TlsError> {
        let Some(ca) = &t.client_ca_file else {
            return Err(invalid(
                path,
                format!("tls_server_config.client_ca_file: required by client_auth_type {what}"),
            ));
        };
        let ca = resolve(ca);
        let roots = pem::roots(&read(&ca)?)
            .map_err(|e| invalid(path, format!("tls_server_config.client_ca_file {}: {e}", ca.display())))?;
        Ok(Arc::new(roots))
    };
    let auth = t.client_auth_type.as_deref().unwrap_or("NoClientCert");
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .map_err(|e| invalid(path, format!("tls_server_config: {e}")))?;
    let builder = match auth {
        "NoClientCert" => builder.with_no_client_auth(),
        "VerifyClientCertIfGiven" | "RequireAndVerifyClientCert" => {
            let verifier = WebPkiClientVerifier::builder_with_provider(client_roots(auth)?, provider);
            let verifier = if auth == "VerifyClientCertIfGiven" { verifier.allow_unauthenticated() } else { verifier };
            let verifier = verifier.build().map_err(|e| invalid(path, format!("tls_server_config.client_ca_file: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
        "RequestClientCert" | "RequireAnyClientCert" => {
            return Err(invalid(
                path,
                format!("tls_server_config.client_auth_type: {auth} (a certificate taken unverified) is not supported; use VerifyClientCertIfGiven or RequireAndVerifyClientCert with client_ca_file"),
            ))
        }
        other => {
            return Err(invalid(
                path,
                format!("tls_server_config.client_auth_type: unknown {other:?} (NoClientCert, VerifyClientCertIfGiven, RequireAndVerifyClientCert)"),
            ))
        }
    };
    let config = builder.with_single_cert(certs, key).map_err(|e| {
        invalid(path, format!("tls_server_config: the key does not fit the certificate: {e}"))
    })?;
    let with_alpn = |alpn: &[u8]| {
        let mut c = config.clone();
        c.alpn_protocols = vec![alpn.to_vec()];
        Arc::new(c)
    };
    Ok(Some((with_alpn(b"http/1.1"), with_alpn(b"h2"))))
}
