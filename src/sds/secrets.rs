//! Resource names → Secrets, the way SPIRE Agent names them, so an Envoy config written
//! for SPIRE works against svidcar unchanged.

use prost::Message;

use crate::identity::{Bundle, Snapshot, Svid};
use crate::proto::envoy::config::core::v3::{
    data_source::Specifier, DataSource, TypedExtensionConfig,
};
use crate::proto::envoy::extensions::transport_sockets::tls::v3::{
    secret, spiffe_cert_validator_config::TrustDomain as SpiffeTrustDomain,
    CertificateValidationContext, Secret, SpiffeCertValidatorConfig, TlsCertificate,
};

pub const SECRET_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
const SPIFFE_VALIDATOR: &str = "envoy.tls.cert_validator.spiffe";
const SPIFFE_VALIDATOR_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig";

/// How names are spelled and bundles served (`sds.*` config).
#[derive(Debug, Clone)]
pub struct Naming {
    pub default_svid: String,
    pub default_bundle: String,
    pub all_bundles: String,
    /// Serve trust-domain and default-bundle validation contexts with the SPIFFE
    /// validator; otherwise `trusted_ca`. Set per stream from the Envoy's node
    /// (validation.rs). The all-bundles name always uses the SPIFFE validator: one
    /// `trusted_ca` cannot keep several trust domains apart.
    pub spiffe_validation: bool,
}

impl Default for Naming {
    fn default() -> Self {
        Self {
            default_svid: crate::config::DEFAULT_SVID_NAME.into(),
            default_bundle: crate::config::DEFAULT_BUNDLE_NAME.into(),
            all_bundles: crate::config::DEFAULT_ALL_BUNDLES_NAME.into(),
            spiffe_validation: false,
        }
    }
}

fn inline(bytes: Vec<u8>) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(Specifier::InlineBytes(bytes)),
    })
}

fn pem_roots(b: &Bundle) -> Vec<u8> {
    crate::identity::pem::encode_certs(&b.roots).into_bytes()
}

fn tls_secret(name: &str, svid: &Svid) -> Secret {
    Secret {
        name: name.to_string(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: inline(crate::identity::pem::encode_certs(&svid.chain).into_bytes()),
            private_key: inline(svid.key_pem().into_bytes()),
        })),
    }
}

fn spiffe_context<'a>(bundles: impl Iterator<Item = &'a Bundle>) -> CertificateValidationContext {
    let config = SpiffeCertValidatorConfig {
        trust_domains: bundles
            .map(|b| SpiffeTrustDomain {
                name: b.trust_domain.as_str().to_string(),
                trust_bundle: inline(pem_roots(b)),
            })
            .collect(),
    };
    CertificateValidationContext {
        trusted_ca: None,
        custom_validator_config: Some(TypedExtensionConfig {
            name: SPIFFE_VALIDATOR.into(),
            typed_config: Some(prost_types::Any {
                type_url: SPIFFE_VALIDATOR_TYPE.into(),
                value: config.encode_to_vec(),
            }),
        }),
    }
}

fn bundle_secret(name: &str, b: &Bundle, naming: &Naming) -> Secret {
    let ctx = if naming.spiffe_validation {
        spiffe_context(std::iter::once(b))
    } else {
        CertificateValidationContext {
            trusted_ca: inline(pem_roots(b)),
            custom_validator_config: None,
        }
    };
    Secret {
        name: name.to_string(),
        r#type: Some(secret::Type::ValidationContext(ctx)),
    }
}

/// The secret for one name, if it names something we hold. Unknown names give None:
/// they are simply absent from the response, never an error for the stream.
pub fn resolve(snap: &Snapshot, name: &str, naming: &Naming) -> Option<Secret> {
    if name == naming.default_svid {
        return snap.default_svid().map(|s| tls_secret(name, s));
    }
    if name == naming.all_bundles {
        if snap.bundles.is_empty() {
            return None;
        }
        return Some(Secret {
            name: name.to_string(),
            r#type: Some(secret::Type::ValidationContext(spiffe_context(
                snap.bundles.values().map(|b| b.as_ref()),
            ))),
        });
    }
    if name == naming.default_bundle {
        let td = snap.default_svid()?.spiffe_id.trust_domain();
        return snap.bundle(td).map(|b| bundle_secret(name, b, naming));
    }
    if let Some(svid) = snap.svids.iter().find(|s| s.spiffe_id.to_string() == name) {
        return Some(tls_secret(name, svid));
    }
    snap.bundles
        .values()
        .find(|b| b.trust_domain.id_string() == name)
        .map(|b| bundle_secret(name, b, naming))
}

/// Every name a subscription to "everything" (an empty name list) covers.
pub fn all_names(snap: &Snapshot, naming: &Naming) -> Vec<String> {
    let mut names: Vec<String> = snap.svids.iter().map(|s| s.spiffe_id.to_string()).collect();
    names.extend(snap.bundles.values().map(|b| b.trust_domain.id_string()));
    names.extend([
        naming.default_svid.clone(),
        naming.default_bundle.clone(),
        naming.all_bundles.clone(),
    ]);
    names
}

/// Resolves a subscription: the known names, in order, each once.
pub fn resolve_all(snap: &Snapshot, names: &[String], naming: &Naming) -> Vec<Secret> {
    let wanted: Vec<String> = if names.iter().all(|n| n.is_empty()) {
        all_names(snap, naming)
    } else {
        names.to_vec()
    };
    let mut seen = std::collections::BTreeSet::new();
    wanted
        .iter()
        .filter(|n| seen.insert(n.as_str()))
        .filter_map(|n| resolve(snap, n, naming))
        .collect()
}

