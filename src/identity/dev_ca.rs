//! The `dev` identity source: an in-process CA for one trust domain that mints an SVID
//! with the CA's own key algorithm (EC P-256, EC P-384 or RSA-2048) and re-mints it at
//! half-life. For laptops, demos and tests; the same CA can be loaded by several
//! processes so they share a trust domain.
//!
//! Loading a CA never writes anything: `svidcar check` loads it too. Only
//! [`DevSource::start`], on the `run` path, writes `bundle_out`.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::keys::KeyType;
use tokio_util::sync::CancellationToken;

use super::{pem, Bundle, IdentityError, IdentityState, IdentityUpdate, Svid};
use crate::config::DevConfig;
use crate::spiffe::{SpiffeId, TrustDomain};

/// Clock skew allowance: certificates are valid from a little before they are minted.
const BACKDATE: Duration = Duration::from_secs(30);

/// A CA that can sign SVIDs for one trust domain.
pub struct DevCa {
    trust_domain: TrustDomain,
    /// SVIDs must not outlive their CA.
    not_after: SystemTime,
    issuer: Issuer<'static, KeyPair>,
    cert: CertificateDer<'static>,
    /// What the SVIDs' keys are: the CA's own family, as SPIRE does.
    svid_key_type: KeyType,
}

impl DevCa {
    /// Creates a fresh self-signed EC P-256 CA valid for `lifetime`.
    pub fn generate(trust_domain: &TrustDomain, lifetime: Duration) -> Result<Self, IdentityError> {
        Self::generate_with(trust_domain, lifetime, KeyType::EcP256)
    }

