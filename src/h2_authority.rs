//! Owns the repair of the HTTP/2 `:authority` that gRPC C-core clients send over unix
//! sockets, so svidcar's unix-socket gRPC servers (dev-agent's Workload API, SDS) serve
//! them.
//!
//! Given `unix:///run/x/agent.sock`, gRPC C-core (Python `grpcio` and py-spiffe on it,
//! C++, Ruby, PHP, Envoy's `google_grpc`) sends the socket path, percent-encoded, as
//! `:authority` (`run%2Fx%2Fagent.sock`). The `h2` crate under tonic refuses such a
//! request as a malformed authority (hyperium/h2#487); SPIRE Agent (Go) serves it. The
//! authority means nothing on a unix socket, so [`FixAuthority`] sits between the
//! socket and h2 and replaces, in the client's header blocks, every `:authority` value
//! that h2 would refuse by `localhost`, before h2 parses them.
//!
//! How: client-to-server bytes are the connection preface, then frames. HEADERS and
//! CONTINUATION frames are collected into a header block (bounded), HPACK-decoded with
//! a decoder that follows the client's dynamic table, and re-encoded as literals
//! without indexing, so h2's own dynamic table stays empty and can never disagree with
//! the client's. Every other frame (DATA above all) passes through untouched, read
//! straight into h2's buffer where it can. Server-to-client bytes are not touched. A
//! client that does not send the HTTP/2 preface is passed through as it is.
//!
//! Any local process can connect to these sockets, so this is an attack surface: the
//! header block it buffers and the block it produces are bounded ([`MAX_HEADER_BLOCK`]),
//! so is the number of fields decoded per block ([`MAX_FIELDS`], which bounds the CPU
//! spent), nothing panics on malformed input, and a block that cannot be repaired
//! closes that connection with a debug log and a count in
//! `svidcar_grpc_connections_closed_total{reason}` (h2 would have closed it too).
//! The cost for well-formed clients: one HPACK decode and encode per request header
//! block (well under a millisecond; C-core sends plain strings, and a Huffman-coded
//! string costs about 25 µs): a cost per RPC, not per message, as DATA frames are not
//! parsed.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use loona_hpack::decoder::DecoderError;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_stream::Stream;

/// The client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEAD_LEN: usize = 9;
const TYPE_HEADERS: u8 = 0x1;
const TYPE_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// The largest header block read (frame headers included, so a flood of empty
/// CONTINUATION frames is bounded too) and the largest re-encoded block produced.
/// hyper's HTTP/2 server refuses header lists above 16 KiB, so no request it would
/// serve comes near this.
pub const MAX_HEADER_BLOCK: usize = 64 * 1024;
/// The most header fields in one block. Each field counts at least 32 bytes toward
/// the header list size (RFC 9113 §6.5.2) and hyper's server refuses lists above
/// 16 KiB, so no request it serves has more. The bound matters for CPU: the HPACK
/// crate sets up a Huffman table for each Huffman-coded string (about 25 µs), so a
/// block of tiny fields would otherwise cost half a second.
pub const MAX_FIELDS: usize = 16 * 1024 / 32;
/// Frames produced are at most the initial SETTINGS_MAX_FRAME_SIZE, which every
/// HTTP/2 server accepts whatever it advertises.
const OUT_FRAME_MAX: usize = 16_384;
/// The HPACK dynamic table size the client's encoder may use: the server's
/// SETTINGS_HEADER_TABLE_SIZE, left at the protocol default by tonic.
const HEADER_TABLE_SIZE: usize = 4_096;
/// The bytes read from the socket at a time when not reading straight into h2's buffer.
const INPUT_BUF: usize = 8 * 1024;
/// What a refused `:authority` becomes.
const REPLACEMENT: &[u8] = b"localhost";

/// Why a connection was closed instead of passed to h2.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AuthorityFixError {
    #[error("header block on stream {stream} exceeds {MAX_HEADER_BLOCK} bytes")]
    BlockTooLarge { stream: u32 },
    #[error("header block on stream {stream} decodes to more than {MAX_HEADER_BLOCK} bytes")]
    DecodedTooLarge { stream: u32 },
    #[error("header block on stream {stream} has more than {MAX_FIELDS} fields")]
    TooManyFields { stream: u32 },
    #[error("HEADERS frame on stream {stream}: padding longer than the payload")]
    BadPadding { stream: u32 },
    #[error("HEADERS frame on stream {stream}: PRIORITY flag on a payload shorter than 5 bytes")]
    ShortPriority { stream: u32 },
    #[error(
        "expected a CONTINUATION frame on stream {stream}, got frame type {kind:#x} on stream {got}"
    )]
    ExpectedContinuation { stream: u32, kind: u8, got: u32 },
    #[error("header block on stream {stream}: HPACK: {error}")]
    Hpack { stream: u32, error: DecoderError },
    #[error("header block on stream {stream}: over the HPACK decoding budget (too many Huffman-coded strings per second)")]
    DecodeBudget { stream: u32 },
}

impl AuthorityFixError {
    /// The metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::BlockTooLarge { .. } => "block_too_large",
            Self::DecodedTooLarge { .. } => "decoded_too_large",
            Self::TooManyFields { .. } => "too_many_fields",
            Self::BadPadding { .. } | Self::ShortPriority { .. } => "bad_headers_frame",
            Self::ExpectedContinuation { .. } => "expected_continuation",
            Self::Hpack { .. } => "hpack",
            Self::DecodeBudget { .. } => "decode_budget",
        }
    }
}

