//! One listener built from its spec: TLS configs, policies and upstreams made once,
//! metric series looked up once, sockets bound. Tests use it to run a listener
//! in-process (bind to port 0, read [`BoundListener::local_addr`]).

use std::collections::HashMap;
use std::net::{Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, Context};
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;

use crate::authz::opa::OpaClient;
use crate::authz::rego::RegoAuthorizer;
use crate::authz::{AllowList, PeerPolicy, SpiffeIdMatcher};
use crate::config::{HttpSpec, ListenerKind, ListenerSpec, TlsSpec};
use crate::identity::IdentityState;
use crate::net::HostPort;
use crate::proxy::http::xfcc::{Xfcc, XfccDetails, XfccField, XfccMode};
use crate::proxy::http::{HttpForwarder, Pool, UpstreamConnector};
use crate::proxy::{
    serve, AcceptSettings, Connector, Drain, InboundCounters, InboundListener, ListenerMetrics,
    MtlsOriginator, OutboundListener, OutboundRoute, OwnPorts, PeerAcceptor, Target,
    TransparentInbound, TransparentOutbound,
};
use crate::proxy::{HttpForwarders, MakeForwarder};
use crate::spiffe::TrustDomain;
use crate::tls;

/// `host:port` as a URI authority (checked when the config was read).
fn authority(hp: &crate::net::HostPort) -> http::uri::Authority {
    hp.to_string()
        .parse()
        .unwrap_or_else(|_| http::uri::Authority::from_static("upstream"))
}

/// The `xfcc` config as the header writer takes it.
fn xfcc(c: &crate::config::XfccConfig) -> Xfcc {
    use crate::config::{XfccDetail as D, XfccModeConfig as M};
    let fields: Vec<XfccField> = c
        .details
        .iter()
        .map(|d| match d {
            D::Uri => XfccField::Uri,
            D::Dns => XfccField::Dns,
            D::Subject => XfccField::Subject,
            D::Cert => XfccField::Cert,
            D::Chain => XfccField::Chain,
        })
        .collect();
    Xfcc {
        mode: match c.mode {
            M::Sanitize => XfccMode::Sanitize,
            M::ForwardOnly => XfccMode::ForwardOnly,
            M::AppendForward => XfccMode::AppendForward,
            M::SanitizeSet => XfccMode::SanitizeSet,
            M::AlwaysForwardOnly => XfccMode::AlwaysForwardOnly,
        },
        details: XfccDetails::from_fields(&fields),
    }
}

/// The policies of one HTTP inbound (or transparent port), made once: a Rego policy
/// compiled and watched, an OPA client with its pool.
struct Policies {
    rego: Option<RegoAuthorizer>,
    opa: Option<OpaClient>,
}

fn policies(spec: &ListenerSpec, at: &str, h: &HttpSpec) -> anyhow::Result<Policies> {
    let rego = match &h.rego {
        Some(r) => Some(
            RegoAuthorizer::start(
                r.policy.clone(),
                &r.query,
                tokio_util::sync::CancellationToken::new(),
            )
            .map_err(|e| anyhow!("{at}.rego: {e}"))?,
        ),
        None => None,
    };
    let opa = h.opa.clone().map(|o| OpaClient::new(spec.name.clone(), o));
    Ok(Policies { rego, opa })
}