    /// Creates a fresh self-signed CA valid for `lifetime` whose key (and so its SVIDs'
    /// keys) is of `key_type`.
    pub fn generate_with(
        trust_domain: &TrustDomain,
        lifetime: Duration,
        key_type: KeyType,
    ) -> Result<Self, IdentityError> {
        let key = key_type.generate().map_err(dev_err)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "svidcar dev CA");
        dn.push(DnType::CommonName, trust_domain.as_str());
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.subject_alt_names = vec![SanType::URI(
            trust_domain.id_string().try_into().map_err(dev_err)?,
        )];
        let now = SystemTime::now();
        let not_after = later(now, lifetime)?;
        params.not_before = (now - BACKDATE).into();
        params.not_after = not_after.into();
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key).map_err(dev_err)?;
        Ok(Self {
            trust_domain: trust_domain.clone(),
            not_after,
            cert: cert.der().clone(),
            issuer: Issuer::new(params, key),
            svid_key_type: key_type,
        })
    }

    /// Loads a CA from PEM files: a certificate, and its key as PKCS#8, SEC1 or PKCS#1
    /// (EC P-256, EC P-384 or RSA).
    pub fn load(
        trust_domain: &TrustDomain,
        cert: &Path,
        key: &Path,
    ) -> Result<Self, IdentityError> {
        let cert_der = pem::load_certs(cert)?.swap_remove(0);
        if !crate::x509::is_ca(&cert_der) {
            return Err(IdentityError::File {
                path: cert.display().to_string(),
                problem: "not a CA certificate (basicConstraints cA is not true)".into(),
            });
        }
        let (key_pair, svid_key_type) =
            pem::load_private_key(key)?
                .to_ca_key_pair()
                .map_err(|e| IdentityError::File {
                    path: key.display().to_string(),
                    problem: e.to_string(),
                })?;
        let issuer = Issuer::from_ca_cert_der(&cert_der, key_pair).map_err(dev_err)?;
        let not_after =
            crate::x509::not_after_of(&cert_der).ok_or_else(|| IdentityError::File {
                path: cert.display().to_string(),
                problem: "cannot read notAfter".into(),
            })?;
        let ca = Self {
            trust_domain: trust_domain.clone(),
            not_after,
            issuer,
            cert: cert_der,
            svid_key_type,
        };
        // Prove the key belongs to the certificate before anyone trusts what it signs.
        // The probe's own key is P-256 whatever the CA's: only the CA's signature is
        // checked, and an RSA key would cost a keygen.
        let probe = ca.mint_with(
            &SpiffeId::from_segments(trust_domain.clone(), &["probe"]).map_err(dev_err)?,
            Duration::from_secs(60),
            KeyType::EcP256,
        )?;
        let anchor = Bundle::new(trust_domain.clone(), vec![ca.cert.clone()])?;
        let leaf = crate::x509::LeafInfo::parse(&probe.chain[0]).map_err(dev_err)?;
        crate::x509::verify_chain(
            crate::crypto::provider()
                .signature_verification_algorithms
                .all,
            &leaf,
            &probe.chain[0],
            &[],
            anchor.trust(),
            rustls_pki_types::UnixTime::now(),
            webpki::KeyUsage::client_auth(),
        )
        .map_err(|e| match e {
            // The certificate itself is out of date; the key may well be right.
            crate::x509::ChainError::RootExpired { .. }
            | crate::x509::ChainError::RootNotYetValid { .. } => IdentityError::File {
                path: cert.display().to_string(),
                problem: format!("the CA certificate is not usable now: {e}"),
            },
            _ => IdentityError::File {
                path: key.display().to_string(),
                problem: format!("key does not match the CA certificate {}", cert.display()),
            },
        })?;
        Ok(ca)
    }

    /// The CA certificate and key as PEM, to share the CA with another process.
    pub fn to_pem(&self) -> (String, String) {
        (
            pem::encode_certs(std::slice::from_ref(&self.cert)),
            self.issuer.key().serialize_pem(),
        )
    }

    /// A JWT-SVID signer on the CA's own key: every process that loads this CA mints
    /// under the same key ID and can validate the others' tokens.
    pub fn jwt_signer(&self) -> Result<crate::jwt::JwtSigner, IdentityError> {
        crate::jwt::JwtSigner::from_pkcs8(&self.issuer.key().serialize_der())
            .map_err(|e| IdentityError::DevCa(format!("JWT signing key: {e}")))
    }

    pub fn bundle(&self) -> Result<Bundle, IdentityError> {
        Bundle::new(self.trust_domain.clone(), vec![self.cert.clone()])
    }

    /// Mints an X509-SVID for `id`, valid for `ttl`, with a key of the CA's family.
    /// An RSA key takes a keygen of a few hundred milliseconds: call it off the async
    /// workers.
    pub fn mint(&self, id: &SpiffeId, ttl: Duration) -> Result<Svid, IdentityError> {
        self.mint_with(id, ttl, self.svid_key_type)
    }

    fn mint_with(
        &self,
        id: &SpiffeId,
        ttl: Duration,
        key_type: KeyType,
    ) -> Result<Svid, IdentityError> {
        let key = key_type.generate().map_err(dev_err)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "svidcar");
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into().map_err(dev_err)?)];
        // basicConstraints cA=false, written out: SPIFFE clients (the Python `spiffe`
        // package among them) refuse a leaf without the extension.
        params.is_ca = IsCa::ExplicitNoCa;
        // keyAgreement means something for EC keys only, keyEncipherment for RSA keys
        // only; both stay allowed for EC as before (X509-SVID spec: MAY).
        params.key_usages = match key_type {
            KeyType::Rsa2048 => vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ],
            KeyType::EcP256 | KeyType::EcP384 => vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
                KeyUsagePurpose::KeyAgreement,
            ],
        };
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = SystemTime::now();
        let not_after = later(now, ttl)?;
        if not_after > self.not_after {
            return Err(IdentityError::DevCa(format!(
                "an SVID valid for {} would outlive the CA (valid until {})",
                humantime::format_duration(ttl),
                humantime::format_rfc3339_seconds(self.not_after)
            )));
        }
        params.not_before = (now - BACKDATE).into();
        params.not_after = not_after.into();
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer).map_err(dev_err)?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Svid::new(vec![cert.der().clone()], key_der)
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // positive INTEGER
    bytes[0] |= 0x01; // and never shortened by leading zeros
    SerialNumber::from_slice(&bytes)
}

fn later(now: SystemTime, d: Duration) -> Result<SystemTime, IdentityError> {
    now.checked_add(d).ok_or_else(|| {
        IdentityError::DevCa(format!(
            "{} is too far in the future",
            humantime::format_duration(d)
        ))
    })
}

