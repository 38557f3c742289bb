//! The Workload API end to end: `svidcar dev-agent` against the Python `spiffe` client
//! (a SPIFFE client nobody here wrote), svidcar's `workload_api` source carrying traffic
//! with identities attested by uid, an agent that dies and comes back, and the status
//! codes the spec requires.

mod common;

use std::time::{Duration, Instant};

use common::*;

const WEB: &str = "spiffe://example.org/ns/default/sa/web";
const BACKEND: &str = "spiffe://example.org/ns/default/sa/backend";

/// Runs a Python snippet in `dir`, which must succeed.
fn python_ok(dir: &std::path::Path, script: &str) -> String {
    let (ok, out) = python(dir, script);
    assert!(ok, "python failed: {out}");
    out
}

#[test]
fn python_spiffe_client_fetches_svid_bundles_jwt_and_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let agent = DevAgent::start(
        d,
        &format!("trust_domain: example.org\nsvid_ttl: 4s\nentries:\n  - spiffe_id: {WEB}\n    selectors: [\"unix:uid:0\"]\n"),
    );
    let out = python_ok(
        d,
        &r#"
import time
from spiffe import WorkloadApiClient
c = WorkloadApiClient(socket_path='SOCKET')
s = c.fetch_x509_svid()
print('id', s.spiffe_id)
first = s.leaf.serial_number
print('serial', first)
b = c.fetch_x509_bundles().get_bundle_for_trust_domain(s.spiffe_id.trust_domain)
print('roots', len(b.x509_authorities))
j = c.fetch_jwt_svid(audience={'api'})
print('jwt', j.spiffe_id, c.validate_jwt_svid(j.token, 'api').spiffe_id)
deadline = time.time() + 10
while time.time() < deadline:
    n = c.fetch_x509_svid().leaf.serial_number
    if n != first:
        print('rotated', n)
        break
    time.sleep(0.1)
"#
        .replace("SOCKET", &agent.url()),
    );
    assert!(out.contains(&format!("id {WEB}")), "{out}");
    assert!(out.contains("roots 1"), "{out}");
    assert!(out.contains(&format!("jwt {WEB} {WEB}")), "{out}");
    assert!(
        out.contains("rotated"),
        "the rotated SVID must be served: {out}"
    );
}

#[test]
fn status_codes_for_missing_header_and_unregistered_caller() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let agent = DevAgent::start(
        d,
        &format!("trust_domain: example.org\nentries:\n  - spiffe_id: {WEB}\n    selectors: [\"unix:uid:4242\"]\n"),
    );
    // No security header: InvalidArgument. Registered nowhere: PermissionDenied.
    let out = python_ok(
        d,
        &r#"
import grpc
from spiffe._proto import workload_pb2, workload_pb2_grpc
ch = grpc.insecure_channel('SOCKET')
stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(ch)
for name, md in (('noheader', None), ('unregistered', [('workload.spiffe.io', 'true')])):
    try:
        next(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=md))
        print(name, 'OK')
    except grpc.RpcError as e:
        print(name, e.code().name, e.details())
"#
        .replace("SOCKET", &agent.url()),
    );
    assert!(
        out.contains("noheader INVALID_ARGUMENT security header missing from request"),
        "{out}"
    );
    assert!(
        out.contains("unregistered PERMISSION_DENIED no identity issued"),
        "{out}"
    );
    let log = std::fs::read_to_string(&agent.log).unwrap();
    assert!(
        log.contains("caller matches no registration entry"),
        "{log}"
    );
}

fn workload_identity(agent: &DevAgent) -> String {
    format!(
        "identity:\n  workload_api: {{socket: \"{}\"}}\n",
        agent.url()
    )
}

#[test]
fn pair_over_workload_api_with_identities_by_uid() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let agent = DevAgent::start(
        d,
        &format!(
            "trust_domain: example.org\nentries:\n  - spiffe_id: {WEB}\n    selectors: [\"unix:uid:1000\"]\n  - spiffe_id: {BACKEND}\n    selectors: [\"unix:uid:1001\"]\n"
        ),
    );
    open_up(d);
    let echo = EchoServer::start();
    let (in_port, out_port) = (free_port(), free_port());
    let back = Svidcar::start_as(
        d,
        "backend",
        &format!("{}inbound:\n  - name: app\n    listen: 127.0.0.1:{in_port}\n    forward: 127.0.0.1:{}\n    allow: [{{exact: \"{WEB}\"}}]\n", workload_identity(&agent), echo.port),
        Some(1001),
    );
    let front = Svidcar::start_as(
        d,
        "frontend",
        &format!("{}outbound:\n  - name: to-backend\n    listen: 127.0.0.1:{out_port}\n    connect: 127.0.0.1:{in_port}\n    expect: [{{exact: \"{BACKEND}\"}}]\n", workload_identity(&agent)),
        Some(1000),
    );
    let certs = |s: &Svidcar| http_get(s.admin, "/certs").unwrap().1;
    assert!(certs(&back).contains(BACKEND), "{}", certs(&back));
    assert!(certs(&front).contains(WEB), "{}", certs(&front));
    let mut s = connect(out_port);
    assert_eq!(
        echo_roundtrip(&mut s, b"over the Workload API").unwrap(),
        b"over the Workload API"
    );
    back.wait_log(&["accepted mTLS connection", WEB]);
}