/// The HTTP forwarder in front of the app at `forward`, with the caller's identity,
/// rules and policies of `h`; `port` is the port rules match.
fn app_forwarder(
    spec: &ListenerSpec,
    metrics: &ListenerMetrics,
    state: &Arc<IdentityState>,
    h: &HttpSpec,
    p: &Policies,
    forward: HostPort,
    port: u16,
) -> HttpForwarder {
    let to_app = |h2c| {
        let c = Connector::new(
            spec.name.clone(),
            Target::Fixed(forward.clone()),
            spec.timeouts.connect,
            metrics.upstream_connect_failed.clone(),
        );
        Pool::new(
            UpstreamConnector::new(
                spec.name.clone(),
                c,
                None,
                h.limits.max_upstream_connections,
            ),
            h2c,
            true,
            None,
        )
    };
    let mut f = HttpForwarder::new(
        metrics.clone(),
        to_app(false),
        http::uri::Scheme::HTTP,
        authority(&forward),
        port,
    );
    f.h2c = Some(to_app(true));
    f.identity_header = h.identity_header.clone();
    f.rules = Some(h.rules.clone());
    f.xfcc = h.xfcc.as_ref().map(xfcc);
    f.rego = p.rego.clone();
    f.opa = p.opa.clone();
    f.jwt = h.jwt_inbound.as_ref().map(|j| {
        crate::jwt::InboundJwt::new(
            state.jwt().clone(),
            j.audiences.clone(),
            j.required,
            j.leeway,
            spec.name.clone(),
        )
    });
    f.limits = h.limits;
    f.idle = spec.timeouts.idle;
    f
}

/// The forwarder of a transparent HTTP route to one destination: its own pool of mTLS
/// connections to `dst`.
fn peer_forwarder(
    spec: &ListenerSpec,
    metrics: &ListenerMetrics,
    state: &Arc<IdentityState>,
    mtls: &MtlsOriginator,
    h: &HttpSpec,
    dst: SocketAddr,
) -> Option<Arc<HttpForwarder>> {
    let hp = HostPort::parse(&dst.to_string()).ok()?;
    let c = Connector::new(
        spec.name.clone(),
        Target::Fixed(hp.clone()),
        spec.timeouts.connect,
        metrics.upstream_connect_failed.clone(),
    );
    let mtls = MtlsOriginator {
        connector: mtls.connector.clone(),
        server_name: mtls.server_name.clone(),
        handshake_timeout: mtls.handshake_timeout,
        verifier: mtls.verifier.clone(),
    };
    let up = UpstreamConnector::new(
        spec.name.clone(),
        c,
        Some(mtls),
        h.limits.max_upstream_connections,
    );
    let mut f = HttpForwarder::new(
        metrics.clone(),
        Pool::new(up, false, h.pool, Some(state.clone())),
        http::uri::Scheme::HTTPS,
        authority(&hp),
        dst.port(),
    );
    f.limits = h.limits;
    f.idle = spec.timeouts.idle;
    Some(Arc::new(f))
}

/// The app in this pod on `port`.
fn loopback(port: u16) -> HostPort {
    HostPort::parse(&SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, port)).to_string())
        .unwrap_or_else(|_| {
            // Only port 0 does not parse; nothing listens there.
            HostPort::parse("127.0.0.1:1").expect("static")
        })
}

/// The peer policies of one listener by scope (`allow`, `expect`, `ports.8080`,
/// `default`, `routes[...]`). A rebuilt listener takes over its predecessor's policy
/// objects and swaps the new rules into them, so the verifiers of live connections,
/// which hold those objects, check them against the rules in force.
#[derive(Debug, Clone, Default)]
pub struct PolicyBook(HashMap<String, PeerPolicy>);

/// A listener ready to run.
pub struct BoundListener {
    sockets: Vec<TcpListener>,
    local_addr: SocketAddr,
    settings: AcceptSettings,
    kind: Bound,
    book: PolicyBook,
    /// New rules for policies taken over from the predecessor: applied by
    /// [`BoundListener::commit`], when the reload is certain.
    swaps: Vec<(PeerPolicy, SpiffeIdMatcher)>,
}

enum Bound {
    Inbound(InboundListener),
    Outbound(OutboundListener),
    TransparentInbound(Box<TransparentInbound>),
    TransparentOutbound(TransparentOutbound),
}

/// What building one listener needs from the process.
struct Builder<'a> {
    spec: &'a ListenerSpec,
    /// The spec's TLS settings (a transparent inbound with HTTP ports adds ALPN).
    tls: TlsSpec,
    state: Arc<IdentityState>,
    own_td: &'a TrustDomain,
    previous: &'a PolicyBook,
    book: Mutex<(PolicyBook, Vec<(PeerPolicy, SpiffeIdMatcher)>)>,
}

