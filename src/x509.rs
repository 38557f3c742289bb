//! What svidcar reads out of an X.509 certificate: the SPIFFE ID and the
//! X509-SVID rules (one `spiffe://` URI SAN with a path, not a CA, may sign), validity
//! and serial; and the one chain verification ([`verify_chain`]) every caller uses.
//!
//! Used both for our own SVIDs (refused at load time) and for peers (refused per handshake),
//! so the two can never disagree on what an SVID is or which chains lead to a bundle.
//!
//! webpki builds the path and checks signatures, validity of the leaf and intermediates,
//! and intermediates' path lengths. It does not look at a trust anchor's validity or
//! path length, nor at an intermediate's key usage; go-spiffe and OpenSSL refuse those,
//! so [`verify_chain`] adds them, on every path webpki proposes.

use std::cell::RefCell;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::{CertificateDer, SignatureVerificationAlgorithm, TrustAnchor, UnixTime};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::spiffe::{parse_workload_id, SpiffeId};

/// The most certificates (leaf included) a chain may have. Checked before any path
/// building: each extra certificate a peer sends multiplies the signature checks an
/// unauthenticated peer can make us do. SPIFFE deployments use one or two intermediates.
pub const MAX_CHAIN_LEN: usize = 8;

/// Why a certificate is not a valid X509-SVID leaf.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvidError {
    #[error("certificate is not valid DER X.509: {0}")]
    Malformed(String),
    #[error("certificate has no spiffe:// URI SAN")]
    NoSpiffeId,
    #[error("certificate has {0} URI SANs; an X509-SVID has exactly one")]
    SeveralUris(usize),
    #[error("certificate URI SAN is not a valid SPIFFE ID: {0}")]
    BadSpiffeId(String),
    #[error("leaf certificate is a CA (basicConstraints cA=true)")]
    LeafIsCa,
    #[error("leaf certificate key usage lacks digitalSignature or allows certificate/CRL signing")]
    BadKeyUsage,
}

/// The facts svidcar needs about a leaf certificate.
#[derive(Debug, Clone)]
pub struct LeafInfo {
    pub spiffe_id: SpiffeId,
    pub not_after: SystemTime,
    /// Serial number, lower-case hex without separators (as `openssl x509 -serial` prints, less case).
    pub serial: String,
}

impl LeafInfo {
    /// Parses `der` and applies the X509-SVID leaf rules.
    pub fn parse(der: &[u8]) -> Result<Self, SvidError> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| SvidError::Malformed(e.to_string()))?;
        let spiffe_id = single_spiffe_id(&cert)?;
        if let Ok(Some(bc)) = cert.basic_constraints() {
            if bc.value.ca {
                return Err(SvidError::LeafIsCa);
            }
        }
        match cert.key_usage() {
            Ok(Some(ku)) => {
                let ku = ku.value;
                if !ku.digital_signature() || ku.key_cert_sign() || ku.crl_sign() {
                    return Err(SvidError::BadKeyUsage);
                }
            }
            Ok(None) => return Err(SvidError::BadKeyUsage),
            Err(e) => return Err(SvidError::Malformed(e.to_string())),
        }
        let validity = cert.validity();
        Ok(Self {
            spiffe_id,
            not_after: asn1_to_system(validity.not_after.timestamp()),
            serial: hex_serial(cert.raw_serial()),
        })
    }
}

/// Reads the single `spiffe://` URI SAN. Other SAN kinds (DNS, email) are ignored:
/// they never count as a SPIFFE ID, even when their text looks like one.
fn single_spiffe_id(cert: &X509Certificate<'_>) -> Result<SpiffeId, SvidError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| SvidError::Malformed(e.to_string()))?;
    let uris: Vec<&str> = san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    match uris.as_slice() {
        [] => Err(SvidError::NoSpiffeId),
        [one] => {
            if !one.to_ascii_lowercase().starts_with("spiffe://") {
                return Err(SvidError::NoSpiffeId);
            }
            parse_workload_id(one).map_err(|e| SvidError::BadSpiffeId(e.to_string()))
        }
        many => Err(SvidError::SeveralUris(many.len())),
    }
}

