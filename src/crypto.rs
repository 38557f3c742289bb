//! The process-wide rustls crypto provider (aws-lc-rs), shared by TLS, identity loading
//! and chain verification. Its own module so that identity and TLS need not import each
//! other.
//!
//! aws-lc-rs rather than ring: it has the post-quantum hybrid X25519MLKEM768, offered
//! first (rustls' `prefer-post-quantum`), which Envoy 1.40 (BoringSSL) also negotiates by
//! default; peers without ML-KEM still get X25519 (`tests/key_exchange.rs`).

use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;

/// The provider every rustls config and every signature check uses.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let mut provider = rustls::crypto::aws_lc_rs::default_provider();
            // AES-128-GCM first, as BoringSSL (Envoy) orders its suites on hardware with
            // AES instructions: its key schedule hashes with SHA-256, which the CPU's SHA
            // extensions run, where AES-256-GCM's SHA-384 does not. Both stay enabled; a
            // peer that prefers AES-256-GCM gets it.
            provider
                .cipher_suites
                .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
            Arc::new(provider)
        })
        .clone()
}
