//! The svidcar config of an injected pod, made from its container ports and `svidcar.io/*`
//! annotations: the identity from the Workload API socket, the admin port (probes), and
//! `transparent` with the pod's inbound ports and outbound mTLS to the mesh.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde_norway::{Mapping, Value};

use super::{keys, names, InjectError, Options};

/// The pod's annotations that shape its config.
pub type Annotations = BTreeMap<String, String>;

/// The config text for a pod with `containers` and `annotations`.
pub fn generate(
    containers: &[Value],
    annotations: &Annotations,
    opts: &Options,
) -> Result<String, InjectError> {
    let get = |k: &str| {
        annotations
            .get(k)
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
    };

    let mode = get(keys::MODE).unwrap_or(&opts.mode);
    if mode != "strict" && mode != "permissive" {
        return Err(InjectError::Annotation {
            key: keys::MODE,
            problem: format!("{mode:?}: use strict or permissive"),
        });
    }
    let include = match get(keys::INBOUND_PORTS) {
        Some("*") => Vec::new(),
        Some(list) => ports(keys::INBOUND_PORTS, list)?,
        None => container_ports(containers),
    };
    let exclude_in = get(keys::EXCLUDE_INBOUND_PORTS)
        .map(|l| ports(keys::EXCLUDE_INBOUND_PORTS, l))
        .transpose()?
        .unwrap_or_default();
    let exclude_out = get(keys::EXCLUDE_OUTBOUND_PORTS)
        .map(|l| ports(keys::EXCLUDE_OUTBOUND_PORTS, l))
        .transpose()?
        .unwrap_or_default();
    let exclude_cidrs = get(keys::EXCLUDE_OUTBOUND_CIDRS)
        .map(|l| cidrs(keys::EXCLUDE_OUTBOUND_CIDRS, l))
        .transpose()?
        .unwrap_or_default();

    let mut inbound = map([
        ("listen", format!("0.0.0.0:{}", opts.inbound_port).into()),
        ("mode", mode.into()),
    ]);
    match get(keys::ALLOW) {
        Some(list) => {
            inbound.insert("allow".into(), allow(list)?);
        }
        None => {
            inbound.insert("allow_any_in_trust_domain".into(), true.into());
        }
    }
    if !include.is_empty() {
        inbound.insert("include_ports".into(), seq(include));
    }
    if !exclude_in.is_empty() {
        inbound.insert("exclude_ports".into(), seq(exclude_in));
    }
    let route = map([
        ("to", seq(opts.mesh_cidrs.clone())),
        ("allow_any_in_trust_domain", true.into()),
    ]);
    let mut outbound = map([
        ("listen", format!("127.0.0.1:{}", opts.outbound_port).into()),
        ("routes", Value::Sequence(vec![Value::Mapping(route)])),
    ]);
    if !exclude_out.is_empty() {
        outbound.insert("exclude_ports".into(), seq(exclude_out));
    }
    if !exclude_cidrs.is_empty() {
        outbound.insert("exclude_cidrs".into(), seq(exclude_cidrs));
    }
    let config = map([
        (
            "identity",
            Value::Mapping(map([(
                "workload_api",
                Value::Mapping(map([("socket", opts.socket_url().into())])),
            )])),
        ),
        (
            "admin",
            Value::Mapping(map([
                ("listen", format!("0.0.0.0:{}", opts.admin_port).into()),
                (
                    "app_probes",
                    format!("{}/probes.json", names::POD_DIR).into(),
                ),
            ])),
        ),
        ("drain_timeout", format!("{}s", opts.drain_seconds).into()),
        (
            "transparent",
            Value::Mapping(map([
                ("proxy_uid", Value::from(opts.proxy_uid)),
                ("inbound", Value::Mapping(inbound)),
                ("outbound", Value::Mapping(outbound)),
            ])),
        ),
    ]);
    let text = serde_norway::to_string(&Value::Mapping(config))
        .map_err(|e| InjectError::Yaml(e.to_string()))?;
    // What svidcar will read must load: a mistake here is ours, not the pod's.
    crate::config::Config::parse(&text).map_err(|e| InjectError::Spec {
        field: "generated svidcar config".into(),
        problem: e.to_string(),
    })?;
    Ok(text)
}

fn map<const N: usize>(pairs: [(&str, Value); N]) -> Mapping {
    pairs.into_iter().map(|(k, v)| (k.into(), v)).collect()
}

fn seq<T: Into<Value>>(items: Vec<T>) -> Value {
    Value::Sequence(items.into_iter().map(Into::into).collect())
}

/// TCP container ports of the app's containers, in order, each once.
fn container_ports(containers: &[Value]) -> Vec<u16> {
    let mut out = Vec::new();
    for c in containers {
        let Some(Value::Sequence(ports)) = c.get("ports") else {
            continue;
        };
        for p in ports {
            let tcp = p
                .get("protocol")
                .and_then(Value::as_str)
                .is_none_or(|proto| proto == "TCP");
            let port = p
                .get("containerPort")
                .and_then(Value::as_u64)
                .and_then(|n| u16::try_from(n).ok());
            if let (true, Some(port)) = (tcp, port) {
                if !out.contains(&port) {
                    out.push(port);
                }
            }
        }
    }
    out
}

fn list(text: &str) -> impl Iterator<Item = &str> {
    text.split(',').map(str::trim).filter(|s| !s.is_empty())
}

fn ports(key: &'static str, text: &str) -> Result<Vec<u16>, InjectError> {
    list(text)
        .map(|p| match p.parse::<u16>() {
            Ok(n) if n != 0 => Ok(n),
            _ => Err(InjectError::Annotation {
                key,
                problem: format!("{p:?} is not a port (1-65535)"),
            }),
        })
        .collect()
}

fn cidrs(key: &'static str, text: &str) -> Result<Vec<String>, InjectError> {
    list(text)
        .map(|c| {
            if c.parse::<IpNet>().is_ok() || c.parse::<IpAddr>().is_ok() {
                Ok(c.to_string())
            } else {
                Err(InjectError::Annotation {
                    key,
                    problem: format!("{c:?} is not an address or CIDR"),
                })
            }
        })
        .collect()
}

/// `example.org` (a trust domain) or `spiffe://example.org/ns/a/sa/b` entries.
fn allow(text: &str) -> Result<Value, InjectError> {
    let mut out = Vec::new();
    for entry in list(text) {
        let m = if entry.starts_with("spiffe://") {
            crate::spiffe::parse_spiffe_id(entry).map_err(|e| InjectError::Annotation {
                key: keys::ALLOW,
                problem: format!("{entry:?}: {e}"),
            })?;
            map([("exact", entry.into())])
        } else {
            crate::spiffe::parse_spiffe_id(&format!("spiffe://{entry}")).map_err(|e| {
                InjectError::Annotation {
                    key: keys::ALLOW,
                    problem: format!("{entry:?} is neither a SPIFFE ID nor a trust domain: {e}"),
                }
            })?;
            map([("trust_domain", entry.into())])
        };
        out.push(Value::Mapping(m));
    }
    if out.is_empty() {
        return Err(InjectError::Annotation {
            key: keys::ALLOW,
            problem: "empty: name trust domains or SPIFFE IDs, comma-separated".into(),
        });
    }
    Ok(Value::Sequence(out))
}