/// Reads the serial of any certificate (CA or leaf) as lower-case hex.
pub fn serial_of(der: &[u8]) -> Option<String> {
    X509Certificate::from_der(der)
        .ok()
        .map(|(_, c)| hex_serial(c.raw_serial()))
}

/// Reads `notAfter` of any certificate.
pub fn not_after_of(der: &[u8]) -> Option<SystemTime> {
    X509Certificate::from_der(der)
        .ok()
        .map(|(_, c)| asn1_to_system(c.validity().not_after.timestamp()))
}

/// True when the certificate is a CA (basicConstraints cA=true).
pub fn is_ca(der: &[u8]) -> bool {
    X509Certificate::from_der(der)
        .ok()
        .and_then(|(_, c)| c.basic_constraints().ok().flatten().map(|bc| bc.value.ca))
        .unwrap_or(false)
}

/// What svidcar keeps of a root CA besides webpki's trust anchor, which drops the
/// root's validity and path length.
#[derive(Debug, Clone)]
pub struct RootFacts {
    /// The subject as text, for log lines.
    pub subject: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// basicConstraints pathLenConstraint: how many intermediate CAs may follow.
    pub path_len: Option<u32>,
}

impl RootFacts {
    /// Reads a root CA certificate.
    pub fn parse(der: &[u8]) -> Result<Self, SvidError> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| SvidError::Malformed(e.to_string()))?;
        let path_len = cert
            .basic_constraints()
            .map_err(|e| SvidError::Malformed(e.to_string()))?
            .and_then(|bc| bc.value.path_len_constraint);
        let validity = cert.validity();
        Ok(Self {
            subject: cert.subject().to_string(),
            not_before: asn1_to_system(validity.not_before.timestamp()),
            not_after: asn1_to_system(validity.not_after.timestamp()),
            path_len,
        })
    }
}

/// A trust domain's roots as [`verify_chain`] needs them: webpki anchors and, at the
/// same index, the facts webpki does not keep.
#[derive(Debug, Clone, Copy)]
pub struct Roots<'a> {
    pub anchors: &'a [TrustAnchor<'static>],
    pub facts: &'a [RootFacts],
}

/// Why a chain does not lead to the bundle. Each says which certificate and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("chain too long ({0} certificates, at most {MAX_CHAIN_LEN})")]
    TooLong(usize),
    #[error("{0} has expired")]
    LeafExpired(String),
    #[error("{0} is not valid yet")]
    LeafNotYetValid(String),
    #[error("{id} is not signed by a CA of trust domain {td}")]
    UnknownIssuer { id: String, td: String },
    #[error("root CA {root:?} of trust domain {td} expired at {at}")]
    RootExpired {
        root: String,
        td: String,
        at: String,
    },
    #[error("root CA {root:?} of trust domain {td} is not valid until {at}")]
    RootNotYetValid {
        root: String,
        td: String,
        at: String,
    },
    #[error("path length exceeded: CA {ca:?} allows {allowed} intermediate CA(s) below it, the chain has {found}")]
    PathLenExceeded {
        ca: String,
        allowed: u32,
        found: usize,
    },
    #[error("path length exceeded: an intermediate CA's pathLenConstraint is smaller than the number of CAs below it")]
    IntermediatePathLen,
    #[error("intermediate CA {0:?} lacks keyCertSign in its key usage")]
    NoKeyCertSign(String),
    #[error("intermediate certificate {0:?} is not a CA (basicConstraints cA is not true)")]
    IntermediateNotCa(String),
    #[error("{id}: {problem}")]
    Other { id: String, problem: String },
}

