//! The one typed configuration, read from YAML and validated with errors that name
//! the key and the problem (`inbound[0].listen: invalid socket address syntax`).

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::authz::{IdRule, SpiffeIdMatcher};
use crate::spiffe::{parse_trust_domain, SpiffeId, TrustDomain};

/// A configuration problem: where it is and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct ConfigError {
    pub key: String,
    pub problem: String,
}

impl ConfigError {
    pub(crate) fn new(key: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            problem: problem.into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
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
    #[serde(default)]
    pub log: LogConfig,
    /// Envoy's Secret Discovery Service, served from the same identity.
    #[serde(default)]
    pub sds: Option<SdsConfig>,
}

/// `sds`: where and how to serve SDS.
#[derive(Debug, Deserialize, Clone)]
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
#[derive(Debug, Deserialize, Clone)]
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
    "default".into()
}
fn default_bundle_name() -> String {
    "ROOTCA".into()
}
fn default_all_bundles_name() -> String {
    "ALL".into()
}
fn default_max_streams() -> usize {
    1024
}

impl SdsConfig {
    /// The per-connection stream cap in effect.
    pub fn streams_per_connection(&self) -> u32 {
        self.max_streams_per_connection
            .unwrap_or_else(|| u32::try_from(self.max_streams).unwrap_or(u32::MAX).min(128))
    }

    /// Checks the section; returns the listen addresses and the socket mode.
    pub fn validate(&self) -> Result<(Vec<Endpoint>, u32), ConfigError> {
        let mut out = Vec::new();
        let list = self.listen.to_vec();
        if list.is_empty() {
            return Err(ConfigError::new("sds.listen", "no address"));
        }
        for (i, a) in list.iter().enumerate() {
            let at = format!("sds.listen[{i}]");
            let l = parse_endpoint(a, true).map_err(|p| ConfigError::new(at, p))?;
            out.push(l);
        }
        let mode = u32::from_str_radix(self.socket_mode.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| {
                ConfigError::new(
                    "sds.socket_mode",
                    format!("{:?} is not an octal mode like \"0660\"", self.socket_mode),
                )
            })?;
        let names = [
            ("sds.default_svid_name", &self.default_svid_name),
            ("sds.default_bundle_name", &self.default_bundle_name),
            (
                "sds.default_all_bundles_name",
                &self.default_all_bundles_name,
            ),
        ];
        for (i, (key, name)) in names.iter().enumerate() {
            if name.is_empty() {
                return Err(ConfigError::new(*key, "must not be empty"));
            }
            if names[..i].iter().any(|(_, other)| other == name) {
                return Err(ConfigError::new(
                    *key,
                    format!("{name:?} is used by another default name"),
                ));
            }
        }
        if self.max_streams == 0 || self.max_streams > MAX_CONNECTIONS {
            return Err(ConfigError::new(
                "sds.max_streams",
                format!("must be from 1 to {MAX_CONNECTIONS}"),
            ));
        }
        let per_conn = self.streams_per_connection();
        if per_conn == 0 || per_conn as usize > self.max_streams {
            return Err(ConfigError::new(
                "sds.max_streams_per_connection",
                format!("must be from 1 to sds.max_streams ({})", self.max_streams),
            ));
        }
        if self.spiffe_cert_validation.is_some() {
            return Err(ConfigError::new(
                "sds.spiffe_cert_validation",
                "was replaced by SPIRE's `disable_spiffe_cert_validation`: the SPIFFE validator now goes to every Envoy 1.18 or newer; write `disable_spiffe_cert_validation: true` to serve trusted_ca to all, or remove the key",
            ));
        }
        if self.tcp_allow_keys {
            for (i, l) in out.iter().enumerate() {
                if let Endpoint::Tcp(addr) = l {
                    if !addr.ip().is_loopback() {
                        return Err(ConfigError::new(
                            "sds.tcp_allow_keys",
                            format!(
                                "private keys may go over TCP only on a loopback address, but sds.listen[{i}] is tcp://{addr}: listen on 127.0.0.1 or [::1], or serve keys over the unix socket"
                            ),
                        ));
                    }
                }
            }
        }
        Ok((out, mode))
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter (`info`, `svidcar=debug`); `RUST_LOG` overrides it.
    #[serde(default)]
    pub level: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub listen: SocketAddr,
}

#[derive(Debug, Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Lowest TLS version accepted or offered: `"1.3"` (default) or `"1.2"`.
    #[serde(default)]
    pub min_version: TlsVersion,
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
#[derive(Debug, Deserialize)]
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
#[derive(Debug, Deserialize, Default)]
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

#[derive(Debug, Clone)]
pub struct WorkloadApiConfig {
    pub socket: PathBuf,
    pub spiffe_id: Option<SpiffeId>,
    pub hint: Option<String>,
}

/// A gRPC endpoint as users write it: a unix socket or a TCP address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unix(p) => write!(f, "unix://{}", p.display()),
            Self::Tcp(a) => write!(f, "tcp://{a}"),
        }
    }
}

