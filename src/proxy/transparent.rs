//! Transparent listeners: connections that redirect rules sent here. Inbound classifies
//! each connection by its first byte (mTLS, or plaintext where the port is permissive),
//! applies the policy of the port the client meant, and forwards to the app on that
//! port. Outbound picks the first route that covers the original destination and
//! originates mTLS to it, or passes the connection through or denies it. Both refuse,
//! before anything else, a connection that is svidcar's own: a missing or wrong rule
//! then costs one counted refusal, never a storm of connections to itself.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::IntCounter;
use tokio::net::TcpStream;

use super::http::HttpForwarder;
use super::upstream::{is_own_connection, Connector, MtlsOriginator};
use super::{admit, handshake, reject, relay, Accepted, ListenerMetrics, PeerAcceptor};
use crate::config::{canonical_ip, Mode, Otherwise, Route, Timeouts, TransparentInboundSpec};
use crate::eviction::PeerRole;
use crate::identity::IdentityState;
use crate::log_limit::LogLimiter;
use crate::metrics;
use crate::tls::Rejection;

/// Refusals of redirected connections: caused by rules or by peers, so rate-limited.
static REFUSAL_LOG: LogLimiter = LogLimiter::new("connection refused", 20, Duration::from_secs(10));

/// Why a redirected connection was refused (not a TLS reason: those are [`Rejection`]s).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the original destination {0} is svidcar's own listener (a redirect rule is missing or wrong)")]
    OwnListener(SocketAddr),
    #[error("the connection from {0} is svidcar's own upstream connection, redirected back (the rules do not exclude the proxy's uid)")]
    OwnConnection(SocketAddr),
    #[error("no original destination: the connection was not redirected here")]
    NoOriginalDestination,
    #[error("no route covers {0} and outbound.otherwise is deny")]
    NoRoute(SocketAddr),
    #[error("plaintext on port {0}, which is strict (mTLS only)")]
    PlaintextRefused(u16),
}

impl Refusal {
    pub fn label(&self) -> &'static str {
        match self {
            Self::OwnListener(_) | Self::OwnConnection(_) => "loop",
            Self::NoOriginalDestination => "no_original_destination",
            Self::NoRoute(_) => "no_route",
            Self::PlaintextRefused(_) => "plaintext_refused",
        }
    }
}

/// Logs (rate-limited) and counts a refusal; the connection is then dropped.
fn refuse(listener: &str, peer: SocketAddr, why: &Refusal) {
    metrics::get()
        .connection_errors
        .with_label_values(&[listener, why.label()])
        .inc();
    if REFUSAL_LOG.allow(why.label()) {
        tracing::warn!(listener, %peer, reason = why.label(), "connection refused: {why}");
    }
}

/// svidcar's own listening ports, to tell a loop.
#[derive(Debug, Clone)]
pub struct OwnPorts(pub Arc<[u16]>);

impl OwnPorts {
    /// The original destination of a redirected connection, unless it points back at
    /// svidcar: straight at a listener (no rule rewrote it) or at one of its ports here.
    fn check(&self, conn: &Accepted) -> Result<SocketAddr, Refusal> {
        let dst = conn.original_dst.ok_or(Refusal::NoOriginalDestination)?;
        let (ip, local) = (canonical_ip(dst.ip()), canonical_ip(conn.local.ip()));
        let here = ip == local || ip.is_loopback() || ip.is_unspecified();
        if (ip == local && dst.port() == conn.local.port())
            || (here && self.0.contains(&dst.port()))
        {
            return Err(Refusal::OwnListener(dst));
        }
        Ok(dst)
    }
}

/// What the first byte of a connection says.
enum FirstByte {
    /// 0x16: a TLS handshake record.
    Tls,
    Plaintext,
    /// Nothing within the wait.
    Silent,
    /// Closed before sending anything.
    Closed,
}

/// Peeks (never consumes) the first byte, waiting at most `wait`.
async fn first_byte(stream: &TcpStream, wait: Duration) -> FirstByte {
    let mut b = [0u8; 1];
    match tokio::time::timeout(wait, stream.peek(&mut b)).await {
        Err(_) => FirstByte::Silent,
        Ok(Ok(0)) | Ok(Err(_)) => FirstByte::Closed,
        Ok(Ok(_)) if b[0] == 0x16 => FirstByte::Tls,
        Ok(Ok(_)) => FirstByte::Plaintext,
    }
}

