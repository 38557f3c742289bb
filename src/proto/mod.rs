//! Code generated from proto/ by tonic-prost-build, checked in under `generated/`.
//!
//! Checked in rather than generated into `OUT_DIR` at build time: code included from
//! `OUT_DIR` carries the checkout's absolute path in its panic locations, which changes
//! the compiler's hash of every module that code lands in and so the names of the
//! functions ThinLTO makes global there. The recorded code layout
//! (`build/symbol-order.txt`) names functions, so those names must not depend on where
//! the checkout is. `tests/proto_generated.rs` regenerates the code and fails when it
//! differs from what is checked in (and rewrites it with `SVIDCAR_PROTO_WRITE=1`).

/// The SPIFFE Workload API (no protobuf package: its gRPC paths are `/SpiffeWorkloadAPI/…`).
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod workload {
    include!("generated/_.rs");
}

/// The subset of Envoy's v3 API that SDS needs (packages mirror Envoy's, so generated
/// cross-references resolve).
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod envoy {
    pub mod config {
        pub mod core {
            pub mod v3 {
                include!("generated/envoy.config.core.v3.rs");
            }
        }
    }
    pub mod service {
        pub mod discovery {
            pub mod v3 {
                include!("generated/envoy.service.discovery.v3.rs");
            }
        }
        pub mod secret {
            pub mod v3 {
                include!("generated/envoy.service.secret.v3.rs");
            }
        }
    }
    pub mod extensions {
        pub mod transport_sockets {
            pub mod tls {
                pub mod v3 {
                    include!("generated/envoy.extensions.transport_sockets.tls.v3.rs");
                }
            }
        }
    }
}

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod google {
    pub mod rpc {
        include!("generated/google.rpc.rs");
    }
}
