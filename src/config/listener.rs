//! Listeners: each `inbound` / `outbound` entry checked once and turned into a
//! [`ListenerSpec`] that holds everything a listener needs, typed: its upstream, its
//! allowlist, its server name, timeouts and TLS settings. Nothing downstream parses
//! again.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::ServerName;

use super::matchers::allow_list;
use super::raw::{
    AuthorizationRuleConfig, JwtConfig, ListenerConfig, MatcherConfig, Mode, OnErrorConfig,
    OpaConfig, Otherwise, Protocol, RegoConfig, TlsVersion, XfccConfig,
};
use super::ConfigError;
use crate::authz::opa::{OnError, OpaSettings};
use crate::authz::AllowList;
use crate::net::HostPort;

/// One listener, ready to bind.
#[derive(Debug, Clone)]
pub struct ListenerSpec {
    pub name: Arc<str>,
    /// Where it sits in the file (`inbound[0]`), for messages about it.
    pub key: String,
    pub listen: SocketAddr,
    pub kind: ListenerKind,
    /// Bytes, or HTTP requests.
    pub http: Option<HttpSpec>,
    pub tls: TlsSpec,
    pub timeouts: Timeouts,
    pub max_connections: usize,
}

/// What a listener does with a connection.
#[derive(Debug, Clone)]
pub enum ListenerKind {
    Inbound(InboundSpec),
    Outbound(OutboundSpec),
    /// Connections redirected to the pod's ports: mTLS from peers (or plaintext, in
    /// permissive mode) forwarded to the app on `127.0.0.1:<original port>`.
    TransparentInbound(TransparentInboundSpec),
    /// The app's connections, redirected: mTLS to the original destination when a
    /// route matches it, else passed through or denied.
    TransparentOutbound(TransparentOutboundSpec),
}

/// The transparent inbound listener's rules, by original destination port.
#[derive(Debug, Clone)]
pub struct TransparentInboundSpec {
    pub default: PortPolicy,
    pub ports: std::collections::BTreeMap<u16, PortPolicy>,
    pub detect_timeout: Duration,
    pub server_first_ports: Vec<u16>,
}

impl TransparentInboundSpec {
    /// The policy for connections to original port `port`.
    pub fn policy(&self, port: u16) -> &PortPolicy {
        self.ports.get(&port).unwrap_or(&self.default)
    }
}

/// Mode, allowlist and protocol for one original destination port (or the default).
#[derive(Debug, Clone)]
pub struct PortPolicy {
    pub mode: Mode,
    pub allow: AllowList,
    /// `Some`: the port carries HTTP, with these settings (boxed: most ports are TCP).
    pub http: Option<Box<HttpSpec>>,
}

/// The transparent outbound listener's routes.
#[derive(Debug, Clone)]
pub struct TransparentOutboundSpec {
    pub routes: Vec<Route>,
    pub otherwise: Otherwise,
}

impl TransparentOutboundSpec {
    /// The first route that covers `dst`.
    pub fn route(&self, dst: SocketAddr) -> Option<&Route> {
        self.routes.iter().find(|r| r.matches(dst))
    }
}

/// Destinations reached over mTLS.
#[derive(Debug, Clone)]
pub struct Route {
    pub to: Vec<ipnet::IpNet>,
    /// Empty: every port.
    pub ports: Vec<u16>,
    pub expect: AllowList,
    pub sni: Option<ServerName<'static>>,
    /// `Some`: requests, forwarded over pooled mTLS connections (`pool`).
    pub http: Option<HttpSpec>,
}

impl Route {
    pub fn matches(&self, dst: SocketAddr) -> bool {
        let ip = canonical_ip(dst.ip());
        (self.ports.is_empty() || self.ports.contains(&dst.port()))
            && self.to.iter().any(|net| net.contains(&ip))
    }
}

