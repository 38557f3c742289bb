//! JWT-SVID validation (SPIFFE JWT-SVID spec): compact JWS only; `alg` RS/PS 256/384/512
//! or ES256/ES384/ES512 (never `none`, never HMAC: a bundle holds public keys, and an HMAC
//! "verified" with a public key proves nothing); `typ` absent, `JWT` or `JOSE`; `kid`
//! required; the key comes from the JWT bundle of the trust domain of `sub`, which must
//! be a workload's SPIFFE ID, and its family must fit `alg`; `aud` must hold one of our
//! audiences; `exp` required; `exp`, `nbf` and `iat` are checked with a leeway.
//!
//! The signature is checked before any claim is believed. Error texts name the reason
//! and never the token.

use std::time::Duration;

use aws_lc_rs::signature::{
    self, RsaPublicKeyComponents, UnparsedPublicKey, VerificationAlgorithm,
};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use serde_json::{Map, Value};

use super::bundle::{JwtBundles, JwtKey};
use crate::log_limit::printable;
use crate::spiffe::{parse_workload_id, SpiffeId};

/// Longer tokens are refused before anything is decoded.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Why a token was refused. [`JwtError::label`] is the metric's `reason`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("no bearer token")]
    Missing,
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    #[error("alg {0} is not allowed for JWT-SVIDs")]
    BadAlg(String),
    #[error("alg {alg} does not fit the {family} key {kid}")]
    AlgKeyMismatch {
        alg: &'static str,
        family: &'static str,
        kid: String,
    },
    #[error("typ {0} is not JWT or JOSE")]
    BadTyp(String),
    #[error("no kid in the header")]
    MissingKid,
    #[error("sub is not a workload SPIFFE ID: {0}")]
    BadSubject(String),
    #[error("no JWT bundle for trust domain {0}")]
    NoBundle(String),
    #[error("key {kid} is not in the JWT bundle of {trust_domain}")]
    UnknownKey { kid: String, trust_domain: String },
    #[error("key {kid} belongs to trust domain {holder}, the token's sub is in {trust_domain}")]
    ForeignTrustDomain {
        kid: String,
        trust_domain: String,
        holder: String,
    },
    #[error("signature does not verify with key {0}")]
    BadSignature(String),
    #[error("no exp claim")]
    MissingExp,
    #[error("expired {0} s ago (leeway {1} s)")]
    Expired(u64, u64),
    #[error("not valid yet ({0} in the future)")]
    NotYetValid(&'static str),
    #[error("aud holds none of the accepted audiences")]
    WrongAudience,
}

impl JwtError {
    pub fn label(&self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Malformed(_) => "malformed",
            Self::BadAlg(_) | Self::AlgKeyMismatch { .. } => "bad_alg",
            Self::BadTyp(_) => "bad_typ",
            Self::MissingKid => "missing_kid",
            Self::BadSubject(_) => "bad_subject",
            Self::NoBundle(_) => "no_bundle",
            Self::UnknownKey { .. } => "unknown_key",
            Self::ForeignTrustDomain { .. } => "foreign_trust_domain",
            Self::BadSignature(_) => "bad_signature",
            Self::MissingExp => "missing_exp",
            Self::Expired(..) => "expired",
            Self::NotYetValid(_) => "not_yet_valid",
            Self::WrongAudience => "wrong_audience",
        }
    }
}

/// A token that passed every check.
#[derive(Debug, Clone)]
pub struct ValidatedJwt {
    pub spiffe_id: SpiffeId,
    /// `sub` as written (the canonical ID text), for rules.
    pub sub: String,
    pub claims: Map<String, Value>,
}

/// What a listener accepts.
#[derive(Debug, Clone)]
pub struct Policy {
    pub audiences: Vec<String>,
    pub leeway: Duration,
}

/// The signature algorithms a JWT-SVID may use, and the key family each needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Alg {
    Rs256,
    Rs384,
    Rs512,
    Ps256,
    Ps384,
    Ps512,
    Es256,
    Es384,
    Es512,
}

