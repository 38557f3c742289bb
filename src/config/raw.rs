//! The config file as written: serde structs that mirror the YAML, with defaults.
//! Nothing here is validated; `config::Config` is built from these once, and a reload
//! compares two of them (hence `PartialEq`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::values::duration;

// SPIRE Agent's default resource names: the one place they are spelled (the SDS
// server's own defaults use these too).
/// SPIRE Agent's name for "the default SVID".
pub const DEFAULT_SVID_NAME: &str = "default";
/// SPIRE Agent's name for "our own trust domain's bundle".
pub const DEFAULT_BUNDLE_NAME: &str = "ROOTCA";
/// SPIRE Agent's name for "every bundle, with the SPIFFE validator".
pub const DEFAULT_ALL_BUNDLES_NAME: &str = "ALL";

/// The whole file as written.
#[derive(Debug, Deserialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Runtime worker threads; default: the cores available. `1` pins the proxy to
    /// one core, as Envoy's `--concurrency 1`.
    #[serde(default)]
    pub worker_threads: Option<usize>,
    pub identity: IdentityConfigRaw,
    #[serde(default)]
    pub inbound: Vec<ListenerConfig>,
    #[serde(default)]
    pub outbound: Vec<ListenerConfig>,
    #[serde(default)]
    pub admin: Option<AdminConfig>,
    #[serde(default)]
    pub tls: TlsConfig,
    /// How long live connections may finish after SIGTERM before they are closed.
    #[serde(default = "default_drain", deserialize_with = "duration")]
    pub drain_timeout: Duration,
    /// Also close a live connection when its peer's SVID expires (checked every
    /// second). Off by default, as in Envoy: a handshake's check holds for the
    /// connection's life unless a reload or a bundle change revokes it.
    #[serde(default)]
    pub close_expired_peers: bool,
    #[serde(default)]
    pub log: LogConfig,
    /// Envoy's Secret Discovery Service, served from the same identity.
    #[serde(default)]
    pub sds: Option<SdsConfig>,
    /// Transparent mTLS: the pod's traffic redirected to svidcar (`svidcar redirect`).
    #[serde(default)]
    pub transparent: Option<TransparentConfig>,
}

/// `sds`: where and how to serve SDS.
#[derive(Debug, Deserialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SdsConfig {
    /// `unix:///run/svidcar/sds.sock` and/or `tcp://127.0.0.1:15010`.
    pub listen: OneOrMany,
    /// Mode of the unix socket, octal text: "0660" (default).
    #[serde(default = "default_socket_mode")]
    pub socket_mode: String,
    /// Callers (SO_PEERCRED) allowed on the unix socket; empty: any that can open it.
    #[serde(default)]
    pub allowed_uids: Vec<u32>,
    #[serde(default)]
    pub allowed_gids: Vec<u32>,
    #[serde(default = "default_svid_name")]
    pub default_svid_name: String,
    #[serde(default = "default_bundle_name")]
    pub default_bundle_name: String,
    #[serde(default = "default_all_bundles_name")]
    pub default_all_bundles_name: String,
    /// As SPIRE Agent: bundles go to an Envoy 1.18 or newer with Envoy's SPIFFE
    /// validator, to older ones (and clients that send no build version) as
    /// `trusted_ca`. `true` serves `trusted_ca` to every Envoy; a node's metadata key
    /// `disable_spiffe_cert_validation` overrides this per Envoy.
    #[serde(default)]
    pub disable_spiffe_cert_validation: bool,
    /// The old switch (before per-Envoy choice). Read only to say what to write instead.
    #[serde(default)]
    pub spiffe_cert_validation: Option<serde_norway::Value>,
    /// Allow private keys over TCP (off: keys only over the unix socket). Only loopback
    /// TCP addresses may carry keys.
    #[serde(default)]
    pub tcp_allow_keys: bool,
    /// Open SDS streams at most, per listener: each listener has its own pool, so
    /// clients of one (say, TCP) can never use up the streams of another (the socket).
    #[serde(default = "default_max_streams")]
    pub max_streams: usize,
    /// Concurrent streams one connection may open (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS);
    /// default 128, or `max_streams` when that is smaller.
    #[serde(default)]
    pub max_streams_per_connection: Option<u32>,
}

