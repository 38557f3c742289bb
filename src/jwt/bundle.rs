//! JWT bundles: the JWKS of each trust domain, parsed once into public keys by key ID.
//!
//! Which keys count (SPIFFE Trust Domain and Bundle §4.2.2): a key whose `use` is
//! `jwt-svid`, or a key with no `use` at all, because the Workload API's
//! `FetchJWTBundles` sends a plain RFC 7517 JWKS (go-spiffe's `jwtbundle` writes no
//! `use`). Keys for another use (`x509-svid`, `sig`, `enc`...), symmetric keys (`oct`),
//! curves ring cannot verify (P-521) and keys without a `kid` are skipped, each with a
//! reason the loader can log, so a bundle never lends a key to a use it was not given for.

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use serde_json::Value;

use crate::spiffe::TrustDomain;

/// A public key that can verify JWT-SVIDs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwtKey {
    /// Uncompressed point `04 || X || Y` on P-256.
    EcP256(Vec<u8>),
    /// Uncompressed point on P-384.
    EcP384(Vec<u8>),
    /// Uncompressed point on P-521.
    EcP521(Vec<u8>),
    /// Modulus and exponent, big-endian without leading zeros.
    Rsa { n: Vec<u8>, e: Vec<u8> },
}

impl JwtKey {
    /// The key family as a word for messages.
    pub fn family(&self) -> &'static str {
        match self {
            Self::EcP256(_) => "EC P-256",
            Self::EcP384(_) => "EC P-384",
            Self::EcP521(_) => "EC P-521",
            Self::Rsa { .. } => "RSA",
        }
    }

    /// The public JWK of this key, with `kid` and `use: jwt-svid`.
    pub fn to_jwk(&self, kid: &str) -> Value {
        match self {
            Self::EcP256(p) | Self::EcP384(p) | Self::EcP521(p) => {
                let (crv, len) = match self {
                    Self::EcP256(_) => ("P-256", 32),
                    Self::EcP384(_) => ("P-384", 48),
                    _ => ("P-521", 66),
                };
                serde_json::json!({
                    "kty": "EC", "crv": crv, "use": "jwt-svid", "kid": kid,
                    "x": B64.encode(&p[1..1 + len]), "y": B64.encode(&p[1 + len..]),
                })
            }
            Self::Rsa { n, e } => serde_json::json!({
                "kty": "RSA", "use": "jwt-svid", "kid": kid,
                "n": B64.encode(n), "e": B64.encode(e),
            }),
        }
    }
}

/// One trust domain's JWT signing keys, by key ID.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JwtBundle {
    pub keys: BTreeMap<String, JwtKey>,
}

/// Why a JWKS document could not be used at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    #[error("not JSON: {0}")]
    NotJson(String),
    #[error("not a JWKS: no \"keys\" array")]
    NoKeys,
}

impl JwtBundle {
    /// Parses a JWKS document. Keys that cannot serve JWT-SVIDs are skipped; the second
    /// value says which and why (`keys[2]: use is "x509-svid"`), for the log.
    pub fn parse(jwks: &[u8]) -> Result<(Self, Vec<String>), BundleError> {
        let doc: Value =
            serde_json::from_slice(jwks).map_err(|e| BundleError::NotJson(e.to_string()))?;
        let keys = doc
            .get("keys")
            .and_then(Value::as_array)
            .ok_or(BundleError::NoKeys)?;
        let mut bundle = Self::default();
        let mut skipped = Vec::new();
        for (i, jwk) in keys.iter().enumerate() {
            match parse_jwk(jwk) {
                Ok(Some((kid, key))) => {
                    if bundle.keys.insert(kid.clone(), key).is_some() {
                        // Two keys under one kid: which one signed is ambiguous, so neither.
                        bundle.keys.remove(&kid);
                        skipped.push(format!("keys[{i}]: kid {kid:?} appears twice"));
                    }
                }
                Ok(None) => {}
                Err(why) => skipped.push(format!("keys[{i}]: {why}")),
            }
        }
        Ok((bundle, skipped))
    }
}

