//! svidcar: a per-pod sidecar that gives a workload a SPIFFE identity on the wire.
//!
//! The library holds the whole sidecar; `main.rs` only calls [`cli::main`]. Integration
//! tests drive the binary; unit tests and in-process tests use the modules directly.

pub mod admin;
pub mod app;
pub mod atomic_file;
pub mod authz;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod dev_agent;
pub mod eviction;
pub mod h2_authority;
pub mod identity;
pub mod inject;
pub mod jwt;
pub mod log_limit;
pub mod metrics;
pub mod net;
pub mod proto;
pub mod proxy;
pub mod redirect;
pub mod sds;
pub mod signals;
pub mod spiffe;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod tls;
pub mod watch;
pub mod webhook;
pub mod x509;