/// One value or a list of them.
#[derive(Debug, Deserialize, Clone, PartialEq)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s.clone()],
            Self::Many(v) => v.clone(),
        }
    }
}

fn default_socket_mode() -> String {
    "0660".into()
}
fn default_svid_name() -> String {
    DEFAULT_SVID_NAME.into()
}
fn default_bundle_name() -> String {
    DEFAULT_BUNDLE_NAME.into()
}
fn default_all_bundles_name() -> String {
    DEFAULT_ALL_BUNDLES_NAME.into()
}
fn default_max_streams() -> usize {
    1024
}

#[derive(Debug, Deserialize, Default, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter (`info`, `svidcar=debug`); `RUST_LOG` overrides it.
    #[serde(default)]
    pub level: Option<String>,
}

#[derive(Debug, Deserialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// The app's original `httpGet` probes (JSON by `container/probe`), answered at
    /// `/app-health/<container>/<probe>`; `svidcar inject` sets it.
    #[serde(default)]
    pub app_probes: Option<std::path::PathBuf>,
    /// `/ready` says 503 once the default SVID expires within this and no renewal has
    /// come (e.g. `5m`; SPIRE renews at half-life). Default 0: only an expired SVID.
    #[serde(default, deserialize_with = "duration")]
    pub ready_min_svid_validity: Duration,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Lowest TLS version accepted or offered: `"1.3"` (default) or `"1.2"`.
    #[serde(default)]
    pub min_version: TlsVersion,
    /// Resume TLS sessions (tickets), every resumed peer checked again: see
    /// `tls::resumption`. Default true; false forces a full handshake per connection.
    #[serde(default = "default_true")]
    pub session_resumption: bool,
}

fn default_true() -> bool {
    true
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            min_version: TlsVersion::default(),
            session_resumption: true,
        }
    }
}

#[derive(Debug, Deserialize, Default, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersion {
    #[serde(rename = "1.2")]
    V1_2,
    #[default]
    #[serde(rename = "1.3")]
    V1_3,
}

/// The `identity` key as written: exactly one of its sources must be set.
#[derive(Debug, Deserialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfigRaw {
    #[serde(default)]
    pub dev: Option<DevConfigRaw>,
    #[serde(default)]
    pub files: Option<FilesConfig>,
    #[serde(default)]
    pub workload_api: Option<WorkloadApiConfigRaw>,
}

/// `identity.workload_api` as written.
#[derive(Debug, Deserialize, Default, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WorkloadApiConfigRaw {
    /// `unix:///path`, `unix:/path` or `/path`; default: `SPIFFE_ENDPOINT_SOCKET`.
    #[serde(default)]
    pub socket: Option<String>,
    /// Use this SVID as the default instead of the first one.
    #[serde(default)]
    pub spiffe_id: Option<String>,
    /// Or select the default SVID by its hint.
    #[serde(default)]
    pub hint: Option<String>,
}

#[derive(Debug, Deserialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DevConfigRaw {
    #[serde(default)]
    pub trust_domain: Option<String>,
    pub spiffe_id: String,
    #[serde(default = "default_svid_ttl", deserialize_with = "duration")]
    pub svid_ttl: Duration,
    #[serde(default)]
    pub ca_cert: Option<PathBuf>,
    #[serde(default)]
    pub ca_key: Option<PathBuf>,
    #[serde(default)]
    pub bundle_out: Option<PathBuf>,
}

#[derive(Debug, Deserialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FilesConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The bundle of our own trust domain.
    #[serde(default)]
    pub bundle: Option<PathBuf>,
    /// Further bundles keyed by trust domain name (federation).
    #[serde(default)]
    pub bundles: BTreeMap<String, PathBuf>,
    /// JWT bundles (JWKS files) keyed by trust domain name, for validating JWT-SVIDs.
    #[serde(default)]
    pub jwt_bundles: BTreeMap<String, PathBuf>,
}