/// An IO stream whose client-to-server HTTP/2 header blocks carry only `:authority`
/// values h2 accepts; see the module doc.
pub struct FixAuthority<S> {
    inner: S,
    state: State,
    /// Bytes read from `inner` and not yet parsed: `input[start..end]`.
    input: Box<[u8]>,
    start: usize,
    end: usize,
    /// Bytes for h2 not yet handed over: `out[out_pos..]`.
    out: Vec<u8>,
    out_pos: usize,
    /// The payload of the HEADERS or CONTINUATION frame being read.
    frame: Vec<u8>,
    /// A header block waiting for its CONTINUATION frames.
    open: Option<OpenBlock>,
    /// Follows the client's HPACK encoder across the connection.
    hpack: loona_hpack::Decoder<'static>,
    /// Decoding work this connection may still do.
    budget: DecodeBudget,
    /// An authority was replaced on this connection already (logged once).
    replaced: bool,
    /// An error met after bytes were handed over in the same read: those bytes go
    /// first (a read that fails fills nothing), the error with the next read.
    deferred: Option<io::Error>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Checking the client's preface; `matched` bytes so far.
    Preface { matched: usize },
    /// At a frame boundary.
    Head,
    /// Passing `remaining` bytes of a frame's payload through.
    Forward { remaining: usize },
    /// Reading a HEADERS or CONTINUATION payload into `frame`.
    Collect(FrameHead),
    /// Not HTTP/2, or past a truncated frame at EOF: bytes pass as they are.
    Transparent,
    /// A header block could not be repaired; every read fails.
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FrameHead {
    len: usize,
    kind: u8,
    flags: u8,
    stream: u32,
}

/// A header block started by HEADERS, until END_HEADERS.
struct OpenBlock {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
    /// Bytes read for this block, frame headers included.
    read: usize,
}

/// What one step of the parser did.
enum Step {
    /// Consumed input or changed state; go on.
    Progress,
    /// Nothing more until `inner` is ready.
    Pending,
    /// The client closed its side.
    Eof,
}

impl<S> FixAuthority<S> {
    pub fn new(inner: S) -> Self {
        let mut hpack = loona_hpack::Decoder::new();
        hpack.set_max_allowed_table_size(HEADER_TABLE_SIZE);
        Self {
            inner,
            state: State::Preface { matched: 0 },
            input: vec![0; INPUT_BUF].into_boxed_slice(),
            start: 0,
            end: 0,
            out: Vec::new(),
            out_pos: 0,
            frame: Vec::new(),
            open: None,
            hpack,
            replaced: false,
            budget: DecodeBudget::new(HUFFMAN_BURST, HUFFMAN_PER_SECOND),
            deferred: None,
        }
    }

    fn buffered(&self) -> usize {
        self.end - self.start
    }
}

/// Maps a listener's accepted streams through [`FixAuthority`]; used where the unix
/// gRPC servers are started. Generic, so the items may already be wrapped in another
/// `Connected` type.
pub fn incoming<St, IO>(accepted: St) -> impl Stream<Item = io::Result<FixAuthority<IO>>>
where
    St: Stream<Item = io::Result<IO>>,
{
    tokio_stream::StreamExt::map(accepted, |r| r.map(FixAuthority::new))
}

impl<S: AsyncRead + Unpin> FixAuthority<S> {
    /// Reads more of the client's bytes into `input`, making room at its end first.
    /// Ready(Ok(0)) is EOF.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.input.len() {
            self.input.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let mut rb = ReadBuf::new(&mut self.input[self.end..]);
        match Pin::new(&mut self.inner).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                self.end += n;
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Moves the parser on by one step, writing pass-through bytes into `buf` or `out`.
    fn step(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Result<Step, io::Error> {
        match self.state {
            State::Failed => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "connection closed: malformed HTTP/2 header block",
            )),
            State::Transparent | State::Forward { .. } => {
                let limit = match self.state {
                    State::Forward { remaining: 0 } => {
                        self.state = State::Head;
                        return Ok(Step::Progress);
                    }
                    State::Forward { remaining } => remaining.min(buf.remaining()),
                    _ => buf.remaining(),
                };
                let n = if self.buffered() > 0 {
                    let n = limit.min(self.buffered());
                    buf.put_slice(&self.input[self.start..self.start + n]);
                    self.start += n;
                    n
                } else {
                    // Straight into the caller's buffer: no copy of DATA payloads.
                    let dst = buf.initialize_unfilled_to(limit);
                    let mut rb = ReadBuf::new(dst);
                    match Pin::new(&mut self.inner).poll_read(cx, &mut rb) {
                        Poll::Ready(Ok(())) => {}
                        Poll::Ready(Err(e)) => return Err(e),
                        Poll::Pending => return Ok(Step::Pending),
                    }
                    let n = rb.filled().len();
                    if n == 0 {
                        return Ok(Step::Eof);
                    }
                    buf.advance(n);
                    n
                };
                if let State::Forward { remaining } = &mut self.state {
                    *remaining -= n;
                }
                Ok(Step::Progress)
            }
            State::Preface { matched } => {
                if self.buffered() == 0 {
                    return self.fill(cx);
                }
                let n = self.buffered().min(PREFACE.len() - matched);
                let got = &self.input[self.start..self.start + n];
                if got != &PREFACE[matched..matched + n] {
                    // Not HTTP/2 with prior knowledge: h2 will say so to the client.
                    self.state = State::Transparent;
                    return Ok(Step::Progress);
                }
                self.out.extend_from_slice(got);
                self.start += n;
                self.state = if matched + n == PREFACE.len() {
                    State::Head
                } else {
                    State::Preface {
                        matched: matched + n,
                    }
                };
                Ok(Step::Progress)
            }
            State::Head => {
                if self.buffered() < FRAME_HEAD_LEN {
                    return match self.fill(cx)? {
                        // A truncated frame: let h2 see what came.
                        Step::Eof if self.buffered() > 0 => {
                            self.state = State::Transparent;
                            Ok(Step::Progress)
                        }
                        s => Ok(s),
                    };
                }
                let raw = &self.input[self.start..self.start + FRAME_HEAD_LEN];
                let head = FrameHead {
                    len: usize::from(raw[0]) << 16 | usize::from(raw[1]) << 8 | usize::from(raw[2]),
                    kind: raw[3],
                    flags: raw[4],
                    stream: u32::from_be_bytes([raw[5], raw[6], raw[7], raw[8]]) & 0x7fff_ffff,
                };
                if let Some(open) = &self.open {
                    if head.kind != TYPE_CONTINUATION || head.stream != open.stream {
                        return Err(self.fail(AuthorityFixError::ExpectedContinuation {
                            stream: open.stream,
                            kind: head.kind,
                            got: head.stream,
                        }));
                    }
                }
                if head.kind == TYPE_HEADERS
                    || (head.kind == TYPE_CONTINUATION && self.open.is_some())
                {
                    let read = self.open.as_ref().map_or(0, |o| o.read);
                    // h2 refuses frames over its SETTINGS_MAX_FRAME_SIZE (16 KiB, left at
                    // the default): never buffer more than it would accept.
                    if head.len > OUT_FRAME_MAX
                        || read + FRAME_HEAD_LEN + head.len > MAX_HEADER_BLOCK
                    {
                        return Err(self.fail(AuthorityFixError::BlockTooLarge {
                            stream: head.stream,
                        }));
                    }
                    self.frame.clear();
                    self.frame.reserve(head.len);
                    self.state = State::Collect(head);
                } else {
                    // Any other frame, and a CONTINUATION out of place (h2 refuses it).
                    self.out.extend_from_slice(raw);
                    self.state = State::Forward {
                        remaining: head.len,
                    };
                }
                self.start += FRAME_HEAD_LEN;
                Ok(Step::Progress)
            }
            State::Collect(head) => {
                let want = head.len - self.frame.len();
                if want > 0 {
                    if self.buffered() == 0 {
                        return self.fill(cx);
                    }
                    let n = want.min(self.buffered());
                    self.frame
                        .extend_from_slice(&self.input[self.start..self.start + n]);
                    self.start += n;
                    if n < want {
                        return Ok(Step::Progress);
                    }
                }
                self.state = State::Head;
                self.header_frame(head).map_err(|e| self.fail(e))?;
                Ok(Step::Progress)
            }
        }
    }

