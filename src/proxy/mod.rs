//! Listeners that carry traffic. `listener` accepts and hands each connection its
//! context; `inbound` terminates mTLS in front of the local app; `outbound` originates
//! mTLS for the app's calls through `upstream`; `copy` moves the bytes. Identity is
//! read per handshake from the shared state, so rotation needs no restart.

mod copy;
pub mod http;
mod inbound;
mod listener;
mod outbound;
mod transparent;
mod upstream;

pub use inbound::InboundListener;
pub use listener::{serve, AcceptSettings, Accepted, Drain, ListenerMetrics};
pub use outbound::OutboundListener;
pub use transparent::{
    HttpForwarders, InboundCounters, MakeForwarder, OutboundRoute, OwnPorts, Refusal,
    TransparentInbound, TransparentOutbound,
};
pub use upstream::{Connector, MtlsOriginator, Target};

use std::future::Future;
use std::io;
use std::time::Duration;

use crate::eviction::{PeerRole, Registration};
use crate::log_limit::LogLimiter;
use crate::metrics;
use crate::tls::Rejection;
use copy::{CopyEnd, Transferred};

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

/// The SPIFFE ID of an established connection's peer, for a debug line.
fn peer_id_for_log(certs: Option<&[rustls_pki_types::CertificateDer<'_>]>) -> String {
    crate::tls::peer_identity_of(certs)
        .map(|p| p.uri)
        .unwrap_or_default()
}

/// A TLS acceptor and the verifier inside it, kept so that live connections can be
/// checked again after a reload or a bundle change.
pub struct PeerAcceptor {
    pub tls: tokio_rustls::TlsAcceptor,
    pub verifier: std::sync::Arc<crate::tls::SpiffeVerifier>,
}

/// An established mTLS connection registered for eviction, with the drain it must use
/// from now on (its `closing` also fires when the peer is no longer allowed).
struct Watched {
    _registration: Registration,
    drain: Drain,
}

fn watched(
    listener: &std::sync::Arc<str>,
    verifier: &std::sync::Arc<crate::tls::SpiffeVerifier>,
    role: PeerRole,
    certs: Option<&[rustls_pki_types::CertificateDer<'static>]>,
    drain: &Drain,
) -> Watched {
    let registration = crate::eviction::watch(
        crate::eviction::Peer {
            listener,
            verifier,
            role,
            certs,
        },
        &drain.closing,
    );
    Watched {
        drain: Drain {
            draining: drain.draining.clone(),
            closing: registration.closing.clone(),
        },
        _registration: registration,
    }
}

/// A completed handshake, counted by kind. A resumed session carried its peer chain
/// over without verification: it is checked again now, as a full handshake would be
/// (`tls::resumption`); a refusal closes the connection with the reason.
fn established(
    full: &prometheus::IntCounter,
    resumed: &prometheus::IntCounter,
    session: &rustls::CommonState,
    verifier: &std::sync::Arc<crate::tls::SpiffeVerifier>,
    role: PeerRole,
) -> Result<(), Rejection> {
    crate::metrics::get()
        .tls_key_exchange
        .with_label_values(&[crate::tls::key_exchange_group(session)])
        .inc();
    if !crate::tls::resumption::was_resumed(session) {
        full.inc();
        return Ok(());
    }
    resumed.inc();
    crate::tls::resumption::check_resumed(
        verifier,
        session.peer_certificates(),
        role == PeerRole::Client,
    )
}

/// After a handshake: counted by kind, a resumed peer checked again, and the connection
/// registered for eviction. The connection uses the returned drain from now on.
fn admit(
    m: &ListenerMetrics,
    session: &rustls::CommonState,
    verifier: &std::sync::Arc<crate::tls::SpiffeVerifier>,
    role: PeerRole,
    drain: &Drain,
) -> Result<Watched, Rejection> {
    established(
        &m.handshakes_full,
        &m.handshakes_resumed,
        session,
        verifier,
        role,
    )?;
    Ok(watched(
        &m.name,
        verifier,
        role,
        session.peer_certificates(),
        drain,
    ))
}

/// One TLS handshake, either direction, within `timeout`; a failure says why.
async fn handshake<T>(
    timeout: Duration,
    handshake: impl Future<Output = io::Result<T>>,
) -> Result<T, Rejection> {
    match tokio::time::timeout(timeout, handshake).await {
        Ok(Ok(tls)) => Ok(tls),
        Ok(Err(e)) => Err(Rejection::from_handshake_error(&e)),
        Err(_) => Err(Rejection::Timeout),
    }
}

/// Runs the copy until it ends, goes idle or `stop` resolves (the drain time is over),
/// and records how it ended: every proxied byte stream, TCP listeners' connections and
/// upgraded HTTP connections alike.
pub(crate) async fn relay<D, U>(
    m: &ListenerMetrics,
    downstream: D,
    upstream: U,
    idle: Duration,
    stop: impl Future<Output = ()>,
) where
    D: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let listener = &m.name;
    let (end, Transferred { rx, tx }) = copy::bidirectional(downstream, upstream, idle, stop).await;
    m.rx.inc_by(rx);
    m.tx.inc_by(tx);
    match end {
        CopyEnd::Done => tracing::trace!(listener = %listener, rx, tx, "connection closed"),
        CopyEnd::Idle => {
            m.idle_timeout.inc();
            tracing::debug!(listener = %listener, rx, tx, "connection closed: idle timeout");
        }
        CopyEnd::Stopped => {
            tracing::debug!(listener = %listener, rx, tx, "connection closed: drain time over")
        }
        CopyEnd::Error(e) => {
            tracing::debug!(listener = %listener, rx, tx, error = %e, "connection ended with error")
        }
    }
}
