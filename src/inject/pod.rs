//! Injecting one pod template (`metadata` + `spec`): the redirect init container, the
//! native sidecar, volumes, rewritten probes and the annotations that carry the
//! generated config and the original probes.

use serde_norway::{Mapping, Value};

use super::outcome::{Outcome, SkipReason};
use super::sidecar_config::{self, Annotations};
use super::{keys, names, probes, IdentityVolume, InjectError, Options};

/// Injects `template` in place (a mapping with `metadata` and `spec`). On an error it may
/// be half-changed: callers work on a copy.
pub fn inject_template(template: &mut Value, opts: &Options) -> Result<Outcome, InjectError> {
    let annotations = annotations(template.get("metadata"));
    let spec = template
        .get_mut("spec")
        .filter(|s| s.is_mapping())
        .ok_or_else(|| spec_err("spec", "missing"))?;
    if annotations.contains_key(keys::STATUS) || has_sidecar(spec) {
        return Ok(Outcome::AlreadyInjected);
    }
    if annotations.get(keys::INJECT).map(String::as_str) == Some("false") {
        return Ok(Outcome::Skipped(SkipReason::OptedOut));
    }
    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        return Ok(Outcome::Skipped(SkipReason::HostNetwork));
    }
    let image = annotations
        .get(keys::IMAGE)
        .map(String::as_str)
        .unwrap_or(&opts.image)
        .to_string();
    let config_map = annotations.get(keys::CONFIG).cloned();

    let containers = match spec.get_mut("containers") {
        Some(Value::Sequence(c)) if !c.is_empty() => c,
        _ => return Err(spec_err("spec.containers", "missing or empty")),
    };
    let generated = match &config_map {
        Some(_) => None,
        None => Some(sidecar_config::generate(containers, &annotations, opts)?),
    };
    let originals = probes::rewrite(containers, opts.admin_port)?;
    let probes_json =
        serde_json::to_string(&originals).map_err(|e| spec_err("probes", &e.to_string()))?;

    let config_path = match &config_map {
        Some(_) => format!("{}/config.yaml", names::CONFIG_DIR),
        None => format!("{}/config.yaml", names::POD_DIR),
    };
    let spec_map = spec
        .as_mapping_mut()
        .ok_or_else(|| spec_err("spec", "not a mapping"))?;
    add_volumes(spec_map, opts, config_map.as_deref(), generated.is_some())?;
    let inits = seq_mut(spec_map, "initContainers")?;
    inits.insert(0, sidecar(&image, &config_path, config_map.is_some(), opts));
    inits.insert(
        0,
        redirect(&image, &config_path, config_map.is_some(), opts),
    );

    let meta = template
        .as_mapping_mut()
        .ok_or_else(|| spec_err("template", "not a mapping"))?;
    let meta = map_mut(meta, "metadata")?;
    let notes = map_mut(meta, "annotations")?;
    notes.insert(keys::STATUS.into(), "injected".into());
    if let Some(text) = generated {
        notes.insert(keys::SIDECAR_CONFIG.into(), text.into());
    }
    notes.insert(keys::ORIGINAL_PROBES.into(), probes_json.into());
    Ok(Outcome::Injected)
}

fn spec_err(field: &str, problem: &str) -> InjectError {
    InjectError::Spec {
        field: field.into(),
        problem: problem.into(),
    }
}

fn annotations(meta: Option<&Value>) -> Annotations {
    let mut out = Annotations::new();
    if let Some(Value::Mapping(m)) = meta.and_then(|m| m.get("annotations")) {
        for (k, v) in m {
            if let (Some(k), Some(v)) = (k.as_str(), v.as_str()) {
                out.insert(k.to_string(), v.to_string());
            }
        }
    }
    out
}

fn has_sidecar(spec: &Value) -> bool {
    ["initContainers", "containers"].iter().any(|field| {
        matches!(spec.get(*field), Some(Value::Sequence(cs)) if cs.iter().any(|c| {
            matches!(c.get("name").and_then(Value::as_str), Some(names::SIDECAR) | Some(names::REDIRECT))
        }))
    })
}

/// `m[key]` as a mapping, made if absent (or null).
fn map_mut<'a>(m: &'a mut Mapping, key: &str) -> Result<&'a mut Mapping, InjectError> {
    let slot = m
        .entry(key.into())
        .or_insert_with(|| Value::Mapping(Mapping::new()));
    if slot.is_null() {
        *slot = Value::Mapping(Mapping::new());
    }
    slot.as_mapping_mut()
        .ok_or_else(|| spec_err(key, "not a mapping"))
}

/// `m[key]` as a sequence, made if absent (or null).
fn seq_mut<'a>(m: &'a mut Mapping, key: &str) -> Result<&'a mut Vec<Value>, InjectError> {
    let slot = m
        .entry(key.into())
        .or_insert_with(|| Value::Sequence(Vec::new()));
    if slot.is_null() {
        *slot = Value::Sequence(Vec::new());
    }
    slot.as_sequence_mut()
        .ok_or_else(|| spec_err(key, "not a list"))
}

fn map<const N: usize>(pairs: [(&str, Value); N]) -> Value {
    Value::Mapping(pairs.into_iter().map(|(k, v)| (k.into(), v)).collect())
}

fn strings(items: &[&str]) -> Value {
    Value::Sequence(items.iter().map(|s| (*s).into()).collect())
}