/// One JWK: `Ok(None)` for a key of another use (an X.509 authority in a SPIFFE bundle,
/// expected and not worth a warning), `Err` for a key meant for JWTs that we cannot use.
fn parse_jwk(jwk: &Value) -> Result<Option<(String, JwtKey)>, String> {
    let text = |k: &str| jwk.get(k).and_then(Value::as_str);
    match jwk.get("use") {
        None => {}
        Some(Value::String(u)) if u == "jwt-svid" => {}
        Some(Value::String(u)) if u == "x509-svid" => return Ok(None),
        Some(u) => return Err(format!("use is {u}, not jwt-svid")),
    }
    let kid = match text("kid") {
        Some(k) if !k.is_empty() => k.to_string(),
        _ => return Err("no kid".into()),
    };
    let b64 = |k: &str| -> Result<Vec<u8>, String> {
        let v = text(k).ok_or_else(|| format!("kid {kid:?}: no {k}"))?;
        B64.decode(v)
            .map_err(|_| format!("kid {kid:?}: {k} is not base64url"))
    };
    let key = match text("kty") {
        Some("EC") => {
            let (x, y) = (b64("x")?, b64("y")?);
            let len = match text("crv") {
                Some("P-256") => 32,
                Some("P-384") => 48,
                Some("P-521") => 66,
                Some(c) => return Err(format!("kid {kid:?}: curve {c} is not supported")),
                None => return Err(format!("kid {kid:?}: no crv")),
            };
            if x.len() != len || y.len() != len {
                return Err(format!("kid {kid:?}: x or y has the wrong length"));
            }
            let mut point = Vec::with_capacity(1 + 2 * len);
            point.push(4);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            match len {
                32 => JwtKey::EcP256(point),
                48 => JwtKey::EcP384(point),
                _ => JwtKey::EcP521(point),
            }
        }
        Some("RSA") => {
            let strip = |v: Vec<u8>| {
                let start = v.iter().position(|b| *b != 0).unwrap_or(v.len());
                v[start..].to_vec()
            };
            let (n, e) = (strip(b64("n")?), strip(b64("e")?));
            if n.len() < 256 {
                return Err(format!(
                    "kid {kid:?}: RSA modulus of {} bits, at least 2048 needed",
                    n.len() * 8
                ));
            }
            JwtKey::Rsa { n, e }
        }
        Some(k) => return Err(format!("kid {kid:?}: key type {k} cannot sign JWT-SVIDs")),
        None => return Err(format!("kid {kid:?}: no kty")),
    };
    Ok(Some((kid, key)))
}

/// Every trust domain's JWT bundle: what validation reads, swapped whole.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JwtBundles {
    pub by_domain: BTreeMap<TrustDomain, Arc<JwtBundle>>,
}

impl JwtBundles {
    pub fn get(&self, td: &TrustDomain) -> Option<&JwtBundle> {
        self.by_domain.get(td).map(|b| &**b)
    }

    /// The trust domain (other than `except`) whose bundle holds `kid`, if any.
    pub fn holder_of(&self, kid: &str, except: &TrustDomain) -> Option<&TrustDomain> {
        self.by_domain
            .iter()
            .find(|(td, b)| *td != except && b.keys.contains_key(kid))
            .map(|(td, _)| td)
    }

    pub fn key_count(&self) -> usize {
        self.by_domain.values().map(|b| b.keys.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_jwt_keys_and_says_why_others_are_skipped() {
        let x = B64.encode([1u8; 32]);
        let doc = serde_json::json!({"keys": [
            {"kty": "EC", "crv": "P-256", "kid": "a", "use": "jwt-svid", "x": x, "y": x},
            {"kty": "EC", "crv": "P-256", "kid": "b", "x": x, "y": x},
            {"kty": "EC", "crv": "P-256", "use": "x509-svid", "x": x, "y": x, "x5c": []},
            {"kty": "oct", "kid": "h", "k": "c2VjcmV0"},
            {"kty": "EC", "crv": "secp256k1", "kid": "c", "x": x, "y": x},
            {"kty": "EC", "crv": "P-256", "x": x, "y": x},
            {"kty": "EC", "crv": "P-256", "kid": "s", "use": "sig", "x": x, "y": x},
            {"kty": "RSA", "kid": "r", "n": B64.encode([0xc1u8; 128]), "e": "AQAB"},
        ]});
        let (b, skipped) = JwtBundle::parse(doc.to_string().as_bytes()).unwrap();
        assert_eq!(b.keys.keys().collect::<Vec<_>>(), ["a", "b"]);
        let text = skipped.join("\n");
        assert!(text.contains("keys[3]: kid \"h\": key type oct"), "{text}");
        assert!(text.contains("curve secp256k1"), "{text}");
        assert!(text.contains("keys[5]: no kid"), "{text}");
        assert!(text.contains("keys[6]: use is \"sig\""), "{text}");
        assert!(text.contains("1024 bits"), "{text}");
        assert!(!text.contains("keys[2]"), "{text}");
        assert_eq!(JwtBundle::parse(b"{}").unwrap_err(), BundleError::NoKeys);
        assert!(matches!(
            JwtBundle::parse(b"nope"),
            Err(BundleError::NotJson(_))
        ));
    }
}