    /// poll_fill as a step.
    fn fill(&mut self, cx: &mut Context<'_>) -> Result<Step, io::Error> {
        match self.poll_fill(cx) {
            Poll::Ready(Ok(0)) => Ok(Step::Eof),
            Poll::Ready(Ok(_)) => Ok(Step::Progress),
            Poll::Ready(Err(e)) => Err(e),
            Poll::Pending => Ok(Step::Pending),
        }
    }
}

impl<S> FixAuthority<S> {
    /// Logs why the connection closes and makes every later read fail.
    fn fail(&mut self, e: AuthorityFixError) -> io::Error {
        tracing::debug!(error = %e, reason = e.reason(), "closing a gRPC connection on the unix socket");
        crate::metrics::get()
            .grpc_closed
            .with_label_values(&[e.reason()])
            .inc();
        self.state = State::Failed;
        self.open = None;
        self.frame = Vec::new();
        io::Error::new(io::ErrorKind::InvalidData, e)
    }

    /// A complete HEADERS or CONTINUATION payload is in `frame`: add it to the open
    /// block, and rewrite the block once it is complete.
    fn header_frame(&mut self, head: FrameHead) -> Result<(), AuthorityFixError> {
        let stream = head.stream;
        if head.kind == TYPE_HEADERS {
            let mut p = &self.frame[..];
            let pad = if head.flags & FLAG_PADDED != 0 {
                let (&n, rest) = p
                    .split_first()
                    .ok_or(AuthorityFixError::BadPadding { stream })?;
                p = rest;
                usize::from(n)
            } else {
                0
            };
            let priority = if head.flags & FLAG_PRIORITY != 0 {
                let (dep, rest) = p
                    .split_first_chunk::<5>()
                    .ok_or(AuthorityFixError::ShortPriority { stream })?;
                p = rest;
                Some(*dep)
            } else {
                None
            };
            let fragment = p
                .get(
                    ..p.len()
                        .checked_sub(pad)
                        .ok_or(AuthorityFixError::BadPadding { stream })?,
                )
                .ok_or(AuthorityFixError::BadPadding { stream })?;
            self.open = Some(OpenBlock {
                stream,
                end_stream: head.flags & FLAG_END_STREAM != 0,
                priority,
                fragment: fragment.to_vec(),
                read: FRAME_HEAD_LEN + head.len,
            });
        } else if let Some(open) = &mut self.open {
            open.fragment.extend_from_slice(&self.frame);
            open.read += FRAME_HEAD_LEN + head.len;
        }
        if self.frame.capacity() > INPUT_BUF {
            self.frame = Vec::new();
        }
        if head.flags & FLAG_END_HEADERS == 0 {
            return Ok(());
        }
        let Some(open) = self.open.take() else {
            return Ok(());
        };
        let block = self.rewrite(&open)?;
        put_header_frames(&mut self.out, &open, &block);
        Ok(())
    }

    /// Decodes a complete header block with the client's dynamic table and encodes it
    /// again without indexing, with refused `:authority` values replaced.
    fn rewrite(&mut self, open: &OpenBlock) -> Result<Vec<u8>, AuthorityFixError> {
        let stream = open.stream;
        let counts = count_fields(&open.fragment);
        if counts.fields > MAX_FIELDS {
            return Err(AuthorityFixError::TooManyFields { stream });
        }
        if counts.huffman > 0 {
            let mine = self.budget.take(counts.huffman);
            let all = mine
                && DECODE_BUDGET_ALL
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take(counts.huffman);
            if !all {
                return Err(AuthorityFixError::DecodeBudget { stream });
            }
        }
        let mut block = Vec::with_capacity(open.fragment.len() + 64);
        let mut too_large = false;
        let mut refused = None;
        self.hpack
            .decode_with_cb(&open.fragment, |name, value| {
                if too_large {
                    return;
                }
                let value = if &name[..] == b":authority" && !h2_accepts_authority(&value) {
                    refused.get_or_insert_with(|| String::from_utf8_lossy(&value).into_owned());
                    REPLACEMENT
                } else {
                    &value[..]
                };
                put_literal(&mut block, &name, value);
                too_large = block.len() > MAX_HEADER_BLOCK;
            })
            .map_err(|error| AuthorityFixError::Hpack { stream, error })?;
        if too_large {
            return Err(AuthorityFixError::DecodedTooLarge { stream });
        }
        if let Some(authority) = refused {
            if !self.replaced {
                self.replaced = true;
                let authority = crate::log_limit::printable(&authority, 256);
                tracing::debug!(
                    %authority,
                    replacement = "localhost",
                    "replacing an HTTP/2 :authority that h2 refuses (gRPC C-core names the socket path)"
                );
            }
        }
        Ok(block)
    }
}

