//! Probe rewriting: kubelet has no SVID and an injected pod's ports take mTLS only, so
//! each container's `httpGet` liveness, readiness and startup probe is pointed at
//! svidcar's admin port (`/app-health/<container>/<probe>`), which calls the original
//! over localhost. `tcpSocket`, `exec` and `grpc` probes, and `httpGet` probes with a
//! `host` (kubelet calls another address), are left as they are.

use std::collections::BTreeMap;

use serde_norway::{Mapping, Value};

use super::InjectError;
use crate::admin::app_health::{AppProbe, ProbeHeader};

/// The probe fields of a container and the names used in `/app-health/` paths.
pub const PROBES: [(&str, &str); 3] = [
    ("livenessProbe", "liveness"),
    ("readinessProbe", "readiness"),
    ("startupProbe", "startup"),
];

/// Rewrites the probes of `containers` in place; returns the originals by
/// `container/probe`.
pub fn rewrite(
    containers: &mut [Value],
    admin_port: u16,
) -> Result<BTreeMap<String, AppProbe>, InjectError> {
    let mut originals = BTreeMap::new();
    for (i, c) in containers.iter_mut().enumerate() {
        let name = c
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| InjectError::Spec {
                field: format!("containers[{i}].name"),
                problem: "missing".into(),
            })?
            .to_string();
        let ports = c.get("ports").cloned();
        for (field, probe) in PROBES {
            let Some(get) = c.get_mut(field).and_then(|p| p.get_mut("httpGet")) else {
                continue;
            };
            if get.get("host").is_some() {
                continue;
            }
            let at = format!("containers[{i}].{field}.httpGet");
            let original = original(get, ports.as_ref(), &at)?;
            let mut new = Mapping::new();
            new.insert("path".into(), format!("/app-health/{name}/{probe}").into());
            new.insert("port".into(), Value::from(admin_port));
            new.insert("scheme".into(), "HTTP".into());
            *get = Value::Mapping(new);
            originals.insert(format!("{name}/{probe}"), original);
        }
    }
    Ok(originals)
}

fn original(get: &Value, ports: Option<&Value>, at: &str) -> Result<AppProbe, InjectError> {
    let bad = |field: &str, problem: String| InjectError::Spec {
        field: format!("{at}.{field}"),
        problem,
    };
    let port = match get.get("port") {
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|n| u16::try_from(n).ok())
            .filter(|n| *n != 0)
            .ok_or_else(|| bad("port", format!("{n} is not a port")))?,
        Some(Value::String(s)) => match s.parse::<u16>() {
            Ok(n) if n != 0 => n,
            _ => named_port(ports, s)
                .ok_or_else(|| bad("port", format!("no container port named {s:?}")))?,
        },
        _ => return Err(bad("port", "missing".into())),
    };
    let path = match get.get("path").and_then(Value::as_str) {
        None | Some("") => "/".to_string(),
        Some(p) if p.starts_with('/') => p.to_string(),
        Some(p) => format!("/{p}"),
    };
    let scheme = get
        .get("scheme")
        .and_then(Value::as_str)
        .unwrap_or("HTTP")
        .to_ascii_uppercase();
    if scheme != "HTTP" && scheme != "HTTPS" {
        return Err(bad(
            "scheme",
            format!("{scheme:?} is neither HTTP nor HTTPS"),
        ));
    }
    let mut headers = Vec::new();
    if let Some(Value::Sequence(hs)) = get.get("httpHeaders") {
        for h in hs {
            let (Some(name), Some(value)) = (
                h.get("name").and_then(Value::as_str),
                h.get("value").and_then(Value::as_str),
            ) else {
                return Err(bad("httpHeaders", "each needs a name and a value".into()));
            };
            headers.push(ProbeHeader {
                name: name.into(),
                value: value.into(),
            });
        }
    }
    Ok(AppProbe {
        port,
        path,
        scheme,
        headers,
    })
}

fn named_port(ports: Option<&Value>, name: &str) -> Option<u16> {
    let Some(Value::Sequence(ports)) = ports else {
        return None;
    };
    ports
        .iter()
        .find(|p| p.get("name").and_then(Value::as_str) == Some(name))
        .and_then(|p| p.get("containerPort"))
        .and_then(Value::as_u64)
        .and_then(|n| u16::try_from(n).ok())
}
