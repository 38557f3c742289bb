//! The configuration: the YAML file (`raw`) is read once, checked once and turned into
//! typed values (`Config`, `ListenerSpec`, `SdsSpec`, `IdentityConfig`) that the rest
//! of svidcar uses as they are. Every problem is a [`ConfigError`] that names the key
//! and says what is wrong (`inbound[0].listen: invalid socket address syntax`).

mod authorization;
mod file;
mod identity;
mod listener;
mod matchers;
pub mod raw;
mod sds;
mod transparent;
mod values;

pub use authorization::authorization_rules;
pub use file::{config_dir, parse_yaml, read_text, resolve_path};
pub use identity::{DevConfig, IdentityConfig, WorkloadApiConfig};
pub use listener::{
    canonical_ip, HttpLimits, HttpSpec, InboundSpec, ListenerKind, ListenerSpec, OutboundSpec,
    PortPolicy, Route, Timeouts, TlsSpec, TransparentInboundSpec, TransparentOutboundSpec,
    DEFAULT_MAX_REQUEST_HEADERS_KB, DEFAULT_MAX_UPSTREAM_CONNECTIONS,
};
pub use matchers::allow_list;
pub use raw::{
    ActionConfig, AuthorizationRuleConfig, FilesConfig, Mode, Otherwise, PathMatcherConfig,
    PathStringMatcher, Protocol, RawConfig, RulePortConfig, SourceConfig, TlsVersion, XfccConfig,
    XfccDetail, XfccModeConfig, DEFAULT_ALL_BUNDLES_NAME, DEFAULT_BUNDLE_NAME, DEFAULT_SVID_NAME,
};
pub use sds::SdsSpec;
pub use transparent::{
    RedirectInbound, RedirectOutbound, RedirectSpec, INBOUND_NAME, OUTBOUND_NAME,
};
pub use values::{
    duration, log_filter, parse_duration, parse_endpoint, parse_workload_socket, Endpoint,
    MAX_DURATION,
};

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

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

/// Most connections one listener may hold; also bounds the semaphore behind it.
pub const MAX_CONNECTIONS: usize = 1_000_000;

/// The whole configuration, checked and typed.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file as written: a reload compares the new one with it.
    pub raw: RawConfig,
    pub identity: IdentityConfig,
    /// Runtime worker threads; `None`: one per core.
    pub worker_threads: Option<usize>,
    /// The tracing filter `log.level` means.
    pub log_filter: Option<String>,
    pub admin: Option<SocketAddr>,
    /// `admin.app_probes`: the file behind `/app-health/`.
    pub app_probes: Option<std::path::PathBuf>,
    /// `admin.ready_min_svid_validity`.
    pub ready_min_svid_validity: Duration,
    pub drain_timeout: Duration,
    /// `close_expired_peers`: end connections whose peer's SVID has expired.
    pub close_expired_peers: bool,
    /// Inbound listeners first, then outbound, each in file order; then the
    /// transparent pair.
    pub listeners: Vec<ListenerSpec>,
    pub sds: Option<SdsSpec>,
    /// The rules `svidcar redirect` installs, when the config has `transparent`.
    pub redirect: Option<RedirectSpec>,
}