fn add_volumes(
    spec: &mut Mapping,
    opts: &Options,
    config_map: Option<&str>,
    generated: bool,
) -> Result<(), InjectError> {
    let volumes = seq_mut(spec, "volumes")?;
    for v in volumes.iter() {
        if let Some(name) = v.get("name").and_then(Value::as_str) {
            if [
                names::POD_VOLUME,
                names::CONFIG_VOLUME,
                names::WORKLOAD_API_VOLUME,
            ]
            .contains(&name)
            {
                return Err(spec_err(
                    "spec.volumes",
                    &format!("a volume named {name} exists already"),
                ));
            }
        }
    }
    let field = |path: &str, key: &str| {
        map([
            ("path", path.into()),
            (
                "fieldRef",
                map([("fieldPath", format!("metadata.annotations['{key}']").into())]),
            ),
        ])
    };
    let mut items = Vec::new();
    if generated {
        items.push(field("config.yaml", keys::SIDECAR_CONFIG));
    }
    items.push(field("probes.json", keys::ORIGINAL_PROBES));
    volumes.push(map([
        ("name", names::POD_VOLUME.into()),
        ("downwardAPI", map([("items", Value::Sequence(items))])),
    ]));
    if let Some(cm) = config_map {
        volumes.push(map([
            ("name", names::CONFIG_VOLUME.into()),
            ("configMap", map([("name", cm.into())])),
        ]));
    }
    let source = match &opts.identity_volume {
        IdentityVolume::Csi { driver } => (
            "csi",
            map([
                ("driver", driver.as_str().into()),
                ("readOnly", true.into()),
            ]),
        ),
        IdentityVolume::HostPath { path } => (
            "hostPath",
            map([("path", path.as_str().into()), ("type", "Directory".into())]),
        ),
    };
    volumes.push(map([("name", names::WORKLOAD_API_VOLUME.into()), source]));
    Ok(())
}

fn mounts(config_map: bool, workload_api: bool) -> Value {
    let mount = |name: &str, path: &str| {
        map([
            ("name", name.into()),
            ("mountPath", path.into()),
            ("readOnly", true.into()),
        ])
    };
    let mut out = vec![mount(names::POD_VOLUME, names::POD_DIR)];
    if config_map {
        out.push(mount(names::CONFIG_VOLUME, names::CONFIG_DIR));
    }
    if workload_api {
        out.push(mount(names::WORKLOAD_API_VOLUME, names::WORKLOAD_API_DIR));
    }
    Value::Sequence(out)
}

fn with_pull_policy(mut c: Value, opts: &Options) -> Value {
    if let (Some(p), Some(m)) = (&opts.image_pull_policy, c.as_mapping_mut()) {
        m.insert("imagePullPolicy".into(), p.as_str().into());
    }
    c
}

/// `svidcar redirect`: root with NET_ADMIN and NET_RAW only, for the nat rules.
fn redirect(image: &str, config: &str, config_map: bool, opts: &Options) -> Value {
    with_pull_policy(
        map([
            ("name", names::REDIRECT.into()),
            ("image", image.into()),
            ("args", strings(&["redirect", "--config", config])),
            (
                "securityContext",
                map([
                    ("allowPrivilegeEscalation", false.into()),
                    (
                        "capabilities",
                        map([
                            ("add", strings(&["NET_ADMIN", "NET_RAW"])),
                            ("drop", strings(&["ALL"])),
                        ]),
                    ),
                    ("privileged", false.into()),
                    // iptables takes its lock in /run.
                    ("readOnlyRootFilesystem", false.into()),
                    ("runAsGroup", 0.into()),
                    ("runAsNonRoot", false.into()),
                    ("runAsUser", 0.into()),
                ]),
            ),
            ("volumeMounts", mounts(config_map, false)),
        ]),
        opts,
    )
}

/// svidcar as a native sidecar: started before the app, ready once an SVID is loaded,
/// stopped after the app (so Jobs complete).
fn sidecar(image: &str, config: &str, config_map: bool, opts: &Options) -> Value {
    let admin = |path: &str| {
        map([(
            "httpGet",
            map([
                ("path", path.into()),
                ("port", Value::from(opts.admin_port)),
            ]),
        )])
    };
    let mut startup = admin("/ready");
    let mut readiness = admin("/ready");
    if let (Some(s), Some(r)) = (startup.as_mapping_mut(), readiness.as_mapping_mut()) {
        s.insert("periodSeconds".into(), 1.into());
        s.insert("failureThreshold".into(), 300.into());
        r.insert("periodSeconds".into(), 5.into());
    }
    with_pull_policy(
        map([
            ("name", names::SIDECAR.into()),
            ("image", image.into()),
            ("args", strings(&["run", "--config", config])),
            (
                "env",
                Value::Sequence(vec![map([
                    ("name", "SPIFFE_ENDPOINT_SOCKET".into()),
                    ("value", opts.socket_url().into()),
                ])]),
            ),
            (
                "ports",
                Value::Sequence(vec![map([
                    ("name", "svidcar-admin".into()),
                    ("containerPort", Value::from(opts.admin_port)),
                    ("protocol", "TCP".into()),
                ])]),
            ),
            ("restartPolicy", "Always".into()),
            ("startupProbe", startup),
            ("readinessProbe", readiness),
            ("livenessProbe", admin("/live")),
            ("lifecycle", map([("preStop", admin("/drain"))])),
            (
                "resources",
                map([(
                    "requests",
                    map([("cpu", "10m".into()), ("memory", "32Mi".into())]),
                )]),
            ),
            (
                "securityContext",
                map([
                    ("allowPrivilegeEscalation", false.into()),
                    ("capabilities", map([("drop", strings(&["ALL"]))])),
                    ("privileged", false.into()),
                    ("readOnlyRootFilesystem", true.into()),
                    ("runAsGroup", Value::from(opts.proxy_uid)),
                    ("runAsNonRoot", true.into()),
                    ("runAsUser", Value::from(opts.proxy_uid)),
                ]),
            ),
            ("volumeMounts", mounts(config_map, true)),
        ]),
        opts,
    )
}