impl Alg {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "RS256" => Self::Rs256,
            "RS384" => Self::Rs384,
            "RS512" => Self::Rs512,
            "PS256" => Self::Ps256,
            "PS384" => Self::Ps384,
            "PS512" => Self::Ps512,
            "ES256" => Self::Es256,
            "ES384" => Self::Es384,
            "ES512" => Self::Es512,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::Rs256 => "RS256",
            Self::Rs384 => "RS384",
            Self::Rs512 => "RS512",
            Self::Ps256 => "PS256",
            Self::Ps384 => "PS384",
            Self::Ps512 => "PS512",
            Self::Es256 => "ES256",
            Self::Es384 => "ES384",
            Self::Es512 => "ES512",
        }
    }

    /// Verifies `sig` over `msg` with `key`; `Err(())` when the key family does not fit.
    fn verify(self, key: &JwtKey, msg: &[u8], sig: &[u8]) -> Result<bool, ()> {
        let rsa: &'static signature::RsaParameters = match self {
            Self::Rs256 => &signature::RSA_PKCS1_2048_8192_SHA256,
            Self::Rs384 => &signature::RSA_PKCS1_2048_8192_SHA384,
            Self::Rs512 => &signature::RSA_PKCS1_2048_8192_SHA512,
            Self::Ps256 => &signature::RSA_PSS_2048_8192_SHA256,
            Self::Ps384 => &signature::RSA_PSS_2048_8192_SHA384,
            Self::Ps512 => &signature::RSA_PSS_2048_8192_SHA512,
            Self::Es256 | Self::Es384 | Self::Es512 => {
                let (alg, point): (&'static dyn VerificationAlgorithm, _) = match (self, key) {
                    (Self::Es256, JwtKey::EcP256(p)) => (&signature::ECDSA_P256_SHA256_FIXED, p),
                    (Self::Es384, JwtKey::EcP384(p)) => (&signature::ECDSA_P384_SHA384_FIXED, p),
                    (Self::Es512, JwtKey::EcP521(p)) => (&signature::ECDSA_P521_SHA512_FIXED, p),
                    _ => return Err(()),
                };
                return Ok(UnparsedPublicKey::new(alg, point).verify(msg, sig).is_ok());
            }
        };
        let JwtKey::Rsa { n, e } = key else {
            return Err(());
        };
        Ok(RsaPublicKeyComponents { n, e }
            .verify(rsa, msg, sig)
            .is_ok())
    }
}

fn decode_part(part: &str, what: &'static str) -> Result<Map<String, Value>, JwtError> {
    let bytes = B64.decode(part).map_err(|_| JwtError::Malformed(what))?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(JwtError::Malformed(what)),
    }
}

/// A NumericDate (RFC 7519: seconds, possibly fractional); negative or absurd values
/// are malformed.
fn numeric_date(claims: &Map<String, Value>, name: &'static str) -> Result<Option<u64>, JwtError> {
    match claims.get(name) {
        None => Ok(None),
        Some(v) => match v.as_u64().or_else(|| {
            v.as_f64()
                .filter(|f| f.is_finite() && *f >= 0.0 && *f < 1e15)
                .map(|f| f as u64)
        }) {
            Some(n) => Ok(Some(n)),
            None => Err(JwtError::Malformed(match name {
                "exp" => "exp is not a NumericDate",
                "nbf" => "nbf is not a NumericDate",
                _ => "iat is not a NumericDate",
            })),
        },
    }
}

