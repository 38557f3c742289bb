//! Finding the pod template inside a Kubernetes object: a Pod itself, the template of a
//! Deployment, StatefulSet, DaemonSet, ReplicaSet, ReplicationController or Job, the job
//! template of a CronJob, and every item of a `List`.

use serde_norway::Value;

pub use super::outcome::{Outcome, SkipReason};
use super::{keys, pod, InjectError, Options};

/// Injects every pod template in `obj` (several for a `List`); returns each one's
/// `Kind/name` and outcome. An object that cannot be injected is left unchanged and its
/// error returned with its name; the others are still injected.
pub fn inject_object(
    obj: &mut Value,
    opts: &Options,
) -> Vec<(String, Result<Outcome, InjectError>)> {
    let mut out = Vec::new();
    visit(obj, opts, &mut out);
    out
}

fn visit(obj: &mut Value, opts: &Options, out: &mut Vec<(String, Result<Outcome, InjectError>)>) {
    let kind = obj
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if kind.ends_with("List") {
        if let Some(Value::Sequence(items)) = obj.get_mut("items") {
            for item in items {
                visit(item, opts, out);
            }
        }
        return;
    }
    let label = label(obj, &kind);
    let opted_out = annotation(obj.get("metadata"), keys::INJECT) == Some("false");
    let template_path: &[&str] = match kind.as_str() {
        "Pod" => &[],
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "ReplicationController"
        | "Job" => &["spec", "template"],
        "CronJob" => &["spec", "jobTemplate", "spec", "template"],
        _ => {
            out.push((label, Ok(Outcome::NotAWorkload)));
            return;
        }
    };
    let Some(template) = walk_mut(obj, template_path) else {
        out.push((
            label,
            Err(InjectError::Spec {
                field: template_path.join("."),
                problem: "missing: no pod template to inject into".into(),
            }),
        ));
        return;
    };
    if opted_out {
        out.push((label, Ok(Outcome::Skipped(SkipReason::OptedOut))));
        return;
    }
    // Injection works on a copy, so a pod that fails half-way is left as it was.
    let mut copy = template.clone();
    let result = pod::inject_template(&mut copy, opts);
    if matches!(result, Ok(Outcome::Injected)) {
        *template = copy;
    }
    out.push((label, result));
}

fn label(obj: &Value, kind: &str) -> String {
    let meta = obj.get("metadata");
    let name = meta
        .and_then(|m| m.get("name").or_else(|| m.get("generateName")))
        .and_then(Value::as_str)
        .unwrap_or("(unnamed)");
    match meta
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
    {
        Some(ns) => format!("{kind}/{ns}/{name}"),
        None => format!("{kind}/{name}"),
    }
}

fn walk_mut<'a>(mut v: &'a mut Value, path: &[&str]) -> Option<&'a mut Value> {
    for key in path {
        v = v.get_mut(*key)?;
    }
    v.is_mapping().then_some(v)
}

/// The value of one annotation in a `metadata` mapping, if it is a string.
pub fn annotation<'a>(meta: Option<&'a Value>, key: &str) -> Option<&'a str> {
    meta?.get("annotations")?.get(key)?.as_str()
}