/// Reads a socket address the one way svidcar reads them everywhere, as SPIFFE
/// libraries do: `unix:///path`, `unix:/path` or a bare absolute `/path`; and, where
/// `tcp` allows it, `tcp://IP:PORT`.
pub fn parse_endpoint(addr: &str, tcp: bool) -> Result<Endpoint, String> {
    let expected = if tcp {
        "expected unix:///path/to.sock, unix:/path/to.sock, /path/to.sock or tcp://IP:PORT"
    } else {
        "expected unix:///path/to.sock, unix:/path/to.sock or /path/to.sock"
    };
    if let Some(hp) = addr.strip_prefix("tcp://") {
        if !tcp {
            return Err(format!(
                "{addr:?}: only unix sockets are supported here; {expected}"
            ));
        }
        return hp
            .parse()
            .map(Endpoint::Tcp)
            .map_err(|_| format!("{addr:?}: {expected} (TCP takes an IP address and a port)"));
    }
    let path = if let Some(rest) = addr.strip_prefix("unix://") {
        rest
    } else if let Some(rest) = addr.strip_prefix("unix:") {
        rest
    } else if addr.starts_with('/') {
        addr
    } else {
        return Err(format!("{addr:?}: {expected}"));
    };
    if !path.starts_with('/') {
        return Err(format!(
            "{addr:?}: the socket path must be absolute; {expected}"
        ));
    }
    Ok(Endpoint::Unix(PathBuf::from(path)))
}

/// A Workload API address: a unix socket, written as [`parse_endpoint`] reads them.
pub fn parse_workload_socket(addr: &str) -> Result<PathBuf, String> {
    match parse_endpoint(addr, false)? {
        Endpoint::Unix(p) => Ok(p),
        Endpoint::Tcp(_) => Err(format!("{addr:?}: only unix sockets are supported")),
    }
}

#[derive(Debug, Clone)]
pub enum IdentityConfig {
    Dev(DevConfig),
    Files(FilesConfig),
    WorkloadApi(WorkloadApiConfig),
}

#[derive(Debug, Deserialize)]
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

#[derive(Debug, Clone)]
pub struct DevConfig {
    pub trust_domain: TrustDomain,
    pub spiffe_id: SpiffeId,
    pub svid_ttl: Duration,
    /// Both or neither: the CA to load.
    pub ca: Option<(PathBuf, PathBuf)>,
    pub bundle_out: Option<PathBuf>,
}

#[derive(Debug, Deserialize, Clone)]
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
}

/// One listener, inbound or outbound. Inbound uses `forward` and `allow`; outbound
/// uses `connect`, `expect` and `sni`.
#[derive(Debug, Deserialize, Clone)]
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
}

/// An Envoy `StringMatcher` applied to the peer's SPIFFE ID, or `trust_domain`.
#[derive(Debug, Deserialize, Clone, Default)]
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

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct SafeRegex {
    pub regex: String,
}

