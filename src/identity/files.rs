//! The `files` identity source: PEM files on disk (spiffe-helper, cert-manager's
//! csi-driver-spiffe, anything that writes PEM), reloaded when they change.
//!
//! Writers replace files by atomic rename or by swapping a symlinked directory
//! (Kubernetes volumes), so we watch the parent directories, not the files: a watch
//! on a file dies with the inode that a rename replaced.

use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::{pem, Bundle, IdentityError, IdentityState, IdentityUpdate, Svid};
use crate::config::FilesConfig;
use crate::jwt::{JwtBundle, JwtBundles};
use crate::spiffe::parse_trust_domain;
use crate::watch::FileWatch;

pub struct FilesSource {
    config: FilesConfig,
    /// `jwt_bundles` as loaded at start-up (each file must load then).
    jwt: JwtBundles,
}

impl FilesSource {
    pub fn load(config: &FilesConfig) -> Result<(Self, IdentityUpdate), IdentityError> {
        let update = read(config)?;
        let jwt = read_jwt_bundles(config, None)?;
        Ok((
            Self {
                config: config.clone(),
                jwt,
            },
            update,
        ))
    }

    pub fn install_jwt(&self, jwt: &crate::jwt::JwtState) {
        if !self.config.jwt_bundles.is_empty() {
            jwt.set_bundles(self.jwt.clone(), "files");
        }
    }

    /// Reloads on every change of the files until cancelled. A change that does not
    /// load (half-written, mismatched key) keeps the current identity.
    pub async fn run(self, state: Arc<IdentityState>, shutdown: CancellationToken) {
        let mut watch = match FileWatch::new(&watched_files(&self.config)) {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(error = %e, "identity files will not be reloaded");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                got = watch.changed() => if got.is_none() { return },
            }
            if !self.config.jwt_bundles.is_empty() {
                // Per file: one that does not load keeps its trust domain's old bundle.
                let current = state.jwt().bundles();
                if let Ok(next) = read_jwt_bundles(&self.config, Some(&current)) {
                    state.jwt().set_bundles(next, "files");
                }
            }
            let config = self.config.clone();
            match tokio::task::spawn_blocking(move || read(&config)).await {
                Ok(Ok(update)) => {
                    state.publish(update);
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "identity files changed but do not load; keeping the current identity")
                }
                Err(e) => tracing::error!(error = %e, "identity file reload task failed"),
            }
        }
    }
}

/// Every file the source reads.
fn watched_files(config: &FilesConfig) -> Vec<PathBuf> {
    let mut files = vec![config.cert.clone(), config.key.clone()];
    files.extend(config.bundle.iter().cloned());
    files.extend(config.bundles.values().cloned());
    files.extend(config.jwt_bundles.values().cloned());
    files
}

/// Reads and validates all files into one update.
fn read(config: &FilesConfig) -> Result<IdentityUpdate, IdentityError> {
    let chain = pem::load_certs(&config.cert)?;
    let key = pem::load_key(&config.key)?;
    let svid = Svid::new(chain, key).map_err(|e| IdentityError::File {
        path: config.cert.display().to_string(),
        problem: e.to_string(),
    })?;
    let own_td = svid.spiffe_id.trust_domain().clone();
    let mut bundles = Vec::new();
    if let Some(path) = &config.bundle {
        bundles.push(Arc::new(bundle_file(own_td.as_str(), path)?));
    }
    for (td, path) in &config.bundles {
        if config.bundle.is_some() && td == own_td.as_str() {
            return Err(IdentityError::File {
                path: path.display().to_string(),
                problem: format!(
                    "identity.files.bundles.{td} names our own trust domain, which `bundle` already sets; keep one"
                ),
            });
        }
        bundles.push(Arc::new(bundle_file(td, path)?));
    }
    if !bundles.iter().any(|b| b.trust_domain == own_td) {
        return Err(IdentityError::File {
            path: config.cert.display().to_string(),
            problem: format!(
                "no bundle for the SVID's own trust domain {own_td}: set identity.files.bundle"
            ),
        });
    }
    let update = IdentityUpdate {
        svids: vec![Arc::new(svid)],
        bundles,
    };
    update.check_own().map_err(|e| IdentityError::File {
        path: config.cert.display().to_string(),
        problem: e.to_string(),
    })?;
    Ok(update)
}

fn bundle_file(td: &str, path: &std::path::Path) -> Result<Bundle, IdentityError> {
    let td = parse_trust_domain(td).map_err(|e| IdentityError::File {
        path: path.display().to_string(),
        problem: e.to_string(),
    })?;
    Bundle::new(td, pem::load_certs(path)?).map_err(|e| IdentityError::File {
        path: path.display().to_string(),
        problem: e.to_string(),
    })
}

/// Reads `jwt_bundles`. With no `current` (start-up, `check`) any file that does not
/// load is an error; on a reload such a file is logged and its trust domain keeps the
/// bundle in `current`. Keys skipped inside a file are logged either way.
pub fn read_jwt_bundles(
    config: &FilesConfig,
    current: Option<&JwtBundles>,
) -> Result<JwtBundles, IdentityError> {
    let mut out = JwtBundles::default();
    for (td, path) in &config.jwt_bundles {
        let file_err = |problem: String| IdentityError::File {
            path: path.display().to_string(),
            problem,
        };
        let td = parse_trust_domain(td).map_err(|e| file_err(e.to_string()))?;
        let loaded = std::fs::read(path)
            .map_err(|e| file_err(format!("cannot read: {e}")))
            .and_then(|bytes| {
                JwtBundle::parse(&bytes).map_err(|e| file_err(format!("JWT bundle: {e}")))
            });
        match (loaded, current) {
            (Ok((bundle, skipped)), _) => {
                for why in skipped {
                    tracing::warn!(file = %path.display(), trust_domain = %td, "JWT bundle key skipped: {why}");
                }
                out.by_domain.insert(td, Arc::new(bundle));
            }
            (Err(e), None) => return Err(e),
            (Err(e), Some(current)) => {
                tracing::warn!(error = %e, trust_domain = %td, "JWT bundle file changed but does not load; keeping the previous bundle");
                if let Some(old) = current.by_domain.get(&td) {
                    out.by_domain.insert(td, old.clone());
                }
            }
        }
    }
    Ok(out)
}
