//! Listeners that carry traffic: `inbound` terminates mTLS in front of the local app,
//! `outbound` originates mTLS for the app's calls. Both read identity per handshake
//! from the shared state, so rotation needs no restart.

mod copy;
mod inbound;
mod listener;
mod outbound;

pub use inbound::InboundListener;
pub use outbound::OutboundListener;

use std::sync::Arc;
use std::time::Duration;

use crate::log_limit::LogLimiter;
use crate::metrics;
use crate::tls::Rejection;
use copy::{CopyEnd, Transferred};

/// Per-listener settings shared by both directions.
#[derive(Debug, Clone)]
pub struct Timeouts {
    pub connect: Duration,
    pub handshake: Duration,
    pub idle: Duration,
}

/// Log lines for refused handshakes: unauthenticated peers cause them, so they are
/// limited per reason (20 per 10 s) with a summary of the rest; the metric counts all.
pub static REJECTION_LOG: LogLimiter =
    LogLimiter::new("handshake rejected", 20, Duration::from_secs(10));

/// Logs and counts a refused handshake: one line, with the reason.
fn reject(listener: &str, peer: std::net::SocketAddr, why: &Rejection) {
    metrics::get()
        .handshake_failures
        .with_label_values(&[listener, why.label()])
        .inc();
    if *why == Rejection::ClosedEarly {
        tracing::debug!(listener, %peer, reason = why.label(), "handshake not completed: {why}");
    } else if REJECTION_LOG.allow(why.label()) {
        tracing::warn!(listener, %peer, reason = why.label(), "handshake rejected: {why}");
    }
}

/// Runs the copy and records how it ended.
async fn relay<D, U>(listener: &Arc<str>, downstream: D, upstream: U, idle: Duration)
where
    D: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (end, Transferred { rx, tx }) = copy::proxy(downstream, upstream, idle).await;
    let m = metrics::get();
    m.bytes.with_label_values(&[listener, "rx"]).inc_by(rx);
    m.bytes.with_label_values(&[listener, "tx"]).inc_by(tx);
    match end {
        CopyEnd::Done => tracing::trace!(listener = %listener, rx, tx, "connection closed"),
        CopyEnd::Idle => {
            m.connection_errors
                .with_label_values(&[listener, "idle_timeout"])
                .inc();
            tracing::debug!(listener = %listener, rx, tx, "connection closed: idle timeout");
        }
        CopyEnd::Error(e) => {
            tracing::debug!(listener = %listener, rx, tx, error = %e, "connection ended with error")
        }
    }
}

/// Connects to `addr` (host:port, DNS allowed) within `timeout`.
async fn connect(listener: &str, addr: &str, timeout: Duration) -> Option<tokio::net::TcpStream> {
    let res = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await;
    let err = match res {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            return Some(s);
        }
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("timed out after {timeout:?}"),
    };
    metrics::get()
        .connection_errors
        .with_label_values(&[listener, "upstream_connect_failed"])
        .inc();
    tracing::warn!(listener, upstream = addr, "cannot connect upstream: {err}");
    None
}