impl MatcherConfig {
    /// The typed rule this entry means; the problem in words otherwise.
    fn to_rule(&self) -> Result<IdRule, String> {
        let e = self;
        let kinds = [
            e.exact.is_some(),
            e.prefix.is_some(),
            e.suffix.is_some(),
            e.contains.is_some(),
            e.safe_regex.is_some(),
            e.trust_domain.is_some(),
        ];
        if kinds.iter().filter(|k| **k).count() != 1 {
            return Err(
                "set exactly one of exact, prefix, suffix, contains, safe_regex, trust_domain"
                    .into(),
            );
        }
        let ignore_case = e.ignore_case;
        if ignore_case && (e.safe_regex.is_some() || e.trust_domain.is_some()) {
            return Err(
                "ignore_case has no effect on safe_regex or trust_domain (use (?i) in the regex)"
                    .into(),
            );
        }
        let fold = |s: &str| {
            if ignore_case {
                s.to_ascii_lowercase()
            } else {
                s.to_string()
            }
        };
        if let Some(x) = &e.exact {
            if !ignore_case {
                // An ID without a path names a trust domain: no SVID can carry it.
                crate::spiffe::parse_workload_id(x).map_err(|err| format!("exact: {err}"))?;
            }
            let value = fold(x);
            return Ok(IdRule::Exact { value, ignore_case });
        }
        if let Some(x) = &e.prefix {
            let value = fold(x);
            return Ok(IdRule::Prefix { value, ignore_case });
        }
        if let Some(x) = &e.suffix {
            let value = fold(x);
            return Ok(IdRule::Suffix { value, ignore_case });
        }
        if let Some(x) = &e.contains {
            let value = fold(x);
            return Ok(IdRule::Contains { value, ignore_case });
        }
        if let Some(r) = &e.safe_regex {
            let re = regex::Regex::new(&format!("^(?:{})$", r.regex)).map_err(|err| {
                // regex errors draw a caret over several lines; keep the last one.
                let text = err.to_string();
                let why = text.lines().last().unwrap_or_default().trim().to_string();
                format!(
                    "safe_regex.regex: {:?} is not a valid regex: {why}",
                    r.regex
                )
            })?;
            return Ok(IdRule::Regex(re));
        }
        let td = e.trust_domain.as_deref().unwrap_or_default();
        let td = parse_trust_domain(td).map_err(|err| format!("trust_domain: {err}"))?;
        Ok(IdRule::TrustDomain(td))
    }
}

/// Builds an allowlist from config entries; `any_in` adds "any ID of this trust domain".
/// An error carries the index of the bad entry and the problem.
pub fn build_matcher(
    entries: &[MatcherConfig],
    any_in: Option<TrustDomain>,
) -> Result<SpiffeIdMatcher, (usize, String)> {
    let mut rules = Vec::with_capacity(entries.len() + 1);
    for (i, e) in entries.iter().enumerate() {
        rules.push(e.to_rule().map_err(|p| (i, p))?);
    }
    if let Some(td) = any_in {
        rules.push(IdRule::TrustDomain(td));
    }
    Ok(SpiffeIdMatcher::new(rules))
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

/// The longest duration svidcar accepts anywhere: far beyond any sane timeout or TTL,
/// and far from the overflow of clock arithmetic.
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Parses a human-readable duration (`500ms`, `12s`, `5m`, `1h`), above zero and at
/// most [`MAX_DURATION`].
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let parsed = humantime::parse_duration(s)
        .map_err(|e| format!("invalid duration {s:?}: {e} (write it like 500ms, 12s, 5m or 1h)"))?;
    if parsed.is_zero() {
        return Err("duration must be greater than zero".into());
    }
    if parsed > MAX_DURATION {
        return Err(format!("duration {s:?} is too long (at most 3650d)"));
    }
    Ok(parsed)
}

/// Deserializes a duration through a visitor, so that a bad value is reported at the
/// line of the value itself (an error raised after deserializing points at the
/// enclosing mapping instead).
pub(crate) fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = Duration;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a duration like 500ms, 12s, 5m or 1h")
        }
        fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Duration, E> {
            parse_duration(s).map_err(E::custom)
        }
    }
    d.deserialize_str(V)
}

/// Reads a config file, naming it in the error.
pub fn read_text(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(path.display().to_string(), format!("cannot read: {e}")))
}

/// Deserializes YAML. A syntax error names the line; any other error names the key path
/// (`inbound[0].listen`), the problem and the line of the offending value, each once.
pub fn parse_yaml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, ConfigError> {
    // Syntax first: the typed pass would blame whichever key it was reading (`a.b.?`).
    if let Err(e) = serde_norway::from_str::<serde_norway::Value>(text) {
        return Err(ConfigError::new("config", format!("not valid YAML: {e}")));
    }
    let de = serde_norway::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let key = if path == "." {
            "config".to_string()
        } else {
            path
        };
        let inner = e.into_inner();
        let problem = yaml_problem(&inner, &key);
        ConfigError::new(key, problem)
    })
}

/// The problem in an error of the typed pass, without the key path serde_norway puts in
/// front (the caller names the key) and with the line where the value is.
fn yaml_problem(e: &serde_norway::Error, key: &str) -> String {
    let mut text = e.to_string();
    if let Some(at) = text.rfind(" at line ") {
        text.truncate(at);
    }
    // serde_norway prefixes the path it knows, which is the key or one of its parents.
    let mut prefixes: Vec<&str> = key
        .match_indices(['.', '['])
        .map(|(i, _)| &key[..i])
        .collect();
    prefixes.push(key);
    for p in prefixes.iter().rev() {
        if let Some(rest) = text.strip_prefix(&format!("{p}: ")) {
            text = rest.to_string();
            break;
        }
    }
    match e.location() {
        Some(l) => format!("{text} (line {}, column {})", l.line(), l.column()),
        None => text,
    }
}

