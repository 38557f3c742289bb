//! Logging what SDS clients send back: NACK messages and node ids are client text, so
//! they are escaped and truncated (`log_limit::printable`) and NACK lines are
//! rate-limited. Every NACK is still counted in `svidcar_sds_requests_total{kind="nack"}`.

use std::time::Duration;

use crate::log_limit::{printable, LogLimiter};

/// Longest NACK text logged, in bytes of escaped output.
pub const MAX_NACK_BYTES: usize = 512;
/// Longest node id logged.
pub const MAX_NODE_BYTES: usize = 128;

/// At most 5 NACK lines per 5 s, then a summary.
static NACK_LOG: LogLimiter = LogLimiter::new("SDS NACK", 5, Duration::from_secs(5));

/// Logs one NACK (escaped, truncated, rate-limited). `node` is already [`printable`].
pub fn log_nack(node: &str, message: &str) {
    if NACK_LOG.allow("nack") {
        tracing::warn!(
            node = %node,
            error = %printable(message, MAX_NACK_BYTES),
            "Envoy rejected SDS response (NACK)"
        );
    }
}
