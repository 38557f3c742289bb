//! rustls glue: SPIFFE verifiers (authentication; they ask `authz` for the decision),
//! hot-swapping certificate resolvers, and the one place that says why a handshake was
//! refused.
//!
//! Configs are built once per listener; what changes on rotation (our SVID, the
//! bundles) is read from [`IdentityState`] inside the resolver and verifier.

mod chain_cache;
mod probe;
mod resolver;
pub mod resumption;
mod verifier;

pub use probe::probe_client_config;

pub use resolver::SvidResolver;
pub use verifier::{peer_identity_of, SpiffeClientVerifier, SpiffeServerVerifier, SpiffeVerifier};

use std::io;
use std::sync::Arc;

use rustls::{CertificateError, ClientConfig, ServerConfig};

use crate::config::{TlsSpec, TlsVersion};
use crate::identity::IdentityState;

/// Why a connection was refused. `label()` is the metric label; `Display` is the log text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("no client certificate presented")]
    NoClientCertificate,
    #[error("peer certificate is not an X509-SVID: {0}")]
    NotAnSvid(crate::x509::SvidError),
    #[error("unknown trust domain {0}: no bundle held for it")]
    UnknownTrustDomain(String),
    #[error("chain invalid: {0}")]
    ChainInvalid(String),
    #[error("peer certificate expired ({0})")]
    Expired(String),
    #[error("peer certificate not yet valid ({0})")]
    NotYetValid(String),
    #[error("SPIFFE ID {0} not allowed")]
    NotAllowed(String),
    #[error("identity expired: our SVID has expired and no new one has arrived")]
    IdentityExpired,
    #[error("peer refused the handshake: alert {0}")]
    PeerAlert(String),
    #[error("TLS protocol error: {0}")]
    Protocol(String),
    #[error("handshake timed out")]
    Timeout,
    /// A TCP probe (kubelet, load balancer) or a client that gave up: not an attack,
    /// so it is logged at debug level only.
    #[error("connection closed during the handshake")]
    ClosedEarly,
}

impl Rejection {
    pub fn label(&self) -> &'static str {
        match self {
            Self::NoClientCertificate => "no_client_certificate",
            Self::NotAnSvid(_) => "not_an_svid",
            Self::UnknownTrustDomain(_) => "unknown_trust_domain",
            Self::ChainInvalid(_) => "chain_invalid",
            Self::Expired(_) => "expired",
            Self::NotYetValid(_) => "not_yet_valid",
            Self::NotAllowed(_) => "spiffe_id_not_allowed",
            Self::IdentityExpired => "identity_expired",
            Self::PeerAlert(_) => "peer_alert",
            Self::Protocol(_) => "protocol_error",
            Self::Timeout => "timeout",
            Self::ClosedEarly => "closed_during_handshake",
        }
    }

    /// Recovers the reason from the error a tokio-rustls handshake returned.
    pub fn from_handshake_error(err: &io::Error) -> Self {
        let Some(tls) = err
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
        else {
            return match err.kind() {
                io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => Self::ClosedEarly,
                _ => Self::Protocol(err.to_string()),
            };
        };
        match tls {
            rustls::Error::NoCertificatesPresented => Self::NoClientCertificate,
            rustls::Error::InvalidCertificate(CertificateError::Other(o)) => {
                o.0.downcast_ref::<Rejection>()
                    .cloned()
                    .unwrap_or_else(|| Self::ChainInvalid(o.to_string()))
            }
            rustls::Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. },
            ) => Self::Expired("peer".into()),
            rustls::Error::InvalidCertificate(other) => Self::ChainInvalid(format!("{other:?}")),
            rustls::Error::AlertReceived(alert) => Self::PeerAlert(format!("{alert:?}")),
            other => Self::Protocol(other.to_string()),
        }
    }
}

/// The key exchange group a handshake negotiated, as a metric label (a fixed set, so
/// a peer cannot grow the label space).
pub fn key_exchange_group(session: &rustls::CommonState) -> &'static str {
    use rustls::NamedGroup;
    match session.negotiated_key_exchange_group().map(|g| g.name()) {
        Some(NamedGroup::X25519MLKEM768) => "X25519MLKEM768",
        Some(NamedGroup::X25519) => "X25519",
        Some(NamedGroup::secp256r1) => "secp256r1",
        Some(NamedGroup::secp384r1) => "secp384r1",
        Some(NamedGroup::MLKEM768) => "MLKEM768",
        Some(_) => "other",
        None => "none",
    }
}

fn versions(min: TlsVersion) -> &'static [&'static rustls::SupportedProtocolVersion] {
    static ALL: &[&rustls::SupportedProtocolVersion] =
        &[&rustls::version::TLS13, &rustls::version::TLS12];
    static TLS13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
    match min {
        TlsVersion::V1_2 => ALL,
        TlsVersion::V1_3 => TLS13,
    }
}

/// Stateless tickets only (no session cache to fill), from a ticketer whose keys go
/// at every change a check depends on; or no resumption at all.
fn server_resumption(
    config: &mut ServerConfig,
    state: &Arc<IdentityState>,
    on: bool,
) -> Result<(), rustls::Error> {
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    if on {
        config.ticketer = Arc::new(resumption::EpochTicketer::new(state.clone())?);
        config.send_tls13_tickets = 1;
    } else {
        config.send_tls13_tickets = 0;
    }
    Ok(())
}

/// Server config for an inbound listener: mTLS required, SPIFFE allowlist applied.
pub fn server_config(
    state: Arc<IdentityState>,
    verifier: Arc<SpiffeVerifier>,
    tls: &TlsSpec,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let verifier = SpiffeClientVerifier(verifier);
    let mut config = ServerConfig::builder_with_provider(crate::crypto::provider())
        .with_protocol_versions(versions(tls.min_version))?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(SvidResolver::new(state.clone())));
    config.alpn_protocols = tls.alpn.clone();
    server_resumption(&mut config, &state, tls.session_resumption)?;
    Ok(Arc::new(config))
}

/// Client config for an outbound listener: presents our SVID, checks the server's ID.
pub fn client_config(
    state: Arc<IdentityState>,
    verifier: Arc<SpiffeVerifier>,
    tls: &TlsSpec,
) -> Result<Arc<ClientConfig>, rustls::Error> {
    let verifier = SpiffeServerVerifier(verifier);
    let mut config = ClientConfig::builder_with_provider(crate::crypto::provider())
        .with_protocol_versions(versions(tls.min_version))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(SvidResolver::new(state)));
    config.alpn_protocols = tls.alpn.clone();
    config.resumption = if tls.session_resumption {
        rustls::client::Resumption::store(Arc::new(resumption::EpochSessionStore::default()))
    } else {
        rustls::client::Resumption::disabled()
    };
    Ok(Arc::new(config))
}
