//! Bidirectional byte copy with half-close, an idle timeout and byte counts.
//!
//! tokio's `copy_bidirectional` already does half-close right (EOF on one side shuts
//! down the write half of the other, then the other direction runs on); we add the
//! idle timer it lacks and counts that survive an error.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// Bytes per direction buffered in flight; one TLS record is at most 16 KiB.
const BUF: usize = 32 * 1024;

/// How the copy ended.
#[derive(Debug)]
pub enum CopyEnd {
    /// Both sides closed cleanly.
    Done,
    Idle,
    Error(io::Error),
}

/// Bytes received from and sent to the downstream.
#[derive(Debug, Default, Clone, Copy)]
pub struct Transferred {
    pub rx: u64,
    pub tx: u64,
}

/// Last activity, in milliseconds since `start`, shared by both sides of one connection.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }
    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// Wraps a stream to note activity and count bytes.
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
    read: u64,
    written: u64,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            self.read += n;
            self.activity.touch();
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = res {
            self.written += n as u64;
        }
        res
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Copies both ways between `downstream` and `upstream` until both are closed, an
/// error occurs, or nothing has been read for `idle`.
pub async fn proxy<D, U>(downstream: D, upstream: U, idle: Duration) -> (CopyEnd, Transferred)
where
    D: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Arc::new(Activity {
        start: Instant::now(),
        last_ms: AtomicU64::new(0),
    });
    let mut down = Tracked {
        inner: downstream,
        activity: activity.clone(),
        read: 0,
        written: 0,
    };
    let mut up = Tracked {
        inner: upstream,
        activity: activity.clone(),
        read: 0,
        written: 0,
    };
    let end = {
        let copy = tokio::io::copy_bidirectional_with_sizes(&mut down, &mut up, BUF, BUF);
        tokio::pin!(copy);
        let mut deadline = activity.last() + idle;
        loop {
            tokio::select! {
                res = &mut copy => break match res {
                    Ok(_) => CopyEnd::Done,
                    Err(e) => CopyEnd::Error(e),
                },
                _ = tokio::time::sleep_until(deadline) => {
                    let next = activity.last() + idle;
                    if next <= Instant::now() {
                        break CopyEnd::Idle;
                    }
                    deadline = next;
                }
            }
        }
    };
    (
        end,
        Transferred {
            rx: down.read,
            tx: down.written,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn half_close_both_ways_and_counts() {
        let (client, proxy_down) = tokio::io::duplex(1024);
        let (proxy_up, server) = tokio::io::duplex(1024);
        let task = tokio::spawn(proxy(proxy_down, proxy_up, Duration::from_secs(5)));
        let (mut cr, mut cw) = tokio::io::split(client);
        let (mut sr, mut sw) = tokio::io::split(server);
        cw.write_all(b"request").await.unwrap();
        cw.shutdown().await.unwrap();
        let mut got = Vec::new();
        sr.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"request");
        // The server answers after it saw EOF: the other direction is still open.
        sw.write_all(b"response").await.unwrap();
        sw.shutdown().await.unwrap();
        let mut back = Vec::new();
        cr.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"response");
        let (end, t) = task.await.unwrap();
        assert!(matches!(end, CopyEnd::Done), "{end:?}");
        assert_eq!((t.rx, t.tx), (7, 8));
    }

    #[tokio::test]
    async fn idle_connections_are_closed_and_activity_keeps_them() {
        let (mut client, proxy_down) = tokio::io::duplex(64);
        let (proxy_up, mut server) = tokio::io::duplex(64);
        let idle = Duration::from_millis(300);
        let task = tokio::spawn(proxy(proxy_down, proxy_up, idle));
        // Traffic every 100 ms for 600 ms: twice the idle timeout, and still open.
        let mut buf = [0u8; 1];
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            client.write_all(b"x").await.unwrap();
            server.read_exact(&mut buf).await.unwrap();
        }
        assert!(!task.is_finished());
        let (end, t) = task.await.unwrap();
        assert!(matches!(end, CopyEnd::Idle), "{end:?}");
        assert_eq!(t.rx, 6);
    }
}
