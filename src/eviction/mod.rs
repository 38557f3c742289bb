//! Eviction: every live mTLS connection is registered with the peer chain its handshake
//! authenticated and the verifier that accepted it. After a config reload and after
//! every identity update, each one is checked again, as a new handshake would be, at the
//! time its handshake happened (so an expired leaf is not a reason unless
//! `close_expired_peers` says so): those whose peer is no longer allowed, or whose chain
//! no longer leads to a root of the current bundles, are closed, logged and counted.
//! Allowed connections are not touched.
//!
//! A connection is closed through its own drain: registering gives it a `closing`
//! token of its own (a child of the listener's), which every copy loop and HTTP server
//! already ends on.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use rustls_pki_types::{CertificateDer, UnixTime};
use tokio_util::sync::CancellationToken;

use crate::log_limit::LogLimiter;
use crate::tls::{Rejection, SpiffeVerifier};

/// Which side of the handshake the peer was: whose certificate usage is checked again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerRole {
    /// We accepted; the peer presented a client certificate.
    Client,
    /// We connected; the peer presented a server certificate.
    Server,
}

impl PeerRole {
    fn usage(self) -> webpki::KeyUsage {
        match self {
            Self::Client => webpki::KeyUsage::client_auth(),
            Self::Server => webpki::KeyUsage::server_auth(),
        }
    }
}

/// Why a live connection was closed: the label of `svidcar_connections_revoked_total`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revoked {
    /// A full check refused the peer now (not allowed, chain no longer valid, trust
    /// domain gone): the same reason a new handshake would be refused for.
    Refused(Rejection),
    /// `close_expired_peers`: the peer's SVID is past its `not_after`.
    Expired,
}

impl Revoked {
    pub fn label(&self) -> &'static str {
        match self {
            Self::Refused(r) => r.label(),
            Self::Expired => "expired",
        }
    }
}

impl std::fmt::Display for Revoked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Refused(r) => write!(f, "{r}"),
            Self::Expired => f.write_str("the peer's SVID expired"),
        }
    }
}

/// One live connection as the registry knows it.
struct Entry {
    listener: Arc<str>,
    peer_id: String,
    /// Leaf first, then the intermediates the peer sent.
    chain: Vec<CertificateDer<'static>>,
    leaf_sha256: [u8; 32],
    not_after: SystemTime,
    verifier: Arc<SpiffeVerifier>,
    role: PeerRole,
    verified_at: UnixTime,
    close: CancellationToken,
}

/// The live connections of the process.
#[derive(Default)]
pub struct Registry {
    next: AtomicU64,
    entries: Mutex<HashMap<u64, Arc<Entry>>>,
    close_expired_peers: AtomicBool,
}

/// A connection's place in the registry; dropping it (the connection ended) removes it.
pub struct Registration {
    id: u64,
    /// The connection's `closing` token from now on: the listener's, or a child of it
    /// that eviction cancels.
    pub closing: CancellationToken,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if self.id != 0 {
            registry().lock().remove(&self.id);
        }
    }
}

/// Revocations are caused by a reload or a bundle change and can be thousands at once:
/// log lines are limited per reason; the metric counts every one.
static REVOKE_LOG: LogLimiter = LogLimiter::new("connection revoked", 50, Duration::from_secs(10));

/// The process-wide registry: connections register from every listener, and reloads and
/// identity updates check them all.
pub fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Registry::default)
}

/// What a connection's handshake established, to be checked again later.
pub struct Peer<'a> {
    pub listener: &'a Arc<str>,
    pub verifier: &'a Arc<SpiffeVerifier>,
    pub role: PeerRole,
    /// The peer's certificates as the TLS session holds them (leaf first).
    pub certs: Option<&'a [CertificateDer<'static>]>,
}