/// The counters of the transparent inbound listener, looked up once.
pub struct InboundCounters {
    tls: IntCounter,
    plaintext: IntCounter,
    timeout: IntCounter,
    server_first: IntCounter,
    carried_mtls: IntCounter,
    carried_plaintext: IntCounter,
}

impl InboundCounters {
    pub fn new(metrics: &ListenerMetrics) -> Self {
        let m = metrics::get();
        let name: &str = &metrics.name;
        let detected = |r: &str| m.detection.with_label_values(&[name, r]);
        let carried = |o: &str| m.transparent.with_label_values(&[name, o]);
        Self {
            tls: detected("tls"),
            plaintext: detected("plaintext"),
            timeout: detected("timeout"),
            server_first: detected("server_first"),
            carried_mtls: carried("mtls"),
            carried_plaintext: carried("plaintext"),
        }
    }
}

/// Makes the HTTP forwarder of one port (or destination) that the config does not
/// name one by one: the listener-wide `protocol: http`, an HTTP route.
pub type MakeForwarder<K> = Box<dyn Fn(K) -> Option<Arc<HttpForwarder>> + Send + Sync>;

/// Most forwarders made on demand that are kept: each holds a connection pool, and
/// ports or destinations are bounded by what callers try, not by the config.
const MAX_MADE: usize = 1024;

/// HTTP forwarders by port (inbound) or destination (outbound): made once each and
/// reused by every connection, as explicit HTTP listeners make theirs once.
pub struct HttpForwarders<K> {
    /// Keys the config names: `Some` for HTTP, `None` for TCP (which must not fall back
    /// to an HTTP default).
    configured: HashMap<K, Option<Arc<HttpForwarder>>>,
    /// For keys not configured, when the default is HTTP.
    make: Option<MakeForwarder<K>>,
    made: Mutex<HashMap<K, Arc<HttpForwarder>>>,
}

impl<K: std::hash::Hash + Eq + Copy> HttpForwarders<K> {
    pub fn new(
        configured: HashMap<K, Option<Arc<HttpForwarder>>>,
        make: Option<MakeForwarder<K>>,
    ) -> Self {
        Self {
            configured,
            make,
            made: Mutex::new(HashMap::new()),
        }
    }

    /// No HTTP at all.
    pub fn none() -> Self {
        Self::new(HashMap::new(), None)
    }

    /// The forwarder for `key`, if it carries HTTP.
    pub fn get(&self, key: K) -> Option<Arc<HttpForwarder>> {
        if let Some(f) = self.configured.get(&key) {
            return f.clone();
        }
        let make = self.make.as_ref()?;
        let mut made = self.made.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = made.get(&key) {
            return Some(f.clone());
        }
        let f = make(key)?;
        if made.len() >= MAX_MADE {
            // Forget one: its pool closes when the connections using it end.
            if let Some(k) = made.keys().next().copied() {
                made.remove(&k);
            }
        }
        made.insert(key, f.clone());
        Some(f)
    }
}

/// The transparent inbound listener.
pub struct TransparentInbound {
    pub metrics: ListenerMetrics,
    pub spec: TransparentInboundSpec,
    pub default_acceptor: PeerAcceptor,
    /// One acceptor per port whose allowlist differs from the default.
    pub acceptors: HashMap<u16, PeerAcceptor>,
    pub upstream: Connector,
    pub timeouts: Timeouts,
    pub own: OwnPorts,
    pub state: Arc<IdentityState>,
    pub counters: InboundCounters,
    /// Ports that carry HTTP, by original destination port.
    pub http: HttpForwarders<u16>,
}

