//! What `--tls-*`, `--expert-tls-*` and `--api-keys-file` load: each read
//! and checked at start (a file that cannot be used stops the router
//! before it loads weights), then watched and re-read when it changes.

use std::sync::Arc;

use moe_proto::tls::{self, ClientTls, ServerTls};

use crate::RouterError;
use crate::auth::{self, Authenticator};
use crate::config::Security;

pub struct Secured {
    /// The public API's TLS.
    pub tls: Option<Arc<ServerTls>>,
    /// TLS to the experts.
    pub expert_tls: Option<Arc<ClientTls>>,
    /// The check on the Inference service.
    pub inference: Authenticator,
    /// The check on health and reflection (open unless `--auth-health`).
    pub health: Authenticator,
}

impl Secured {
    /// Loads `security`'s files; needs a tokio runtime (the watchers).
    pub fn load(security: &Security) -> Result<Self, RouterError> {
        let invalid = |err: &dyn std::fmt::Display| RouterError::invalid(err.to_string());
        let tls = (security.tls.clone())
            .map(tls::server)
            .transpose()
            .map_err(|err| invalid(&format_args!("--tls-cert/--tls-key: {err}")))?;
        let expert_tls = (security.expert_tls.clone())
            .map(tls::client)
            .transpose()
            .map_err(|err| invalid(&format_args!("--expert-tls-*: {err}")))?;
        let keys = (security.api_keys.clone())
            .map(auth::watch_keys)
            .transpose()
            .map_err(|err| invalid(&err))?;
        let inference = Authenticator::new(keys);
        let health = if security.auth_health {
            inference.clone()
        } else {
            Authenticator::open()
        };
        Ok(Self {
            tls,
            expert_tls,
            inference,
            health,
        })
    }
}
