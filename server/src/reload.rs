//! What `SIGHUP` and `POST /-/reload` re-read: the web configuration's certificates and users,
//! the ingest tokens, the rule files and the notifier configuration. Each part is all or nothing: one that fails keeps
//! running as it was, and the error names its file.

use std::sync::Arc;

use crate::alerting::{Alerting, AlertingError};
use crate::auth::{Auth, AuthError};
use crate::tls::{Tls, TlsError};

/// Why a reload failed.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The web configuration or a certificate it names.
    #[error("web configuration: {0}")]
    Tls(TlsError),
    /// The users or a token file.
    #[error("credentials: {0}")]
    Auth(AuthError),
    /// A rule file or the notifier configuration.
    #[error(transparent)]
    Alerting(#[from] AlertingError),
}

/// The reloadable parts of a running server.
#[derive(Debug, Clone)]
pub struct Reloader {
    alerting: Arc<Alerting>,
    tls: Option<Arc<Tls>>,
    auth: Arc<Auth>,
}

impl Reloader {
    /// Reloads `alerting`, `auth` and, when the listeners use it, `tls`.
    pub fn new(alerting: Arc<Alerting>, tls: Option<Arc<Tls>>, auth: Arc<Auth>) -> Reloader {
        Reloader { alerting, tls, auth }
    }

    /// Re-reads everything; the first failure is returned (later parts are still tried).
    pub fn reload(&self) -> Result<(), ReloadError> {
        let tls = self.tls.as_ref().map_or(Ok(()), |t| t.reload());
        if let Err(e) = &tls {
            tracing::error!(error = %e, "reload: the running certificate stays");
        }
        let auth = self.auth.reload();
        if let Err(e) = &auth {
            tracing::error!(error = %e, "reload: the running credentials stay");
        }
        self.alerting.reload()?;
        tls.map_err(ReloadError::Tls)?;
        auth.map_err(ReloadError::Auth)
    }
}