/// The one chain verification: `end_entity` (already accepted by [`LeafInfo::parse`] as
/// `leaf`) must chain through `intermediates` to one of `roots`, at `now`, for `usage`;
/// every root and CA on the path must be within its validity, within its path length,
/// and (intermediates) allowed to sign certificates. Refuses over-long chains before
/// any path building.
pub fn verify_chain(
    algs: &[&dyn SignatureVerificationAlgorithm],
    leaf: &LeafInfo,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    roots: Roots<'_>,
    now: UnixTime,
    usage: webpki::KeyUsage,
) -> Result<(), ChainError> {
    check_chain_len(intermediates.len() + 1)?;
    let id = leaf.spiffe_id.to_string();
    let td = leaf.spiffe_id.trust_domain().to_string();
    let cert = webpki::EndEntityCert::try_from(end_entity).map_err(|e| ChainError::Other {
        id: id.clone(),
        problem: e.to_string(),
    })?;
    let now_sys = UNIX_EPOCH + Duration::from_secs(now.as_secs());
    // The first reason a candidate path was refused by our own rules; webpki then keeps
    // looking for another path and, if none is found, returns a less telling error.
    let refused: RefCell<Option<ChainError>> = RefCell::new(None);
    let check_path = |path: &webpki::VerifiedPath<'_>| -> Result<(), webpki::Error> {
        let found = roots
            .anchors
            .iter()
            .position(|a| std::ptr::eq(a, path.anchor()))
            .and_then(|i| roots.facts.get(i));
        let verdict = path_rules(path, found, &td, now_sys);
        match verdict {
            Ok(()) => Ok(()),
            Err(e) => {
                refused.borrow_mut().get_or_insert(e);
                Err(webpki::Error::UnknownIssuer)
            }
        }
    };
    let result = cert.verify_for_usage(
        algs,
        roots.anchors,
        intermediates,
        now,
        usage,
        None,
        Some(&check_path),
    );
    match result {
        Ok(_) => Ok(()),
        Err(e) => Err(refused.into_inner().unwrap_or(match e {
            webpki::Error::CertExpired { .. } => ChainError::LeafExpired(id),
            webpki::Error::CertNotValidYet { .. } => ChainError::LeafNotYetValid(id),
            webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey => {
                ChainError::UnknownIssuer { id, td }
            }
            webpki::Error::PathLenConstraintViolated => ChainError::IntermediatePathLen,
            other => ChainError::Other {
                id,
                problem: format!("{other:?}"),
            },
        })),
    }
}

/// Refuses a chain of `len` certificates when it is longer than [`MAX_CHAIN_LEN`].
pub fn check_chain_len(len: usize) -> Result<(), ChainError> {
    if len > MAX_CHAIN_LEN {
        return Err(ChainError::TooLong(len));
    }
    Ok(())
}

/// Our rules on one path webpki has verified: the root's validity and path length,
/// and each intermediate's path length and keyCertSign.
fn path_rules(
    path: &webpki::VerifiedPath<'_>,
    root: Option<&RootFacts>,
    td: &str,
    now: SystemTime,
) -> Result<(), ChainError> {
    let mut below = 0usize;
    for ca in path.intermediate_certificates() {
        let der = ca.der();
        let (_, cert) = X509Certificate::from_der(der.as_ref()).map_err(|e| ChainError::Other {
            id: "intermediate".into(),
            problem: e.to_string(),
        })?;
        let subject = cert.subject().to_string();
        let bc = cert.basic_constraints().ok().flatten().map(|b| b.value);
        match bc {
            Some(bc) if bc.ca => {
                if let Some(allowed) = bc.path_len_constraint {
                    if (allowed as usize) < below {
                        return Err(ChainError::PathLenExceeded {
                            ca: subject,
                            allowed,
                            found: below,
                        });
                    }
                }
            }
            _ => return Err(ChainError::IntermediateNotCa(subject)),
        }
        match cert.key_usage() {
            Ok(Some(ku)) if !ku.value.key_cert_sign() => {
                return Err(ChainError::NoKeyCertSign(subject))
            }
            Ok(_) => {}
            Err(e) => {
                return Err(ChainError::Other {
                    id: subject,
                    problem: e.to_string(),
                })
            }
        }
        below += 1;
    }
    let Some(root) = root else {
        return Ok(());
    };
    if now > root.not_after {
        return Err(ChainError::RootExpired {
            root: root.subject.clone(),
            td: td.to_string(),
            at: humantime::format_rfc3339_seconds(root.not_after).to_string(),
        });
    }
    if now < root.not_before {
        return Err(ChainError::RootNotYetValid {
            root: root.subject.clone(),
            td: td.to_string(),
            at: humantime::format_rfc3339_seconds(root.not_before).to_string(),
        });
    }
    if let Some(allowed) = root.path_len {
        if (allowed as usize) < below {
            return Err(ChainError::PathLenExceeded {
                ca: root.subject.clone(),
                allowed,
                found: below,
            });
        }
    }
    Ok(())
}

