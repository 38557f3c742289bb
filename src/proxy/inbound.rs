//! Inbound: terminate mTLS from a peer workload (the verifier authenticates it and asks
//! the listener's policy), then forward the plaintext to the local app.

use std::sync::Arc;

use tokio::io::AsyncWriteExt;

use crate::net::proxy_protocol::ProxyHeader;

use super::{admit, handshake, reject, relay, PeerAcceptor};
use super::{Accepted, Connector, ListenerMetrics};
use crate::config::Timeouts;
use crate::eviction::PeerRole;
use crate::identity::IdentityState;
use crate::tls::Rejection;

pub struct InboundListener {
    pub metrics: ListenerMetrics,
    pub acceptor: PeerAcceptor,
    pub upstream: Connector,
    pub timeouts: Timeouts,
    pub state: Arc<IdentityState>,
    /// HTTP mode: requests forwarded one by one, with the caller's identity set.
    pub http: Option<Arc<super::http::HttpForwarder>>,
    /// A PROXY v2 header to the app first, the caller's SPIFFE ID in this TLV type.
    pub proxy_protocol: Option<u8>,
}

fn tls_version_name(v: rustls::ProtocolVersion) -> &'static str {
    match v {
        rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3",
        rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2",
        _ => "TLS",
    }
}

impl InboundListener {
    pub async fn handle(self: Arc<Self>, conn: Accepted) {
        let name = &self.metrics.name;
        if self.state.identity_expired() {
            return reject(name, conn.peer, &Rejection::IdentityExpired);
        }
        let accept = self.acceptor.tls.accept(conn.stream);
        // Boxed: the stream (1.2 KiB of rustls state) then lives in one allocation
        // instead of in each future it passes through (issue 14: memory per connection).
        let tls = match Box::pin(handshake(self.timeouts.handshake, accept)).await {
            Ok(tls) => Box::new(tls),
            Err(why) => return reject(name, conn.peer, &why),
        };
        let watch = match admit(
            &self.metrics,
            tls.get_ref().1,
            &self.acceptor.verifier,
            PeerRole::Client,
            &conn.drain,
        ) {
            Ok(w) => w,
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
            return Box::pin(http.clone().serve(tls, caller, watch.drain.clone())).await;
        }
        let Some(mut upstream) = Box::pin(self.upstream.connect(conn.original_dst)).await else {
            return;
        };
        if let Some(tlv) = self.proxy_protocol {
            let session = tls.get_ref().1;
            let id = crate::tls::peer_identity_of(session.peer_certificates());
            let header = ProxyHeader {
                source: Some(conn.peer),
                destination: Some(conn.local),
                alpn: session.alpn_protocol(),
                authority: session.server_name(),
                tls_version: session.protocol_version().map(tls_version_name),
                cipher: session
                    .negotiated_cipher_suite()
                    .and_then(|c| c.suite().as_str()),
                spiffe_id: id.as_ref().map(|i| i.uri.as_str()),
                spiffe_id_tlv: tlv,
            };
            if let Err(e) = upstream.write_all(&header.encode()).await {
                tracing::debug!(listener = %name, error = %e, "app closed before the PROXY header");
                return;
            }
        }
        relay(
            &self.metrics,
            tls,
            upstream,
            self.timeouts.idle,
            watch.drain.closed(),
        )
        .await;
    }
}