/// One listener, inbound or outbound. Inbound uses `forward` and `allow`; outbound
/// uses `connect`, `expect` and `sni`.
#[derive(Debug, Deserialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub name: String,
    pub listen: SocketAddr,
    #[serde(default)]
    pub forward: Option<String>,
    #[serde(default)]
    pub connect: Option<String>,
    #[serde(default)]
    pub allow: Vec<MatcherConfig>,
    #[serde(default)]
    pub expect: Vec<MatcherConfig>,
    /// Accept any SPIFFE ID of our own trust domain (when the list is empty).
    #[serde(default)]
    pub allow_any_in_trust_domain: bool,
    /// Server name sent by an outbound listener; default: the host of `connect`.
    #[serde(default)]
    pub sni: Option<String>,
    /// ALPN protocols to offer (outbound) or accept (inbound).
    #[serde(default)]
    pub alpn: Vec<String>,
    #[serde(default = "default_connect_timeout", deserialize_with = "duration")]
    pub connect_timeout: Duration,
    #[serde(default = "default_handshake_timeout", deserialize_with = "duration")]
    pub handshake_timeout: Duration,
    #[serde(default = "default_idle_timeout", deserialize_with = "duration")]
    pub idle_timeout: Duration,
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Overrides the top-level `tls.min_version` for this listener.
    #[serde(default)]
    pub tls_min_version: Option<TlsVersion>,
    /// `tcp` (default): bytes; `http`: requests (identity headers, per-route rules).
    #[serde(default)]
    pub protocol: Protocol,
    /// HTTP inbound: a header that carries the caller's SPIFFE ID to the app
    /// (`X-Workload-ID`); a copy the caller sent is always removed first.
    #[serde(default)]
    pub identity_header: Option<String>,
    /// HTTP inbound: Envoy's `x-forwarded-client-cert` handling.
    #[serde(default)]
    pub xfcc: Option<XfccConfig>,
    /// HTTP outbound: keep mTLS connections to the peer open and reuse them (default).
    #[serde(default)]
    pub pool: Option<bool>,
    /// HTTP inbound: per-route rules, Istio AuthorizationPolicy semantics.
    #[serde(default)]
    pub authorization: Vec<AuthorizationRuleConfig>,
    /// HTTP inbound: Rego policies evaluated in-process for each request.
    #[serde(default)]
    pub rego: Option<RegoConfig>,
    /// HTTP: JWT-SVIDs; inbound validates `Authorization: Bearer`, outbound sets it.
    #[serde(default)]
    pub jwt: Option<JwtConfig>,
    /// Inbound TCP: a PROXY protocol header to the app before the caller's bytes.
    #[serde(default)]
    pub proxy_protocol: Option<ProxyProtocolConfig>,
    /// HTTP: the largest request head (request line and headers) accepted, in KiB;
    /// larger ones get 431. Default 60, as Envoy.
    #[serde(default)]
    pub max_request_headers_kb: Option<u32>,
    /// HTTP: how long a client may take to send a request head (and, on a new
    /// connection, its first byte); a slow one is disconnected. Default 10s.
    #[serde(default, deserialize_with = "opt_duration")]
    pub request_header_timeout: Option<Duration>,
    /// HTTP: how long the upstream may take to answer a request (its response head);
    /// then 504. Default 15s, as Envoy's route timeout.
    #[serde(default, deserialize_with = "opt_duration")]
    pub request_timeout: Option<Duration>,
    /// HTTP: the most connections open to the upstream at once (pooled and busy);
    /// a request that needs one more gets 503. Default 1024, as Envoy's circuit breaker.
    #[serde(default)]
    pub max_upstream_connections: Option<u32>,
    /// HTTP inbound: an external OPA asked for each request over its REST Data API.
    #[serde(default)]
    pub opa: Option<OpaConfig>,
}

/// `proxy_protocol: v2`, or `{version: v2, spiffe_id_tlv: 0xE1}`.
#[derive(Debug, Deserialize, Clone, PartialEq)]
#[serde(untagged)]
pub enum ProxyProtocolConfig {
    Version(String),
    Full {
        version: String,
        #[serde(default)]
        spiffe_id_tlv: Option<u8>,
    },
}

