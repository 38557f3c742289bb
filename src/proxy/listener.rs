//! The accept loop shared by every listener: connection limit, metric handles looked
//! up once, and a context handed to each connection (addresses, drain signals).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use prometheus::{IntCounter, IntGauge};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics;

/// How a connection learns that the process is stopping. `draining`: no new
/// connections are accepted and long-lived protocols should say goodbye (HTTP/2
/// GOAWAY); `closing`: the drain time is over and the connection must end now.
#[derive(Debug, Clone, Default)]
pub struct Drain {
    pub draining: CancellationToken,
    pub closing: CancellationToken,
}

impl Drain {
    /// Resolves when the connection must end at once.
    pub async fn closed(&self) {
        self.closing.cancelled().await
    }
}

/// One accepted connection and what is known about it.
#[derive(Debug)]
pub struct Accepted {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    /// Where the client meant to go, when a redirect rule sent it here.
    pub original_dst: Option<SocketAddr>,
    pub drain: Drain,
}

/// The metric series of one listener, looked up when it starts (not per connection).
#[derive(Clone)]
pub struct ListenerMetrics {
    pub name: Arc<str>,
    pub accepted: IntCounter,
    pub active: IntGauge,
    pub over_limit: IntCounter,
    pub rx: IntCounter,
    pub tx: IntCounter,
    pub idle_timeout: IntCounter,
    pub upstream_connect_failed: IntCounter,
    pub handshakes_full: IntCounter,
    pub handshakes_resumed: IntCounter,
}

impl ListenerMetrics {
    pub fn new(name: &Arc<str>, direction: &str) -> Self {
        let m = metrics::get();
        let name_label: &str = name;
        let errors = |reason: &str| m.connection_errors.with_label_values(&[name_label, reason]);
        Self {
            name: name.clone(),
            accepted: m.connections.with_label_values(&[name_label, direction]),
            active: m.active.with_label_values(&[name_label]),
            over_limit: errors("over_limit"),
            rx: m.bytes.with_label_values(&[name_label, "rx"]),
            tx: m.bytes.with_label_values(&[name_label, "tx"]),
            idle_timeout: errors("idle_timeout"),
            upstream_connect_failed: errors("upstream_connect_failed"),
            handshakes_full: m.tls_handshakes.with_label_values(&[name_label, "full"]),
            handshakes_resumed: m.tls_handshakes.with_label_values(&[name_label, "resumed"]),
        }
    }
}

/// How a listener accepts: its metric series, its connection limit (one semaphore,
/// shared when a listener has several sockets), whether connections were redirected.
#[derive(Clone)]
pub struct AcceptSettings {
    pub metrics: ListenerMetrics,
    pub limit: Arc<Semaphore>,
    pub max_connections: usize,
    /// Read each connection's original destination (transparent listeners).
    pub original_dst: bool,
}

impl AcceptSettings {
    pub fn new(metrics: ListenerMetrics, max_connections: usize, original_dst: bool) -> Self {
        Self {
            metrics,
            limit: Arc::new(Semaphore::new(max_connections)),
            max_connections,
            original_dst,
        }
    }
}

/// Runs `listener` on every socket in `sockets` (one, or the IPv4 and IPv6 loopback of
/// a transparent outbound listener), all under the same connection limit. At the drain
/// it gives the sockets back, in order (a successor may take them over); it ends early
/// with the error of a socket that is gone.
pub async fn serve<L, H, F>(
    listener: Arc<L>,
    sockets: Vec<TcpListener>,
    settings: AcceptSettings,
    drain: Drain,
    tracker: TaskTracker,
    handle: H,
) -> std::io::Result<Vec<TcpListener>>
where
    L: Send + Sync + 'static,
    H: Fn(Arc<L>, Accepted) -> F + Clone + Send + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let mut loops = tokio::task::JoinSet::new();
    let count = sockets.len();
    for (i, socket) in sockets.into_iter().enumerate() {
        let (l, h) = (listener.clone(), handle.clone());
        let run = accept_loop(
            socket,
            settings.clone(),
            drain.clone(),
            tracker.clone(),
            move |c| h(l.clone(), c),
        );
        loops.spawn(async move { run.await.map(|s| (i, s)) });
    }
    let mut back = Vec::with_capacity(count);
    while let Some(ended) = loops.join_next().await {
        back.push(ended.map_err(std::io::Error::other)??);
    }
    back.sort_by_key(|(i, _)| *i);
    Ok(back.into_iter().map(|(_, s)| s).collect())
}

/// Accepts until `drain.draining`, handing each connection to `handle` on its own
/// task, then gives the socket back. Over `max_connections`, a new connection is closed
/// at once and counted. Ends early, with the error, only when the listening socket is
/// gone.
pub async fn accept_loop<H, F>(
    listener: TcpListener,
    settings: AcceptSettings,
    drain: Drain,
    tracker: TaskTracker,
    handle: H,
) -> std::io::Result<TcpListener>
where
    H: Fn(Accepted) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let AcceptSettings {
        metrics,
        limit,
        max_connections,
        original_dst,
    } = settings;
    let name = metrics.name.clone();
    let local = listener.local_addr().ok();
    loop {
        let (stream, peer) = tokio::select! {
            _ = drain.draining.cancelled() => break,
            res = listener.accept() => match res {
                Ok(s) => s,
                Err(e) => {
                    crate::net::accept::recover(&name, e).await?;
                    continue;
                }
            },
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            metrics.over_limit.inc();
            tracing::warn!(listener = %name, %peer, max_connections, "connection refused: listener at its connection limit");
            continue;
        };
        let _ = stream.set_nodelay(true);
        metrics.accepted.inc();
        metrics.active.inc();
        let active = metrics.active.clone();
        // A listener on a wildcard address learns its local address per connection.
        let local = match local {
            Some(a) if !a.ip().is_unspecified() => a,
            _ => stream.local_addr().unwrap_or(peer),
        };
        let original_dst = if original_dst {
            match crate::net::original_dst(&stream, local) {
                Ok(dst) => dst,
                Err(e) => {
                    tracing::debug!(listener = %name, %peer, error = %e, "no original destination");
                    None
                }
            }
        } else {
            None
        };
        let work = handle(Accepted {
            stream,
            peer,
            local,
            original_dst,
            drain: drain.clone(),
        });
        tracker.spawn(async move {
            work.await;
            active.dec();
            drop(permit);
        });
    }
    tracing::info!(listener = %name, "stopped accepting");
    Ok(listener)
}
