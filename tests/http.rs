//! HTTP mode (issue 12): an outbound → inbound pair with `protocol: http` in front of
//! a Python app that echoes what it received. curl (HTTP/1.1 and h2 prior knowledge) and
//! grpcio as clients; the app sees the caller's identity, never a forged one; per-route
//! rules decide on the normalized path; the app's `Connection: close` does not close the
//! mTLS connection between the sidecars.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

const PAYMENT: &str = "spiffe://example.org/ns/default/sa/payment";
const OTHER: &str = "spiffe://example.org/ns/default/sa/other";
const USERS: &str = "spiffe://example.org/ns/default/sa/users";

/// The users service behind an HTTP inbound, and an HTTP outbound for a caller `id`.
struct Pair {
    inbound: Svidcar,
    outbound: Svidcar,
    out_port: u16,
}

fn pair(dir: &Path, caller: &str, app_port: u16, inbound_extra: &str) -> Pair {
    let (ca, key) = dev_ca(dir, "example.org");
    let (in_port, out_port) = (free_port(), free_port());
    let inbound = Svidcar::start(
        dir,
        "users",
        &format!(
            r#"identity:
  dev: {{spiffe_id: "{USERS}", ca_cert: {ca}, ca_key: {key}}}
inbound:
  - name: users
    listen: 127.0.0.1:{in_port}
    forward: 127.0.0.1:{app_port}
    protocol: http
    allow: [{{trust_domain: example.org}}]
    identity_header: X-Workload-ID
{inbound_extra}"#,
            ca = ca.display(),
            key = key.display()
        ),
    );
    let outbound = Svidcar::start(
        dir,
        "caller",
        &format!(
            r#"identity:
  dev: {{spiffe_id: "{caller}", ca_cert: {ca}, ca_key: {key}}}
outbound:
  - name: users
    listen: 127.0.0.1:{out_port}
    connect: 127.0.0.1:{in_port}
    protocol: http
    expect: [{{exact: "{USERS}"}}]
"#,
            ca = ca.display(),
            key = key.display()
        ),
    );
    Pair {
        inbound,
        outbound,
        out_port,
    }
}

/// curl to the outbound; (HTTP status, body).
fn curl(port: u16, args: &[&str], path: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "-m", "10", "-w", "\n%{http_code}"])
        .args(args)
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn header<'a>(seen: &'a serde_json::Value, name: &str) -> Vec<&'a str> {
    seen["headers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h[0] == name)
        .map(|h| h[1].as_str().unwrap())
        .collect()
}

/// HTTP/1.1 and h2 from the app; the app sees the caller's SPIFFE ID in X-Workload-ID
/// and Envoy's default XFCC, and never the copies the caller forged.
#[test]
fn the_app_sees_the_callers_identity_and_never_a_forged_one() {
    let dir = tempfile::tempdir().unwrap();
    let app = echo_app(dir.path());
    let p = pair(dir.path(), PAYMENT, app.port, "");
    for proto in [vec!["--http1.1"], vec!["--http2-prior-knowledge"]] {
        let mut args = proto.clone();
        args.extend([
            "-H",
            "X-Workload-ID: spiffe://example.org/ns/default/sa/admin",
            "-H",
            "X-Forwarded-Client-Cert: By=forged;URI=spiffe://example.org/ns/default/sa/admin",
            "-H",
            "X_Workload_ID: spiffe://example.org/ns/default/sa/admin",
            "-H",
            "X_Forwarded_Client_Cert: By=forged",
        ]);
        if proto[0] == "--http1.1" {
            // A caller that names the identity headers as hop-by-hop must not get the
            // ones svidcar sets removed.
            args.extend(["-H", "Connection: x-workload-id, x-forwarded-client-cert"]);
        }
        let (code, body) = curl(p.out_port, &args, "/v1/users/42?full=1");
        assert_eq!(code, 200, "{proto:?}: {body} {}", p.inbound.logs());
        let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(seen["path"], "/v1/users/42?full=1");
        assert_eq!(header(&seen, "x-workload-id"), vec![PAYMENT], "{proto:?}");
        let xfcc = header(&seen, "x-forwarded-client-cert");
        assert_eq!(xfcc.len(), 1, "{xfcc:?}");
        assert!(
            xfcc[0].starts_with(&format!("By={USERS};Hash="))
                && xfcc[0].ends_with(&format!(";URI={PAYMENT}")),
            "{proto:?}: {}",
            xfcc[0]
        );
        assert!(!xfcc[0].contains("forged"));
        assert!(header(&seen, "x_workload_id").is_empty(), "{body}");
        assert!(
            header(&seen, "x_forwarded_client_cert").is_empty(),
            "{body}"
        );
    }
    // Two Host headers: refused, never forwarded. (CONNECT is forwarded as a tunnel:
    // tests/http_hardening.rs.)
    let raw = |req: &str| {
        let script = format!(
            "import socket\ns=socket.create_connection(('127.0.0.1',{}),5)\ns.sendall({req:?}.encode())\nprint(s.recv(100).decode().split('\\r\\n')[0])",
            p.out_port
        );
        python(dir.path(), &script).1
    };
    let two_hosts = raw("GET /v1/users/1 HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n");
    assert!(two_hosts.starts_with("HTTP/1.1 400"), "{two_hosts}");
    drop(app);
}