/// An IPv4-mapped IPv6 address (`::ffff:10.0.0.1`, how a dual-stack socket shows IPv4
/// peers) as the IPv4 address it is.
pub fn canonical_ip(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map(std::net::IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// Terminates mTLS from peers and forwards the plaintext to the local app.
#[derive(Debug, Clone)]
pub struct InboundSpec {
    pub forward: HostPort,
    pub allow: AllowList,
    /// `proxy_protocol`: the TLV type that carries the caller's SPIFFE ID in the PROXY
    /// v2 header written to the app; `None`: no header.
    pub proxy_protocol: Option<u8>,
}

/// Takes plaintext from the app and originates mTLS to a peer.
#[derive(Debug, Clone)]
pub struct OutboundSpec {
    pub connect: HostPort,
    /// `sni`, or the host of `connect`.
    pub server_name: ServerName<'static>,
    pub expect: AllowList,
}

/// HTTP mode settings of one listener.
#[derive(Debug, Clone)]
pub struct HttpSpec {
    /// Inbound: the header that carries the caller's SPIFFE ID to the app.
    pub identity_header: Option<http::HeaderName>,
    /// Inbound: `x-forwarded-client-cert` handling.
    pub xfcc: Option<XfccConfig>,
    /// Outbound: reuse mTLS connections to the peer.
    pub pool: bool,
    /// Inbound: per-route rules (empty: every authenticated caller the allowlist lets in).
    pub rules: std::sync::Arc<crate::authz::http_rules::HttpRules>,
    /// Inbound: Rego policy files and query.
    pub rego: Option<super::raw::RegoConfig>,
    /// Inbound: JWT-SVID validation of `Authorization: Bearer`.
    pub jwt_inbound: Option<JwtInboundSpec>,
    /// Outbound: the audience of the JWT-SVID set on each request.
    pub jwt_audience: Option<String>,
    /// Limits on what a client may send and how long it may take.
    pub limits: HttpLimits,
    /// Inbound: an external OPA asked for each request (after `rego`; both must allow).
    pub opa: Option<OpaSettings>,
}

/// Inbound `jwt:`, checked.
#[derive(Debug, Clone)]
pub struct JwtInboundSpec {
    /// Not empty: a token must name one of these in `aud`.
    pub audiences: Vec<String>,
    /// A request without a token is refused (401).
    pub required: bool,
    /// Allowed clock skew for `exp`, `nbf`, `iat`.
    pub leeway: Duration,
}

/// Clock skew allowed on `exp`, `nbf` and `iat` unless `leeway` says otherwise.
const DEFAULT_JWT_LEEWAY: Duration = Duration::from_secs(30);

/// Limits of one HTTP listener (defaults as Envoy's where Envoy has one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// The largest request head, in bytes (h1 read buffer; h2 header list size).
    pub max_request_headers: usize,
    /// Time for a request head to arrive, and for the first byte of a connection.
    pub request_header_timeout: Duration,
    /// Time for the upstream's response head (a streamed body may take longer).
    pub request_timeout: Duration,
    /// Connections open to the upstream at once, at most: the pool is keyed by the
    /// authority the caller names, so made-up names must not open connections without
    /// end.
    pub max_upstream_connections: usize,
}

/// Envoy's default circuit breaker: `max_connections` 1024 per cluster.
pub const DEFAULT_MAX_UPSTREAM_CONNECTIONS: u32 = 1024;

/// Envoy's default `max_request_headers_kb`.
pub const DEFAULT_MAX_REQUEST_HEADERS_KB: u32 = 60;
/// Envoy's largest `max_request_headers_kb`.
const MAX_REQUEST_HEADERS_KB: u32 = 8192;
/// hyper's HTTP/1 read buffer cannot be smaller than 8 KiB.
const MIN_REQUEST_HEADERS_KB: u32 = 8;

/// TLS settings of one listener.
#[derive(Debug, Clone)]
pub struct TlsSpec {
    pub min_version: TlsVersion,
    pub alpn: Vec<Vec<u8>>,
    /// `tls.session_resumption`.
    pub session_resumption: bool,
}

/// Time limits of one listener.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub handshake: Duration,
    pub idle: Duration,
}