impl TransparentInbound {
    pub async fn handle(self: Arc<Self>, conn: Accepted) {
        let name = &self.metrics.name;
        let dst = match self.own.check(&conn) {
            Ok(d) => d,
            Err(why) => return refuse(name, conn.peer, &why),
        };
        let port = dst.port();
        let tls = match self.spec.policy(port).mode {
            Mode::Strict => match first_byte(&conn.stream, self.timeouts.handshake).await {
                FirstByte::Tls => true,
                FirstByte::Plaintext => {
                    return refuse(name, conn.peer, &Refusal::PlaintextRefused(port))
                }
                FirstByte::Silent => return reject(name, conn.peer, &Rejection::Timeout),
                FirstByte::Closed => return reject(name, conn.peer, &Rejection::ClosedEarly),
            },
            Mode::Permissive if self.spec.server_first_ports.contains(&port) => {
                self.counters.server_first.inc();
                false
            }
            Mode::Permissive => match first_byte(&conn.stream, self.spec.detect_timeout).await {
                FirstByte::Tls => {
                    self.counters.tls.inc();
                    true
                }
                FirstByte::Plaintext => {
                    self.counters.plaintext.inc();
                    false
                }
                // A server-speaks-first protocol: the client waits for the app.
                FirstByte::Silent => {
                    self.counters.timeout.inc();
                    false
                }
                FirstByte::Closed => return,
            },
        };
        // Server-speaks-first ports (MySQL, Redis, ...) cannot be HTTP: the listener-wide
        // `protocol: http` leaves them TCP; only their own `ports` entry can say http.
        let http = if self.spec.ports.contains_key(&port)
            || !self.spec.server_first_ports.contains(&port)
        {
            self.http.get(port)
        } else {
            None
        };
        if !tls {
            if let Some(http) = http {
                // Permissive plaintext to an HTTP port: served as Istio does, without
                // a caller identity (no identity header; XFCC removed).
                self.counters.carried_plaintext.inc();
                tracing::debug!(listener = %name, peer = %conn.peer, port, "plaintext HTTP connection");
                return Box::pin(http.serve(conn.stream, None, conn.drain)).await;
            }
            let Some(app) = Box::pin(self.upstream.connect(Some(dst))).await else {
                return;
            };
            self.counters.carried_plaintext.inc();
            tracing::debug!(listener = %name, peer = %conn.peer, port, "plaintext connection");
            return relay(
                &self.metrics,
                conn.stream,
                app,
                self.timeouts.idle,
                conn.drain.closed(),
            )
            .await;
        }
        if self.state.identity_expired() {
            return reject(name, conn.peer, &Rejection::IdentityExpired);
        }
        let acceptor = self.acceptors.get(&port).unwrap_or(&self.default_acceptor);
        // Boxed: one allocation for the rustls state, not a copy in each future.
        let tls = match Box::pin(handshake(
            self.timeouts.handshake,
            acceptor.tls.accept(conn.stream),
        ))
        .await
        {
            Ok(tls) => Box::new(tls),
            Err(why) => return reject(name, conn.peer, &why),
        };
        let watch = match admit(
            &self.metrics,
            tls.get_ref().1,
            &acceptor.verifier,
            PeerRole::Client,
            &conn.drain,
        ) {
            Ok(w) => w,
            Err(why) => return reject(name, conn.peer, &why),
        };
        if tracing::enabled!(tracing::Level::DEBUG) {
            let id = super::peer_id_for_log(tls.get_ref().1.peer_certificates());
            tracing::debug!(listener = %name, peer = %conn.peer, port, peer_id = %id, "accepted mTLS connection");
        }
        if let Some(http) = http {
            let certs = tls.get_ref().1.peer_certificates().unwrap_or_default();
            let caller = crate::tls::peer_identity_of(Some(certs)).map(|id| {
                let by = self
                    .state
                    .load()
                    .default_svid()
                    .map(|s| s.spiffe_id.to_string());
                http.caller(id, certs, by.as_deref())
            });
            self.counters.carried_mtls.inc();
            return Box::pin(http.serve(tls, caller, watch.drain.clone())).await;
        }
        let Some(app) = Box::pin(self.upstream.connect(Some(dst))).await else {
            return;
        };
        self.counters.carried_mtls.inc();
        relay(
            &self.metrics,
            tls,
            app,
            self.timeouts.idle,
            watch.drain.closed(),
        )
        .await;
    }
}

/// One route, ready: which destinations, and the mTLS it originates to them.
pub struct OutboundRoute {
    pub route: Route,
    pub mtls: MtlsOriginator,
    /// An HTTP route: one forwarder (and mTLS connection pool) per destination.
    pub http: HttpForwarders<SocketAddr>,
}

