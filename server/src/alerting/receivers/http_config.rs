//! Alertmanager's `http_config` of an integration: how it reaches its receiver — credentials
//! (`basic_auth`, `authorization`, `bearer_token`, each also from a file), TLS (`tls_config`:
//! a CA, a client certificate, `server_name`, `insecure_skip_verify`) and `proxy_url`. Each
//! integration gets an HTTP client of its own built from it; files are read when the
//! configuration is loaded (and so again on reload).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// `http_config` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(in crate::alerting) struct HttpConfigYaml {
    authorization: Option<AuthorizationYaml>,
    basic_auth: Option<BasicAuthYaml>,
    bearer_token: Option<String>,
    bearer_token_file: Option<PathBuf>,
    tls_config: Option<TlsConfigYaml>,
    proxy_url: Option<String>,
    follow_redirects: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthorizationYaml {
    #[serde(rename = "type")]
    kind: Option<String>,
    credentials: Option<String>,
    credentials_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BasicAuthYaml {
    username: String,
    password: Option<String>,
    password_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsConfigYaml {
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    server_name: Option<String>,
    #[serde(default)]
    insecure_skip_verify: bool,
}

/// The credentials a request carries.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    /// `Authorization: <scheme> <credentials>` (`Bearer` unless the type says otherwise).
    Authorization {
        /// The scheme.
        scheme: String,
        /// The secret.
        credentials: String,
    },
    /// `Authorization: Basic …`.
    Basic {
        /// The user.
        username: String,
        /// The password.
        password: String,
    },
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secrets stay out of logs and debug output.
        match self {
            Credentials::Authorization { scheme, .. } => write!(f, "Authorization({scheme} <secret>)"),
            Credentials::Basic { username, .. } => write!(f, "Basic({username}:<secret>)"),
        }
    }
}

/// How an integration reaches its receiver.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Its own client (TLS settings, proxy).
    pub client: reqwest::Client,
    /// What each request carries.
    pub credentials: Option<Credentials>,
}

impl Default for HttpConfig {
    fn default() -> HttpConfig {
        HttpConfig { client: reqwest::Client::new(), credentials: None }
    }
}

/// A secret or URL given inline (`key`) or in a file (`file_key`, read and trimmed), at most
/// one of them; the error names the key (and the file).
pub(in crate::alerting) fn value_or_file(
    key: &str,
    inline: Option<String>,
    file_key: &str,
    file: Option<PathBuf>,
) -> Result<Option<String>, String> {
    match (inline, file) {
        (Some(_), Some(_)) => Err(format!("at most one of {key} and {file_key} may be set")),
        (Some(v), None) => Ok(Some(v)),
        (None, Some(f)) => std::fs::read_to_string(&f)
            .map(|s| Some(s.trim().to_owned()))
            .map_err(|e| format!("{file_key} {}: {e}", f.display())),
        (None, None) => Ok(None),
    }
}

/// [`value_or_file`] inside `http_config`.
fn one_of(
    key: &str,
    inline: Option<String>,
    file: Option<PathBuf>,
    file_key: &str,
) -> Result<Option<String>, String> {
    value_or_file(key, inline, file_key, file).map_err(|e| format!("http_config.{e}"))
}

