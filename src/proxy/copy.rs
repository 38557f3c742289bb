//! Bidirectional byte copy with half-close, an idle timeout, a stop signal and byte
//! counts.
//!
//! Half-close: EOF read on one side shuts down the write half of the other, and the
//! other direction runs on.
//!
//! Memory: a quiet connection holds no copy buffer. Reads land first in a per-thread
//! scratch buffer and are written on from there; a direction takes a heap buffer only when
//! the writer cannot take everything at once or a read fills the scratch buffer (a bulk
//! transfer, which then doubles its buffer up to 32 KiB per read). A heap buffer is
//! given back after [`TRIM_AFTER`] without traffic. Ten thousand idle connections thus
//! cost no copy buffers, and request/response traffic of a few KiB allocates none.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// The scratch buffer every read from an idle direction lands in, and the first heap
/// buffer's size.
const MIN_BUF: usize = 4 * 1024;
thread_local! {
    /// Where reads from a quiet direction land. One per thread, zeroed once: a reader
    /// such as tokio-rustls initializes the whole buffer it is given, which would be a
    /// 4 KiB memset per read for a fresh stack buffer.
    static SCRATCH: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0; MIN_BUF].into_boxed_slice());
}

/// A direction with no traffic for this long gives its heap buffer back.
const TRIM_AFTER: Duration = Duration::from_secs(5);
/// Largest buffer per direction; one TLS record is at most 16 KiB.
const MAX_BUF: usize = 32 * 1024;

/// How the copy ended.
#[derive(Debug)]
pub enum CopyEnd {
    /// Both sides closed cleanly.
    Done,
    Idle,
    /// The stop signal came first (the drain time is over).
    Stopped,
    Error(io::Error),
}

/// One direction: read into the buffer, write it all out, repeat; at EOF flush and
/// shut down the writer.
struct Pipe {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    read_done: bool,
    need_flush: bool,
    shut_down: bool,
}

impl Pipe {
    fn new() -> Self {
        Self {
            buf: Vec::new(),
            start: 0,
            end: 0,
            read_done: false,
            need_flush: false,
            shut_down: false,
        }
    }

    /// One read through `scratch` while this direction has no heap buffer: what the
    /// writer takes goes straight on; the rest, or a read that fills `scratch` (bulk),
    /// makes this direction take a heap buffer. Ready(Ok) after a read (or EOF).
    fn copy_through<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
        scratch: &mut [u8],
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        let mut rb = ReadBuf::new(scratch);
        if reader.as_mut().poll_read(cx, &mut rb)?.is_pending() {
            return self.flush_and_wait(cx, writer);
        }
        let data = rb.filled();
        if data.is_empty() {
            self.read_done = true;
            return Poll::Ready(Ok(()));
        }
        let mut sent = 0;
        while sent < data.len() {
            match writer.as_mut().poll_write(cx, &data[sent..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    sent += n;
                    self.need_flush = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => break,
            }
        }
        if sent < data.len() {
            // The writer is full: keep the rest until it drains.
            let rest = &data[sent..];
            self.buf = vec![0; MIN_BUF];
            self.buf[..rest.len()].copy_from_slice(rest);
            self.start = 0;
            self.end = rest.len();
        } else if data.len() == MIN_BUF {
            // A full read: a transfer is under way; take bigger bites.
            self.buf = vec![0; 2 * MIN_BUF];
        }
        Poll::Ready(Ok(()))
    }

    /// Nothing more to read for now: push out what was written, then wait.
    fn flush_and_wait<W: AsyncWrite + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<()>> {
        if self.need_flush {
            ready!(writer.as_mut().poll_flush(cx))?;
            self.need_flush = false;
        }
        Poll::Pending
    }

    /// Gives the heap buffer back if it holds nothing (a quiet direction).
    fn trim(&mut self) {
        if self.start == self.end {
            self.buf = Vec::new();
        }
    }

