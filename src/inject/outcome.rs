//! What injection did to one object (its own module: the pod and workload code both use
//! it, and neither imports the other back).

/// What happened to one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Injected,
    /// Injected before (`svidcar.io/status` or a `svidcar` container): left as it is.
    AlreadyInjected,
    Skipped(SkipReason),
    /// Not a kind that runs pods (a Service, a ConfigMap...): left as it is.
    NotAWorkload,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipReason {
    /// `hostNetwork: true`: redirecting would capture the node's traffic.
    HostNetwork,
    /// `svidcar.io/inject: "false"`.
    OptedOut,
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SkipReason::HostNetwork => "hostNetwork pod: its traffic is the node's",
            SkipReason::OptedOut => "annotated svidcar.io/inject: \"false\"",
        })
    }
}
