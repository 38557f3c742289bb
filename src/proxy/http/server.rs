//! Serving HTTP on an accepted connection (HTTP/1.1 or h2, chosen by ALPN on mTLS or by
//! the client's preface on plaintext) and forwarding each request: inbound to the app
//! with the caller's identity set, outbound to the peer over pooled mTLS connections.
//! A drain sends GOAWAY / `Connection: close` and lets requests in flight finish.
//! Limits and deadlines live in `limits`, upgrades and tunnels in `upgrade`.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use prometheus::IntCounterVec;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::body::Inspect;
use super::client::{Pool, ReqBody};
use super::limits::{Activity, Expired, Watched};
use super::path::{normalize_host, normalize_target, PathOptions};
use super::upgrade;
use super::xfcc::{ConnXfcc, Xfcc};
use crate::authz::http_rules::{Decision, HttpRules, RequestView};
use crate::authz::opa::{decide_request, OpaClient};
use crate::authz::rego::{Decision as RegoDecision, RegoAuthorizer, RequestView as RegoView};
use crate::authz::PeerIdentity;
use crate::config::HttpLimits;
use crate::log_limit::LogLimiter;
use crate::metrics;
use crate::proxy::{Drain, ListenerMetrics};

/// Refused requests: callers cause them, so the log is rate-limited; the metric counts all.
static DENIED_LOG: LogLimiter = LogLimiter::new(
    "HTTP request refused",
    20,
    std::time::Duration::from_secs(10),
);

/// The caller of an inbound connection: who it is, and its part of the XFCC header
/// (made once per connection).
pub struct Caller {
    pub identity: PeerIdentity,
    pub xfcc: Option<ConnXfcc>,
}

impl HttpForwarder {
    /// The caller of a connection whose handshake authenticated `certs` (leaf first);
    /// `by` is our own SPIFFE ID.
    pub fn caller(
        &self,
        identity: PeerIdentity,
        certs: &[rustls_pki_types::CertificateDer<'_>],
        by: Option<&str>,
    ) -> Caller {
        let xfcc = self.xfcc.as_ref().and_then(|x| match x.connection(by, certs) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(listener = %self.metrics.name, error = %e, "no XFCC header for this caller");
                None
            }
        });
        Caller { identity, xfcc }
    }
}

/// The body type svidcar answers with: the upstream's, or a short one of its own.
pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// What one HTTP listener does with each request.
pub struct HttpForwarder {
    pub metrics: ListenerMetrics,
    /// Plaintext or mTLS, HTTP/1.1 (or h2 as ALPN says).
    pub client: Pool,
    /// h2c, for requests that came as h2 (inbound only: the app may need h2, as gRPC).
    pub h2c: Option<Pool>,
    pub scheme: http::uri::Scheme,
    /// `host:port` of the upstream, when the request names no authority.
    pub authority: http::uri::Authority,
    pub identity_header: Option<HeaderName>,
    /// Inbound: per-route rules, evaluated on the normalized path.
    pub rules: Option<Arc<HttpRules>>,
    /// The port rules see (the listener's).
    pub port: u16,
    /// Inbound: `x-forwarded-client-cert`, as Envoy writes it.
    pub xfcc: Option<Xfcc>,
    /// Inbound: a Rego policy that decides each request (after the rules).
    pub rego: Option<RegoAuthorizer>,
    /// Inbound: JWT-SVID validation (before the rules, which may name its `sub`).
    pub jwt: Option<crate::jwt::InboundJwt>,
    /// Outbound: the JWT-SVID set as `Authorization: Bearer`.
    pub jwt_out: Option<crate::jwt::OutboundJwt>,
    /// Inbound: an external OPA asked after `rego` (both must allow).
    pub opa: Option<OpaClient>,
    pub requests: IntCounterVec,
    /// Sizes and deadlines for what clients send, and the upstream's answer time.
    pub limits: HttpLimits,
    /// `idle_timeout`: a connection with no request for this long is closed.
    pub idle: std::time::Duration,
}