    /// Ready(Ok) once the reader hit EOF and the writer is shut down.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            if self.buf.is_empty() && !self.read_done {
                // No heap buffer: read into this thread's scratch buffer, write on from it.
                let step = SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
                    Ok(mut scratch) => {
                        self.copy_through(cx, reader.as_mut(), writer.as_mut(), &mut scratch)
                    }
                    // Not reached (no poll here polls another copy), but never a panic.
                    Err(_) => {
                        self.copy_through(cx, reader.as_mut(), writer.as_mut(), &mut [0; MIN_BUF])
                    }
                });
                ready!(step)?;
                continue;
            }
            if self.start == self.end && !self.read_done {
                let mut rb = ReadBuf::new(&mut self.buf);
                match reader.as_mut().poll_read(cx, &mut rb) {
                    Poll::Pending => return self.flush_and_wait(cx, writer),
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        self.start = 0;
                        self.end = n;
                        self.read_done = n == 0;
                    }
                }
            }
            while self.start < self.end {
                let n = ready!(writer
                    .as_mut()
                    .poll_write(cx, &self.buf[self.start..self.end]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.start += n;
                self.need_flush = true;
            }
            // A read that filled the buffer says more is coming: take bigger bites.
            if self.end == self.buf.len() && self.buf.len() < MAX_BUF {
                self.buf.resize(self.buf.len() * 2, 0);
            }
            self.end = 0;
            self.start = 0;
            if self.read_done {
                if !self.shut_down {
                    ready!(writer.as_mut().poll_flush(cx))?;
                    ready!(writer.as_mut().poll_shutdown(cx))?;
                    self.shut_down = true;
                    // The buffer is not needed any more.
                    self.buf = Vec::new();
                }
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// Both directions between `a` and `b`, until both have seen EOF or one fails.
struct Bidirectional<'a, A: ?Sized, B: ?Sized> {
    a: &'a mut A,
    b: &'a mut B,
    a_to_b: Pipe,
    b_to_a: Pipe,
}

impl<A, B> Future for Bidirectional<'_, A, B>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    type Output = io::Result<()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let ab = this
            .a_to_b
            .poll_copy(cx, Pin::new(&mut *this.a), Pin::new(&mut *this.b))?;
        let ba = this
            .b_to_a
            .poll_copy(cx, Pin::new(&mut *this.b), Pin::new(&mut *this.a))?;
        if ab.is_ready() && ba.is_ready() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }
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
/// error occurs, nothing has been read for `idle`, or `stop` resolves.
pub async fn bidirectional<D, U>(
    downstream: D,
    upstream: U,
    idle: Duration,
    stop: impl Future<Output = ()>,
) -> (CopyEnd, Transferred)
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
        let copy = Bidirectional {
            a: &mut down,
            b: &mut up,
            a_to_b: Pipe::new(),
            b_to_a: Pipe::new(),
        };
        tokio::pin!(copy);
        tokio::pin!(stop);
        // The next wake-up: the idle deadline, or earlier the time to give quiet
        // buffers back (once per quiet spell: `trimmed` is the activity it was for).
        let mut trimmed: Option<Instant> = None;
        let wake = |last: Instant, trimmed: Option<Instant>| {
            if trimmed == Some(last) {
                last + idle
            } else {
                (last + idle).min(last + TRIM_AFTER)
            }
        };
        let mut deadline = wake(activity.last(), trimmed);
        loop {
            tokio::select! {
                res = &mut copy => break match res {
                    Ok(()) => CopyEnd::Done,
                    Err(e) => CopyEnd::Error(e),
                },
                () = &mut stop => break CopyEnd::Stopped,
                _ = tokio::time::sleep_until(deadline) => {
                    let (last, now) = (activity.last(), Instant::now());
                    if last + idle <= now {
                        break CopyEnd::Idle;
                    }
                    if last + TRIM_AFTER <= now && trimmed != Some(last) {
                        let pipes = copy.as_mut().get_mut();
                        pipes.a_to_b.trim();
                        pipes.b_to_a.trim();
                        trimmed = Some(last);
                    }
                    deadline = wake(last, trimmed);
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
        let task = tokio::spawn(bidirectional(
            proxy_down,
            proxy_up,
            Duration::from_secs(5),
            std::future::pending(),
        ));
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
        let task = tokio::spawn(bidirectional(
            proxy_down,
            proxy_up,
            idle,
            std::future::pending(),
        ));
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

    #[tokio::test]
    async fn large_transfers_arrive_whole_while_buffers_grow() {
        let (client, proxy_down) = tokio::io::duplex(100_000);
        let (proxy_up, server) = tokio::io::duplex(100_000);
        let task = tokio::spawn(bidirectional(
            proxy_down,
            proxy_up,
            Duration::from_secs(5),
            std::future::pending(),
        ));
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let (mut cr, mut cw) = tokio::io::split(client);
        let (mut sr, mut sw) = tokio::io::split(server);
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            cw.write_all(&sent).await.unwrap();
            cw.shutdown().await.unwrap();
        });
        // The server echoes everything back, then closes.
        let echo = tokio::spawn(async move {
            let mut got = Vec::new();
            sr.read_to_end(&mut got).await.unwrap();
            sw.write_all(&got).await.unwrap();
            sw.shutdown().await.unwrap();
            got
        });
        let mut back = Vec::new();
        cr.read_to_end(&mut back).await.unwrap();
        writer.await.unwrap();
        assert!(echo.await.unwrap() == data);
        assert!(back == data);
        let (end, t) = task.await.unwrap();
        assert!(matches!(end, CopyEnd::Done), "{end:?}");
        assert_eq!((t.rx, t.tx), (1_000_000, 1_000_000));
    }

    /// Small and large messages through narrow pipes (writes that only partly go
    /// through, so bytes wait in a heap buffer), with quiet spells long enough for the
    /// buffers to be given back between them: every byte arrives, in order.
    #[tokio::test(start_paused = true)]
    async fn bytes_survive_narrow_writers_and_buffer_trims() {
        let (client, proxy_down) = tokio::io::duplex(1000);
        let (proxy_up, mut server) = tokio::io::duplex(700);
        let task = tokio::spawn(bidirectional(
            proxy_down,
            proxy_up,
            Duration::from_secs(3600),
            std::future::pending(),
        ));
        let (mut cr, mut cw) = tokio::io::split(client);
        for (round, size) in [10usize, 4096, 4095, 5000, 70_000, 1]
            .into_iter()
            .enumerate()
        {
            let msg: Vec<u8> = (0..size).map(|i| ((i + round) % 253) as u8).collect();
            let sent = msg.clone();
            let w = tokio::spawn(async move {
                cw.write_all(&sent).await.unwrap();
                cw
            });
            // The server echoes while the client reads: narrow pipes need both.
            let echo = tokio::spawn(async move {
                let mut got = vec![0; size];
                server.read_exact(&mut got).await.unwrap();
                server.write_all(&got).await.unwrap();
                (server, got)
            });
            let mut back = vec![0; size];
            cr.read_exact(&mut back).await.unwrap();
            assert!(back == msg, "round {round} back");
            let got;
            (server, got) = echo.await.unwrap();
            assert!(got == msg, "round {round}");
            cw = w.await.unwrap();
            tokio::time::sleep(TRIM_AFTER * 2).await;
        }
        cw.shutdown().await.unwrap();
        server.shutdown().await.unwrap();
        let (end, t) = task.await.unwrap();
        assert!(matches!(end, CopyEnd::Done), "{end:?}");
        let total: u64 = [10u64, 4096, 4095, 5000, 70_000, 1].iter().sum();
        assert_eq!((t.rx, t.tx), (total, total));
    }

    #[tokio::test]
    async fn the_stop_signal_ends_a_live_connection() {
        let (_client, proxy_down) = tokio::io::duplex(64);
        let (proxy_up, _server) = tokio::io::duplex(64);
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(bidirectional(
            proxy_down,
            proxy_up,
            Duration::from_secs(60),
            stop.clone().cancelled_owned(),
        ));
        stop.cancel();
        let (end, _) = task.await.unwrap();
        assert!(matches!(end, CopyEnd::Stopped), "{end:?}");
    }
}
