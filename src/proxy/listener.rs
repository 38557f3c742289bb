//! The accept loop shared by every listener: connection limit, metrics, graceful stop.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics;

/// Accepts until `shutdown`, handing each connection to `handle` on its own task.
/// Over `max_connections`, a new connection is closed at once and counted.
pub async fn accept_loop<H, F>(
    listener: TcpListener,
    name: Arc<str>,
    direction: &'static str,
    max_connections: usize,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    handle: H,
) where
    H: Fn(TcpStream, SocketAddr) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let limit = Arc::new(Semaphore::new(max_connections));
    let m = metrics::get();
    let accepted = m.connections.with_label_values(&[&name, direction]);
    let active = m.active.with_label_values(&[&name]);
    let over_limit = m
        .connection_errors
        .with_label_values(&[&name, "over_limit"]);
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            res = listener.accept() => match res {
                Ok(s) => s,
                Err(e) => {
                    // Out of file descriptors and the like: do not spin.
                    tracing::warn!(listener = %name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            over_limit.inc();
            tracing::warn!(listener = %name, %peer, max_connections, "connection refused: listener at its connection limit");
            continue;
        };
        let _ = stream.set_nodelay(true);
        accepted.inc();
        active.inc();
        let active = active.clone();
        let work = handle(stream, peer);
        tracker.spawn(async move {
            work.await;
            active.dec();
            drop(permit);
        });
    }
    tracing::info!(listener = %name, "stopped accepting");
}