/// What decoding a block will cost, counted without decoding any string.
#[derive(Debug, Default, PartialEq, Eq)]
struct BlockCounts {
    fields: usize,
    /// Huffman-coded strings: the costly part of decoding.
    huffman: usize,
}

/// The header fields and Huffman-coded strings in an HPACK block, counted without
/// decoding any string; stops early past [`MAX_FIELDS`]. A malformed block ends the
/// count where it breaks: the decoder then says what is wrong with it.
fn count_fields(mut p: &[u8]) -> BlockCounts {
    /// An HPACK integer with `prefix` bits (RFC 7541 §5.1) and the bytes it took.
    fn int(p: &[u8], prefix: u8) -> Option<(usize, usize)> {
        let max = (1usize << prefix) - 1;
        let v = usize::from(*p.first()?) & max;
        if v < max {
            return Some((v, 1));
        }
        let mut v = v;
        // Five bytes cover every length a bounded block can hold.
        for (i, &b) in p.iter().enumerate().skip(1).take(5) {
            v += usize::from(b & 0x7f) << (7 * (i - 1));
            if b & 0x80 == 0 {
                return Some((v, i + 1));
            }
        }
        None
    }
    /// The bytes a string literal takes, and whether it is Huffman-coded.
    fn string(p: &[u8]) -> Option<(usize, bool)> {
        let (len, n) = int(p, 7)?;
        let huffman = p[0] & 0x80 != 0;
        n.checked_add(len)
            .filter(|&end| end <= p.len())
            .map(|end| (end, huffman))
    }
    let mut counts = BlockCounts::default();
    while let Some(&first) = p.first() {
        if counts.fields > MAX_FIELDS {
            break;
        }
        let field = first & 0xe0 != 0x20;
        let used = if first & 0x80 != 0 {
            int(p, 7).map(|(_, n)| n)
        } else if !field {
            // A dynamic table size update.
            int(p, 5).map(|(_, n)| n)
        } else {
            let prefix = if first & 0x40 != 0 { 6 } else { 4 };
            int(p, prefix).and_then(|(index, n)| {
                let (name, name_huffman) = if index == 0 {
                    string(&p[n..])?
                } else {
                    (0, false)
                };
                let (value, value_huffman) = string(&p[n + name..])?;
                counts.huffman += usize::from(name_huffman) + usize::from(value_huffman);
                Some(n + name + value)
            })
        };
        let Some(used) = used else { break };
        counts.fields += usize::from(field);
        p = &p[used..];
    }
    counts
}

/// Huffman-coded strings a connection may have decoded at once, and per second after
/// that. Well-behaved clients send a few per request and a few requests per second;
/// the bound keeps one connection from spending much CPU on the runtime's workers
/// (about 25 µs a string: at most about 6 ms per second per connection).
const HUFFMAN_BURST: f64 = 1024.0;
const HUFFMAN_PER_SECOND: f64 = 256.0;
/// The same for all connections of the process together, so that many connections
/// cannot stall the proxy either (at most about 50 ms of CPU per second).
const HUFFMAN_BURST_ALL: f64 = 8192.0;
const HUFFMAN_PER_SECOND_ALL: f64 = 2048.0;

/// A token bucket of decoding work.
#[derive(Debug)]
struct DecodeBudget {
    tokens: f64,
    at: Option<std::time::Instant>,
    burst: f64,
    rate: f64,
}

impl DecodeBudget {
    const fn new(burst: f64, rate: f64) -> Self {
        Self {
            tokens: burst,
            at: None,
            burst,
            rate,
        }
    }

    /// Takes `n` units if the bucket holds them.
    fn take(&mut self, n: usize) -> bool {
        let now = std::time::Instant::now();
        if let Some(at) = self.at {
            let refill = now.duration_since(at).as_secs_f64() * self.rate;
            self.tokens = (self.tokens + refill).min(self.burst);
        }
        self.at = Some(now);
        let n = n as f64;
        if self.tokens < n {
            return false;
        }
        self.tokens -= n;
        true
    }
}

static DECODE_BUDGET_ALL: std::sync::Mutex<DecodeBudget> =
    std::sync::Mutex::new(DecodeBudget::new(HUFFMAN_BURST_ALL, HUFFMAN_PER_SECOND_ALL));

/// Whether h2 turns this `:authority` into a request: it must be UTF-8 and parse as
/// an `http::uri::Authority` (the check h2 makes, from the same crate).
fn h2_accepts_authority(value: &[u8]) -> bool {
    std::str::from_utf8(value).is_ok() && http::uri::Authority::try_from(value).is_ok()
}