/// True when a secret carries a private key.
pub fn has_key(s: &Secret) -> bool {
    matches!(s.r#type, Some(secret::Type::TlsCertificate(_)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::dev_ca::DevCa;
    use crate::spiffe::{parse_spiffe_id, parse_trust_domain};
    use std::sync::Arc;
    use std::time::Duration;

    fn snapshot() -> Snapshot {
        let td = parse_trust_domain("example.org").unwrap();
        let other = parse_trust_domain("partner.example").unwrap();
        let ca = DevCa::generate(&td, Duration::from_secs(3600)).unwrap();
        let pca = DevCa::generate(&other, Duration::from_secs(3600)).unwrap();
        let web = parse_spiffe_id("spiffe://example.org/web").unwrap();
        let api = parse_spiffe_id("spiffe://example.org/api").unwrap();
        let mut s = Snapshot {
            version: 7,
            ..Default::default()
        };
        s.svids = vec![
            Arc::new(ca.mint(&web, Duration::from_secs(60)).unwrap()),
            Arc::new(ca.mint(&api, Duration::from_secs(60)).unwrap()),
        ];
        s.bundles.insert(td, Arc::new(ca.bundle().unwrap()));
        s.bundles.insert(other, Arc::new(pca.bundle().unwrap()));
        s
    }

    fn kind(s: &Secret) -> &'static str {
        match &s.r#type {
            Some(secret::Type::TlsCertificate(_)) => "tls",
            Some(secret::Type::ValidationContext(v)) if v.custom_validator_config.is_some() => {
                "spiffe"
            }
            Some(secret::Type::ValidationContext(_)) => "trusted_ca",
            None => "none",
        }
    }

    #[test]
    fn spire_compatible_names() {
        let snap = snapshot();
        let n = Naming::default();
        let default = resolve(&snap, "default", &n).unwrap();
        assert_eq!((default.name.as_str(), kind(&default)), ("default", "tls"));
        let Some(secret::Type::TlsCertificate(t)) = &default.r#type else {
            panic!()
        };
        let Some(Specifier::InlineBytes(chain)) = &t.certificate_chain.as_ref().unwrap().specifier
        else {
            panic!()
        };
        assert!(String::from_utf8_lossy(chain).starts_with("-----BEGIN CERTIFICATE-----"));
        let Some(Specifier::InlineBytes(key)) = &t.private_key.as_ref().unwrap().specifier else {
            panic!()
        };
        assert!(String::from_utf8_lossy(key).contains("PRIVATE KEY-----"));
        // The second SVID by its SPIFFE ID.
        let api = resolve(&snap, "spiffe://example.org/api", &n).unwrap();
        assert_eq!(kind(&api), "tls");
        assert_ne!(api, resolve(&snap, "spiffe://example.org/web", &n).unwrap());
        assert_eq!(kind(&resolve(&snap, "ROOTCA", &n).unwrap()), "trusted_ca");
        assert_eq!(
            kind(&resolve(&snap, "spiffe://partner.example", &n).unwrap()),
            "trusted_ca"
        );
        let all = resolve(&snap, "ALL", &n).unwrap();
        assert_eq!(kind(&all), "spiffe");
        let Some(secret::Type::ValidationContext(v)) = &all.r#type else {
            panic!()
        };
        let cfg = v.custom_validator_config.as_ref().unwrap();
        assert_eq!(cfg.name, "envoy.tls.cert_validator.spiffe");
        let decoded =
            SpiffeCertValidatorConfig::decode(cfg.typed_config.as_ref().unwrap().value.as_slice())
                .unwrap();
        let tds: Vec<_> = decoded
            .trust_domains
            .iter()
            .map(|t| t.name.as_str())
            .collect();
        assert_eq!(tds, ["example.org", "partner.example"]);
        assert!(resolve(&snap, "spiffe://unknown.org", &n).is_none());
        assert!(resolve(&snap, "nonsense", &n).is_none());
    }

    #[test]
    fn spiffe_validation_and_custom_names() {
        let snap = snapshot();
        let n = Naming {
            default_svid: "mine".into(),
            default_bundle: "roots".into(),
            all_bundles: "everything".into(),
            spiffe_validation: true,
        };
        assert_eq!(kind(&resolve(&snap, "roots", &n).unwrap()), "spiffe");
        assert_eq!(kind(&resolve(&snap, "mine", &n).unwrap()), "tls");
        assert!(resolve(&snap, "default", &n).is_none());
    }

    #[test]
    fn subscriptions() {
        let snap = snapshot();
        let n = Naming::default();
        let names = |v: Vec<Secret>| v.into_iter().map(|s| s.name).collect::<Vec<_>>();
        // Unknown names are absent, known ones kept, duplicates once.
        assert_eq!(
            names(resolve_all(
                &snap,
                &[
                    "ROOTCA".into(),
                    "nope".into(),
                    "ROOTCA".into(),
                    "default".into()
                ],
                &n
            )),
            ["ROOTCA", "default"]
        );
        // An empty list is everything.
        let everything = names(resolve_all(&snap, &[], &n));
        assert_eq!(everything.len(), 2 + 2 + 3);
        assert!(everything.contains(&"spiffe://partner.example".to_string()));
    }
}
