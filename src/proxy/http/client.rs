//! Upstream HTTP clients: to the local app (plaintext; HTTP/1.1, or h2c when the caller
//! spoke h2, as gRPC needs) and to peers (mTLS, h2 or HTTP/1.1 by ALPN, pooled). Both
//! connect through the proxy's [`Connector`], so connect failures are logged and
//! counted as for TCP listeners.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper::body::Incoming;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::proxy::{reject, Connector, MtlsOriginator};

/// One upstream connection: plaintext to the app, or mTLS to a peer.
pub enum UpstreamConn {
    Plain(TokioIo<TcpStream>),
    Tls(Box<TokioIo<TlsStream<TcpStream>>>, bool),
}

impl Connection for UpstreamConn {
    fn connected(&self) -> Connected {
        match self {
            Self::Plain(_) => Connected::new(),
            Self::Tls(_, true) => Connected::new().negotiated_h2(),
            Self::Tls(_, false) => Connected::new(),
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
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s, _) => Pin::new(s.as_mut()).poll_read(cx, buf),
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
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s, _) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s, _) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s, _) => Pin::new(s.as_mut()).poll_shutdown(cx),
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
}

impl UpstreamConnector {
    pub fn new(listener: Arc<str>, connector: Connector, mtls: Option<MtlsOriginator>) -> Self {
        Self {
            listener,
            connector: Arc::new(connector),
            mtls: mtls.map(Arc::new),
        }
    }
}

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
        Box::pin(async move {
            let tcp = this.connector.connect(None).await.ok_or_else(|| {
                io::Error::other(format!("cannot connect to {}", this.connector.describe()))
            })?;
            let Some(mtls) = &this.mtls else {
                return Ok(UpstreamConn::Plain(TokioIo::new(tcp)));
            };
            let peer = tcp.peer_addr()?;
            let tls = match mtls.originate(tcp).await {
                Ok(tls) => tls,
                Err(why) => {
                    reject(&this.listener, peer, &why);
                    return Err(io::Error::other(why.to_string()));
                }
            };
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            Ok(UpstreamConn::Tls(Box::new(TokioIo::new(tls)), h2))
        })
    }
}

/// How long an unused pooled connection is kept.
const POOL_IDLE: Duration = Duration::from_secs(90);

/// A pooled client over `connector`; `h2_only` for h2c to the app.
pub fn client(
    connector: UpstreamConnector,
    h2_only: bool,
    pool: bool,
) -> Client<UpstreamConnector, Incoming> {
    let mut b = Client::builder(TokioExecutor::new());
    b.pool_idle_timeout(POOL_IDLE)
        .pool_timer(hyper_util::rt::TokioTimer::new())
        .http2_only(h2_only)
        .timer(hyper_util::rt::TokioTimer::new());
    if !pool {
        b.pool_max_idle_per_host(0);
    }
    b.build(connector)
}