impl Config {
    /// Reads, parses and checks a config file.
    /// Relative paths in the file are read relative to the file's own directory, so a
    /// config works the same from any working directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let mut raw: RawConfig = parse_yaml(&read_text(path)?)?;
        let base = config_dir(path);
        raw.identity.resolve_paths(&base);
        for l in &mut raw.inbound {
            for p in l.rego.iter_mut().flat_map(|r| r.policy.iter_mut()) {
                resolve_path(&base, p);
            }
        }
        if let Some(t) = raw.transparent.as_mut().and_then(|t| t.inbound.as_mut()) {
            let ports = t.ports.values_mut().filter_map(|p| p.rego.as_mut());
            for p in t
                .rego
                .iter_mut()
                .chain(ports)
                .flat_map(|r| r.policy.iter_mut())
            {
                resolve_path(&base, p);
            }
        }
        Self::from_raw(raw)
    }

    /// Parses and checks YAML text (relative paths stay relative to the working directory).
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        Self::from_raw(parse_yaml(text)?)
    }

    /// Checks a parsed file and types it.
    pub fn from_raw(raw: RawConfig) -> Result<Self, ConfigError> {
        if raw.worker_threads == Some(0) {
            return Err(ConfigError::new("worker_threads", "must be at least 1"));
        }
        let log_filter = raw
            .log
            .level
            .as_deref()
            .map(log_filter)
            .transpose()
            .map_err(|p| ConfigError::new("log.level", p))?;
        let identity = raw.identity.validate()?;
        let sds = raw.sds.as_ref().map(|s| s.spec()).transpose()?;
        if raw.inbound.is_empty()
            && raw.outbound.is_empty()
            && raw.sds.is_none()
            && raw.transparent.is_none()
        {
            return Err(ConfigError::new(
                "config",
                "nothing to serve: add an `inbound` or `outbound` listener, `transparent` or `sds`",
            ));
        }
        let mut names = HashSet::new();
        let mut addrs = HashSet::new();
        if let Some(admin) = &raw.admin {
            addrs.insert(admin.listen);
        }
        let mut listeners = Vec::with_capacity(raw.inbound.len() + raw.outbound.len());
        for (kind, list) in [("inbound", &raw.inbound), ("outbound", &raw.outbound)] {
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
                let tls = raw.tls.min_version;
                listeners.push(if kind == "inbound" {
                    l.inbound_spec(&at, tls)?
                } else {
                    l.outbound_spec(&at, tls)?
                });
            }
        }
        jwt_needs_a_source(&listeners, &identity)?;
        let mut redirect = None;
        if let Some(tr) = &raw.transparent {
            let (mut spec, pair) = tr.specs(raw.tls.min_version)?;
            for l in pair {
                if !addrs.insert(l.listen) {
                    return Err(ConfigError::new(
                        format!("{}.listen", l.key),
                        format!("address {} is used by another listener", l.listen),
                    ));
                }
                listeners.push(l);
            }
            let sds_ports = sds.iter().flat_map(|s| &s.listen).filter_map(|e| match e {
                Endpoint::Tcp(a) => Some(a.port()),
                Endpoint::Unix(_) => None,
            });
            let mut own: Vec<u16> = addrs.iter().map(|a| a.port()).chain(sds_ports).collect();
            own.sort_unstable();
            own.dedup();
            spec.own_ports = own;
            redirect = Some(spec);
        }
        for l in &mut listeners {
            l.tls.session_resumption = raw.tls.session_resumption;
        }
        Ok(Self {
            identity,
            worker_threads: raw.worker_threads,
            log_filter,
            admin: raw.admin.as_ref().map(|a| a.listen),
            app_probes: raw.admin.as_ref().and_then(|a| a.app_probes.clone()),
            ready_min_svid_validity: raw
                .admin
                .as_ref()
                .map(|a| a.ready_min_svid_validity)
                .unwrap_or_default(),
            drain_timeout: raw.drain_timeout,
            close_expired_peers: raw.close_expired_peers,
            listeners,
            sds,
            redirect,
            raw,
        })
    }

    /// Listeners that take connections from peers (`inbound`) or from the app, for a
    /// summary.
    pub fn count(&self, inbound: bool) -> usize {
        self.listeners
            .iter()
            .filter(|l| {
                matches!(
                    l.kind,
                    ListenerKind::Inbound(_) | ListenerKind::TransparentInbound(_)
                ) == inbound
            })
            .count()
    }
}

