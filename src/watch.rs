//! Watching files that their writers replace: by atomic rename (editors, `mv`) or by
//! swapping a symlinked directory (Kubernetes ConfigMap and Secret volumes). The parent
//! directories are watched, not the files: a watch on a file dies with the inode that a
//! rename replaced. A burst of events (a writer's several steps) settles into one.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// Writers often put related files down in several steps; wait this long after the
/// last event before reading, so a reader sees the whole change, not half of it.
pub const SETTLE: Duration = Duration::from_millis(150);

/// Changes to a set of files.
pub struct FileWatch {
    _watcher: notify::RecommendedWatcher,
    rx: mpsc::UnboundedReceiver<()>,
}

/// Why files cannot be watched.
#[derive(Debug, thiserror::Error)]
#[error("cannot watch {dir}: {error}")]
pub struct WatchError {
    pub dir: String,
    pub error: notify::Error,
}

impl FileWatch {
    /// Watches `files` (their directories; other files there do not count).
    pub fn new(files: &[PathBuf]) -> Result<Self, WatchError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let names: Vec<OsString> = files
            .iter()
            .filter_map(|f| f.file_name().map(|n| n.to_os_string()))
            .collect();
        let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            if ev.is_ok_and(|e| is_change_to(&e, &names)) {
                let _ = tx.send(());
            }
        })
        .map_err(|error| WatchError {
            dir: "files".into(),
            error,
        })?;
        for dir in parent_dirs(files) {
            watcher
                .watch(&dir, RecursiveMode::NonRecursive)
                .map_err(|error| WatchError {
                    dir: dir.display().to_string(),
                    error,
                })?;
        }
        Ok(Self {
            _watcher: watcher,
            rx,
        })
    }

    /// Resolves [`SETTLE`] after the last event of the next burst; `None`: the watcher
    /// is gone.
    pub async fn changed(&mut self) -> Option<()> {
        self.rx.recv().await?;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(SETTLE) => return Some(()),
                got = self.rx.recv() => got?,
            }
        }
    }
}

/// A change of content or name to one of `names`, or a Kubernetes `..data` swap. Our
/// own reads (access, atime) and other files in the same directory do not count.
fn is_change_to(e: &notify::Event, names: &[OsString]) -> bool {
    use notify::event::{EventKind as K, ModifyKind as M};
    let kind = matches!(
        e.kind,
        K::Create(_) | K::Remove(_) | K::Modify(M::Data(_) | M::Name(_) | M::Any)
    );
    kind && e.paths.iter().any(|p| {
        p.file_name()
            .is_some_and(|n| names.iter().any(|w| w == n) || n.to_string_lossy().starts_with(".."))
    })
}

fn parent_dirs(files: &[PathBuf]) -> BTreeSet<PathBuf> {
    files
        .iter()
        .map(|f| match f.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => Path::new(".").to_path_buf(),
        })
        .collect()
}