#[test]
fn agent_outage_serves_cached_identity_then_refuses_after_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (ca_cert, ca_key) = dev_ca(d, "example.org");
    // TTL 8 s: rotation every 4 s; a cached SVID stays valid 4 to 8 s after an outage starts.
    let mut agent = DevAgent::start(
        d,
        &format!(
            "trust_domain: example.org\nsvid_ttl: 8s\nca_cert: {}\nca_key: {}\nentries:\n  - spiffe_id: {WEB}\n    selectors: [\"unix:uid:0\"]\n",
            ca_cert.display(),
            ca_key.display()
        ),
    );
    let echo = EchoServer::start();
    let (in_port, out_port) = (free_port(), free_port());
    let cfg = format!(
        "{}inbound:\n  - name: app\n    listen: 127.0.0.1:{in_port}\n    forward: 127.0.0.1:{}\n    allow_any_in_trust_domain: true\noutbound:\n  - name: out\n    listen: 127.0.0.1:{out_port}\n    connect: 127.0.0.1:{in_port}\n    expect: [{{exact: \"{WEB}\"}}]\n",
        workload_identity(&agent),
        echo.port
    );
    let s = Svidcar::start(d, "sidecar", &cfg);
    let mut long_lived = connect(out_port);
    let mut failures = Vec::new();
    let mut requests = 0u32;
    // One request on a new connection and one on the long-lived one.
    let mut load = |until: &dyn Fn() -> bool, failures: &mut Vec<String>| {
        let end = Instant::now() + Duration::from_secs(20);
        while !until() {
            assert!(Instant::now() < end, "condition not reached under load");
            requests += 1;
            let msg = format!("req {requests}");
            let fresh = std::net::TcpStream::connect(("127.0.0.1", out_port)).and_then(|mut c| {
                c.set_read_timeout(Some(Duration::from_secs(5)))?;
                echo_roundtrip(&mut c, msg.as_bytes())
            });
            if fresh.as_deref().ok() != Some(msg.as_bytes()) {
                failures.push(format!("{msg}: {fresh:?}"));
            }
            let kept = echo_roundtrip(&mut long_lived, msg.as_bytes());
            if kept.as_deref().ok() != Some(msg.as_bytes()) {
                failures.push(format!("long-lived {msg}: {kept:?}"));
            }
        }
    };

    // The agent dies: svidcar says it runs on a cached identity, traffic goes on.
    agent.kill();
    s.wait_log(&["Workload API stream ended", "serving the cached identity"]);
    let cached = || {
        http_get(s.admin, "/ready").is_some_and(|(c, b)| c == 200 && b.contains("cached identity"))
    };
    assert!(cached());
    assert_eq!(s.metric("svidcar_identity_cached"), 1.0);
    let outage_end = Instant::now() + Duration::from_millis(1500);
    load(&|| Instant::now() > outage_end, &mut failures);
    assert!(failures.is_empty(), "{failures:?}");

    // The agent comes back: the stream resumes and the next SVID is picked up.
    let before = s.serial();
    agent.restart();
    s.wait_log(&["Workload API stream resumed"]);
    load(&|| s.serial() != before, &mut failures);
    assert_eq!(s.metric("svidcar_identity_cached"), 0.0);
    assert!(failures.is_empty(), "{failures:?}");
    assert!(requests > 10, "load was applied ({requests})");

    // Gone for good: once the cached SVID expires, new handshakes are refused.
    agent.kill();
    s.wait_log(&["Workload API stream ended"]);
    wait_until("identity expired", Duration::from_secs(15), || {
        http_get(s.admin, "/ready").filter(|(c, b)| *c == 503 && b.contains("identity expired"))
    });
    let mut c = connect(out_port);
    let _ = std::io::Write::write_all(&mut c, b"late");
    assert!(read_all(&mut c).is_empty());
    s.wait_log(&["handshake rejected", "identity expired"]);
}

#[test]
fn several_svids_selection_and_federated_bundles() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let partner = TestCa::new("partner.example");
    let (partner_ca, _) = partner.write(d, "partner-ca");
    let agent = DevAgent::start(
        d,
        &format!(
            "trust_domain: example.org\nfederates_with: {{partner.example: {}}}\nentries:\n  - spiffe_id: {WEB}\n    selectors: [\"unix:uid:0\"]\n    hint: external\n  - spiffe_id: {BACKEND}\n    selectors: [\"unix:uid:0\"]\n    hint: internal\n",
            partner_ca.display()
        ),
    );
    let echo = EchoServer::start();
    let sidecar = |name: &str, select: &str| {
        let port = free_port();
        let cfg = format!(
            "identity:\n  workload_api: {{socket: \"{}\"{select}}}\ninbound:\n  - name: app\n    listen: 127.0.0.1:{port}\n    forward: 127.0.0.1:{}\n    allow: [{{trust_domain: partner.example}}]\n",
            agent.url(),
            echo.port
        );
        (Svidcar::start(d, name, &cfg), port)
    };
    let default_id = |s: &Svidcar| {
        let v: serde_json::Value =
            serde_json::from_str(&http_get(s.admin, "/certs").unwrap().1).unwrap();
        v["svids"][0]["spiffe_id"].as_str().unwrap().to_string()
    };
    // The first SVID is the default; spiffe_id or hint picks another.
    let (first, _) = sidecar("first", "");
    assert_eq!(default_id(&first), WEB);
    let (by_id, _) = sidecar("by-id", &format!(", spiffe_id: \"{BACKEND}\""));
    assert_eq!(default_id(&by_id), BACKEND);
    let (by_hint, port) = sidecar("by-hint", ", hint: internal");
    assert_eq!(default_id(&by_hint), BACKEND);

    // The federated bundle came through the Workload API: a partner workload gets in.
    let p = partner.valid_leaf(d, "p", "spiffe://partner.example/api");
    let out = s_client(port, Some((&p.0, &p.1)), &[], b"from partner");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("from partner"),
        "{out:?}"
    );
}
