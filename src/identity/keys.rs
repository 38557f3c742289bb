//! Private keys as other tools write them, and the keys the dev CA generates.
//!
//! This module owns reading a PEM private key in any of the three forms found in the
//! wild — PKCS#8 (`BEGIN PRIVATE KEY`: OpenSSL 3 `genrsa`/`genpkey`, cert-manager,
//! SPIRE), SEC1 (`BEGIN EC PRIVATE KEY`: `openssl ecparam -genkey`, `openssl ec`) and
//! PKCS#1 (`BEGIN RSA PRIVATE KEY`: `openssl genrsa -traditional`) — naming its
//! algorithm, and rewriting it as PKCS#8. PKCS#8 is the one form that rcgen signs with
//! on the ring backend and the one the Workload API carries (`x509_svid_key`), so every
//! key inside svidcar is PKCS#8 from here on. It also generates the key types the dev CA
//! mints with (`--key-type`), including RSA, which ring cannot generate.
//!
//! Errors say what is wrong in words and never carry key bytes.

use std::fmt;
use std::str::FromStr;

use pkcs8::der::asn1::{AnyRef, ObjectIdentifier, OctetStringRef};
use pkcs8::der::{Decode, Encode};
use pkcs8::{AlgorithmIdentifierRef, PrivateKeyInfoRef};
use rcgen::{KeyPair, SignatureAlgorithm};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

const ID_EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
const RSASSA_PSS: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.10");
const ED25519: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.112");
const ED448: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.113");
const X25519: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.110");
const DSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10040.4.1");
const P256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
const P384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");
const P521: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.35");
const SECP256K1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.10");

/// The RSA modulus sizes ring can sign with.
const RSA_MIN_BITS: usize = 2048;
const RSA_MAX_BITS: usize = 8192;

/// What the supported list says, in every "unsupported" error.
const SUPPORTED: &str = "EC P-256, EC P-384, RSA (2048 to 8192 bits) or Ed25519";

/// Why a private key cannot be used. Never carries key bytes.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("not PEM text ({0})")]
    NotPem(&'static str),
    /// The messages name PEM labels without the words "PRIVATE KEY": tests and log
    /// scanners take that string for leaked key material.
    #[error("no private key found: expected one PEM key block in PKCS#8, SEC1 (EC) or PKCS#1 (RSA) form")]
    NoKey,
    #[error("holds {0} private keys; expected exactly one")]
    SeveralKeys(usize),
    #[error(
        "the private key is encrypted ({0}); svidcar reads unencrypted keys only \
         (decrypt it with `openssl pkey -in KEY -out PLAIN.key`)"
    )]
    Encrypted(&'static str),
    #[error(
        "{0} key blocks are not supported; convert the key to PKCS#8 \
         (`openssl pkey -in KEY -out PKCS8.key`)"
    )]
    UnsupportedForm(String),
    #[error("the {0} private key is malformed (its DER does not parse)")]
    Malformed(&'static str),
    #[error("{0} keys are not supported; use {SUPPORTED}")]
    UnsupportedAlgorithm(String),
    #[error("the EC private key lacks its public key (written with -no_public?); write it again with `openssl ec -in KEY -out FULL.key`")]
    NoPublicKey,
    #[error("{algorithm} keys cannot be a dev CA's key; use EC P-256, EC P-384 or RSA")]
    NotForDevCa { algorithm: KeyAlgorithm },
    #[error("the {algorithm} key was refused by the crypto library: {why}")]
    Rejected {
        algorithm: KeyAlgorithm,
        why: String,
    },
    #[error("cannot generate a {0} key: {1}")]
    Generate(KeyType, String),
}

/// The algorithm (and size) of a private key we can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAlgorithm {
    EcP256,
    EcP384,
    Rsa { bits: usize },
    Ed25519,
}

impl fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::EcP256 => f.write_str("EC P-256"),
            Self::EcP384 => f.write_str("EC P-384"),
            Self::Rsa { bits } => write!(f, "RSA-{bits}"),
            Self::Ed25519 => f.write_str("Ed25519"),
        }
    }
}

