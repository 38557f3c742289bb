//! Unix sockets for gRPC: servers (dev-agent's Workload API, SDS) bind with a given
//! mode, replacing a stale socket file left by a crashed run and refusing one still in
//! use; clients get a lazily connecting tonic channel.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{anyhow, Context};

pub fn bind(path: &Path, mode: u32) -> anyhow::Result<tokio::net::UnixListener> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(anyhow!("{} is in use by another process", path.display()));
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let l = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("cannot bind {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set mode {mode:o} on {}", path.display()))?;
    Ok(l)
}

/// A gRPC channel to a unix socket; connects lazily and reconnects by itself.
pub fn channel(path: &Path) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let path = path.to_path_buf();
    // The URI is required by tonic but unused: the connector dials the socket.
    Ok(
        tonic::transport::Endpoint::try_from("http://localhost")?.connect_with_connector_lazy(
            tower::service_fn(move |_: tonic::transport::Uri| {
                let path = path.clone();
                async move {
                    tokio::net::UnixStream::connect(path)
                        .await
                        .map(hyper_util::rt::TokioIo::new)
                }
            }),
        ),
    )
}
