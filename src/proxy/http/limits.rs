//! What an HTTP client may send and how long it may take: hyper's server settings (set
//! explicitly, not left at hyper's defaults), the deadlines hyper has no setting for
//! (a connection's first byte, which the h1/h2 detection waits for; a request head that
//! trickles in; `idle_timeout` between requests), and the HTTP status hyper's own
//! answers to bad requests had, so they are counted like svidcar's.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use crate::config::HttpLimits;

/// Streams one h2 connection may have open at once (hyper's default is 200; Envoy
/// leaves it unlimited). Enough for a busy gRPC client, small enough to bound memory.
pub const H2_MAX_CONCURRENT_STREAMS: u32 = 256;
/// Streams a client may reset before svidcar has accepted them: the "rapid reset"
/// attack (CVE-2023-44487) opens and cancels streams; past this the connection gets
/// GOAWAY.
pub const H2_MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
/// Streams svidcar may reset because the client broke the protocol, before the
/// connection gets GOAWAY (CVE-2024-27316 class floods).
pub const H2_MAX_LOCAL_ERROR_RESET_STREAMS: usize = 256;
/// Bytes buffered per stream for a client that does not read (slow reader).
pub const H2_MAX_SEND_BUF_SIZE: usize = 1024 * 1024;
/// Header lines in one HTTP/1.1 request (hyper's default, set so it is visible).
pub const H1_MAX_HEADERS: usize = 100;
/// h2 keep-alive: a ping after this much silence, and the connection closed when the
/// answer takes longer than [`H2_KEEP_ALIVE_TIMEOUT`] (a peer that vanished).
pub const H2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
pub const H2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest head [`Activity`] collects: past hyper's largest allowed head, hyper refuses
/// the request anyway.
const MAX_SCANNED_HEAD: usize = 8192 * 1024 + 4;

/// hyper's HTTP/1 read buffer: its smallest allowed size.
const H1_MIN_BUF: usize = 8192;

/// The server side of one HTTP listener, with every limit set.
///
/// hyper's own `header_read_timeout` is not used: it also runs while a kept-alive
/// connection waits for its next request, so it would close idle connections long before
/// `idle_timeout`. [`Activity`] starts the clock at a request's first byte instead.
pub fn server(limits: &HttpLimits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .max_buf_size(limits.max_request_headers.max(H1_MIN_BUF))
        .max_headers(H1_MAX_HEADERS);
    b.http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(H2_KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(H2_KEEP_ALIVE_TIMEOUT)
        .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
        .max_pending_accept_reset_streams(H2_MAX_PENDING_ACCEPT_RESET_STREAMS)
        .max_local_error_reset_streams(H2_MAX_LOCAL_ERROR_RESET_STREAMS)
        .max_send_buf_size(H2_MAX_SEND_BUF_SIZE)
        .max_header_list_size(u32::try_from(limits.max_request_headers).unwrap_or(u32::MAX));
    b
}

/// The status hyper already sent for a connection that ended with `err` (it answers
/// malformed and oversized request heads itself), if it sent one.
pub fn status_sent_by_hyper(
    err: &(dyn std::error::Error + Send + Sync + 'static),
) -> Option<http::StatusCode> {
    let e = err.downcast_ref::<hyper::Error>()?;
    if e.is_parse_too_large() {
        Some(http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
    } else if e.is_parse() && !e.is_parse_version_h2() {
        Some(http::StatusCode::BAD_REQUEST)
    } else {
        None
    }
}

/// Why a connection was closed by a deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    /// Nothing arrived on a new connection (not even enough to tell h1 from h2).
    FirstByte,
    /// A request head began to arrive and did not finish in time (slowloris).
    SlowHead,
    /// No request for `idle_timeout`.
    Idle,
}

impl Expired {
    /// The `reason` label of `svidcar_connection_errors_total`.
    pub fn label(self) -> &'static str {
        match self {
            Self::FirstByte | Self::SlowHead => "request_header_timeout",
            Self::Idle => "idle_timeout",
        }
    }
}

impl std::fmt::Display for Expired {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::FirstByte => "no request arrived within request_header_timeout",
            Self::SlowHead => "the request head did not arrive within request_header_timeout",
            Self::Idle => "no request within idle_timeout",
        })
    }
}