/// Validates `token` against `bundles` at unix time `now`.
pub fn validate(
    token: &str,
    bundles: &JwtBundles,
    policy: &Policy,
    now: u64,
) -> Result<ValidatedJwt, JwtError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(JwtError::Malformed("longer than 16 KiB"));
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed("not a compact JWS (three parts)"));
    };
    let header = decode_part(h, "header is not base64url JSON")?;
    let alg_text = match header.get("alg") {
        Some(Value::String(a)) => a.as_str(),
        Some(_) => return Err(JwtError::Malformed("alg is not a string")),
        None => return Err(JwtError::BadAlg("(absent)".into())),
    };
    let alg = Alg::parse(alg_text).ok_or_else(|| JwtError::BadAlg(printable(alg_text, 16)))?;
    match header.get("typ") {
        None => {}
        Some(Value::String(t)) if t == "JWT" || t == "JOSE" => {}
        Some(t) => return Err(JwtError::BadTyp(printable(&t.to_string(), 16))),
    }
    if header.contains_key("crit") {
        // RFC 7515 §4.1.11: extensions we do not understand make the token invalid.
        return Err(JwtError::Malformed(
            "crit header parameters are not supported",
        ));
    }
    let kid = match header.get("kid") {
        Some(Value::String(k)) if !k.is_empty() => k.as_str(),
        _ => return Err(JwtError::MissingKid),
    };
    let claims = decode_part(p, "claims are not base64url JSON")?;
    let sub = match claims.get("sub") {
        Some(Value::String(s)) => s.as_str(),
        _ => return Err(JwtError::BadSubject("no sub claim".into())),
    };
    let spiffe_id =
        parse_workload_id(sub).map_err(|e| JwtError::BadSubject(printable(&e.to_string(), 128)))?;
    let td = spiffe_id.trust_domain();
    let kid_text = || printable(kid, 64);
    let key = match bundles.get(td).and_then(|b| b.keys.get(kid)) {
        Some(k) => k,
        None => {
            return Err(match bundles.holder_of(kid, td) {
                Some(holder) => JwtError::ForeignTrustDomain {
                    kid: kid_text(),
                    trust_domain: td.to_string(),
                    holder: holder.to_string(),
                },
                None if bundles.get(td).is_none() => JwtError::NoBundle(td.to_string()),
                None => JwtError::UnknownKey {
                    kid: kid_text(),
                    trust_domain: td.to_string(),
                },
            })
        }
    };
    let sig = B64
        .decode(s)
        .map_err(|_| JwtError::Malformed("signature is not base64url"))?;
    let signing_input = &token[..h.len() + 1 + p.len()];
    match alg.verify(key, signing_input.as_bytes(), &sig) {
        Ok(true) => {}
        Ok(false) => return Err(JwtError::BadSignature(kid_text())),
        Err(()) => {
            return Err(JwtError::AlgKeyMismatch {
                alg: alg.name(),
                family: key.family(),
                kid: kid_text(),
            })
        }
    }
    // Signed by the trust domain: now the claims can be believed.
    let leeway = policy.leeway.as_secs();
    let exp = numeric_date(&claims, "exp")?.ok_or(JwtError::MissingExp)?;
    if now > exp.saturating_add(leeway) {
        return Err(JwtError::Expired(now - exp, leeway));
    }
    if numeric_date(&claims, "nbf")?.is_some_and(|nbf| nbf > now.saturating_add(leeway)) {
        return Err(JwtError::NotYetValid("nbf"));
    }
    if numeric_date(&claims, "iat")?.is_some_and(|iat| iat > now.saturating_add(leeway)) {
        return Err(JwtError::NotYetValid("iat"));
    }
    let accepted = |a: &Value| {
        a.as_str()
            .is_some_and(|a| policy.audiences.iter().any(|ours| ours == a))
    };
    let aud_ok = match claims.get("aud") {
        Some(Value::Array(list)) => list.iter().any(accepted),
        Some(a) => accepted(a),
        None => false,
    };
    if !aud_ok {
        return Err(JwtError::WrongAudience);
    }
    Ok(ValidatedJwt {
        sub: sub.to_string(),
        spiffe_id,
        claims,
    })
}

#[cfg(test)]
mod tests {
    use super::super::bundle::JwtBundle;
    use super::super::signer::JwtSigner;
    use super::*;
    use crate::spiffe::parse_trust_domain;
    use std::sync::Arc;

    const SUB: &str = "spiffe://example.org/ns/default/sa/payment";