impl KeyAlgorithm {
    /// The signature algorithm rcgen signs certificates with for this key. SHA-256 for
    /// RSA, as SPIRE's RSA CAs do; the hash matching the curve for ECDSA.
    fn signature_algorithm(self) -> &'static SignatureAlgorithm {
        match self {
            Self::EcP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            Self::EcP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            Self::Rsa { .. } => &rcgen::PKCS_RSA_SHA256,
            Self::Ed25519 => &rcgen::PKCS_ED25519,
        }
    }

    /// The key type a dev CA with a key of this algorithm gives its SVIDs: the CA's own
    /// family, as SPIRE does (an RSA CA mints RSA-2048 SVIDs). None: not a dev CA key.
    pub fn svid_key_type(self) -> Option<KeyType> {
        match self {
            Self::EcP256 => Some(KeyType::EcP256),
            Self::EcP384 => Some(KeyType::EcP384),
            Self::Rsa { .. } => Some(KeyType::Rsa2048),
            Self::Ed25519 => None,
        }
    }
}

/// A key type to generate: `svidcar dev-ca --key-type`, and the SVIDs a dev CA mints.
/// Spelled as SPIRE spells `ca_key_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyType {
    #[default]
    EcP256,
    EcP384,
    Rsa2048,
}

impl KeyType {
    pub const NAMES: &'static str = "ec-p256, ec-p384, rsa-2048";

    /// A fresh key pair of this type, ready for rcgen to sign with.
    pub fn generate(self) -> Result<KeyPair, KeyError> {
        let gen_err = |e: &dyn fmt::Display| KeyError::Generate(self, e.to_string());
        match self {
            Self::EcP256 => {
                KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| gen_err(&e))
            }
            Self::EcP384 => {
                KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).map_err(|e| gen_err(&e))
            }
            Self::Rsa2048 => {
                // ring cannot generate RSA keys; RustCrypto's `rsa` can. It only
                // generates here: every signature is made by ring through rcgen.
                use pkcs8::EncodePrivateKey;
                let key =
                    rsa::PrivateKey::new(&mut getrandom::SysRng, 2048).map_err(|e| gen_err(&e))?;
                let der = key.to_pkcs8_der().map_err(|e| gen_err(&e))?;
                KeyPair::from_pkcs8_der_and_sign_algo(
                    &PrivatePkcs8KeyDer::from(der.as_bytes()),
                    &rcgen::PKCS_RSA_SHA256,
                )
                .map_err(|e| gen_err(&e))
            }
        }
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::EcP256 => "ec-p256",
            Self::EcP384 => "ec-p384",
            Self::Rsa2048 => "rsa-2048",
        })
    }
}

impl FromStr for KeyType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ec-p256" => Ok(Self::EcP256),
            "ec-p384" => Ok(Self::EcP384),
            "rsa-2048" => Ok(Self::Rsa2048),
            other => Err(format!(
                "unknown key type {other:?}; one of {}",
                Self::NAMES
            )),
        }
    }
}