impl ListenerConfig {
    /// Checks an `inbound` entry and types it.
    pub(super) fn inbound_spec(
        &self,
        at: &str,
        tls: TlsVersion,
    ) -> Result<ListenerSpec, ConfigError> {
        self.refuse_keys(
            at,
            "inbound",
            "forward/allow",
            [
                ("connect", self.connect.is_some()),
                ("expect", !self.expect.is_empty()),
                ("sni", self.sni.is_some()),
            ],
        )?;
        let forward = self.target(at, "forward", &self.forward)?;
        let allow = self.allow_list(at, "allow", &self.allow)?;
        let proxy_protocol = self.proxy_protocol(at)?;
        self.spec(
            at,
            tls,
            ListenerKind::Inbound(InboundSpec {
                forward,
                allow,
                proxy_protocol,
            }),
        )
    }

    /// `proxy_protocol`: v2 only, TCP mode only, a custom TLV type for the SPIFFE ID.
    fn proxy_protocol(&self, at: &str) -> Result<Option<u8>, ConfigError> {
        use super::raw::ProxyProtocolConfig as P;
        use crate::net::proxy_protocol::{CUSTOM_TLV_TYPES, DEFAULT_SPIFFE_ID_TLV};
        let key = format!("{at}.proxy_protocol");
        let (version, tlv) = match &self.proxy_protocol {
            None => return Ok(None),
            Some(P::Version(v)) => (v.as_str(), None),
            Some(P::Full {
                version,
                spiffe_id_tlv,
            }) => (version.as_str(), *spiffe_id_tlv),
        };
        if version != "v2" {
            return Err(ConfigError::new(
                key,
                format!("{version:?}: only v2 is written (v1 has no room for the SPIFFE ID)"),
            ));
        }
        if self.protocol == Protocol::Http {
            return Err(ConfigError::new(
                key,
                "only with protocol: tcp; in HTTP mode the caller's identity goes in headers (identity_header, xfcc)",
            ));
        }
        let tlv = tlv.unwrap_or(DEFAULT_SPIFFE_ID_TLV);
        if !CUSTOM_TLV_TYPES.contains(&tlv) {
            return Err(ConfigError::new(
                format!("{key}.spiffe_id_tlv"),
                format!("{tlv:#04x}: use a custom type, 0xE0 to 0xEF"),
            ));
        }
        Ok(Some(tlv))
    }

    /// Checks an `outbound` entry and types it.
    pub(super) fn outbound_spec(
        &self,
        at: &str,
        tls: TlsVersion,
    ) -> Result<ListenerSpec, ConfigError> {
        self.refuse_keys(
            at,
            "outbound",
            "connect/expect",
            [
                ("forward", self.forward.is_some()),
                ("allow", !self.allow.is_empty()),
            ],
        )?;
        let connect = self.target(at, "connect", &self.connect)?;
        let expect = self.allow_list(at, "expect", &self.expect)?;
        let (key, host) = match &self.sni {
            Some(sni) => ("sni", sni.clone()),
            None => ("connect", connect.host().to_string()),
        };
        let server_name = ServerName::try_from(host.clone()).map_err(|_| {
            ConfigError::new(
                format!("{at}.{key}"),
                format!("{host:?} is not a valid server name"),
            )
        })?;
        self.spec(
            at,
            tls,
            ListenerKind::Outbound(OutboundSpec {
                connect,
                server_name,
                expect,
            }),
        )
    }

    /// Keys that belong to the other direction are an error, not ignored.
    fn refuse_keys<const N: usize>(
        &self,
        at: &str,
        kind: &str,
        instead: &str,
        wrong: [(&str, bool); N],
    ) -> Result<(), ConfigError> {
        match wrong.into_iter().find(|(_, present)| *present) {
            Some((key, _)) => Err(ConfigError::new(
                format!("{at}.{key}"),
                format!("not used by {kind} listeners (use {instead})"),
            )),
            None => Ok(()),
        }
    }

    fn target(&self, at: &str, key: &str, value: &Option<String>) -> Result<HostPort, ConfigError> {
        let value = value
            .as_deref()
            .ok_or_else(|| ConfigError::new(format!("{at}.{key}"), "missing (host:port)"))?;
        HostPort::parse(value).map_err(|p| ConfigError::new(format!("{at}.{key}"), p))
    }

