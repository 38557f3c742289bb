//! Upstream HTTP clients: to the local app (plaintext; HTTP/1.1, or h2c when the caller
//! spoke h2, as gRPC needs) and to peers (mTLS, h2 or HTTP/1.1 by ALPN, pooled). Both
//! connect through the proxy's [`Connector`], so connect failures are logged and
//! counted as for TCP listeners. The pool is replaced when our SVID rotates, so new
//! requests go over connections made with the new certificate; upgraded requests get a
//! connection of their own (HTTP/1.1 only), never a pooled one.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use http_body_util::combinators::BoxBody;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::client::TlsStream;

use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::eviction::{PeerRole, Registration};
use crate::identity::{IdentityState, Snapshot};
use crate::proxy::{established, reject, Connector, MtlsOriginator};

/// The body of a request svidcar sends upstream (the caller's, trailers cleaned).
pub type ReqBody = BoxBody<Bytes, hyper::Error>;

/// One upstream connection: plaintext to the app, or mTLS to a peer.
pub enum UpstreamConn {
    /// The permit is the connection's place under `max_upstream_connections`.
    Plain(TokioIo<TcpStream>, OwnedSemaphorePermit),
    Tls(Box<PeerConn>),
}

/// An mTLS connection to a peer, registered for eviction: once the peer is no longer
/// allowed, every read and write fails, so hyper drops the connection from its pool.
pub struct PeerConn {
    io: TokioIo<TlsStream<TcpStream>>,
    h2: bool,
    revoked: Pin<Box<WaitForCancellationFutureOwned>>,
    _registration: Registration,
    _slot: OwnedSemaphorePermit,
}

impl PeerConn {
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.revoked.as_mut().poll(cx) {
            Poll::Ready(()) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the peer is no longer allowed",
            )),
            Poll::Pending => Ok(()),
        }
    }
}

impl Connection for UpstreamConn {
    fn connected(&self) -> Connected {
        match self {
            Self::Tls(c) if c.h2 => Connected::new().negotiated_h2(),
            _ => Connected::new(),
        }
    }
}

impl Read for UpstreamConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s, _) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(c) => {
                c.check(cx)?;
                Pin::new(&mut c.io).poll_read(cx, buf)
            }
        }
    }
}

impl Write for UpstreamConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s, _) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(c) => {
                c.check(cx)?;
                Pin::new(&mut c.io).poll_write(cx, buf)
            }
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s, _) => Pin::new(s).poll_flush(cx),
            Self::Tls(c) => Pin::new(&mut c.io).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s, _) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(c) => Pin::new(&mut c.io).poll_shutdown(cx),
        }
    }
}

/// Opens upstream connections for a hyper client: the URI is ignored, the listener's
/// target decides where to go.
#[derive(Clone)]
pub struct UpstreamConnector {
    listener: Arc<str>,
    connector: Arc<Connector>,
    mtls: Option<Arc<MtlsOriginator>>,
    /// The same, offering only `http/1.1` by ALPN: an upgrade (websocket, CONNECT) is an
    /// HTTP/1.1 exchange, which an h2 connection could not carry.
    mtls_h1: Option<Arc<MtlsOriginator>>,
    /// One permit per open connection (`max_upstream_connections`). hyper's pool is
    /// keyed by the authority the caller names, so without a bound a caller making up
    /// names would have a connection opened, and kept idle, for each.
    slots: Arc<Semaphore>,
    max: usize,
}

impl UpstreamConnector {
    /// At most `max` connections open at once (pooled, busy and upgraded).
    pub fn new(
        listener: Arc<str>,
        connector: Connector,
        mtls: Option<MtlsOriginator>,
        max: usize,
    ) -> Self {
        let mtls_h1 = mtls.as_ref().map(|m| {
            let mut config = (**m.connector.config()).clone();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            Arc::new(MtlsOriginator {
                connector: Arc::new(config).into(),
                server_name: m.server_name.clone(),
                handshake_timeout: m.handshake_timeout,
                verifier: m.verifier.clone(),
            })
        });
        Self {
            listener,
            connector: Arc::new(connector),
            mtls: mtls.map(Arc::new),
            mtls_h1,
            slots: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    /// A new connection, not from any pool; `h1_only`: HTTP/1.1 by ALPN.
    pub async fn open(&self, h1_only: bool) -> io::Result<UpstreamConn> {
        let slot = self.slots.clone().try_acquire_owned().map_err(|_| {
            crate::metrics::get()
                .connection_errors
                .with_label_values(&[&*self.listener, "upstream_connection_limit"])
                .inc();
            let e = io::Error::other(format!(
                "{} connections to {} are open already (max_upstream_connections)",
                self.max,
                self.connector.describe()
            ));
            if LIMIT_LOG.allow("upstream") {
                tracing::warn!(listener = %self.listener, error = %e, "no new upstream connection");
            }
            e
        })?;
        let tcp = self.connector.connect(None).await.ok_or_else(|| {
            io::Error::other(format!("cannot connect to {}", self.connector.describe()))
        })?;
        let mtls = if h1_only { &self.mtls_h1 } else { &self.mtls };
        let Some(mtls) = mtls else {
            return Ok(UpstreamConn::Plain(TokioIo::new(tcp), slot));
        };
        let peer = tcp.peer_addr()?;
        let tls = match mtls.originate(tcp).await {
            Ok(tls) => tls,
            Err(why) => {
                reject(&self.listener, peer, &why);
                return Err(io::Error::other(why.to_string()));
            }
        };
        let kinds = &crate::metrics::get().tls_handshakes;
        let (full, resumed) = (
            kinds.with_label_values(&[&*self.listener, "full"]),
            kinds.with_label_values(&[&*self.listener, "resumed"]),
        );
        let session = tls.get_ref().1;
        if let Err(why) = established(&full, &resumed, session, &mtls.verifier, PeerRole::Server) {
            reject(&self.listener, peer, &why);
            return Err(io::Error::other(why.to_string()));
        }
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        // Pooled connections outlive any one request: they end on eviction only.
        let registration = crate::eviction::watch(
            crate::eviction::Peer {
                listener: &self.listener,
                verifier: &mtls.verifier,
                role: PeerRole::Server,
                certs: tls.get_ref().1.peer_certificates(),
            },
            &CancellationToken::new(),
        );
        Ok(UpstreamConn::Tls(Box::new(PeerConn {
            io: TokioIo::new(tls),
            h2,
            revoked: Box::pin(registration.closing.clone().cancelled_owned()),
            _registration: registration,
            _slot: slot,
        })))
    }
}

/// Requests refused for `max_upstream_connections`: callers cause them, so the log is
/// rate-limited; the metric counts all.
static LIMIT_LOG: crate::log_limit::LogLimiter =
    crate::log_limit::LogLimiter::new("no new upstream connection", 20, Duration::from_secs(10));

type ConnectFuture = Pin<Box<dyn Future<Output = io::Result<UpstreamConn>> + Send>>;

impl tower::Service<Uri> for UpstreamConnector {
    type Response = UpstreamConn;
    type Error = io::Error;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { this.open(false).await })
    }
}