/// A private key read from PEM, rewritten as PKCS#8, with its algorithm known.
pub struct PrivateKey {
    pkcs8: Vec<u8>,
    pub algorithm: KeyAlgorithm,
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrivateKey")
            .field("algorithm", &self.algorithm)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl PrivateKey {
    /// Reads the one private key in PEM text. Other blocks (`EC PARAMETERS`, which
    /// `openssl ecparam -genkey` writes first; certificates) are skipped.
    pub fn from_pem(bytes: &[u8]) -> Result<Self, KeyError> {
        let blocks = ::pem::parse_many(bytes).map_err(|e| KeyError::NotPem(pem_problem(&e)))?;
        if blocks.is_empty() && bytes.first() == Some(&0x30) {
            // A DER SEQUENCE: the right key, in the wrong encoding.
            return Err(KeyError::NotPem(
                "it looks like binary DER; convert it with `openssl pkey -inform DER -in KEY -out PEM.key`",
            ));
        }
        let mut keys = Vec::new();
        for block in &blocks {
            let encrypted = block
                .headers()
                .get("Proc-Type")
                .is_some_and(|v| v.contains("ENCRYPTED"));
            match block.tag() {
                "ENCRYPTED PRIVATE KEY" => {
                    return Err(KeyError::Encrypted(
                        "a PKCS#8 EncryptedPrivateKeyInfo block",
                    ))
                }
                "PRIVATE KEY" | "EC PRIVATE KEY" | "RSA PRIVATE KEY" if encrypted => {
                    return Err(KeyError::Encrypted(
                        "legacy PEM encryption, Proc-Type: 4,ENCRYPTED",
                    ))
                }
                "PRIVATE KEY" => keys.push(Self::from_pkcs8(block.contents())),
                "EC PRIVATE KEY" => keys.push(Self::from_sec1(block.contents())),
                "RSA PRIVATE KEY" => keys.push(Self::from_pkcs1(block.contents())),
                other if other.ends_with(" PRIVATE KEY") => {
                    let form = other.trim_end_matches(" PRIVATE KEY");
                    return Err(KeyError::UnsupportedForm(form.to_string()));
                }
                _ => {}
            }
        }
        match keys.len() {
            0 => Err(KeyError::NoKey),
            1 => keys.swap_remove(0),
            n => Err(KeyError::SeveralKeys(n)),
        }
    }

    /// PKCS#8 (RFC 5208/5958): taken as it is once its algorithm is known.
    fn from_pkcs8(der: &[u8]) -> Result<Self, KeyError> {
        let info = PrivateKeyInfoRef::from_der(der).map_err(|_| KeyError::Malformed("PKCS#8"))?;
        let alg = info.algorithm.oid;
        let algorithm = if alg == ID_EC_PUBLIC_KEY {
            let curve = info
                .algorithm
                .parameters
                .and_then(|p| p.decode_as::<ObjectIdentifier>().ok())
                .ok_or(KeyError::Malformed("PKCS#8 EC"))?;
            ec_curve(curve)?
        } else if alg == RSA_ENCRYPTION {
            rsa_algorithm(info.private_key.as_bytes())?
        } else if alg == ED25519 {
            KeyAlgorithm::Ed25519
        } else {
            return Err(KeyError::UnsupportedAlgorithm(algorithm_name(alg)));
        };
        Ok(Self {
            pkcs8: der.to_vec(),
            algorithm,
        })
    }

    /// SEC1 (RFC 5915): wrapped into PKCS#8 with the curve its parameters name.
    fn from_sec1(der: &[u8]) -> Result<Self, KeyError> {
        let key = sec1::EcPrivateKey::try_from(der).map_err(|_| KeyError::Malformed("SEC1 EC"))?;
        let curve =
            key.parameters
                .and_then(|p| p.named_curve())
                .ok_or(KeyError::UnsupportedAlgorithm(
                    "EC keys without a named curve".into(),
                ))?;
        let algorithm = ec_curve(curve)?;
        if key.public_key.is_none() {
            return Err(KeyError::NoPublicKey);
        }
        let pkcs8 = wrap(ID_EC_PUBLIC_KEY, Some(AnyRef::from(&curve)), der)?;
        Ok(Self { pkcs8, algorithm })
    }

    /// PKCS#1 (RFC 8017): wrapped into PKCS#8 as rsaEncryption.
    fn from_pkcs1(der: &[u8]) -> Result<Self, KeyError> {
        let algorithm = rsa_algorithm(der)?;
        let pkcs8 = wrap(RSA_ENCRYPTION, Some(AnyRef::NULL), der)?;
        Ok(Self { pkcs8, algorithm })
    }

    /// The key as rustls takes it. Never log it.
    pub fn to_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.pkcs8.clone()))
    }

    /// The key as rcgen signs with it, for a dev CA: EC P-256, EC P-384 or RSA.
    pub fn to_ca_key_pair(&self) -> Result<(KeyPair, KeyType), KeyError> {
        let svid_type = self
            .algorithm
            .svid_key_type()
            .ok_or(KeyError::NotForDevCa {
                algorithm: self.algorithm,
            })?;
        let pair = KeyPair::from_pkcs8_der_and_sign_algo(
            &PrivatePkcs8KeyDer::from(self.pkcs8.as_slice()),
            self.algorithm.signature_algorithm(),
        )
        .map_err(|e| KeyError::Rejected {
            algorithm: self.algorithm,
            why: e.to_string(),
        })?;
        Ok((pair, svid_type))
    }
}

