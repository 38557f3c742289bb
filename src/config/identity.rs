//! `identity`: which source gives this workload its SVIDs, checked and typed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::raw::{FilesConfig, IdentityConfigRaw, WorkloadApiConfigRaw};
use super::values::parse_workload_socket;
use super::{file::resolve_path, ConfigError};
use crate::spiffe::{parse_trust_domain, SpiffeId, TrustDomain};

#[derive(Debug, Clone)]
pub struct WorkloadApiConfig {
    pub socket: PathBuf,
    pub spiffe_id: Option<SpiffeId>,
    pub hint: Option<String>,
}

#[derive(Debug, Clone)]
pub enum IdentityConfig {
    Dev(DevConfig),
    Files(FilesConfig),
    WorkloadApi(WorkloadApiConfig),
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

impl IdentityConfigRaw {
    /// Makes every relative file path relative to `base`.
    pub(super) fn resolve_paths(&mut self, base: &Path) {
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
            for p in f.bundles.values_mut().chain(f.jwt_bundles.values_mut()) {
                resolve_path(base, p);
            }
        }
    }

    pub(super) fn validate(&self) -> Result<IdentityConfig, ConfigError> {
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
            for td in files.jwt_bundles.keys() {
                parse_trust_domain(td).map_err(|e| {
                    ConfigError::new(format!("identity.files.jwt_bundles.{td}"), e.to_string())
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
