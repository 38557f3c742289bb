//! Outbound: accept plaintext from the local app, originate mTLS to the peer with our
//! SVID, and check the peer's SPIFFE ID before any app byte is sent.

use std::sync::Arc;

use super::{admit, reject, relay};
use super::{Accepted, Connector, ListenerMetrics, MtlsOriginator};
use crate::config::Timeouts;
use crate::eviction::PeerRole;
use crate::identity::IdentityState;
use crate::tls::Rejection;

pub struct OutboundListener {
    pub metrics: ListenerMetrics,
    pub upstream: Connector,
    pub mtls: MtlsOriginator,
    pub timeouts: Timeouts,
    pub state: Arc<IdentityState>,
    /// HTTP mode: requests go over pooled mTLS connections, not one per app connection.
    pub http: Option<Arc<super::http::HttpForwarder>>,
}

impl OutboundListener {
    pub async fn handle(self: Arc<Self>, conn: Accepted) {
        let name = &self.metrics.name;
        if self.state.identity_expired() {
            return reject(name, conn.peer, &Rejection::IdentityExpired);
        }
        if let Some(http) = &self.http {
            return Box::pin(http.clone().serve(conn.stream, None, conn.drain)).await;
        }
        let Some(tcp) = Box::pin(self.upstream.connect(conn.original_dst)).await else {
            return;
        };
        // Boxed: one allocation for the rustls state, not a copy in each future.
        let tls = match Box::pin(self.mtls.originate(tcp)).await {
            Ok(tls) => Box::new(tls),
            Err(why) => return reject(name, conn.peer, &why),
        };
        if tracing::enabled!(tracing::Level::DEBUG) {
            let id = super::peer_id_for_log(tls.get_ref().1.peer_certificates());
            tracing::debug!(listener = %name, upstream = %self.upstream.describe(), peer_id = %id, "established mTLS connection");
        }
        let watch = match admit(
            &self.metrics,
            tls.get_ref().1,
            &self.mtls.verifier,
            PeerRole::Server,
            &conn.drain,
        ) {
            Ok(w) => w,
            Err(why) => return reject(name, conn.peer, &why),
        };
        relay(
            &self.metrics,
            conn.stream,
            tls,
            self.timeouts.idle,
            watch.drain.closed(),
        )
        .await;
    }
}