    fn allow_list(
        &self,
        at: &str,
        key: &str,
        list: &[MatcherConfig],
    ) -> Result<AllowList, ConfigError> {
        checked_allow_list(&format!("{at}.{key}"), list, self.allow_any_in_trust_domain)
    }

    /// The settings both directions share.
    fn spec(
        &self,
        at: &str,
        tls: TlsVersion,
        kind: ListenerKind,
    ) -> Result<ListenerSpec, ConfigError> {
        for (i, p) in self.alpn.iter().enumerate() {
            if p.is_empty() || p.len() > 255 {
                return Err(ConfigError::new(
                    format!("{at}.alpn[{i}]"),
                    "must be 1 to 255 bytes",
                ));
            }
        }
        let http = self.http_spec(at, &kind)?;
        let alpn: Vec<Vec<u8>> = if http.is_some() && self.alpn.is_empty() {
            // HTTP mode speaks h2 or HTTP/1.1 to peers, chosen by ALPN.
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        } else {
            self.alpn.iter().map(|p| p.as_bytes().to_vec()).collect()
        };
        let tls = self.tls_min_version.unwrap_or(tls);
        let common = Common {
            name: &self.name,
            at,
            listen: self.listen,
            tls: TlsSpec {
                min_version: tls,
                alpn,
                session_resumption: true,
            },
            timeouts: Timeouts {
                connect: self.connect_timeout,
                handshake: self.handshake_timeout,
                idle: self.idle_timeout,
            },
            max_connections: self.max_connections,
        };
        let mut spec = common.spec(kind)?;
        spec.http = http;
        Ok(spec)
    }

    /// The HTTP settings, checked; keys of HTTP mode on a TCP listener are errors.
    fn http_spec(&self, at: &str, kind: &ListenerKind) -> Result<Option<HttpSpec>, ConfigError> {
        HttpKeys {
            protocol: self.protocol,
            identity_header: self.identity_header.as_deref(),
            xfcc: self.xfcc.as_ref(),
            pool: self.pool,
            authorization: &self.authorization,
            rego: self.rego.as_ref(),
            opa: self.opa.as_ref(),
            jwt: self.jwt.as_ref(),
            max_request_headers_kb: self.max_request_headers_kb,
            request_header_timeout: self.request_header_timeout,
            request_timeout: self.request_timeout,
            max_upstream_connections: self.max_upstream_connections,
        }
        .spec(at, matches!(kind, ListenerKind::Inbound(_)))
    }
}

/// The HTTP mode keys of one listener or transparent port, as written.
pub(super) struct HttpKeys<'a> {
    pub protocol: Protocol,
    pub identity_header: Option<&'a str>,
    pub xfcc: Option<&'a XfccConfig>,
    pub pool: Option<bool>,
    pub authorization: &'a [AuthorizationRuleConfig],
    pub rego: Option<&'a RegoConfig>,
    pub opa: Option<&'a OpaConfig>,
    pub jwt: Option<&'a JwtConfig>,
    pub max_request_headers_kb: Option<u32>,
    pub request_header_timeout: Option<Duration>,
    pub request_timeout: Option<Duration>,
    pub max_upstream_connections: Option<u32>,
}