/// What the requests of one connection share.
struct ConnCtx {
    caller: Option<Caller>,
    activity: Arc<Activity>,
    /// Upgraded streams of this connection: it counts as open until they end.
    tunnels: TaskTracker,
    closing: CancellationToken,
}

impl HttpForwarder {
    /// A forwarder with no identity handling and no rules; the caller sets those fields.
    pub fn new(
        metrics: ListenerMetrics,
        client: Pool,
        scheme: http::uri::Scheme,
        authority: http::uri::Authority,
        port: u16,
    ) -> Self {
        Self {
            metrics,
            client,
            h2c: None,
            scheme,
            authority,
            identity_header: None,
            rules: None,
            port,
            xfcc: None,
            rego: None,
            jwt: None,
            jwt_out: None,
            opa: None,
            requests: metrics::get().http_requests.clone(),
            limits: HttpLimits {
                max_request_headers: crate::config::DEFAULT_MAX_REQUEST_HEADERS_KB as usize * 1024,
                request_header_timeout: std::time::Duration::from_secs(10),
                request_timeout: std::time::Duration::from_secs(15),
                max_upstream_connections: crate::config::DEFAULT_MAX_UPSTREAM_CONNECTIONS as usize,
            },
            idle: std::time::Duration::from_secs(3600),
        }
    }

