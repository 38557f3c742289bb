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
mod secrets;
mod validation;

pub use secrets::Naming;

use std::pin::Pin;
use std::sync::Arc;

use anyhow::Context;
use prost::Message;
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream, UnixListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status, Streaming};

use crate::config::{Endpoint, SdsSpec};
use crate::identity::{IdentityState, Snapshot};
use crate::metrics;
use crate::proto::envoy::config::core::v3::Node;
use crate::proto::envoy::extensions::transport_sockets::tls::v3::Secret;
use crate::proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use crate::proto::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
pub use secrets::SECRET_TYPE;
use secrets::{has_key, resolve_all};

/// Refusals of SDS callers (any local process, or any TCP client) are rate-limited.
static REFUSAL_LOG: crate::log_limit::LogLimiter =
    crate::log_limit::LogLimiter::new("SDS caller refused", 20, std::time::Duration::from_secs(10));

/// Largest request svidcar accepts: SDS requests are a few names, not megabytes.
const MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// Settings shared by every SDS listener.
struct Shared {
    state: Arc<IdentityState>,
    /// Names; `spiffe_validation` here is unused, each stream decides it from its node.
    naming: Naming,
    allowed_uids: Vec<u32>,
    allowed_gids: Vec<u32>,
    /// `sds.disable_spiffe_cert_validation`.
    disable_spiffe_validation: bool,
    max_streams: usize,
}

/// What a listener is, which decides how callers are checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ListenerKind {
    /// Callers identified by SO_PEERCRED; without credentials, refused.
    Unix,
    /// Callers not identified; no private keys unless `tcp_allow_keys` (loopback).
    Tcp,
}

/// One listener's service: the shared state, its kind, whether keys may go out on it,
/// and its own stream pool.
#[derive(Clone)]
struct SdsService {
    shared: Arc<Shared>,
    kind: ListenerKind,
    keys_allowed: bool,
    streams: Arc<Semaphore>,
}

type Stream<T> = Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

impl SdsService {
    /// On the unix socket, the caller must be an allowed uid or gid (when a list is
    /// set). Decided by the listener's kind, never by what the request happens to carry:
    /// a unix caller whose credentials cannot be read is refused.
    fn authorize<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let s = &self.shared;
        if self.kind == ListenerKind::Tcp {
            // No credentials to check over TCP; keys are governed by keys_allowed.
            return Ok(());
        }
        if s.allowed_uids.is_empty() && s.allowed_gids.is_empty() {
            return Ok(());
        }
        let Some(cred) = req
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|i| i.peer_cred)
        else {
            count_denied();
            if REFUSAL_LOG.allow("no_credentials") {
                tracing::warn!("SDS caller refused: no peer credentials on the unix socket");
            }
            return Err(Status::permission_denied(
                "peer credentials unavailable; this socket serves only callers in sds.allowed_uids/allowed_gids",
            ));
        };
        if s.allowed_uids.contains(&cred.uid()) || s.allowed_gids.contains(&cred.gid()) {
            return Ok(());
        }
        count_denied();
        if REFUSAL_LOG.allow("uid_not_allowed") {
            tracing::warn!(
                uid = cred.uid(),
                gid = cred.gid(),
                "SDS caller refused: uid/gid not in sds.allowed_uids/allowed_gids"
            );
        }
        Err(Status::permission_denied(format!(
            "uid {} / gid {} may not read secrets from this socket",
            cred.uid(),
            cred.gid()
        )))
    }

    /// A slot in this listener's pool; other listeners' pools are untouched.
    fn stream_permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, Status> {
        self.streams.clone().try_acquire_owned().map_err(|_| {
            metrics::get()
                .sds_requests
                .with_label_values(&["exhausted"])
                .inc();
            if REFUSAL_LOG.allow("streams_exhausted") {
                tracing::warn!(
                    listener = ?self.kind,
                    max_streams = self.shared.max_streams,
                    "SDS stream refused: this listener's streams are all in use"
                );
            }
            Status::resource_exhausted(format!(
                "too many SDS streams on this listener (sds.max_streams: {})",
                self.shared.max_streams
            ))
        })
    }

    /// The naming a request from `node` gets: the validation context chosen for it.
    fn naming_for(&self, node: Option<&Node>) -> Naming {
        let mut n = self.shared.naming.clone();
        n.spiffe_validation =
            validation::spiffe_validator_for(node, self.shared.disable_spiffe_validation);
        n
    }

    /// The secrets for `names`, minus private keys where they may not go.
    fn secrets(
        &self,
        snap: &Snapshot,
        names: &[String],
        naming: &Naming,
    ) -> Result<Vec<Secret>, Status> {
        let mut out = resolve_all(snap, names, naming);
        if !self.keys_allowed {
            let explicit = !names.iter().all(|n| n.is_empty());
            if explicit && out.iter().any(has_key) {
                return Err(keys_refused());
            }
            out.retain(|s| !has_key(s));
        }
        Ok(out)
    }
}

