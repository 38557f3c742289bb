//! The process-wide rustls crypto provider (ring), shared by TLS, identity loading and
//! chain verification. Its own module so that identity and TLS need not import each other.

use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;

/// The provider every rustls config and every signature check uses.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}
