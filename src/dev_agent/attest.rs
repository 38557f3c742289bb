//! Workload attestation from a unix socket's peer credentials, like SPIRE's `unix`
//! attestor: the caller's uid, gid and executable path become selectors, and an entry
//! matches when all of its selectors are among them.
//!
//! A connection is attested once, when it is accepted ([`Attested`]), not per call:
//! a process that connected, forked, and then exec'd a registered binary must not be
//! attested as that binary for the calls its child makes over the inherited socket.
//! Every call (and every message on a stream) then checks that the process behind the
//! connection is still the one attested: same pid, same start time (no pid reuse), same
//! executable (no exec since). `unix:path` alone stays weak: a process that execs a
//! registered binary before the agent accepts its connection is attested as that binary;
//! pair it with `unix:uid` / `unix:gid`.

use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tonic::transport::server::Connected;

/// What identifies one process for as long as it runs one program. None of it can be
/// changed by the process without exec (which changes `exe`) or exit (which ends `pid`
/// or, after reuse, changes `start_time`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct ProcessMark {
    pid: i32,
    /// Field 22 of /proc/PID/stat: clock ticks after boot when the process started.
    start_time: u64,
    exe: PathBuf,
    /// Device and inode of the executable, so a path reused by another file differs.
    exe_file: (u64, u64),
}

impl ProcessMark {
    fn read(pid: i32) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name (field 2) is in parentheses and may hold spaces or ')'.
        let after_comm = &stat[stat.rfind(')')? + 1..];
        let start_time = after_comm.split_whitespace().nth(19)?.parse().ok()?;
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
        let meta = std::fs::metadata(format!("/proc/{pid}/exe")).ok()?;
        Some(Self {
            pid,
            start_time,
            exe,
            exe_file: (meta.dev(), meta.ino()),
        })
    }
}

/// The result of attesting one accepted connection; tonic hands it to every call on it.
#[derive(Debug, Clone)]
pub struct Attestation {
    /// Selectors derived when the connection was accepted.
    pub selectors: Vec<String>,
    pub pid: Option<i32>,
    mark: Option<ProcessMark>,
}

impl Attestation {
    /// Attests the process that connected `stream` (SO_PEERCRED), now.
    pub fn of(stream: &UnixStream) -> Self {
        let Ok(cred) = stream.peer_cred() else {
            return Self {
                selectors: vec![],
                pid: None,
                mark: None,
            };
        };
        let mark = cred.pid().and_then(ProcessMark::read);
        let mut selectors = vec![
            format!("unix:uid:{}", cred.uid()),
            format!("unix:gid:{}", cred.gid()),
        ];
        if let Some(m) = &mark {
            selectors.push(format!("unix:path:{}", m.exe.display()));
        }
        Self {
            selectors,
            pid: cred.pid(),
            mark,
        }
    }

    /// Checks that the process behind the connection is still the one attested.
    /// Without a process mark (no pid, /proc unreadable) only uid/gid selectors were
    /// derived, and those cannot change under the connection.
    pub fn still_same(&self) -> Result<(), String> {
        let Some(then) = &self.mark else {
            return Ok(());
        };
        match ProcessMark::read(then.pid) {
            None => Err(format!(
                "process {} that opened the connection has exited",
                then.pid
            )),
            Some(now) if now.start_time != then.start_time => Err(format!(
                "process {} that opened the connection has exited (its pid was reused)",
                then.pid
            )),
            Some(now) if now.exe != then.exe || now.exe_file != then.exe_file => Err(format!(
                "process {} that opened the connection has exec'd {} since it was attested as {}",
                then.pid,
                now.exe.display(),
                then.exe.display()
            )),
            Some(_) => Ok(()),
        }
    }
}

/// An accepted connection with its attestation, taken at accept time. Wraps the
/// stream only to carry the attestation into tonic's request extensions; bytes pass
/// through untouched. Composes with other wrappers that delegate `Connected`.
pub struct Attested<S> {
    inner: S,
    attestation: Arc<Attestation>,
}

impl Attested<UnixStream> {
    pub fn new(inner: UnixStream) -> Self {
        let attestation = Arc::new(Attestation::of(&inner));
        tracing::debug!(pid = ?attestation.pid, selectors = ?attestation.selectors, "connection attested");
        Self { inner, attestation }
    }
}

impl<S> Connected for Attested<S>
where
    S: Send + Sync + 'static,
{
    type ConnectInfo = Arc<Attestation>;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.attestation.clone()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Attested<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Attested<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Checks that a configured selector is one this attestor can produce.
pub fn validate_selector(s: &str) -> Result<(), String> {
    let (kind, value) = s
        .strip_prefix("unix:")
        .and_then(|r| r.split_once(':'))
        .ok_or_else(|| {
            format!(
                "{s:?}: selectors look like unix:uid:1000, unix:gid:1000 or unix:path:/usr/bin/app"
            )
        })?;
    match kind {
        "uid" | "gid" => value
            .parse::<u32>()
            .map(|_| ())
            .map_err(|_| format!("{s:?}: {kind} must be a number")),
        "path" if value.starts_with('/') => Ok(()),
        "path" => Err(format!("{s:?}: path must be absolute")),
        _ => Err(format!(
            "{s:?}: unknown selector type {kind:?} (uid, gid, path)"
        )),
    }
}

/// An entry matches when every one of its selectors is among the caller's.
pub fn matches(entry: &[String], caller: &[String]) -> bool {
    !entry.is_empty() && entry.iter().all(|s| caller.contains(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subset_matching() {
        let caller = vec!["unix:uid:1000".to_string(), "unix:gid:100".to_string()];
        assert!(matches(&["unix:uid:1000".into()], &caller));
        assert!(matches(
            &["unix:uid:1000".into(), "unix:gid:100".into()],
            &caller
        ));
        assert!(!matches(
            &["unix:uid:1000".into(), "unix:gid:0".into()],
            &caller
        ));
        assert!(!matches(&[], &caller));
    }

    #[test]
    fn a_live_unchanged_process_is_still_the_same() {
        let pid = std::process::id() as i32;
        let mark = ProcessMark::read(pid).unwrap();
        let a = Attestation {
            selectors: vec![],
            pid: Some(pid),
            mark: Some(mark.clone()),
        };
        assert!(a.still_same().is_ok());
        let exec_d = Attestation {
            mark: Some(ProcessMark {
                exe: "/usr/bin/other".into(),
                ..mark.clone()
            }),
            ..a.clone()
        };
        assert!(exec_d.still_same().unwrap_err().contains("exec'd"));
        let reused = Attestation {
            mark: Some(ProcessMark {
                start_time: mark.start_time + 1,
                ..mark
            }),
            ..a
        };
        assert!(reused.still_same().unwrap_err().contains("pid was reused"));
    }

    #[test]
    fn selector_syntax() {
        assert!(validate_selector("unix:uid:1000").is_ok());
        assert!(validate_selector("unix:path:/bin/x").is_ok());
        assert!(validate_selector("unix:uid:bob").is_err());
        assert!(validate_selector("k8s:ns:default").is_err());
        assert!(validate_selector("unix:path:bin").is_err());
    }
}
