//! Inbound: terminate mTLS from a peer workload (the verifier authenticates it and asks
//! the listener's policy), then forward the plaintext to the local app.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;

use super::{handshake, listener::accept_loop, reject, relay};
use super::{Accepted, Connector, Drain, ListenerMetrics};
use crate::config::Timeouts;
use crate::identity::IdentityState;
use crate::tls::{peer_identity_of, Rejection};

pub struct InboundListener {
    pub metrics: ListenerMetrics,
    pub acceptor: TlsAcceptor,
    pub upstream: Connector,
    pub timeouts: Timeouts,
    pub max_connections: usize,
    pub state: Arc<IdentityState>,
}

impl InboundListener {
    pub async fn run(
        self,
        listener: TcpListener,
        drain: Drain,
        tracker: TaskTracker,
    ) -> std::io::Result<()> {
        let this = Arc::new(self);
        let (m, max) = (this.metrics.clone(), this.max_connections);
        accept_loop(listener, m, max, drain, tracker, move |conn| {
            this.clone().handle(conn)
        })
        .await
    }

    async fn handle(self: Arc<Self>, conn: Accepted) {
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
            let id = peer_identity_of(tls.get_ref().1.peer_certificates())
                .map(|p| p.uri)
                .unwrap_or_default();
            tracing::debug!(listener = %name, peer = %conn.peer, peer_id = %id, "accepted mTLS connection");
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
