//! Certificate resolvers that read the current snapshot at every handshake, so a
//! rotated SVID is presented from the next handshake on, with no config rebuild.

use std::sync::Arc;
use std::time::SystemTime;

use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::SignatureScheme;

use crate::identity::IdentityState;

/// Presents our default SVID, both as server (inbound) and as client (outbound).
#[derive(Debug)]
pub struct SvidResolver {
    state: Arc<IdentityState>,
}

impl SvidResolver {
    pub fn new(state: Arc<IdentityState>) -> Self {
        Self { state }
    }

    /// The current SVID, unless it has expired: an expired certificate is never presented.
    fn current(&self) -> Option<Arc<CertifiedKey>> {
        let snapshot = self.state.load();
        let svid = snapshot.default_svid()?;
        if svid.is_expired(SystemTime::now()) {
            return None;
        }
        Some(svid.certified.clone())
    }
}

impl ResolvesServerCert for SvidResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl ResolvesClientCert for SvidResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        true
    }
}
