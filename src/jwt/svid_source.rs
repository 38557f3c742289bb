//! Outbound `jwt: {audience: X}`: one cached JWT-SVID per listener, fetched from the
//! identity source's [`JwtMinter`](super::JwtMinter) and refreshed at half its lifetime,
//! set as `Authorization: Bearer` on each request. An `Authorization` header the app
//! set itself is left as it is, counted and logged (SPIRE's injector does not overwrite
//! one either). No token can be had → the caller answers 503.
//!
//! Outcomes are counted in `svidcar_jwt_outbound_total{listener,outcome}`: `injected`,
//! `app_header_kept`, `fetch_failed`.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderValue};
use prometheus::IntCounterVec;

use super::JwtState;
use crate::log_limit::LogLimiter;

static OUTBOUND_LOG: LogLimiter = LogLimiter::new("outbound JWT-SVID", 10, Duration::from_secs(10));

/// Why no token could be set.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    #[error("the identity source cannot issue JWT-SVIDs")]
    NoMinter,
    #[error("fetching a JWT-SVID failed: {0}")]
    Failed(String),
    #[error("the JWT-SVID received has no usable exp")]
    NoExpiry,
}

struct Cached {
    header: HeaderValue,
    /// Unix seconds: fetch again from here on (half the lifetime).
    refresh_at: u64,
    /// Unix seconds: never sent after this.
    expires: u64,
}

/// One listener's token for one audience.
pub struct OutboundJwt {
    state: Arc<JwtState>,
    audience: String,
    listener: Arc<str>,
    current: ArcSwapOption<Cached>,
    /// One fetch at a time; the others wait for its result.
    refreshing: tokio::sync::Mutex<()>,
    outcomes: IntCounterVec,
}

impl OutboundJwt {
    pub fn new(state: Arc<JwtState>, audience: String, listener: Arc<str>) -> Self {
        Self {
            state,
            audience,
            listener,
            current: ArcSwapOption::empty(),
            refreshing: tokio::sync::Mutex::new(()),
            outcomes: crate::metrics::get().jwt_outbound.clone(),
        }
    }

    fn count(&self, outcome: &str) {
        self.outcomes
            .with_label_values(&[&*self.listener, outcome])
            .inc();
    }

    /// Sets `Authorization: Bearer` on `headers` unless the app set one.
    pub async fn apply(&self, headers: &mut HeaderMap) -> Result<(), FetchError> {
        if headers.contains_key(AUTHORIZATION) {
            self.count("app_header_kept");
            if OUTBOUND_LOG.allow("kept") {
                tracing::warn!(
                    listener = %self.listener,
                    "the app sent its own Authorization header; it is forwarded and no JWT-SVID is set"
                );
            }
            return Ok(());
        }
        match self.token().await {
            Ok(h) => {
                headers.insert(AUTHORIZATION, h);
                self.count("injected");
                Ok(())
            }
            Err(e) => {
                self.count("fetch_failed");
                if OUTBOUND_LOG.allow("failed") {
                    tracing::warn!(listener = %self.listener, audience = %self.audience, error = %e, "no JWT-SVID for the request; answering 503");
                }
                Err(e)
            }
        }
    }

    async fn token(&self) -> Result<HeaderValue, FetchError> {
        let now = super::unix_now();
        if let Some(c) = self.current.load().as_ref().filter(|c| now < c.refresh_at) {
            return Ok(c.header.clone());
        }
        let _one = self.refreshing.lock().await;
        let now = super::unix_now();
        let old = self.current.load_full();
        if let Some(c) = old.as_ref().filter(|c| now < c.refresh_at) {
            return Ok(c.header.clone());
        }
        match self.fetch(now).await {
            Ok(c) => {
                let h = c.header.clone();
                self.current.store(Some(Arc::new(c)));
                Ok(h)
            }
            // The old token is still good: use it and try again next request.
            Err(e) => match old.as_ref().filter(|c| now < c.expires) {
                Some(c) => {
                    if OUTBOUND_LOG.allow("refresh") {
                        tracing::warn!(listener = %self.listener, error = %e, "JWT-SVID refresh failed; the cached token is used until it expires");
                    }
                    Ok(c.header.clone())
                }
                None => Err(e),
            },
        }
    }

