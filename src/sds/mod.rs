//! Envoy's Secret Discovery Service (v3), served from the live identity state: SVIDs
//! and bundles under SPIRE Agent's resource names, pushed to every open stream when
//! they change.
//!
//! Private keys travel only over the unix socket (mode and peer credentials checked),
//! unless `sds.tcp_allow_keys` says otherwise (loopback only). Each listener has its
//! own stream pool and every connection a stream cap, so TCP clients cannot starve the
//! Envoy on the socket. Bundles go out with Envoy's SPIFFE validator or as
//! `trusted_ca`, chosen per stream from the Envoy's node as SPIRE Agent does
//! (validation.rs). Text from clients is escaped, truncated and rate-limited before it
//! reaches the log (nack_log.rs).

mod delta;
mod nack_log;
mod protocol;
mod secrets;
mod service;
mod validation;

pub use secrets::{Naming, SECRET_TYPE};

use std::sync::Arc;

use anyhow::Context;
use tokio::sync::Semaphore;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tokio_util::sync::CancellationToken;

use crate::config::{Endpoint, SdsSpec};
use crate::identity::IdentityState;
use crate::proto::envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryServiceServer;
use service::{ListenerKind, SdsService, Shared, MAX_REQUEST_BYTES};

/// Starts every SDS listener; they stop on `shutdown`. A unix socket is removed when
/// its task ends or is dropped (graceful stop, abort after the drain, runtime teardown),
/// so callers need nothing more than to stop or abort the returned tasks.
pub async fn start(
    config: &SdsSpec,
    state: Arc<IdentityState>,
    shutdown: CancellationToken,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<String>>> {
    let mode = config.socket_mode;
    let shared = Arc::new(Shared {
        state,
        naming: Naming {
            default_svid: config.default_svid_name.clone(),
            default_bundle: config.default_bundle_name.clone(),
            all_bundles: config.all_bundles_name.clone(),
            spiffe_validation: false,
        },
        allowed_uids: config.allowed_uids.clone(),
        allowed_gids: config.allowed_gids.clone(),
        disable_spiffe_validation: config.disable_spiffe_cert_validation,
        max_streams: config.max_streams,
    });
    let per_connection = config.streams_per_connection;
    let mut tasks = Vec::new();
    for l in config.listen.iter().cloned() {
        let kind = match l {
            Endpoint::Unix(_) => ListenerKind::Unix,
            Endpoint::Tcp(_) => ListenerKind::Tcp,
        };
        let keys_allowed = kind == ListenerKind::Unix || config.tcp_allow_keys;
        let svc = SecretDiscoveryServiceServer::new(SdsService {
            shared: shared.clone(),
            kind,
            keys_allowed,
            streams: Arc::new(Semaphore::new(config.max_streams)),
        })
        .max_decoding_message_size(MAX_REQUEST_BYTES);
        let stop = shutdown.clone();
        // One connection can hold at most `per_connection` streams (HTTP/2 settings), so
        // a single client cannot take a whole listener's pool by itself.
        let server = tonic::transport::Server::builder()
            .max_concurrent_streams(per_connection)
            .add_service(svc);
        match l {
            Endpoint::Unix(path) => {
                let listener = crate::net::unix::bind(&path, mode).context("sds.listen")?;
                let guard = crate::net::unix::SocketGuard::new(&path);
                tracing::info!(socket = %path.display(), mode = format!("{mode:o}"), "SDS listening");
                let at = format!("unix://{}", path.display());
                tasks.push(tokio::spawn(async move {
                    let _remove_socket_when_done = guard;
                    let incoming = crate::h2_authority::incoming(UnixListenerStream::new(listener));
                    serve_until_stopped(server, incoming, at, stop).await
                }));
            }
            Endpoint::Tcp(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("sds.listen: cannot bind {addr}"))?;
                tracing::info!(%addr, keys = keys_allowed, "SDS listening");
                let incoming = TcpListenerStream::new(listener);
                let at = format!("tcp://{addr}");
                tasks.push(tokio::spawn(serve_until_stopped(
                    server, incoming, at, stop,
                )));
            }
        }
    }
    Ok(tasks)
}