/// `payment` may GET /v1/users/{id} but not DELETE it, nobody else may; paths are
/// normalized before the rules look (a traversal does not escape the protected prefix)
/// and the app receives the normalized path.
#[test]
fn per_route_rules_decide_on_the_normalized_path() {
    let dir = tempfile::tempdir().unwrap();
    let app = echo_app(dir.path());
    let rules = r#"    authorization:
      - action: DENY
        paths: [{prefix: /admin}]
      - action: ALLOW
        principals: [{exact: "spiffe://example.org/ns/default/sa/payment"}]
        methods: [GET]
        paths: [{prefix: /v1/users/}]
"#;
    let p = pair(dir.path(), PAYMENT, app.port, rules);
    let (code, body) = curl(p.out_port, &[], "/v1/users/42");
    assert_eq!(code, 200, "{body}");
    let (code, body) = curl(p.out_port, &["-X", "DELETE"], "/v1/users/42");
    assert_eq!((code, body.as_str()), (403, "forbidden\n"));
    let logs = p.inbound.wait_log(&[
        "request refused",
        "caller=\"spiffe://example.org/ns/default/sa/payment\"",
        "method=\"DELETE\"",
    ]);
    assert!(logs.contains("no ALLOW rule matched"), "{logs}");
    for (path, want) in [
        ("/v1/users/../../admin", 403),
        ("/v1/users/%2e%2e/%2e%2e/admin", 403),
        ("/v1/users/..%2f..%2fadmin", 400),
        ("//admin", 403),
        ("/v1/users/..;/admin", 400),
    ] {
        let (code, body) = curl(p.out_port, &["--path-as-is"], path);
        assert_eq!(code, want, "{path}: {body}");
    }
    // A normalized path that is still allowed reaches the app normalized.
    let (code, body) = curl(p.out_port, &["--path-as-is"], "/v1/users/./7/../42");
    assert_eq!(code, 200, "{body}");
    let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(seen["path"], "/v1/users/42");
    assert!(
        p.inbound
            .metric("svidcar_http_requests_total{code=\"403\",listener=\"users\"}")
            >= 4.0
    );

    // Another workload: refused even for GET.
    drop(p);
    let dir2 = tempfile::tempdir().unwrap();
    let p = pair(dir2.path(), OTHER, app.port, rules);
    let (code, _) = curl(p.out_port, &[], "/v1/users/42");
    assert_eq!(code, 403);
}

/// 1,000 requests from the app, each on a new connection with `Connection: close`: one
/// mTLS connection between the sidecars carries them all.
#[test]
fn app_connection_close_does_not_close_the_pooled_mtls_connection() {
    let dir = tempfile::tempdir().unwrap();
    let app = echo_app(dir.path());
    let p = pair(dir.path(), PAYMENT, app.port, "");
    let script = format!(
        "import http.client\nok=0\nfor i in range(1000):\n    c=http.client.HTTPConnection('127.0.0.1',{},timeout=10)\n    c.request('GET','/v1/users/%d'%i,headers={{'Connection':'close'}})\n    r=c.getresponse(); r.read(); ok+= r.status==200; c.close()\nprint(ok)",
        p.out_port
    );
    let (ok, out) = python(dir.path(), &script);
    assert!(ok, "{out}");
    assert_eq!(out.trim(), "1000");
    assert_eq!(
        p.outbound
            .metric("svidcar_connections_total{direction=\"outbound\",listener=\"users\"}"),
        1000.0
    );
    assert_eq!(
        p.inbound
            .metric("svidcar_connections_total{direction=\"inbound\",listener=\"users\"}"),
        1.0,
        "one mTLS connection between the sidecars"
    );
}