fn count_denied() {
    metrics::get()
        .sds_requests
        .with_label_values(&["denied"])
        .inc();
}

fn keys_refused() -> Status {
    count_denied();
    Status::permission_denied(
        "private keys are served only over the unix socket; set sds.tcp_allow_keys: true to allow TCP",
    )
}

fn log_request_kind(kind: &delta::RequestKind, node: &str) {
    let m = metrics::get();
    match kind {
        delta::RequestKind::Ack => {
            m.sds_requests.with_label_values(&["ack"]).inc();
            tracing::debug!(node, "SDS response acknowledged");
        }
        delta::RequestKind::Nack(why) => {
            m.sds_requests.with_label_values(&["nack"]).inc();
            nack_log::log_nack(node, why);
        }
        delta::RequestKind::Subscription => {}
    }
}

fn check_type(type_url: &str) -> Result<(), Status> {
    if type_url.is_empty() || type_url == SECRET_TYPE {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "unsupported type_url {type_url:?}: this server serves only {SECRET_TYPE}"
        )))
    }
}

fn response(version: u64, secrets: &[Secret]) -> DiscoveryResponse {
    DiscoveryResponse {
        version_info: version.to_string(),
        resources: secrets
            .iter()
            .map(|s| prost_types::Any {
                type_url: SECRET_TYPE.into(),
                value: s.encode_to_vec(),
            })
            .collect(),
        canary: false,
        type_url: SECRET_TYPE.into(),
        nonce: format!("{:016x}", rand::random::<u64>()),
        control_plane: None,
    }
}

/// What one state-of-the-world stream has been told.
#[derive(Default)]
struct StreamState {
    names: Option<Vec<String>>,
    nonce: Option<String>,
    sent: Vec<Secret>,
}

impl StreamState {
    /// Whether a request asks for an answer. The first request on a stream is always
    /// answered, whatever nonce or version it carries (Envoy reconnects with the ones of
    /// a previous svidcar). An ACK or NACK of the last response is not, unless it
    /// changes the names; a NACK is logged and counted, never answered with a resend.
    fn wants_answer(&mut self, r: &DiscoveryRequest) -> (delta::RequestKind, bool) {
        use delta::RequestKind::*;
        let names_changed = self.names.as_deref() != Some(r.resource_names.as_slice());
        let (kind, answer) = match (&self.nonce, &r.error_detail) {
            (None, _) => (Subscription, true),
            (Some(n), Some(e)) if *n == r.response_nonce => {
                (Nack(e.message.clone()), names_changed)
            }
            (Some(n), None) if *n == r.response_nonce => (Ack, names_changed),
            // A stale nonce: a request overtaken by a newer response. Only a new name list matters.
            (Some(_), _) => (Subscription, names_changed),
        };
        self.names = Some(r.resource_names.clone());
        (kind, answer)
    }
}

/// The requests of both xDS variants carry a type URL and a node.
trait XdsRequest: Send + 'static {
    fn type_url(&self) -> &str;
    fn node(&self) -> Option<&Node>;
}

impl XdsRequest for DiscoveryRequest {
    fn type_url(&self) -> &str {
        &self.type_url
    }
    fn node(&self) -> Option<&Node> {
        self.node.as_ref()
    }
}

impl XdsRequest for DeltaDiscoveryRequest {
    fn type_url(&self) -> &str {
        &self.type_url
    }
    fn node(&self) -> Option<&Node> {
        self.node.as_ref()
    }
}

/// One stream's protocol (state of the world or incremental): what a request and an
/// identity change produce, with the stream's naming (its validation context choice).
/// The stream task around it is the same for both.
trait StreamProtocol: Send + 'static {
    type Req: XdsRequest;
    type Resp: Send + 'static;
    fn on_request(
        &mut self,
        svc: &SdsService,
        naming: &Naming,
        r: &Self::Req,
        node: &str,
    ) -> Result<Option<Self::Resp>, Status>;
    fn on_change(
        &mut self,
        svc: &SdsService,
        naming: &Naming,
    ) -> Result<Option<Self::Resp>, Status>;
}

