//! The one shared identity state: a lock-free current snapshot plus a change signal.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use super::{IdentityUpdate, Snapshot};

/// Why the state is not ready to serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotReady {
    #[error("no SVID loaded")]
    NoSvid,
    #[error("identity expired")]
    IdentityExpired,
    #[error("no bundle for own trust domain")]
    NoBundle,
}

/// Holds the current [`Snapshot`]. Readers call [`IdentityState::load`] (one atomic load,
/// no lock) at every handshake; watchers (SDS, admin, metrics) subscribe to changes.
pub struct IdentityState {
    current: ArcSwap<Snapshot>,
    changed: watch::Sender<Arc<Snapshot>>,
    /// The source cannot reach its origin: we serve the last good snapshot.
    cached: AtomicBool,
    /// JWT bundles and the JWT-SVID minter, kept apart from the X.509 snapshot: they
    /// come from other streams and files, and no handshake reads them.
    jwt: Arc<crate::jwt::JwtState>,
}

impl IdentityState {
    pub fn new() -> Self {
        let empty = Arc::new(Snapshot::default());
        let (changed, _) = watch::channel(empty.clone());
        Self {
            current: ArcSwap::new(empty),
            changed,
            cached: AtomicBool::new(false),
            jwt: Arc::default(),
        }
    }

    /// The JWT side of the identity: bundles for validation, the minter for outbound.
    pub fn jwt(&self) -> &Arc<crate::jwt::JwtState> {
        &self.jwt
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
        record_snapshot(&next);
        self.changed.send_replace(next);
        Some(version)
    }

    /// Ready means: a default SVID that has not expired, and the bundle of its trust domain.
    pub fn ready(&self) -> Result<(), NotReady> {
        let snap = self.load();
        let svid = snap.default_svid().ok_or(NotReady::NoSvid)?;
        if svid.is_expired(SystemTime::now()) {
            return Err(NotReady::IdentityExpired);
        }
        if snap.bundle(svid.spiffe_id.trust_domain()).is_none() {
            return Err(NotReady::NoBundle);
        }
        Ok(())
    }

    /// Marks whether we run on a cached identity (source disconnected).
    pub fn set_cached(&self, cached: bool) {
        self.cached.store(cached, Ordering::Relaxed);
        crate::metrics::get().identity_cached.set(i64::from(cached));
    }

    pub fn is_cached(&self) -> bool {
        self.cached.load(Ordering::Relaxed)
    }

    /// True once the SVID we hold has expired with no successor: handshakes must stop.
    pub fn identity_expired(&self) -> bool {
        self.ready() == Err(NotReady::IdentityExpired)
    }
}

/// The identity gauges follow each published snapshot.
fn record_snapshot(s: &Snapshot) {
    use std::time::UNIX_EPOCH;
    let m = crate::metrics::get();
    m.identity_version.set(s.version as i64);
    m.identity_updates.inc();
    // Taken before the change signal goes out: the reference time for SDS push latency.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    m.identity_updated_at.set(now);
    if let Some(svid) = s.default_svid() {
        let t = svid
            .not_after
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        m.svid_expiry.set(t);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::dev_ca::DevCa;
    use crate::spiffe::parse_spiffe_id;
    use std::time::{Duration, UNIX_EPOCH};

    fn update(ca: &DevCa, svid: &Arc<crate::identity::Svid>) -> IdentityUpdate {
        IdentityUpdate {
            svids: vec![svid.clone()],
            bundles: vec![Arc::new(ca.bundle().unwrap())],
        }
    }

    #[test]
    fn identical_updates_are_not_updates() {
        let td = crate::spiffe::parse_trust_domain("example.org").unwrap();
        let ca = DevCa::generate(&td, Duration::from_secs(3600)).unwrap();
        let id = parse_spiffe_id("spiffe://example.org/web").unwrap();
        let first = Arc::new(ca.mint(&id, Duration::from_secs(60)).unwrap());
        let state = IdentityState::new();
        let mut rx = state.subscribe();
        assert_eq!(state.ready(), Err(NotReady::NoSvid));
        assert_eq!(state.publish(update(&ca, &first)), Some(1));
        assert!(rx.has_changed().unwrap());
        rx.mark_unchanged();
        // The same bytes again: no new version, no notification.
        assert_eq!(state.publish(update(&ca, &first)), None);
        assert!(!rx.has_changed().unwrap());
        // A new SVID is a new version, seen by subscribers.
        let second = Arc::new(ca.mint(&id, Duration::from_secs(60)).unwrap());
        let now = || SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        let before = now().as_secs_f64();
        assert_eq!(state.publish(update(&ca, &second)), Some(2));
        // When it was published (give or take a second: other tests publish too).
        let at = crate::metrics::get().identity_updated_at.get();
        assert!(
            before - 1.0 <= at && at <= now().as_secs_f64(),
            "{before} {at}"
        );
        assert!(rx.has_changed().unwrap());
        assert_eq!(state.load().default_svid().unwrap().serial, second.serial);
        assert_eq!(state.ready(), Ok(()));
    }

    #[test]
    fn not_ready_without_own_bundle() {
        let td = crate::spiffe::parse_trust_domain("example.org").unwrap();
        let other = crate::spiffe::parse_trust_domain("other.org").unwrap();
        let ca = DevCa::generate(&td, Duration::from_secs(3600)).unwrap();
        let foreign = DevCa::generate(&other, Duration::from_secs(3600)).unwrap();
        let id = parse_spiffe_id("spiffe://example.org/web").unwrap();
        let state = IdentityState::new();
        state.publish(IdentityUpdate {
            svids: vec![Arc::new(ca.mint(&id, Duration::from_secs(60)).unwrap())],
            bundles: vec![Arc::new(foreign.bundle().unwrap())],
        });
        assert_eq!(state.ready(), Err(NotReady::NoBundle));
    }
}
