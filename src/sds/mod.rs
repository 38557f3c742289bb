//! Envoy's Secret Discovery Service (v3), served from the live identity state: SVIDs
//! and bundles under SPIRE Agent's resource names, pushed to every open stream when
//! they change.
//!
//! Private keys travel only over the unix socket (mode and peer credentials checked),
//! unless `sds.tcp_allow_keys` says otherwise.

mod delta;
mod secrets;

pub use secrets::Naming;

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use anyhow::Context;
use prost::Message;
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream, UnixListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status, Streaming};

use crate::config::{SdsConfig, SdsListen};
use crate::identity::{IdentityState, Snapshot};
use crate::metrics;
use crate::proto::envoy::extensions::transport_sockets::tls::v3::Secret;
use crate::proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use crate::proto::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use secrets::{has_key, resolve_all, SECRET_TYPE};

/// Largest request svidcar accepts: SDS requests are a few names, not megabytes.
const MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// Settings shared by every SDS listener.
struct Shared {
    state: Arc<IdentityState>,
    naming: Naming,
    allowed_uids: Vec<u32>,
    allowed_gids: Vec<u32>,
    streams: Arc<Semaphore>,
    max_streams: usize,
}

/// One listener's service: the same state, and whether keys may go out on it.
#[derive(Clone)]
struct SdsService {
    shared: Arc<Shared>,
    keys_allowed: bool,
}

type Stream<T> = Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

impl SdsService {
    /// On the unix socket, the caller must be an allowed uid or gid (when a list is set).
    fn authorize<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let s = &self.shared;
        if s.allowed_uids.is_empty() && s.allowed_gids.is_empty() {
            return Ok(());
        }
        let Some(cred) = req
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|i| i.peer_cred)
        else {
            // TCP: no credentials to check; keys are governed by keys_allowed.
            return Ok(());
        };
        if s.allowed_uids.contains(&cred.uid()) || s.allowed_gids.contains(&cred.gid()) {
            return Ok(());
        }
        metrics::get()
            .sds_requests
            .with_label_values(&["denied"])
            .inc();
        tracing::warn!(
            uid = cred.uid(),
            gid = cred.gid(),
            "SDS caller refused: uid/gid not in sds.allowed_uids/allowed_gids"
        );
        Err(Status::permission_denied(format!(
            "uid {} / gid {} may not read secrets from this socket",
            cred.uid(),
            cred.gid()
        )))
    }

    fn stream_permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, Status> {
        self.shared
            .streams
            .clone()
            .try_acquire_owned()
            .map_err(|_| {
                Status::resource_exhausted(format!(
                    "too many SDS streams (sds.max_streams: {})",
                    self.shared.max_streams
                ))
            })
    }

    /// The secrets for `names`, minus private keys where they may not go.
    fn secrets(&self, snap: &Snapshot, names: &[String]) -> Result<Vec<Secret>, Status> {
        let mut out = resolve_all(snap, names, &self.shared.naming);
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

fn keys_refused() -> Status {
    metrics::get()
        .sds_requests
        .with_label_values(&["denied"])
        .inc();
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
            tracing::warn!(node, error = %why, "Envoy rejected SDS response (NACK)");
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
    fn node_id(&self) -> Option<&str>;
}

impl XdsRequest for DiscoveryRequest {
    fn type_url(&self) -> &str {
        &self.type_url
    }
    fn node_id(&self) -> Option<&str> {
        self.node.as_ref().map(|n| n.id.as_str())
    }
}

impl XdsRequest for DeltaDiscoveryRequest {
    fn type_url(&self) -> &str {
        &self.type_url
    }
    fn node_id(&self) -> Option<&str> {
        self.node.as_ref().map(|n| n.id.as_str())
    }
}

/// One stream's protocol (state of the world or incremental): what a request and an
/// identity change produce. The stream task around it is the same for both.
trait StreamProtocol: Send + 'static {
    type Req: XdsRequest;
    type Resp: Send + 'static;
    fn on_request(
        &mut self,
        svc: &SdsService,
        r: &Self::Req,
        node: &str,
    ) -> Result<Option<Self::Resp>, Status>;
    fn on_change(&mut self, svc: &SdsService) -> Result<Option<Self::Resp>, Status>;
}

