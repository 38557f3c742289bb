//! What the injector puts into pods unless an annotation says otherwise: the image, where
//! the Workload API socket comes from, svidcar's ports and uid. `svidcar inject` takes
//! these as flags and the webhook as its `inject:` config section.

use serde::Deserialize;

/// Where the sidecar finds the SPIRE Agent's Workload API socket.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum IdentityVolume {
    /// The SPIFFE CSI driver (`csi.spiffe.io`) mounts the agent's socket directory.
    Csi { driver: String },
    /// A hostPath directory holding the agent's socket.
    HostPath { path: String },
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
