//! Identity: the SVIDs this workload holds and the bundles it trusts.
//!
//! Sources (`dev`, `files`, later `workload_api`) produce [`IdentityUpdate`]s; the
//! [`IdentityState`] turns them into immutable [`Snapshot`]s that every consumer (TLS,
//! admin, SDS) reads lock-free. Sources never talk to consumers directly.

pub mod dev_ca;
pub mod files;
pub mod pem;
mod snapshot;
mod state;

pub use snapshot::{Bundle, Snapshot, Svid};
pub use state::IdentityState;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::IdentityConfig;

/// What a source delivers: a complete new view, replacing the previous one whole.
#[derive(Debug, Clone)]
pub struct IdentityUpdate {
    pub svids: Vec<Arc<Svid>>,
    pub bundles: Vec<Arc<Bundle>>,
}

/// Why an identity could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path}: {problem}")]
    File { path: String, problem: String },
    #[error("{0}")]
    Svid(String),
    #[error("dev CA: {0}")]
    DevCa(String),
}

/// A configured identity source, ready to load its first identity and then keep
/// the state current until cancelled.
pub enum IdentitySource {
    Dev(Box<dev_ca::DevSource>),
    Files(files::FilesSource),
}

impl IdentitySource {
    /// Builds the source and loads its first identity, so that a wrong path or a
    /// bad certificate is reported at start-up (and by `svidcar check`).
    pub fn load(config: &IdentityConfig) -> Result<(Self, IdentityUpdate), IdentityError> {
        match config {
            IdentityConfig::Dev(c) => {
                let (s, u) = dev_ca::DevSource::load(c)?;
                Ok((Self::Dev(Box::new(s)), u))
            }
            IdentityConfig::Files(c) => {
                let (s, u) = files::FilesSource::load(c)?;
                Ok((Self::Files(s), u))
            }
        }
    }

    /// Keeps `state` current until `shutdown` fires.
    pub async fn run(self, state: Arc<IdentityState>, shutdown: CancellationToken) {
        match self {
            Self::Dev(s) => s.run(state, shutdown).await,
            Self::Files(s) => s.run(state, shutdown).await,
        }
    }
}