    async fn fetch(&self, now: u64) -> Result<Cached, FetchError> {
        let minter = self.state.minter().ok_or(FetchError::NoMinter)?;
        let token = minter
            .mint(&self.audience)
            .await
            .map_err(FetchError::Failed)?;
        let (iat, exp) = lifetime(&token).ok_or(FetchError::NoExpiry)?;
        let issued = iat.unwrap_or(now).min(now);
        if exp <= now {
            return Err(FetchError::Failed(
                "the JWT-SVID received has expired".into(),
            ));
        }
        let header = HeaderValue::try_from(format!("Bearer {token}"))
            .map_err(|_| FetchError::Failed("the JWT-SVID is not a valid header value".into()))?;
        Ok(Cached {
            header,
            refresh_at: issued + (exp - issued) / 2,
            expires: exp,
        })
    }
}

/// `iat` and `exp` of a token we were given (our own: read, not verified).
fn lifetime(token: &str) -> Option<(Option<u64>, u64)> {
    let claims = token.split('.').nth(1)?;
    let claims: serde_json::Value = serde_json::from_slice(&B64.decode(claims).ok()?).ok()?;
    let exp = claims.get("exp")?.as_u64()?;
    Some((claims.get("iat").and_then(|v| v.as_u64()), exp))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jwt::{JwtMinter, JwtSigner, MintFuture};
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Counting(JwtSigner, AtomicUsize, u64);

    impl JwtMinter for Counting {
        fn mint<'a>(&'a self, audience: &'a str) -> MintFuture<'a> {
            self.1.fetch_add(1, Ordering::SeqCst);
            let id = crate::spiffe::parse_spiffe_id("spiffe://example.org/a").unwrap();
            let t = self
                .0
                .mint(&id, &[audience.to_string()], Duration::from_secs(self.2));
            Box::pin(async move { t })
        }
    }

    #[tokio::test]
    async fn caches_the_token_keeps_the_apps_header_and_fails_without_a_minter() {
        let state = Arc::new(JwtState::default());
        let out = OutboundJwt::new(state.clone(), "users".into(), "l".into());
        let mut h = HeaderMap::new();
        assert!(matches!(out.apply(&mut h).await, Err(FetchError::NoMinter)));
        let minter = Arc::new(Counting(
            JwtSigner::generate_p256().unwrap(),
            AtomicUsize::new(0),
            600,
        ));
        state.set_minter(minter.clone());
        out.apply(&mut h).await.unwrap();
        let first = h.get(AUTHORIZATION).unwrap().clone();
        assert!(first.to_str().unwrap().starts_with("Bearer ey"));
        let mut h2 = HeaderMap::new();
        out.apply(&mut h2).await.unwrap();
        assert_eq!(h2.get(AUTHORIZATION), Some(&first));
        assert_eq!(minter.1.load(Ordering::SeqCst), 1, "cached until half-life");
        let mut app = HeaderMap::new();
        app.insert(AUTHORIZATION, HeaderValue::from_static("Basic eA=="));
        out.apply(&mut app).await.unwrap();
        assert_eq!(app.get(AUTHORIZATION).unwrap(), "Basic eA==");
    }

    #[tokio::test]
    async fn a_token_past_half_life_is_fetched_again() {
        let state = Arc::new(JwtState::default());
        // exp - iat = 1 s: half-life is already over at the next second boundary.
        let minter = Arc::new(Counting(
            JwtSigner::generate_p256().unwrap(),
            AtomicUsize::new(0),
            1,
        ));
        state.set_minter(minter.clone());
        let out = OutboundJwt::new(state, "users".into(), "l".into());
        out.apply(&mut HeaderMap::new()).await.unwrap();
        out.current.store(out.current.load_full().map(|c| {
            Arc::new(Cached {
                header: c.header.clone(),
                refresh_at: 0,
                expires: c.expires,
            })
        }));
        out.apply(&mut HeaderMap::new()).await.unwrap();
        assert_eq!(minter.1.load(Ordering::SeqCst), 2);
    }
}
