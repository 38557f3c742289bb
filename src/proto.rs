//! Code generated at build time from proto/ (see build.rs).

/// The SPIFFE Workload API (no protobuf package: its gRPC paths are `/SpiffeWorkloadAPI/…`).
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod workload {
    tonic::include_proto!("_");
}

/// The subset of Envoy's v3 API that SDS needs (packages mirror Envoy's, so generated
/// cross-references resolve).
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod envoy {
    pub mod config {
        pub mod core {
            pub mod v3 {
                tonic::include_proto!("envoy.config.core.v3");
            }
        }
    }
    pub mod service {
        pub mod discovery {
            pub mod v3 {
                tonic::include_proto!("envoy.service.discovery.v3");
            }
        }
        pub mod secret {
            pub mod v3 {
                tonic::include_proto!("envoy.service.secret.v3");
            }
        }
    }
    pub mod extensions {
        pub mod transport_sockets {
            pub mod tls {
                pub mod v3 {
                    tonic::include_proto!("envoy.extensions.transport_sockets.tls.v3");
                }
            }
        }
    }
}

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod google {
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}
