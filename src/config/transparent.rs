//! `transparent`: the listener pair that redirect rules feed, and what `svidcar
//! redirect` needs to write those rules (ports, uid and gid, exclusions).

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use rustls_pki_types::ServerName;

use super::listener::{checked_allow_list, Common, HttpKeys};
use super::raw::{
    PortConfig, Protocol, TransparentConfig, TransparentInboundConfig, TransparentOutboundConfig,
};
use super::{
    ConfigError, ListenerKind, ListenerSpec, PortPolicy, Route, Timeouts, TlsSpec, TlsVersion,
    TransparentInboundSpec, TransparentOutboundSpec,
};

/// The settings both transparent listeners take from fields of the same names.
macro_rules! common {
    ($c:expr, $name:expr, $at:expr, $tls:expr) => {
        Common {
            name: $name,
            at: $at,
            listen: $c.listen,
            tls: TlsSpec {
                min_version: $c.tls_min_version.unwrap_or($tls),
                alpn: Vec::new(),
                session_resumption: true,
            },
            timeouts: Timeouts {
                connect: $c.connect_timeout,
                handshake: $c.handshake_timeout,
                idle: $c.idle_timeout,
            },
            max_connections: $c.max_connections,
        }
    };
}

/// The listener name (and metric label) of the transparent inbound listener.
pub const INBOUND_NAME: &str = "transparent-inbound";
/// The listener name (and metric label) of the transparent outbound listener.
pub const OUTBOUND_NAME: &str = "transparent-outbound";

/// What the redirect rules say, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedirectSpec {
    /// Traffic of this uid and gid is never redirected: svidcar's own, the loop breaker.
    pub proxy_uid: u32,
    pub proxy_gid: u32,
    pub inbound: Option<RedirectInbound>,
    pub outbound: Option<RedirectOutbound>,
    /// svidcar's own listening ports (admin, SDS over TCP, explicit listeners, the
    /// transparent pair): never redirected, in either direction. Sorted, no repeats.
    pub own_ports: Vec<u16>,
}

/// Inbound TCP goes to `port`, but for `exclude_ports`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedirectInbound {
    pub port: u16,
    /// Only these ports are redirected; empty: every port.
    pub include_ports: Vec<u16>,
    pub exclude_ports: Vec<u16>,
}

/// Outbound TCP goes to `port`, but for `exclude_ports` and `exclude_cidrs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedirectOutbound {
    pub port: u16,
    pub exclude_ports: Vec<u16>,
    pub exclude_cidrs: Vec<IpNet>,
}

impl TransparentConfig {
    /// Checks the section; returns the redirect rules' spec (without `own_ports`, which
    /// the whole config knows) and the listeners.
    pub(super) fn specs(
        &self,
        tls: TlsVersion,
    ) -> Result<(RedirectSpec, Vec<ListenerSpec>), ConfigError> {
        let at = "transparent";
        if self.proxy_uid == 0 {
            return Err(ConfigError::new(
                format!("{at}.proxy_uid"),
                "must not be 0: root's traffic would never be redirected, and svidcar must not run as root; use the uid svidcar runs as (1337 in the examples)",
            ));
        }
        let proxy_gid = self.proxy_gid.unwrap_or(self.proxy_uid);
        if proxy_gid == 0 {
            return Err(ConfigError::new(
                format!("{at}.proxy_gid"),
                "must not be 0: every process of group root would bypass the proxy",
            ));
        }
        if self.inbound.is_none() && self.outbound.is_none() {
            return Err(ConfigError::new(
                at,
                "set inbound, outbound or both: nothing to redirect",
            ));
        }
        let mut listeners = Vec::new();
        let inbound = match &self.inbound {
            Some(i) => {
                listeners.push(i.spec(tls)?);
                Some(RedirectInbound {
                    port: listen_port(&format!("{at}.inbound.listen"), i.listen.port())?,
                    include_ports: ports("transparent.inbound.include_ports", &i.include_ports)?,
                    exclude_ports: ports("transparent.inbound.exclude_ports", &i.exclude_ports)?,
                })
            }
            None => None,
        };
        let outbound = match &self.outbound {
            Some(o) => {
                listeners.push(o.spec(tls)?);
                Some(RedirectOutbound {
                    port: listen_port(&format!("{at}.outbound.listen"), o.listen.port())?,
                    exclude_ports: ports("transparent.outbound.exclude_ports", &o.exclude_ports)?,
                    exclude_cidrs: o
                        .exclude_cidrs
                        .iter()
                        .enumerate()
                        .map(|(i, c)| cidr(&format!("{at}.outbound.exclude_cidrs[{i}]"), c))
                        .collect::<Result<_, _>>()?,
                })
            }
            None => None,
        };
        let redirect = RedirectSpec {
            proxy_uid: self.proxy_uid,
            proxy_gid,
            inbound,
            outbound,
            own_ports: Vec::new(),
        };
        Ok((redirect, listeners))
    }
}

