//! The HTTPS server: one POST path, bodies up to 4 MiB (the API server's own limit is
//! 3 MiB for an object), a timeout on every read, errors logged and answered.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::config::WebhookConfig;
use super::review::review;
use super::tls_files::FileCert;

const MAX_BODY: usize = 4 * 1024 * 1024;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// `svidcar webhook --config FILE`: serves until SIGTERM or Ctrl-C.
pub fn run(path: &Path) -> anyhow::Result<()> {
    let config = WebhookConfig::load(path)?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(serve(config))
}

async fn serve(config: WebhookConfig) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let cert = FileCert::start(
        config.tls.cert.clone(),
        config.tls.key.clone(),
        shutdown.clone(),
    )?;
    let mut tls = rustls::ServerConfig::builder_with_provider(crate::crypto::provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("listen: cannot bind {}: {e}", config.listen))?;
    tracing::info!(listen = %config.listen, path = %config.path, "webhook listening");
    let config = Arc::new(config);
    let stop = shutdown.clone();
    tokio::spawn(async move {
        crate::signals::wait_for_signal().await;
        stop.cancel();
    });
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    crate::net::accept::recover("webhook", e).await?;
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let config = config.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "webhook TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let svc = hyper::service::service_fn(move |req| {
                let config = config.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(req, &config).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(tls), svc)
                .await;
        });
    }
}

fn json_reply(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

async fn handle(req: Request<Incoming>, config: &WebhookConfig) -> Response<Full<Bytes>> {
    if req.uri().path() == "/healthz" {
        return json_reply(StatusCode::OK, &serde_json::json!({"status": "ok"}));
    }
    if req.uri().path() != config.path {
        return json_reply(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": "not found"}),
        );
    }
    if req.method() != Method::POST {
        return json_reply(
            StatusCode::METHOD_NOT_ALLOWED,
            &serde_json::json!({"error": "POST an AdmissionReview"}),
        );
    }
    let body = Limited::new(req.into_body(), MAX_BODY);
    let body = match tokio::time::timeout(BODY_TIMEOUT, body.collect()).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) => {
            return json_reply(
                StatusCode::PAYLOAD_TOO_LARGE,
                &serde_json::json!({"error": format!("body: {e}")}),
            )
        }
        Err(_) => {
            return json_reply(
                StatusCode::REQUEST_TIMEOUT,
                &serde_json::json!({"error": "body too slow"}),
            )
        }
    };
    let opts = config.inject.clone();
    let on_error = config.on_error;
    // Injection is CPU work on a small document; off the runtime all the same.
    let answer = match tokio::task::spawn_blocking(move || review(&body, &opts, on_error)).await {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "review failed");
            return json_reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                &serde_json::json!({"error": "internal error"}),
            );
        }
    };
    tracing::info!(status = answer.status, "{}", answer.summary);
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_REQUEST);
    json_reply(status, &answer.body)
}