impl Builder<'_> {
    /// The policy of `scope`: the predecessor's object when there is one (its new rules
    /// wait for the commit), else a new one.
    fn policy(&self, scope: &str, allow: &AllowList) -> PeerPolicy {
        let matcher = allow.matcher(self.own_td);
        let mut book = self.book.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = book.0 .0.get(scope) {
            return p.clone();
        }
        let policy = match self.previous.0.get(scope) {
            Some(old) => {
                book.1.push((old.clone(), matcher));
                old.clone()
            }
            None => PeerPolicy::new(matcher),
        };
        book.0 .0.insert(scope.to_string(), policy.clone());
        policy
    }

    fn acceptor(&self, scope: &str, allow: &AllowList) -> anyhow::Result<PeerAcceptor> {
        let policy = self.policy(scope, allow);
        let verifier = Arc::new(tls::SpiffeVerifier::new(self.state.clone(), policy));
        let config = tls::server_config(self.state.clone(), verifier.clone(), &self.tls)
            .with_context(|| format!("{}.tls_min_version", self.spec.key))?;
        Ok(PeerAcceptor {
            tls: config.into(),
            verifier,
        })
    }

    fn mtls(
        &self,
        scope: &str,
        expect: &AllowList,
        tls_spec: &TlsSpec,
        server_name: Option<rustls_pki_types::ServerName<'static>>,
    ) -> anyhow::Result<MtlsOriginator> {
        let policy = self.policy(scope, expect);
        let verifier = Arc::new(tls::SpiffeVerifier::new(self.state.clone(), policy));
        let config = tls::client_config(self.state.clone(), verifier.clone(), tls_spec)
            .with_context(|| format!("{}.tls_min_version", self.spec.key))?;
        Ok(MtlsOriginator {
            connector: config.into(),
            server_name,
            handshake_timeout: self.spec.timeouts.handshake,
            verifier,
        })
    }

    fn connector(&self, target: Target, metrics: &ListenerMetrics) -> Connector {
        Connector::new(
            self.spec.name.clone(),
            target,
            self.spec.timeouts.connect,
            metrics.upstream_connect_failed.clone(),
        )
    }
}

/// The scope of a transparent outbound route's `expect`: its destinations.
fn route_scope(r: &crate::config::Route) -> String {
    let to: Vec<String> = r.to.iter().map(|n| n.to_string()).collect();
    let ports: Vec<String> = r.ports.iter().map(|p| p.to_string()).collect();
    format!("routes[to={};ports={}]", to.join(","), ports.join(","))
}

impl BoundListener {
    /// Builds `spec` and binds its socket(s). `own_ports` are svidcar's own listening
    /// ports, which transparent listeners refuse as destinations (a loop).
    pub async fn bind(
        spec: &ListenerSpec,
        state: Arc<IdentityState>,
        own_td: &TrustDomain,
        own_ports: &[u16],
    ) -> anyhow::Result<Self> {
        let built = Self::build(spec, state, own_td, own_ports, &PolicyBook::default())?;
        let sockets = bind_sockets(spec).await?;
        Ok(built.with_sockets(sockets))
    }

