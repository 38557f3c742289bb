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
//!
//! Wake-ups: traffic wakes the task far more often than the stop signal or the idle
//! timer, so those two get their own waker and are polled only when it fired, and
//! idleness is read off the byte counts ([`IdleCheck`]) instead of a clock read per read.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll, Wake, Waker};
use std::time::Duration;

use atomic_waker::AtomicWaker;
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
/// The longest idle timeout the config accepts (3650 days).
const LONGEST_IDLE: Duration = Duration::from_secs(3650 * 24 * 3600);
/// Largest buffer per direction; one TLS record is at most 16 KiB.
const MAX_BUF: usize = 32 * 1024;

/// How the copy ended.
#[derive(Debug)]
pub enum CopyEnd {
    /// Both sides closed cleanly.
    Done,
    /// No byte moved either way for the idle timeout.
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

impl<A, B> Bidirectional<'_, Tracked<A>, Tracked<B>> {
    /// Bytes moved so far, read or written, either way: what the idle check watches. A
    /// write counts too, so a peer that drains a full buffer slowly keeps the connection
    /// alive while it makes progress (Envoy's `idle_timeout`: no bytes sent or received).
    fn moved(&self) -> u64 {
        self.a.read + self.a.written + self.b.read + self.b.written
    }
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

/// Wraps a stream to count bytes. Activity is read off the counts by the idle check, so a
/// read costs no clock read.
struct Tracked<S> {
    inner: S,
    read: u64,
    written: u64,
}

impl<S> Tracked<S> {
    fn new(inner: S) -> Self {
        Self {
            inner,
            read: 0,
            written: 0,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.read += (buf.filled().len() - before) as u64;
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

/// The waker handed to the stop signal and the idle timer. It notes that one of them
/// fired before waking the connection's task, so the far more frequent wake-ups for
/// traffic poll only the copy: the stop signal's poll takes two locks, the timer's reads
/// its state, and neither can be ready then.
#[derive(Default)]
struct SideWake {
    fired: AtomicBool,
    task: AtomicWaker,
}

impl Wake for SideWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// When a connection counts as idle, and when its quiet buffers go back, from byte
/// counts checked by a timer rather than a clock read per read.
///
/// While traffic flows the timer checks every `period` (a quarter of the idle timeout,
/// at most [`TRIM_AFTER`]), and a check that finds new bytes takes its own time as the
/// last activity: late by at most `period`, never early, so a connection is closed
/// between `idle` and `idle + period` after the last byte moved. A check that finds none
/// marks the connection quiet and sleeps until the trim or idle deadline; the first
/// byte moved after that re-arms the timer at once ([`IdleCheck::woke_up`]).
struct IdleCheck {
    idle: Duration,
    period: Duration,
    /// Bytes moved (read or written, both ways) at the last check.
    seen: u64,
    last_active: Instant,
    quiet: bool,
    trimmed: bool,
}

/// What a timer check decided.
enum Check {
    Idle,
    /// Check again then; trim the buffers first if `trim`.
    Next {
        at: Instant,
        trim: bool,
    },
}

impl IdleCheck {
    fn new(idle: Duration, now: Instant) -> Self {
        // Deadlines are `Instant` sums, which panic on overflow: no timeout is longer
        // than the longest the config accepts.
        let idle = idle.min(LONGEST_IDLE);
        Self {
            idle,
            period: (idle / 4).clamp(Duration::from_millis(1), TRIM_AFTER),
            seen: 0,
            last_active: now,
            quiet: false,
            trimmed: false,
        }
    }

    fn first_deadline(&self) -> Instant {
        self.last_active + self.period
    }

    /// Called on every wake-up with the bytes moved so far: `Some(deadline)` when a quiet
    /// connection saw traffic again and the timer must come back sooner. The clock is
    /// read (`now`) only then.
    fn woke_up(&mut self, total: u64, now: impl FnOnce() -> Instant) -> Option<Instant> {
        if !self.quiet || total == self.seen {
            return None;
        }
        Some(self.saw_traffic(total, now()))
    }

    /// New bytes (`total` moved so far) seen at `now`: the last activity as far as the
    /// count can tell, and the next check one period on.
    fn saw_traffic(&mut self, total: u64, now: Instant) -> Instant {
        self.seen = total;
        self.last_active = now;
        self.quiet = false;
        self.trimmed = false;
        now + self.period
    }

    /// The timer fired at `now`, with `total` bytes moved so far.
    fn check(&mut self, total: u64, now: Instant) -> Check {
        if total != self.seen {
            return Check::Next {
                at: self.saw_traffic(total, now),
                trim: false,
            };
        }
        let idle_at = self.last_active + self.idle;
        if idle_at <= now {
            return Check::Idle;
        }
        self.quiet = true;
        let trim = !self.trimmed && self.last_active + TRIM_AFTER <= now;
        self.trimmed |= trim;
        let at = if self.trimmed {
            idle_at
        } else {
            idle_at.min(self.last_active + TRIM_AFTER)
        };
        Check::Next { at, trim }
    }
}

/// Copies both ways between `downstream` and `upstream` until both are closed, an
/// error occurs, no byte has moved either way for `idle`, or `stop` resolves.
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
    let mut down = Tracked::new(downstream);
    let mut up = Tracked::new(upstream);
    let mut check = IdleCheck::new(idle, Instant::now());
    let end = {
        let mut copy = Bidirectional {
            a: &mut down,
            b: &mut up,
            a_to_b: Pipe::new(),
            b_to_a: Pipe::new(),
        };
        let timer = tokio::time::sleep_until(check.first_deadline());
        tokio::pin!(stop, timer);
        let side = Arc::new(SideWake::default());
        let side_waker = Waker::from(side.clone());
        // The first poll registers the stop signal and the timer.
        side.fired.store(true, Ordering::Relaxed);
        std::future::poll_fn(|cx| {
            side.task.register(cx.waker());
            match Pin::new(&mut copy).poll(cx) {
                Poll::Ready(Ok(())) => return Poll::Ready(CopyEnd::Done),
                Poll::Ready(Err(e)) => return Poll::Ready(CopyEnd::Error(e)),
                Poll::Pending => {}
            }
            let mut fired = side.fired.swap(false, Ordering::Acquire);
            if let Some(at) = check.woke_up(copy.moved(), Instant::now) {
                timer.as_mut().reset(at);
                fired = true;
            }
            if !fired {
                return Poll::Pending;
            }
            let mut side_cx = Context::from_waker(&side_waker);
            if stop.as_mut().poll(&mut side_cx).is_ready() {
                return Poll::Ready(CopyEnd::Stopped);
            }
            while timer.as_mut().poll(&mut side_cx).is_ready() {
                match check.check(copy.moved(), Instant::now()) {
                    Check::Idle => return Poll::Ready(CopyEnd::Idle),
                    Check::Next { at, trim } => {
                        if trim {
                            copy.a_to_b.trim();
                            copy.b_to_a.trim();
                        }
                        timer.as_mut().reset(at);
                    }
                }
            }
            Poll::Pending
        })
        .await
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

    /// A copy between two in-memory pipes (`down` and `up` bytes of buffer) with no stop
    /// signal: the client's end, the server's end, and the copy's task.
    fn spawn_copy(
        down: usize,
        up: usize,
        idle: Duration,
    ) -> (
        tokio::io::DuplexStream,
        tokio::io::DuplexStream,
        tokio::task::JoinHandle<(CopyEnd, Transferred)>,
    ) {
        let (client, proxy_down) = tokio::io::duplex(down);
        let (proxy_up, server) = tokio::io::duplex(up);
        let task = tokio::spawn(bidirectional(
            proxy_down,
            proxy_up,
            idle,
            std::future::pending(),
        ));
        (client, server, task)
    }

    /// How the copy ended, failing the test if it has not within `secs` (a hang would
    /// otherwise stall the suite instead of failing it).
    async fn ended(
        task: tokio::task::JoinHandle<(CopyEnd, Transferred)>,
        secs: u64,
        why: &str,
    ) -> (CopyEnd, Transferred) {
        tokio::time::timeout(Duration::from_secs(secs), task)
            .await
            .expect(why)
            .unwrap()
    }

    /// Reads at the given offsets (ms), the timer firing at the deadlines `IdleCheck`
    /// asks for: when (ms) it trimmed and when it declared the connection idle.
    fn drive_idle_check(idle_ms: u64, reads: &[u64]) -> (Vec<u64>, Option<u64>) {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let ms = |t: Instant| (t - t0).as_millis() as u64;
        let mut check = IdleCheck::new(Duration::from_millis(idle_ms), t0);
        let mut deadline = check.first_deadline();
        let (mut total, mut trims) = (0, Vec::new());
        let mut reads = reads.iter().peekable();
        loop {
            match reads.peek() {
                Some(&&r) if at(r) < deadline => {
                    reads.next();
                    total += 1;
                    if let Some(d) = check.woke_up(total, || at(r)) {
                        deadline = d;
                    }
                }
                _ => match check.check(total, deadline) {
                    Check::Idle => return (trims, Some(ms(deadline))),
                    Check::Next { at: next, trim } => {
                        if trim {
                            trims.push(ms(deadline));
                        }
                        assert!(next > deadline, "the timer must move on");
                        deadline = next;
                    }
                },
            }
        }
    }

    #[test]
    fn idle_is_declared_after_the_timeout_and_at_most_a_quarter_later() {
        let trim = TRIM_AFTER.as_millis() as u64;
        // No traffic at all: idle at the timeout, buffers trimmed first when it is longer.
        assert_eq!(drive_idle_check(1000, &[]), (vec![], Some(1000)));
        assert_eq!(drive_idle_check(60_000, &[]), (vec![trim], Some(60_000)));
        // Busy for 3 s (a read every 10 ms), then quiet: never early, at most 250 ms late.
        let busy: Vec<u64> = (0..300).map(|i| i * 10).collect();
        let (_, idle) = drive_idle_check(1000, &busy);
        let idle = idle.unwrap();
        assert!(
            (2990 + 1000..=2990 + 1250).contains(&idle),
            "idle at {idle}"
        );
        // Quiet, then one read just after a check and one just before the deadline: each
        // restarts the count in full.
        for reads in [vec![251], vec![999], vec![240, 1230]] {
            let last = *reads.last().unwrap();
            let idle = drive_idle_check(1000, &reads).1.unwrap();
            assert!(
                (last + 1000..=last + 1250).contains(&idle),
                "reads {reads:?}: idle at {idle}"
            );
        }
        // A long timeout: quiet buffers go back 5 s after the last read (at most 5 s
        // late while traffic flowed), again after a later read, and idle comes after.
        let (trims, idle) = drive_idle_check(60_000, &[100, 200, 12_000]);
        assert_eq!(trims.len(), 2, "{trims:?}");
        assert!(
            (200 + trim..=200 + 2 * trim).contains(&trims[0]),
            "{trims:?}"
        );
        assert!(
            (12_000 + trim..=12_000 + 2 * trim).contains(&trims[1]),
            "{trims:?}"
        );
        let idle = idle.unwrap();
        assert!((72_000..=72_000 + trim).contains(&idle), "idle at {idle}");
    }

    #[tokio::test]
    async fn half_close_both_ways_and_counts() {
        let (client, server, task) = spawn_copy(1024, 1024, Duration::from_secs(5));
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
        let (end, t) = ended(task, 5, "the copy did not end after both sides closed").await;
        assert!(matches!(end, CopyEnd::Done), "{end:?}");
        assert_eq!((t.rx, t.tx), (7, 8));
    }

    /// Paused time: sleeps advance the clock at once, so the bounds are exact.
    #[tokio::test(start_paused = true)]
    async fn idle_connections_are_closed_and_activity_keeps_them() {
        let idle = Duration::from_millis(300);
        let (mut client, mut server, task) = spawn_copy(64, 64, idle);
        // Traffic every 100 ms for 600 ms: twice the idle timeout, and still open.
        let mut buf = [0u8; 1];
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            client.write_all(b"x").await.unwrap();
            server.read_exact(&mut buf).await.unwrap();
        }
        let last = tokio::time::Instant::now();
        assert!(!task.is_finished());
        let (end, t) = ended(task, 5, "an idle connection was never closed").await;
        let quiet = last.elapsed();
        assert!(matches!(end, CopyEnd::Idle), "{end:?}");
        assert!(
            (idle..=idle + idle / 4).contains(&quiet),
            "closed after {quiet:?} without traffic"
        );
        assert_eq!(t.rx, 6);
    }

    /// A peer that drains a full buffer slowly: the proxy reads nothing for several idle
    /// timeouts, but every write makes progress, so the connection stays open until the
    /// last byte is through (and is closed an idle timeout after that).
    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_making_progress_is_not_idle() {
        let idle = Duration::from_millis(300);
        let (mut client, mut server, task) = spawn_copy(64 * 1024, 64, idle);
        // 2 KiB in one go; the server takes 64 bytes every 100 ms: 3.2 s in all.
        let msg: Vec<u8> = (0..2048u32).map(|i| (i % 249) as u8).collect();
        client.write_all(&msg).await.unwrap();
        let mut got = Vec::new();
        let mut chunk = [0u8; 64];
        while got.len() < msg.len() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(!task.is_finished(), "closed after {} bytes", got.len());
            server.read_exact(&mut chunk).await.unwrap();
            got.extend_from_slice(&chunk);
        }
        assert!(got == msg);
        let (end, t) = ended(task, 5, "an idle connection was never closed").await;
        assert!(matches!(end, CopyEnd::Idle), "{end:?}");
        assert_eq!(t.rx, 2048);
    }

    /// Timeouts longer than any `Instant` sum can hold (the config stops at 3650 days,
    /// the API does not) neither panic nor close the connection.
    #[test]
    fn the_longest_idle_timeouts_do_not_overflow() {
        let t0 = Instant::now();
        let mut check = IdleCheck::new(Duration::MAX, t0);
        let later = t0 + Duration::from_secs(365 * 24 * 3600);
        assert!(matches!(check.check(0, later), Check::Next { .. }));
        assert!(matches!(check.check(5, later), Check::Next { .. }));
    }

    #[tokio::test]
    async fn large_transfers_arrive_whole_while_buffers_grow() {
        let (client, server, task) = spawn_copy(100_000, 100_000, Duration::from_secs(5));
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
        let (end, t) = ended(task, 10, "the copy did not end after both sides closed").await;
        assert!(matches!(end, CopyEnd::Done), "{end:?}");
        assert_eq!((t.rx, t.tx), (1_000_000, 1_000_000));
    }

    /// Small and large messages through narrow pipes (writes that only partly go
    /// through, so bytes wait in a heap buffer), with quiet spells long enough for the
    /// buffers to be given back between them: every byte arrives, in order.
    #[tokio::test(start_paused = true)]
    async fn bytes_survive_narrow_writers_and_buffer_trims() {
        let (client, mut server, task) = spawn_copy(1000, 700, Duration::from_secs(3600));
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
        let (end, t) = ended(task, 5, "the copy did not end after both sides closed").await;
        assert!(matches!(end, CopyEnd::Done), "{end:?}");
        let total: u64 = [10u64, 4096, 4095, 5000, 70_000, 1].iter().sum();
        assert_eq!((t.rx, t.tx), (total, total));
    }

    /// The stop signal is heard while the connection carries traffic, after the task
    /// has been woken for bytes many times (those wake-ups do not poll it). Paused time
    /// and a 1 s limit: the first timer check is 5 s away, so a stop heard only when the
    /// timer fires fails the test.
    #[tokio::test(start_paused = true)]
    async fn the_stop_signal_ends_a_live_connection() {
        let (mut client, proxy_down) = tokio::io::duplex(64);
        let (proxy_up, mut server) = tokio::io::duplex(64);
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(bidirectional(
            proxy_down,
            proxy_up,
            Duration::from_secs(60),
            stop.clone().cancelled_owned(),
        ));
        let mut buf = [0u8; 5];
        for _ in 0..20 {
            client.write_all(b"hello").await.unwrap();
            server.read_exact(&mut buf).await.unwrap();
        }
        assert!(!task.is_finished());
        stop.cancel();
        let (end, _) = ended(task, 1, "the stop signal was not heard").await;
        assert!(matches!(end, CopyEnd::Stopped), "{end:?}");
    }
}
