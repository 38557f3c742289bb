//! `/app-health/<container>/<probe>`: kubelet's `httpGet` probes, which `svidcar inject`
//! points at the admin port (kubelet has no SVID, and the app's ports take mTLS only),
//! are answered by calling the app's original probe over localhost.
//!
//! The original probes come from a JSON file (the pod annotation
//! `svidcar.io/original-probes`, mounted by the downward API), keyed `container/probe`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;

/// How long one probe call may take; kubelet applies the probe's own `timeoutSeconds`.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// One `httpGet` probe as the pod declared it (the port resolved to a number).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppProbe {
    pub port: u16,
    pub path: String,
    /// `HTTP` or `HTTPS` (as kubelet, HTTPS probes do not verify the certificate).
    pub scheme: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<ProbeHeader>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeHeader {
    pub name: String,
    pub value: String,
}

/// The probes of a pod, by `container/probe` (`app/readiness`).
#[derive(Debug, Clone, Default)]
pub struct AppProbes(BTreeMap<String, AppProbe>);

impl AppProbes {
    pub fn new(probes: BTreeMap<String, AppProbe>) -> Self {
        Self(probes)
    }

    /// Reads the file; an empty file (no probes, or the annotation absent) is no probes.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        serde_json::from_str(&text)
            .map(Self)
            .map_err(|e| format!("{}: not a probe map: {e}", path.display()))
    }

    pub fn get(&self, container: &str, probe: &str) -> Option<&AppProbe> {
        self.0.get(&format!("{container}/{probe}"))
    }
}

/// Answers one `/app-health/...` request path: the app's status, or 503 with the reason
/// when the app cannot be reached; 404 for a probe the pod does not have.
pub async fn answer(probes: &AppProbes, rest: &str) -> (StatusCode, String) {
    let mut parts = rest.splitn(2, '/');
    let (Some(container), Some(probe)) = (parts.next(), parts.next()) else {
        return (StatusCode::NOT_FOUND, "no such probe\n".into());
    };
    let Some(p) = probes.get(container, probe) else {
        return (StatusCode::NOT_FOUND, "no such probe\n".into());
    };
    match tokio::time::timeout(PROBE_TIMEOUT, call(p)).await {
        Ok(Ok(status)) => (status, format!("app answered {}\n", status.as_u16())),
        Ok(Err(e)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("app probe failed: {e}\n"),
        ),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "app probe timed out\n".into(),
        ),
    }
}

async fn call(p: &AppProbe) -> Result<StatusCode, String> {
    let tcp = TcpStream::connect(("127.0.0.1", p.port))
        .await
        .map_err(|e| format!("connect to 127.0.0.1:{}: {e}", p.port))?;
    let mut req = Request::get(p.path.as_str())
        .header(http::header::HOST, format!("127.0.0.1:{}", p.port))
        .header(http::header::USER_AGENT, "kube-probe (svidcar)");
    for h in &p.headers {
        req = req.header(h.name.as_str(), h.value.as_str());
    }
    let req = req
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("bad probe request: {e}"))?;
    if p.scheme.eq_ignore_ascii_case("HTTPS") {
        let config = crate::tls::probe_client_config().map_err(|e| format!("TLS config: {e}"))?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(
                rustls_pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
                tcp,
            )
            .await
            .map_err(|e| format!("TLS to the app: {e}"))?;
        send(TokioIo::new(tls), req).await
    } else {
        send(TokioIo::new(tcp), req).await
    }
}

async fn send<T>(io: T, req: Request<Empty<Bytes>>) -> Result<StatusCode, String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP to the app: {e}"))?;
    tokio::spawn(conn);
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("HTTP to the app: {e}"))?;
    let status = resp.status();
    // Read (and drop) the body so the app sees a complete exchange.
    let _ = resp.into_body().collect().await;
    Ok(status)
}