/// An HPACK integer (RFC 7541 §5.1) with `prefix` bits in a first byte that starts
/// with `high`.
fn put_int(out: &mut Vec<u8>, high: u8, prefix: u8, mut v: usize) {
    let max = (1usize << prefix) - 1;
    if v < max {
        out.push(high | v as u8);
        return;
    }
    out.push(high | max as u8);
    v -= max;
    while v >= 0x80 {
        out.push((v & 0x7f) as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A literal header field without indexing, new name, both strings raw
/// (RFC 7541 §6.2.2). Never touching h2's dynamic table keeps it out of step with
/// nothing; "never indexed" fields stay unindexed on this hop too.
fn put_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0);
    for s in [name, value] {
        put_int(out, 0, 7, s.len());
        out.extend_from_slice(s);
    }
}

fn put_frame_head(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream: u32) {
    let len = len as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
}

/// The re-encoded block as HEADERS (keeping END_STREAM and the priority fields, no
/// padding) and CONTINUATION frames of at most [`OUT_FRAME_MAX`] bytes.
fn put_header_frames(out: &mut Vec<u8>, open: &OpenBlock, block: &[u8]) {
    let prio_len = if open.priority.is_some() { 5 } else { 0 };
    let (first, mut rest) = block.split_at(block.len().min(OUT_FRAME_MAX - prio_len));
    let mut flags = 0;
    if open.end_stream {
        flags |= FLAG_END_STREAM;
    }
    if open.priority.is_some() {
        flags |= FLAG_PRIORITY;
    }
    if rest.is_empty() {
        flags |= FLAG_END_HEADERS;
    }
    put_frame_head(
        out,
        prio_len + first.len(),
        TYPE_HEADERS,
        flags,
        open.stream,
    );
    if let Some(p) = &open.priority {
        out.extend_from_slice(p);
    }
    out.extend_from_slice(first);
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(rest.len().min(OUT_FRAME_MAX));
        rest = tail;
        let flags = if rest.is_empty() { FLAG_END_HEADERS } else { 0 };
        put_frame_head(out, chunk.len(), TYPE_CONTINUATION, flags, open.stream);
        out.extend_from_slice(chunk);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FixAuthority<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.deferred.take() {
            return Poll::Ready(Err(e));
        }
        let before = buf.filled().len();
        loop {
            if this.out_pos < this.out.len() {
                let n = buf.remaining().min(this.out.len() - this.out_pos);
                buf.put_slice(&this.out[this.out_pos..this.out_pos + n]);
                this.out_pos += n;
                if this.out_pos == this.out.len() {
                    this.out.clear();
                    this.out_pos = 0;
                    if this.out.capacity() > INPUT_BUF {
                        this.out = Vec::new();
                    }
                }
            }
            if buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            match this.step(cx, buf) {
                Ok(Step::Progress) => {}
                // Bytes already handed over are returned; `inner` has our waker.
                Ok(Step::Pending) if buf.filled().len() > before => return Poll::Ready(Ok(())),
                Ok(Step::Pending) => return Poll::Pending,
                Ok(Step::Eof) => return Poll::Ready(Ok(())),
                Err(e) if buf.filled().len() > before => {
                    this.deferred = Some(e);
                    return Poll::Ready(Ok(()));
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FixAuthority<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
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

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Peer credentials (and whatever else the inner stream knows) stay visible to the
/// services: the agent attests callers and SDS checks them by these.
impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected
    for FixAuthority<S>
{
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// The first HEADERS block grpcio 1.85 (gRPC C-core) sent for a call on
    /// `unix:///tmp/cap/s.sock`, as captured from the socket.
    const GRPCIO_BLOCK: &str = "40053a70617468062f612e422f43400a3a617574686f7269747912746d70253246636170253246732e736f636b8386400c636f6e74656e742d74797065106170706c69636174696f6e2f677270634002746508747261696c6572734014677270632d6163636570742d656e636f64696e67176964656e746974792c206465666c6174652c20677a6970400c677270632d74696d656f757405313031306d400a757365722d6167656e7430677270632d707974686f6e2f312e38352e3120677270632d632f35382e302e3020286c696e75783b2063687474703229";

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        put_frame_head(&mut v, payload.len(), kind, flags, stream);
        v.extend_from_slice(payload);
        v
    }

    fn headers(stream: u32, block: &[u8]) -> Vec<u8> {
        frame(TYPE_HEADERS, FLAG_END_HEADERS, stream, block)
    }

    fn conn(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut v = PREFACE.to_vec();
        // The client's SETTINGS, as C-core sends them.
        v.extend(frame(0x4, 0, 0, &hex("000200000000000300000000")));
        for f in frames {
            v.extend_from_slice(f);
        }
        v
    }

    /// A literal with incremental indexing, new name, raw strings.
    fn indexed_literal(name: &[u8], value: &[u8]) -> Vec<u8> {
        let mut v = vec![0x40];
        for s in [name, value] {
            put_int(&mut v, 0, 7, s.len());
            v.extend_from_slice(s);
        }
        v
    }

    /// Huffman codes (RFC 7541 Appendix B) of the few symbols the tests use; the
    /// tests check each encoding against the decoder first.
    fn huffman(s: &str) -> Vec<u8> {
        let code = |c: char| -> (u32, u32) {
            match c {
                '%' => (0b010101, 6),
                '.' => (0b010111, 6),
                '2' => (0b00010, 5),
                'c' => (0b00100, 5),
                'f' => (0b100101, 6),
                'k' => (0b1110101, 7),
                'n' => (0b101010, 6),
                'o' => (0b00111, 5),
                'r' => (0b101100, 6),
                's' => (0b01000, 5),
                'u' => (0b101101, 6),
                'x' => (0b1111001, 7),
                _ => panic!("no code for {c:?} in the test table"),
            }
        };
        let (mut acc, mut bits, mut out) = (0u64, 0u32, Vec::new());
        for c in s.chars() {
            let (v, n) = code(c);
            acc = acc << n | u64::from(v);
            bits += n;
            while bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
            }
        }
        if bits > 0 {
            // Pad with the most significant bits of EOS (all ones).
            out.push((acc << (8 - bits)) as u8 | (0xff >> bits));
        }
        out
    }

    fn huffman_string(s: &str) -> Vec<u8> {
        let h = huffman(s);
        let mut v = Vec::new();
        put_int(&mut v, 0x80, 7, h.len());
        v.extend(h);
        v
    }

    /// Feeds `input` through FixAuthority all at once and one byte per read (with a
    /// Pending between reads), checks both give the same, returns it.
    async fn run(input: &[u8]) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        let whole = FixAuthority::new(input).read_to_end(&mut out).await;
        let mut out2 = Vec::new();
        let trickled = FixAuthority::new(Trickle {
            data: input,
            pending: false,
        })
        .read_to_end(&mut out2)
        .await;
        match (&whole, &trickled) {
            (Ok(_), Ok(_)) => assert_eq!(out, out2, "byte-wise delivery differs"),
            (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
            _ => panic!("whole: {whole:?}, trickled: {trickled:?}"),
        }
        whole.map(|_| out)
    }

    /// Yields one byte per read, and Pending before each one.
    struct Trickle<'a> {
        data: &'a [u8],
        pending: bool,
    }

    impl AsyncRead for Trickle<'_> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            self.pending = !self.pending;
            if self.pending {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            if let Some((&b, rest)) = self.data.split_first() {
                buf.put_slice(&[b]);
                self.data = rest;
            }
            Poll::Ready(Ok(()))
        }
    }

    #[derive(Debug)]
    struct Frame {
        kind: u8,
        flags: u8,
        stream: u32,
        payload: Vec<u8>,
    }

    /// Splits what h2 would read into frames, after checking the preface.
    fn frames(out: &[u8]) -> Vec<Frame> {
        assert_eq!(&out[..24], PREFACE);
        let mut p = &out[24..];
        let mut v = Vec::new();
        while !p.is_empty() {
            let len = usize::from(p[0]) << 16 | usize::from(p[1]) << 8 | usize::from(p[2]);
            assert!(len <= OUT_FRAME_MAX || p[3] != TYPE_HEADERS && p[3] != TYPE_CONTINUATION);
            v.push(Frame {
                kind: p[3],
                flags: p[4],
                stream: u32::from_be_bytes([p[5], p[6], p[7], p[8]]),
                payload: p[9..9 + len].to_vec(),
            });
            p = &p[9 + len..];
        }
        v
    }

    /// The header lists h2 would decode, in order, with one decoder for the
    /// connection as h2 has.
    fn header_lists(out: &[u8]) -> Vec<Vec<(String, String)>> {
        let mut dec = loona_hpack::Decoder::new();
        let mut lists = Vec::new();
        let mut block = Vec::new();
        for f in frames(out) {
            match f.kind {
                TYPE_HEADERS => {
                    assert_eq!(f.flags & FLAG_PADDED, 0);
                    let skip = if f.flags & FLAG_PRIORITY != 0 { 5 } else { 0 };
                    block = f.payload[skip..].to_vec();
                }
                TYPE_CONTINUATION => block.extend(&f.payload),
                _ => continue,
            }
            if f.flags & FLAG_END_HEADERS != 0 {
                let list = dec.decode(&block).unwrap();
                lists.push(
                    list.into_iter()
                        .map(|(n, v)| {
                            (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap())
                        })
                        .collect(),
                );
            }
        }
        lists
    }

    fn get<'a>(list: &'a [(String, String)], name: &str) -> Option<&'a str> {
        list.iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    async fn error_of(input: &[u8]) -> String {
        run(input).await.unwrap_err().to_string()
    }

    #[test]
    fn h2_refuses_what_grpc_core_sends_and_accepts_the_replacement() {
        assert!(!h2_accepts_authority(b"tmp%2Fcap%2Fs.sock"));
        assert!(!h2_accepts_authority(b"/run/x/agent.sock"));
        assert!(!h2_accepts_authority(b""));
        assert!(!h2_accepts_authority(b"\xff"));
        assert!(h2_accepts_authority(REPLACEMENT));
        assert!(h2_accepts_authority(b"example.org:443"));
    }

    #[tokio::test]
    async fn grpcio_block_gets_localhost_and_keeps_every_other_header() {
        let original = loona_hpack::Decoder::new()
            .decode(&hex(GRPCIO_BLOCK))
            .unwrap();
        let out = run(&conn(&[headers(1, &hex(GRPCIO_BLOCK))])).await.unwrap();
        let lists = header_lists(&out);
        assert_eq!(lists.len(), 1);
        let l = &lists[0];
        assert_eq!(get(l, ":authority"), Some("localhost"));
        assert_eq!(l.len(), original.len());
        for ((n, v), (on, ov)) in l.iter().zip(&original) {
            assert_eq!(n.as_bytes(), &on[..]);
            if n != ":authority" {
                assert_eq!(v.as_bytes(), &ov[..], "{n}");
            }
        }
        assert_eq!(get(l, ":path"), Some("/a.B/C"));
        // The SETTINGS frame passed through as it was.
        let f = frames(&out);
        assert_eq!((f[0].kind, f[0].payload.len()), (0x4, 12));
        assert_eq!(f[1].stream, 1);
    }

    #[tokio::test]
    async fn a_valid_authority_is_kept() {
        let mut block = vec![0x82, 0x87, 0x84];
        block.extend(indexed_literal(b":authority", b"example.org:8443"));
        let out = run(&conn(&[headers(1, &block)])).await.unwrap();
        assert_eq!(
            get(&header_lists(&out)[0], ":authority"),
            Some("example.org:8443")
        );
    }

    #[tokio::test]
    async fn huffman_coded_authority_is_decoded_and_replaced() {
        let bad = "run%2fsock";
        let mut check = huffman_string(bad);
        check.insert(0, 0x00);
        check.insert(1, 0x01);
        check.insert(2, b'x');
        let decoded = loona_hpack::Decoder::new().decode(&check).unwrap();
        assert_eq!(decoded[0].1, bad.as_bytes(), "test Huffman table");

        // :authority by static name index 1, value Huffman-coded, incremental indexing.
        let mut block = vec![0x82, 0x86, 0x84, 0x41];
        block.extend(huffman_string(bad));
        // A valid Huffman-coded value of another header is kept as decoded.
        block.push(0x00);
        block.extend(huffman_string("x"));
        block.extend(huffman_string("cons.rocks"));
        let out = run(&conn(&[headers(1, &block)])).await.unwrap();
        let l = &header_lists(&out)[0];
        assert_eq!(get(l, ":authority"), Some("localhost"));
        assert_eq!(get(l, "x"), Some("cons.rocks"));
    }

    #[tokio::test]
    async fn dynamic_table_references_across_requests() {
        // Request 1 adds the socket-path authority and a header to the client's table;
        // requests 3 and 5 refer to them by index only (62 = newest, 63 = older).
        let mut first = vec![0x83, 0x86, 0x84];
        first.extend(indexed_literal(b":authority", b"run%2Fx%2Fagent.sock"));
        first.extend(indexed_literal(b"workload.spiffe.io", b"true"));
        let again = vec![0x83, 0x86, 0x84, 0xbf, 0xbe];
        let out = run(&conn(&[
            headers(1, &first),
            headers(3, &again),
            headers(5, &again),
        ]))
        .await
        .unwrap();
        let lists = header_lists(&out);
        assert_eq!(lists.len(), 3);
        for l in &lists {
            assert_eq!(get(l, ":authority"), Some("localhost"));
            assert_eq!(get(l, "workload.spiffe.io"), Some("true"));
        }
        // Nothing produced is indexed: every field is a literal without indexing.
        for f in frames(&out).iter().filter(|f| f.kind == TYPE_HEADERS) {
            assert_eq!(f.payload[0], 0x00);
        }
    }

    #[tokio::test]
    async fn table_size_update_evicts_and_is_bounded() {
        let mut first = vec![0x83, 0x86, 0x84];
        first.extend(indexed_literal(b":authority", b"run%2Fx.sock"));
        // Shrinking the table to 0 evicts the entry: a later reference is an error.
        let mut shrink = vec![0x20, 0x83, 0x86, 0x84];
        shrink.extend(indexed_literal(b":authority", b"run%2Fy.sock"));
        let stale = vec![0x83, 0x86, 0x84, 0xbe];
        let out = run(&conn(&[headers(1, &first), headers(3, &shrink)]))
            .await
            .unwrap();
        assert_eq!(header_lists(&out).len(), 2);
        let e = error_of(&conn(&[
            headers(1, &first),
            headers(3, &shrink),
            headers(5, &stale),
        ]))
        .await;
        assert!(
            e.contains("stream 5") && e.contains("index out of bounds"),
            "{e}"
        );

        // A size update within the limit, then use: fine.
        let mut grow = vec![0x3f, 0xe1, 0x1f]; // 4096
        grow.extend([0x83, 0x86, 0x84, 0xbe]);
        let out = run(&conn(&[headers(1, &first), headers(3, &grow)]))
            .await
            .unwrap();
        assert_eq!(get(&header_lists(&out)[1], ":authority"), Some("localhost"));
        // Above the server's SETTINGS_HEADER_TABLE_SIZE: refused.
        let e = error_of(&conn(&[headers(1, &[0x3f, 0xe2, 0x1f, 0x82])])).await;
        assert!(e.contains("Dynamic table size"), "{e}");
        // The size update is not passed on: h2's table is never used.
        let f = frames(&out);
        assert_eq!(f.last().unwrap().payload[0], 0x00);
    }

    #[tokio::test]
    async fn continuation_frames_are_joined_and_large_blocks_split() {
        let mut block = vec![0x83, 0x86, 0x84];
        block.extend(indexed_literal(b":authority", b"run%2Fx%2Fagent.sock"));
        // Split in the middle of the authority string, over three frames.
        let (a, rest) = block.split_at(7);
        let (b, c) = rest.split_at(9);
        let out = run(&conn(&[
            frame(TYPE_HEADERS, FLAG_END_STREAM, 1, a),
            frame(TYPE_CONTINUATION, 0, 1, b),
            frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, c),
        ]))
        .await
        .unwrap();
        let f = frames(&out);
        assert_eq!(f.len(), 2, "{f:?}");
        assert_eq!(f[1].flags, FLAG_END_STREAM | FLAG_END_HEADERS);
        assert_eq!(get(&header_lists(&out)[0], ":authority"), Some("localhost"));

        // A block of 40 KiB comes out as HEADERS + CONTINUATIONs within 16 KiB each.
        let mut big = vec![0x83, 0x86, 0x84];
        big.extend(indexed_literal(b":authority", b"run%2Fx.sock"));
        let value = "v".repeat(10_000);
        for i in 0..4 {
            big.push(0);
            put_int(&mut big, 0, 7, 2);
            big.extend(format!("h{i}").as_bytes());
            put_int(&mut big, 0, 7, value.len());
            big.extend(value.as_bytes());
        }
        let chunks: Vec<_> = big.chunks(16_000).collect();
        let mut input = vec![frame(TYPE_HEADERS, 0, 1, chunks[0])];
        for (i, c) in chunks.iter().enumerate().skip(1) {
            let last = i + 1 == chunks.len();
            input.push(frame(
                TYPE_CONTINUATION,
                if last { FLAG_END_HEADERS } else { 0 },
                1,
                c,
            ));
        }
        let out = run(&conn(&input)).await.unwrap();
        let f: Vec<_> = frames(&out).into_iter().skip(1).collect();
        assert_eq!(f.len(), 3, "{f:?}");
        assert_eq!(f[0].kind, TYPE_HEADERS);
        assert!(f[1..].iter().all(|f| f.kind == TYPE_CONTINUATION));
        assert_eq!(f[2].flags, FLAG_END_HEADERS);
        let l = &header_lists(&out)[0];
        assert_eq!(get(l, ":authority"), Some("localhost"));
        assert_eq!(get(l, "h3"), Some(value.as_str()));
    }

    #[tokio::test]
    async fn padded_and_priority_flags() {
        let mut block = vec![0x83, 0x86, 0x84];
        block.extend(indexed_literal(b":authority", b"run%2Fx.sock"));
        let mut payload = vec![3]; // pad length
        payload.extend([0x80, 0, 0, 1, 15]); // exclusive dependency on 1, weight 16
        payload.extend(&block);
        payload.extend([0, 0, 0]);
        let flags = FLAG_END_HEADERS | FLAG_END_STREAM | FLAG_PADDED | FLAG_PRIORITY;
        let out = run(&conn(&[frame(TYPE_HEADERS, flags, 3, &payload)]))
            .await
            .unwrap();
        let f = &frames(&out)[1];
        assert_eq!(f.flags, FLAG_END_HEADERS | FLAG_END_STREAM | FLAG_PRIORITY);
        assert_eq!(&f.payload[..5], &[0x80, 0, 0, 1, 15]);
        assert_eq!(get(&header_lists(&out)[0], ":authority"), Some("localhost"));

        // Padding as long as the rest: refused, as RFC 9113 §6.2 asks.
        let mut bad = vec![block.len() as u8 + 1];
        bad.extend(&block);
        let e = error_of(&conn(&[frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS | FLAG_PADDED,
            1,
            &bad,
        )]))
        .await;
        assert!(e.contains("padding"), "{e}");
        let e = error_of(&conn(&[frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS | FLAG_PADDED,
            1,
            &[],
        )]))
        .await;
        assert!(e.contains("padding"), "{e}");
        let e = error_of(&conn(&[frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS | FLAG_PRIORITY,
            1,
            &[0, 0],
        )]))
        .await;
        assert!(e.contains("PRIORITY"), "{e}");
    }

    #[tokio::test]
    async fn other_frames_pass_untouched() {
        let data = frame(0x0, 0x1, 1, &[7u8; 40_000]);
        let ping = frame(0x6, 0, 0, b"12345678");
        let stray = frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 9, b"\x82");
        let mut block = vec![0x83, 0x86, 0x84];
        block.extend(indexed_literal(b":authority", b"run%2Fx.sock"));
        let input = conn(&[
            headers(1, &block),
            data.clone(),
            ping.clone(),
            stray.clone(),
        ]);
        let out = run(&input).await.unwrap();
        let tail = data.len() + ping.len() + stray.len();
        assert_eq!(out[out.len() - tail..], input[input.len() - tail..]);

        // Not HTTP/2 (an HTTP/1 request): passed as it is, h2 answers it.
        let h1 = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(run(h1).await.unwrap(), h1);
        // A truncated frame at EOF reaches h2 as it came.
        let mut cut = conn(&[]);
        cut.extend([0, 0, 5, 1]);
        assert_eq!(run(&cut).await.unwrap(), cut);
    }

    #[tokio::test]
    async fn malformed_and_oversized_input_closes_the_connection() {
        // Bad HPACK: index 0, an index beyond the tables, a string running past the end.
        for block in [&[0x80][..], &[0xff, 0x7f], &[0x00, 0x05, b'a']] {
            let e = error_of(&conn(&[headers(1, block)])).await;
            assert!(e.contains("HPACK"), "{e}");
        }
        // A header block larger than the bound: refused at the frame header, before
        // its payload is read.
        let mut input = conn(&[]);
        put_frame_head(&mut input, MAX_HEADER_BLOCK, TYPE_HEADERS, 0, 1);
        let e = error_of(&input).await;
        assert!(e.contains("exceeds 65536 bytes"), "{e}");
        // The bound covers a block split over many CONTINUATION frames, empty ones too.
        let mut input = conn(&[frame(TYPE_HEADERS, 0, 1, &[0x82])]);
        for _ in 0..MAX_HEADER_BLOCK / FRAME_HEAD_LEN {
            input.extend(frame(TYPE_CONTINUATION, 0, 1, &[]));
        }
        let mut out = Vec::new();
        let e = FixAuthority::new(&input[..])
            .read_to_end(&mut out)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("exceeds 65536 bytes"), "{e}");
        // Another frame between HEADERS and its CONTINUATION.
        let e = error_of(&conn(&[
            frame(TYPE_HEADERS, 0, 1, &[0x82]),
            frame(0x6, 0, 0, b"12345678"),
        ]))
        .await;
        assert!(
            e.contains("expected a CONTINUATION frame on stream 1"),
            "{e}"
        );
        // A 4 KiB table entry referred to again and again: the decoded block is bounded.
        let mut bomb = indexed_literal(b"x", &[b'a'; 4000]);
        bomb.extend(std::iter::repeat_n(0xbe, 100));
        let e = error_of(&conn(&[headers(1, &bomb)])).await;
        assert!(e.contains("decodes to more than"), "{e}");
        // More fields than any request h2 serves (each a 1-byte Huffman name and value,
        // the costliest form to decode): refused before decoding.
        let tiny = [0x00, 0x81, 0x1f, 0x81, 0x1f];
        let many: Vec<u8> = tiny
            .iter()
            .copied()
            .cycle()
            .take(5 * (MAX_FIELDS + 1))
            .collect();
        let e = error_of(&conn(&[headers(1, &many)])).await;
        assert!(e.contains("more than 512 fields"), "{e}");
        assert_eq!(count_fields(&many[5..]).fields, MAX_FIELDS);
        assert_eq!(
            count_fields(&[0x20, 0x20, 0x82, 0x3f, 0xe1, 0x1f, 0xbe]).fields,
            2
        );
        assert_eq!(count_fields(&[0x82, 0x00, 0x05, b'a']).fields, 1);
        // Reads after the failure fail too.
        let input = conn(&[headers(1, &[0x80])]);
        let mut fa = FixAuthority::new(&input[..]);
        let mut out = Vec::new();
        assert!(fa.read_to_end(&mut out).await.is_err());
        assert!(fa.read(&mut [0; 16]).await.is_err());
    }

    #[tokio::test]
    async fn peer_credentials_come_through() {
        use tonic::transport::server::Connected;
        let (a, _b) = tokio::net::UnixStream::pair().unwrap();
        let info = FixAuthority::new(a).connect_info();
        let cred = info.peer_cred.expect("peer credentials");
        assert_eq!(cred.pid(), Some(std::process::id() as i32));
    }
}
