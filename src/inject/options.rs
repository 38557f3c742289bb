//! What the injector puts into pods unless an annotation says otherwise: the image, where
//! the Workload API socket comes from, svidcar's ports and uid. `svidcar inject` takes
//! these as flags and the webhook as its `inject:` config section.

use serde::Deserialize;

/// Where the sidecar finds the SPIRE Agent's Workload API socket. Written in the
/// webhook config as `{csi: {driver: csi.spiffe.io}}` or `{host_path: {path: DIR}}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "IdentityVolumeConfig")]
pub enum IdentityVolume {
    /// The SPIFFE CSI driver (`csi.spiffe.io`) mounts the agent's socket directory.
    Csi { driver: String },
    /// A hostPath directory holding the agent's socket.
    HostPath { path: String },
}

/// `identity_volume` as written: one of the two keys (a YAML map, not a tagged enum,
/// which serde's YAML reader would want as `!csi`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IdentityVolumeConfig {
    #[serde(default)]
    csi: Option<CsiConfig>,
    #[serde(default)]
    host_path: Option<HostPathConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CsiConfig {
    driver: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostPathConfig {
    path: String,
}

impl TryFrom<IdentityVolumeConfig> for IdentityVolume {
    type Error = &'static str;

    fn try_from(c: IdentityVolumeConfig) -> Result<Self, Self::Error> {
        match (c.csi, c.host_path) {
            (Some(c), None) => Ok(IdentityVolume::Csi { driver: c.driver }),
            (None, Some(h)) => Ok(IdentityVolume::HostPath { path: h.path }),
            _ => Err("set one of csi: {driver: ...} or host_path: {path: ...}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Options {
    pub image: String,
    /// `imagePullPolicy` of both svidcar containers; none: the cluster's default.
    pub image_pull_policy: Option<String>,
    pub identity_volume: IdentityVolume,
    /// The socket's file name inside the mounted directory.
    pub socket_name: String,
    /// The uid svidcar runs as; its own traffic is never redirected.
    pub proxy_uid: u32,
    pub admin_port: u16,
    pub inbound_port: u16,
    pub outbound_port: u16,
    /// `strict` or `permissive`, unless `svidcar.io/mode` says otherwise.
    pub mode: String,
    /// Destinations reached over mTLS (everything else: plain TCP, passthrough).
    /// Default: every address, so a pod talks only to meshed peers unless its
    /// `svidcar.io/exclude-outbound-cidrs` (or this list) says otherwise.
    pub mesh_cidrs: Vec<String>,
    /// Seconds the sidecar keeps serving after SIGTERM (its `drain_timeout`).
    pub drain_seconds: u32,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            image: format!("ghcr.io/svidcar/svidcar:{}", env!("CARGO_PKG_VERSION")),
            image_pull_policy: None,
            identity_volume: IdentityVolume::Csi {
                driver: "csi.spiffe.io".into(),
            },
            socket_name: "spire-agent.sock".into(),
            proxy_uid: 1337,
            admin_port: 15020,
            inbound_port: 15006,
            outbound_port: 15001,
            mode: "strict".into(),
            mesh_cidrs: vec!["0.0.0.0/0".into(), "::/0".into()],
            drain_seconds: 10,
        }
    }
}

impl Options {
    /// The Workload API address the sidecar dials.
    pub fn socket_url(&self) -> String {
        format!(
            "unix://{}/{}",
            super::names::WORKLOAD_API_DIR,
            self.socket_name
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_volume_is_written_as_a_map() {
        let o: Options =
            serde_norway::from_str("identity_volume: {host_path: {path: /run/spire/sockets}}\n")
                .unwrap();
        assert_eq!(
            o.identity_volume,
            IdentityVolume::HostPath {
                path: "/run/spire/sockets".into()
            }
        );
        let o: Options =
            serde_norway::from_str("identity_volume: {csi: {driver: csi.example}}\n").unwrap();
        assert_eq!(
            o.identity_volume,
            IdentityVolume::Csi {
                driver: "csi.example".into()
            }
        );
        for bad in [
            "identity_volume: {}\n",
            "identity_volume: {csi: {driver: a}, host_path: {path: b}}\n",
            "identity_volume: {nfs: {}}\n",
        ] {
            assert!(serde_norway::from_str::<Options>(bad).is_err(), "{bad}");
        }
    }
}
