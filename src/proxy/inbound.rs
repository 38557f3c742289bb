//! Inbound: terminate mTLS from a peer workload (the verifier authenticates it and asks
//! the listener's policy), then forward the plaintext to the local app.

use std::sync::Arc;

use tokio_rustls::TlsAcceptor;

use super::{handshake, reject, relay};
use super::{Accepted, Connector, ListenerMetrics};
use crate::config::Timeouts;
use crate::identity::IdentityState;
use crate::tls::Rejection;

pub struct InboundListener {
    pub metrics: ListenerMetrics,
    pub acceptor: TlsAcceptor,
    pub upstream: Connector,
    pub timeouts: Timeouts,
    pub state: Arc<IdentityState>,
    /// HTTP mode: requests forwarded one by one, with the caller's identity set.
    pub http: Option<Arc<super::http::HttpForwarder>>,
}

impl InboundListener {
    pub async fn handle(self: Arc<Self>, conn: Accepted) {
        let name = &self.metrics.name;
        if self.state.identity_expired() {
            return reject(name, conn.peer, &Rejection::IdentityExpired);
        }
        let accept = self.acceptor.accept(conn.stream);
        let tls = match handshake(self.timeouts.handshake, accept).await {
            Ok(tls) => tls,
            Err(why) => return reject(name, conn.peer, &why),
        };
        if tracing::enabled!(tracing::Level::DEBUG) {
            let id = super::peer_id_for_log(tls.get_ref().1.peer_certificates());
            tracing::debug!(listener = %name, peer = %conn.peer, peer_id = %id, "accepted mTLS connection");
        }
        if let Some(http) = &self.http {
            let certs = tls.get_ref().1.peer_certificates().unwrap_or_default();
            let caller = crate::tls::peer_identity_of(Some(certs)).map(|id| {
                let by = self
                    .state
                    .load()
                    .default_svid()
                    .map(|s| s.spiffe_id.to_string());
                http.caller(id, certs, by.as_deref())
            });
            return http.clone().serve(tls, caller, conn.drain).await;
        }
        let Some(upstream) = self.upstream.connect(conn.original_dst).await else {
            return;
        };
        relay(
            &self.metrics,
            tls,
            upstream,
            self.timeouts.idle,
            &conn.drain,
        )
        .await;
    }
}
