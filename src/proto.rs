//! Code generated at build time from proto/ (see build.rs).

/// The SPIFFE Workload API (no protobuf package: its gRPC paths are `/SpiffeWorkloadAPI/…`).
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod workload {
    tonic::include_proto!("_");
}