impl TransparentInboundConfig {
    fn spec(&self, tls: TlsVersion) -> Result<ListenerSpec, ConfigError> {
        let at = "transparent.inbound";
        // The listener's HTTP keys are checked where they are written, whatever the
        // default protocol: they are the defaults of every HTTP port.
        let http = self
            .http_keys(&PortConfig::default(), Protocol::Http)
            .spec(at, true)?;
        let default = PortPolicy {
            mode: self.mode,
            allow: checked_allow_list(
                &format!("{at}.allow"),
                &self.allow,
                self.allow_any_in_trust_domain,
            )?,
            http: http
                .filter(|_| self.protocol == Protocol::Http)
                .map(Box::new),
        };
        let mut by_port = BTreeMap::new();
        for (key, over) in &self.ports {
            let k = format!("{at}.ports.{key}");
            let port = parse_port(&k, key)?;
            by_port.insert(port, self.port_policy(&k, over, &default)?);
        }
        let kind = ListenerKind::TransparentInbound(TransparentInboundSpec {
            default,
            ports: by_port,
            detect_timeout: self.detect_timeout,
            server_first_ports: ports(
                &format!("{at}.server_first_ports"),
                &self.server_first_ports,
            )?,
        });
        common!(self, INBOUND_NAME, at, tls).spec(kind)
    }

    /// A port's overrides on top of the listener's default.
    fn port_policy(
        &self,
        at: &str,
        over: &PortConfig,
        default: &PortPolicy,
    ) -> Result<PortPolicy, ConfigError> {
        let allow = match (&over.allow, over.allow_any_in_trust_domain) {
            (None, None) => default.allow.clone(),
            (list, any) => checked_allow_list(
                &format!("{at}.allow"),
                list.as_deref().unwrap_or_default(),
                any.unwrap_or(false),
            )?,
        };
        let protocol = over.protocol.unwrap_or(self.protocol);
        let http = self.http_keys(over, protocol).spec(at, true)?.map(Box::new);
        Ok(PortPolicy {
            mode: over.mode.unwrap_or(default.mode),
            allow,
            http,
        })
    }

    /// A port's HTTP keys: its own where it sets them, else the listener's. A TCP port
    /// inherits none (the listener's are for its HTTP ports), so its own are errors.
    fn http_keys<'a>(&'a self, over: &'a PortConfig, protocol: Protocol) -> HttpKeys<'a> {
        if protocol == Protocol::Tcp {
            return HttpKeys {
                protocol,
                identity_header: over.identity_header.as_deref(),
                xfcc: over.xfcc.as_ref(),
                pool: None,
                authorization: over.authorization.as_deref().unwrap_or_default(),
                rego: over.rego.as_ref(),
                opa: over.opa.as_ref(),
                ..HttpKeys::none(protocol)
            };
        }
        HttpKeys {
            protocol,
            identity_header: over
                .identity_header
                .as_deref()
                .or(self.identity_header.as_deref()),
            xfcc: over.xfcc.as_ref().or(self.xfcc.as_ref()),
            pool: None,
            authorization: over.authorization.as_deref().unwrap_or(&self.authorization),
            rego: over.rego.as_ref().or(self.rego.as_ref()),
            opa: over.opa.as_ref().or(self.opa.as_ref()),
            ..HttpKeys::none(protocol)
        }
    }
}

