//! SPIFFE peer verification for rustls, both directions.
//!
//! Authentication: the peer's leaf must be an X509-SVID, and its chain is validated
//! against the bundle of the trust domain named in its own SPIFFE ID (never another
//! domain's roots), with no DNS name check; the result is a [`PeerIdentity`]. The
//! bundle is read from the current snapshot at every handshake, so a rotated CA applies
//! at once. Authorization is not decided here: the listener's [`PeerPolicy`] is asked,
//! inside the handshake, so a refused peer gets a TLS alert and no byte of the app.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::chain_cache::{earliest_expiry, ChainCache};
use super::Rejection;
use crate::authz::{Denied, PeerIdentity, PeerPolicy};
use crate::identity::IdentityState;
use crate::x509::{ChainError, LeafInfo};
use std::time::{Duration, SystemTime};

/// Authenticates a peer's X509-SVID, then asks the listener's policy. One per listener.
#[derive(Debug)]
pub struct SpiffeVerifier {
    state: Arc<IdentityState>,
    policy: PeerPolicy,
    algs: WebPkiSupportedAlgorithms,
    chains: ChainCache,
}

impl SpiffeVerifier {
    /// Whether our own SVID has expired with no successor. A connection we originate
    /// must then not be made at all: a resumed session shows the server no certificate,
    /// so a server that does not check resumed peers again would take it.
    pub fn own_identity_expired(&self) -> bool {
        self.state.identity_expired()
    }

    pub fn new(state: Arc<IdentityState>, policy: PeerPolicy) -> Self {
        Self {
            state,
            policy,
            algs: crate::crypto::provider().signature_verification_algorithms,
            chains: ChainCache::default(),
        }
    }

    /// Authentication, then authorization; everything but the handshake signature.
    pub fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<PeerIdentity, Rejection> {
        let peer = self.authenticate(end_entity, intermediates, now, usage)?;
        self.policy.check(&peer).map_err(Rejection::from)?;
        Ok(peer)
    }

    /// SVID shape and chain: who the peer is.
    pub fn authenticate(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<PeerIdentity, Rejection> {
        // Before anything else: a long chain costs path building, and the peer is not
        // authenticated yet.
        crate::x509::check_chain_len(intermediates.len() + 1).map_err(Rejection::from)?;
        let snapshot = self.state.load();
        let client = usage == webpki::KeyUsage::client_auth();
        let key = ChainCache::key(end_entity, intermediates, snapshot.version, client);
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(now.as_secs());
        if let Some(peer) = self.chains.get(&key, at) {
            return Ok(peer);
        }
        let leaf = LeafInfo::parse(end_entity).map_err(Rejection::NotAnSvid)?;
        let bundle = snapshot
            .bundle(leaf.spiffe_id.trust_domain())
            .ok_or_else(|| {
                Rejection::UnknownTrustDomain(leaf.spiffe_id.trust_domain().to_string())
            })?;
        crate::x509::verify_chain(
            self.algs.all,
            &leaf,
            end_entity,
            intermediates,
            bundle.trust(),
            now,
            usage,
        )
        .map_err(Rejection::from)?;
        let peer = peer_identity(leaf, end_entity);
        // Good until the first certificate that could take part expires.
        let chain =
            std::iter::once(end_entity.as_ref()).chain(intermediates.iter().map(|c| c.as_ref()));
        let roots = bundle.facts.iter().map(|f| f.not_after).min();
        if let (Some(certs), Some(roots)) = (earliest_expiry(chain), roots) {
            self.chains.insert(key, peer.clone(), certs.min(roots));
        }
        Ok(peer)
    }

    fn verify_rustls(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<(), rustls::Error> {
        self.verify(end_entity, intermediates, now, usage)
            .map(|_| ())
            .map_err(Rejection::into_rustls)
    }

    fn tls12(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.algs)
    }

    fn tls13(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.algs)
    }
}

impl From<ChainError> for Rejection {
    /// Leaf validity keeps its own labels (`expired`, `not_yet_valid`); everything else
    /// about the chain is `chain_invalid`, with the reason in the log text.
    fn from(e: ChainError) -> Self {
        match e {
            ChainError::LeafExpired(id) => Self::Expired(id),
            ChainError::LeafNotYetValid(id) => Self::NotYetValid(id),
            other => Self::ChainInvalid(other.to_string()),
        }
    }
}

impl From<Denied> for Rejection {
    fn from(d: Denied) -> Self {
        match d {
            Denied::NotAllowed(id) => Self::NotAllowed(id),
        }
    }
}

impl Rejection {
    /// Carries the rejection through rustls, whole, so the accept loop can log and
    /// count the precise reason (the peer gets a `bad_certificate` alert).
    fn into_rustls(self) -> rustls::Error {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(self))))
    }
}

/// The inbound side: client certificates are mandatory.
#[derive(Debug)]
pub struct SpiffeClientVerifier(pub Arc<SpiffeVerifier>);

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0
            .verify_rustls(
                end_entity,
                intermediates,
                now,
                webpki::KeyUsage::client_auth(),
            )
            .map(|_| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.tls12(m, c, d)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.tls13(m, c, d)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.algs.supported_schemes()
    }
}

/// The outbound side: the server's SPIFFE ID is checked; its DNS name is not.
#[derive(Debug)]
pub struct SpiffeServerVerifier(pub Arc<SpiffeVerifier>);

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0
            .verify_rustls(
                end_entity,
                intermediates,
                now,
                webpki::KeyUsage::server_auth(),
            )
            .map(|_| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.tls12(m, c, d)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.tls13(m, c, d)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.algs.supported_schemes()
    }
}

fn peer_identity(leaf: LeafInfo, der: &[u8]) -> PeerIdentity {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
    let mut sha = [0u8; 32];
    sha.copy_from_slice(digest.as_ref());
    PeerIdentity::new(leaf.spiffe_id, sha, leaf.not_after)
}

/// The identity of the peer of an established connection, from the leaf its handshake
/// authenticated (rustls cannot hand the verifier's result over, so it is read again;
/// only where something needs it: logs, headers).
pub fn peer_identity_of(certs: Option<&[CertificateDer<'_>]>) -> Option<PeerIdentity> {
    let leaf = certs?.first()?;
    let info = LeafInfo::parse(leaf).ok()?;
    Some(peer_identity(info, leaf))
}