    /// Builds `spec` without sockets (they are bound, or handed over from the
    /// predecessor, afterwards). Policies of `previous` with the same scope are taken
    /// over.
    pub fn build(
        spec: &ListenerSpec,
        state: Arc<IdentityState>,
        own_td: &TrustDomain,
        own_ports: &[u16],
        previous: &PolicyBook,
    ) -> anyhow::Result<Self> {
        let mut b = Builder {
            spec,
            tls: spec.tls.clone(),
            state: state.clone(),
            own_td,
            previous,
            book: Mutex::new(Default::default()),
        };
        let at = &spec.key;
        let own = OwnPorts(own_ports.into());
        let (kind, metrics, transparent) = match &spec.kind {
            ListenerKind::Inbound(i) => {
                let metrics = ListenerMetrics::new(&spec.name, "inbound");
                let http = match &spec.http {
                    Some(h) => {
                        let p = policies(spec, at, h)?;
                        let port = spec.listen.port();
                        Some(Arc::new(app_forwarder(
                            spec,
                            &metrics,
                            &state,
                            h,
                            &p,
                            i.forward.clone(),
                            port,
                        )))
                    }
                    None => None,
                };
                let l = InboundListener {
                    proxy_protocol: i.proxy_protocol,
                    acceptor: b.acceptor("allow", &i.allow)?,
                    upstream: b.connector(Target::Fixed(i.forward.clone()), &metrics),
                    metrics: metrics.clone(),
                    timeouts: spec.timeouts,
                    state,
                    http,
                };
                (Bound::Inbound(l), metrics, false)
            }
            ListenerKind::Outbound(o) => {
                let metrics = ListenerMetrics::new(&spec.name, "outbound");
                let http = match &spec.http {
                    Some(h) => {
                        let c = b.connector(Target::Fixed(o.connect.clone()), &metrics);
                        let mtls =
                            b.mtls("expect", &o.expect, &spec.tls, Some(o.server_name.clone()))?;
                        let up = UpstreamConnector::new(
                            spec.name.clone(),
                            c,
                            Some(mtls),
                            h.limits.max_upstream_connections,
                        );
                        let mut f = HttpForwarder::new(
                            metrics.clone(),
                            Pool::new(up, false, h.pool, Some(state.clone())),
                            http::uri::Scheme::HTTPS,
                            authority(&o.connect),
                            spec.listen.port(),
                        );
                        f.jwt_out = h.jwt_audience.as_ref().map(|a| {
                            crate::jwt::OutboundJwt::new(
                                state.jwt().clone(),
                                a.clone(),
                                spec.name.clone(),
                            )
                        });
                        f.limits = h.limits;
                        f.idle = spec.timeouts.idle;
                        Some(Arc::new(f))
                    }
                    None => None,
                };
                let l = OutboundListener {
                    http,
                    upstream: b.connector(Target::Fixed(o.connect.clone()), &metrics),
                    mtls: b.mtls("expect", &o.expect, &spec.tls, Some(o.server_name.clone()))?,
                    metrics: metrics.clone(),
                    timeouts: spec.timeouts,
                    state,
                };
                (Bound::Outbound(l), metrics, false)
            }
            ListenerKind::TransparentInbound(t) => {
                let metrics = ListenerMetrics::new(&spec.name, "inbound");
                // HTTP ports speak h2 or HTTP/1.1 with peer sidecars, chosen by ALPN (a
                // client that offers none, as TCP routes, is not affected).
                if t.default.http.is_some() || t.ports.values().any(|p| p.http.is_some()) {
                    b.tls.alpn = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
                }
                let mut acceptors = HashMap::new();
                for (port, policy) in &t.ports {
                    acceptors.insert(*port, b.acceptor(&format!("ports.{port}"), &policy.allow)?);
                }
                let mut configured = HashMap::new();
                for (port, policy) in &t.ports {
                    let f = match &policy.http {
                        Some(h) => {
                            let at = format!("{at}.ports.{port}");
                            let p = policies(spec, &at, h)?;
                            let f = app_forwarder(
                                spec,
                                &metrics,
                                &state,
                                h,
                                &p,
                                loopback(*port),
                                *port,
                            );
                            Some(Arc::new(f))
                        }
                        None => None,
                    };
                    configured.insert(*port, f);
                }
                let make: Option<MakeForwarder<u16>> = match &t.default.http {
                    Some(h) => {
                        let p = policies(spec, at, h)?;
                        let (spec, metrics, h) = (spec.clone(), metrics.clone(), h.clone());
                        let state = state.clone();
                        Some(Box::new(move |port: u16| {
                            let f = app_forwarder(
                                &spec,
                                &metrics,
                                &state,
                                &h,
                                &p,
                                loopback(port),
                                port,
                            );
                            Some(Arc::new(f))
                        }))
                    }
                    None => None,
                };
                let l = TransparentInbound {
                    http: HttpForwarders::new(configured, make),
                    counters: InboundCounters::new(&metrics),
                    spec: t.clone(),
                    default_acceptor: b.acceptor("default", &t.default.allow)?,
                    acceptors,
                    upstream: b.connector(Target::LoopbackAtOriginalPort, &metrics),
                    metrics: metrics.clone(),
                    timeouts: spec.timeouts,
                    own,
                    state,
                };
                (Bound::TransparentInbound(Box::new(l)), metrics, true)
            }
            ListenerKind::TransparentOutbound(t) => {
                let metrics = ListenerMetrics::new(&spec.name, "outbound");
                let mut routes = Vec::with_capacity(t.routes.len());
                for r in &t.routes {
                    let http = match &r.http {
                        Some(h) => {
                            // HTTP between the sidecars: h2 or HTTP/1.1 by ALPN.
                            let tls = TlsSpec {
                                alpn: vec![b"h2".to_vec(), b"http/1.1".to_vec()],
                                ..spec.tls.clone()
                            };
                            let mtls = b.mtls(&route_scope(r), &r.expect, &tls, r.sni.clone())?;
                            let (spec, metrics, h) = (spec.clone(), metrics.clone(), h.clone());
                            let state = state.clone();
                            let make: MakeForwarder<SocketAddr> = Box::new(move |dst| {
                                peer_forwarder(&spec, &metrics, &state, &mtls, &h, dst)
                            });
                            HttpForwarders::new(HashMap::new(), Some(make))
                        }
                        None => HttpForwarders::none(),
                    };
                    routes.push(OutboundRoute {
                        route: r.clone(),
                        mtls: b.mtls(&route_scope(r), &r.expect, &spec.tls, r.sni.clone())?,
                        http,
                    });
                }
                let carried = |o: &str| {
                    crate::metrics::get()
                        .transparent
                        .with_label_values(&[&*spec.name, o])
                };
                let l = TransparentOutbound {
                    routes,
                    otherwise: t.otherwise,
                    upstream: b.connector(Target::OriginalDst, &metrics),
                    metrics: metrics.clone(),
                    timeouts: spec.timeouts,
                    own,
                    state,
                    carried_mtls: carried("mtls"),
                    carried_passthrough: carried("passthrough"),
                };
                (Bound::TransparentOutbound(l), metrics, true)
            }
        };
        let (book, swaps) = b.book.into_inner().unwrap_or_else(|p| p.into_inner());
        Ok(Self {
            sockets: Vec::new(),
            local_addr: spec.listen,
            settings: AcceptSettings::new(metrics, spec.max_connections, transparent),
            kind,
            book,
            swaps,
        })
    }

