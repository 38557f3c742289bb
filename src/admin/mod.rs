//! The admin endpoint: `/ready`, `/live`, `/metrics`, `/certs`. Plain HTTP/1.1 on a
//! local address; it shows serials and SPIFFE IDs, never key material.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::identity::IdentityState;

/// Admin connections at once: plenty for probes and scrapes, never enough to starve
/// the proxy of file descriptors.
const MAX_ADMIN_CONNECTIONS: usize = 64;

pub async fn serve(listener: TcpListener, state: Arc<IdentityState>, shutdown: CancellationToken) {
    let limit = Arc::new(tokio::sync::Semaphore::new(MAX_ADMIN_CONNECTIONS));
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            res = listener.accept() => match res {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&req, &state)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn route(req: &Request<Incoming>, state: &IdentityState) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/live" => reply(StatusCode::OK, "text/plain", "live\n".into()),
        "/ready" => match state.ready() {
            Ok(()) if state.is_cached() => reply(
                StatusCode::OK,
                "text/plain",
                "ready (cached identity: identity source unreachable)\n".into(),
            ),
            Ok(()) => reply(StatusCode::OK, "text/plain", "ready\n".into()),
            Err(why) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {why}\n"),
            ),
        },
        "/metrics" => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            crate::metrics::get().render(),
        ),
        "/certs" => reply(StatusCode::OK, "application/json", certs_json(state)),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

fn reply(status: StatusCode, ctype: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = ctype.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

fn unix(t: std::time::SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What identity is in use: SPIFFE IDs, serials, expiry, bundle sizes.
pub fn certs_json(state: &IdentityState) -> String {
    let snap = state.load();
    let svids: Vec<_> = snap
        .svids
        .iter()
        .map(|s| {
            serde_json::json!({
                "spiffe_id": s.spiffe_id.to_string(),
                "serial": s.serial,
                "not_after": unix(s.not_after),
                "chain_len": s.chain.len(),
            })
        })
        .collect();
    let bundles: Vec<_> = snap
        .bundles
        .values()
        .map(|b| {
            serde_json::json!({
                "trust_domain": b.trust_domain.as_str(),
                "roots": b.roots.iter().filter_map(|r| crate::x509::serial_of(r)).collect::<Vec<_>>(),
            })
        })
        .collect();
    serde_json::json!({"version": snap.version, "svids": svids, "bundles": bundles}).to_string()
}

/// Binds the admin address, naming it in the error.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("admin.listen: cannot bind {addr}: {e}"))
}