/// `jwt`: inbound `{audiences: [..], required: true|false, leeway: 30s}`, outbound
/// `{audience: X}`. One struct for both sides, so a key of the other side gets a keyed
/// error from the listener check rather than serde's "unknown field".
#[derive(Debug, Deserialize, Clone, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    #[serde(default)]
    pub audiences: Option<Vec<String>>,
    #[serde(default)]
    pub required: Option<bool>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub leeway: Option<Duration>,
    #[serde(default)]
    pub audience: Option<String>,
}

fn opt_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

/// `opa`: where OPA's Data API answers for the deciding rule, how long to wait, and
/// what to do when it cannot answer.
#[derive(Debug, Deserialize, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct OpaConfig {
    /// `http://127.0.0.1:8181/v1/data/authz/allow`: plain HTTP (OPA runs beside us).
    pub url: String,
    /// The whole exchange (connect, request, answer); default 1 s.
    #[serde(default = "default_opa_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// When OPA is down, slow or answers garbage: `deny` (default) or `allow`.
    #[serde(default)]
    pub on_error: OnErrorConfig,
}

/// What an OPA failure decides.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnErrorConfig {
    #[default]
    Deny,
    Allow,
}

fn default_opa_timeout() -> Duration {
    Duration::from_secs(1)
}

/// `rego`: policy files (relative to the config file) and the rule that decides.
#[derive(Debug, Deserialize, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RegoConfig {
    pub policy: Vec<PathBuf>,
    pub query: String,
}

/// What a listener carries.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Http,
}

/// `xfcc`: Envoy's `forward_client_cert_details` and `set_current_client_cert_details`.
#[derive(Debug, Deserialize, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct XfccConfig {
    #[serde(default)]
    pub mode: XfccModeConfig,
    /// Fields of the caller's certificate to set: `uri`, `dns`, `subject`, `cert`, `chain`.
    #[serde(default = "default_xfcc_details")]
    pub details: Vec<XfccDetail>,
}

/// Envoy's modes, spelled in lower case.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum XfccModeConfig {
    Sanitize,
    ForwardOnly,
    AppendForward,
    #[default]
    SanitizeSet,
    AlwaysForwardOnly,
}

/// One field of `set_current_client_cert_details`.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum XfccDetail {
    Uri,
    Dns,
    Subject,
    Cert,
    Chain,
}

fn default_xfcc_details() -> Vec<XfccDetail> {
    vec![XfccDetail::Uri]
}

/// An Envoy `StringMatcher` applied to the peer's SPIFFE ID, or `trust_domain`.
#[derive(Debug, Deserialize, Clone, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MatcherConfig {
    #[serde(default)]
    pub exact: Option<String>,
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub suffix: Option<String>,
    #[serde(default)]
    pub contains: Option<String>,
    #[serde(default)]
    pub safe_regex: Option<SafeRegex>,
    #[serde(default)]
    pub ignore_case: bool,
    #[serde(default)]
    pub trust_domain: Option<String>,
}

#[derive(Debug, Deserialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SafeRegex {
    pub regex: String,
}

fn default_drain() -> Duration {
    Duration::from_secs(10)
}
fn default_svid_ttl() -> Duration {
    Duration::from_secs(3600)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(3600)
}
fn default_max_connections() -> usize {
    10_000
}

/// `transparent`: a pair of listeners fed by redirect rules, and what the rules need.
#[derive(Debug, Deserialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TransparentConfig {
    /// The uid svidcar runs as: its own traffic is never redirected (the loop breaker).
    pub proxy_uid: u32,
    /// The gid excluded likewise; default: `proxy_uid`.
    #[serde(default)]
    pub proxy_gid: Option<u32>,
    #[serde(default)]
    pub inbound: Option<TransparentInboundConfig>,
    #[serde(default)]
    pub outbound: Option<TransparentOutboundConfig>,
}

/// `strict`: mTLS only; `permissive`: mTLS when the client speaks TLS, else plaintext.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Strict,
    Permissive,
}