/// Registers an established connection whose drain closes on `closing`; the returned
/// registration's `closing` is the one the connection must end on from now on. A
/// connection without peer certificates (none was required) is not registered.
pub fn watch(peer: Peer<'_>, closing: &CancellationToken) -> Registration {
    let unregistered = || Registration {
        id: 0,
        closing: closing.clone(),
    };
    let Some(chain) = peer.certs.filter(|c| !c.is_empty()) else {
        return unregistered();
    };
    let Some(identity) = crate::tls::peer_identity_of(Some(chain)) else {
        return unregistered();
    };
    let close = closing.child_token();
    let entry = Entry {
        listener: peer.listener.clone(),
        peer_id: identity.uri,
        chain: chain.to_vec(),
        leaf_sha256: identity.leaf_sha256,
        not_after: identity.not_after,
        verifier: peer.verifier.clone(),
        role: peer.role,
        verified_at: UnixTime::now(),
        close: close.clone(),
    };
    let r = registry();
    let id = r.next.fetch_add(1, Ordering::Relaxed) + 1;
    r.lock().insert(id, Arc::new(entry));
    Registration { id, closing: close }
}

/// What one check of all live connections did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Checked {
    pub live: usize,
    pub revoked: usize,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Entry>>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The number of registered connections.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `close_expired_peers`: also close connections whose peer's SVID has expired.
    pub fn set_close_expired_peers(&self, on: bool) {
        self.close_expired_peers.store(on, Ordering::Relaxed);
    }

    /// Checks every live connection against the rules and bundles in force now and
    /// closes those that fail. CPU work (one chain verification per distinct peer and
    /// verifier): call it from a blocking task.
    pub fn check_all(&self, why: &str) -> Checked {
        let entries: Vec<Arc<Entry>> = self.lock().values().cloned().collect();
        let close_expired = self.close_expired_peers.load(Ordering::Relaxed);
        let now = SystemTime::now();
        // Many connections share a peer and a listener: verify each pair once.
        let mut seen: HashMap<(usize, [u8; 32]), Result<(), Rejection>> = HashMap::new();
        let mut checked = Checked {
            live: entries.len(),
            revoked: 0,
        };
        for e in entries {
            if e.close.is_cancelled() {
                continue;
            }
            let verdict = if close_expired && e.not_after <= now {
                Err(Revoked::Expired)
            } else {
                let key = (Arc::as_ptr(&e.verifier) as usize, e.leaf_sha256);
                seen.entry(key)
                    .or_insert_with(|| e.recheck())
                    .clone()
                    .map_err(Revoked::Refused)
            };
            if let Err(reason) = verdict {
                e.revoke(&reason, why);
                checked.revoked += 1;
            }
        }
        checked
    }

    /// Closes the connections whose peer's SVID has expired, when `close_expired_peers`
    /// is on. Cheap (no verification): run it every second.
    pub fn close_expired(&self) -> usize {
        if !self.close_expired_peers.load(Ordering::Relaxed) {
            return 0;
        }
        let now = SystemTime::now();
        let expired: Vec<Arc<Entry>> = self
            .lock()
            .values()
            .filter(|e| e.not_after <= now && !e.close.is_cancelled())
            .cloned()
            .collect();
        for e in &expired {
            e.revoke(&Revoked::Expired, "SVID expiry");
        }
        expired.len()
    }
}

impl Entry {
    fn recheck(&self) -> Result<(), Rejection> {
        let (leaf, intermediates) = match self.chain.split_first() {
            Some(split) => split,
            None => return Ok(()),
        };
        self.verifier
            .verify(leaf, intermediates, self.verified_at, self.role.usage())
            .map(|_| ())
    }

    fn revoke(&self, reason: &Revoked, why: &str) {
        crate::metrics::get()
            .connections_revoked
            .with_label_values(&[&*self.listener, reason.label()])
            .inc();
        if REVOKE_LOG.allow(reason.label()) {
            tracing::warn!(listener = %self.listener, peer_id = %self.peer_id, reason = reason.label(), after = why, "connection closed: {reason}");
        }
        self.close.cancel();
    }
}

/// Closes expired peers' connections every second while `close_expired_peers` is on,
/// until `shutdown`.
pub async fn expiry_sweeper(shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => { registry().close_expired(); }
        }
    }
}

/// Checks every live connection again in a blocking task (chain verification is CPU
/// work) and logs a summary when something was closed.
pub async fn check_all_now(why: &'static str) -> Checked {
    match tokio::task::spawn_blocking(move || registry().check_all(why)).await {
        Ok(c) => {
            if c.revoked > 0 {
                tracing::info!(
                    live = c.live,
                    revoked = c.revoked,
                    "live connections checked after {why}"
                );
            }
            c
        }
        Err(e) => {
            tracing::error!(error = %e, "checking live connections failed");
            Checked::default()
        }
    }
}