/// The transparent outbound listener.
pub struct TransparentOutbound {
    pub metrics: ListenerMetrics,
    pub routes: Vec<OutboundRoute>,
    pub otherwise: Otherwise,
    pub upstream: Connector,
    pub timeouts: Timeouts,
    pub own: OwnPorts,
    pub state: Arc<IdentityState>,
    pub carried_mtls: IntCounter,
    pub carried_passthrough: IntCounter,
}

impl TransparentOutbound {
    pub async fn handle(self: Arc<Self>, conn: Accepted) {
        let name = &self.metrics.name;
        if is_own_connection(conn.peer) {
            return refuse(name, conn.peer, &Refusal::OwnConnection(conn.peer));
        }
        let dst = match self.own.check(&conn) {
            Ok(d) => d,
            Err(why) => return refuse(name, conn.peer, &why),
        };
        let route = self.routes.iter().find(|r| r.route.matches(dst));
        if route.is_none() && self.otherwise == Otherwise::Deny {
            return refuse(name, conn.peer, &Refusal::NoRoute(dst));
        }
        if route.is_some() && self.state.identity_expired() {
            return reject(name, conn.peer, &Rejection::IdentityExpired);
        }
        if let Some(http) = route.and_then(|r| r.http.get(dst)) {
            self.carried_mtls.inc();
            tracing::debug!(listener = %name, peer = %conn.peer, %dst, "HTTP route");
            return Box::pin(http.serve(conn.stream, None, conn.drain)).await;
        }
        let Some((tcp, _own_port)) = self.upstream.connect_tracked(Some(dst)).await else {
            return;
        };
        let Some(route) = route else {
            self.carried_passthrough.inc();
            tracing::debug!(listener = %name, peer = %conn.peer, %dst, "passthrough: no route");
            return relay(
                &self.metrics,
                conn.stream,
                tcp,
                self.timeouts.idle,
                conn.drain.closed(),
            )
            .await;
        };
        let tls = match Box::pin(route.mtls.originate(tcp)).await {
            Ok(tls) => Box::new(tls),
            Err(why) => return reject(name, conn.peer, &why),
        };
        if tracing::enabled!(tracing::Level::DEBUG) {
            let id = super::peer_id_for_log(tls.get_ref().1.peer_certificates());
            tracing::debug!(listener = %name, %dst, peer_id = %id, "established mTLS connection");
        }
        let watch = match admit(
            &self.metrics,
            tls.get_ref().1,
            &route.mtls.verifier,
            PeerRole::Server,
            &conn.drain,
        ) {
            Ok(w) => w,
            Err(why) => return reject(name, conn.peer, &why),
        };
        self.carried_mtls.inc();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::Drain;

    async fn accepted(original_dst: Option<SocketAddr>) -> Accepted {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (stream, peer) = l.accept().await.unwrap();
        Accepted {
            stream,
            peer,
            local: addr,
            original_dst,
            drain: Drain::default(),
        }
    }

    #[tokio::test]
    async fn destinations_that_are_svidcar_itself_are_loops() {
        let own = OwnPorts(vec![15000, 15001, 15006].into());
        let c = accepted(None).await;
        assert_eq!(own.check(&c), Err(Refusal::NoOriginalDestination));
        // Not rewritten by any rule: the destination is the listener itself.
        let c = accepted(None).await;
        let local = c.local;
        let c = Accepted {
            original_dst: Some(local),
            ..c
        };
        assert_eq!(own.check(&c), Err(Refusal::OwnListener(local)));
        // One of svidcar's ports, on this host.
        let admin: SocketAddr = "127.0.0.1:15000".parse().unwrap();
        let c = accepted(Some(admin)).await;
        assert_eq!(own.check(&c), Err(Refusal::OwnListener(admin)));
        // A peer's address and port: fine, even when the port number is one of ours.
        for dst in ["10.1.2.3:8080", "10.1.2.3:15006", "[fd00::1]:15001"] {
            let dst: SocketAddr = dst.parse().unwrap();
            let c = accepted(Some(dst)).await;
            assert_eq!(own.check(&c), Ok(dst));
        }
        assert_eq!(Refusal::OwnConnection(admin).label(), "loop");
    }
}
