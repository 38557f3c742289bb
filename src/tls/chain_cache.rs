//! Chains that verified, remembered per verifier: a peer that connects again with the
//! same chain, while the bundles are the same, costs a hash and a lookup instead of
//! parsing and path building with a signature check. The handshake's own signature
//! (CertificateVerify) is still checked every time: that proves the peer holds the key.
//!
//! An entry is the whole chain's SHA-256, the identity snapshot version (any bundle
//! change makes a new version), and the key usage checked; it stays good until the
//! earliest `not_after` of the leaf, the intermediates and the bundle's roots, so a
//! certificate that expires is never accepted from the cache. Only successes are kept.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::SystemTime;

use rustls_pki_types::CertificateDer;

use crate::authz::PeerIdentity;

/// Chains remembered per verifier; the cache starts over when full.
const ENTRIES: usize = 4096;

/// (chain SHA-256, snapshot version, client usage).
pub type ChainKey = ([u8; 32], u64, bool);

#[derive(Debug, Default)]
pub struct ChainCache {
    verified: Mutex<HashMap<ChainKey, (PeerIdentity, SystemTime)>>,
}

impl ChainCache {
    /// The key of a chain (leaf first) under snapshot `version`.
    pub fn key(
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        version: u64,
        client: bool,
    ) -> ChainKey {
        let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        for c in std::iter::once(end_entity).chain(intermediates) {
            ctx.update(&(c.len() as u32).to_be_bytes());
            ctx.update(c.as_ref());
        }
        let mut sha = [0u8; 32];
        sha.copy_from_slice(ctx.finish().as_ref());
        (sha, version, client)
    }

    /// The identity a chain proved, if it verified before and nothing in it has expired.
    pub fn get(&self, key: &ChainKey, now: SystemTime) -> Option<PeerIdentity> {
        let map = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        let (peer, until) = map.get(key)?;
        (now < *until).then(|| peer.clone())
    }

    pub fn insert(&self, key: ChainKey, peer: PeerIdentity, until: SystemTime) {
        let mut map = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= ENTRIES {
            map.clear();
        }
        map.insert(key, (peer, until));
    }
}

/// The earliest `not_after` among `certs` (DER); `None` when one does not parse.
pub fn earliest_expiry<'a>(certs: impl IntoIterator<Item = &'a [u8]>) -> Option<SystemTime> {
    use x509_parser::prelude::FromDer;
    let mut earliest: Option<SystemTime> = None;
    for der in certs {
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
        let secs = cert.validity().not_after.timestamp();
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(u64::try_from(secs).ok()?);
        earliest = Some(earliest.map_or(t, |e| e.min(t)));
    }
    earliest
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spiffe::parse_workload_id;
    use std::time::Duration;

    #[test]
    fn an_entry_is_good_until_its_first_expiry_and_for_its_version_and_usage_only() {
        let cache = ChainCache::default();
        let leaf = CertificateDer::from(vec![1u8, 2, 3]);
        let key = ChainCache::key(&leaf, &[], 7, true);
        let peer = PeerIdentity::new(
            parse_workload_id("spiffe://example.org/a").unwrap(),
            [0; 32],
            SystemTime::now(),
        );
        let now = SystemTime::now();
        cache.insert(key, peer.clone(), now + Duration::from_secs(10));
        assert_eq!(cache.get(&key, now), Some(peer));
        assert_eq!(cache.get(&key, now + Duration::from_secs(10)), None);
        assert_eq!(cache.get(&ChainCache::key(&leaf, &[], 8, true), now), None);
        assert_eq!(cache.get(&ChainCache::key(&leaf, &[], 7, false), now), None);
        let other = CertificateDer::from(vec![9u8]);
        assert_ne!(ChainCache::key(&leaf, &[other], 7, true), key);
    }
}