/// A gRPC call (Python grpcio, unary and server streaming) through the pair: h2c from
/// the app, h2 between the sidecars, h2c to the gRPC server; trailers arrive.
#[test]
fn grpc_works_through_the_pair() {
    let dir = tempfile::tempdir().unwrap();
    let grpc_port = free_port();
    let server = format!(
        r#"
import grpc, sys
from concurrent import futures
def say(req, ctx):
    md = dict(ctx.invocation_metadata())
    ctx.set_trailing_metadata((("x-done", "yes"),))
    return b"hello " + req + b" from " + md.get("x-workload-id", "nobody").encode()
def count(req, ctx):
    for i in range(3):
        yield str(i).encode()
h = grpc.method_handlers_generic_handler("echo.Echo", {{
    "Say": grpc.unary_unary_rpc_method_handler(say),
    "Count": grpc.unary_stream_rpc_method_handler(count)}})
s = grpc.server(futures.ThreadPoolExecutor(4)); s.add_generic_rpc_handlers((h,))
s.add_insecure_port("127.0.0.1:{grpc_port}"); s.start()
print("ready", flush=True); s.wait_for_termination()
"#
    );
    let path = dir.path().join("grpc_server.py");
    std::fs::write(&path, server).unwrap();
    let mut child = Command::new("python3")
        .arg(&path)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    let p = pair(dir.path(), PAYMENT, grpc_port, "");
    let client = format!(
        r#"
import grpc
ch = grpc.insecure_channel("127.0.0.1:{}")
say = ch.unary_unary("/echo.Echo/Say")
resp, call = say.with_call(b"grpc", timeout=10)
print(resp.decode())
print(dict(call.trailing_metadata()).get("x-done"))
print(",".join(r.decode() for r in ch.unary_stream("/echo.Echo/Count")(b"", timeout=10)))
"#,
        p.out_port
    );
    let (ok, out) = python(dir.path(), &client);
    let _ = child.kill();
    let _ = child.wait();
    assert!(ok, "{out}\n{}", p.inbound.logs());
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], format!("hello grpc from {PAYMENT}"), "{out}");
    assert_eq!(lines[1], "yes", "trailers arrive: {out}");
    assert_eq!(lines[2], "0,1,2", "{out}");
}

/// Rego policies decide each request in-process: the seed-style policy (Rego v0,
/// `input.client_spiffe_id`) and the OPA-Envoy-style one (Rego v1, `input.attributes`,
/// `parsed_path`, an object decision), fed what the app would receive.
#[test]
fn rego_policies_decide_each_request() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/rego");
    for (file, query) in [
        ("seed.rego", "data.authz.allow"),
        ("envoy.rego", "data.envoy.authz.allow"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let app = echo_app(dir.path());
        std::fs::copy(fixtures.join(file), dir.path().join(file)).unwrap();
        let extra = format!("    rego: {{policy: [{file}], query: {query}}}\n");
        let p = pair(dir.path(), PAYMENT, app.port, &extra);
        let (code, body) = curl(p.out_port, &[], "/v1/users/42");
        assert_eq!(code, 200, "{file}: {body} {}", p.inbound.logs());
        let (code, _) = curl(p.out_port, &["-X", "DELETE"], "/v1/users/42");
        assert_eq!(code, 403, "{file}");
        p.inbound
            .wait_log(&["request refused by the Rego policy", "method=\"DELETE\""]);
        let (code, _) = curl(p.out_port, &[], "/v1/orders/1");
        assert_eq!(code, 403, "{file}");
        drop(p);
        // Another caller: refused by the same policy.
        let dir2 = tempfile::tempdir().unwrap();
        std::fs::copy(fixtures.join(file), dir2.path().join(file)).unwrap();
        let p = pair(dir2.path(), OTHER, app.port, &extra);
        let (code, _) = curl(p.out_port, &[], "/v1/users/42");
        assert_eq!(code, 403, "{file}");
    }
}
