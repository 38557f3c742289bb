//! Fixtures for tests that run svidcar's pieces in-process (unit tests here, and other
//! crates' tests with the `testing` feature): workload identities from a fresh dev CA,
//! and a listener built from a spec, bound to port 0 and running on the test's runtime.
//! Integration tests drive the binary instead; these are for behaviour that is easier
//! to reach from inside (an HTTP client in the same process, a policy swap).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::task::TaskTracker;

use crate::app::BoundListener;
use crate::authz::AllowList;
use crate::config::{
    InboundSpec, ListenerKind, ListenerSpec, OutboundSpec, Timeouts, TlsSpec, TlsVersion,
};
use crate::identity::dev_ca::DevCa;
use crate::identity::{IdentityState, IdentityUpdate};
use crate::net::HostPort;
use crate::proxy::Drain;
use crate::spiffe::{parse_trust_domain, parse_workload_id, TrustDomain};

/// A dev CA for one trust domain, minting workload identities.
pub struct TestCa {
    pub ca: DevCa,
    pub trust_domain: TrustDomain,
}

impl TestCa {
    pub fn new(trust_domain: &str) -> Self {
        let trust_domain = parse_trust_domain(trust_domain).expect("trust domain");
        let ca = DevCa::generate(&trust_domain, Duration::from_secs(3600)).expect("dev CA");
        Self { ca, trust_domain }
    }

    /// The identity state of a workload `id` of this CA: its SVID and the CA's bundle.
    pub fn workload(&self, id: &str) -> Arc<IdentityState> {
        let id = parse_workload_id(id).expect("SPIFFE ID");
        let svid = self.ca.mint(&id, Duration::from_secs(600)).expect("mint");
        let state = Arc::new(IdentityState::new());
        state.publish(IdentityUpdate {
            svids: vec![Arc::new(svid)],
            bundles: vec![Arc::new(self.ca.bundle().expect("bundle"))],
        });
        state
    }
}

/// A listener spec on `127.0.0.1:0` with the default timeouts and TLS 1.3.
pub fn spec(name: &str, kind: ListenerKind) -> ListenerSpec {
    ListenerSpec {
        name: name.into(),
        key: name.to_string(),
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        kind,
        http: None,
        tls: TlsSpec {
            min_version: TlsVersion::V1_3,
            alpn: Vec::new(),
            session_resumption: true,
        },
        timeouts: Timeouts {
            connect: Duration::from_secs(5),
            handshake: Duration::from_secs(5),
            idle: Duration::from_secs(60),
        },
        max_connections: 100,
    }
}

/// Inbound to `forward`, allowing what `allow` allows.
pub fn inbound(forward: SocketAddr, allow: AllowList) -> ListenerKind {
    ListenerKind::Inbound(InboundSpec {
        forward: HostPort::parse(&forward.to_string()).expect("address"),
        allow,
        proxy_protocol: None,
    })
}

/// Outbound to `connect`, expecting what `expect` allows.
pub fn outbound(connect: SocketAddr, expect: AllowList) -> ListenerKind {
    ListenerKind::Outbound(OutboundSpec {
        connect: HostPort::parse(&connect.to_string()).expect("address"),
        server_name: rustls_pki_types::ServerName::try_from("svidcar.test").expect("name"),
        expect,
    })
}

/// Runs `spec` on the current runtime; returns where it listens and the drain signals
/// that stop it.
pub async fn run_listener(spec: &ListenerSpec, state: Arc<IdentityState>) -> (SocketAddr, Drain) {
    let own = state
        .load()
        .default_svid()
        .map(|s| s.spiffe_id.trust_domain().clone())
        .expect("an SVID");
    let bound = BoundListener::bind(spec, state, &own, &[])
        .await
        .expect("bind");
    let addr = bound.local_addr();
    let drain = Drain::default();
    tokio::spawn(bound.run(drain.clone(), TaskTracker::new()));
    (addr, drain)
}

/// JSON values of every type, nested up to four levels (arrays and objects), with
/// `extra` among the leaves: the claims and inputs property tests feed to parsers.
#[cfg(test)]
pub fn any_json(
    extra: Vec<serde_json::Value>,
) -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
    use proptest::prelude::*;
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,12}".prop_map(Value::from),
        prop::sample::select(if extra.is_empty() {
            vec![Value::Null]
        } else {
            extra
        }),
    ];
    leaf.prop_recursive(4, 32, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map(".{0,4}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::{IdRule, StrMatch};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// An echo server on port 0.
    async fn echo() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    fn exact(id: &str) -> AllowList {
        AllowList {
            rules: vec![IdRule::Text(StrMatch::Exact {
                value: id.into(),
                ignore_case: false,
            })],
            any_in_own_trust_domain: false,
        }
    }

    async fn roundtrip(addr: SocketAddr, msg: &[u8]) -> Vec<u8> {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(msg).await.unwrap();
        s.shutdown().await.unwrap();
        let mut back = Vec::new();
        let _ = s.read_to_end(&mut back).await;
        back
    }

    /// An outbound and an inbound listener in one process carry bytes between two
    /// workloads; a workload the inbound does not allow gets nothing through, refused
    /// for that reason; draining stops the accepting.
    #[tokio::test]
    async fn an_in_process_pair_carries_bytes_and_refuses_a_stranger() {
        let ca = TestCa::new("example.org");
        let app = echo().await;
        let backend = ca.workload("spiffe://example.org/backend");
        let inbound_spec = spec("in", inbound(app, exact("spiffe://example.org/frontend")));
        let (inbound_addr, inbound_drain) = run_listener(&inbound_spec, backend).await;
        let expect = exact("spiffe://example.org/backend");
        let front = spec("out", outbound(inbound_addr, expect.clone()));
        let (front_addr, _d1) =
            run_listener(&front, ca.workload("spiffe://example.org/frontend")).await;
        assert_eq!(roundtrip(front_addr, b"hello").await, b"hello");

        let stranger = spec("stranger", outbound(inbound_addr, expect));
        let (stranger_addr, _d2) =
            run_listener(&stranger, ca.workload("spiffe://example.org/stranger")).await;
        assert_eq!(roundtrip(stranger_addr, b"hello").await, b"");
        let refused = crate::metrics::get()
            .handshake_failures
            .with_label_values(&["in", "spiffe_id_not_allowed"])
            .get();
        assert_eq!(refused, 1);

        inbound_drain.draining.cancel();
        tokio::time::timeout(Duration::from_secs(5), async {
            while TcpStream::connect(inbound_addr).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the drained listener stops accepting");
    }
}