fn hex_serial(raw: &[u8]) -> String {
    let trimmed = match raw.iter().position(|b| *b != 0) {
        Some(i) => &raw[i..],
        None => &raw[raw.len().saturating_sub(1)..],
    };
    trimmed.iter().map(|b| format!("{b:02x}")).collect()
}

fn asn1_to_system(ts: i64) -> SystemTime {
    if ts >= 0 {
        UNIX_EPOCH + Duration::from_secs(ts as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(ts.unsigned_abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose, SanType};

    fn cert(sans: Vec<SanType>, ca: bool, ku: Vec<KeyUsagePurpose>) -> Vec<u8> {
        let mut p = CertificateParams::default();
        p.subject_alt_names = sans;
        p.key_usages = ku;
        if ca {
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        }
        let key = KeyPair::generate().unwrap();
        p.self_signed(&key).unwrap().der().to_vec()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    #[test]
    fn reads_a_valid_svid() {
        let der = cert(
            vec![uri("spiffe://example.org/web")],
            false,
            vec![KeyUsagePurpose::DigitalSignature],
        );
        let info = LeafInfo::parse(&der).unwrap();
        assert_eq!(info.spiffe_id.to_string(), "spiffe://example.org/web");
        assert!(!info.serial.is_empty());
    }

    #[test]
    fn refuses_non_svids() {
        let ds = || vec![KeyUsagePurpose::DigitalSignature];
        let dns_lookalike = cert(
            vec![SanType::DnsName(
                "spiffe://example.org/web".try_into().unwrap(),
            )],
            false,
            ds(),
        );
        assert_eq!(
            LeafInfo::parse(&dns_lookalike).unwrap_err(),
            SvidError::NoSpiffeId
        );
        let two = cert(
            vec![uri("spiffe://example.org/a"), uri("spiffe://example.org/b")],
            false,
            ds(),
        );
        assert_eq!(
            LeafInfo::parse(&two).unwrap_err(),
            SvidError::SeveralUris(2)
        );
        let https = cert(vec![uri("https://example.org/a")], false, ds());
        assert_eq!(LeafInfo::parse(&https).unwrap_err(), SvidError::NoSpiffeId);
        let upper = cert(vec![uri("spiffe://EXAMPLE.org/a")], false, ds());
        assert!(matches!(
            LeafInfo::parse(&upper),
            Err(SvidError::BadSpiffeId(_))
        ));
        let ca = cert(vec![uri("spiffe://example.org/a")], true, ds());
        assert_eq!(LeafInfo::parse(&ca).unwrap_err(), SvidError::LeafIsCa);
        let signer = cert(
            vec![uri("spiffe://example.org/a")],
            false,
            vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyCertSign,
            ],
        );
        assert_eq!(
            LeafInfo::parse(&signer).unwrap_err(),
            SvidError::BadKeyUsage
        );
        assert!(matches!(
            LeafInfo::parse(b"junk"),
            Err(SvidError::Malformed(_))
        ));
    }

    #[test]
    fn refuses_an_id_without_a_path_and_long_chains() {
        let root = cert(
            vec![uri("spiffe://example.org")],
            false,
            vec![KeyUsagePurpose::DigitalSignature],
        );
        let e = LeafInfo::parse(&root).unwrap_err();
        assert!(e.to_string().contains("has no path"), "{e}");
        assert!(check_chain_len(MAX_CHAIN_LEN).is_ok());
        assert_eq!(
            check_chain_len(121).unwrap_err().to_string(),
            "chain too long (121 certificates, at most 8)"
        );
    }

    #[test]
    fn serial_is_trimmed_hex() {
        assert_eq!(hex_serial(&[0, 0x0a, 0xff]), "0aff");
        assert_eq!(hex_serial(&[0]), "00");
    }
}
