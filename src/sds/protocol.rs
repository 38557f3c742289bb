//! The two xDS stream protocols SDS speaks, state of the world and incremental, over
//! one view of the secrets: what a request or an identity change produces, whether it
//! is an ACK or a NACK, and the key policy. The stream task that drives them is in
//! `service.rs`.

use prost::Message;
use tonic::Status;

use super::secrets::{has_key, resolve_all, Naming, SECRET_TYPE};
use super::{delta, nack_log};
use crate::identity::{IdentityState, Snapshot};
use crate::metrics;
use crate::proto::envoy::config::core::v3::Node;
use crate::proto::envoy::extensions::transport_sockets::tls::v3::Secret;
use crate::proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};

/// What one listener's streams may see: the live identity, and whether private keys
/// may go out on it.
pub(super) struct SecretView<'a> {
    pub state: &'a IdentityState,
    pub keys_allowed: bool,
}

impl SecretView<'_> {
    /// The secrets for `names`, minus private keys where they may not go.
    pub(super) fn secrets(
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

pub(super) fn count_denied() {
    metrics::get()
        .sds_requests
        .with_label_values(&["denied"])
        .inc();
}

pub(super) fn keys_refused() -> Status {
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

pub(super) fn check_type(type_url: &str) -> Result<(), Status> {
    if type_url.is_empty() || type_url == SECRET_TYPE {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "unsupported type_url {type_url:?}: this server serves only {SECRET_TYPE}"
        )))
    }
}

pub(super) fn response(version: u64, secrets: &[Secret]) -> DiscoveryResponse {
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
pub(super) struct StreamState {
    names: Option<Vec<String>>,
    nonce: Option<String>,
    sent: Vec<Secret>,
}

impl StreamState {
    /// Whether a request asks for an answer. The first request on a stream is always
    /// answered, whatever nonce or version it carries (Envoy reconnects with the ones of
    /// a previous svidcar). An ACK or NACK of the last response is not, unless it
    /// changes the names; a NACK is logged and counted, never answered with a resend.
    pub(super) fn wants_answer(&mut self, r: &DiscoveryRequest) -> (delta::RequestKind, bool) {
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
pub(super) trait XdsRequest: Send + 'static {
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
pub(super) trait StreamProtocol: Send + 'static {
    type Req: XdsRequest;
    type Resp: Send + 'static;
    fn on_request(
        &mut self,
        svc: &SecretView<'_>,
        naming: &Naming,
        r: &Self::Req,
        node: &str,
    ) -> Result<Option<Self::Resp>, Status>;
    fn on_change(
        &mut self,
        svc: &SecretView<'_>,
        naming: &Naming,
    ) -> Result<Option<Self::Resp>, Status>;
}

/// State of the world: answers requests with the full set, pushes the full set when it changed.
pub(super) struct Sotw(pub(super) StreamState);

impl Sotw {
    fn respond(
        &mut self,
        svc: &SecretView<'_>,
        naming: &Naming,
        force: bool,
        node: &str,
    ) -> Result<Option<DiscoveryResponse>, Status> {
        let Some(names) = self.0.names.clone() else {
            return Ok(None);
        };
        let snap = svc.state.load();
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
        svc: &SecretView<'_>,
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
        svc: &SecretView<'_>,
        naming: &Naming,
    ) -> Result<Option<DiscoveryResponse>, Status> {
        self.respond(svc, naming, false, "")
    }
}

/// Incremental: the DeltaState machine, plus the key policy.
pub(super) struct Delta(pub(super) delta::DeltaState);

impl Delta {
    fn checked(
        svc: &SecretView<'_>,
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
        svc: &SecretView<'_>,
        naming: &Naming,
        r: &DeltaDiscoveryRequest,
        node: &str,
    ) -> Result<Option<DeltaDiscoveryResponse>, Status> {
        let (kind, resp) = self.0.on_request(r, &svc.state.load(), naming);
        log_request_kind(&kind, node);
        Self::checked(svc, resp)
    }

    fn on_change(
        &mut self,
        svc: &SecretView<'_>,
        naming: &Naming,
    ) -> Result<Option<DeltaDiscoveryResponse>, Status> {
        let resp = self.0.on_change(&svc.state.load(), naming);
        Self::checked(svc, resp)
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
}

#[cfg(test)]
mod properties {
    //! State-of-the-world streams driven by any sequence of names, nonces and NACKs:
    //! the first request is always answered; later ones exactly when their name list
    //! differs from the one before (an ACK or a NACK of the same list never is, so a
    //! client that NACKs cannot make svidcar loop); any type URL is judged without panic.
    use super::delta::RequestKind;
    use super::*;
    use crate::proto::google::rpc::Status as RpcStatus;
    use proptest::prelude::*;

    const NAMES: &[&str] = &[
        "default",
        "ROOTCA",
        "ALL",
        "spiffe://example.org",
        "",
        "*",
        "nope",
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn any_request_sequence(steps in prop::collection::vec((prop::collection::vec(prop::sample::select(NAMES), 0..3), 0..3u8, any::<bool>()), 1..12)) {
            let mut st = StreamState::default();
            let mut last: Option<Vec<String>> = None;
            for (i, (names, nonce, nack)) in steps.into_iter().enumerate() {
                let r = DiscoveryRequest {
                    resource_names: names.iter().map(|s| s.to_string()).collect(),
                    // 0: the last nonce sent, 1: a stale one, 2: none.
                    response_nonce: match nonce { 0 => format!("n{i}"), 1 => "stale".into(), _ => String::new() },
                    error_detail: nack.then(|| RpcStatus { code: 3, message: "no".into(), details: vec![] }),
                    ..Default::default()
                };
                let (kind, answer) = st.wants_answer(&r);
                let changed = last.as_ref() != Some(&r.resource_names);
                prop_assert_eq!(answer, i == 0 || changed, "step {}: {:?}", i, kind);
                if i == 0 {
                    prop_assert_eq!(kind, RequestKind::Subscription);
                }
                last = Some(r.resource_names.clone());
                // svidcar answered (or not) with nonce n{i+1}.
                st.nonce = Some(format!("n{}", i + 1));
            }
        }

        #[test]
        fn type_urls(url in any::<String>()) {
            let ok = check_type(&url).is_ok();
            prop_assert_eq!(ok, url.is_empty() || url == SECRET_TYPE);
        }
    }
}
