//! Inbound: terminate mTLS from a peer workload, check its SPIFFE ID, forward the
//! plaintext to the local app.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{connect, listener::accept_loop, reject, relay, Timeouts};
use crate::identity::IdentityState;
use crate::tls::{peer_id, Rejection};

pub struct InboundListener {
    pub name: Arc<str>,
    pub forward: String,
    pub acceptor: TlsAcceptor,
    pub timeouts: Timeouts,
    pub max_connections: usize,
    pub state: Arc<IdentityState>,
}

impl InboundListener {
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) {
        let this = Arc::new(self);
        let (name, max) = (this.name.clone(), this.max_connections);
        accept_loop(
            listener,
            name,
            "inbound",
            max,
            shutdown,
            tracker,
            move |tcp, peer| this.clone().handle(tcp, peer),
        )
        .await
    }

    async fn handle(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr) {
        if self.state.identity_expired() {
            reject(&self.name, peer, &Rejection::IdentityExpired);
            return;
        }
        let accept = tokio::time::timeout(self.timeouts.handshake, self.acceptor.accept(tcp)).await;
        let tls = match accept {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => return reject(&self.name, peer, &Rejection::from_handshake_error(&e)),
            Err(_) => return reject(&self.name, peer, &Rejection::Timeout),
        };
        if tracing::enabled!(tracing::Level::DEBUG) {
            let id = peer_id(tls.get_ref().1.peer_certificates()).unwrap_or_default();
            tracing::debug!(listener = %self.name, %peer, peer_id = %id, "accepted mTLS connection");
        }
        let Some(upstream) = connect(&self.name, &self.forward, self.timeouts.connect).await else {
            return;
        };
        relay(&self.name, tls, upstream, self.timeouts.idle).await;
    }
}
