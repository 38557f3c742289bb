//! Identity behaviours seen from outside: federation bundles from files, a peer checked
//! only against its own trust domain's roots, `bundle_out` trusted by openssl, and an
//! expired identity refusing handshakes instead of presenting an expired certificate.

mod common;

use std::time::{Duration, SystemTime};

use common::*;

const WEB: &str = "spiffe://example.org/ns/default/sa/web";
const BACKEND: &str = "spiffe://example.org/ns/default/sa/backend";

#[test]
fn federated_bundle_and_per_trust_domain_validation() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let own = TestCa::new("example.org");
    let partner = TestCa::new("partner.example");
    let (own_ca, _) = own.write(d, "own-ca");
    let (partner_ca, _) = partner.write(d, "partner-ca");
    let (c, k) = own.valid_leaf(d, "svid", BACKEND);
    let echo = EchoServer::start();
    let port = free_port();
    let cfg = format!(
        "identity:\n  files: {{cert: {}, key: {}, bundle: {}, bundles: {{partner.example: {}}}}}\ninbound:\n  - name: app\n    listen: 127.0.0.1:{port}\n    forward: 127.0.0.1:{}\n    allow: [{{trust_domain: partner.example}}, {{exact: \"{WEB}\"}}]\n",
        c.display(), k.display(), own_ca.display(), partner_ca.display(), echo.port
    );
    let s = Svidcar::start(d, "fed", &cfg);

    // A partner workload, signed by the partner CA: accepted through the federated bundle.
    let p = partner.valid_leaf(d, "p", "spiffe://partner.example/ns/x/sa/api");
    let out = s_client(port, Some((&p.0, &p.1)), &[], b"federated");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("federated"),
        "{out:?}"
    );

    // Our own CA signing a partner.example ID: valid chain to *a* bundle we hold, but not
    // to the bundle of the trust domain it claims. Refused.
    let forged = own.valid_leaf(d, "forged", "spiffe://partner.example/ns/x/sa/api");
    let out = s_client(port, Some((&forged.0, &forged.1)), &[], b"forged");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("forged"));
    s.wait_log(&[
        "handshake rejected",
        "chain invalid",
        "not signed by a CA of trust domain partner.example",
    ]);

    // The partner CA signing one of *our* IDs: refused the same way.
    let forged2 = partner.valid_leaf(d, "forged2", WEB);
    s_client(port, Some((&forged2.0, &forged2.1)), &[], b"x");
    s.wait_log(&[
        "handshake rejected",
        "not signed by a CA of trust domain example.org",
    ]);

    let (_, certs) = http_get(s.admin, "/certs").unwrap();
    assert!(
        certs.contains("partner.example") && certs.contains("example.org"),
        "{certs}"
    );
}

#[test]
fn dev_bundle_out_is_trusted_by_openssl() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let bundle = d.join("bundle.pem");
    let echo = EchoServer::start();
    let port = free_port();
    let cfg = format!(
        "identity:\n  dev: {{spiffe_id: \"{BACKEND}\", bundle_out: {}}}\ninbound:\n  - name: app\n    listen: 127.0.0.1:{port}\n    forward: 127.0.0.1:{}\n    allow_any_in_trust_domain: true\n",
        bundle.display(),
        echo.port
    );
    let _s = Svidcar::start(d, "dev", &cfg);
    // openssl checks svidcar's SVID against the CA svidcar wrote out (and is refused as a
    // client, having no certificate: the server side is what is checked here).
    let out = s_client(
        port,
        None,
        &[
            "-CAfile",
            bundle.to_str().unwrap(),
            "-verify_return_error",
            "-brief",
        ],
        b"",
    );
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("Verification: OK"), "{text}");
}

