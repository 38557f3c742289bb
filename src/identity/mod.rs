//! Identity: the SVIDs this workload holds and the bundles it trusts.
//!
//! Sources (`dev`, `files`, later `workload_api`) produce [`IdentityUpdate`]s; the
//! [`IdentityState`] turns them into immutable [`Snapshot`]s that every consumer (TLS,
//! admin, SDS) reads lock-free. Sources never talk to consumers directly.

pub mod dev_ca;
pub mod files;
pub mod keys;
pub mod pem;
mod snapshot;
mod state;
pub mod workload_api;

pub use snapshot::{Bundle, Snapshot, Svid};
pub use state::IdentityState;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::IdentityConfig;
use crate::x509::{ChainError, LeafInfo};

/// What a source delivers: a complete new view, replacing the previous one whole.
#[derive(Debug, Clone)]
pub struct IdentityUpdate {
    pub svids: Vec<Arc<Svid>>,
    pub bundles: Vec<Arc<Bundle>>,
}

impl IdentityUpdate {
    /// Our default SVID must be within its validity and chain to our own trust domain's
    /// bundle: otherwise every peer would refuse us, so such an update is not applied.
    pub fn check_own(&self) -> Result<(), IdentityError> {
        let svid = self
            .svids
            .first()
            .ok_or_else(|| IdentityError::Svid("no SVID".into()))?;
        let td = svid.spiffe_id.trust_domain();
        let bundle = self
            .bundles
            .iter()
            .find(|b| &b.trust_domain == td)
            .ok_or_else(|| {
                IdentityError::Svid(format!("no bundle for our own trust domain {td}"))
            })?;
        let leaf =
            LeafInfo::parse(&svid.chain[0]).map_err(|e| IdentityError::Svid(e.to_string()))?;
        crate::x509::verify_chain(
            crate::crypto::provider()
                .signature_verification_algorithms
                .all,
            &leaf,
            &svid.chain[0],
            &svid.chain[1..],
            bundle.trust(),
            rustls_pki_types::UnixTime::now(),
            webpki::KeyUsage::client_auth(),
        )
        .map_err(|e| {
            let why = match e {
                ChainError::LeafExpired(_) => "has expired".to_string(),
                ChainError::LeafNotYetValid(_) => "is not valid yet".to_string(),
                ChainError::UnknownIssuer { .. } => format!("is not signed by the bundle of {td}"),
                other => format!("does not verify against the bundle of {td}: {other}"),
            };
            IdentityError::Svid(format!("our SVID {} {why}", svid.spiffe_id))
        })
    }
}

/// Why an identity could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path}: {problem}")]
    File { path: String, problem: String },
    #[error("{0}")]
    Svid(String),
    #[error("{0}")]
    Bundle(String),
    #[error("dev CA: {0}")]
    DevCa(String),
    #[error("Workload API: {0}")]
    WorkloadApi(String),
}

/// A configured identity source, ready to load its first identity and then keep
/// the state current until cancelled.
pub enum IdentitySource {
    Dev(Box<dev_ca::DevSource>),
    Files(files::FilesSource),
    WorkloadApi(Box<workload_api::WorkloadApiSource>),
}

impl IdentitySource {
    /// Builds the source and loads its first identity. Local sources (dev, files) fail
    /// at once on a bad file; the Workload API is waited for, as the agent may start
    /// after the sidecar.
    pub async fn start(config: &IdentityConfig) -> Result<(Self, IdentityUpdate), IdentityError> {
        match config {
            IdentityConfig::Dev(c) => {
                let (s, u) = dev_ca::DevSource::start(c)?;
                Ok((Self::Dev(Box::new(s)), u))
            }
            IdentityConfig::Files(c) => {
                let (s, u) = files::FilesSource::load(c)?;
                Ok((Self::Files(s), u))
            }
            IdentityConfig::WorkloadApi(c) => {
                let (s, u) = workload_api::WorkloadApiSource::start(c).await?;
                Ok((Self::WorkloadApi(Box::new(s)), u))
            }
        }
    }

    /// What `svidcar check` can verify without side effects: local sources are loaded
    /// (files read, CA checked); the Workload API is not contacted. Returns a summary.
    pub fn check(config: &IdentityConfig) -> Result<String, IdentityError> {
        let update = match config {
            IdentityConfig::Dev(c) => dev_ca::DevSource::load(c)?.1,
            IdentityConfig::Files(c) => {
                files::read_jwt_bundles(c, None)?;
                files::FilesSource::load(c)?.1
            }
            IdentityConfig::WorkloadApi(c) => {
                return Ok(format!(
                    "workload_api at unix://{} (not contacted by check)",
                    c.socket.display()
                ))
            }
        };
        Ok(update
            .svids
            .first()
            .map(|s| s.spiffe_id.to_string())
            .unwrap_or_default())
    }

    /// Hands the JWT side of the identity to `jwt`: bundles known at start-up (dev CA,
    /// files) and the minter (dev CA, Workload API). Called once, before listeners bind.
    pub fn install_jwt(&self, jwt: &crate::jwt::JwtState) {
        match self {
            Self::Dev(s) => s.install_jwt(jwt),
            Self::Files(s) => s.install_jwt(jwt),
            Self::WorkloadApi(s) => s.install_jwt(jwt),
        }
    }

    /// Keeps `state` current until `shutdown` fires.
    pub async fn run(self, state: Arc<IdentityState>, shutdown: CancellationToken) {
        match self {
            Self::Dev(s) => s.run(state, shutdown).await,
            Self::Files(s) => s.run(state, shutdown).await,
            Self::WorkloadApi(s) => s.run(state, shutdown).await,
        }
    }
}