/// State of the world: answers requests with the full set, pushes the full set when it changed.
struct Sotw(StreamState);

impl Sotw {
    fn respond(
        &mut self,
        svc: &SdsService,
        naming: &Naming,
        force: bool,
        node: &str,
    ) -> Result<Option<DiscoveryResponse>, Status> {
        let Some(names) = self.0.names.clone() else {
            return Ok(None);
        };
        let snap = svc.shared.state.load();
        let secrets = svc.secrets(&snap, &names, naming)?;
        // An identity change that does not touch these names is not a push; a request
        // always gets its answer.
        if !force && secrets == self.0.sent {
            return Ok(None);
        }
        let resp = response(snap.version, &secrets);
        tracing::debug!(
            node,
            version = snap.version,
            resources = secrets.len(),
            spiffe_validator = naming.spiffe_validation,
            "SDS response"
        );
        self.0.nonce = Some(resp.nonce.clone());
        self.0.sent = secrets;
        Ok(Some(resp))
    }
}

impl StreamProtocol for Sotw {
    type Req = DiscoveryRequest;
    type Resp = DiscoveryResponse;

    fn on_request(
        &mut self,
        svc: &SdsService,
        naming: &Naming,
        r: &DiscoveryRequest,
        node: &str,
    ) -> Result<Option<DiscoveryResponse>, Status> {
        let (kind, answer) = self.0.wants_answer(r);
        log_request_kind(&kind, node);
        if !answer {
            return Ok(None);
        }
        self.respond(svc, naming, true, node)
    }

    fn on_change(
        &mut self,
        svc: &SdsService,
        naming: &Naming,
    ) -> Result<Option<DiscoveryResponse>, Status> {
        self.respond(svc, naming, false, "")
    }
}

/// Incremental: the DeltaState machine, plus the key policy.
struct Delta(delta::DeltaState);

impl Delta {
    fn checked(
        svc: &SdsService,
        resp: Option<DeltaDiscoveryResponse>,
    ) -> Result<Option<DeltaDiscoveryResponse>, Status> {
        if let Some(r) = &resp {
            if !svc.keys_allowed && delta::DeltaState::resources_in(r).iter().any(has_key) {
                return Err(keys_refused());
            }
            tracing::debug!(
                resources = r.resources.len(),
                removed = r.removed_resources.len(),
                "SDS delta response"
            );
        }
        Ok(resp)
    }
}

impl StreamProtocol for Delta {
    type Req = DeltaDiscoveryRequest;
    type Resp = DeltaDiscoveryResponse;

    fn on_request(
        &mut self,
        svc: &SdsService,
        naming: &Naming,
        r: &DeltaDiscoveryRequest,
        node: &str,
    ) -> Result<Option<DeltaDiscoveryResponse>, Status> {
        let (kind, resp) = self.0.on_request(r, &svc.shared.state.load(), naming);
        log_request_kind(&kind, node);
        Self::checked(svc, resp)
    }

    fn on_change(
        &mut self,
        svc: &SdsService,
        naming: &Naming,
    ) -> Result<Option<DeltaDiscoveryResponse>, Status> {
        let resp = self.0.on_change(&svc.shared.state.load(), naming);
        Self::checked(svc, resp)
    }
}