/// Most connections one listener may hold; also bounds the semaphore behind it.
pub const MAX_CONNECTIONS: usize = 1_000_000;

impl Config {
    /// Reads, parses and validates a config file.
    /// Relative paths in the file are read relative to the file's own directory, so a
    /// config works the same from any working directory.
    pub fn load(path: &Path) -> Result<(Self, IdentityConfig), ConfigError> {
        let mut config: Config = parse_yaml(&read_text(path)?)?;
        config.identity.resolve_paths(&config_dir(path));
        let identity = config.validate()?;
        Ok((config, identity))
    }

    /// Parses and validates YAML text (relative paths stay relative to the working directory).
    #[cfg(test)]
    pub fn parse(text: &str) -> Result<(Self, IdentityConfig), ConfigError> {
        let config: Config = parse_yaml(text)?;
        let identity = config.validate()?;
        Ok((config, identity))
    }

    fn validate(&self) -> Result<IdentityConfig, ConfigError> {
        if self.worker_threads == Some(0) {
            return Err(ConfigError::new("worker_threads", "must be at least 1"));
        }
        if let Some(level) = &self.log.level {
            log_filter(level).map_err(|p| ConfigError::new("log.level", p))?;
        }
        let identity = self.identity.validate()?;
        if let Some(sds) = &self.sds {
            sds.validate()?;
        }
        if self.inbound.is_empty() && self.outbound.is_empty() && self.sds.is_none() {
            return Err(ConfigError::new(
                "config",
                "nothing to serve: add an `inbound` or `outbound` listener, or `sds`",
            ));
        }
        let own_td = identity.trust_domain();
        let mut names = HashSet::new();
        let mut addrs = HashSet::new();
        if let Some(admin) = &self.admin {
            addrs.insert(admin.listen);
        }
        for (kind, list) in [("inbound", &self.inbound), ("outbound", &self.outbound)] {
            for (i, l) in list.iter().enumerate() {
                let at = format!("{kind}[{i}]");
                if l.name.is_empty() {
                    return Err(ConfigError::new(format!("{at}.name"), "must not be empty"));
                }
                if !names.insert(l.name.clone()) {
                    return Err(ConfigError::new(
                        format!("{at}.name"),
                        format!("listener name {:?} is used twice", l.name),
                    ));
                }
                if !addrs.insert(l.listen) {
                    return Err(ConfigError::new(
                        format!("{at}.listen"),
                        format!("address {} is used by another listener", l.listen),
                    ));
                }
                if l.max_connections == 0 || l.max_connections > MAX_CONNECTIONS {
                    return Err(ConfigError::new(
                        format!("{at}.max_connections"),
                        format!("must be from 1 to {MAX_CONNECTIONS}"),
                    ));
                }
                l.validate(kind == "inbound", &at, own_td.as_ref())?;
            }
        }
        Ok(identity)
    }

    /// The TLS floor of one listener.
    pub fn min_tls(&self, l: &ListenerConfig) -> TlsVersion {
        l.tls_min_version.unwrap_or(self.tls.min_version)
    }
}

/// The directory a config file's relative paths are read from.
pub fn config_dir(path: &Path) -> PathBuf {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    abs.parent().map(Path::to_path_buf).unwrap_or_default()
}

/// `path` as written when absolute, else relative to `base` (the config file's directory).
pub fn resolve_path(base: &Path, path: &mut PathBuf) {
    if path.is_relative() && !path.as_os_str().is_empty() {
        *path = base.join(&*path);
    }
}

/// The levels a log filter may name; `warning` (Envoy's spelling) means `warn`.
const LOG_LEVELS: [&str; 7] = ["off", "error", "warn", "warning", "info", "debug", "trace"];

