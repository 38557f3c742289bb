//! One SDS listener's gRPC service: who may call (peer credentials on the unix socket),
//! how many streams it may hold, and the task that drives each stream's protocol.

use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status, Streaming};

use super::protocol::{
    check_type, count_denied, response, Delta, SecretView, Sotw, StreamProtocol, StreamState,
    XdsRequest,
};
use super::secrets::Naming;
use super::{delta, nack_log, validation};
use crate::identity::IdentityState;
use crate::metrics;
use crate::proto::envoy::config::core::v3::Node;
use crate::proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use crate::proto::envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryService;

/// Refusals of SDS callers (any local process, or any TCP client) are rate-limited.
pub(super) static REFUSAL_LOG: crate::log_limit::LogLimiter =
    crate::log_limit::LogLimiter::new("SDS caller refused", 20, std::time::Duration::from_secs(10));

/// Largest request svidcar accepts: SDS requests are a few names, not megabytes.
pub(super) const MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// Settings shared by every SDS listener.
pub(super) struct Shared {
    pub(super) state: Arc<IdentityState>,
    /// Names; `spiffe_validation` here is unused, each stream decides it from its node.
    pub(super) naming: Naming,
    pub(super) allowed_uids: Vec<u32>,
    pub(super) allowed_gids: Vec<u32>,
    /// `sds.disable_spiffe_cert_validation`.
    pub(super) disable_spiffe_validation: bool,
    pub(super) max_streams: usize,
}

/// What a listener is, which decides how callers are checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ListenerKind {
    /// Callers identified by SO_PEERCRED; without credentials, refused.
    Unix,
    /// Callers not identified; no private keys unless `tcp_allow_keys` (loopback).
    Tcp,
}

/// One listener's service: the shared state, its kind, whether keys may go out on it,
/// and its own stream pool.
#[derive(Clone)]
pub(super) struct SdsService {
    pub(super) shared: Arc<Shared>,
    pub(super) kind: ListenerKind,
    pub(super) keys_allowed: bool,
    pub(super) streams: Arc<Semaphore>,
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

    /// What streams of this listener may see.
    pub(super) fn view(&self) -> SecretView<'_> {
        SecretView {
            state: &self.shared.state,
            keys_allowed: self.keys_allowed,
        }
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
                                .and_then(|()| proto.on_request(&this.view(), &naming, &r, &node))
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::debug!(node, error = %e, "SDS stream ended");
                            break;
                        }
                    },
                    changed = changes.changed() => {
                        if changed.is_err() { break; }
                        proto.on_change(&this.view(), &naming)
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
        let secrets = self.view().secrets(&snap, &r.resource_names, &naming)?;
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
