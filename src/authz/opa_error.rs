//! Why an external OPA gave no usable answer: shared by the OPA client, which makes these,
//! and the decision type in [`super::rego`], which carries one when a request is refused
//! for it (its own module, so neither of the two imports the other back).

use std::time::Duration;

use http::StatusCode;

/// Why OPA gave no usable answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpaError {
    #[error("cannot send the request to OPA: {0}")]
    Connect(String),
    #[error("no answer from OPA within {0:?}")]
    Timeout(Duration),
    #[error("OPA answered HTTP {0}")]
    Status(StatusCode),
    #[error("cannot read OPA's answer: {0}")]
    Body(String),
    #[error("OPA's answer is not a JSON object: {0}")]
    BadJson(String),
}

impl OpaError {
    /// Short and bounded, for the metric label.
    pub fn label(&self) -> &'static str {
        match self {
            OpaError::Connect(_) => "connect",
            OpaError::Timeout(_) => "timeout",
            OpaError::Status(s) if s.is_server_error() => "http_5xx",
            OpaError::Status(_) => "http_status",
            OpaError::Body(_) => "body",
            OpaError::BadJson(_) => "bad_json",
        }
    }
}
