//! Minting JWT-SVIDs with a key we hold (the dev CA's): ES256 for P-256, ES384 for
//! P-384, ES512 for P-521, RS256 for RSA. The key ID is derived from the public key, so every process
//! that loads the same CA key mints under the same `kid` and validates the others' tokens.

use std::time::Duration;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair, RsaKeyPair};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use serde_json::{json, Value};

use super::bundle::JwtKey;
use crate::spiffe::SpiffeId;

enum Key {
    Ec(EcdsaKeyPair, &'static str),
    Rsa(RsaKeyPair),
}

/// A private key that signs JWT-SVIDs, and the public JWK that verifies them.
pub struct JwtSigner {
    key: Key,
    kid: String,
    public: JwtKey,
    rng: SystemRandom,
}

impl JwtSigner {
    /// Loads a PKCS#8 private key: EC P-256, EC P-384 or RSA.
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, String> {
        let rng = SystemRandom::new();
        let ec = |alg, name| {
            EcdsaKeyPair::from_pkcs8(alg, der)
                .ok()
                .map(|k| Key::Ec(k, name))
        };
        let key = ec(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, "ES256")
            .or_else(|| ec(&signature::ECDSA_P384_SHA384_FIXED_SIGNING, "ES384"))
            .or_else(|| ec(&signature::ECDSA_P521_SHA512_FIXED_SIGNING, "ES512"))
            .or_else(|| RsaKeyPair::from_pkcs8(der).ok().map(Key::Rsa))
            .ok_or("the key is not EC P-256, EC P-384 or RSA in PKCS#8")?;
        let public = match &key {
            Key::Ec(k, "ES256") => JwtKey::EcP256(k.public_key().as_ref().to_vec()),
            Key::Ec(k, "ES384") => JwtKey::EcP384(k.public_key().as_ref().to_vec()),
            Key::Ec(k, _) => JwtKey::EcP521(k.public_key().as_ref().to_vec()),
            Key::Rsa(k) => {
                let c = aws_lc_rs::rsa::PublicKeyComponents::<Vec<u8>>::from(k.public_key());
                JwtKey::Rsa { n: c.n, e: c.e }
            }
        };
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &public_bytes(&public));
        Ok(Self {
            key,
            kid: B64.encode(&digest.as_ref()[..16]),
            public,
            rng,
        })
    }

    /// A fresh P-256 key (tests and callers with no key of their own).
    pub fn generate_p256() -> Result<Self, String> {
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &SystemRandom::new(),
        )
        .map_err(|e| e.to_string())?;
        Self::from_pkcs8(pkcs8.as_ref())
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn public_key(&self) -> JwtKey {
        self.public.clone()
    }

    /// A JWKS with our one key.
    pub fn jwks(&self) -> Value {
        json!({"keys": [self.public.to_jwk(&self.kid)]})
    }

    fn alg(&self) -> &'static str {
        match &self.key {
            Key::Ec(_, alg) => alg,
            Key::Rsa(_) => "RS256",
        }
    }

    /// A JWT-SVID for `sub` and `aud`, valid for `ttl` from now.
    pub fn mint(&self, sub: &SpiffeId, aud: &[String], ttl: Duration) -> Result<String, String> {
        let now = super::unix_now();
        let claims =
            json!({"sub": sub.to_string(), "aud": aud, "iat": now, "exp": now + ttl.as_secs()});
        self.try_sign(&json!({}), &claims)
    }

    /// Signs `claims` under a header of `alg`, `typ: JWT`, our `kid`, and the fields of
    /// `header` on top.
    fn try_sign(&self, header: &Value, claims: &Value) -> Result<String, String> {
        let mut h = json!({"alg": self.alg(), "typ": "JWT", "kid": self.kid});
        if let (Some(h), Some(extra)) = (h.as_object_mut(), header.as_object()) {
            for (k, v) in extra {
                if v.is_null() {
                    h.remove(k);
                } else {
                    h.insert(k.clone(), v.clone());
                }
            }
        }
        let input = format!(
            "{}.{}",
            B64.encode(h.to_string()),
            B64.encode(claims.to_string())
        );
        let sig = match &self.key {
            Key::Ec(k, _) => k
                .sign(&self.rng, input.as_bytes())
                .map_err(|_| "ECDSA signing failed")?
                .as_ref()
                .to_vec(),
            Key::Rsa(k) => {
                let mut sig = vec![0; k.public_modulus_len()];
                k.sign(
                    &signature::RSA_PKCS1_SHA256,
                    &self.rng,
                    input.as_bytes(),
                    &mut sig,
                )
                .map_err(|_| "RSA signing failed")?;
                sig
            }
        };
        Ok(format!("{input}.{}", B64.encode(sig)))
    }
}

#[cfg(test)]
impl JwtSigner {
    pub fn sign(&self, header: &Value, claims: &Value) -> String {
        self.try_sign(header, claims).unwrap()
    }
    pub fn sign_without_kid(&self, claims: &Value) -> String {
        self.sign(&json!({"kid": null}), claims)
    }
    pub fn sign_as(&self, kid: &str, claims: &Value) -> String {
        self.sign(&json!({"kid": kid}), claims)
    }
}

/// The bytes the key ID is a digest of: the EC point, or `n || e`.
fn public_bytes(k: &JwtKey) -> Vec<u8> {
    match k {
        JwtKey::EcP256(p) | JwtKey::EcP384(p) | JwtKey::EcP521(p) => p.clone(),
        JwtKey::Rsa { n, e } => [n.as_slice(), e.as_slice()].concat(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jwt::bundle::{JwtBundle, JwtBundles};
    use crate::jwt::validate::{validate, Policy};
    use std::sync::Arc;

    #[test]
    fn minted_tokens_validate_against_the_published_jwks() {
        let s = JwtSigner::generate_p256().unwrap();
        let id = crate::spiffe::parse_spiffe_id("spiffe://example.org/web").unwrap();
        let t = s
            .mint(&id, &["api".into()], Duration::from_secs(60))
            .unwrap();
        let (bundle, skipped) = JwtBundle::parse(s.jwks().to_string().as_bytes()).unwrap();
        assert!(skipped.is_empty());
        let mut bundles = JwtBundles::default();
        bundles
            .by_domain
            .insert(id.trust_domain().clone(), Arc::new(bundle));
        let policy = Policy {
            audiences: vec!["api".into()],
            leeway: Duration::from_secs(0),
        };
        let v = validate(&t, &bundles, &policy, super::super::unix_now()).unwrap();
        assert_eq!(v.spiffe_id, id);
        // The same key gives the same kid.
        let der = pkcs8_of_p256();
        let one = JwtSigner::from_pkcs8(&der).unwrap();
        let two = JwtSigner::from_pkcs8(&der).unwrap();
        assert_eq!(one.kid(), two.kid());
        assert_ne!(one.kid(), s.kid());
    }

    fn pkcs8_of_p256() -> Vec<u8> {
        EcdsaKeyPair::generate_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &SystemRandom::new(),
        )
        .unwrap()
        .as_ref()
        .to_vec()
    }
}
