//! Accept errors, told apart. Most are passing (out of file descriptors, a connection
//! reset before it was accepted): wait a little and go on. A few mean the listening
//! socket itself is gone (closed, shut down, destroyed with `ss -K`): then accepting
//! again would spin for ever on the same error, and the sidecar would look alive while
//! refusing every connection. Those end the listener, and the process stops with the
//! reason so the orchestrator restarts it.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Sleep;
use tokio_stream::Stream;

use crate::log_limit::LogLimiter;

/// Pause after a passing accept error, so that running out of descriptors does not spin.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

static ACCEPT_LOG: LogLimiter = LogLimiter::new("accept failed", 5, Duration::from_secs(10));

/// Whether an accept error means the listening socket can accept nothing any more.
pub fn is_fatal(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBADF | libc::EINVAL | libc::ENOTSOCK | libc::EOPNOTSUPP | libc::EFAULT)
    )
}

/// Handles an accept error: `Err` when it is fatal; otherwise logs it (rate-limited),
/// waits [`ACCEPT_BACKOFF`] and returns `Ok` to accept again.
pub async fn recover(listener: &str, e: io::Error) -> io::Result<()> {
    if is_fatal(&e) {
        return Err(e);
    }
    if ACCEPT_LOG.allow("accept") {
        tracing::warn!(listener, error = %e, "accept failed; retrying");
    }
    tokio::time::sleep(ACCEPT_BACKOFF).await;
    Ok(())
}

/// Wraps a server's stream of accepted connections (tonic's `serve_with_incoming`
/// skips errors and polls again at once): passing errors are logged and paced, and a
/// fatal one is sent to the [`Fatal`] receiver while the stream stays pending, so the
/// task that runs the server can stop with the reason.
pub struct Guarded<St> {
    inner: St,
    name: &'static str,
    backoff: Option<Pin<Box<Sleep>>>,
    fatal: Option<oneshot::Sender<io::Error>>,
}

/// Resolves with the error that ended a [`Guarded`] stream.
pub type Fatal = oneshot::Receiver<io::Error>;

/// Guards `inner`; `name` says whose connections they are, in logs.
pub fn guard<St>(name: &'static str, inner: St) -> (Guarded<St>, Fatal) {
    let (tx, rx) = oneshot::channel();
    let g = Guarded {
        inner,
        name,
        backoff: None,
        fatal: Some(tx),
    };
    (g, rx)
}

impl<St, IO> Stream for Guarded<St>
where
    St: Stream<Item = io::Result<IO>> + Unpin,
{
    type Item = io::Result<IO>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(sleep) = &mut self.backoff {
                std::task::ready!(sleep.as_mut().poll(cx));
                self.backoff = None;
            }
            if self.fatal.is_none() {
                // The listening socket is gone: nothing will come any more.
                return Poll::Pending;
            }
            match std::task::ready!(Pin::new(&mut self.inner).poll_next(cx)) {
                Some(Err(e)) if is_fatal(&e) => {
                    if let Some(tx) = self.fatal.take() {
                        let _ = tx.send(e);
                    }
                }
                Some(Err(e)) => {
                    if ACCEPT_LOG.allow(self.name) {
                        tracing::warn!(listener = self.name, error = %e, "accept failed; retrying");
                    }
                    self.backoff = Some(Box::pin(tokio::time::sleep(ACCEPT_BACKOFF)));
                }
                other => return Poll::Ready(other),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt;

    #[tokio::test]
    async fn passing_errors_are_skipped_and_fatal_ones_reported() {
        let items = vec![
            Err(io::Error::from_raw_os_error(libc::EMFILE)),
            Ok(1),
            Err(io::Error::from_raw_os_error(libc::EINVAL)),
            Ok(2),
        ];
        let (mut g, fatal) = guard("test", tokio_stream::iter(items));
        assert_eq!(g.next().await.unwrap().unwrap(), 1);
        let pending = tokio::time::timeout(Duration::from_millis(100), g.next()).await;
        assert!(pending.is_err(), "a dead listener yields nothing more");
        let e = fatal.await.unwrap();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
    }

    #[test]
    fn which_errors_are_fatal() {
        for code in [libc::EBADF, libc::EINVAL, libc::ENOTSOCK] {
            assert!(is_fatal(&io::Error::from_raw_os_error(code)));
        }
        for code in [
            libc::EMFILE,
            libc::ENFILE,
            libc::ECONNABORTED,
            libc::ENOBUFS,
        ] {
            assert!(!is_fatal(&io::Error::from_raw_os_error(code)));
        }
    }
}
