//! Inbound `jwt:` on an HTTP listener: reads `Authorization: Bearer`, validates the
//! token against the current JWT bundles, and on refusal counts the reason
//! (`svidcar_jwt_refused_total{listener,reason}`) and logs it, rate-limited, without the
//! token. The header itself is left for the app (as Envoy's `jwt_authn` does by default).

use std::sync::Arc;
use std::time::Duration;

use http::header::AUTHORIZATION;
use http::HeaderMap;
use prometheus::IntCounterVec;

use super::validate::{validate, JwtError, Policy, ValidatedJwt};
use super::JwtState;
use crate::log_limit::LogLimiter;

/// Callers cause refusals, so their log lines are rate-limited; the metric counts all.
static REFUSED_LOG: LogLimiter = LogLimiter::new("JWT-SVID refused", 20, Duration::from_secs(10));

/// One listener's JWT-SVID check.
pub struct InboundJwt {
    state: Arc<JwtState>,
    policy: Policy,
    required: bool,
    listener: Arc<str>,
    refused: IntCounterVec,
}

impl InboundJwt {
    pub fn new(
        state: Arc<JwtState>,
        audiences: Vec<String>,
        required: bool,
        leeway: Duration,
        listener: Arc<str>,
    ) -> Self {
        Self {
            state,
            policy: Policy { audiences, leeway },
            required,
            listener,
            refused: crate::metrics::get().jwt_refused.clone(),
        }
    }

    /// `Ok(Some)` for a valid token, `Ok(None)` when there is none (or another scheme)
    /// and none is required, `Err` (already logged and counted) to answer 401.
    /// `caller` is the mTLS peer, for the log.
    pub fn check(
        &self,
        headers: &HeaderMap,
        caller: Option<&str>,
    ) -> Result<Option<ValidatedJwt>, JwtError> {
        let result = self.read(headers);
        if let Err(e) = &result {
            self.refused
                .with_label_values(&[&*self.listener, e.label()])
                .inc();
            if REFUSED_LOG.allow(e.label()) {
                tracing::warn!(
                    listener = %self.listener,
                    caller = caller.unwrap_or("-"),
                    reason = e.label(),
                    "JWT-SVID refused: {e}"
                );
            }
        }
        result
    }

    fn read(&self, headers: &HeaderMap) -> Result<Option<ValidatedJwt>, JwtError> {
        let mut values = headers.get_all(AUTHORIZATION).iter();
        let (value, more) = (values.next(), values.next().is_some());
        if more {
            return Err(JwtError::Malformed("more than one Authorization header"));
        }
        let Some(value) = value else {
            return if self.required {
                Err(JwtError::Missing)
            } else {
                Ok(None)
            };
        };
        let bytes = value.as_bytes();
        let bearer = bytes.len() > 7 && bytes[..7].eq_ignore_ascii_case(b"bearer ");
        if !bearer {
            // Another scheme (Basic, say) is the app's business unless a JWT is required.
            return if self.required {
                Err(JwtError::Malformed("Authorization is not a Bearer token"))
            } else {
                Ok(None)
            };
        }
        let token = std::str::from_utf8(&bytes[7..])
            .map_err(|_| JwtError::Malformed("token is not ASCII"))?
            .trim();
        validate(
            token,
            &self.state.bundles(),
            &self.policy,
            super::unix_now(),
        )
        .map(Some)
    }
}
