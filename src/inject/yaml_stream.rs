//! `svidcar inject`'s text side: a multi-document YAML stream in, the same stream out
//! with pod templates injected, and a report line for each object that was skipped or
//! could not be injected.

use serde::Deserialize;
use serde_norway::Value;

use super::{inject_object, InjectError, Options, Outcome};

/// What happened to one object, for stderr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// `Kind/namespace/name`.
    pub object: String,
    pub outcome: Result<Outcome, InjectError>,
}

/// Injects every document of `text`. Documents are written back in order, separated by
/// `---`; empty documents are dropped. A document that is not valid YAML fails the whole
/// stream (nothing is written), so a pipeline never applies half a file.
pub fn inject_yaml(text: &str, opts: &Options) -> Result<(String, Vec<Report>), InjectError> {
    let mut docs = Vec::new();
    for (i, de) in serde_norway::Deserializer::from_str(text).enumerate() {
        let v = Value::deserialize(de)
            .map_err(|e| InjectError::Yaml(format!("document {}: {e}", i + 1)))?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    let mut out = String::new();
    let mut reports = Vec::new();
    for mut doc in docs {
        for (object, outcome) in inject_object(&mut doc, opts) {
            reports.push(Report { object, outcome });
        }
        let text = serde_norway::to_string(&doc).map_err(|e| InjectError::Yaml(e.to_string()))?;
        if !out.is_empty() {
            out.push_str("---\n");
        }
        out.push_str(&text);
    }
    Ok((out, reports))
}