#[test]
fn expired_identity_refuses_handshakes_and_is_not_ready() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = TestCa::new("example.org");
    let (ca_cert, _) = ca.write(d, "ca");
    let now = SystemTime::now();
    // Our SVID expires 3 s after the start; nothing replaces it.
    let (c, k) = ca.leaf(
        d,
        "svid",
        &[BACKEND],
        now - Duration::from_secs(60),
        now + Duration::from_secs(3),
    );
    let echo = EchoServer::start();
    let port = free_port();
    let cfg = format!(
        "identity:\n  files: {{cert: {}, key: {}, bundle: {}}}\ninbound:\n  - name: app\n    listen: 127.0.0.1:{port}\n    forward: 127.0.0.1:{}\n    allow: [{{exact: \"{WEB}\"}}]\n",
        c.display(), k.display(), ca_cert.display(), echo.port
    );
    let s = Svidcar::start(d, "expiring", &cfg);
    let client = ca.valid_leaf(d, "web", WEB);
    let out = s_client(port, Some((&client.0, &client.1)), &[], b"before");
    assert!(String::from_utf8_lossy(&out.stdout).contains("before"));

    // /ready turns 503 with the reason once the SVID is past notAfter.
    let body = wait_until("not ready", Duration::from_secs(10), || {
        match http_get(s.admin, "/ready") {
            Some((503, body)) => Some(body),
            _ => None,
        }
    });
    assert!(body.contains("identity expired"), "{body}");
    let out = s_client(port, Some((&client.0, &client.1)), &[], b"after");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("after"));
    s.wait_log(&["handshake rejected", "identity expired", "identity_expired"]);
    assert_eq!(
        s.metric("svidcar_handshake_failures_total{listener=\"app\",reason=\"identity_expired\"}"),
        1.0
    );
}

/// Our SVID expires with no successor while an app keeps its connection to an HTTP
/// outbound open: the next upstream connection the outbound needs is refused on our side
/// (`identity_expired`), not attempted by resuming a stored session, which would show the
/// server no certificate at all.
#[test]
fn an_expired_identity_originates_nothing_not_even_a_resumed_session() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = TestCa::new("example.org");
    let (ca_cert, ca_key) = ca.write(d, "ca");
    let now = SystemTime::now();
    let (c, k) = ca.leaf(
        d,
        "svid",
        &[WEB],
        now - Duration::from_secs(60),
        now + Duration::from_secs(4),
    );
    let app = http_server("ok\n");
    let (in_port, out_port) = (free_port(), free_port());
    let inbound = Svidcar::start(
        d,
        "backend",
        &format!(
            "identity:\n  dev: {{spiffe_id: \"{BACKEND}\", ca_cert: {}, ca_key: {}}}\ninbound:\n  - name: backend\n    listen: 127.0.0.1:{in_port}\n    forward: 127.0.0.1:{app}\n    protocol: http\n    allow: [{{exact: \"{WEB}\"}}]\n",
            ca_cert.display(),
            ca_key.display()
        ),
    );
    let outbound = Svidcar::start(
        d,
        "web",
        &format!(
            "identity:\n  files: {{cert: {}, key: {}, bundle: {}}}\noutbound:\n  - name: backend\n    listen: 127.0.0.1:{out_port}\n    connect: 127.0.0.1:{in_port}\n    protocol: http\n    expect: [{{exact: \"{BACKEND}\"}}]\n",
            c.display(),
            k.display(),
            ca_cert.display()
        ),
    );
    // One keep-alive connection from the app: a request while the SVID is valid, then,
    // once /ready says it expired and a whole second later (certificates count whole
    // seconds, so no verifier anywhere still takes it), an upgrade, which needs a new
    // upstream connection.
    let past = (now + Duration::from_secs(5))
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let script = format!(
        r#"
import http.client, json, time, urllib.request, urllib.error
c = http.client.HTTPConnection("127.0.0.1", {out_port}, timeout=10)
c.request("GET", "/")
r = c.getresponse(); first = r.status; r.read()
deadline = time.monotonic() + 15
while time.monotonic() < deadline:
    try:
        urllib.request.urlopen("http://127.0.0.1:{admin}/ready", timeout=2)
    except urllib.error.HTTPError as e:
        if e.code == 503:
            break
    time.sleep(0.1)
while time.time() < {past}:
    time.sleep(0.1)
c.request("GET", "/ws", headers={{"Upgrade": "websocket", "Connection": "Upgrade"}})
r = c.getresponse()
print(json.dumps({{"first": first, "after": r.status}}))
"#,
        admin = outbound.admin
    );
    let (ok, out) = python(d, &script);
    assert!(ok, "{out}\n{}", outbound.logs());
    let res: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(res["first"], 200, "{out}");
    assert_eq!(
        res["after"],
        503,
        "{out}\n{}\n{}",
        outbound.logs(),
        inbound.logs()
    );
    outbound.wait_log(&["handshake rejected", "identity_expired"]);
    assert_eq!(
        outbound.metric(
            "svidcar_handshake_failures_total{listener=\"backend\",reason=\"identity_expired\"}"
        ),
        1.0
    );
    assert_eq!(
        inbound.metric("svidcar_tls_handshakes_total{kind=\"resumed\",listener=\"backend\"}"),
        0.0,
        "a resumed session reached the server"
    );
}
