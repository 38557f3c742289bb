//! The process-wide rustls crypto provider (aws-lc-rs), shared by TLS, identity loading
//! and chain verification. Its own module so that identity and TLS need not import each
//! other.
//!
//! aws-lc-rs rather than ring: it has the post-quantum hybrid X25519MLKEM768, offered
//! first (rustls' `prefer-post-quantum`), which Envoy 1.40 (BoringSSL) also negotiates by
//! default; peers without ML-KEM still get X25519 (`tests/key_exchange.rs`).
//!
//! One exception, for bulk throughput: aws-lc's wide AES-GCM needs AVX-512. On x86-64 CPUs
//! with VAES but no AVX-512 (AMD Zen 3, for one) it falls back to 128-bit AES-NI code,
//! while ring has a VAES-AVX2 AES-GCM (as BoringSSL, so Envoy, has). There the AES-GCM
//! suites' record encryption comes from ring: on such a machine a 1 MiB transfer through
//! a pair measured 15-20% more MB/s (README). Key exchange, signatures, certificates and
//! everything else stay on aws-lc-rs.

use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;
use rustls::{CipherSuite, SupportedCipherSuite};

/// The provider every rustls config and every signature check uses.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let mut provider = rustls::crypto::aws_lc_rs::default_provider();
            if AesGcm::for_this_cpu() == AesGcm::Ring {
                for suite in provider.cipher_suites.iter_mut() {
                    if let Some(ring) = ring_aes_gcm(suite.suite()) {
                        *suite = ring;
                    }
                }
            }
            // AES-128-GCM first, as BoringSSL (Envoy) orders its suites on hardware with
            // AES instructions: its key schedule hashes with SHA-256, which the CPU's SHA
            // extensions run, where AES-256-GCM's SHA-384 does not. Both stay enabled; a
            // peer that prefers AES-256-GCM gets it.
            provider
                .cipher_suites
                .sort_by_key(|s| s.suite() != CipherSuite::TLS13_AES_128_GCM_SHA256);
            Arc::new(provider)
        })
        .clone()
}

/// Which library encrypts AES-GCM records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AesGcm {
    AwsLc,
    Ring,
}

/// The x86-64 features the choice depends on.
#[derive(Debug, Clone, Copy, Default)]
struct CpuFeatures {
    vaes: bool,
    vpclmulqdq: bool,
    avx2: bool,
    /// What aws-lc requires for its AVX-512 AES-GCM: F, DQ, BW, VL and IFMA.
    avx512: bool,
}

impl AesGcm {
    /// The faster implementation on this CPU.
    pub fn for_this_cpu() -> Self {
        Self::for_features(CpuFeatures::detect())
    }

    /// ring only where it has wide AES-GCM code and aws-lc does not; on CPUs without VAES
    /// both run the same 128-bit AES-NI code, and with AVX-512 aws-lc's is the wider.
    fn for_features(f: CpuFeatures) -> Self {
        if f.vaes && f.vpclmulqdq && f.avx2 && !f.avx512 {
            AesGcm::Ring
        } else {
            AesGcm::AwsLc
        }
    }
}

impl CpuFeatures {
    #[cfg(target_arch = "x86_64")]
    fn detect() -> Self {
        use std::arch::is_x86_feature_detected as has;
        CpuFeatures {
            vaes: has!("vaes"),
            vpclmulqdq: has!("vpclmulqdq"),
            avx2: has!("avx2"),
            avx512: has!("avx512f")
                && has!("avx512dq")
                && has!("avx512bw")
                && has!("avx512vl")
                && has!("avx512ifma"),
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn detect() -> Self {
        CpuFeatures::default()
    }
}

/// ring's implementation of an AES-GCM suite; `None` for any other suite.
fn ring_aes_gcm(suite: CipherSuite) -> Option<SupportedCipherSuite> {
    const AES_GCM: [CipherSuite; 6] = [
        CipherSuite::TLS13_AES_128_GCM_SHA256,
        CipherSuite::TLS13_AES_256_GCM_SHA384,
        CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    ];
    if !AES_GCM.contains(&suite) {
        return None;
    }
    rustls::crypto::ring::ALL_CIPHER_SUITES
        .iter()
        .find(|s| s.suite() == suite)
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zen3() -> CpuFeatures {
        CpuFeatures {
            vaes: true,
            vpclmulqdq: true,
            avx2: true,
            avx512: false,
        }
    }

    #[test]
    fn ring_only_with_vaes_and_without_avx512() {
        assert_eq!(AesGcm::for_features(zen3()), AesGcm::Ring);
        let zen4 = CpuFeatures {
            avx512: true,
            ..zen3()
        };
        assert_eq!(AesGcm::for_features(zen4), AesGcm::AwsLc);
        let no_vaes = CpuFeatures {
            vaes: false,
            vpclmulqdq: false,
            ..zen3()
        };
        assert_eq!(AesGcm::for_features(no_vaes), AesGcm::AwsLc);
        assert_eq!(AesGcm::for_features(CpuFeatures::default()), AesGcm::AwsLc);
    }

    /// The provider's AES-GCM suites are the chosen library's own statics, every other
    /// suite stays aws-lc's, and the order (AES-128-GCM first) does not depend on it.
    #[test]
    fn provider_takes_aes_gcm_from_the_chosen_library() {
        let p = provider();
        assert_eq!(
            p.cipher_suites[0].suite(),
            CipherSuite::TLS13_AES_128_GCM_SHA256
        );
        let from = |lib: &[SupportedCipherSuite], s: &SupportedCipherSuite| {
            lib.iter().any(|l| match (l, s) {
                (SupportedCipherSuite::Tls13(a), SupportedCipherSuite::Tls13(b)) => {
                    std::ptr::eq(*a, *b)
                }
                (SupportedCipherSuite::Tls12(a), SupportedCipherSuite::Tls12(b)) => {
                    std::ptr::eq(*a, *b)
                }
                _ => false,
            })
        };
        for s in &p.cipher_suites {
            let ring = from(rustls::crypto::ring::ALL_CIPHER_SUITES, s);
            let aws = from(rustls::crypto::aws_lc_rs::ALL_CIPHER_SUITES, s);
            let want_ring =
                ring_aes_gcm(s.suite()).is_some() && AesGcm::for_this_cpu() == AesGcm::Ring;
            assert_eq!((ring, aws), (want_ring, !want_ring), "{:?}", s.suite());
        }
        assert_eq!(
            p.cipher_suites.len(),
            rustls::crypto::aws_lc_rs::DEFAULT_CIPHER_SUITES.len()
        );
    }
}