/// `jwt:` needs an identity source that has what it uses: outbound, one that issues
/// JWT-SVIDs (dev CA or Workload API; PEM files cannot); inbound with `files`, at least
/// one `jwt_bundles` file (else every token would be refused).
fn jwt_needs_a_source(
    listeners: &[ListenerSpec],
    identity: &IdentityConfig,
) -> Result<(), ConfigError> {
    let IdentityConfig::Files(files) = identity else {
        return Ok(());
    };
    for l in listeners {
        let Some(h) = &l.http else { continue };
        if h.jwt_audience.is_some() {
            return Err(ConfigError::new(
                format!("{}.jwt.audience", l.key),
                "the files identity source cannot issue JWT-SVIDs; use identity dev or workload_api",
            ));
        }
        if h.jwt_inbound.is_some() && files.jwt_bundles.is_empty() {
            return Err(ConfigError::new(
                format!("{}.jwt", l.key),
                "no JWT bundle to validate tokens with: set identity.files.jwt_bundles",
            ));
        }
    }
    Ok(())
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
        let c = Config::parse(GOOD).unwrap();
        let ListenerKind::Inbound(inbound) = &c.listeners[0].kind else {
            panic!("{:?}", c.listeners[0]);
        };
        assert_eq!(inbound.allow.rules.len(), 3);
        let ListenerKind::Outbound(outbound) = &c.listeners[1].kind else {
            panic!("{:?}", c.listeners[1]);
        };
        assert_eq!(outbound.connect.to_string(), "backend.default.svc:8443");
        assert_eq!(
            outbound.server_name,
            rustls_pki_types::ServerName::try_from("backend.default.svc").unwrap()
        );
        assert!(matches!(c.identity, IdentityConfig::Dev(_)));
        assert_eq!(c.listeners[0].timeouts.idle, Duration::from_secs(3600));
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
    fn http_keys_are_checked() {
        let http = GOOD.replace(
            "    forward: 127.0.0.1:8080\n",
            "    forward: 127.0.0.1:8080\n    protocol: http\n    identity_header: X-Workload-ID\n",
        );
        let c = Config::parse(&http).unwrap();
        let h = c.listeners[0].http.as_ref().unwrap();
        assert_eq!(
            h.identity_header.as_ref().unwrap().as_str(),
            "x-workload-id"
        );
        assert!(h.xfcc.is_some(), "inbound HTTP writes XFCC by default");
        let e = err(&GOOD.replace(
            "    forward: 127.0.0.1:8080\n",
            "    forward: 127.0.0.1:8080\n    identity_header: X-Workload-ID\n",
        ));
        assert!(
            e.starts_with("inbound[0].identity_header: only for HTTP"),
            "{e}"
        );
        let e = err(&http.replace(
            "    identity_header: X-Workload-ID\n",
            "    authorization:\n      - action: DENY\n        source: jwt\n        principals: [{exact: \"spiffe://example.org/x\"}]\n",
        ));
        assert!(
            e.starts_with("inbound[0].authorization[0].source: jwt"),
            "{e}"
        );
        let e = err(&http.replace("X-Workload-ID", "bad header"));
        assert!(e.starts_with("inbound[0].identity_header:"), "{e}");
    }

    #[test]
    fn jwt_keys_are_checked() {
        let http = GOOD.replace(
            "    forward: 127.0.0.1:8080\n",
            "    forward: 127.0.0.1:8080\n    protocol: http\n    JWT\n",
        );
        let with = |jwt: &str| http.replace("JWT", jwt);
        let c = Config::parse(&with("jwt: {audiences: [users], required: true, leeway: 5s}\n    authorization:\n      - action: ALLOW\n        source: jwt\n        principals: [{prefix: \"spiffe://example.org/\"}]")).unwrap();
        let j = c.listeners[0]
            .http
            .as_ref()
            .unwrap()
            .jwt_inbound
            .clone()
            .unwrap();
        assert_eq!(
            (j.audiences, j.required, j.leeway),
            (vec!["users".to_string()], true, Duration::from_secs(5))
        );
        let c = Config::parse(&with("jwt: {audiences: [users]}")).unwrap();
        let j = c.listeners[0]
            .http
            .as_ref()
            .unwrap()
            .jwt_inbound
            .clone()
            .unwrap();
        assert_eq!((j.required, j.leeway), (false, Duration::from_secs(30)));
        for (jwt, want) in [
            ("jwt: {audiences: []}", "inbound[0].jwt.audiences: empty"),
            ("jwt: {required: true}", "inbound[0].jwt.audiences: empty"),
            (
                "jwt: {audiences: [a], audience: b}",
                "inbound[0].jwt.audience: only for outbound",
            ),
            ("jwt: {audiences: [a], foo: 1}", "inbound[0]"),
        ] {
            let e = err(&with(jwt));
            assert!(e.starts_with(want), "{jwt}: {e}");
            assert!(!e.contains("panick"), "{e}");
        }
        let e = err(&GOOD.replace(
            "    forward: 127.0.0.1:8080\n",
            "    forward: 127.0.0.1:8080\n    jwt: {audiences: [users]}\n",
        ));
        assert!(e.starts_with("inbound[0].jwt: only for HTTP"), "{e}");
    }
}

#[cfg(test)]
mod properties {
    //! Config files as a hurried operator or an attacker writes them: a full config
    //! with values swapped for hostile ones, lines dropped, duplicated or re-indented,
    //! and plain noise. Parsing never panics, and a refusal is one line that names a key.
    use super::*;
    use proptest::prelude::*;

