//! HTTP on transparent ports (issue 12 point 1, with issue 11's transparent mode): pods
//! are network namespaces on a bridge, each running `svidcar redirect` and `svidcar run`
//! as uid 1337; the apps (a Python echo server, curl) run as uid 1000 and know nothing
//! of svidcar. The server pod's transparent inbound serves HTTP on its ports: its app
//! sees the caller's SPIFFE ID in X-Workload-ID and XFCC, per-route rules apply, and
//! plaintext from outside the mesh (permissive port) arrives without any identity.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::netns::{read, Lan, Pod};
use common::*;
use serde_json::Value;

const A: &str = "spiffe://example.org/ns/shop/sa/frontend";
const B: &str = "spiffe://example.org/ns/shop/sa/backend";

/// An HTTP app (any address, port argv[1]) answering every request with a JSON of what
/// it received; each request's path is appended to argv[2].
const ECHO_APP: &str = r#"
import http.server, json, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    wbufsize = -1
    def answer(self):
        with open(sys.argv[2], "a") as f:
            f.write(self.path + "\n")
        out = json.dumps({"method": self.command, "path": self.path,
                          "headers": [[k.lower(), v] for k, v in self.headers.items()]}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    do_GET = do_POST = do_DELETE = answer
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), H).serve_forever()
"#;

fn identity(dir: &Path, id: &str) -> String {
    format!(
        "identity:\n  dev: {{spiffe_id: \"{id}\", ca_cert: {}, ca_key: {}}}\nadmin: {{listen: \"127.0.0.1:15000\"}}\n",
        dir.join("ca.pem").display(),
        dir.join("ca.key").display(),
    )
}

/// B (10.210.0.2): every port HTTP by default, with X-Workload-ID; 8080 has a DENY
/// rule for /admin/*; 9090 is permissive. Inbound only.
fn server_config(dir: &Path) -> String {
    identity(dir, B)
        + &format!(
            r#"transparent:
  proxy_uid: 1337
  inbound:
    listen: "[::]:15006"
    mode: strict
    allow: [{{exact: "{A}"}}]
    protocol: http
    identity_header: X-Workload-ID
    ports:
      "8080":
        authorization:
          - action: DENY
            paths: ["/admin/*"]
      "9090": {{mode: permissive}}
"#
        )
}

/// A (10.210.0.1): outbound only; B's 8080 over an HTTP route (pooled mTLS), its
/// other ports over a TCP route.
fn client_config(dir: &Path) -> String {
    identity(dir, A)
        + &format!(
            r#"transparent:
  proxy_uid: 1337
  outbound:
    listen: "127.0.0.1:15001"
    routes:
      - to: ["10.210.0.2/32"]
        ports: [8080]
        protocol: http
        expect: [{{exact: "{B}"}}]
      - to: ["10.210.0.2/32"]
        expect: [{{exact: "{B}"}}]
    otherwise: deny
"#
        )
}

