//! `svidcar webhook`: a mutating admission webhook that injects pods as `svidcar inject`
//! does (the same function, [`crate::inject::inject_object`]), answering AdmissionReview
//! v1 with a JSONPatch. HTTPS with a certificate from files, reloaded when they change.
//!
//! Which pods reach it is the MutatingWebhookConfiguration's business (its namespace and
//! object selectors on `svidcar.io/inject: enabled`); the webhook injects what it is sent,
//! except pods that opt out or are already injected.

pub mod config;
pub mod review;
mod server;
mod tls_files;

pub use config::WebhookConfig;
pub use server::run;