/// PrivateKeyInfo { version 0, algorithm, privateKey OCTET STRING } around `inner`.
fn wrap(
    oid: ObjectIdentifier,
    parameters: Option<AnyRef<'_>>,
    inner: &[u8],
) -> Result<Vec<u8>, KeyError> {
    let octets = OctetStringRef::new(inner).map_err(|_| KeyError::Malformed("wrapped"))?;
    PrivateKeyInfoRef::new(AlgorithmIdentifierRef { oid, parameters }, octets)
        .to_der()
        .map_err(|_| KeyError::Malformed("wrapped"))
}

fn ec_curve(curve: ObjectIdentifier) -> Result<KeyAlgorithm, KeyError> {
    if curve == P256 {
        Ok(KeyAlgorithm::EcP256)
    } else if curve == P384 {
        Ok(KeyAlgorithm::EcP384)
    } else if curve == P521 {
        Err(KeyError::UnsupportedAlgorithm("EC P-521".into()))
    } else if curve == SECP256K1 {
        Err(KeyError::UnsupportedAlgorithm("EC secp256k1".into()))
    } else {
        Err(KeyError::UnsupportedAlgorithm(format!("EC curve {curve}")))
    }
}

/// Names the RSA key's size from its PKCS#1 modulus; refuses sizes ring cannot sign with.
fn rsa_algorithm(pkcs1_der: &[u8]) -> Result<KeyAlgorithm, KeyError> {
    let key = pkcs1::RsaPrivateKeyRef::from_der(pkcs1_der)
        .map_err(|_| KeyError::Malformed("PKCS#1 RSA"))?;
    let n = key.modulus.as_bytes();
    let bits = match n.first() {
        Some(&top) => (n.len() - 1) * 8 + (8 - top.leading_zeros() as usize),
        None => 0,
    };
    if !(RSA_MIN_BITS..=RSA_MAX_BITS).contains(&bits) {
        return Err(KeyError::UnsupportedAlgorithm(format!("RSA-{bits}")));
    }
    Ok(KeyAlgorithm::Rsa { bits })
}

fn algorithm_name(oid: ObjectIdentifier) -> String {
    let name = if oid == RSASSA_PSS {
        "RSA-PSS"
    } else if oid == ED448 {
        "Ed448"
    } else if oid == X25519 {
        "X25519"
    } else if oid == DSA {
        "DSA"
    } else {
        return format!("algorithm {oid}");
    };
    name.to_string()
}

