//! The immutable view of identity that one handshake uses from start to end.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, TrustAnchor};

use super::IdentityError;
use crate::spiffe::{SpiffeId, TrustDomain};
use crate::x509::{LeafInfo, RootFacts, Roots};

/// One X.509-SVID: the chain we present and the key that proves it.
pub struct Svid {
    pub spiffe_id: SpiffeId,
    pub chain: Vec<CertificateDer<'static>>,
    key_der: PrivateKeyDer<'static>,
    pub not_after: SystemTime,
    pub serial: String,
    /// Ready for rustls: built once per SVID, never per handshake.
    pub certified: Arc<CertifiedKey>,
}

impl Svid {
    /// Validates and builds an SVID: the leaf must be an X509-SVID and the key must
    /// belong to it.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, IdentityError> {
        let leaf = chain
            .first()
            .ok_or_else(|| IdentityError::Svid("certificate chain is empty".into()))?;
        let info = LeafInfo::parse(leaf).map_err(|e| IdentityError::Svid(e.to_string()))?;
        let provider = crate::crypto::provider();
        let signing = provider
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|e| IdentityError::Svid(format!("private key is not usable: {e}")))?;
        let certified = CertifiedKey::new(chain.clone(), signing);
        certified.keys_match().map_err(|_| {
            IdentityError::Svid(format!(
                "private key does not match the certificate of {}",
                info.spiffe_id
            ))
        })?;
        Ok(Self {
            spiffe_id: info.spiffe_id,
            chain,
            key_der: key,
            not_after: info.not_after,
            serial: info.serial,
            certified: Arc::new(certified),
        })
    }

    /// The private key as PKCS#8/SEC1/PKCS#1 DER, for the one place it must travel
    /// (a Workload API or SDS response to its owner). Never log it.
    pub fn key_der(&self) -> &[u8] {
        self.key_der.secret_der()
    }

    /// The private key as PEM, labelled for its encoding. Never log it.
    pub fn key_pem(&self) -> String {
        let label = match &self.key_der {
            PrivateKeyDer::Pkcs1(_) => "RSA PRIVATE KEY",
            PrivateKeyDer::Sec1(_) => "EC PRIVATE KEY",
            _ => "PRIVATE KEY",
        };
        ::pem::encode(&::pem::Pem::new(label, self.key_der.secret_der().to_vec()))
    }

    pub fn is_expired(&self, now: SystemTime) -> bool {
        now >= self.not_after
    }

    fn same_bytes(&self, other: &Self) -> bool {
        self.chain == other.chain && self.key_der.secret_der() == other.key_der.secret_der()
    }
}

impl fmt::Debug for Svid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Svid")
            .field("spiffe_id", &self.spiffe_id.to_string())
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .field("chain_len", &self.chain.len())
            .field("key", &"<redacted>")
            .finish()
    }
}

/// The X.509 roots of one trust domain, pre-parsed into trust anchors so that a
/// handshake does no parsing of CA certificates. `facts` keeps, per anchor, the
/// validity and path length that webpki's anchors drop, so both are enforced too.
pub struct Bundle {
    pub trust_domain: TrustDomain,
    pub roots: Vec<CertificateDer<'static>>,
    pub anchors: Vec<TrustAnchor<'static>>,
    pub facts: Vec<RootFacts>,
}

impl Bundle {
    pub fn new(
        trust_domain: TrustDomain,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<Self, IdentityError> {
        if let Some(i) = roots.iter().position(|r| !crate::x509::is_ca(r)) {
            return Err(IdentityError::Bundle(format!(
                "bundle for trust domain {trust_domain}: certificate {i} is not a CA (basicConstraints cA is not true)"
            )));
        }
        if roots.is_empty() {
            return Err(IdentityError::Bundle(format!(
                "bundle for trust domain {trust_domain} has no certificates"
            )));
        }
        let anchors = roots
            .iter()
            .map(|r| {
                webpki::anchor_from_trusted_cert(r)
                    .map(|a| a.to_owned())
                    .map_err(|e| {
                        IdentityError::Bundle(format!(
                            "bundle for {trust_domain}: a certificate is not a usable trust anchor: {e}"
                        ))
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let facts = roots
            .iter()
            .map(|r| {
                RootFacts::parse(r)
                    .map_err(|e| IdentityError::Bundle(format!("bundle for {trust_domain}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            trust_domain,
            roots,
            anchors,
            facts,
        })
    }

    /// The roots as the one chain verification takes them.
    pub fn trust(&self) -> Roots<'_> {
        Roots {
            anchors: &self.anchors,
            facts: &self.facts,
        }
    }
}

impl fmt::Debug for Bundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bundle")
            .field("trust_domain", &self.trust_domain.as_str())
            .field("roots", &self.roots.len())
            .finish()
    }
}

/// Everything a handshake needs, immutable; replaced whole on every change.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Increases by one on every change of content.
    pub version: u64,
    /// Our SVIDs; the first is the default.
    pub svids: Vec<Arc<Svid>>,
    pub bundles: BTreeMap<TrustDomain, Arc<Bundle>>,
}

impl Snapshot {
    pub fn default_svid(&self) -> Option<&Arc<Svid>> {
        self.svids.first()
    }

    pub fn bundle(&self, td: &TrustDomain) -> Option<&Arc<Bundle>> {
        self.bundles.get(td)
    }

    /// True when the two hold byte-for-byte the same SVIDs and bundles.
    pub fn same_content(&self, svids: &[Arc<Svid>], bundles: &[Arc<Bundle>]) -> bool {
        self.svids.len() == svids.len()
            && self.svids.iter().zip(svids).all(|(a, b)| a.same_bytes(b))
            && self.bundles.len() == bundles.len()
            && bundles.iter().all(|b| {
                self.bundles
                    .get(&b.trust_domain)
                    .is_some_and(|cur| cur.roots == b.roots)
            })
    }
}