    /// Takes its sockets (bound by [`bind_sockets`], or the predecessor's) and logs
    /// where it listens.
    pub fn with_sockets(mut self, sockets: Vec<TcpListener>) -> Self {
        if let Some(a) = sockets.first().and_then(|s| s.local_addr().ok()) {
            self.local_addr = a;
        }
        self.sockets = sockets;
        let name = &self.settings.metrics.name;
        let what = match &self.kind {
            Bound::Inbound(l) => format!("forward to {}", l.upstream.describe()),
            Bound::Outbound(l) => format!("connect to {}", l.upstream.describe()),
            Bound::TransparentInbound(_) => {
                "transparent: to the app at 127.0.0.1:<original port>".into()
            }
            Bound::TransparentOutbound(_) => "transparent: to the original destination".into(),
        };
        let direction = match &self.kind {
            Bound::Inbound(_) | Bound::TransparentInbound(_) => "inbound",
            Bound::Outbound(_) | Bound::TransparentOutbound(_) => "outbound",
        };
        let addrs: Vec<String> = self
            .sockets
            .iter()
            .filter_map(|s| s.local_addr().ok())
            .map(|a| a.to_string())
            .collect();
        tracing::info!(listener = %name, listen = %addrs.join(","), "{direction} listening: {what}");
        self
    }

    /// The policies, for the listener that replaces this one.
    pub fn policies(&self) -> &PolicyBook {
        &self.book
    }

    /// The connection limit, for the listener that replaces this one.
    pub fn limit(&self) -> Arc<tokio::sync::Semaphore> {
        self.settings.limit.clone()
    }