/// Says what is wrong with PEM text in words, never echoing its contents.
fn pem_problem(e: &::pem::PemError) -> &'static str {
    use ::pem::PemError as E;
    match e {
        E::MismatchedTags(..) => "a BEGIN line and its END line name different blocks",
        E::MissingBeginTag => "a block has no BEGIN line",
        E::MissingEndTag => "a block has no END line",
        E::MissingData => "a block is empty",
        E::InvalidData(_) => "a block is not valid base64",
        E::InvalidHeader(_) => "a block has a malformed header",
        E::NotUtf8(_) => "not UTF-8 text",
        _ => "malformed PEM",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_read_back_with_their_algorithm() {
        for (t, alg) in [
            (KeyType::EcP256, KeyAlgorithm::EcP256),
            (KeyType::EcP384, KeyAlgorithm::EcP384),
            (KeyType::Rsa2048, KeyAlgorithm::Rsa { bits: 2048 }),
        ] {
            let pem = t.generate().unwrap().serialize_pem();
            let key = PrivateKey::from_pem(pem.as_bytes()).unwrap();
            assert_eq!(key.algorithm, alg);
            assert_eq!(key.to_ca_key_pair().unwrap().1, t);
        }
    }

    #[test]
    fn key_types_parse_as_spire_spells_them() {
        assert_eq!("rsa-2048".parse::<KeyType>().unwrap(), KeyType::Rsa2048);
        assert!("rsa-1024"
            .parse::<KeyType>()
            .unwrap_err()
            .contains("ec-p256, ec-p384, rsa-2048"));
    }

    #[test]
    fn garbage_and_empty_text_say_no_key() {
        assert!(matches!(
            PrivateKey::from_pem(b"hello"),
            Err(KeyError::NoKey)
        ));
        assert!(matches!(
            PrivateKey::from_pem(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"),
            Err(KeyError::Malformed("PKCS#8"))
        ));
    }
}

#[cfg(test)]
mod properties {
    //! Key files as an attacker or a broken tool writes them: real keys with bytes
    //! flipped, cut or inserted, under every PEM label, and plain noise. Reading one
    //! never panics, and no error message carries any piece of the key's text.
    use super::*;
    use base64::Engine;
    use proptest::prelude::*;
    use std::sync::OnceLock;

    fn keys() -> &'static [Vec<u8>] {
        static KEYS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
        KEYS.get_or_init(|| {
            [KeyType::EcP256, KeyType::EcP384, KeyType::Rsa2048]
                .iter()
                .map(|t| t.generate().unwrap().serialize_der())
                .collect()
        })
    }

    const LABELS: &[&str] = &[
        "PRIVATE KEY",
        "EC PRIVATE KEY",
        "RSA PRIVATE KEY",
        "ENCRYPTED PRIVATE KEY",
        "DSA PRIVATE KEY",
        "CERTIFICATE",
        "EC PARAMETERS",
    ];

    fn pem(label: &str, der: &[u8]) -> String {
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        format!(
            "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
            lines.join("\n")
        )
    }

    fn check(text: &[u8], der: &[u8]) -> Result<(), TestCaseError> {
        match PrivateKey::from_pem(text) {
            Ok(key) => {
                // Whatever was accepted can be handed on without a panic.
                let _ = key.to_ca_key_pair();
                let _ = format!("{key:?}");
            }
            Err(e) => {
                let msg = e.to_string();
                let b64 = base64::engine::general_purpose::STANDARD.encode(der);
                for w in b64.as_bytes().windows(16).step_by(4) {
                    let w = std::str::from_utf8(w).unwrap();
                    prop_assert!(!msg.contains(w), "key text in the error: {}", msg);
                }
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn mangled_keys(
            which in 0..3usize,
            label in prop::sample::select(LABELS),
            flips in prop::collection::vec((any::<prop::sample::Index>(), 1..=255u8), 0..4),
            cut in prop::option::of(any::<prop::sample::Index>()),
            before in prop::sample::select(&["", "-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n-----END EC PARAMETERS-----\n", "junk\n"][..]),
        ) {
            let mut der = keys()[which].clone();
            for (i, x) in &flips {
                let i = i.index(der.len());
                der[i] ^= x;
            }
            if let Some(c) = cut {
                der.truncate(c.index(der.len()));
            }
            let text = format!("{before}{}", pem(label, &der));
            check(text.as_bytes(), &der)?;
        }

        /// PEM armour mangled as text: lines cut, labels that disagree, noise.
        #[test]
        fn mangled_text(which in 0..3usize, cut in any::<prop::sample::Index>(), noise in prop::collection::vec(any::<u8>(), 0..40), at in any::<prop::sample::Index>()) {
            let der = &keys()[which];
            let mut text = pem("PRIVATE KEY", der).into_bytes();
            let i = at.index(text.len());
            text.splice(i..i, noise);
            text.truncate(cut.index(text.len() + 1).max(1));
            check(&text, der)?;
        }

        #[test]
        fn noise(text in prop::collection::vec(any::<u8>(), 0..600)) {
            let _ = PrivateKey::from_pem(&text);
        }
    }

    #[test]
    fn the_unmangled_keys_are_read() {
        for der in keys() {
            assert!(PrivateKey::from_pem(pem("PRIVATE KEY", der).as_bytes()).is_ok());
        }
    }
}
