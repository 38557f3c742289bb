//! The admin endpoint: `/ready`, `/live`, `/metrics`, `/certs`, `/drain` (a preStop
//! hook: not ready from then on), `POST /reload` (read the config again),
//! `POST /quitquitquit` (drain and exit, as SIGTERM; for Jobs) and
//! `/app-health/<container>/<probe>` (the app's own probes, for kubelet; see
//! [`app_health`]). Plain HTTP/1.1; it shows serials and SPIFFE IDs, never key material.

pub mod app_health;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
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
/// the proxy of file descriptors. At the limit the oldest connection is closed to make
/// room, so idle connections cannot lock probes out.
const MAX_ADMIN_CONNECTIONS: usize = 64;

/// A client gets this long to send its request headers.
const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// The open admin connections, oldest first, each with the token that closes it.
#[derive(Default)]
struct Open {
    next_id: u64,
    conns: std::collections::VecDeque<(u64, CancellationToken)>,
}

/// What the admin server serves besides the identity.
#[derive(Debug, Default)]
pub struct AdminOptions {
    /// The app's original probes (JSON, see [`app_health::AppProbes`]), read per probe.
    pub app_probes: Option<PathBuf>,
    /// Set by `/drain`: `/ready` answers 503 from then on.
    pub draining: AtomicBool,
    /// Where `POST /reload` asks for a config reload (`svidcar run`).
    pub reload: Option<tokio::sync::mpsc::UnboundedSender<ReloadRequest>>,
    /// Cancelled by `POST /quitquitquit`: the process drains and exits, as on SIGTERM.
    pub quit: CancellationToken,
    /// `admin.ready_min_svid_validity`: `/ready` says 503 once the default SVID expires
    /// within this (no renewal came); zero: only once it has expired.
    pub ready_min_svid_validity: std::time::Duration,
}

/// A `POST /reload`: the reloader answers with what changed, or why nothing did.
pub type ReloadRequest = tokio::sync::oneshot::Sender<Result<String, String>>;

/// Serves until `shutdown`; an error: the listening socket is gone.
pub async fn serve(
    listener: TcpListener,
    state: Arc<IdentityState>,
    options: Arc<AdminOptions>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let open = Arc::new(std::sync::Mutex::new(Open::default()));
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            res = listener.accept() => match res {
                Ok(s) => s,
                Err(e) => {
                    crate::net::accept::recover("admin", e).await?;
                    continue;
                }
            },
        };
        let close = CancellationToken::new();
        let id = {
            let Ok(mut o) = open.lock() else {
                return Ok(());
            };
            if o.conns.len() >= MAX_ADMIN_CONNECTIONS {
                if let Some((_, oldest)) = o.conns.pop_front() {
                    oldest.cancel();
                }
            }
            o.next_id += 1;
            let id = o.next_id;
            o.conns.push_back((id, close.clone()));
            id
        };
        let state = state.clone();
        let options = options.clone();
        let open = open.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                let options = options.clone();
                async move { Ok::<_, Infallible>(route(&req, &state, &options).await) }
            });
            // One request per connection: probes and scrapes do not need keep-alive,
            // and a connection that holds no request is not worth a slot.
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                _ = conn => {}
                _ = close.cancelled() => {}
            }
            if let Ok(mut o) = open.lock() {
                o.conns.retain(|(i, _)| *i != id);
            }
        });
    }
}

async fn route(
    req: &Request<Incoming>,
    state: &IdentityState,
    options: &AdminOptions,
) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if let Some(rest) = path.strip_prefix("/app-health/") {
        let Some(file) = &options.app_probes else {
            return reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                "no app probes\n".into(),
            );
        };
        let probes = match app_health::AppProbes::load(file) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "app probes unreadable");
                return reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("{e}\n"),
                );
            }
        };
        let (status, body) = app_health::answer(&probes, rest).await;
        return reply(status, "text/plain", body);
    }
    match path {
        "/reload" => reload(req, options).await,
        "/quitquitquit" if req.method() != hyper::Method::POST => reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "use POST\n".into(),
        ),
        "/quitquitquit" => {
            if !options.quit.is_cancelled() {
                tracing::info!("shutdown requested via /quitquitquit");
                options.quit.cancel();
            }
            reply(StatusCode::OK, "text/plain", "stopping\n".into())
        }
        "/live" => reply(StatusCode::OK, "text/plain", "live\n".into()),
        "/drain" => {
            if !options.draining.swap(true, Ordering::Relaxed) {
                tracing::info!("drain requested (preStop): not ready from now on");
            }
            reply(StatusCode::OK, "text/plain", "draining\n".into())
        }
        "/ready" if options.draining.load(Ordering::Relaxed) => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready: draining\n".into(),
        ),
        "/ready" if svid_expires_within(state, options.ready_min_svid_validity).is_some() => {
            let (id, left) =
                svid_expires_within(state, options.ready_min_svid_validity).unwrap_or_default();
            reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!(
                    "not ready: SVID {id} expires in {}s and no renewal has come (admin.ready_min_svid_validity)\n",
                    left.as_secs()
                ),
            )
        }
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

/// `POST /reload`: 200 with what changed, 400 with the error `svidcar check` would give
/// (the running config stays).
async fn reload(req: &Request<Incoming>, options: &AdminOptions) -> Response<Full<Bytes>> {
    if req.method() != hyper::Method::POST {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "use POST\n".into(),
        );
    }
    let Some(reloader) = &options.reload else {
        return reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "no reload here\n".into(),
        );
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    if reloader.send(tx).is_err() {
        return reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "shutting down\n".into(),
        );
    }
    match rx.await {
        Ok(Ok(text)) => reply(StatusCode::OK, "text/plain", format!("reloaded: {text}\n")),
        Ok(Err(e)) => reply(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n")),
        Err(_) => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "shutting down\n".into(),
        ),
    }
}

/// The default SVID's ID and time left, when that is less than `margin` (and more than
/// nothing: an expired SVID is `state.ready()`'s to report).
fn svid_expires_within(
    state: &IdentityState,
    margin: std::time::Duration,
) -> Option<(String, std::time::Duration)> {
    if margin.is_zero() {
        return None;
    }
    let snap = state.load();
    let svid = snap.default_svid()?;
    let left = svid
        .not_after
        .duration_since(std::time::SystemTime::now())
        .ok()?;
    (left < margin).then(|| (svid.spiffe_id.to_string(), left))
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
                "not_after_rfc3339": humantime::format_rfc3339_seconds(s.not_after).to_string(),
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