/// What one connection is doing, for its deadlines: whether bytes arrived, whether a
/// request is in flight, since when it is idle. Updated by [`Watched`] reads and by
/// [`Activity::request`] guards; read by [`Activity::expired`].
pub struct Activity {
    epoch: Instant,
    read_any: AtomicBool,
    /// The connection speaks h2: frames between requests (pings, settings) are no
    /// request head, and h2 bounds header blocks itself.
    h2: AtomicBool,
    /// Enough bytes arrived to tell HTTP/1.1 from h2.
    decided: AtomicBool,
    /// The first bytes, while they may still be the h2 preface.
    preface: std::sync::Mutex<Vec<u8>>,
    in_flight: AtomicUsize,
    /// Milliseconds since `epoch` + 1 when bytes arrived with no request in flight (a
    /// head began); 0: none is arriving.
    head_since: AtomicU64,
    /// Milliseconds since `epoch` when the last request ended (or the connection began).
    idle_since: AtomicU64,
    /// HTTP/1.1: the head arriving while no request is in flight, until its blank line.
    head: std::sync::Mutex<HeadScan>,
    /// That head had both `Content-Length` and `Transfer-Encoding`: hyper would take the
    /// chunked framing (RFC 9112 §6.3 allows it), but a proxy in front may have taken the
    /// other; such a request is refused, never forwarded.
    conflicting_lengths: AtomicBool,
}

/// The request head being read, kept only to check its framing headers.
#[derive(Default)]
struct HeadScan {
    buf: Vec<u8>,
    /// The blank line was seen: the rest is body (or the next head, once this request
    /// is done).
    done: bool,
}

/// Whether a complete request head names both `Content-Length` and `Transfer-Encoding`.
fn both_lengths(head: &[u8]) -> bool {
    let (mut cl, mut te) = (false, false);
    for line in head.split(|b| *b == b'\n').skip(1) {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let name = &line[..colon];
        cl |= name.eq_ignore_ascii_case(b"content-length");
        te |= name.eq_ignore_ascii_case(b"transfer-encoding");
    }
    cl && te
}

/// Where the blank line that ends a head starts in `buf`: `\n\r\n` or `\n\n`, since
/// hyper's parser (httparse) takes lines ended by a bare LF as well as CRLF.
fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(2).enumerate().find_map(|(i, w)| match w {
        [b'\n', b'\n'] => Some(i),
        [b'\n', b'\r'] if buf.get(i + 2) == Some(&b'\n') => Some(i),
        _ => None,
    })
}

/// The client preface of h2 (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            epoch: Instant::now(),
            read_any: AtomicBool::new(false),
            h2: AtomicBool::new(false),
            decided: AtomicBool::new(false),
            preface: std::sync::Mutex::new(Vec::new()),
            in_flight: AtomicUsize::new(0),
            head_since: AtomicU64::new(0),
            idle_since: AtomicU64::new(0),
            head: std::sync::Mutex::new(HeadScan::default()),
            conflicting_lengths: AtomicBool::new(false),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn on_read(&self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        self.read_any.store(true, Ordering::Relaxed);
        if !self.decided.load(Ordering::Relaxed) {
            // h2 only once the whole preface is in: a client that stops after "PRI" is
            // timed like a slow HTTP/1.1 head, not left waiting for `idle_timeout`.
            let mut seen = self.preface.lock().unwrap_or_else(|p| p.into_inner());
            let take = bytes.len().min(H2_PREFACE.len() - seen.len());
            seen.extend_from_slice(&bytes[..take]);
            if !H2_PREFACE.starts_with(&seen) {
                self.decided.store(true, Ordering::Relaxed);
            } else if seen.len() == H2_PREFACE.len() {
                self.decided.store(true, Ordering::Relaxed);
                self.h2.store(true, Ordering::Relaxed);
                self.head_since.store(0, Ordering::Relaxed);
            }
        }
        if self.h2.load(Ordering::Relaxed) || self.in_flight.load(Ordering::Relaxed) != 0 {
            return;
        }
        if self.head_since.load(Ordering::Relaxed) == 0 {
            self.head_since.store(self.now_ms() + 1, Ordering::Relaxed);
        }
        self.scan_head(bytes);
    }

    /// Collects the head of the next request (bounded: hyper refuses a longer one) and
    /// checks its framing headers once the blank line is in.
    fn scan_head(&self, bytes: &[u8]) {
        let mut scan = self.head.lock().unwrap_or_else(|p| p.into_inner());
        if scan.done {
            return;
        }
        let from = scan.buf.len().saturating_sub(2);
        scan.buf.extend_from_slice(bytes);
        if let Some(end) = head_end(&scan.buf[from..]) {
            let end = from + end;
            if both_lengths(&scan.buf[..end]) {
                self.conflicting_lengths.store(true, Ordering::Relaxed);
            }
            scan.done = true;
            scan.buf = Vec::new();
        } else if scan.buf.len() > MAX_SCANNED_HEAD {
            // hyper answers 431 for this one.
            scan.done = true;
            scan.buf = Vec::new();
        }
    }

    /// Whether the request now starting had both `Content-Length` and
    /// `Transfer-Encoding` (read once).
    pub fn take_conflicting_lengths(&self) -> bool {
        self.conflicting_lengths.swap(false, Ordering::Relaxed)
    }

    /// Marks a request in flight until the returned guard is dropped (when its response
    /// has been sent: the guard travels with the response body).
    pub fn request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.head_since.store(0, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Resolves when a deadline has passed: `header` for the first byte and for a
    /// request head, `idle` between requests.
    pub async fn expired(&self, header: Duration, idle: Duration) -> Expired {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let (header, idle) = (ms(header), ms(idle));
        loop {
            let now = self.now_ms();
            let deadline = if !self.read_any.load(Ordering::Relaxed) {
                if now >= header {
                    return Expired::FirstByte;
                }
                header
            } else if self.in_flight.load(Ordering::Relaxed) == 0 {
                let head = self.head_since.load(Ordering::Relaxed);
                if head != 0 && now >= (head - 1).saturating_add(header) {
                    return Expired::SlowHead;
                }
                let idle_at = self.idle_since.load(Ordering::Relaxed).saturating_add(idle);
                if now >= idle_at {
                    return Expired::Idle;
                }
                if head != 0 {
                    idle_at.min((head - 1).saturating_add(header))
                } else {
                    // A head may begin at any moment: look again within `header`.
                    idle_at.min(now.saturating_add(header))
                }
            } else {
                // Busy: look again later.
                now.saturating_add(header.min(idle))
            };
            let wait = Duration::from_millis(deadline.saturating_sub(now).max(1));
            tokio::time::sleep(wait).await;
        }
    }
}

