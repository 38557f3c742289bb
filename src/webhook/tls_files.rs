//! The webhook's serving certificate from files (a Kubernetes Secret mounted as a volume,
//! renewed by cert-manager): checked every few seconds and swapped in when the files
//! change and load; a pair that does not load is logged and the old one kept.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;

use crate::identity::pem;

const POLL: Duration = Duration::from_secs(2);

#[derive(Debug)]
pub struct FileCert {
    current: ArcSwap<CertifiedKey>,
}

impl ResolvesServerCert for FileCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn load(cert: &Path, key: &Path) -> anyhow::Result<CertifiedKey> {
    let chain = pem::load_certs(cert)?;
    let key = pem::load_key(key)?;
    let signer = crate::crypto::provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| anyhow::anyhow!("{}: unusable key: {e}", cert.display()))?;
    let ck = CertifiedKey::new(chain, signer);
    ck.keys_match()
        .map_err(|e| anyhow::anyhow!("{} and its key do not match: {e}", cert.display()))?;
    Ok(ck)
}

/// Change stamps of both files (a Secret volume swaps a symlink: follow it).
fn stamp(paths: &[PathBuf]) -> Vec<Option<(SystemTime, u64)>> {
    paths
        .iter()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}

impl FileCert {
    /// Loads the pair (an error names the file) and keeps it fresh until `shutdown`.
    pub fn start(
        cert: PathBuf,
        key: PathBuf,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<Self>> {
        let first = load(&cert, &key)?;
        let me = Arc::new(Self {
            current: ArcSwap::from_pointee(first),
        });
        let weak = Arc::downgrade(&me);
        tokio::spawn(async move {
            let paths = [cert.clone(), key.clone()];
            let mut last = stamp(&paths);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(POLL) => {}
                }
                let now = stamp(&paths);
                if now == last {
                    continue;
                }
                last = now;
                let Some(me) = weak.upgrade() else { return };
                let (c, k) = (cert.clone(), key.clone());
                match tokio::task::spawn_blocking(move || load(&c, &k)).await {
                    Ok(Ok(ck)) => {
                        me.current.store(Arc::new(ck));
                        tracing::info!(cert = %cert.display(), "webhook certificate reloaded");
                    }
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "webhook certificate changed but does not load; keeping the previous one")
                    }
                    Err(e) => tracing::error!(error = %e, "webhook certificate reload failed"),
                }
            }
        });
        Ok(me)
    }
}