impl TransparentOutboundConfig {
    fn spec(&self, tls: TlsVersion) -> Result<ListenerSpec, ConfigError> {
        let at = "transparent.outbound";
        let mut routes = Vec::with_capacity(self.routes.len());
        for (i, r) in self.routes.iter().enumerate() {
            let at = format!("{at}.routes[{i}]");
            if r.to.is_empty() {
                return Err(ConfigError::new(
                    format!("{at}.to"),
                    "empty: list the IP addresses or CIDRs this route covers",
                ));
            }
            let to =
                r.to.iter()
                    .enumerate()
                    .map(|(j, c)| cidr(&format!("{at}.to[{j}]"), c))
                    .collect::<Result<_, _>>()?;
            if r.expect.is_empty() && !r.allow_any_in_trust_domain {
                return Err(ConfigError::new(
                    format!("{at}.expect"),
                    "missing: a route must say which SPIFFE IDs its servers may present (or allow_any_in_trust_domain: true)",
                ));
            }
            let expect = checked_allow_list(
                &format!("{at}.expect"),
                &r.expect,
                r.allow_any_in_trust_domain,
            )?;
            let sni = match &r.sni {
                Some(s) => Some(ServerName::try_from(s.clone()).map_err(|_| {
                    ConfigError::new(
                        format!("{at}.sni"),
                        format!("{s:?} is not a valid server name"),
                    )
                })?),
                None => None,
            };
            let http = HttpKeys {
                pool: r.pool,
                ..HttpKeys::none(r.protocol)
            }
            .spec(&at, false)?;
            routes.push(Route {
                to,
                ports: ports(&format!("{at}.ports"), &r.ports)?,
                expect,
                sni,
                http,
            });
        }
        let kind = ListenerKind::TransparentOutbound(TransparentOutboundSpec {
            routes,
            otherwise: self.otherwise,
        });
        common!(self, OUTBOUND_NAME, at, tls).spec(kind)
    }
}

/// A listening port: 0 would make the rules point nowhere.
fn listen_port(key: &str, port: u16) -> Result<u16, ConfigError> {
    if port == 0 {
        return Err(ConfigError::new(
            key,
            "needs a fixed port: the redirect rules point at it",
        ));
    }
    Ok(port)
}

/// A port written as a map key (`"9090"`).
fn parse_port(key: &str, text: &str) -> Result<u16, ConfigError> {
    match text.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(ConfigError::new(
            key,
            format!("{text:?} is not a port (1 to 65535)"),
        )),
    }
}

/// A list of ports: none may be 0 (serde already refuses what is not a u16).
fn ports(key: &str, list: &[u16]) -> Result<Vec<u16>, ConfigError> {
    if let Some(i) = list.iter().position(|p| *p == 0) {
        return Err(ConfigError::new(
            format!("{key}[{i}]"),
            "0 is not a port (1 to 65535)",
        ));
    }
    let mut out = list.to_vec();
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// An IP address (a host route) or a CIDR in canonical form (`10.0.0.0/8`, not
/// `10.1.2.3/8`: host bits set are a typo more often than not).
fn cidr(key: &str, text: &str) -> Result<IpNet, ConfigError> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    let net: IpNet = text.parse().map_err(|_| {
        ConfigError::new(
            key,
            format!("{text:?} is not an IP address or CIDR (write 10.0.0.0/8 or fd00::/64)"),
        )
    })?;
    if net.trunc() != net {
        return Err(ConfigError::new(
            key,
            format!("{text:?} has host bits set: did you mean {}?", net.trunc()),
        ));
    }
    Ok(net)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Mode, Otherwise};

    /// The shape the issue documents, as users will paste it.
    const DOC: &str = r#"
identity:
  dev: {spiffe_id: "spiffe://example.org/ns/prod/sa/web"}
