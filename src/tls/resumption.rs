//! TLS session resumption that never weakens a check.
//!
//! rustls does not run the certificate verifier on a resumed session: the peer chain of
//! the first handshake is carried over. svidcar therefore (1) throws away every ticket
//! key and every stored client session whenever something a check depends on changes
//! (our SVID, the bundles, a reload's rules: [`invalidate`]), so such a change always
//! costs a full handshake; (2) caps a ticket's lifetime at our SVID's remaining validity;
//! and (3) checks every resumed connection's peer chain again against the current
//! bundle and rules at the current time ([`check_resumed`]), which catches what time
//! alone changes (the peer's SVID, or a CA in its chain, expiring). (3) is the full
//! handshake's own check: the verifier's chain cache (keyed by the whole chain and the
//! bundle's version, good until the first certificate of the chain or the bundle
//! expires) makes it a hash and a lookup, and the rules are asked as for a handshake.
//! It reads the current snapshot and rules itself, so it does not wait for
//! [`invalidate`], which runs just after a change.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustls::client::ClientSessionMemoryCache;
use rustls::server::ProducesTickets;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::{Rejection, SpiffeVerifier};
use crate::identity::IdentityState;

/// The longest a ticket is valid: an hour (rustls' own default is 12 hours).
const MAX_TICKET_LIFETIME: u32 = 3600;

/// Sessions a client config remembers (across servers).
const CLIENT_SESSIONS: usize = 256;

/// Bumped by everything that could make a resumed session wrong.
static EPOCH: AtomicU64 = AtomicU64::new(0);

/// From now on no session issued or stored before is resumed.
pub fn invalidate() {
    EPOCH.fetch_add(1, Ordering::Relaxed);
}

fn epoch() -> u64 {
    EPOCH.load(Ordering::Relaxed)
}

/// Issues tickets with keys that are replaced at every [`invalidate`], valid at most
/// until our SVID expires.
pub struct EpochTicketer {
    state: Arc<IdentityState>,
    current: Mutex<(u64, Arc<dyn ProducesTickets>)>,
}

impl std::fmt::Debug for EpochTicketer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EpochTicketer").finish_non_exhaustive()
    }
}

impl EpochTicketer {
    pub fn new(state: Arc<IdentityState>) -> Result<Self, rustls::Error> {
        Ok(Self {
            state,
            current: Mutex::new((epoch(), rustls::crypto::aws_lc_rs::Ticketer::new()?)),
        })
    }

    /// The ticketer of the current epoch (a fresh one, with fresh keys, after a change).
    fn keys(&self) -> Option<Arc<dyn ProducesTickets>> {
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let now = epoch();
        if cur.0 != now {
            *cur = (now, rustls::crypto::aws_lc_rs::Ticketer::new().ok()?);
        }
        Some(cur.1.clone())
    }
}

impl ProducesTickets for EpochTicketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        let left = self
            .state
            .load()
            .default_svid()
            .and_then(|s| s.not_after.duration_since(SystemTime::now()).ok())
            .map(|d| d.as_secs().min(u32::MAX as u64) as u32)
            .unwrap_or(0);
        left.min(MAX_TICKET_LIFETIME)
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.keys()?.encrypt(plain)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.keys()?.decrypt(cipher)
    }
}

/// A client's stored sessions, forgotten at every [`invalidate`].
#[derive(Debug)]
pub struct EpochSessionStore {
    current: Mutex<(u64, Arc<ClientSessionMemoryCache>)>,
}

impl Default for EpochSessionStore {
    fn default() -> Self {
        Self {
            current: Mutex::new((
                epoch(),
                Arc::new(ClientSessionMemoryCache::new(CLIENT_SESSIONS)),
            )),
        }
    }
}

impl EpochSessionStore {
    fn sessions(&self) -> Arc<ClientSessionMemoryCache> {
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let now = epoch();
        if cur.0 != now {
            *cur = (
                now,
                Arc::new(ClientSessionMemoryCache::new(CLIENT_SESSIONS)),
            );
        }
        cur.1.clone()
    }
}

impl rustls::client::ClientSessionStore for EpochSessionStore {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: rustls::NamedGroup) {
        self.sessions().set_kx_hint(server_name, group)
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<rustls::NamedGroup> {
        self.sessions().kx_hint(server_name)
    }

    fn set_tls12_session(
        &self,
        server_name: ServerName<'static>,
        value: rustls::client::Tls12ClientSessionValue,
    ) {
        self.sessions().set_tls12_session(server_name, value)
    }

    fn tls12_session(
        &self,
        server_name: &ServerName<'_>,
    ) -> Option<rustls::client::Tls12ClientSessionValue> {
        self.sessions().tls12_session(server_name)
    }

    fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
        self.sessions().remove_tls12_session(server_name)
    }

    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: rustls::client::Tls13ClientSessionValue,
    ) {
        self.sessions().insert_tls13_ticket(server_name, value)
    }

    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        self.sessions().take_tls13_ticket(server_name)
    }
}

/// Whether the peer of a resumed session would pass a full handshake's check now: its
/// chain against the current bundle, its ID against `verifier`'s current rules, its
/// SVID not expired. `client`: the peer is a client (we accepted).
pub fn check_resumed(
    verifier: &Arc<SpiffeVerifier>,
    certs: Option<&[CertificateDer<'static>]>,
    client: bool,
) -> Result<(), Rejection> {
    let Some((leaf, intermediates)) = certs.and_then(|c| c.split_first()) else {
        return Err(Rejection::Protocol(
            "resumed session without a peer certificate".into(),
        ));
    };
    let usage = if client {
        webpki::KeyUsage::client_auth()
    } else {
        webpki::KeyUsage::server_auth()
    };
    verifier.verify(leaf, intermediates, UnixTime::now(), usage)?;
    Ok(())
}

/// Whether a session was resumed (no certificate was verified in its handshake).
pub fn was_resumed(session: &rustls::CommonState) -> bool {
    session.handshake_kind() == Some(rustls::HandshakeKind::Resumed)
}
