//! Upgrades (HTTP/1.1 `Upgrade: websocket` and the like) and `CONNECT` tunnels. The
//! request is checked and rewritten like any other (identity headers set, rules asked);
//! it then goes upstream on a connection of its own, HTTP/1.1 and never pooled, since
//! after the switch that connection carries one byte stream. When the upstream agrees
//! (101, or 2xx to `CONNECT`), both sides become byte streams copied until either ends.

use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::client::{Pool, ReqBody};
use crate::proxy::{relay, ListenerMetrics};

/// What a request asks to become.
#[derive(Debug, Clone)]
pub enum Kind {
    /// `Upgrade: <protocol>` with `Connection: upgrade`.
    Upgrade(HeaderValue),
    /// `CONNECT host:port`.
    Connect,
}

/// Why an upgrade could not be forwarded.
#[derive(Debug)]
pub enum UpgradeError {
    /// No connection to the upstream.
    Connect(std::io::Error),
    /// The HTTP/1.1 exchange on the new connection failed.
    Exchange(hyper::Error),
}

impl std::fmt::Display for UpgradeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Connect(e) => write!(f, "no upstream connection for the upgrade: {e}"),
            Self::Exchange(e) => write!(f, "upgrade request failed: {e}"),
        }
    }
}

/// The upgrade an HTTP/1.1 request asks for, read before hop-by-hop headers go. An
/// `Upgrade` header that `Connection` does not name is no request to upgrade (RFC 9110
/// §7.8): it is dropped with the other hop-by-hop headers.
pub fn requested(req: &Request<Incoming>) -> Option<Kind> {
    if req.version() != Version::HTTP_11 {
        return None;
    }
    if req.method() == Method::CONNECT {
        return Some(Kind::Connect);
    }
    let named = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    match req.headers().get(header::UPGRADE) {
        Some(v) if named => Some(Kind::Upgrade(v.clone())),
        _ => None,
    }
}

/// Puts back what an upgrade needs after the hop-by-hop headers were removed, and the
/// request target in the form HTTP/1.1 sends: `host:port` for `CONNECT`, else the path.
pub fn prepare(req: &mut Request<ReqBody>, kind: &Kind, authority: &http::uri::Authority) {
    let target = match kind {
        Kind::Connect => {
            Uri::from_maybe_shared(bytes::Bytes::copy_from_slice(authority.as_str().as_bytes()))
                .ok()
        }
        Kind::Upgrade(protocol) => {
            let h = req.headers_mut();
            h.insert(header::UPGRADE, protocol.clone());
            h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            req.uri()
                .path_and_query()
                .and_then(|pq| pq.as_str().parse().ok())
        }
    };
    if let Some(t) = target {
        *req.uri_mut() = t;
    }
    if !req.headers().contains_key(header::HOST) {
        if let Ok(h) = HeaderValue::from_str(authority.as_str()) {
            req.headers_mut().insert(header::HOST, h);
        }
    }
    *req.version_mut() = Version::HTTP_11;
}

/// Whether `status` is the upstream agreeing to `kind`.
pub fn switched(kind: &Kind, status: StatusCode) -> bool {
    match kind {
        Kind::Connect => status.is_success(),
        Kind::Upgrade(_) => status == StatusCode::SWITCHING_PROTOCOLS,
    }
}

/// Where a switched connection's bytes go: a task `tunnels` tracks, ended by `closing`,
/// by no byte moving for `idle` (the listener's `idle_timeout`), or by either side
/// closing, and counted in the listener's `metrics` as a TCP connection's are.
pub struct Tunnel<'a> {
    pub tunnels: &'a TaskTracker,
    pub closing: CancellationToken,
    pub idle: Duration,
    pub metrics: ListenerMetrics,
}

/// Sends `req` on a new HTTP/1.1 connection from `pool`; when the upstream switches,
/// joins `downstream` (the caller's connection, once hyper hands it over) to it.
pub async fn forward(
    pool: &Pool,
    req: Request<ReqBody>,
    kind: &Kind,
    downstream: OnUpgrade,
    to: Tunnel<'_>,
) -> Result<Response<Incoming>, UpgradeError> {
    let io = pool.open_h1().await.map_err(UpgradeError::Connect)?;
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake(io)
        .await
        .map_err(UpgradeError::Exchange)?;
    let conn_listener = to.metrics.name.clone();
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(listener = %conn_listener, error = %e, "upgrade connection ended with error");
        }
    });
    let mut res = sender
        .send_request(req)
        .await
        .map_err(UpgradeError::Exchange)?;
    if switched(kind, res.status()) {
        let upstream = hyper::upgrade::on(&mut res);
        to.tunnels.spawn(tunnel(
            downstream, upstream, to.closing, to.idle, to.metrics,
        ));
    }
    Ok(res)
}

/// Copies bytes both ways between the two switched connections.
async fn tunnel(
    downstream: OnUpgrade,
    upstream: OnUpgrade,
    closing: CancellationToken,
    idle: Duration,
    metrics: ListenerMetrics,
) {
    let (down, up) = match tokio::try_join!(downstream, upstream) {
        Ok(both) => both,
        Err(e) => {
            tracing::debug!(listener = %metrics.name, error = %e, "upgrade did not complete");
            return;
        }
    };
    let (down, up) = (TokioIo::new(down), TokioIo::new(up));
    relay(&metrics, down, up, idle, closing.cancelled()).await;
}