impl HttpConfig {
    /// Builds the client and reads the credential files; the error names the key.
    pub(in crate::alerting) fn build(y: HttpConfigYaml) -> Result<HttpConfig, String> {
        let bearer = one_of("bearer_token", y.bearer_token, y.bearer_token_file, "bearer_token_file")?;
        let authorization = match y.authorization {
            None => None,
            Some(a) => {
                let credentials = one_of(
                    "authorization.credentials",
                    a.credentials,
                    a.credentials_file,
                    "authorization.credentials_file",
                )?
                .ok_or("http_config.authorization: credentials or credentials_file is required")?;
                Some(Credentials::Authorization {
                    scheme: a.kind.unwrap_or_else(|| "Bearer".into()),
                    credentials,
                })
            }
        };
        let basic = match y.basic_auth {
            None => None,
            Some(b) => {
                let password =
                    one_of("basic_auth.password", b.password, b.password_file, "basic_auth.password_file")?
                        .unwrap_or_default();
                Some(Credentials::Basic { username: b.username, password })
            }
        };
        let bearer =
            bearer.map(|credentials| Credentials::Authorization { scheme: "Bearer".into(), credentials });
        let set: Vec<Credentials> = [authorization, basic, bearer].into_iter().flatten().collect();
        if set.len() > 1 {
            return Err(
                "http_config: at most one of authorization, basic_auth and bearer_token may be set".into()
            );
        }
        let mut builder =
            reqwest::Client::builder().use_rustls_tls().connect_timeout(Duration::from_secs(10));
        if y.follow_redirects == Some(false) {
            builder = builder.redirect(reqwest::redirect::Policy::none());
        }
        if let Some(proxy) = &y.proxy_url {
            let proxy =
                reqwest::Proxy::all(proxy).map_err(|e| format!("http_config.proxy_url {proxy:?}: {e}"))?;
            builder = builder.proxy(proxy);
        }
        let tls = y.tls_config.unwrap_or_default();
        if let Some(ca) = &tls.ca_file {
            let pem = std::fs::read(ca)
                .map_err(|e| format!("http_config.tls_config.ca_file {}: {e}", ca.display()))?;
            let fault = |e: String| format!("http_config.tls_config.ca_file {}: {e}", ca.display());
            for cert in crate::tls::pem::certificates(&pem).map_err(fault)? {
                let cert = reqwest::Certificate::from_der(cert.as_ref()).map_err(|e| fault(e.to_string()))?;
                builder = builder.add_root_certificate(cert);
            }
        }
        match (&tls.cert_file, &tls.key_file) {
            (Some(cert), Some(key)) => {
                let mut pem = std::fs::read(cert)
                    .map_err(|e| format!("http_config.tls_config.cert_file {}: {e}", cert.display()))?;
                pem.extend(
                    std::fs::read(key)
                        .map_err(|e| format!("http_config.tls_config.key_file {}: {e}", key.display()))?,
                );
                let identity = reqwest::Identity::from_pem(&pem)
                    .map_err(|e| format!("http_config.tls_config.cert_file/key_file: {e}"))?;
                builder = builder.identity(identity);
            }
            (None, None) => {}
            _ => return Err("http_config.tls_config: cert_file and key_file go together".into()),
        }
        if tls.server_name.is_some() {
            return Err(
                "http_config.tls_config.server_name: not supported (the URL's host is verified)".into()
            );
        }
        if tls.insecure_skip_verify {
            builder = builder.danger_accept_invalid_certs(true);
        }
        let client = builder.build().map_err(|e| format!("http_config: {e}"))?;
        Ok(HttpConfig { client, credentials: set.into_iter().next() })
    }

    /// An `http_config` of its own file (`alerting.alertmanager_http_config`); an empty path:
    /// the default.
    pub fn load(path: &Path) -> Result<HttpConfig, String> {
        if path.as_os_str().is_empty() {
            return Ok(HttpConfig::default());
        }
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let y: HttpConfigYaml =
            serde_yaml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        HttpConfig::build(y).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// `request` with the credentials.
    pub fn authorize(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.credentials {
            None => request,
            Some(Credentials::Authorization { scheme, credentials }) => {
                request.header(reqwest::header::AUTHORIZATION, format!("{scheme} {credentials}"))
            }
            Some(Credentials::Basic { username, password }) => request.basic_auth(username, Some(password)),
        }
    }
}

/// Checks that `url` is an `http://` or `https://` URL; the error names `key`.
pub(in crate::alerting) fn check_url(key: &str, url: &str) -> Result<(), String> {
    match reqwest::Url::parse(url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") => Ok(()),
        Ok(u) => Err(format!("{key} {url:?}: the scheme must be http or https, not {}", u.scheme())),
        Err(e) => Err(format!("{key} {url:?}: {e}")),
    }
}