    const FULL: &str = r#"worker_threads: 2
log: {level: info}
identity:
  dev: {trust_domain: example.org, spiffe_id: "spiffe://example.org/ns/default/sa/web", svid_ttl: 1h}
admin: {listen: 127.0.0.1:15000, ready_min_svid_validity: 30s}
sds: {listen: /tmp/svidcar-sds.sock, max_streams: 64}
close_expired_peers: true
tls: {session_resumption: true}
inbound:
  - name: web
    listen: 0.0.0.0:8443
    forward: 127.0.0.1:8080
    protocol: http
    max_connections: 100
    identity_header: x-workload-id
    allow:
      - exact: spiffe://example.org/ns/default/sa/frontend
      - prefix: spiffe://example.org/ns/prod/
      - trust_domain: partner.example
    jwt: {audiences: [users], required: false}
    authorization:
      - action: DENY
        paths: [{prefix: /admin}]
      - action: ALLOW
        principals: [{exact: "spiffe://example.org/ns/default/sa/payment"}]
        methods: [GET]
        paths: ["/v1/users/{*}"]
  - name: db
    listen: 0.0.0.0:5433
    forward: 127.0.0.1:5432
    proxy_protocol: v2
    allow: [{trust_domain: example.org}]
outbound:
  - name: backend
    listen: 127.0.0.1:9001
    connect: backend.default.svc:8443
    expect:
      - exact: spiffe://example.org/ns/default/sa/backend
transparent:
  proxy_uid: 1337
  inbound:
    listen: "[::]:15006"
    mode: strict
    allow: [{trust_domain: example.org}]
    ports:
      "9090": {mode: permissive}
  outbound:
    listen: "127.0.0.1:15001"
    routes:
      - to: ["10.77.0.0/16", "fd77::/64"]
        ports: [8080, 8443]
        expect: [{trust_domain: example.org}]
    otherwise: passthrough
"#;

    /// Values that have broken parsers before.
    const HOSTILE: &[&str] = &[
        "",
        "~",
        "null",
        "-1",
        "0",
        "4294967296",
        "99999999999999999999",
        "1e400",
        "NaN",
        "0.0.0.0:99999",
        "[::1",
        ":::",
        "spiffe://",
        "spiffe://EXAMPLE.org/x",
        "spiffe://a/../b",
        "/",
        "//",
        "*",
        "&a x",
        "*a",
        "!!binary aGk=",
        "!!str",
        "{",
        "[",
        "]",
        "}",
        "{a: b}",
        "[1, 2]",
        "'",
        "\"",
        "\"\\u0000\"",
        "|",
        ">",
        "- x",
        "? x",
        "%",
        "@",
        "`",
        "\t",
        "é",
        "1h1h",
        "1000000000000h",
        "-5s",
        "0s",
        "https://127.0.0.1:8181/v1/data/x",
        "ALLOW",
        "deny",
        "strict",
        "v3",
        "65536",
        "xx-workload-id",
        "host",
        "content-length",
    ];

    fn check(text: &str) -> Result<(), TestCaseError> {
        if let Err(e) = Config::parse(text) {
            let msg = e.to_string();
            prop_assert!(!msg.is_empty());
            prop_assert!(
                !msg.contains('\n'),
                "a refusal of more than one line: {:?}",
                msg
            );
        }
        Ok(())
    }

    #[test]
    fn the_full_config_is_accepted() {
        Config::parse(FULL).unwrap();
    }

    #[test]
    fn an_alias_bomb_is_refused() {
        // Nine levels of nine aliases: a billion strings if expanded.
        let mut bomb = String::from("a0: &a0 [\"lol\"]\n");
        for i in 1..10 {
            let refs = vec![format!("*a{}", i - 1); 9].join(", ");
            bomb.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
        }
        bomb.push_str("inbound: *a9\n");
        let e = Config::parse(&bomb).unwrap_err().to_string();
        assert!(e.contains("config"), "{e}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        /// A value after a `: ` or a `- ` swapped for a hostile one.
        #[test]
        fn hostile_values(picks in prop::collection::vec((any::<prop::sample::Index>(), prop::sample::select(HOSTILE)), 1..4)) {
            let mut lines: Vec<String> = FULL.lines().map(str::to_string).collect();
            for (at, value) in picks {
                let i = at.index(lines.len());
                let line = &lines[i];
                let cut = line.find(": ").map(|c| c + 2).or_else(|| line.find("- ").map(|c| c + 2));
                if let Some(c) = cut {
                    lines[i] = format!("{}{value}", &line[..c]);
                }
            }
            check(&lines.join("\n"))?;
        }

        /// Lines dropped, repeated or moved in or out one level.
        #[test]
        fn shuffled_lines(edits in prop::collection::vec((any::<prop::sample::Index>(), 0..4u8), 1..5)) {
            let mut lines: Vec<String> = FULL.lines().map(str::to_string).collect();
            for (at, op) in edits {
                if lines.is_empty() { break }
                let i = at.index(lines.len());
                match op {
                    0 => { lines.remove(i); }
                    1 => { let l = lines[i].clone(); lines.insert(i, l); }
                    2 => lines[i] = format!("  {}", lines[i]),
                    _ => lines[i] = lines[i].trim_start().to_string(),
                }
            }
            check(&lines.join("\n"))?;
        }

        #[test]
        fn noise(text in prop_oneof![any::<String>(), "[a-z_:{}\\[\\], \n&*!-]{0,200}"]) {
            check(&text)?;
        }
    }
}