fn dev_err(e: impl std::fmt::Display) -> IdentityError {
    IdentityError::DevCa(e.to_string())
}

/// How long a dev JWT-SVID is valid (SPIRE's default JWT-SVID TTL).
const JWT_TTL: Duration = Duration::from_secs(300);

/// The running `dev` source.
pub struct DevSource {
    ca: DevCa,
    spiffe_id: SpiffeId,
    ttl: Duration,
    jwt: Arc<crate::jwt::JwtSigner>,
}

/// Mints our JWT-SVIDs with the dev CA's key.
struct DevJwtMinter {
    signer: Arc<crate::jwt::JwtSigner>,
    spiffe_id: SpiffeId,
}

impl crate::jwt::JwtMinter for DevJwtMinter {
    fn mint<'a>(&'a self, audience: &'a str) -> crate::jwt::MintFuture<'a> {
        let token = self
            .signer
            .mint(&self.spiffe_id, &[audience.to_string()], JWT_TTL);
        Box::pin(async move { token })
    }
}

impl DevSource {
    /// Loads (or generates) the CA and mints the first SVID. No side effects: `svidcar
    /// check` calls this, and must not overwrite the bundle that running peers trust.
    pub fn load(config: &DevConfig) -> Result<(Self, IdentityUpdate), IdentityError> {
        let ca = match &config.ca {
            Some((cert, key)) => DevCa::load(&config.trust_domain, cert, key)?,
            // A generated CA outlives its SVIDs comfortably.
            None => DevCa::generate(
                &config.trust_domain,
                Duration::from_secs(365 * 24 * 3600).max(config.svid_ttl * 4),
            )?,
        };
        let source = Self {
            jwt: Arc::new(ca.jwt_signer()?),
            ca,
            spiffe_id: config.spiffe_id.clone(),
            ttl: config.svid_ttl,
        };
        let update = source.update()?;
        Ok((source, update))
    }

    /// As [`DevSource::load`], then publishes the CA to `bundle_out` for peers to trust:
    /// the `run` path only.
    pub fn start(config: &DevConfig) -> Result<(Self, IdentityUpdate), IdentityError> {
        let (source, update) = Self::load(config)?;
        if let Some(out) = &config.bundle_out {
            crate::atomic_file::write(out, source.ca.to_pem().0.as_bytes(), 0o644).map_err(
                |e| IdentityError::File {
                    path: out.display().to_string(),
                    problem: format!("cannot write: {e}"),
                },
            )?;
        }
        Ok((source, update))
    }

    /// The CA's JWT key is the JWT bundle of our trust domain; we mint with it.
    pub fn install_jwt(&self, jwt: &crate::jwt::JwtState) {
        let mut bundle = crate::jwt::JwtBundle::default();
        bundle
            .keys
            .insert(self.jwt.kid().to_string(), self.jwt.public_key());
        let mut bundles = crate::jwt::JwtBundles::default();
        bundles
            .by_domain
            .insert(self.spiffe_id.trust_domain().clone(), Arc::new(bundle));
        jwt.set_bundles(bundles, "dev CA");
        jwt.set_minter(Arc::new(DevJwtMinter {
            signer: self.jwt.clone(),
            spiffe_id: self.spiffe_id.clone(),
        }));
    }

    fn update(&self) -> Result<IdentityUpdate, IdentityError> {
        Ok(IdentityUpdate {
            svids: vec![Arc::new(self.ca.mint(&self.spiffe_id, self.ttl)?)],
            bundles: vec![Arc::new(self.ca.bundle()?)],
        })
    }

    /// Re-mints at half-life until cancelled.
    /// Minting runs on the blocking pool: an RSA keygen would stall an async worker.
    pub async fn run(self, state: Arc<IdentityState>, shutdown: CancellationToken) {
        let half_life = self.ttl / 2;
        let this = Arc::new(self);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(half_life) => {}
            }
            let minter = this.clone();
            match tokio::task::spawn_blocking(move || minter.update()).await {
                Ok(Ok(update)) => {
                    state.publish(update);
                }
                Ok(Err(e)) => tracing::error!(error = %e, "dev CA could not mint a new SVID"),
                Err(e) => tracing::error!(error = %e, "dev CA minting task failed"),
            }
        }
    }
}
