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
        // RFC 6750: the scheme is case-insensitive; `Bearer` alone is an empty token.
        let bearer = bytes.len() >= 6
            && bytes[..6].eq_ignore_ascii_case(b"bearer")
            && bytes.get(6).is_none_or(|b| *b == b' ');
        if !bearer {
            // Another scheme (Basic, say) is the app's business unless a JWT is required.
            return if self.required {
                Err(JwtError::Malformed("Authorization is not a Bearer token"))
            } else {
                Ok(None)
            };
        }
        let token = std::str::from_utf8(bytes.get(7..).unwrap_or_default())
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

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn check(required: bool, values: &[&'static str]) -> Result<bool, &'static str> {
        let j = InboundJwt::new(
            Arc::default(),
            vec!["users".into()],
            required,
            Duration::from_secs(30),
            "l".into(),
        );
        let mut h = HeaderMap::new();
        for v in values {
            h.append(AUTHORIZATION, HeaderValue::from_static(v));
        }
        j.check(&h, None)
            .map(|v| v.is_some())
            .map_err(|e| e.label())
    }

    #[test]
    fn reads_the_authorization_header_as_rfc_6750_says() {
        assert_eq!(check(false, &[]), Ok(false));
        assert_eq!(check(true, &[]), Err("missing"));
        assert_eq!(check(false, &["Basic dXNlcjpwdw=="]), Ok(false));
        assert_eq!(check(true, &["Basic dXNlcjpwdw=="]), Err("malformed"));
        assert_eq!(check(false, &["Bearer"]), Err("malformed"));
        assert_eq!(check(false, &["Bearer "]), Err("malformed"));
        assert_eq!(check(false, &["bearer a.b.c"]), Err("malformed"));
        assert_eq!(check(false, &["Bearerx a.b.c"]), Ok(false));
        assert_eq!(
            check(false, &["Bearer a.b.c", "Bearer a.b.c"]),
            Err("malformed")
        );
    }
}
