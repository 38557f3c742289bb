//! Incremental SDS (DeltaSecrets): per-name subscriptions, per-resource versions, and
//! removals, as a pure state machine the stream task drives.
//!
//! A resource's version is a digest of its content, so it is the same across svidcar
//! restarts: Envoy reconnecting with `initial_resource_versions` is not sent again what
//! it already has.

use std::collections::{BTreeMap, BTreeSet};

use prost::Message;

use super::secrets::{all_names, resolve, Naming, SECRET_TYPE};
use crate::identity::Snapshot;
use crate::proto::envoy::extensions::transport_sockets::tls::v3::Secret;
use crate::proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};

/// What one delta stream subscribed to and has been sent.
#[derive(Debug, Default)]
pub struct DeltaState {
    started: bool,
    wildcard: bool,
    names: BTreeSet<String>,
    /// name → version Envoy holds.
    sent: BTreeMap<String, String>,
    pub nonce: Option<String>,
}

/// What a request was, for logs and metrics.
#[derive(Debug, PartialEq, Eq)]
pub enum RequestKind {
    Ack,
    Nack(String),
    Subscription,
}

pub fn version_of(secret: &Secret) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &secret.encode_to_vec());
    digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl DeltaState {
    /// Applies a request; returns its kind and the response to send, if any.
    pub fn on_request(
        &mut self,
        r: &DeltaDiscoveryRequest,
        snap: &Snapshot,
        naming: &Naming,
    ) -> (RequestKind, Option<DeltaDiscoveryResponse>) {
        let kind = match (&self.nonce, &r.error_detail) {
            (Some(n), Some(e)) if *n == r.response_nonce => RequestKind::Nack(e.message.clone()),
            (Some(n), None) if *n == r.response_nonce => RequestKind::Ack,
            _ => RequestKind::Subscription,
        };
        let mut force: BTreeSet<String> = BTreeSet::new();
        if !self.started {
            self.started = true;
            // Envoy after a reconnect: what it holds need not be sent again.
            self.sent = r.initial_resource_versions.clone().into_iter().collect();
            self.wildcard = r.resource_names_subscribe.is_empty();
        }
        for n in &r.resource_names_subscribe {
            if n == "*" {
                self.wildcard = true;
                continue;
            }
            // A repeat subscription is answered again, even if unchanged.
            if !self.names.insert(n.clone()) && self.sent.contains_key(n) {
                force.insert(n.clone());
            }
        }
        for n in &r.resource_names_unsubscribe {
            if n == "*" {
                self.wildcard = false;
            }
            self.names.remove(n);
            self.sent.remove(n);
        }
        let resp = self.diff(snap, naming, &force);
        (kind, resp)
    }

    /// After an identity change: what changed for this stream, if anything.
    pub fn on_change(
        &mut self,
        snap: &Snapshot,
        naming: &Naming,
    ) -> Option<DeltaDiscoveryResponse> {
        if !self.started {
            return None;
        }
        self.diff(snap, naming, &BTreeSet::new())
    }

    fn wanted(&self, snap: &Snapshot, naming: &Naming) -> BTreeSet<String> {
        let mut w = self.names.clone();
        if self.wildcard {
            w.extend(all_names(snap, naming));
        }
        w
    }

    fn diff(
        &mut self,
        snap: &Snapshot,
        naming: &Naming,
        force: &BTreeSet<String>,
    ) -> Option<DeltaDiscoveryResponse> {
        let mut resources = Vec::new();
        let mut removed = Vec::new();
        for name in self.wanted(snap, naming) {
            match resolve(snap, &name, naming) {
                Some(secret) => {
                    let version = version_of(&secret);
                    if force.contains(&name) || self.sent.get(&name) != Some(&version) {
                        self.sent.insert(name.clone(), version.clone());
                        resources.push(Resource {
                            version,
                            resource: Some(prost_types::Any {
                                type_url: SECRET_TYPE.into(),
                                value: secret.encode_to_vec(),
                            }),
                            name,
                            aliases: vec![],
                        });
                    }
                }
                None => {
                    if self.sent.remove(&name).is_some() {
                        removed.push(name);
                    }
                }
            }
        }
        if resources.is_empty() && removed.is_empty() {
            return None;
        }
        let nonce = format!("{:016x}", rand::random::<u64>());
        self.nonce = Some(nonce.clone());
        Some(DeltaDiscoveryResponse {
            system_version_info: snap.version.to_string(),
            resources,
            type_url: SECRET_TYPE.into(),
            nonce,
            removed_resources: removed,
        })
    }

    /// Names of the secrets this stream was sent (to check key policy).
    pub fn resources_in(resp: &DeltaDiscoveryResponse) -> Vec<Secret> {
        resp.resources
            .iter()
            .filter_map(|r| r.resource.as_ref())
            .filter_map(|a| Secret::decode(a.value.as_slice()).ok())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::dev_ca::DevCa;
    use crate::identity::{Snapshot, Svid};
    use crate::proto::google::rpc::Status as RpcStatus;
    use crate::spiffe::{parse_spiffe_id, parse_trust_domain};
    use std::sync::Arc;
    use std::time::Duration;

    fn snap(ca: &DevCa, svid: Arc<Svid>, version: u64) -> Snapshot {
        let mut s = Snapshot {
            version,
            ..Default::default()
        };
        s.svids = vec![svid];
        let b = ca.bundle().unwrap();
        s.bundles.insert(b.trust_domain.clone(), Arc::new(b));
        s
    }

    fn sub(names: &[&str], nonce: &str) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: SECRET_TYPE.into(),
            resource_names_subscribe: names.iter().map(|s| s.to_string()).collect(),
            response_nonce: nonce.into(),
            ..Default::default()
        }
    }

    fn names(r: &DeltaDiscoveryResponse) -> Vec<&str> {
        r.resources.iter().map(|r| r.name.as_str()).collect()
    }

    #[test]
    fn subscribe_ack_nack_change_and_remove() {
        let td = parse_trust_domain("example.org").unwrap();
        let ca = DevCa::generate(&td, Duration::from_secs(3600)).unwrap();
        let id = parse_spiffe_id("spiffe://example.org/web").unwrap();
        let s1 = snap(
            &ca,
            Arc::new(ca.mint(&id, Duration::from_secs(60)).unwrap()),
            1,
        );
        let n = Naming::default();
        let mut st = DeltaState::default();

        let (kind, resp) = st.on_request(&sub(&["default", "ROOTCA", "nope"], ""), &s1, &n);
        assert_eq!(kind, RequestKind::Subscription);
        let resp = resp.unwrap();
        assert_eq!(names(&resp), ["ROOTCA", "default"]);
        assert_eq!(resp.system_version_info, "1");

        // ACK: nothing to send.
        let (kind, resp2) = st.on_request(&sub(&[], &resp.nonce), &s1, &n);
        assert_eq!((kind, resp2), (RequestKind::Ack, None));

        // A new SVID: only `default` changes.
        let s2 = snap(
            &ca,
            Arc::new(ca.mint(&id, Duration::from_secs(60)).unwrap()),
            2,
        );
        let push = st.on_change(&s2, &n).unwrap();
        assert_eq!(names(&push), ["default"]);

        // NACK of that push: logged by the caller, never a resend.
        let mut nack = sub(&[], &push.nonce);
        nack.error_detail = Some(RpcStatus {
            code: 3,
            message: "bad".into(),
            details: vec![],
        });
        let (kind, resp3) = st.on_request(&nack, &s2, &n);
        assert_eq!((kind, resp3), (RequestKind::Nack("bad".into()), None));

        // A repeat subscription to a name already sent is answered again.
        let (_, again) = st.on_request(&sub(&["ROOTCA"], ""), &s2, &n);
        assert_eq!(names(&again.unwrap()), ["ROOTCA"]);

        // The SVID disappears: `default` is removed, and so is ROOTCA (our own trust
        // domain is the default SVID's).
        let mut s3 = snap(
            &ca,
            Arc::new(ca.mint(&id, Duration::from_secs(60)).unwrap()),
            3,
        );
        s3.svids.clear();
        let gone = st.on_change(&s3, &n).unwrap();
        assert_eq!(gone.removed_resources, ["ROOTCA", "default"]);

        // Unsubscribed names are no longer pushed.
        let mut unsub = sub(&[], &gone.nonce);
        unsub.resource_names_unsubscribe = vec!["ROOTCA".into()];
        st.on_request(&unsub, &s3, &n);
        let ca2 = DevCa::generate(&td, Duration::from_secs(3600)).unwrap();
        let s4 = snap(
            &ca2,
            Arc::new(ca2.mint(&id, Duration::from_secs(60)).unwrap()),
            4,
        );
        let p = st.on_change(&s4, &n).unwrap();
        assert_eq!(names(&p), ["default"]);
    }

    #[test]
    fn reconnect_with_initial_versions_sends_only_what_changed() {
        let td = parse_trust_domain("example.org").unwrap();
        let ca = DevCa::generate(&td, Duration::from_secs(3600)).unwrap();
        let id = parse_spiffe_id("spiffe://example.org/web").unwrap();
        let s1 = snap(
            &ca,
            Arc::new(ca.mint(&id, Duration::from_secs(60)).unwrap()),
            9,
        );
        let n = Naming::default();
        let rootca = version_of(&resolve(&s1, "ROOTCA", &n).unwrap());
        let mut req = sub(&["default", "ROOTCA"], "stale-nonce-from-old-server");
        req.initial_resource_versions
            .insert("ROOTCA".into(), rootca);
        req.initial_resource_versions
            .insert("default".into(), "old".into());
        let mut st = DeltaState::default();
        let (_, resp) = st.on_request(&req, &s1, &n);
        assert_eq!(names(&resp.unwrap()), ["default"]);
    }
}