/// `transparent.inbound`: connections redirected from the pod's ports.
#[derive(Debug, Deserialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TransparentInboundConfig {
    pub listen: SocketAddr,
    #[serde(default)]
    pub mode: Mode,
    #[serde(default)]
    pub allow: Vec<MatcherConfig>,
    #[serde(default)]
    pub allow_any_in_trust_domain: bool,
    /// Overrides by original destination port (`"9090": {mode: permissive}`).
    #[serde(default)]
    pub ports: BTreeMap<String, PortConfig>,
    /// Only these ports are redirected (Istio's `includeInboundPorts`); empty: all.
    #[serde(default)]
    pub include_ports: Vec<u16>,
    /// Ports never redirected (ssh, a port the app must serve itself).
    #[serde(default)]
    pub exclude_ports: Vec<u16>,
    /// How long permissive mode waits for a client's first bytes before it treats the
    /// connection as plaintext (server-speaks-first protocols send nothing first).
    #[serde(default = "default_detect_timeout", deserialize_with = "duration")]
    pub detect_timeout: Duration,
    /// Ports whose protocol speaks first from the server: no detection, plaintext at
    /// once in permissive mode. Default: Linkerd's list.
    #[serde(default = "default_server_first_ports")]
    pub server_first_ports: Vec<u16>,
    /// What ports carry unless `ports` says otherwise: `tcp` (default) or `http`.
    #[serde(default)]
    pub protocol: Protocol,
    /// HTTP ports: the header that carries the caller's SPIFFE ID to the app (default
    /// for every HTTP port; a port may set its own).
    #[serde(default)]
    pub identity_header: Option<String>,
    /// HTTP ports: `x-forwarded-client-cert` handling (default for every HTTP port).
    #[serde(default)]
    pub xfcc: Option<XfccConfig>,
    /// HTTP ports: per-route rules (default for every HTTP port).
    #[serde(default)]
    pub authorization: Vec<AuthorizationRuleConfig>,
    /// HTTP ports: Rego policies (default for every HTTP port).
    #[serde(default)]
    pub rego: Option<RegoConfig>,
    /// HTTP ports: an external OPA (default for every HTTP port).
    #[serde(default)]
    pub opa: Option<OpaConfig>,
    #[serde(default = "default_connect_timeout", deserialize_with = "duration")]
    pub connect_timeout: Duration,
    #[serde(default = "default_handshake_timeout", deserialize_with = "duration")]
    pub handshake_timeout: Duration,
    #[serde(default = "default_idle_timeout", deserialize_with = "duration")]
    pub idle_timeout: Duration,
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    #[serde(default)]
    pub tls_min_version: Option<TlsVersion>,
}

/// One original destination port's overrides.
#[derive(Debug, Deserialize, Clone, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct PortConfig {
    #[serde(default)]
    pub mode: Option<Mode>,
    #[serde(default)]
    pub allow: Option<Vec<MatcherConfig>>,
    #[serde(default)]
    pub allow_any_in_trust_domain: Option<bool>,
    /// `tcp` or `http`; default: the listener's `protocol`.
    #[serde(default)]
    pub protocol: Option<Protocol>,
    /// HTTP keys of this port; each one absent takes the listener's.
    #[serde(default)]
    pub identity_header: Option<String>,
    #[serde(default)]
    pub xfcc: Option<XfccConfig>,
    #[serde(default)]
    pub authorization: Option<Vec<AuthorizationRuleConfig>>,
    #[serde(default)]
    pub rego: Option<RegoConfig>,
    #[serde(default)]
    pub opa: Option<OpaConfig>,
}

/// What the outbound listener does with a destination no route matches.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Otherwise {
    /// Plain TCP to the original destination (services outside the mesh keep working).
    #[default]
    Passthrough,
    /// Refused, logged and counted.
    Deny,
}

/// `transparent.outbound`: the app's connections, redirected.
#[derive(Debug, Deserialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TransparentOutboundConfig {
    pub listen: SocketAddr,
    /// First match wins.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    #[serde(default)]
    pub otherwise: Otherwise,
    #[serde(default)]
    pub exclude_ports: Vec<u16>,
    #[serde(default)]
    pub exclude_cidrs: Vec<String>,
    #[serde(default = "default_connect_timeout", deserialize_with = "duration")]
    pub connect_timeout: Duration,
    #[serde(default = "default_handshake_timeout", deserialize_with = "duration")]
    pub handshake_timeout: Duration,
    #[serde(default = "default_idle_timeout", deserialize_with = "duration")]
    pub idle_timeout: Duration,
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    #[serde(default)]
    pub tls_min_version: Option<TlsVersion>,
}