    /// Counts against `limit`, the predecessor's semaphore (sized for `old_max`),
    /// resized to this listener's `max_connections`: the connections the predecessor
    /// still holds count against the new limit. When the limit shrinks below what is
    /// open, the difference is taken back as those connections close.
    pub fn share_limit(&mut self, limit: &Arc<tokio::sync::Semaphore>, old_max: usize) {
        let new_max = self.settings.max_connections;
        if new_max > old_max {
            limit.add_permits(new_max - old_max);
        } else {
            let mut owed = old_max - new_max;
            owed -= limit.forget_permits(owed);
            if owed > 0 {
                let limit = limit.clone();
                tokio::spawn(async move {
                    while owed > 0 {
                        match limit.acquire().await {
                            Ok(p) => {
                                p.forget();
                                owed -= 1;
                            }
                            Err(_) => return,
                        }
                    }
                });
            }
        }
        self.settings.limit = limit.clone();
    }

    /// Makes the rules of this (rebuilt) listener the ones in force: the policies taken
    /// over get their new rules. Policies of `previous` that no longer exist follow the
    /// transparent default (a port removed from `ports`) or refuse everyone (a scope
    /// that is gone), so their live connections are checked against what the config
    /// says now.
    pub fn commit(&mut self, previous: &PolicyBook) {
        for (policy, matcher) in self.swaps.drain(..) {
            policy.swap(matcher);
        }
        let default = self.book.0.get("default").cloned();
        for (scope, old) in &previous.0 {
            if self.book.0.contains_key(scope) {
                continue;
            }
            match &default {
                Some(d) if scope.starts_with("ports.") => old.follow(d),
                _ => old.swap(SpiffeIdMatcher::default()),
            }
        }
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Accepts until `drain.draining`, then gives its sockets back (for a successor);
    /// connection tasks go to `tracker`. An error: a listening socket is gone.
    pub async fn run(
        self,
        drain: Drain,
        tracker: TaskTracker,
    ) -> std::io::Result<Vec<TcpListener>> {
        let (sockets, settings) = (self.sockets, self.settings);
        match self.kind {
            Bound::Inbound(l) => {
                serve(Arc::new(l), sockets, settings, drain, tracker, |l, c| {
                    l.handle(c)
                })
                .await
            }
            Bound::Outbound(l) => {
                serve(Arc::new(l), sockets, settings, drain, tracker, |l, c| {
                    l.handle(c)
                })
                .await
            }
            Bound::TransparentInbound(l) => {
                serve(
                    Arc::<TransparentInbound>::from(l),
                    sockets,
                    settings,
                    drain,
                    tracker,
                    |l, c| l.handle(c),
                )
                .await
            }
            Bound::TransparentOutbound(l) => {
                serve(Arc::new(l), sockets, settings, drain, tracker, |l, c| {
                    l.handle(c)
                })
                .await
            }
        }
    }
}

/// Binds the socket(s) of `spec`: its address, and for a transparent outbound listener
/// on IPv4 loopback also `[::1]` on the same port.
pub async fn bind_sockets(spec: &ListenerSpec) -> anyhow::Result<Vec<TcpListener>> {
    let socket = TcpListener::bind(spec.listen)
        .await
        .map_err(|e| anyhow!("{}.listen: cannot bind {}: {e}", spec.key, spec.listen))?;
    let local_addr = socket.local_addr().unwrap_or(spec.listen);
    let mut sockets = vec![socket];
    if let ListenerKind::TransparentOutbound(_) = spec.kind {
        // The nat table redirects the app's IPv6 connections to ::1, its IPv4 ones
        // to 127.0.0.1: a loopback listener takes both.
        if spec.listen.ip().is_loopback() && spec.listen.is_ipv4() {
            let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, local_addr.port()));
            match TcpListener::bind(v6).await {
                Ok(s) => sockets.push(s),
                Err(e) => {
                    tracing::info!(listener = %spec.name, addr = %v6, error = %e, "no IPv6 loopback listener: IPv6 connections of the app cannot be redirected here")
                }
            }
        }
    }
    Ok(sockets)
}
