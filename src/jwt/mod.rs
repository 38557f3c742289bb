//! JWT-SVIDs. This module owns the JWT bundles every identity source publishes
//! ([`JwtState`]: one `ArcSwap` read per request), validation of inbound
//! `Authorization: Bearer` tokens per the JWT-SVID spec (`validate`, `inbound`), and the
//! outbound token cache (`svid_source`) that fetches or mints a JWT-SVID per audience.
//!
//! It does not know the identity sources: they hand it bundles and a [`JwtMinter`]
//! (`identity` depends on `jwt`, never the reverse).

pub mod bundle;
pub mod inbound;
pub mod signer;
pub mod svid_source;
pub mod validate;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;

pub use bundle::{JwtBundle, JwtBundles, JwtKey};
pub use inbound::InboundJwt;
pub use signer::JwtSigner;
pub use svid_source::OutboundJwt;
pub use validate::{JwtError, ValidatedJwt};

/// A minting call in flight.
pub type MintFuture<'a> = Pin<Box<dyn Future<Output = Result<String, String>> + Send + 'a>>;

/// What gives this workload JWT-SVIDs: the Workload API (`FetchJWTSVID`) or the dev CA.
pub trait JwtMinter: Send + Sync {
    /// A JWT-SVID of our identity for `audience`.
    fn mint<'a>(&'a self, audience: &'a str) -> MintFuture<'a>;
}

/// The JWT side of the identity state: bundles for validation, the minter for outbound.
#[derive(Default)]
pub struct JwtState {
    bundles: ArcSwap<JwtBundles>,
    minter: OnceLock<Arc<dyn JwtMinter>>,
}

impl JwtState {
    /// The current bundles (one atomic load).
    pub fn bundles(&self) -> arc_swap::Guard<Arc<JwtBundles>> {
        self.bundles.load()
    }

    /// Replaces every bundle at once; `from` says where they came from, for the log.
    /// The same content again is not an update.
    pub fn set_bundles(&self, next: JwtBundles, from: &str) {
        if **self.bundles.load() == next {
            return;
        }
        let gauge = &crate::metrics::get().jwt_bundle_keys;
        gauge.reset();
        let mut summary = Vec::new();
        for (td, b) in &next.by_domain {
            gauge
                .with_label_values(&[td.as_str()])
                .set(b.keys.len() as i64);
            summary.push(format!("{td}: {}", b.keys.len()));
        }
        tracing::info!(from, keys = %summary.join(", "), "JWT bundles updated");
        self.bundles.store(Arc::new(next));
    }

    /// Set once, by the identity source at start-up.
    pub fn set_minter(&self, minter: Arc<dyn JwtMinter>) {
        let _ = self.minter.set(minter);
    }

    pub fn minter(&self) -> Option<&Arc<dyn JwtMinter>> {
        self.minter.get()
    }
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