/// Checks `log.level` strictly and returns the tracing filter it means. A typo such as
/// `infro` would otherwise be read as a target name and silence every log line.
/// Accepted: a level (`info`), or comma-separated `target=level` directives with at most
/// one bare level (`info,svidcar=debug`).
pub fn log_filter(level: &str) -> Result<String, String> {
    let known = |l: &str| LOG_LEVELS.contains(&l.to_ascii_lowercase().as_str());
    let norm = |l: &str| {
        let l = l.to_ascii_lowercase();
        if l == "warning" {
            "warn".to_string()
        } else {
            l
        }
    };
    let mut out = Vec::new();
    for part in level.split(',').map(str::trim) {
        let directive = match part.split_once('=') {
            Some((target, lvl)) if !target.is_empty() && known(lvl) => {
                format!("{target}={}", norm(lvl))
            }
            None if known(part) => norm(part),
            _ => {
                return Err(format!(
                    "{part:?} is not a log level: write one of error, warn, info, debug, trace, \
                     off, or target=level (e.g. svidcar=debug)"
                ))
            }
        };
        out.push(directive);
    }
    Ok(out.join(","))
}

impl IdentityConfigRaw {
    /// Makes every relative file path relative to `base`.
    fn resolve_paths(&mut self, base: &Path) {
        if let Some(d) = &mut self.dev {
            for p in [&mut d.ca_cert, &mut d.ca_key, &mut d.bundle_out]
                .into_iter()
                .flatten()
            {
                resolve_path(base, p);
            }
        }
        if let Some(f) = &mut self.files {
            resolve_path(base, &mut f.cert);
            resolve_path(base, &mut f.key);
            if let Some(b) = &mut f.bundle {
                resolve_path(base, b);
            }
            for p in f.bundles.values_mut() {
                resolve_path(base, p);
            }
        }
    }

    fn validate(&self) -> Result<IdentityConfig, ConfigError> {
        let set: Vec<&str> = [
            self.dev.as_ref().map(|_| "dev"),
            self.files.as_ref().map(|_| "files"),
            self.workload_api.as_ref().map(|_| "workload_api"),
        ]
        .into_iter()
        .flatten()
        .collect();
        if set.len() != 1 {
            return Err(ConfigError::new(
                "identity",
                format!(
                    "exactly one of dev, files, workload_api must be set (found {})",
                    if set.is_empty() {
                        "none".to_string()
                    } else {
                        set.join(", ")
                    }
                ),
            ));
        }
        if let Some(w) = &self.workload_api {
            return w.validate().map(IdentityConfig::WorkloadApi);
        }
        if let Some(files) = &self.files {
            for td in files.bundles.keys() {
                parse_trust_domain(td).map_err(|e| {
                    ConfigError::new(format!("identity.files.bundles.{td}"), e.to_string())
                })?;
            }
            return Ok(IdentityConfig::Files(files.clone()));
        }
        let dev = self
            .dev
            .as_ref()
            .ok_or_else(|| ConfigError::new("identity", "no source"))?;
        let spiffe_id = crate::spiffe::parse_workload_id(&dev.spiffe_id)
            .map_err(|e| ConfigError::new("identity.dev.spiffe_id", e.to_string()))?;
        let trust_domain = match &dev.trust_domain {
            Some(td) => {
                let td = parse_trust_domain(td)
                    .map_err(|e| ConfigError::new("identity.dev.trust_domain", e.to_string()))?;
                if !spiffe_id.is_member_of(&td) {
                    return Err(ConfigError::new(
                        "identity.dev.spiffe_id",
                        format!("{spiffe_id} is not in trust domain {td}"),
                    ));
                }
                td
            }
            None => spiffe_id.trust_domain().clone(),
        };
        let ca = match (&dev.ca_cert, &dev.ca_key) {
            (Some(c), Some(k)) => Some((c.clone(), k.clone())),
            (None, None) => None,
            (Some(_), None) => {
                return Err(ConfigError::new(
                    "identity.dev.ca_key",
                    "ca_cert is set, ca_key is missing",
                ))
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    "identity.dev.ca_cert",
                    "ca_key is set, ca_cert is missing",
                ))
            }
        };
        if dev.svid_ttl < Duration::from_secs(2) {
            return Err(ConfigError::new(
                "identity.dev.svid_ttl",
                "must be at least 2s",
            ));
        }
        Ok(IdentityConfig::Dev(DevConfig {
            trust_domain,
            spiffe_id,
            svid_ttl: dev.svid_ttl,
            ca,
            bundle_out: dev.bundle_out.clone(),
        }))
    }
}