/// A request in flight on its connection (see [`Activity::request`]).
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        if a.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            a.idle_since.store(a.now_ms(), Ordering::Relaxed);
            a.head_since.store(0, Ordering::Relaxed);
            *a.head.lock().unwrap_or_else(|p| p.into_inner()) = HeadScan::default();
        }
    }
}

/// A connection whose reads are seen by its [`Activity`].
pub struct Watched<I> {
    io: I,
    activity: Arc<Activity>,
}

impl<I> Watched<I> {
    pub fn new(io: I, activity: Arc<Activity>) -> Self {
        Self { io, activity }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let res = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = res {
            this.activity.on_read(&buf.filled()[before..]);
        }
        res
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A head ends at its blank line, however its lines end (CRLF or a bare LF).
    #[test]
    fn heads_end_at_the_blank_line_with_crlf_or_lf() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody"), Some(24));
        assert_eq!(head_end(b"GET / HTTP/1.1\nHost: a\n\nbody"), Some(22));
        assert_eq!(head_end(b"GET / HTTP/1.1\nHost: a\n\r\n"), Some(22));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n"), None);
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n\r"), None);
    }

    /// Which deadline closes a connection, by what arrived.
    #[tokio::test]
    async fn each_deadline_for_its_case() {
        let (h, idle) = (Duration::from_millis(20), Duration::from_millis(60));
        let a = Activity::new();
        assert_eq!(a.expired(h, idle).await, Expired::FirstByte);
        let a = Activity::new();
        a.on_read(b"GE");
        assert_eq!(a.expired(h, idle).await, Expired::SlowHead);
        let a = Activity::new();
        a.on_read(b"GET / HTTP/1.1\r\n\r\n");
        drop(a.request());
        assert_eq!(a.expired(h, idle).await, Expired::Idle);
        let a = Activity::new();
        a.on_read(b"POST / HTTP/1.1\r\nContent-Length: 4\r\n");
        a.on_read(b"transfer-encoding: chunked\r\n\r\n0\r\n\r\n");
        assert!(a.take_conflicting_lengths());
        assert!(!a.take_conflicting_lengths());
        let a = Activity::new();
        a.on_read(b"POST / HTTP/1.1\r\nContent-Length: 4\r\n\r\nTransfer-Encoding: x\r\n\r\n");
        assert!(!a.take_conflicting_lengths(), "a body is no head");
        // h2: frames between requests are no request head.
        let a = Activity::new();
        a.on_read(&H2_PREFACE[..10]);
        a.on_read(&H2_PREFACE[10..]);
        assert_eq!(a.expired(h, idle).await, Expired::Idle);
        // A preface that stops half-way is a slow head.
        let a = Activity::new();
        a.on_read(b"PRI * HT");
        assert_eq!(a.expired(h, idle).await, Expired::SlowHead);
    }
}