    fn setup() -> (JwtSigner, JwtSigner, JwtBundles, Policy) {
        let a = JwtSigner::generate_p256().unwrap();
        let b = JwtSigner::generate_p256().unwrap();
        let mut bundles = JwtBundles::default();
        for (td, s) in [("example.org", &a), ("other.org", &b)] {
            let mut bundle = JwtBundle::default();
            bundle.keys.insert(s.kid().to_string(), s.public_key());
            bundles
                .by_domain
                .insert(parse_trust_domain(td).unwrap(), Arc::new(bundle));
        }
        let policy = Policy {
            audiences: vec!["users".into()],
            leeway: Duration::from_secs(30),
        };
        (a, b, bundles, policy)
    }

    fn now() -> u64 {
        super::super::unix_now()
    }

    fn claims(aud: Value, exp: i64) -> Value {
        serde_json::json!({"sub": SUB, "aud": aud, "exp": now() as i64 + exp, "iat": now()})
    }

    fn unsigned(header: Value, claims: &Value, sig: &[u8]) -> String {
        format!(
            "{}.{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string()),
            B64.encode(sig)
        )
    }

    fn reason(token: &str, bundles: &JwtBundles, policy: &Policy) -> &'static str {
        validate(token, bundles, policy, now()).unwrap_err().label()
    }

    #[test]
    fn a_good_token_gives_its_subject_and_claims() {
        let (a, _, bundles, policy) = setup();
        let t = a.sign(
            &serde_json::json!({"alg": "ES256"}),
            &claims(serde_json::json!(["x", "users"]), 60),
        );
        let v = validate(&t, &bundles, &policy, now()).unwrap();
        assert_eq!(v.sub, SUB);
        assert_eq!(v.claims["aud"][1], "users");
        // aud as a single string works too.
        let t = a.sign(
            &serde_json::json!({}),
            &claims(serde_json::json!("users"), 60),
        );
        assert!(validate(&t, &bundles, &policy, now()).is_ok());
    }

    #[test]
    fn es512_tokens_verify_with_p521_keys_from_a_jwks() {
        let (a, _, mut bundles, policy) = setup();
        let pkcs8 = aws_lc_rs::signature::EcdsaKeyPair::generate_pkcs8(
            &signature::ECDSA_P521_SHA512_FIXED_SIGNING,
            &aws_lc_rs::rand::SystemRandom::new(),
        )
        .unwrap();
        let p521 = JwtSigner::from_pkcs8(pkcs8.as_ref()).unwrap();
        // The key travels as a JWK (crv P-521), as a bundle endpoint would serve it.
        let jwks = serde_json::json!({"keys": [p521.public_key().to_jwk(p521.kid())]});
        let (bundle, skipped) = JwtBundle::parse(jwks.to_string().as_bytes()).unwrap();
        assert!(skipped.is_empty(), "{skipped:?}");
        bundles
            .by_domain
            .insert(parse_trust_domain("example.org").unwrap(), Arc::new(bundle));
        let good = claims(serde_json::json!(["users"]), 60);
        let t = p521.sign(&serde_json::json!({}), &good);
        let header: Value =
            serde_json::from_slice(&B64.decode(t.split('.').next().unwrap()).unwrap()).unwrap();
        assert_eq!(header["alg"], "ES512");
        assert_eq!(validate(&t, &bundles, &policy, now()).unwrap().sub, SUB);
        // ES512 named over a P-256 key, and ES256 over the P-521 key: refused.
        let t = a.sign(
            &serde_json::json!({"alg": "ES512", "kid": p521.kid()}),
            &good,
        );
        assert_eq!(reason(&t, &bundles, &policy), "bad_signature");
        let t = p521.sign(&serde_json::json!({"alg": "ES256"}), &good);
        assert_eq!(reason(&t, &bundles, &policy), "bad_alg");
    }

    #[test]
    fn each_attack_is_refused_for_its_reason() {
        let (a, b, bundles, policy) = setup();
        let good = claims(serde_json::json!(["users"]), 60);
        let kid = a.kid();
        // alg none, with and without a signature part.
        let none = unsigned(serde_json::json!({"alg": "none", "kid": kid}), &good, b"");
        assert_eq!(reason(&none, &bundles, &policy), "bad_alg");
        // HS256 keyed with the public key.
        let hs = unsigned(
            serde_json::json!({"alg": "HS256", "kid": kid}),
            &good,
            &[0; 32],
        );
        assert_eq!(reason(&hs, &bundles, &policy), "bad_alg");
        // ES384 header over a P-256 key: the alg must fit the key.
        let t = a.sign(&serde_json::json!({"alg": "ES384"}), &good);
        assert_eq!(reason(&t, &bundles, &policy), "bad_alg");
        let t = a.sign_without_kid(&good);
        assert_eq!(reason(&t, &bundles, &policy), "missing_kid");
        let t = a.sign(&serde_json::json!({"typ": "at+jwt"}), &good);
        assert_eq!(reason(&t, &bundles, &policy), "bad_typ");
        let t = a.sign(
            &serde_json::json!({}),
            &claims(serde_json::json!(["orders"]), 60),
        );
        assert_eq!(reason(&t, &bundles, &policy), "wrong_audience");
        let t = a.sign(
            &serde_json::json!({}),
            &claims(serde_json::json!(["users"]), -31),
        );
        assert_eq!(reason(&t, &bundles, &policy), "expired");
        let t = a.sign(
            &serde_json::json!({}),
            &claims(serde_json::json!(["users"]), -20),
        );
        assert!(
            validate(&t, &bundles, &policy, now()).is_ok(),
            "within the leeway"
        );
        let mut no_exp = good.clone();
        no_exp.as_object_mut().unwrap().remove("exp");
        assert_eq!(
            reason(&a.sign(&serde_json::json!({}), &no_exp), &bundles, &policy),
            "missing_exp"
        );
        let mut future = good.clone();
        future["nbf"] = (now() + 120).into();
        assert_eq!(
            reason(&a.sign(&serde_json::json!({}), &future), &bundles, &policy),
            "not_yet_valid"
        );
        // sub in example.org, signed by other.org's key.
        let t = b.sign(&serde_json::json!({}), &good);
        assert_eq!(reason(&t, &bundles, &policy), "foreign_trust_domain");
        // A key no bundle has.
        let c = JwtSigner::generate_p256().unwrap();
        assert_eq!(
            reason(&c.sign(&serde_json::json!({}), &good), &bundles, &policy),
            "unknown_key"
        );
        // The right kid, someone else's signature.
        let forged = c.sign_as(kid, &good);
        assert_eq!(reason(&forged, &bundles, &policy), "bad_signature");
        let mut bad_sub = good.clone();
        bad_sub["sub"] = "spiffe://example.org".into();
        assert_eq!(
            reason(&a.sign(&serde_json::json!({}), &bad_sub), &bundles, &policy),
            "bad_subject"
        );
        bad_sub["sub"] = "spiffe://nowhere.org/x".into();
        assert_eq!(
            reason(&c.sign(&serde_json::json!({}), &bad_sub), &bundles, &policy),
            "no_bundle"
        );
        // A kid of example.org on a token of a domain we have no bundle for.
        assert_eq!(
            reason(&a.sign(&serde_json::json!({}), &bad_sub), &bundles, &policy),
            "foreign_trust_domain"
        );
        for t in ["", "a.b", "a.b.c.d.e", "!!.!!.!!"] {
            assert_eq!(reason(t, &bundles, &policy), "malformed", "{t}");
        }
        let long = "a".repeat(MAX_TOKEN_LEN + 1);
        assert_eq!(reason(&long, &bundles, &policy), "malformed");
    }

    #[test]
    fn errors_never_carry_the_token() {
        let (a, _, bundles, policy) = setup();
        let t = a.sign(
            &serde_json::json!({}),
            &claims(serde_json::json!(["orders"]), 60),
        );
        let e = validate(&t, &bundles, &policy, now())
            .unwrap_err()
            .to_string();
        for part in t.split('.') {
            assert!(!e.contains(part), "{e}");
        }
    }
}