impl WorkloadApiConfigRaw {
    fn validate(&self) -> Result<WorkloadApiConfig, ConfigError> {
        let (key, addr) = match &self.socket {
            Some(s) => ("identity.workload_api.socket", s.clone()),
            None => (
                "identity.workload_api.socket",
                std::env::var("SPIFFE_ENDPOINT_SOCKET").map_err(|_| {
                    ConfigError::new(
                        "identity.workload_api.socket",
                        "not set, and SPIFFE_ENDPOINT_SOCKET is not set either",
                    )
                })?,
            ),
        };
        let socket = parse_workload_socket(&addr).map_err(|p| ConfigError::new(key, p))?;
        let spiffe_id = self
            .spiffe_id
            .as_deref()
            .map(crate::spiffe::parse_workload_id)
            .transpose()
            .map_err(|e| ConfigError::new("identity.workload_api.spiffe_id", e.to_string()))?;
        if spiffe_id.is_some() && self.hint.is_some() {
            return Err(ConfigError::new(
                "identity.workload_api",
                "set spiffe_id or hint to select the default SVID, not both",
            ));
        }
        Ok(WorkloadApiConfig {
            socket,
            spiffe_id,
            hint: self.hint.clone(),
        })
    }
}

impl IdentityConfig {
    /// The config key that names `path`, so an error about a file can say which key
    /// pointed at it (`identity.dev.ca_key: /etc/ca.key: ...`).
    pub fn key_of(&self, path: &str) -> Option<String> {
        let is = |p: &Path| p.as_os_str() == path;
        match self {
            Self::Dev(d) => {
                let (cert, key) = d.ca.as_ref()?;
                [
                    ("ca_cert", Some(cert)),
                    ("ca_key", Some(key)),
                    ("bundle_out", d.bundle_out.as_ref()),
                ]
                .into_iter()
                .find(|(_, p)| p.is_some_and(|p| is(p)))
                .map(|(k, _)| format!("identity.dev.{k}"))
            }
            Self::Files(f) => {
                let fixed = [
                    ("cert", Some(&f.cert)),
                    ("key", Some(&f.key)),
                    ("bundle", f.bundle.as_ref()),
                ];
                fixed
                    .into_iter()
                    .find(|(_, p)| p.is_some_and(|p| is(p)))
                    .map(|(k, _)| format!("identity.files.{k}"))
                    .or_else(|| {
                        f.bundles
                            .iter()
                            .find(|(_, p)| is(p))
                            .map(|(td, _)| format!("identity.files.bundles.{td}"))
                    })
            }
            Self::WorkloadApi(_) => None,
        }
    }

    /// Our trust domain when the config already tells it (dev); files tell it only
    /// once the certificate is read.
    pub fn trust_domain(&self) -> Option<TrustDomain> {
        match self {
            Self::Dev(d) => Some(d.trust_domain.clone()),
            Self::Files(_) | Self::WorkloadApi(_) => None,
        }
    }
}

impl ListenerConfig {
    fn validate(
        &self,
        inbound: bool,
        at: &str,
        own_td: Option<&TrustDomain>,
    ) -> Result<(), ConfigError> {
        let (target_key, target, list_key, list, wrong) = if inbound {
            (
                "forward",
                &self.forward,
                "allow",
                &self.allow,
                [
                    ("connect", self.connect.is_some()),
                    ("expect", !self.expect.is_empty()),
                    ("sni", self.sni.is_some()),
                ],
            )
        } else {
            (
                "connect",
                &self.connect,
                "expect",
                &self.expect,
                [
                    ("forward", self.forward.is_some()),
                    ("allow", !self.allow.is_empty()),
                    ("sni", false),
                ],
            )
        };
        for (key, present) in wrong {
            if present {
                return Err(ConfigError::new(
                    format!("{at}.{key}"),
                    format!(
                        "not used by {} listeners (use {target_key}/{list_key})",
                        if inbound { "inbound" } else { "outbound" }
                    ),
                ));
            }
        }
        let target = target
            .as_deref()
            .ok_or_else(|| ConfigError::new(format!("{at}.{target_key}"), "missing (host:port)"))?;
        split_host_port(target).map_err(|p| ConfigError::new(format!("{at}.{target_key}"), p))?;
        if list.is_empty() && !self.allow_any_in_trust_domain {
            return Err(ConfigError::new(
                format!("{at}.{list_key}"),
                "empty: it would refuse every peer; list SPIFFE IDs or set allow_any_in_trust_domain: true",
            ));
        }
        build_matcher(
            list,
            self.allow_any_in_trust_domain
                .then_some(own_td)
                .flatten()
                .cloned(),
        )
        .map_err(|(i, p)| ConfigError::new(format!("{at}.{list_key}[{i}]"), p))?;
        if let Some(sni) = &self.sni {
            rustls_pki_types::ServerName::try_from(sni.as_str()).map_err(|_| {
                ConfigError::new(
                    format!("{at}.sni"),
                    format!("{sni:?} is not a valid server name"),
                )
            })?;
        }
        for (i, p) in self.alpn.iter().enumerate() {
            if p.is_empty() || p.len() > 255 {
                return Err(ConfigError::new(
                    format!("{at}.alpn[{i}]"),
                    "must be 1 to 255 bytes",
                ));
            }
        }
        Ok(())
    }
}

