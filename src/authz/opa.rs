//! An external OPA asked for each request (`opa: {url, timeout, on_error}`), for
//! deployments that already run OPA beside the app (the seed documents' layout). This
//! module owns the REST client (OPA's Data API: `POST /v1/data/<rule>` with
//! `{"input": ...}`), turning its answer into the same [`Decision`] the in-process Rego
//! gives, and what a failure to get an answer decides (`on_error`).
//!
//! The input is the one [`Input::build`] makes for the in-process engine, so one policy
//! decides the same in both places. The `result` OPA returns is read by
//! [`Decision::from_result`]: a boolean, or OPA-Envoy's object (`allowed`,
//! `http_status`, `headers`, `body`); no `result` (the rule is undefined for this input)
//! denies.
//!
//! With `rego:` and `opa:` both set, both must allow: the in-process policy is asked
//! first (it is cheap and never waits), and OPA only for requests it allowed.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use prometheus::IntCounterVec;
use serde_json::Value as Json;

pub use super::opa_error::OpaError;
use super::rego::{Decision, DenyReason, Input, InputKeys, RegoAuthorizer, RequestView};
use crate::log_limit::LogLimiter;

/// OPA failures: they come in bursts when OPA is down, so the log is rate-limited; the
/// metric counts every one.
static ERROR_LOG: LogLimiter = LogLimiter::new("OPA not usable", 10, Duration::from_secs(10));

/// The largest answer read from OPA. A decision is a few hundred bytes; an answer this
/// large is a mistake (a query for the whole `data` document), not a decision.
const MAX_ANSWER: usize = 1024 * 1024;

/// How long an unused connection to OPA is kept for the next request.
const POOL_IDLE: Duration = Duration::from_secs(60);

/// What a failure to get a decision from OPA decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnError {
    /// Fail closed: the request is refused with a plain 403.
    #[default]
    Deny,
    /// Fail open: the request goes on as if OPA had allowed it.
    Allow,
}

/// One `opa:` setting, checked by the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpaSettings {
    /// An `http://` URL naming the rule under OPA's Data API.
    pub url: Uri,
    /// The whole exchange: connect, send, read the answer.
    pub timeout: Duration,
    pub on_error: OnError,
}

/// The client of one listener (or transparent port): pooled connections to OPA.
/// Cloning shares the pool.
#[derive(Clone)]
pub struct OpaClient {
    inner: Arc<Inner>,
}

struct Inner {
    settings: OpaSettings,
    client: Client<HttpConnector, Full<Bytes>>,
    listener: Arc<str>,
    errors: IntCounterVec,
}

impl std::fmt::Debug for OpaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpaClient")
            .field("url", &self.inner.settings.url)
            .field("timeout", &self.inner.settings.timeout)
            .field("on_error", &self.inner.settings.on_error)
            .finish()
    }
}

impl OpaClient {
    /// A client for `listener`; no connection is opened until the first request.
    pub fn new(listener: Arc<str>, settings: OpaSettings) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(settings.timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        Self {
            inner: Arc::new(Inner {
                settings,
                client,
                listener,
                errors: crate::metrics::get().opa_errors.clone(),
            }),
        }
    }

    pub fn settings(&self) -> &OpaSettings {
        &self.inner.settings
    }

    /// Decides one request; never fails: an OPA that cannot answer decides what
    /// `on_error` says (logged, rate-limited, and counted by reason).
    pub async fn decide(&self, input: &Input) -> Decision {
        let s = &self.inner.settings;
        match tokio::time::timeout(s.timeout, self.ask(input)).await {
            Ok(Ok(result)) => Decision::from_result(result.as_ref()),
            Ok(Err(e)) => self.failed(e),
            Err(_) => self.failed(OpaError::Timeout(s.timeout)),
        }
    }

    fn failed(&self, e: OpaError) -> Decision {
        let i = &self.inner;
        i.errors.with_label_values(&[&i.listener, e.label()]).inc();
        if ERROR_LOG.allow(e.label()) {
            tracing::warn!(
                listener = %i.listener,
                url = %i.settings.url,
                reason = e.label(),
                on_error = ?i.settings.on_error,
                "OPA gave no decision: {e}"
            );
        }
        match i.settings.on_error {
            OnError::Deny => Decision::deny(DenyReason::Opa(e)),
            OnError::Allow => Decision::Allow {
                headers: Vec::new(),
            },
        }
    }

    /// One exchange with OPA: the `result` of its answer (`None`: undefined).
    async fn ask(&self, input: &Input) -> Result<Option<Json>, OpaError> {
        /// The Data API's request body.
        #[derive(serde::Serialize)]
        struct Ask<'a> {
            input: &'a regorus::Value,
        }
        let body = serde_json::to_vec(&Ask {
            input: input.document(),
        })
        .map_err(|e| OpaError::Connect(format!("input not serializable: {e}")))?;
        let req = Request::builder()
            .method(Method::POST)
            .uri(self.inner.settings.url.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| OpaError::Connect(e.to_string()))?;
        let res = self
            .inner
            .client
            .request(req)
            .await
            .map_err(|e| OpaError::Connect(error_chain(&e)))?;
        let status = res.status();
        if !status.is_success() {
            return Err(OpaError::Status(status));
        }
        let bytes = Limited::new(res.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| OpaError::Body(e.to_string()))?
            .to_bytes();
        match serde_json::from_slice::<Json>(&bytes) {
            Ok(Json::Object(mut answer)) => Ok(answer.remove("result")),
            Ok(_) => Err(OpaError::BadJson("not an object".into())),
            Err(e) => Err(OpaError::BadJson(e.to_string())),
        }
    }
}

/// An error and its causes on one line: hyper's outer error alone says only "client
/// error (Connect)".
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// Which policy decided a request (for the log line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decider {
    Rego,
    Opa,
}

impl std::fmt::Display for Decider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Decider::Rego => "Rego",
            Decider::Opa => "OPA",
        })
    }
}

/// The decision of the listener's policies for one request: the in-process Rego
/// policy, then OPA; both must allow. The input is built once for both. An allow
/// carries the headers both added; a refusal says which policy refused.
pub async fn decide_request(
    rego: Option<&RegoAuthorizer>,
    opa: Option<&OpaClient>,
    view: &RequestView<'_>,
) -> (Decision, Decider) {
    let first = if rego.is_some() {
        Decider::Rego
    } else {
        Decider::Opa
    };
    // One policy for the whole decision (a reload in between would change the keys).
    let policy = rego.map(|r| r.policy());
    let all = InputKeys::All;
    let keys = match (&policy, opa) {
        // OPA's policy is not ours to read: it gets everything.
        (Some(p), None) => p.input_keys(),
        _ => &all,
    };
    let input = match Input::build_for(view, keys) {
        Ok(i) => i,
        Err(e) => return (Decision::deny(DenyReason::BadInput(e)), first),
    };
    let mut headers = Vec::new();
    if let Some(policy) = &policy {
        match policy.decide(&input) {
            Decision::Allow { headers: h } => headers.extend(h),
            deny => return (deny, Decider::Rego),
        }
    }
    if let Some(opa) = opa {
        match opa.decide(&input).await {
            Decision::Allow { headers: h } => headers.extend(h),
            deny => return (deny, Decider::Opa),
        }
    }
    (Decision::Allow { headers }, first)
}