/// Destinations reached over mTLS, and the SPIFFE IDs they must present.
#[derive(Debug, Deserialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// IP addresses and CIDRs.
    pub to: Vec<String>,
    /// Destination ports; empty: all.
    #[serde(default)]
    pub ports: Vec<u16>,
    #[serde(default)]
    pub expect: Vec<MatcherConfig>,
    #[serde(default)]
    pub allow_any_in_trust_domain: bool,
    /// Server name to send; default: none (the destination is an IP address).
    #[serde(default)]
    pub sni: Option<String>,
    /// `tcp` (default): bytes; `http`: requests, over pooled mTLS connections.
    #[serde(default)]
    pub protocol: Protocol,
    /// HTTP routes: reuse mTLS connections to each destination (default true).
    #[serde(default)]
    pub pool: Option<bool>,
}

fn default_detect_timeout() -> Duration {
    Duration::from_secs(1)
}

/// Linkerd's default opaque ports: SMTP, MySQL, Galera, PostgreSQL, Redis,
/// Elasticsearch, Memcached: their servers speak first.
pub const SERVER_FIRST_PORTS: [u16; 8] = [25, 587, 3306, 4444, 5432, 6379, 9300, 11211];

fn default_server_first_ports() -> Vec<u16> {
    SERVER_FIRST_PORTS.to_vec()
}

// `authorization:` entries as written; checked and compiled by `authorization.rs`.

/// `action:` as Istio spells it.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
pub enum ActionConfig {
    #[serde(rename = "ALLOW", alias = "allow")]
    Allow,
    #[serde(rename = "DENY", alias = "deny")]
    Deny,
}

/// `source:`: which identity `principals` match.
#[derive(Debug, Deserialize, Clone, Copy, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SourceConfig {
    /// The peer's X509-SVID (mTLS).
    #[default]
    Peer,
    /// A validated JWT-SVID.
    Jwt,
}

/// One entry of `authorization:`.
#[derive(Debug, Deserialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationRuleConfig {
    pub action: ActionConfig,
    #[serde(default)]
    pub source: SourceConfig,
    #[serde(default)]
    pub principals: Option<Vec<MatcherConfig>>,
    #[serde(default)]
    pub methods: Option<Vec<String>>,
    #[serde(default)]
    pub paths: Option<Vec<PathMatcherConfig>>,
    #[serde(default)]
    pub not_paths: Option<Vec<PathMatcherConfig>>,
    #[serde(default)]
    pub ports: Option<Vec<RulePortConfig>>,
}

/// A path matcher: Istio's string form or a StringMatcher object.
#[derive(Debug, Clone, PartialEq)]
pub enum PathMatcherConfig {
    Istio(String),
    Matcher(PathStringMatcher),
}

impl<'de> Deserialize<'de> for PathMatcherConfig {
    /// By hand rather than `untagged`, so a typo in an object (`prefx:`) is reported
    /// as the unknown field it is, not as "did not match any variant".
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match serde_norway::Value::deserialize(d)? {
            serde_norway::Value::String(s) => Ok(PathMatcherConfig::Istio(s)),
            v @ serde_norway::Value::Mapping(_) => serde_norway::from_value(v)
                .map(PathMatcherConfig::Matcher)
                .map_err(serde::de::Error::custom),
            _ => Err(serde::de::Error::custom(
                "expected a path string (Istio form) or a matcher such as {prefix: /v1/}",
            )),
        }
    }
}

/// An Envoy `StringMatcher` on the normalized path, or an Istio path `template`.
#[derive(Debug, Deserialize, Clone, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PathStringMatcher {
    #[serde(default)]
    pub exact: Option<String>,
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub suffix: Option<String>,
    #[serde(default)]
    pub contains: Option<String>,
    #[serde(default)]
    pub safe_regex: Option<SafeRegex>,
    #[serde(default)]
    pub template: Option<String>,
    #[serde(default)]
    pub ignore_case: bool,
}

/// A port as a number or, as Istio writes it, a string (`"8080"`).
#[derive(Debug, Deserialize, Clone, PartialEq)]
#[serde(untagged)]
pub enum RulePortConfig {
    Number(u16),
    Text(String),
}