/// Splits `host:port` (`[v6]:port` too) and checks both parts.
pub fn split_host_port(s: &str) -> Result<(String, u16), String> {
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?} is not host:port"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{s:?}: port {port:?} is not a number from 1 to 65535"))?;
    if port == 0 {
        return Err(format!("{s:?}: port must not be 0"));
    }
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("{s:?}: host is empty"));
    }
    Ok((host.to_string(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
identity:
  dev: {trust_domain: example.org, spiffe_id: "spiffe://example.org/ns/default/sa/web", svid_ttl: 1h}
inbound:
  - name: web
    listen: 0.0.0.0:8443
    forward: 127.0.0.1:8080
    allow:
      - exact: spiffe://example.org/ns/default/sa/frontend
      - prefix: spiffe://example.org/ns/prod/
      - trust_domain: partner.example
outbound:
  - name: backend
    listen: 127.0.0.1:9001
    connect: backend.default.svc:8443
    expect:
      - exact: spiffe://example.org/ns/default/sa/backend
"#;

    fn err(yaml: &str) -> String {
        Config::parse(yaml).unwrap_err().to_string()
    }

    #[test]
    fn parses_the_documented_shape() {
        let (c, id) = Config::parse(GOOD).unwrap();
        assert_eq!(c.inbound[0].allow.len(), 3);
        assert_eq!(
            c.outbound[0].connect.as_deref(),
            Some("backend.default.svc:8443")
        );
        assert!(matches!(id, IdentityConfig::Dev(_)));
        assert_eq!(c.inbound[0].idle_timeout, Duration::from_secs(3600));
    }

    #[test]
    fn errors_name_the_key() {
        let e = err(&GOOD.replace("0.0.0.0:8443", "nowhere"));
        assert!(e.starts_with("inbound[0].listen:"), "{e}");
        let e = err(&GOOD.replace("svid_ttl: 1h", "svid_ttl: 1 fortnight"));
        assert!(
            e.starts_with("identity.dev.svid_ttl:") && e.contains("invalid duration"),
            "{e}"
        );
        let e = err(&GOOD.replace("prefix:", "prefx:"));
        assert!(
            e.contains("inbound[0].allow[1]") && e.contains("prefx"),
            "{e}"
        );
        let e = err(&GOOD.replace("name: backend", "name: web"));
        assert!(
            e.starts_with("outbound[0].name:") && e.contains("twice"),
            "{e}"
        );
        let e = err(&GOOD.replace("backend.default.svc:8443", "backend"));
        assert!(e.starts_with("outbound[0].connect:"), "{e}");
        let e = err(&GOOD.replace("ns/default/sa/web", "ns/../web"));
        assert!(e.starts_with("identity.dev.spiffe_id:"), "{e}");
    }

    #[test]
    fn identity_needs_exactly_one_source() {
        let e = err(&GOOD.replace("identity:\n", "identity:\n  files: {cert: a, key: b}\n"));
        assert!(e.contains("exactly one") && e.contains("dev, files"), "{e}");
    }

    #[test]
    fn empty_allowlist_is_refused_unless_explicit() {
        let yaml = GOOD
            .replace(
                "    allow:\n      - exact: spiffe://example.org/ns/default/sa/frontend\n      - prefix: spiffe://example.org/ns/prod/\n      - trust_domain: partner.example\n",
                "",
            );
        assert!(err(&yaml).starts_with("inbound[0].allow:"));
        let ok = yaml.replace(
            "forward: 127.0.0.1:8080",
            "forward: 127.0.0.1:8080\n    allow_any_in_trust_domain: true",
        );
        Config::parse(&ok).unwrap();
    }

    #[test]
    fn host_port() {
        assert_eq!(split_host_port("a.b:80").unwrap(), ("a.b".into(), 80));
        assert_eq!(split_host_port("[::1]:80").unwrap(), ("::1".into(), 80));
        assert!(split_host_port("a.b").is_err());
        assert!(split_host_port("a.b:0").is_err());
        assert!(split_host_port(":80").is_err());
    }
}

#[cfg(test)]
mod matcher_tests {
    use super::*;
    use crate::spiffe::{parse_spiffe_id, parse_trust_domain, SpiffeId};

    fn id(s: &str) -> SpiffeId {
        parse_spiffe_id(s).unwrap()
    }

    fn m(e: MatcherConfig) -> SpiffeIdMatcher {
        build_matcher(&[e], None).unwrap()
    }

    #[test]
    fn envoy_string_matcher_semantics() {
        let web = id("spiffe://example.org/ns/prod/sa/web");
        let exact = |s: &str, ic| MatcherConfig {
            exact: Some(s.into()),
            ignore_case: ic,
            ..Default::default()
        };
        assert!(m(exact("spiffe://example.org/ns/prod/sa/web", false)).matches(&web));
        assert!(!m(exact("spiffe://example.org/ns/prod/sa/WEB", true))
            .matches(&id("spiffe://example.org/ns/prod/sa/api")));
        assert!(m(exact("spiffe://example.org/ns/prod/sa/WEB", true)).matches(&web));
        let prefix = MatcherConfig {
            prefix: Some("spiffe://example.org/ns/prod/".into()),
            ..Default::default()
        };
        assert!(m(prefix.clone()).matches(&web));
        assert!(!m(prefix).matches(&id("spiffe://example.org/ns/dev/sa/web")));
        let suffix = MatcherConfig {
            suffix: Some("/sa/web".into()),
            ..Default::default()
        };
        assert!(m(suffix).matches(&web));
        let contains = MatcherConfig {
            contains: Some("/PROD/".into()),
            ignore_case: true,
            ..Default::default()
        };
        assert!(m(contains).matches(&web));
        let contains_cs = MatcherConfig {
            contains: Some("/PROD/".into()),
            ..Default::default()
        };
        assert!(!m(contains_cs).matches(&web));
        // safe_regex is a full match, as RE2 FullMatch in Envoy.
        let re = |r: &str| MatcherConfig {
            safe_regex: Some(SafeRegex { regex: r.into() }),
            ..Default::default()
        };
        assert!(m(re(r"spiffe://example\.org/ns/[^/]+/sa/web")).matches(&web));
        assert!(!m(re("sa/web")).matches(&web));
        let td = MatcherConfig {
            trust_domain: Some("example.org".into()),
            ..Default::default()
        };
        assert!(m(td.clone()).matches(&web));
        assert!(!m(td).matches(&id("spiffe://example.com/ns/prod/sa/web")));
    }

    #[test]
    fn prefix_does_not_cross_trust_domains_by_accident() {
        // A prefix without the trailing slash would match example.org.evil; users are
        // expected to write the slash, as with Envoy. Show the difference.
        let loose = MatcherConfig {
            prefix: Some("spiffe://example.org".into()),
            ..Default::default()
        };
        assert!(m(loose).matches(&id("spiffe://example.org.evil/x")));
        let strict = MatcherConfig {
            prefix: Some("spiffe://example.org/".into()),
            ..Default::default()
        };
        assert!(!m(strict).matches(&id("spiffe://example.org.evil/x")));
    }

    #[test]
    fn bad_entries_are_reported_with_their_index() {
        let ok = MatcherConfig {
            suffix: Some("/x".into()),
            ..Default::default()
        };
        let two = MatcherConfig {
            exact: Some("spiffe://a/b".into()),
            prefix: Some("x".into()),
            ..Default::default()
        };
        assert_eq!(build_matcher(&[ok.clone(), two], None).unwrap_err().0, 1);
        let bad_re = MatcherConfig {
            safe_regex: Some(SafeRegex { regex: "(".into() }),
            ..Default::default()
        };
        assert!(build_matcher(&[bad_re], None)
            .unwrap_err()
            .1
            .contains("safe_regex"));
        let bad_exact = MatcherConfig {
            exact: Some("spiffe://example.org/a/../b".into()),
            ..Default::default()
        };
        assert!(build_matcher(&[bad_exact], None).is_err());
        let none = MatcherConfig::default();
        assert!(build_matcher(&[none], None).is_err());
    }

    #[test]
    fn any_in_trust_domain() {
        let td = parse_trust_domain("example.org").unwrap();
        let all = build_matcher(&[], Some(td)).unwrap();
        assert!(all.matches(&id("spiffe://example.org/anything")));
        assert!(!all.matches(&id("spiffe://other.org/anything")));
        assert!(!build_matcher(&[], None)
            .unwrap()
            .matches(&id("spiffe://example.org/a")));
    }
}