impl SdsService {
    /// Runs one xDS stream: authorization and the stream cap first, then a task that
    /// feeds requests and identity changes to `proto` until either side goes away. An
    /// error status ends this stream only.
    fn serve_stream<P: StreamProtocol>(
        &self,
        req: Request<Streaming<P::Req>>,
        mut proto: P,
    ) -> Result<Response<Stream<P::Resp>>, Status> {
        self.authorize(&req)?;
        let permit = self.stream_permit()?;
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let this = self.clone();
        let mut changes = self.shared.state.subscribe();
        tokio::spawn(async move {
            let _permit = permit;
            let active = metrics::get().sds_streams.clone();
            active.inc();
            // Envoy sends its node on the first request (often only there): the node id
            // for the log and the validation context choice hold until a request brings
            // another node.
            let mut node = String::new();
            let mut naming = this.naming_for(None);
            loop {
                let out = tokio::select! {
                    _ = tx.closed() => break,
                    msg = inbound.message() => match msg {
                        Ok(Some(r)) => {
                            if let Some(n) = r.node() {
                                node = crate::log_limit::printable(&n.id, nack_log::MAX_NODE_BYTES);
                                naming = this.naming_for(Some(n));
                            }
                            check_type(r.type_url())
                                .and_then(|()| proto.on_request(&this, &naming, &r, &node))
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::debug!(node, error = %e, "SDS stream ended");
                            break;
                        }
                    },
                    changed = changes.changed() => {
                        if changed.is_err() { break; }
                        proto.on_change(&this, &naming)
                    },
                };
                let sent = match out {
                    Ok(None) => continue,
                    Ok(Some(resp)) => {
                        metrics::get().sds_responses.inc();
                        tx.send(Ok(resp)).await
                    }
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        break;
                    }
                };
                if sent.is_err() {
                    break;
                }
            }
            active.dec();
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[tonic::async_trait]
impl SecretDiscoveryService for SdsService {
    type StreamSecretsStream = Stream<DiscoveryResponse>;
    type DeltaSecretsStream = Stream<DeltaDiscoveryResponse>;

    async fn stream_secrets(
        &self,
        req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        self.serve_stream(req, Sotw(StreamState::default()))
    }

    async fn fetch_secrets(
        &self,
        req: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        self.authorize(&req)?;
        let r = req.into_inner();
        check_type(&r.type_url)?;
        let snap = self.shared.state.load();
        let naming = self.naming_for(r.node.as_ref());
        let secrets = self.secrets(&snap, &r.resource_names, &naming)?;
        let mut resp = response(snap.version, &secrets);
        resp.nonce.clear();
        Ok(Response::new(resp))
    }

    async fn delta_secrets(
        &self,
        req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        self.serve_stream(req, Delta(delta::DeltaState::default()))
    }
}

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
    use super::delta::RequestKind;
    use super::*;
    use crate::proto::google::rpc::Status as RpcStatus;

    fn req(names: &[&str], nonce: &str, nack: bool) -> DiscoveryRequest {
        DiscoveryRequest {
            resource_names: names.iter().map(|s| s.to_string()).collect(),
            response_nonce: nonce.into(),
            error_detail: nack.then(|| RpcStatus {
                code: 3,
                message: "rejected".into(),
                details: vec![],
            }),
            ..Default::default()
        }
    }

    #[test]
    fn sotw_ack_nack_and_nonces() {
        let mut st = StreamState::default();
        // The first request is answered whatever nonce it carries (a reconnect after restart).
        assert_eq!(
            st.wants_answer(&req(&["default"], "from-old-server", false)),
            (RequestKind::Subscription, true)
        );
        st.nonce = Some("n1".into());
        // ACK of n1, same names: no answer.
        assert_eq!(
            st.wants_answer(&req(&["default"], "n1", false)),
            (RequestKind::Ack, false)
        );
        // NACK of n1: logged, never answered with the same secrets.
        assert_eq!(
            st.wants_answer(&req(&["default"], "n1", true)),
            (RequestKind::Nack("rejected".into()), false)
        );
        // ACK that changes the names: answered with the new set.
        assert_eq!(
            st.wants_answer(&req(&["default", "ROOTCA"], "n1", false)),
            (RequestKind::Ack, true)
        );
        // A stale nonce with unchanged names: ignored.
        assert_eq!(
            st.wants_answer(&req(&["default", "ROOTCA"], "n0", false)),
            (RequestKind::Subscription, false)
        );
    }

    #[test]
    fn type_urls() {
        assert!(check_type("").is_ok());
        assert!(check_type(SECRET_TYPE).is_ok());
        let e = check_type("type.googleapis.com/envoy.config.cluster.v3.Cluster").unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
    }

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
    #[test]
    fn unix_listener_refuses_callers_without_credentials() {
        let shared = Arc::new(Shared {
            state: Arc::new(IdentityState::new()),
            naming: Naming::default(),
            allowed_uids: vec![0],
            allowed_gids: vec![],
            disable_spiffe_validation: false,
            max_streams: 1,
        });
        let svc = |kind| SdsService {
            shared: shared.clone(),
            kind,
            keys_allowed: kind == ListenerKind::Unix,
            streams: Arc::new(Semaphore::new(1)),
        };
        let bare = Request::new(());
        let e = svc(ListenerKind::Unix).authorize(&bare).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("peer credentials unavailable"), "{e}");
        let mut no_cred = Request::new(());
        no_cred.extensions_mut().insert(UdsConnectInfo {
            peer_addr: None,
            peer_cred: None,
        });
        assert!(svc(ListenerKind::Unix).authorize(&no_cred).is_err());
        // TCP has no credentials by nature; its keys are governed by keys_allowed.
        assert!(svc(ListenerKind::Tcp).authorize(&bare).is_ok());
    }

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
