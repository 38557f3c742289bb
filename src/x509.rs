//! What svidcar reads out of an X.509 certificate: the SPIFFE ID and the
//! X509-SVID rules (one `spiffe://` URI SAN, not a CA, may sign), validity and serial.
//!
//! Used both for our own SVIDs (refused at load time) and for peers (refused per handshake),
//! so the two can never disagree on what an SVID is.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::spiffe::{parse_spiffe_id, SpiffeId};

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
            parse_spiffe_id(one).map_err(|e| SvidError::BadSpiffeId(e.to_string()))
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
    fn serial_is_trimmed_hex() {
        assert_eq!(hex_serial(&[0, 0x0a, 0xff]), "0aff");
        assert_eq!(hex_serial(&[0]), "00");
    }
}