/// curl as uid 1000 in `pod` with `headers`: (HTTP status, body); status 0 when no
/// answer came.
fn curl(pod: &Pod, url: &str, headers: &[&str]) -> (u16, String) {
    let mut c = pod.ns.cmd_as(1000, "curl");
    c.args(["-s", "-g", "-m", "10", "-w", "\n%{http_code}"]);
    for h in headers {
        c.args(["-H", h]);
    }
    c.arg(url);
    let out = wait_output(
        c.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
        Duration::from_secs(20),
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// The values of header `name` the app received, from its echo.
fn app_saw(body: &str, name: &str) -> Vec<String> {
    let seen: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
    seen["headers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h[0] == name)
        .map(|h| h[1].as_str().unwrap().to_string())
        .collect()
}

const FORGED: [&str; 2] = [
    "X-Workload-ID: spiffe://example.org/ns/shop/sa/admin",
    "X-Forwarded-Client-Cert: By=spiffe://evil;URI=spiffe://example.org/ns/shop/sa/admin",
];

/// The LAN: A (client, 10.210.0.1), B (server, 10.210.0.2, echo apps on 8080, 8081
/// and 9090), C (no svidcar, 10.210.0.3).
struct Setup {
    dir: tempfile::TempDir,
    _lan: Lan,
    a: Pod,
    b: Pod,
    c: Pod,
    a_log: std::path::PathBuf,
    b_log: std::path::PathBuf,
    /// Every path B's apps received.
    seen: std::path::PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (ca, key) = dev_ca(d, "example.org");
    std::fs::rename(ca, d.join("ca.pem")).unwrap();
    std::fs::rename(key, d.join("ca.key")).unwrap();
    std::fs::write(d.join("echo_app.py"), ECHO_APP).unwrap();
    let seen = d.join("app-paths.txt");
    std::fs::write(&seen, "").unwrap();
    // The app (uid 1000) appends to it; open_up keeps the owner.
    std::os::unix::fs::chown(&seen, Some(1000), Some(1000)).unwrap();
    open_up(d);
    let mut lan = Lan::new();
    let mut a = lan.pod("a");
    let mut b = lan.pod("b");
    let c = lan.pod("c");
    for port in [8080, 8081, 9090] {
        let mut app = b.ns.cmd_as(1000, "/usr/bin/python3");
        app.arg(d.join("echo_app.py"))
            .arg(port.to_string())
            .arg(&seen);
        b.spawn(&mut app, &d.join(format!("app-{port}.log")));
        b.wait_port(port);
    }
    // A server-speaks-first service (MySQL's port): it sends a banner at once.
    let mut banner = b.ns.cmd_as(1000, "/usr/bin/python3");
    banner.args([
        "-c",
        "import socket\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('0.0.0.0', 3306)); s.listen()\nwhile True:\n    c,_=s.accept(); c.sendall(b'BANNER mysql-ish\\n'); c.close()",
    ]);
    b.spawn(&mut banner, &d.join("app-3306.log"));
    b.wait_port(3306);
    let b_log = b.sidecar(d, "b", &server_config(d));
    let a_log = a.sidecar(d, "a", &client_config(d));
    Setup {
        dir,
        _lan: lan,
        a,
        b,
        c,
        a_log,
        b_log,
        seen,
    }
}

#[test]
fn http_on_transparent_ports_gives_the_app_the_callers_identity() {
    let s = setup();
    let (a, b, c, seen) = (&s.a, &s.b, &s.c, &s.seen);
    let (a_log, b_log) = (&s.a_log, &s.b_log);
    let logs = || format!("A:\n{}\nB:\n{}", read(a_log), read(b_log));

    // A's app calls B's address; A's HTTP route and B's HTTP port: the app behind B
    // sees A's SPIFFE ID, never the caller's forged copies.
    let (code, body) = curl(a, "http://10.210.0.2:8080/v1/users/1", &FORGED);
    assert_eq!(code, 200, "{body} {}", logs());
    assert_eq!(app_saw(&body, "x-workload-id"), [A]);
    let xfcc = app_saw(&body, "x-forwarded-client-cert");
    assert_eq!(xfcc.len(), 1, "{xfcc:?}");
    assert!(
        xfcc[0].starts_with(&format!("By={B};Hash=")) && xfcc[0].ends_with(&format!(";URI={A}")),
        "{xfcc:?}"
    );
    // A second request reuses the pooled mTLS connection between the sidecars.
    let (code, _) = curl(a, "http://10.210.0.2:8080/v1/users/2", &[]);
    assert_eq!(code, 200);
    assert_eq!(
        a.metric(
            "svidcar_connections_total{direction=\"outbound\",listener=\"transparent-outbound\"}"
        ),
        2.0,
        "two app connections"
    );
    assert_eq!(
        b.metric(
            "svidcar_connections_total{direction=\"inbound\",listener=\"transparent-inbound\"}"
        ),
        1.0,
        "one pooled mTLS connection between the sidecars"
    );

    // The port's DENY rule: 403 from B's sidecar, logged with the caller; the app never
    // sees the request.
    let (code, body) = curl(a, "http://10.210.0.2:8080/admin/users", &[]);
    assert_eq!((code, body.as_str()), (403, "forbidden\n"), "{}", logs());
    let denied = wait_until("B logs the refusal", Duration::from_secs(10), || {
        read(b_log)
            .lines()
            .find(|l| l.contains("request refused by rule 0 (DENY)"))
            .map(str::to_string)
    });
    assert!(
        denied.contains(&format!("caller=\"{A}\"")) || denied.contains(&format!("caller={A}")),
        "{denied}"
    );
    assert!(
        !read(seen).contains("/admin/"),
        "the app saw a denied request"
    );
    assert_eq!(
        b.metric("svidcar_http_requests_total{code=\"403\",listener=\"transparent-inbound\"}"),
        1.0
    );

    // A port no entry names takes the listener's protocol (http), here behind A's TCP
    // route: the same identity.
    let (code, body) = curl(a, "http://10.210.0.2:8081/hello", &FORGED);
    assert_eq!(code, 200, "{body} {}", logs());
    assert_eq!(app_saw(&body, "x-workload-id"), [A]);
    assert_eq!(app_saw(&body, "x-forwarded-client-cert").len(), 1);

    // A server-first port stays TCP under the listener-wide `protocol: http`: A's app
    // gets the banner over mTLS.
    let mut read_banner = a.ns.cmd_as(1000, "/usr/bin/python3");
    read_banner.args([
        "-c",
        "import socket\nc=socket.create_connection(('10.210.0.2', 3306), 5); c.settimeout(5); print(c.recv(100).decode(), end='')",
    ]);
    let out = wait_output(
        read_banner
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
        Duration::from_secs(15),
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "BANNER mysql-ish\n",
        "{} {}",
        String::from_utf8_lossy(&out.stderr),
        logs()
    );

    // Plaintext from outside the mesh to the permissive port is served as Istio does,
    // with no caller identity: the forged headers are gone, none is set.
    let (code, body) = curl(c, "http://10.210.0.2:9090/public", &FORGED);
    assert_eq!(code, 200, "{body} {}", logs());
    assert!(app_saw(&body, "x-workload-id").is_empty(), "{body}");
    assert!(
        app_saw(&body, "x-forwarded-client-cert").is_empty(),
        "{body}"
    );
    // ... and refused on a strict port, for that reason.
    let (code, _) = curl(c, "http://10.210.0.2:8080/v1/users/1", &[]);
    assert_eq!(code, 0);
    assert_eq!(
        b.metric("svidcar_connection_errors_total{listener=\"transparent-inbound\",reason=\"plaintext_refused\"}"),
        1.0
    );
    assert_eq!(
        b.metric("svidcar_http_requests_total{code=\"200\",listener=\"transparent-inbound\"}"),
        4.0
    );
}

/// An HTTP route whose rules forget svidcar's own uid: its pooled connection comes back
/// to the outbound listener, which serves it as HTTP and gets a TLS ClientHello: the
/// connection ends there. One failed request (503 to the app), no storm, svidcar healthy.
#[test]
fn a_missing_uid_exclusion_on_an_http_route_is_no_storm() {
    let s = setup();
    for tool in ["iptables", "ip6tables"] {
        let out =
            s.a.ns
                .cmd(tool)
                .args(["-t", "nat", "-S", "SVIDCAR_OUTPUT"])
                .output()
                .unwrap();
        for rule in String::from_utf8_lossy(&out.stdout).lines() {
            if rule.contains("-owner") {
                let mut c = s.a.ns.cmd("sh");
                c.args([
                    "-c",
                    &format!("{tool} -t nat {}", rule.replacen("-A ", "-D ", 1)),
                ]);
                common::netns::must(&mut c);
            }
        }
    }
    let (code, body) = curl(&s.a, "http://10.210.0.2:8080/v1/users/1", &[]);
    assert_eq!(
        (code, body.as_str()),
        (503, "upstream unavailable\n"),
        "{}",
        read(&s.a_log)
    );
    assert_eq!(s.a.admin_status("/ready"), 200);
    assert_eq!(
        s.a.metric(
            "svidcar_connections_total{direction=\"outbound\",listener=\"transparent-outbound\"}"
        ),
        2.0,
        "the app's connection and the one looped back, nothing more: {}",
        read(&s.a_log)
    );
    assert!(read(&s.seen).is_empty(), "nothing reached B's app");
    let _ = s.dir.path();
}