/// Checks every live connection after each identity update that changed the bundles
/// (a trust domain gone, a CA added or removed), until `shutdown`. Our own SVID's
/// rotation changes nothing a peer is checked against, so it costs no check.
pub async fn check_on_identity_updates(
    state: std::sync::Arc<crate::identity::IdentityState>,
    shutdown: CancellationToken,
) {
    let mut rx = state.subscribe();
    let mut checked = bundle_roots(&rx.borrow_and_update());
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = rx.changed() => if changed.is_err() { return },
        }
        let now = bundle_roots(&rx.borrow_and_update());
        if now == checked {
            continue;
        }
        checked = now;
        if !registry().is_empty() {
            check_all_now("a bundle change").await;
        }
    }
}

/// Every trust domain with its roots, as a check compares them.
fn bundle_roots(
    snapshot: &crate::identity::Snapshot,
) -> Vec<(String, Vec<CertificateDer<'static>>)> {
    snapshot
        .bundles
        .iter()
        .map(|(td, b)| (td.to_string(), b.roots.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::{IdRule, PeerPolicy, SpiffeIdMatcher, StrMatch};
    use crate::spiffe::parse_workload_id;
    use crate::testing::TestCa;

    fn only(id: &str) -> SpiffeIdMatcher {
        SpiffeIdMatcher::new(vec![IdRule::Text(StrMatch::Exact {
            value: id.into(),
            ignore_case: false,
        })])
    }

    /// A connection registered as accepted from `peer` by a verifier with `policy`.
    fn accepted(
        ca: &TestCa,
        peer: Option<&str>,
        policy: &PeerPolicy,
    ) -> (Registration, CancellationToken) {
        let state = ca.workload("spiffe://example.org/server");
        let verifier = Arc::new(SpiffeVerifier::new(state, policy.clone()));
        let svid = peer.map(|p| {
            let id = parse_workload_id(p).unwrap();
            ca.ca.mint(&id, Duration::from_secs(600)).unwrap()
        });
        let parent = CancellationToken::new();
        let r = watch(
            Peer {
                listener: &Arc::from("unit"),
                verifier: &verifier,
                role: PeerRole::Client,
                certs: svid.as_ref().map(|s| s.chain.as_slice()),
            },
            &parent,
        );
        (r, parent)
    }

    #[test]
    fn a_connection_is_closed_once_its_peer_is_no_longer_allowed() {
        let ca = TestCa::new("example.org");
        let policy = PeerPolicy::new(only("spiffe://example.org/a"));
        let (a, _) = accepted(&ca, Some("spiffe://example.org/a"), &policy);
        let (b, _) = accepted(&ca, Some("spiffe://example.org/b"), &policy);
        registry().check_all("a test");
        assert!(!a.closing.is_cancelled(), "allowed: untouched");
        // b was never allowed by this policy (as after a reload that dropped it).
        assert!(b.closing.is_cancelled());
        policy.swap(only("spiffe://example.org/b"));
        registry().check_all("a test");
        assert!(a.closing.is_cancelled());
    }

    #[test]
    fn the_process_drain_still_reaches_a_registered_connection() {
        let ca = TestCa::new("example.org");
        let policy = PeerPolicy::new(only("spiffe://example.org/a"));
        let (a, parent) = accepted(&ca, Some("spiffe://example.org/a"), &policy);
        parent.cancel();
        assert!(a.closing.is_cancelled());
    }

    #[test]
    fn a_registration_leaves_the_registry_with_its_connection() {
        let ca = TestCa::new("example.org");
        let policy = PeerPolicy::new(only("spiffe://example.org/a"));
        let (a, _) = accepted(&ca, Some("spiffe://example.org/a"), &policy);
        let id = a.id;
        assert!(registry().lock().contains_key(&id));
        drop(a);
        assert!(!registry().lock().contains_key(&id));
    }

    #[test]
    fn without_peer_certificates_nothing_is_registered() {
        let ca = TestCa::new("example.org");
        let (r, parent) = accepted(&ca, None, &PeerPolicy::new(SpiffeIdMatcher::default()));
        assert_eq!(r.id, 0);
        parent.cancel();
        assert!(r.closing.is_cancelled());
    }
}
