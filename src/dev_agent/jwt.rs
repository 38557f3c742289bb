//! JWT-SVIDs for the dev agent: ES256 tokens, the JWKS bundle that verifies them, and
//! validation (signature, `aud`, `exp`, `sub` as a SPIFFE ID).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use serde_json::{json, Map, Value};

use crate::spiffe::{parse_spiffe_id, SpiffeId};

pub struct JwtIssuer {
    key: EcdsaKeyPair,
    kid: String,
    rng: SystemRandom,
}

impl JwtIssuer {
    pub fn generate() -> Result<Self, String> {
        let rng = SystemRandom::new();
        let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).map_err(|e| e.to_string())?;
        let key = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref()).map_err(|e| e.to_string())?;
        let kid_bytes: [u8; 12] = rand::random();
        Ok(Self {
            key,
            kid: B64.encode(kid_bytes),
            rng,
        })
    }

    /// A signed JWT-SVID for `sub` and `aud`, valid for `ttl`.
    pub fn mint(&self, sub: &SpiffeId, aud: &[String], ttl: Duration) -> Result<String, String> {
        let now = unix_now();
        let header = json!({"alg": "ES256", "typ": "JWT", "kid": self.kid});
        let claims =
            json!({"sub": sub.to_string(), "aud": aud, "iat": now, "exp": now + ttl.as_secs()});
        let signing_input = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let sig = self
            .key
            .sign(&self.rng, signing_input.as_bytes())
            .map_err(|e| e.to_string())?;
        Ok(format!("{signing_input}.{}", B64.encode(sig.as_ref())))
    }

    /// The JWKS document with our one public key.
    pub fn jwks(&self) -> Value {
        // Uncompressed point: 0x04 || X (32) || Y (32).
        let point = self.key.public_key().as_ref();
        json!({"keys": [{
            "kty": "EC", "crv": "P-256", "use": "jwt-svid", "kid": self.kid,
            "x": B64.encode(&point[1..33]), "y": B64.encode(&point[33..65]),
        }]})
    }

    /// Checks signature, audience and expiry; returns the subject and all claims.
    pub fn validate(
        &self,
        token: &str,
        audience: &str,
    ) -> Result<(SpiffeId, Map<String, Value>), String> {
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("not a compact JWT".into());
        };
        let header: Value = decode_json(h).ok_or("header is not base64url JSON")?;
        if header["alg"] != "ES256" {
            return Err(format!("unsupported alg {}", header["alg"]));
        }
        if header["kid"] != self.kid.as_str() {
            return Err("signed by a key not in the bundle".into());
        }
        let sig = B64.decode(s).map_err(|_| "signature is not base64url")?;
        let public = signature::UnparsedPublicKey::new(
            &signature::ECDSA_P256_SHA256_FIXED,
            self.key.public_key().as_ref(),
        );
        public
            .verify(format!("{h}.{p}").as_bytes(), &sig)
            .map_err(|_| "signature invalid")?;
        let claims: Value = decode_json(p).ok_or("claims are not base64url JSON")?;
        let Value::Object(claims) = claims else {
            return Err("claims are not an object".into());
        };
        let exp = claims
            .get("exp")
            .and_then(Value::as_u64)
            .ok_or("no exp claim")?;
        if exp <= unix_now() {
            return Err("token expired".into());
        }
        let aud_ok = match claims.get("aud") {
            Some(Value::String(a)) => a == audience,
            Some(Value::Array(list)) => list.iter().any(|a| a == audience),
            _ => false,
        };
        if !aud_ok {
            return Err(format!("audience {audience:?} not in token"));
        }
        let sub = claims
            .get("sub")
            .and_then(Value::as_str)
            .ok_or("no sub claim")?;
        let id = parse_spiffe_id(sub).map_err(|e| format!("sub: {e}"))?;
        Ok((id, claims))
    }
}

fn decode_json(part: &str) -> Option<Value> {
    serde_json::from_slice(&B64.decode(part).ok()?).ok()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// JSON → protobuf Struct, for ValidateJWTSVID's claims.
pub fn to_struct(map: Map<String, Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: map.into_iter().map(|(k, v)| (k, to_value(v))).collect(),
    }
}

fn to_value(v: Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        Value::String(s) => Kind::StringValue(s),
        Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.into_iter().map(to_value).collect(),
        }),
        Value::Object(o) => Kind::StructValue(to_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mint_and_validate() {
        let issuer = JwtIssuer::generate().unwrap();
        let id = parse_spiffe_id("spiffe://example.org/web").unwrap();
        let token = issuer
            .mint(&id, &["api".into()], Duration::from_secs(60))
            .unwrap();
        let (sub, claims) = issuer.validate(&token, "api").unwrap();
        assert_eq!(sub, id);
        assert!(claims.contains_key("exp"));
        assert!(issuer
            .validate(&token, "other")
            .unwrap_err()
            .contains("audience"));
        let mut tampered = token.clone();
        tampered.replace_range(token.len() - 3.., "AAA");
        assert!(issuer.validate(&tampered, "api").is_err());
        let other = JwtIssuer::generate().unwrap();
        assert!(other.validate(&token, "api").is_err());
        assert_eq!(issuer.jwks()["keys"][0]["crv"], "P-256");
    }
}

#[cfg(test)]
mod properties {
    //! `ValidateJWTSVID` requests as a workload may send them: any token text and
    //! audience, and a real token with one character changed. Nothing panics; no changed
    //! token validates; the claims of any JSON shape convert to a protobuf Struct.
    use super::*;
    use proptest::prelude::*;
    use std::sync::OnceLock;

    fn issuer() -> &'static (JwtIssuer, String) {
        static ISSUER: OnceLock<(JwtIssuer, String)> = OnceLock::new();
        ISSUER.get_or_init(|| {
            let issuer = JwtIssuer::generate().unwrap();
            let id = parse_spiffe_id("spiffe://example.org/web").unwrap();
            let token = issuer
                .mint(&id, &["api".into()], Duration::from_secs(600))
                .unwrap();
            (issuer, token)
        })
    }

    fn json() -> impl Strategy<Value = Value> {
        crate::testing::any_json(vec![])
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn any_request(token in prop_oneof![any::<String>(), "[A-Za-z0-9_.-]{0,80}"], audience in ".{0,10}") {
            prop_assert!(issuer().0.validate(&token, &audience).is_err());
        }

        #[test]
        fn one_changed_character(at in any::<prop::sample::Index>(), to in any::<char>()) {
            let (issuer, token) = issuer();
            prop_assert!(issuer.validate(token, "api").is_ok());
            let i = at.index(token.len());
            let changed = format!("{}{to}{}", &token[..i], &token[i + 1..]);
            if &changed != token {
                prop_assert!(issuer.validate(&changed, "api").is_err());
            }
        }

        #[test]
        fn claims_of_any_shape(claims in prop::collection::btree_map(".{0,6}", json(), 0..6)) {
            let n = claims.len();
            prop_assert_eq!(to_struct(claims.into_iter().collect()).fields.len(), n);
        }
    }
}
