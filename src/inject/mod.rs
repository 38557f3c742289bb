//! Adding the svidcar sidecar to Kubernetes workloads: one function behind both
//! `svidcar inject` (YAML in, YAML out) and the admission webhook (a pod in, a JSONPatch
//! out), so both produce the same pod.
//!
//! What an injected pod gets (see [`pod`]): an init container that runs `svidcar
//! redirect`, svidcar itself as a native sidecar (an init container with
//! `restartPolicy: Always` and a startup probe on `/ready`), the SPIFFE Workload API
//! socket (CSI driver or hostPath), a config generated from the pod's ports and
//! `svidcar.io/*` annotations ([`sidecar_config`]), and its `httpGet` probes pointed at
//! svidcar's admin port ([`probes`]).

pub mod options;
pub mod outcome;
pub mod pod;
pub mod probes;
pub mod sidecar_config;
pub mod workload;
pub mod yaml_stream;

pub use options::{IdentityVolume, Options};
pub use workload::{inject_object, Outcome, SkipReason};
pub use yaml_stream::{inject_yaml, Report};

/// Annotation and label keys svidcar reads or writes.
pub mod keys {
    /// `"false"` on a pod (or its workload) leaves it alone; `enabled` as a label selects
    /// pods (or namespaces) for the webhook.
    pub const INJECT: &str = "svidcar.io/inject";
    /// Written on injection; a pod that has it is not injected again.
    pub const STATUS: &str = "svidcar.io/status";
    /// The generated svidcar config, mounted into the sidecar by the downward API.
    pub const SIDECAR_CONFIG: &str = "svidcar.io/sidecar-config";
    /// The `httpGet` probes as the pod had them (JSON), read by svidcar's `/app-health`.
    pub const ORIGINAL_PROBES: &str = "svidcar.io/original-probes";
    pub const INBOUND_PORTS: &str = "svidcar.io/inbound-ports";
    pub const EXCLUDE_INBOUND_PORTS: &str = "svidcar.io/exclude-inbound-ports";
    pub const EXCLUDE_OUTBOUND_PORTS: &str = "svidcar.io/exclude-outbound-ports";
    pub const EXCLUDE_OUTBOUND_CIDRS: &str = "svidcar.io/exclude-outbound-cidrs";
    pub const MODE: &str = "svidcar.io/mode";
    pub const ALLOW: &str = "svidcar.io/allow";
    /// A ConfigMap (key `config.yaml`) with a full config, used instead of the generated one.
    pub const CONFIG: &str = "svidcar.io/config";
    pub const IMAGE: &str = "svidcar.io/image";
}

/// Container, volume and file names in an injected pod.
pub mod names {
    pub const SIDECAR: &str = "svidcar";
    pub const REDIRECT: &str = "svidcar-redirect";
    pub const POD_VOLUME: &str = "svidcar-pod";
    pub const CONFIG_VOLUME: &str = "svidcar-config";
    pub const WORKLOAD_API_VOLUME: &str = "svidcar-workload-api";
    /// Where the downward-API volume (generated config, original probes) is mounted.
    pub const POD_DIR: &str = "/etc/svidcar/pod";
    /// Where a `svidcar.io/config` ConfigMap is mounted.
    pub const CONFIG_DIR: &str = "/etc/svidcar/config";
    pub const WORKLOAD_API_DIR: &str = "/spiffe-workload-api";
}

/// Why an object could not be injected (it is then left as it was).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum InjectError {
    #[error("annotation {key}: {problem}")]
    Annotation { key: &'static str, problem: String },
    #[error("{field}: {problem}")]
    Spec { field: String, problem: String },
    #[error("not valid YAML: {0}")]
    Yaml(String),
}