/// State of the world: answers requests with the full set, pushes the full set when it changed.
struct Sotw(StreamState);

impl Sotw {
    fn respond(
        &mut self,
        svc: &SdsService,
        force: bool,
        node: &str,
    ) -> Result<Option<DiscoveryResponse>, Status> {
        let Some(names) = self.0.names.clone() else {
            return Ok(None);
        };
        let snap = svc.shared.state.load();
        let secrets = svc.secrets(&snap, &names)?;
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
        r: &DiscoveryRequest,
        node: &str,
    ) -> Result<Option<DiscoveryResponse>, Status> {
        let (kind, answer) = self.0.wants_answer(r);
        log_request_kind(&kind, node);
        if !answer {
            return Ok(None);
        }
        self.respond(svc, true, node)
    }

    fn on_change(&mut self, svc: &SdsService) -> Result<Option<DiscoveryResponse>, Status> {
        self.respond(svc, false, "")
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
        r: &DeltaDiscoveryRequest,
        node: &str,
    ) -> Result<Option<DeltaDiscoveryResponse>, Status> {
        let (kind, resp) = self
            .0
            .on_request(r, &svc.shared.state.load(), &svc.shared.naming);
        log_request_kind(&kind, node);
        Self::checked(svc, resp)
    }

    fn on_change(&mut self, svc: &SdsService) -> Result<Option<DeltaDiscoveryResponse>, Status> {
        let resp = self
            .0
            .on_change(&svc.shared.state.load(), &svc.shared.naming);
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
            let mut node = String::new();
            loop {
                let out = tokio::select! {
                    _ = tx.closed() => break,
                    msg = inbound.message() => match msg {
                        Ok(Some(r)) => {
                            if let Some(id) = r.node_id() {
                                node = id.to_string();
                            }
                            check_type(r.type_url()).and_then(|()| proto.on_request(&this, &r, &node))
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::debug!(node, error = %e, "SDS stream ended");
                            break;
                        }
                    },
                    changed = changes.changed() => {
                        if changed.is_err() { break; }
                        proto.on_change(&this)
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
        let secrets = self.secrets(&snap, &r.resource_names)?;
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

/// Starts every SDS listener; they stop on `shutdown`.
pub async fn start(
    config: &SdsConfig,
    state: Arc<IdentityState>,
    shutdown: CancellationToken,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let (listens, mode) = config.validate()?;
    let shared = Arc::new(Shared {
        state,
        naming: Naming {
            default_svid: config.default_svid_name.clone(),
            default_bundle: config.default_bundle_name.clone(),
            all_bundles: config.default_all_bundles_name.clone(),
            spiffe_validation: config.spiffe_cert_validation,
        },
        allowed_uids: config.allowed_uids.clone(),
        allowed_gids: config.allowed_gids.clone(),
        streams: Arc::new(Semaphore::new(config.max_streams)),
        max_streams: config.max_streams,
    });
    let mut tasks = Vec::new();
    for l in listens {
        let keys_allowed = matches!(l, SdsListen::Unix(_)) || config.tcp_allow_keys;
        let svc = SecretDiscoveryServiceServer::new(SdsService {
            shared: shared.clone(),
            keys_allowed,
        })
        .max_decoding_message_size(MAX_REQUEST_BYTES);
        let stop = shutdown.clone();
        let server = tonic::transport::Server::builder().add_service(svc);
        match l {
            SdsListen::Unix(path) => {
                let listener = crate::unix_socket::bind(&path, mode).context("sds.listen")?;
                tracing::info!(socket = %path.display(), mode = format!("{mode:o}"), "SDS listening");
                tasks.push(tokio::spawn(async move {
                    let r = server
                        .serve_with_incoming_shutdown(
                            crate::h2_authority::incoming(UnixListenerStream::new(listener)),
                            stop.cancelled_owned(),
                        )
                        .await;
                    if let Err(e) = r {
                        tracing::error!(error = %e, "SDS server (unix) failed");
                    }
                    let _ = std::fs::remove_file(&path);
                }));
            }
            SdsListen::Tcp(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("sds.listen: cannot bind {addr}"))?;
                tracing::info!(%addr, keys = keys_allowed, "SDS listening");
                tasks.push(tokio::spawn(async move {
                    let r = server
                        .serve_with_incoming_shutdown(
                            TcpListenerStream::new(listener),
                            stop.cancelled_owned(),
                        )
                        .await;
                    if let Err(e) = r {
                        tracing::error!(error = %e, "SDS server (tcp) failed");
                    }
                }));
            }
        }
    }
    Ok(tasks)
}

/// `svidcar sds-fetch`: one FetchSecrets call, printed without key material; for
/// checking what an Envoy would get from a socket.
pub async fn fetch_and_print(addr: &str, names: Vec<String>) -> anyhow::Result<()> {
    use crate::proto::envoy::extensions::transport_sockets::tls::v3::secret::Type;
    use crate::proto::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
    let channel = if let Some(path) = addr.strip_prefix("unix://") {
        crate::unix_socket::channel(Path::new(path))?
    } else if let Some(hp) = addr.strip_prefix("tcp://") {
        tonic::transport::Endpoint::try_from(format!("http://{hp}"))?.connect_lazy()
    } else {
        anyhow::bail!("--socket: {addr:?}: expected unix:///path or tcp://IP:PORT");
    };
    let req = DiscoveryRequest {
        resource_names: names,
        type_url: SECRET_TYPE.into(),
        ..Default::default()
    };
    let resp = SecretDiscoveryServiceClient::new(channel)
        .fetch_secrets(req)
        .await
        .map_err(|e| anyhow::anyhow!("{:?}: {}", e.code(), e.message()))?
        .into_inner();
    println!("version {}", resp.version_info);
    for any in resp.resources {
        let s = Secret::decode(any.value.as_slice())?;
        match s.r#type {
            Some(Type::TlsCertificate(t)) => {
                let pem = match t.certificate_chain.and_then(|d| d.specifier) {
                    Some(
                        crate::proto::envoy::config::core::v3::data_source::Specifier::InlineBytes(
                            b,
                        ),
                    ) => b,
                    _ => vec![],
                };
                let leaf = crate::identity::pem::certs(Path::new("<sds>"), &pem)
                    .ok()
                    .and_then(|c| c.into_iter().next());
                let info = leaf.and_then(|l| crate::x509::LeafInfo::parse(&l).ok());
                match info {
                    Some(i) => println!(
                        "{} tls_certificate {} serial {}",
                        s.name, i.spiffe_id, i.serial
                    ),
                    None => println!("{} tls_certificate (unreadable chain)", s.name),
                }
            }
            Some(Type::ValidationContext(v)) => {
                let kind = if v.custom_validator_config.is_some() {
                    "spiffe_validator"
                } else {
                    "trusted_ca"
                };
                println!("{} validation_context {kind}", s.name);
            }
            None => println!("{} (empty)", s.name),
        }
    }
    Ok(())
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
        let config: SdsConfig = serde_norway::from_str(&yaml).unwrap();
        let stop = CancellationToken::new();
        let _tasks = start(&config, state.clone(), stop.clone()).await.unwrap();

        let mut client =
            SecretDiscoveryServiceClient::new(crate::unix_socket::channel(&sock).unwrap());
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
        let config: SdsConfig = serde_norway::from_str(&yaml).unwrap();
        let stop = CancellationToken::new();
        let _tasks = start(&config, state, stop.clone()).await.unwrap();
        let mut client =
            SecretDiscoveryServiceClient::new(crate::unix_socket::channel(&sock).unwrap());
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
