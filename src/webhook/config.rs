//! The webhook's config file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::{parse_yaml, read_text, ConfigError};
use crate::inject::Options;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    pub tls: TlsFiles,
    /// The URL path the API server posts reviews to.
    #[serde(default = "default_path")]
    pub path: String,
    /// A pod that cannot be injected (a bad annotation, a volume name taken): `allow` it
    /// unchanged with a warning, or `deny` its creation.
    #[serde(default)]
    pub on_error: OnError,
    /// What `svidcar inject` takes as flags.
    #[serde(default)]
    pub inject: Options,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    #[default]
    Allow,
    Deny,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8443))
}

fn default_path() -> String {
    "/mutate".into()
}

impl WebhookConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let mut c: Self = parse_yaml(&read_text(path)?)?;
        if !c.path.starts_with('/') {
            return Err(ConfigError::new("path", "must start with /"));
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        for p in [&mut c.tls.cert, &mut c.tls.key] {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
        Ok(c)
    }
}
