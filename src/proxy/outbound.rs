//! Outbound: accept plaintext from the local app, originate mTLS to the peer with our
//! SVID, and check the peer's SPIFFE ID before any app byte is sent.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls_pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{connect, listener::accept_loop, reject, relay, Timeouts};
use crate::identity::IdentityState;
use crate::tls::{peer_id, Rejection};

pub struct OutboundListener {
    pub name: Arc<str>,
    pub connect: String,
    pub server_name: ServerName<'static>,
    pub connector: TlsConnector,
    pub timeouts: Timeouts,
    pub max_connections: usize,
    pub state: Arc<IdentityState>,
}

impl OutboundListener {
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
            "outbound",
            max,
            shutdown,
            tracker,
            move |tcp, peer| this.clone().handle(tcp, peer),
        )
        .await
    }

    async fn handle(self: Arc<Self>, app: TcpStream, peer: SocketAddr) {
        if self.state.identity_expired() {
            reject(&self.name, peer, &Rejection::IdentityExpired);
            return;
        }
        let Some(tcp) = connect(&self.name, &self.connect, self.timeouts.connect).await else {
            return;
        };
        let handshake = self.connector.connect(self.server_name.clone(), tcp);
        let tls = match tokio::time::timeout(self.timeouts.handshake, handshake).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => return reject(&self.name, peer, &Rejection::from_handshake_error(&e)),
            Err(_) => return reject(&self.name, peer, &Rejection::Timeout),
        };
        if tracing::enabled!(tracing::Level::DEBUG) {
            let id = peer_id(tls.get_ref().1.peer_certificates()).unwrap_or_default();
            tracing::debug!(listener = %self.name, upstream = %self.connect, peer_id = %id, "established mTLS connection");
        }
        relay(&self.name, app, tls, self.timeouts.idle).await;
    }
}
