//! The one shared identity state: a lock-free current snapshot plus a change signal.

use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use super::{IdentityUpdate, Snapshot};

/// Holds the current [`Snapshot`]. Readers call [`IdentityState::load`] (one atomic load,
/// no lock) at every handshake; watchers (SDS, admin, metrics) subscribe to changes.
pub struct IdentityState {
    current: ArcSwap<Snapshot>,
    changed: watch::Sender<Arc<Snapshot>>,
}

impl IdentityState {
    pub fn new() -> Self {
        let empty = Arc::new(Snapshot::default());
        let (changed, _) = watch::channel(empty.clone());
        Self {
            current: ArcSwap::new(empty),
            changed,
        }
    }

    /// The current snapshot.
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Receives every new snapshot.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.changed.subscribe()
    }

    /// Publishes `update` as the next snapshot, unless it is byte-for-byte the current
    /// one: identical updates are not updates. Returns the new version if it changed.
    ///
    /// SVIDs and bundles change together in one swap, so a handshake never sees a new
    /// leaf with old roots or the reverse.
    pub fn publish(&self, update: IdentityUpdate) -> Option<u64> {
        let cur = self.current.load();
        if cur.version > 0 && cur.same_content(&update.svids, &update.bundles) {
            return None;
        }
        let version = cur.version + 1;
        let next = Arc::new(Snapshot {
            version,
            svids: update.svids,
            bundles: update
                .bundles
                .into_iter()
                .map(|b| (b.trust_domain.clone(), b))
                .collect(),
        });
        self.current.store(next.clone());
        crate::metrics::record_snapshot(&next);
        self.changed.send_replace(next);
        Some(version)
    }

    /// Ready means: a default SVID that has not expired, and the bundle of its trust domain.
    pub fn ready(&self) -> Result<(), &'static str> {
        let snap = self.load();
        let svid = snap.default_svid().ok_or("no SVID loaded")?;
        if svid.is_expired(SystemTime::now()) {
            return Err("identity expired");
        }
        if snap.bundle(svid.spiffe_id.trust_domain()).is_none() {
            return Err("no bundle for own trust domain");
        }
        Ok(())
    }
}

impl std::fmt::Debug for IdentityState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityState")
            .field("version", &self.current.load().version)
            .finish()
    }
}

impl Default for IdentityState {
    fn default() -> Self {
        Self::new()
    }
}