/// Pings on h2 upstream connections, busy or idle, and how long an answer may take.
const H2_PING: Duration = Duration::from_secs(30);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an unused pooled connection is kept.
const POOL_IDLE: Duration = Duration::from_secs(90);

/// Idle connections kept per pool key. The key is the authority the caller named (hyper's
/// pool is keyed so), which the caller chooses: this bounds each name, and
/// `max_upstream_connections` all of them together.
const POOL_MAX_IDLE_PER_HOST: usize = 32;

/// A pooled client of one listener's upstream.
pub type UpstreamClient = Client<UpstreamConnector, ReqBody>;

/// The client for one listener's upstream: a hyper client whose pool belongs to one
/// SVID. When `state` shows another default SVID, the next request gets a new client
/// (new connections, new certificate); the old one's connections finish the requests
/// they carry and close, as its last handle goes.
pub struct Pool {
    connector: UpstreamConnector,
    h2_only: bool,
    pool: bool,
    state: Option<Arc<IdentityState>>,
    /// The serial of the SVID the client's connections use, and the client (shared: a
    /// request takes a count, not a copy of the client's 300-odd bytes).
    current: std::sync::Mutex<(Option<String>, Arc<UpstreamClient>)>,
}

impl Pool {
    /// `state`: reconnect after a rotation (mTLS upstreams); `None` for the app.
    pub fn new(
        connector: UpstreamConnector,
        h2_only: bool,
        pool: bool,
        state: Option<Arc<IdentityState>>,
    ) -> Self {
        let serial = state
            .as_deref()
            .and_then(|s| default_serial(&s.load()).map(str::to_owned));
        let client = Arc::new(build(connector.clone(), h2_only, pool));
        Self {
            connector,
            h2_only,
            pool,
            state,
            current: std::sync::Mutex::new((serial, client)),
        }
    }

    /// The client to use now.
    pub fn get(&self) -> Arc<UpstreamClient> {
        let snapshot = self.state.as_deref().map(IdentityState::load);
        let serial = snapshot.as_deref().and_then(default_serial);
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if self.state.is_some() && cur.0.as_deref() != serial {
            tracing::debug!(listener = %self.connector.listener, "SVID rotated: new upstream connections from now on");
            *cur = (
                serial.map(str::to_owned),
                Arc::new(build(self.connector.clone(), self.h2_only, self.pool)),
            );
        }
        cur.1.clone()
    }

    /// Opens a connection of its own, HTTP/1.1 (for an upgrade).
    pub async fn open_h1(&self) -> io::Result<UpstreamConn> {
        self.connector.open(true).await
    }
}

fn default_serial(snapshot: &Snapshot) -> Option<&str> {
    snapshot.default_svid().map(|s| s.serial.as_str())
}

/// A pooled client over `connector`; `h2_only` for h2c to the app.
fn build(
    connector: UpstreamConnector,
    h2_only: bool,
    pool: bool,
) -> Client<UpstreamConnector, ReqBody> {
    let mut b = Client::builder(TokioExecutor::new());
    b.pool_idle_timeout(POOL_IDLE)
        .pool_max_idle_per_host(if pool { POOL_MAX_IDLE_PER_HOST } else { 0 })
        .pool_timer(hyper_util::rt::TokioTimer::new())
        .http2_only(h2_only)
        // A peer gone without a FIN or RST leaves an h2 connection that looks open: a
        // ping every 30 s, answered within 10 s, takes it out of the pool instead of
        // letting requests wait on it for request_timeout each.
        .http2_keep_alive_interval(H2_PING)
        .http2_keep_alive_timeout(H2_PING_TIMEOUT)
        .http2_keep_alive_while_idle(true)
        .timer(hyper_util::rt::TokioTimer::new());
    b.build(connector)
}
