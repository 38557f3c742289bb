//! Unix socket servers (dev-agent's Workload API, SDS): bind with a given mode,
//! replacing a stale socket file left by a crashed run, refusing one still in use.

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