impl HttpKeys<'_> {
    /// No HTTP keys set (transparent ports and routes set the few they have; JWT and
    /// the request limits take their defaults there).
    pub(super) fn none(protocol: Protocol) -> Self {
        HttpKeys {
            protocol,
            identity_header: None,
            xfcc: None,
            pool: None,
            authorization: &[],
            rego: None,
            opa: None,
            jwt: None,
            max_request_headers_kb: None,
            request_header_timeout: None,
            request_timeout: None,
            max_upstream_connections: None,
        }
    }

    /// The HTTP settings, checked; keys of HTTP mode on a TCP listener are errors, and
    /// so are keys of the other direction.
    pub(super) fn spec(&self, at: &str, inbound: bool) -> Result<Option<HttpSpec>, ConfigError> {
        let http_only = [
            ("identity_header", self.identity_header.is_some()),
            ("xfcc", self.xfcc.is_some()),
            ("pool", self.pool.is_some()),
            ("authorization", !self.authorization.is_empty()),
            ("rego", self.rego.is_some()),
            ("jwt", self.jwt.is_some()),
            (
                "max_request_headers_kb",
                self.max_request_headers_kb.is_some(),
            ),
            (
                "request_header_timeout",
                self.request_header_timeout.is_some(),
            ),
            ("request_timeout", self.request_timeout.is_some()),
            (
                "max_upstream_connections",
                self.max_upstream_connections.is_some(),
            ),
            ("opa", self.opa.is_some()),
        ];
        if self.protocol == Protocol::Tcp {
            if let Some((key, _)) = http_only.iter().find(|(_, set)| *set) {
                return Err(ConfigError::new(
                    format!("{at}.{key}"),
                    "only for HTTP listeners: set protocol: http",
                ));
            }
            return Ok(None);
        }
        let (wrong, side) = if inbound {
            (("pool", self.pool.is_some()), "outbound")
        } else if self.identity_header.is_some() {
            (("identity_header", true), "inbound")
        } else if !self.authorization.is_empty() {
            (("authorization", true), "inbound")
        } else if self.rego.is_some() {
            (("rego", true), "inbound")
        } else if self.opa.is_some() {
            (("opa", true), "inbound")
        } else {
            (("xfcc", self.xfcc.is_some()), "inbound")
        };
        if wrong.1 {
            return Err(ConfigError::new(
                format!("{at}.{}", wrong.0),
                format!("only for {side} listeners"),
            ));
        }
        let identity_header = match self.identity_header {
            Some(h) => Some(http::HeaderName::try_from(h).map_err(|_| {
                ConfigError::new(
                    format!("{at}.identity_header"),
                    format!("{h:?} is not a valid header name"),
                )
            })?),
            None => None,
        };
        const RESERVED: [&str; 13] = [
            "x-forwarded-client-cert",
            "host",
            "content-length",
            "content-type",
            "connection",
            "keep-alive",
            "proxy-connection",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "authorization",
            "cookie",
        ];
        if let Some(h) = identity_header
            .as_ref()
            .filter(|h| RESERVED.contains(&h.as_str()))
        {
            return Err(ConfigError::new(
                format!("{at}.identity_header"),
                format!("{h} has another meaning in HTTP (or is written by `xfcc`); choose a header of its own, such as X-Workload-ID"),
            ));
        }
        let (jwt_inbound, jwt_audience) = self.jwt_spec(at, inbound)?;
        // A `source: jwt` rule could never match on a listener that validates no
        // JWT-SVIDs: a DENY rule would silently do nothing, so it is refused.
        if let Some(i) = self
            .authorization
            .iter()
            .position(|r| r.source == super::raw::SourceConfig::Jwt)
            .filter(|_| jwt_inbound.is_none())
        {
            return Err(ConfigError::new(
                format!("{at}.authorization[{i}].source"),
                "jwt principals need JWT-SVID validation on this listener: add jwt: {audiences: [...]}",
            ));
        }
        let kb = self
            .max_request_headers_kb
            .unwrap_or(DEFAULT_MAX_REQUEST_HEADERS_KB);
        if !(MIN_REQUEST_HEADERS_KB..=MAX_REQUEST_HEADERS_KB).contains(&kb) {
            return Err(ConfigError::new(
                format!("{at}.max_request_headers_kb"),
                format!("{kb} is out of range: must be from {MIN_REQUEST_HEADERS_KB} to {MAX_REQUEST_HEADERS_KB} (KiB)"),
            ));
        }
        let request_header_timeout = self
            .request_header_timeout
            .unwrap_or(Duration::from_secs(10));
        let upstream = self
            .max_upstream_connections
            .unwrap_or(DEFAULT_MAX_UPSTREAM_CONNECTIONS);
        if upstream == 0 {
            return Err(ConfigError::new(
                format!("{at}.max_upstream_connections"),
                "must be at least 1",
            ));
        }
        let limits = HttpLimits {
            max_request_headers: kb as usize * 1024,
            request_header_timeout,
            request_timeout: self.request_timeout.unwrap_or(Duration::from_secs(15)),
            max_upstream_connections: upstream as usize,
        };
        let rules = super::authorization::authorization_rules(
            &format!("{at}.authorization"),
            self.authorization,
        )?;
        let opa = match self.opa {
            Some(o) => Some(opa_settings(&format!("{at}.opa"), o)?),
            None => None,
        };
        Ok(Some(HttpSpec {
            identity_header,
            // Envoy's mode for a mesh sidecar: the caller's own entry, forged ones gone.
            xfcc: inbound.then(|| {
                self.xfcc.cloned().unwrap_or(XfccConfig {
                    mode: Default::default(),
                    details: vec![super::raw::XfccDetail::Uri],
                })
            }),
            pool: self.pool.unwrap_or(true),
            rules: std::sync::Arc::new(rules),
            rego: self.rego.cloned(),
            jwt_inbound,
            jwt_audience,
            limits,
            opa,
        }))
    }

    /// `jwt:` of an HTTP listener: inbound needs a non-empty `audiences`, outbound one
    /// `audience`; each side's keys are refused on the other.
    #[allow(clippy::type_complexity)]
    fn jwt_spec(
        &self,
        at: &str,
        inbound: bool,
    ) -> Result<(Option<JwtInboundSpec>, Option<String>), ConfigError> {
        let Some(j) = self.jwt else {
            return Ok((None, None));
        };
        let key = |k: &str| format!("{at}.jwt.{k}");
        if inbound {
            if j.audience.is_some() {
                return Err(ConfigError::new(
                    key("audience"),
                    "only for outbound listeners; inbound lists the accepted ones in audiences",
                ));
            }
            let audiences = j.audiences.clone().unwrap_or_default();
            if audiences.is_empty() || audiences.iter().any(|a| a.is_empty()) {
                return Err(ConfigError::new(
                    key("audiences"),
                    "empty: list the audiences a token must name (aud), such as this service's name",
                ));
            }
            return Ok((
                Some(JwtInboundSpec {
                    audiences,
                    required: j.required.unwrap_or(false),
                    leeway: j.leeway.unwrap_or(DEFAULT_JWT_LEEWAY),
                }),
                None,
            ));
        }
        for (k, set) in [
            ("audiences", j.audiences.is_some()),
            ("required", j.required.is_some()),
            ("leeway", j.leeway.is_some()),
        ] {
            if set {
                return Err(ConfigError::new(
                    key(k),
                    "only for inbound listeners; outbound sets one audience",
                ));
            }
        }
        match &j.audience {
            Some(a) if !a.is_empty() => Ok((None, Some(a.clone()))),
            _ => Err(ConfigError::new(
                key("audience"),
                "required: the audience of the JWT-SVID to send (the peer's inbound audiences)",
            )),
        }
    }
}