#[cfg(test)]
mod properties {
    //! Tokens as an attacker sends them: a good token with one character changed,
    //! claims of every JSON type signed with a trusted key, and noise. Nothing panics;
    //! no changed token is accepted; whatever is accepted meets every rule.
    use super::super::bundle::JwtBundle;
    use super::super::signer::JwtSigner;
    use super::*;
    use crate::spiffe::parse_trust_domain;
    use proptest::prelude::*;
    use std::sync::{Arc, OnceLock};

    const NOW: u64 = 1_800_000_000;

    fn setup() -> &'static (JwtSigner, JwtBundles, Policy) {
        static SETUP: OnceLock<(JwtSigner, JwtBundles, Policy)> = OnceLock::new();
        SETUP.get_or_init(|| {
            let signer = JwtSigner::generate_p256().unwrap();
            let mut bundle = JwtBundle::default();
            bundle
                .keys
                .insert(signer.kid().to_string(), signer.public_key());
            let mut bundles = JwtBundles::default();
            bundles
                .by_domain
                .insert(parse_trust_domain("example.org").unwrap(), Arc::new(bundle));
            let policy = Policy {
                audiences: vec!["users".into()],
                leeway: Duration::from_secs(30),
            };
            (signer, bundles, policy)
        })
    }

    fn good() -> &'static str {
        static GOOD: OnceLock<String> = OnceLock::new();
        GOOD.get_or_init(|| {
            let claims = serde_json::json!({"sub": "spiffe://example.org/ns/default/sa/payment", "aud": ["users"], "exp": NOW + 300});
            setup().0.sign(&serde_json::json!({"alg": "ES256", "typ": "JWT"}), &claims)
        })
    }

    fn json() -> impl Strategy<Value = Value> {
        crate::testing::any_json(vec![
            Value::from(NOW + 100),
            Value::from("users"),
            Value::from("spiffe://example.org/ns/default/sa/payment"),
            Value::from("spiffe://other.org/x"),
        ])
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn one_changed_character_is_refused(at in any::<prop::sample::Index>(), to in any::<char>()) {
            let good = good();
            let (setup, now) = (setup(), NOW);
            prop_assert!(validate(good, &setup.1, &setup.2, now).is_ok());
            let i = at.index(good.len());
            let changed = format!("{}{to}{}", &good[..i], &good[i + 1..]);
            if changed != good {
                prop_assert!(validate(&changed, &setup.1, &setup.2, now).is_err(), "accepted {}", changed);
            }
        }

        #[test]
        fn any_claims_signed_by_a_trusted_key(
            // Good values half the time, so the accepted branch runs as often as the refused.
            sub in prop_oneof![Just(Value::from("spiffe://example.org/ns/default/sa/payment")), json()],
            aud in prop_oneof![Just(Value::from("users")), Just(serde_json::json!(["x", "users"])), json()],
            exp in prop_oneof![Just(Value::from(NOW + 100)), Just(Value::from(NOW - 29)), Just(Value::from(NOW - 31)), json()],
            extra in json(),
        ) {
            let (signer, bundles, policy) = setup();
            let claims = serde_json::json!({"sub": sub, "aud": aud, "exp": exp, "x": extra});
            let token = signer.sign(&serde_json::json!({"alg": "ES256"}), &claims);
            if let Ok(v) = validate(&token, bundles, policy, NOW) {
                prop_assert_eq!(Some(v.sub.as_str()), sub.as_str());
                prop_assert_eq!(v.spiffe_id.trust_domain_name(), "example.org");
                let auds: Vec<&Value> = match &aud { Value::Array(a) => a.iter().collect(), one => vec![one] };
                prop_assert!(auds.iter().any(|a| a.as_str() == Some("users")));
                prop_assert!(exp.as_f64().is_some_and(|e| e + 30.0 >= NOW as f64));
            }
        }

        #[test]
        fn noise(token in prop_oneof![
            any::<String>(),
            "[A-Za-z0-9_-]{0,40}\\.[A-Za-z0-9_-]{0,40}\\.[A-Za-z0-9_-]{0,40}",
            (json(), json()).prop_map(|(h, c)| format!("{}.{}.", B64.encode(h.to_string()), B64.encode(c.to_string()))),
        ]) {
            let (_, bundles, policy) = setup();
            prop_assert!(validate(&token, bundles, policy, NOW).is_err());
        }
    }
}