/// Runs one SDS server until `stop`; returns why it ended, for the supervisor (a server
/// that ends before `stop` stops the process).
async fn serve_until_stopped<I, IO>(
    server: tonic::transport::server::Router,
    incoming: I,
    at: String,
    stop: CancellationToken,
) -> String
where
    I: tokio_stream::Stream<Item = std::io::Result<IO>> + Unpin,
    IO: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static,
{
    let (incoming, fatal) = crate::net::accept::guard("sds", incoming);
    let serve = server.serve_with_incoming_shutdown(incoming, stop.clone().cancelled_owned());
    tokio::select! {
        r = serve => match r {
            Ok(()) if stop.is_cancelled() => format!("SDS server {at} stopped"),
            Ok(()) => format!("SDS server {at} stopped unexpectedly"),
            Err(e) => format!("SDS server {at} failed: {e}"),
        },
        Ok(e) = fatal => format!("SDS server {at} failed: cannot accept: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::ReceiverStream;

    /// A rotation reaches an open stream without any request: measured here, end to
    /// end over the unix socket (the figure goes to the test output, not an assertion).
    #[tokio::test]
    async fn rotation_is_pushed_to_open_streams() {
        use crate::identity::dev_ca::DevCa;
        use crate::identity::IdentityUpdate;
        use crate::proto::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
        use std::time::{Duration, Instant};

        let dir = tempfile::tempdir().unwrap();
        let td = crate::spiffe::parse_trust_domain("example.org").unwrap();
        let id = crate::spiffe::parse_spiffe_id("spiffe://example.org/web").unwrap();
        let ca = DevCa::generate(&td, Duration::from_secs(3600)).unwrap();
        let update = |ca: &DevCa| IdentityUpdate {
            svids: vec![Arc::new(ca.mint(&id, Duration::from_secs(60)).unwrap())],
            bundles: vec![Arc::new(ca.bundle().unwrap())],
        };
        let state = Arc::new(IdentityState::new());
        state.publish(update(&ca));
        let sock = dir.path().join("sds.sock");
        let yaml = format!("listen: unix://{}", sock.display());
        let config: crate::config::raw::SdsConfig = serde_norway::from_str(&yaml).unwrap();
        let config = config.spec().unwrap();
        let stop = CancellationToken::new();
        let _tasks = start(&config, state.clone(), stop.clone()).await.unwrap();

        let mut client =
            SecretDiscoveryServiceClient::new(crate::net::unix::channel(&sock).unwrap());
        let (tx, rx) = mpsc::channel(4);
        tx.send(DiscoveryRequest {
            resource_names: vec!["default".into()],
            ..Default::default()
        })
        .await
        .unwrap();
        let mut responses = client
            .stream_secrets(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let first = responses.message().await.unwrap().unwrap();
        assert_eq!(first.version_info, "1");
        // ACK it, as Envoy does.
        tx.send(DiscoveryRequest {
            resource_names: vec!["default".into()],
            response_nonce: first.nonce.clone(),
            version_info: first.version_info.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
        let t0 = Instant::now();
        state.publish(update(&ca));
        let push = tokio::time::timeout(Duration::from_secs(5), responses.message())
            .await
            .expect("push arrives")
            .unwrap()
            .unwrap();
        let latency = t0.elapsed();
        eprintln!("SDS push latency after a rotation: {latency:?}");
        assert_eq!(push.version_info, "2");
        assert_ne!(push.nonce, first.nonce);
        assert_ne!(push.resources, first.resources);
        stop.cancel();
    }

    /// The unix listener fails closed: a request without peer credentials (which tonic
    /// attaches to every unix connection) is refused, not waved through as TCP.
    /// Peer credentials are checked on every RPC, streams included.
    #[tokio::test]
    async fn all_rpcs_check_peer_credentials() {
        use crate::proto::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
        let dir = tempfile::tempdir().unwrap();
        let state = Arc::new(IdentityState::new());
        let sock = dir.path().join("sds.sock");
        // This test runs as some uid; allow only another one.
        let me = std::fs::metadata(dir.path())
            .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
            .unwrap();
        let yaml = format!(
            "listen: unix://{}\nallowed_uids: [{}]",
            sock.display(),
            me + 4242
        );
        let config: crate::config::raw::SdsConfig = serde_norway::from_str(&yaml).unwrap();
        let config = config.spec().unwrap();
        let stop = CancellationToken::new();
        let _tasks = start(&config, state, stop.clone()).await.unwrap();
        let mut client =
            SecretDiscoveryServiceClient::new(crate::net::unix::channel(&sock).unwrap());
        let req = || DiscoveryRequest {
            resource_names: vec!["default".into()],
            ..Default::default()
        };
        let fetch = client.fetch_secrets(req()).await.unwrap_err();
        assert_eq!(fetch.code(), tonic::Code::PermissionDenied);
        let sotw = client
            .stream_secrets(tokio_stream::iter(vec![req()]))
            .await
            .unwrap_err();
        assert_eq!(sotw.code(), tonic::Code::PermissionDenied);
        let delta = client
            .delta_secrets(tokio_stream::iter(vec![DeltaDiscoveryRequest::default()]))
            .await
            .unwrap_err();
        assert_eq!(delta.code(), tonic::Code::PermissionDenied);
        stop.cancel();
    }
}