/// `opa:` checked: a plain `http://` URL with a host and the rule's path, a timeout
/// that is not zero.
fn opa_settings(at: &str, c: &OpaConfig) -> Result<OpaSettings, ConfigError> {
    let url: http::Uri = c.url.parse().map_err(|_| {
        ConfigError::new(
            format!("{at}.url"),
            format!(
                "{:?} is not a URL (write http://127.0.0.1:8181/v1/data/authz/allow)",
                c.url
            ),
        )
    })?;
    if url.scheme_str() != Some("http") {
        return Err(ConfigError::new(
            format!("{at}.url"),
            format!(
                "{:?}: must be http:// (OPA beside the app, on loopback or the pod network; https is not supported)",
                c.url
            ),
        ));
    }
    if url.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(ConfigError::new(
            format!("{at}.url"),
            "credentials in the URL are not supported (the URL is written in logs)",
        ));
    }
    if url.host().is_none_or(str::is_empty) {
        return Err(ConfigError::new(
            format!("{at}.url"),
            format!("{:?} names no host", c.url),
        ));
    }
    if matches!(url.path(), "" | "/") {
        return Err(ConfigError::new(
            format!("{at}.url"),
            format!(
                "{:?} names no rule: add the Data API path, like /v1/data/authz/allow",
                c.url
            ),
        ));
    }
    if c.timeout.is_zero() {
        return Err(ConfigError::new(
            format!("{at}.timeout"),
            "must be more than 0 (default 1s)",
        ));
    }
    Ok(OpaSettings {
        url,
        timeout: c.timeout,
        on_error: match c.on_error {
            OnErrorConfig::Deny => OnError::Deny,
            OnErrorConfig::Allow => OnError::Allow,
        },
    })
}

