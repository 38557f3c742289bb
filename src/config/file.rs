//! Reading the file: YAML with errors that name the key, the line and the problem, and
//! paths relative to the file's own directory.

use std::path::{Path, PathBuf};

use super::ConfigError;

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