admin: {listen: "127.0.0.1:15000"}
transparent:
  proxy_uid: 1337
  inbound:
    listen: "[::]:15006"            # dual-stack; 0.0.0.0:15006 for IPv4 only
    mode: strict                    # strict | permissive
    allow: [{trust_domain: example.org}]
    ports:                          # optional, by original destination port
      "9090": {mode: permissive}
      "8443": {allow: [{exact: "spiffe://example.org/ns/prod/sa/admin"}]}
    exclude_ports: [22]
  outbound:
    listen: "127.0.0.1:15001"
    routes:                         # first match wins
      - to: ["10.77.0.0/16", "fd77::/64"]
        ports: [8080, 8443]         # optional, default all
        expect: [{trust_domain: example.org}]
    otherwise: passthrough          # passthrough | deny
    exclude_ports: []
    exclude_cidrs: []
"#;

    fn err(yaml: &str) -> String {
        Config::parse(yaml).unwrap_err().to_string()
    }

    #[test]
    fn the_documented_shape_parses() {
        let c = Config::parse(DOC).unwrap();
        let r = c.redirect.as_ref().unwrap();
        assert_eq!((r.proxy_uid, r.proxy_gid), (1337, 1337));
        assert_eq!(r.inbound.as_ref().unwrap().port, 15006);
        assert_eq!(r.inbound.as_ref().unwrap().exclude_ports, vec![22]);
        assert_eq!(r.outbound.as_ref().unwrap().port, 15001);
        assert_eq!(r.own_ports, vec![15000, 15001, 15006]);
        let ListenerKind::TransparentInbound(i) = &c.listeners[0].kind else {
            panic!("{:?}", c.listeners[0]);
        };
        assert_eq!(i.policy(9090).mode, Mode::Permissive);
        assert_eq!(i.policy(8443).mode, Mode::Strict);
        assert_eq!(i.policy(8443).allow.rules.len(), 1);
        assert_eq!(i.policy(80).mode, Mode::Strict);
        assert_eq!(
            i.server_first_ports,
            vec![25, 587, 3306, 4444, 5432, 6379, 9300, 11211]
        );
        let ListenerKind::TransparentOutbound(o) = &c.listeners[1].kind else {
            panic!("{:?}", c.listeners[1]);
        };
        assert_eq!(o.otherwise, Otherwise::Passthrough);
        assert!(o.route("10.77.3.4:8080".parse().unwrap()).is_some());
        assert!(o
            .route("[::ffff:10.77.3.4]:8443".parse().unwrap())
            .is_some());
        assert!(o.route("[fd77::9]:8080".parse().unwrap()).is_some());
        assert!(o.route("10.77.3.4:9090".parse().unwrap()).is_none());
        assert!(o.route("10.78.0.1:8080".parse().unwrap()).is_none());
    }

    #[test]
    fn bad_input_names_the_key() {
        let e = err(&DOC.replace("proxy_uid: 1337", "proxy_uid: 0"));
        assert!(e.starts_with("transparent.proxy_uid: must not be 0"), "{e}");
        let e = err(&DOC.replace("        expect: [{trust_domain: example.org}]\n", ""));
        assert!(
            e.starts_with("transparent.outbound.routes[0].expect: missing"),
            "{e}"
        );
        let e = err(&DOC.replace("\"fd77::/64\"", "\"fd77::/644\""));
        assert!(
            e.starts_with("transparent.outbound.routes[0].to[1]:"),
            "{e}"
        );
        let e = err(&DOC.replace("10.77.0.0/16", "10.77.1.0/16"));
        assert!(
            e.contains("host bits set") && e.contains("10.77.0.0/16"),
            "{e}"
        );
        let e = err(&DOC.replace("exclude_ports: [22]", "exclude_ports: [70000]"));
        assert!(e.starts_with("transparent.inbound.exclude_ports"), "{e}");
        let e = err(&DOC.replace("exclude_ports: [22]", "exclude_ports: [0]"));
        assert!(
            e.starts_with("transparent.inbound.exclude_ports[0]:"),
            "{e}"
        );
        let e = err(&DOC.replace("\"9090\":", "\"99999\":"));
        assert!(e.starts_with("transparent.inbound.ports.99999:"), "{e}");
        let e = err(&DOC.replace("mode: strict ", "mode: strikt "));
        assert!(e.starts_with("transparent.inbound.mode:"), "{e}");
        let e = err(&DOC.replace("otherwise: passthrough", "otherwise: drop"));
        assert!(e.starts_with("transparent.outbound.otherwise:"), "{e}");
        let e = err(&DOC.replace("exclude_cidrs: []", "exclude_cidrs: [\"10.0.0.0/33\"]"));
        assert!(
            e.starts_with("transparent.outbound.exclude_cidrs[0]:"),
            "{e}"
        );
        let e = err(&DOC.replace("\"127.0.0.1:15001\"", "\"127.0.0.1:15000\""));
        assert!(e.starts_with("transparent.outbound.listen:"), "{e}");
    }

    #[test]
    fn http_ports_take_the_listeners_http_keys() {
        let yaml = DOC
            .replace(
                "    exclude_ports: [22]\n",
                "    exclude_ports: [22]\n    identity_header: X-Workload-ID\n    opa: {url: \"http://127.0.0.1:8181/v1/data/authz/allow\"}\n",
            )
            .replace(
                "\"9090\": {mode: permissive}",
                "\"9090\": {mode: permissive, protocol: http, identity_header: X-Caller}\n      \"8080\": {protocol: http, authorization: [{action: DENY, paths: [\"/admin\"]}]}",
            )
            .replace("        ports: [8080, 8443]", "        ports: [8080, 8443]\n        protocol: http\n        pool: false");
        let c = Config::parse(&yaml).unwrap();
        let ListenerKind::TransparentInbound(i) = &c.listeners[0].kind else {
            panic!();
        };
        // The default stays TCP: the listener's keys serve its HTTP ports.
        assert!(i.policy(80).http.is_none());
        assert!(i.policy(8443).http.is_none());
        let h = i.policy(9090).http.as_ref().unwrap();
        assert_eq!(h.identity_header.as_ref().unwrap(), "x-caller");
        assert!(h.opa.is_some() && h.rules.is_empty());
        let h = i.policy(8080).http.as_ref().unwrap();
        assert_eq!(h.identity_header.as_ref().unwrap(), "x-workload-id");
        assert!(!h.rules.is_empty());
        let ListenerKind::TransparentOutbound(o) = &c.listeners[1].kind else {
            panic!();
        };
        assert!(!o.routes[0].http.as_ref().unwrap().pool);
        // A listener-wide protocol: every port not set to tcp is HTTP.
        let all = yaml.replace("    mode: strict ", "    protocol: http\n    mode: strict ");
        let c = Config::parse(&all).unwrap();
        let ListenerKind::TransparentInbound(i) = &c.listeners[0].kind else {
            panic!();
        };
        assert!(i.policy(80).http.is_some() && i.policy(8443).http.is_some());

        let e = err(&yaml.replace(
            "identity_header: X-Caller",
            "identity_header: \"bad header\"",
        ));
        assert!(
            e.starts_with("transparent.inbound.ports.9090.identity_header:"),
            "{e}"
        );
        let e = err(&yaml.replace(
            "{protocol: http, authorization",
            "{protocol: tcp, authorization",
        ));
        assert!(
            e.starts_with("transparent.inbound.ports.8080.authorization: only for HTTP"),
            "{e}"
        );
        let e = err(&yaml.replace("\"http://127", "\"https://127"));
        assert!(e.starts_with("transparent.inbound.opa.url:"), "{e}");
        let e = err(&yaml.replace("        protocol: http\n", ""));
        assert!(
            e.starts_with("transparent.outbound.routes[0].pool: only for HTTP"),
            "{e}"
        );
    }

    #[test]
    fn overlapping_routes_are_fine_and_the_first_wins() {
        let yaml = DOC.replace(
            "    otherwise: passthrough",
            "      - to: [\"10.0.0.0/8\"]\n        expect: [{exact: \"spiffe://example.org/other\"}]\n    otherwise: deny",
        );
        let c = Config::parse(&yaml).unwrap();
        let ListenerKind::TransparentOutbound(o) = &c.listeners[1].kind else {
            panic!();
        };
        assert_eq!(o.otherwise, Otherwise::Deny);
        let first = o.route("10.77.0.1:8080".parse().unwrap()).unwrap();
        assert_eq!(first.ports, vec![8080, 8443]);
        let second = o.route("10.77.0.1:9000".parse().unwrap()).unwrap();
        assert!(second.ports.is_empty());
    }
}