/// An allowlist at `key`: empty is an error unless any ID of our trust domain is allowed
/// (a listener that refuses every peer is a mistake).
pub(super) fn checked_allow_list(
    key: &str,
    list: &[MatcherConfig],
    any_in_own_trust_domain: bool,
) -> Result<AllowList, ConfigError> {
    if list.is_empty() && !any_in_own_trust_domain {
        return Err(ConfigError::new(
            key,
            "empty: it would refuse every peer; list SPIFFE IDs or set allow_any_in_trust_domain: true",
        ));
    }
    allow_list(list, any_in_own_trust_domain)
        .map_err(|(i, p)| ConfigError::new(format!("{key}[{i}]"), p))
}

/// What every kind of listener has, before it is checked.
pub(super) struct Common<'a> {
    pub name: &'a str,
    pub at: &'a str,
    pub listen: SocketAddr,
    pub tls: TlsSpec,
    pub timeouts: Timeouts,
    pub max_connections: usize,
}

impl Common<'_> {
    pub(super) fn spec(self, kind: ListenerKind) -> Result<ListenerSpec, ConfigError> {
        if self.max_connections == 0 || self.max_connections > super::MAX_CONNECTIONS {
            return Err(ConfigError::new(
                format!("{}.max_connections", self.at),
                format!("must be from 1 to {}", super::MAX_CONNECTIONS),
            ));
        }
        Ok(ListenerSpec {
            name: self.name.into(),
            key: self.at.to_string(),
            listen: self.listen,
            kind,
            http: None,
            tls: self.tls,
            timeouts: self.timeouts,
            max_connections: self.max_connections,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::Config;

    fn http(extra: &str) -> Result<Config, String> {
        Config::parse(&format!(
            r#"
identity:
  dev: {{trust_domain: example.org, spiffe_id: "spiffe://example.org/ns/default/sa/web"}}
inbound:
  - name: web
    listen: 127.0.0.1:8443
    forward: 127.0.0.1:8080
    allow: [{{trust_domain: example.org}}]
{extra}"#
        ))
        .map_err(|e| e.to_string())
    }

    /// Defaults as Envoy's; each bad value names its key and the problem.
    #[test]
    fn http_limits_defaults_and_errors() {
        let c = http("    protocol: http\n").unwrap();
        let l = c.listeners[0].http.as_ref().unwrap().limits;
        assert_eq!(l.max_request_headers, 60 * 1024);
        assert_eq!(l.request_header_timeout, Duration::from_secs(10));
        assert_eq!(l.request_timeout, Duration::from_secs(15));
        assert_eq!(l.max_upstream_connections, 1024);
        let c = http(
            "    protocol: http\n    request_timeout: 2m\n    max_request_headers_kb: 96\n    max_upstream_connections: 8\n",
        )
        .unwrap();
        let l = c.listeners[0].http.as_ref().unwrap().limits;
        assert_eq!(l.request_timeout, Duration::from_secs(120));
        assert_eq!(l.max_request_headers, 96 * 1024);
        assert_eq!(l.max_upstream_connections, 8);
        let e = http("    protocol: http\n    max_upstream_connections: 0\n").unwrap_err();
        assert!(
            e.starts_with("inbound[0].max_upstream_connections: must be at least 1"),
            "{e}"
        );
        let e = http("    protocol: http\n    max_request_headers_kb: 9000\n").unwrap_err();
        assert!(
            e.starts_with("inbound[0].max_request_headers_kb: 9000 is out of range"),
            "{e}"
        );
        let e = http("    protocol: http\n    request_header_timeout: 0s\n").unwrap_err();
        assert!(
            e.starts_with("inbound[0].request_header_timeout: duration must be greater than zero"),
            "{e}"
        );
        let e = http("    request_timeout: 5s\n").unwrap_err();
        assert!(
            e.starts_with("inbound[0].request_timeout: only for HTTP listeners"),
            "{e}"
        );
    }
}
