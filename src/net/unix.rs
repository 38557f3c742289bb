//! Unix sockets for gRPC: servers (dev-agent's Workload API, SDS) bind with a given
//! mode, replacing a stale socket left by a crashed run and refusing one still in use;
//! clients get a lazily connecting tonic channel. [`SocketGuard`] removes a server's
//! socket again when the server goes away, on every exit path.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context};

/// Backlog of pending connections, as std's `UnixListener::bind` uses.
const BACKLOG: u32 = 128;

/// Binds a listening unix socket at `path` with permission bits `mode`.
///
/// The socket is made in a fresh private directory (0700) beside `path`, given `mode`
/// there, put into listening, and only then renamed to `path`: nobody can connect under
/// the umask's mode, and nobody can swap a symlink in for the chmod to follow, since no
/// one else can write that directory. A socket file already at `path` is replaced when
/// nothing answers on it; anything else there (a regular file, a directory, a live
/// socket) is an error naming the path, and is left alone.
pub fn bind(path: &Path, mode: u32) -> anyhow::Result<tokio::net::UnixListener> {
    remove_stale(path)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let private = tempfile::Builder::new()
        .prefix(".svidcar-sock-")
        .tempdir_in(dir)
        .with_context(|| format!("cannot create a private directory in {}", dir.display()))?;
    let staged = private.path().join("s");
    let socket = tokio::net::UnixSocket::new_stream().context("cannot create a unix socket")?;
    socket
        .bind(&staged)
        .with_context(|| format!("cannot bind {}", path.display()))?;
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set mode {mode:o} on {}", path.display()))?;
    let listener = socket
        .listen(BACKLOG)
        .with_context(|| format!("cannot listen on {}", path.display()))?;
    // Something may have appeared at `path` since remove_stale looked: never replace it.
    if std::fs::symlink_metadata(path).is_ok() {
        return Err(anyhow!(
            "{} appeared while the socket was being made; not replacing it",
            path.display()
        ));
    }
    std::fs::rename(&staged, path)
        .with_context(|| format!("cannot move the socket into place at {}", path.display()))?;
    Ok(listener)
}

/// Removes a stale socket at `path`; refuses a live one and anything that is not a socket.
fn remove_stale(path: &Path) -> anyhow::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(anyhow!("cannot inspect {}: {e}", path.display())),
    };
    let ft = meta.file_type();
    if !ft.is_socket() {
        let what = if ft.is_dir() {
            "a directory"
        } else if ft.is_symlink() {
            "a symbolic link"
        } else if ft.is_file() {
            "a regular file"
        } else {
            "not a socket"
        };
        return Err(anyhow!(
            "{} is {what}, not a socket; remove it or choose another socket path (svidcar deletes only stale sockets)",
            path.display()
        ));
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(anyhow!("{} is in use by another process", path.display()));
    }
    std::fs::remove_file(path)
        .with_context(|| format!("cannot remove stale socket {}", path.display()))
}

/// Removes a server's socket file when dropped, so a stopped server leaves nothing
/// behind however it stops (normal return, task abort at shutdown, runtime teardown).
/// Only the socket this server bound is removed: if another process has since put its
/// own socket at the path (same path, other inode), that one stays.
#[derive(Debug)]
pub struct SocketGuard {
    path: PathBuf,
    id: Option<(u64, u64, i64, i64)>,
}

impl SocketGuard {
    /// Remembers the socket now at `path` (call right after [`bind`]).
    pub fn new(path: &Path) -> Self {
        let id = std::fs::symlink_metadata(path).ok().map(|m| file_id(&m));
        Self {
            path: path.to_path_buf(),
            id,
        }
    }
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let now = std::fs::symlink_metadata(&self.path)
            .ok()
            .filter(|m| m.file_type().is_socket())
            .map(|m| file_id(&m));
        if now.is_some() && now == self.id {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Which file this is: device and inode, plus the change time, since a removed
/// socket's inode number is soon reused by the next one.
fn file_id(m: &std::fs::Metadata) -> (u64, u64, i64, i64) {
    (m.dev(), m.ino(), m.ctime(), m.ctime_nsec())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The socket has its mode from the start, a stale socket is replaced, and a
    /// regular file or directory at the path is an error and stays.
    #[tokio::test]
    async fn mode_stale_sockets_and_non_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s.sock");
        let l = bind(&sock, 0o600).unwrap();
        let m = std::fs::metadata(&sock).unwrap();
        assert!(m.file_type().is_socket());
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        // Live: refused.
        let e = bind(&sock, 0o600).unwrap_err().to_string();
        assert!(e.contains("in use by another process"), "{e}");
        // Stale (listener gone, file left): replaced.
        drop(l);
        assert!(sock.exists());
        let l = bind(&sock, 0o660).unwrap();
        assert_eq!(
            std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
            0o660
        );
        // The guard removes our socket on drop.
        let g = SocketGuard::new(&sock);
        drop(g);
        assert!(!sock.exists());
        drop(l);

        let file = dir.path().join("file.sock");
        std::fs::write(&file, b"not a socket").unwrap();
        let e = bind(&file, 0o600).unwrap_err().to_string();
        assert!(
            e.contains("file.sock is a regular file, not a socket"),
            "{e}"
        );
        assert_eq!(std::fs::read(&file).unwrap(), b"not a socket");
        let d = dir.path().join("dir.sock");
        std::fs::create_dir(&d).unwrap();
        let e = bind(&d, 0o600).unwrap_err().to_string();
        assert!(e.contains("dir.sock is a directory, not a socket"), "{e}");
        assert!(d.is_dir());
    }

    /// A guard leaves alone a socket another server has since put at the same path.
    #[tokio::test]
    async fn guard_leaves_a_newer_socket() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s.sock");
        let first = bind(&sock, 0o600).unwrap();
        let g = SocketGuard::new(&sock);
        drop(first);
        let _second = bind(&sock, 0o600).unwrap();
        drop(g);
        assert!(sock.exists());
    }
}