#[cfg(test)]
mod properties {
    //! Delta streams as a buggy or hostile client drives them: any sequence of
    //! subscriptions, unsubscriptions, wildcards, stale or matching nonces, NACKs and
    //! claimed versions, interleaved with rotations. Nothing panics; a response only
    //! ever carries secrets svidcar serves, each once, under its own name; a name is
    //! never both sent and removed in one response.
    use super::*;
    use crate::identity::Snapshot;
    use crate::proto::google::rpc::Status as RpcStatus;
    use crate::spiffe::parse_spiffe_id;
    use crate::testing::TestCa;
    use proptest::prelude::*;
    use std::sync::{Arc, OnceLock};
    use std::time::Duration;

    fn snapshots() -> &'static [Snapshot; 2] {
        static SNAPS: OnceLock<[Snapshot; 2]> = OnceLock::new();
        SNAPS.get_or_init(|| {
            let ca = TestCa::new("example.org").ca;
            let other = TestCa::new("other.org").ca;
            let id = parse_spiffe_id("spiffe://example.org/web").unwrap();
            let snap = |version| {
                let mut s = Snapshot {
                    version,
                    ..Default::default()
                };
                s.svids = vec![Arc::new(ca.mint(&id, Duration::from_secs(60)).unwrap())];
                for b in [ca.bundle().unwrap(), other.bundle().unwrap()] {
                    s.bundles.insert(b.trust_domain.clone(), Arc::new(b));
                }
                s
            };
            [snap(1), snap(2)]
        })
    }

    const NAMES: &[&str] = &[
        "*",
        "default",
        "ROOTCA",
        "ALL",
        "spiffe://example.org",
        "spiffe://other.org",
        "spiffe://example.org/web",
        "nope",
        "",
        "spiffe://EXAMPLE.org",
        "\u{0}",
    ];

    #[derive(Debug, Clone)]
    enum Step {
        Request {
            subscribe: Vec<&'static str>,
            unsubscribe: Vec<&'static str>,
            nonce: bool,
            nack: bool,
            claimed: Vec<(&'static str, String)>,
        },
        Rotate,
    }

    fn step() -> impl Strategy<Value = Step> {
        let names = || prop::collection::vec(prop::sample::select(NAMES), 0..4);
        prop_oneof![
            4 => (names(), names(), any::<bool>(), any::<bool>(), prop::collection::vec((prop::sample::select(NAMES), "[a-f0-9]{0,16}"), 0..3))
                .prop_map(|(subscribe, unsubscribe, nonce, nack, claimed)| Step::Request { subscribe, unsubscribe, nonce, nack, claimed }),
            1 => Just(Step::Rotate),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn any_request_sequence(steps in prop::collection::vec(step(), 1..12)) {
            let naming = Naming::default();
            let mut st = DeltaState::default();
            let mut current = 0;
            for s in steps {
                let snap = &snapshots()[current];
                let resp = match s {
                    Step::Rotate => {
                        current = 1 - current;
                        st.on_change(&snapshots()[current], &naming)
                    }
                    Step::Request { subscribe, unsubscribe, nonce, nack, claimed } => {
                        let r = DeltaDiscoveryRequest {
                            type_url: SECRET_TYPE.into(),
                            resource_names_subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
                            resource_names_unsubscribe: unsubscribe.iter().map(|s| s.to_string()).collect(),
                            response_nonce: if nonce { st.nonce.clone().unwrap_or_default() } else { "stale".into() },
                            error_detail: nack.then(|| RpcStatus { code: 3, message: "bad".into(), details: vec![] }),
                            initial_resource_versions: claimed.into_iter().map(|(n, v)| (n.to_string(), v)).collect(),
                            ..Default::default()
                        };
                        st.on_request(&r, snap, &naming).1
                    }
                };
                let Some(resp) = resp else { continue };
                let snap = &snapshots()[current];
                let mut seen = BTreeSet::new();
                for r in &resp.resources {
                    prop_assert!(seen.insert(r.name.clone()), "{} sent twice", r.name);
                    prop_assert!(resolve(snap, &r.name, &naming).is_some(), "{} is not served", r.name);
                    let secret = Secret::decode(r.resource.as_ref().unwrap().value.as_slice()).unwrap();
                    prop_assert_eq!(&secret.name, &r.name);
                    prop_assert!(!resp.removed_resources.contains(&r.name));
                }
            }
        }
    }
}