    /// Serves `io` until the client is done, a deadline passes or the drain ends it.
    /// `peer` is the caller the TLS handshake authenticated (inbound), `None` for the
    /// app (outbound).
    pub async fn serve<I>(self: Arc<Self>, io: I, peer: Option<Caller>, drain: Drain)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let activity = Activity::new();
        let ctx = Arc::new(ConnCtx {
            caller: peer,
            activity: activity.clone(),
            tunnels: TaskTracker::new(),
            closing: drain.closing.clone(),
        });
        let this = self.clone();
        let service_ctx = ctx.clone();
        let service = hyper::service::service_fn(move |req| {
            let (this, ctx) = (this.clone(), service_ctx.clone());
            async move {
                // In flight until its response has been sent (the guard goes with the body).
                let guard = ctx.activity.request();
                let res = this.forward(req, &ctx).await;
                Ok::<_, Infallible>(res.map(|b| {
                    Inspect::new(b, move |_: &mut hyper::body::Frame<Bytes>| {
                        let _in_flight = &guard;
                    })
                    .boxed()
                }))
            }
        });
        let builder = super::limits::server(&self.limits);
        let io = TokioIo::new(Watched::new(io, activity.clone()));
        let conn = builder.serve_connection_with_upgrades(io, service);
        tokio::pin!(conn);
        let name = &self.metrics.name;
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    if let Some(status) = super::limits::status_sent_by_hyper(&*e) {
                        self.count(status);
                        if DENIED_LOG.allow("malformed") {
                            tracing::warn!(listener = %name, status = status.as_str(), error = %e, "HTTP request refused: malformed or too large");
                        }
                    } else {
                        tracing::debug!(listener = %name, error = %e, "HTTP connection ended with error");
                    }
                }
            }
            why = activity.expired(self.limits.request_header_timeout, self.idle) => {
                metrics::get()
                    .connection_errors
                    .with_label_values(&[name, why.label()])
                    .inc();
                tracing::debug!(listener = %name, reason = why.label(), "HTTP connection closed: {why}");
                if why == Expired::Idle {
                    // GOAWAY / close for a client that is not sending: a short grace.
                    conn.as_mut().graceful_shutdown();
                    tokio::select! {
                        _ = conn.as_mut() => {}
                        _ = drain.closing.cancelled() => {}
                        _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                    }
                }
            }
            _ = drain.draining.cancelled() => {
                conn.as_mut().graceful_shutdown();
                tokio::select! {
                    _ = conn.as_mut() => {}
                    _ = drain.closing.cancelled() => {}
                }
            }
        }
        ctx.tunnels.close();
        tokio::select! {
            _ = ctx.tunnels.wait() => {}
            _ = drain.closing.cancelled() => {}
        }
    }

    /// One request: identity set (inbound), hop-by-hop headers dropped, sent upstream.
    async fn forward(&self, mut req: Request<Incoming>, conn: &ConnCtx) -> Response<ProxyBody> {
        let caller = conn.caller.as_ref();
        let downstream_h2 = req.version() == Version::HTTP_2;
        let peer = caller.map(|c| &c.identity);
        if downstream_h2 && req.method() == Method::CONNECT {
            // h2 CONNECT (and RFC 8441 websockets over h2) is not carried: refused,
            // never turned silently into a plain request.
            return self.answer(
                StatusCode::NOT_IMPLEMENTED,
                "CONNECT over h2 not supported\n",
            );
        }
        if !downstream_h2 && conn.activity.take_conflicting_lengths() {
            // Request smuggling: two framings, one request.
            if DENIED_LOG.allow("smuggling") {
                tracing::warn!(listener = %self.metrics.name, "HTTP request refused: both Content-Length and Transfer-Encoding");
            }
            let mut res = self.answer(StatusCode::BAD_REQUEST, "bad request framing\n");
            res.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return res;
        }
        // Read before the hop-by-hop headers (Upgrade, Connection) are removed.
        let upgrade = upgrade::requested(&req);
        // Hop-by-hop headers first: a caller must not be able to name the identity
        // headers in `Connection` and have the ones svidcar sets removed.
        strip_hop_by_hop(req.headers_mut());
        // One Host, agreeing with the request target: rules, policy and app see the same.
        let mut hosts = req.headers().get_all(header::HOST).iter();
        let host = hosts.next().cloned();
        if hosts.next().is_some() {
            return self.answer(StatusCode::BAD_REQUEST, "bad host\n");
        }
        let authority = match (req.uri().authority(), &host) {
            (Some(a), Some(h)) if !a.as_str().as_bytes().eq_ignore_ascii_case(h.as_bytes()) => {
                return self.answer(StatusCode::BAD_REQUEST, "bad host\n");
            }
            (Some(a), _) => a.clone(),
            (None, Some(h)) => match h.to_str().ok().and_then(|h| h.parse().ok()) {
                Some(a) => a,
                None => return self.answer(StatusCode::BAD_REQUEST, "bad host\n"),
            },
            (None, None) => self.authority.clone(),
        };
        // A host the rules' and policies' spelling cannot be made of (userinfo, `/`,
        // `%`...) is refused here rather than shown to a policy as no host at all, where a
        // rule denying a host would not match it.
        let Ok(normalized_host) = normalize_host(authority.as_str()) else {
            return self.answer(StatusCode::BAD_REQUEST, "bad host\n");
        };
        // The host policies see: none when the request named none.
        let policy_host = if req.uri().authority().is_some() || host.is_some() {
            normalized_host
        } else {
            std::borrow::Cow::Borrowed("")
        };
        if caller.is_some() || self.xfcc.is_some() || self.identity_header.is_some() {
            // Inbound: spellings an app may read as ours (`x_workload_id` for
            // `x-workload-id`, as CGI-style servers do) never reach it.
            remove_lookalikes(req.headers_mut(), self.identity_header.as_ref());
        } else {
            // Outbound: XFCC describes a hop's caller; the app is not one (Envoy's
            // default, SANITIZE).
            req.headers_mut().remove(super::xfcc::XFCC);
        }
        if let Some(c) = caller {
            match &c.xfcc {
                Some(x) => x.apply(req.headers_mut()),
                None if self.xfcc.is_some() => {
                    // The caller's certificate cannot be written into the header.
                    return self.answer(StatusCode::BAD_REQUEST, "bad client certificate\n");
                }
                None => {}
            }
        } else if let Some(x) = &self.xfcc {
            // Inbound plaintext (a permissive port): no client certificate, so Envoy's
            // modes all remove the header but `always_forward_only`.
            if let Ok(c) = x.connection::<&[u8]>(None, &[]) {
                c.apply(req.headers_mut());
            }
        }
        if let Some(h) = &self.identity_header {
            // Whatever the caller claims is dropped first, on every request.
            req.headers_mut().remove(h);
            if let Some(p) = peer {
                if let Ok(v) = HeaderValue::from_str(&p.uri) {
                    req.headers_mut().insert(h.clone(), v);
                }
            }
        }
        // Inbound JWT-SVID (logged and counted inside); outbound, ours set.
        let jwt = match &self.jwt {
            Some(j) => match j.check(req.headers(), peer.map(|p| p.uri.as_str())) {
                Ok(v) => v,
                Err(_) => return self.unauthorized(),
            },
            None => None,
        };
        if let Some(j) = &self.jwt_out {
            if j.apply(req.headers_mut()).await.is_err() {
                return self.answer(StatusCode::SERVICE_UNAVAILABLE, "no JWT-SVID available\n");
            }
        }
        let mut path_and_query = req.uri().path_and_query().cloned();
        if let Some(rules) = &self.rules {
            // Inbound: what is authorized is what the app receives.
            let target = path_and_query.as_ref().map_or("/", |pq| pq.as_str());
            let normalized = match normalize_target(target, PathOptions::default()) {
                Ok(t) => t,
                Err(why) => {
                    tracing::debug!(listener = %self.metrics.name, reason = why.label(), "request refused: {why}");
                    return self.answer(StatusCode::BAD_REQUEST, "bad request path\n");
                }
            };
            let view = RequestView {
                principal: peer.map(|p| p.uri.as_str()),
                jwt_principal: jwt.as_ref().map(|j| j.sub.as_str()),
                method: req.method().as_str(),
                path: &normalized.path,
                port: self.port,
            };
            let decision = rules.evaluate(&view);
            if decision != Decision::Allowed {
                if DENIED_LOG.allow("denied") {
                    tracing::warn!(
                        listener = %self.metrics.name,
                        caller = view.principal.unwrap_or("-"),
                        method = view.method,
                        path = %crate::log_limit::printable(view.path, 256),
                        "request {decision}"
                    );
                }
                return self.answer(StatusCode::FORBIDDEN, "forbidden\n");
            }
            if self.rego.is_some() || self.opa.is_some() {
                let view = RegoView {
                    caller: peer.map(|p| p.uri.as_str()),
                    method: req.method().as_str(),
                    path: &normalized.path,
                    query: normalized.query,
                    host: &policy_host,
                    headers: req.headers(),
                    jwt_claims: jwt.as_ref().map(|j| &j.claims),
                };
                let (decision, by) =
                    decide_request(self.rego.as_ref(), self.opa.as_ref(), &view).await;
                match decision {
                    RegoDecision::Allow { headers } => {
                        let add = headers;
                        let pq = normalized.path_and_query();
                        for (k, v) in add {
                            req.headers_mut().insert(k, v);
                        }
                        path_and_query = match pq.parse() {
                            Ok(pq) => Some(pq),
                            Err(_) => {
                                return self.answer(StatusCode::BAD_REQUEST, "bad request path\n")
                            }
                        };
                        return self
                            .send(req, path_and_query, authority, downstream_h2, conn, upgrade)
                            .await;
                    }
                    RegoDecision::Deny {
                        status,
                        headers,
                        body,
                        reason,
                    } => {
                        if DENIED_LOG.allow("rego") {
                            tracing::warn!(
                                listener = %self.metrics.name,
                                caller = view.caller.unwrap_or("-"),
                                method = view.method,
                                reason = reason.label(),
                                "request refused by the {by} policy"
                            );
                        }
                        self.count(status);
                        let mut res = Response::new(
                            Full::new(Bytes::from(body.unwrap_or_else(|| "forbidden\n".into())))
                                .map_err(|never| match never {})
                                .boxed(),
                        );
                        *res.status_mut() = status;
                        for (k, v) in headers {
                            res.headers_mut().insert(k, v);
                        }
                        return res;
                    }
                }
            }
            let pq = normalized.path_and_query();
            path_and_query = match pq.parse() {
                Ok(pq) => Some(pq),
                Err(_) => return self.answer(StatusCode::BAD_REQUEST, "bad request path\n"),
            };
        }
        self.send(req, path_and_query, authority, downstream_h2, conn, upgrade)
            .await
    }

    /// Sends `req` upstream with `path_and_query` and `authority`: pooled, or on a
    /// connection of its own for an upgrade.
    ///
    /// Only what the pooled request awaits is held here: this future is part of every
    /// request's task, which is copied when it is spawned, so the request is rewritten
    /// in [`Self::outgoing`] and the rare upgrade's state is boxed.
    async fn send(
        &self,
        req: Request<Incoming>,
        path_and_query: Option<http::uri::PathAndQuery>,
        authority: http::uri::Authority,
        downstream_h2: bool,
        conn: &ConnCtx,
        upgrade: Option<upgrade::Kind>,
    ) -> Response<ProxyBody> {
        if let Some(kind) = upgrade {
            return Box::pin(self.upgrade(req, path_and_query, authority, kind, conn)).await;
        }
        let (req, client) = match self.outgoing(req, path_and_query, &authority) {
            Some(mut req) => {
                // gRPC needs h2 to the app; other requests go as HTTP/1.1, which every
                // app speaks.
                let grpc = req
                    .headers()
                    .get(header::CONTENT_TYPE)
                    .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
                let client = match (&self.h2c, downstream_h2 && grpc) {
                    (Some(h2c), true) => h2c.get(),
                    _ => {
                        *req.version_mut() = Version::HTTP_11;
                        self.client.get()
                    }
                };
                (req, client)
            }
            None => return self.bad_target(),
        };
        let limit = self.limits.request_timeout;
        let res = match tokio::time::timeout(limit, client.request(req)).await {
            Ok(res) => res,
            Err(_) => return self.timed_out(limit),
        };
        match res {
            Ok(mut res) => {
                strip_hop_by_hop(res.headers_mut());
                self.count(res.status());
                res.map(|b| b.boxed())
            }
            Err(e) => {
                tracing::warn!(listener = %self.metrics.name, error = %e, "upstream request failed");
                self.answer(StatusCode::SERVICE_UNAVAILABLE, "upstream unavailable\n")
            }
        }
    }

    /// The request as it goes upstream: trailers cleaned, the target rewritten; `None`
    /// for a target that cannot be written (answered 400).
    fn outgoing(
        &self,
        req: Request<Incoming>,
        path_and_query: Option<http::uri::PathAndQuery>,
        authority: &http::uri::Authority,
    ) -> Option<Request<ReqBody>> {
        let mut req = req.map(|b| self.clean_trailers(b));
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(authority.clone());
        parts.path_and_query = path_and_query.or_else(|| Some("/".parse().expect("static")));
        *req.uri_mut() = Uri::from_parts(parts).ok()?;
        Some(req)
    }

    fn bad_target(&self) -> Response<ProxyBody> {
        self.answer(StatusCode::BAD_REQUEST, "bad request target\n")
    }

    /// [`Self::send`] for an upgrade or `CONNECT`.
    async fn upgrade(
        &self,
        mut req: Request<Incoming>,
        path_and_query: Option<http::uri::PathAndQuery>,
        authority: http::uri::Authority,
        kind: upgrade::Kind,
        conn: &ConnCtx,
    ) -> Response<ProxyBody> {
        let on_upgrade = hyper::upgrade::on(&mut req);
        match self.outgoing(req, path_and_query, &authority) {
            Some(req) => {
                self.send_upgrade(req, kind, &authority, on_upgrade, conn)
                    .await
            }
            None => self.bad_target(),
        }
    }

    /// An upgrade or `CONNECT`: its own upstream connection, then bytes both ways.
    async fn send_upgrade(
        &self,
        mut req: Request<ReqBody>,
        kind: upgrade::Kind,
        authority: &http::uri::Authority,
        on_upgrade: hyper::upgrade::OnUpgrade,
        conn: &ConnCtx,
    ) -> Response<ProxyBody> {
        upgrade::prepare(&mut req, &kind, authority);
        let sent = upgrade::forward(
            &self.client,
            req,
            &kind,
            on_upgrade,
            upgrade::Tunnel {
                tunnels: &conn.tunnels,
                closing: conn.closing.clone(),
                idle: self.idle,
                metrics: self.metrics.clone(),
            },
        );
        let limit = self.limits.request_timeout;
        let res = match tokio::time::timeout(limit, sent).await {
            Ok(res) => res,
            Err(_) => return self.timed_out(limit),
        };
        match res {
            Ok(mut res) => {
                let protocol = res.headers().get(header::UPGRADE).cloned();
                strip_hop_by_hop(res.headers_mut());
                if let (upgrade::Kind::Upgrade(_), true, Some(p)) =
                    (&kind, upgrade::switched(&kind, res.status()), protocol)
                {
                    // The caller needs to see the switch it asked for.
                    res.headers_mut().insert(header::UPGRADE, p);
                    res.headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                }
                self.count(res.status());
                res.map(|b| b.boxed())
            }
            Err(e) => {
                tracing::warn!(listener = %self.metrics.name, error = %e, "upstream upgrade failed");
                self.answer(StatusCode::SERVICE_UNAVAILABLE, "upstream unavailable\n")
            }
        }
    }

    /// 504: the upstream did not answer within `request_timeout`.
    fn timed_out(&self, limit: std::time::Duration) -> Response<ProxyBody> {
        tracing::warn!(listener = %self.metrics.name, timeout = ?limit, "upstream did not answer within request_timeout");
        self.answer(StatusCode::GATEWAY_TIMEOUT, "upstream timeout\n")
    }

    /// The request body, its trailers cleaned as the headers are: inbound, no copy of
    /// the identity header or XFCC from the caller; outbound, no XFCC from the app.
    fn clean_trailers(&self, body: Incoming) -> ReqBody {
        let inbound = self.rules.is_some();
        let identity = self.identity_header.clone();
        Inspect::new(body, move |frame: &mut hyper::body::Frame<Bytes>| {
            if let Some(t) = frame.trailers_mut() {
                t.remove(super::xfcc::XFCC);
                if inbound {
                    remove_lookalikes(t, identity.as_ref());
                    if let Some(h) = &identity {
                        t.remove(h);
                    }
                }
            }
        })
        .boxed()
    }

    /// A short answer of svidcar's own (no internals in the body).
    fn answer(&self, status: StatusCode, body: &'static str) -> Response<ProxyBody> {
        self.count(status);
        let mut res = Response::new(
            Full::new(Bytes::from_static(body.as_bytes()))
                .map_err(|never| match never {})
                .boxed(),
        );
        *res.status_mut() = status;
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        res
    }

    /// 401 with RFC 6750's challenge; the reason is in the log and the metric only.
    fn unauthorized(&self) -> Response<ProxyBody> {
        let mut res = self.answer(StatusCode::UNAUTHORIZED, "unauthorized\n");
        res.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer error=\"invalid_token\""),
        );
        res
    }

    fn count(&self, status: StatusCode) {
        self.requests
            .with_label_values(&[&self.metrics.name, status.as_str()])
            .inc();
    }
}

/// Removes headers whose names differ from XFCC or the identity header only by `_` in
/// place of `-`.
fn remove_lookalikes(headers: &mut http::HeaderMap, identity: Option<&HeaderName>) {
    let ours = |n: &str| {
        let n = n.replace('_', "-");
        n == super::xfcc::XFCC.as_str() || identity.is_some_and(|i| i.as_str() == n)
    };
    let lookalikes: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().contains('_') && ours(k.as_str()))
        .cloned()
        .collect();
    for k in lookalikes {
        headers.remove(k);
    }
}

fn strip_hop_by_hop(headers: &mut http::HeaderMap) {
    // Headers named in Connection are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for h in named.iter().chain(HOP_BY_HOP.iter()) {
        if *h == header::TE {
            // "TE: trailers" is what gRPC needs end to end.
            let trailers = headers
                .get(header::TE)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
            if trailers {
                continue;
            }
        }
        headers.remove(h);
    }
}
