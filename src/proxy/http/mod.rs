//! HTTP mode (`protocol: http`): requests instead of byte streams, so svidcar can hand
//! the caller's identity to the app (XFCC, an identity header) and authorize each
//! request. `path` normalizes request paths once, before matching and forwarding;
//! `xfcc` writes Envoy's `x-forwarded-client-cert`; `limits` bounds what clients send
//! and how long they take; `upgrade` carries websockets and `CONNECT` tunnels.

pub mod body;
pub mod client;
pub mod limits;
pub mod path;
pub mod server;
pub mod upgrade;
pub mod xfcc;

pub use client::{Pool, UpstreamConnector};
pub use server::{Caller, HttpForwarder};
