//! HTTP mode under bad input and long-lived streams (issue 12, points 1, 7, 8): oversized,
//! malformed and smuggling requests refused and never forwarded; slow, silent and idle
//! clients disconnected; a slow upstream answered with 504; websocket upgrades and
//! `CONNECT` tunnels carried through an outbound → inbound pair with the caller's
//! identity set and the rules applied; after an SVID rotation new requests travel on
//! connections made with the new certificate. Attackers are raw Python sockets.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

const PAYMENT: &str = "spiffe://example.org/ns/default/sa/payment";
const USERS: &str = "spiffe://example.org/ns/default/sa/users";

/// An app that logs every request it receives (one JSON line in `requests.log`) and
/// answers with what it saw; `/slow` answers after 3 s; an `Upgrade` or `CONNECT` is
/// switched and the stream echoed back with an `echo:` prefix.
const APP: &str = r#"
import http.server, json, sys, time
LOG = sys.argv[2]
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def record(self):
        with open(LOG, "a") as f:
            f.write(json.dumps({"method": self.command, "path": self.path,
                "headers": [[k.lower(), v] for k, v in self.headers.items()]}) + "\n")
    def echo_stream(self):
        self.wfile.flush()
        while True:
            data = self.rfile.read1(65536)
            if not data:
                return
            self.wfile.write(b"echo:" + data); self.wfile.flush()
    def answer(self):
        self.record()
        if self.headers.get("upgrade"):
            self.send_response(101)
            self.send_header("Upgrade", self.headers["upgrade"])
            self.send_header("Connection", "Upgrade")
            self.end_headers()
            return self.echo_stream()
        if self.path.startswith("/slow"):
            time.sleep(3)
        n = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(n) if n else b""
        out = json.dumps({"method": self.command, "path": self.path,
            "headers": [[k.lower(), v] for k, v in self.headers.items()],
            "body": body.decode()}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    def do_CONNECT(self):
        self.record()
        self.send_response(200)
        self.end_headers()
        self.echo_stream()
    do_GET = do_POST = do_PUT = do_DELETE = answer
    def log_message(self, *a): pass
srv = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H)
print("ready", flush=True)
srv.serve_forever()
"#;

struct App {
    /// Held for its Drop, which stops the process.
    _process: PyApp,
    port: u16,
    log: PathBuf,
}

impl App {
    fn start(dir: &Path) -> Self {
        let log = dir.join("requests.log");
        let app = PyApp::start(dir, "app.py", APP, &[log.as_os_str()]);
        Self {
            port: app.port,
            _process: app,
            log,
        }
    }

    /// Every request the app received, as it logged them.
    fn requests(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

/// The users service behind an HTTP inbound, an HTTP outbound for `payment`; `*_extra`
/// are more keys of each listener, `caller_ttl` the caller's `svid_ttl`.
struct Pair {
    inbound: Svidcar,
    outbound: Svidcar,
    in_port: u16,
    out_port: u16,
    /// A client certificate of `payment`, for raw TLS straight to the inbound.
    cert: (PathBuf, PathBuf),
}

fn pair(dir: &Path, app_port: u16, in_extra: &str, out_extra: &str, caller_ttl: &str) -> Pair {
    let (ca, key) = dev_ca(dir, "example.org");
    let cert = TestCa::load(&ca, &key).valid_leaf(dir, "payment", PAYMENT);
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
{in_extra}"#,
            ca = ca.display(),
            key = key.display()
        ),
    );
    let outbound = Svidcar::start(
        dir,
        "caller",
        &format!(
            r#"identity:
  dev: {{spiffe_id: "{PAYMENT}", ca_cert: {ca}, ca_key: {key}, svid_ttl: {caller_ttl}}}
outbound:
  - name: users
    listen: 127.0.0.1:{out_port}
    connect: 127.0.0.1:{in_port}
    protocol: http
    expect: [{{exact: "{USERS}"}}]
{out_extra}"#,
            ca = ca.display(),
            key = key.display()
        ),
    );
    Pair {
        inbound,
        outbound,
        in_port,
        out_port,
        cert,
    }
}

/// A raw client: connects (TLS with `cert` when given, ALPN http/1.1), sends `payload`,
/// and prints what came back before the connection closed or 5 s of silence, as JSON
/// `{"reply": ..., "closed": bool}`.
fn raw(dir: &Path, port: u16, cert: Option<&(PathBuf, PathBuf)>, payload: &[u8]) -> (String, bool) {
    let tls = match cert {
        Some((c, k)) => format!(
            "ctx=ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); ctx.check_hostname=False; ctx.verify_mode=ssl.CERT_NONE\nctx.load_cert_chain({:?},{:?}); ctx.set_alpn_protocols(['http/1.1'])\ns=ctx.wrap_socket(s)",
            c.display().to_string(),
            k.display().to_string()
        ),
        None => String::new(),
    };
    // The payload goes through a file: an oversized head is too long for an argument.
    let file = dir.join("payload.bin");
    std::fs::write(&file, payload).unwrap();
    let script = format!(
        r#"
import socket, ssl, json
s=socket.create_connection(('127.0.0.1',{port}),5)
{tls}
s.sendall(open({file:?},'rb').read())
s.settimeout(5)
out=b""; closed=False
while True:
    try:
        d=s.recv(65536)
    except socket.timeout:
        break
    except (ConnectionResetError, ssl.SSLError):
        closed=True; break
    if not d:
        closed=True; break
    out+=d
print(json.dumps({{"reply": out.decode("latin-1"), "closed": closed}}))
"#,
        file = file.display().to_string()
    );
    let (ok, out) = python(dir, &script);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    (
        v["reply"].as_str().unwrap().to_string(),
        v["closed"].as_bool().unwrap(),
    )
}

fn status_line(reply: &str) -> &str {
    reply.split("\r\n").next().unwrap_or("")
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

fn requests_total(s: &Svidcar, code: &str) -> f64 {
    s.metric(&format!(
        "svidcar_http_requests_total{{code=\"{code}\",listener=\"users\"}}"
    ))
}

/// Oversized heads get 431, malformed requests and every smuggling shape 400, on the
/// outbound (from the app) and the inbound (from a peer over mTLS); the app receives none
/// of them, each is counted, and a good request on the same listener still works.
#[test]
fn bad_requests_are_refused_counted_and_never_forwarded() {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path());
    let p = pair(dir.path(), app.port, "", "", "1h");
    let big = format!(
        "GET /v1/users/1 HTTP/1.1\r\nHost: users\r\nX-Big: {}\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    let cases: [(&str, &str, &str); 9] = [
        ("oversized head", &big, "431"),
        (
            "malformed header line",
            "GET /v1/users/1 HTTP/1.1\r\nHost: users\r\nBad Header: x\r\n\r\n",
            "400",
        ),
        (
            "Content-Length and Transfer-Encoding",
            "POST /v1/users HTTP/1.1\r\nHost: users\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "400",
        ),
        (
            // Lines ended by a bare LF, as hyper's parser also takes them; the head
            // alone, so that no CRLF CRLF of a body can end it.
            "Content-Length and Transfer-Encoding, LF line ends",
            "POST /v1/users HTTP/1.1\nHost: users\nContent-Length: 4\nTransfer-Encoding: chunked\n\n",
            "400",
        ),
        (
            "Transfer-Encoding before Content-Length",
            "POST /v1/users HTTP/1.1\r\nHost: users\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
            "400",
        ),
        (
            "two differing Content-Lengths",
            "POST /v1/users HTTP/1.1\r\nHost: users\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
            "400",
        ),
        (
            "chunked, identity",
            "POST /v1/users HTTP/1.1\r\nHost: users\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
            "400",
        ),
        (
            // http's Authority takes userinfo; policies compare hosts, which have none.
            "userinfo in Host",
            "GET /v1/users/1 HTTP/1.1\r\nHost: x@internal.example\r\n\r\n",
            "400",
        ),
        (
            "obs-fold",
            "GET /v1/users/1 HTTP/1.1\r\nHost: users\r\nX-Folded: a\r\n b\r\n\r\n",
            "400",
        ),
    ];
    for (side, port, cert, svidcar) in [
        ("outbound", p.out_port, None, &p.outbound),
        ("inbound", p.in_port, Some(&p.cert), &p.inbound),
    ] {
        for (what, req, want) in cases {
            let (reply, _) = raw(dir.path(), port, cert, req.as_bytes());
            assert!(
                status_line(&reply).starts_with(&format!("HTTP/1.1 {want}")),
                "{side}, {what}: {reply:?}\n{}",
                svidcar.logs()
            );
        }
        assert_eq!(requests_total(svidcar, "431"), 1.0, "{side}");
        assert_eq!(requests_total(svidcar, "400"), 8.0, "{side}");
        svidcar.wait_log(&[
            "HTTP request refused: malformed or too large",
            "status=\"431\"",
        ]);
    }
    // h2 from the app: the same limit on the header list; the h2 library ends the
    // connection on an oversized header block (no response, nothing forwarded).
    let out = Command::new("curl")
        .args(["-sS", "-m", "10", "-o", "/dev/null", "-w", "%{http_code}"])
        .args(["--http2-prior-knowledge", "-H"])
        .arg(format!("X-Big: {}", "a".repeat(70 * 1024)))
        .arg(format!("http://127.0.0.1:{}/v1/users/1", p.out_port))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "000", "{stderr}");
    assert!(app.requests().is_empty(), "{:?}", app.requests());
    // The listeners still serve good requests.
    let (reply, _) = raw(
        dir.path(),
        p.out_port,
        None,
        b"GET /v1/users/1 HTTP/1.1\r\nHost: users\r\nConnection: close\r\n\r\n",
    );
    assert!(status_line(&reply).starts_with("HTTP/1.1 200"), "{reply}");
    assert_eq!(app.requests().len(), 1);

    // A head limit below hyper's smallest buffer is a config error that says so.
    let (ok, text) = check_config(
        dir.path(),
        "small",
        &format!(
            "identity:\n  dev: {{spiffe_id: \"{USERS}\"}}\ninbound:\n  - name: users\n    listen: 127.0.0.1:1\n    forward: 127.0.0.1:2\n    protocol: http\n    allow: [{{trust_domain: example.org}}]\n    max_request_headers_kb: 4\n"
        ),
    );
    assert!(!ok);
    assert!(
        text.contains("inbound[0].max_request_headers_kb: 4 is out of range"),
        "{text}"
    );
}

/// A client that sends nothing, one that sends its head a byte at a time, and one that
/// stays idle after a request are each disconnected, counted by reason; a good client
/// on another connection is served meanwhile.
#[test]
fn silent_slow_and_idle_clients_are_disconnected() {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path());
    let limits = "    request_header_timeout: 1s\n    idle_timeout: 3s\n";
    let p = pair(dir.path(), app.port, "", limits, "1h");
    let script = format!(
        r#"
import socket, time, threading, json, urllib.request
res = {{}}
def silent():
    s = socket.create_connection(("127.0.0.1", {port}), 5); s.settimeout(10)
    res["silent"] = s.recv(100) == b""
def slow():
    s = socket.create_connection(("127.0.0.1", {port}), 5); s.settimeout(10)
    head = b"GET /v1/users/1 HTTP/1.1\r\nHost: users\r\nX-Slow: " + b"a" * 40 + b"\r\n\r\n"
    closed = False
    for b in head:
        try:
            s.sendall(bytes([b]))
        except OSError:
            closed = True; break
        time.sleep(0.1)
    if not closed:
        try:
            closed = s.recv(100) == b""
        except OSError:
            closed = True
    res["slow"] = closed
def idle():
    s = socket.create_connection(("127.0.0.1", {port}), 5); s.settimeout(10)
    s.sendall(b"GET /v1/users/1 HTTP/1.1\r\nHost: users\r\n\r\n")
    got = b""
    try:
        while True:
            d = s.recv(65536)
            if not d: break
            got += d
        # One answer, then the server closed the idle connection.
        res["idle"] = got.startswith(b"HTTP/1.1 200") and got.count(b"HTTP/1.1") == 1
    except OSError as e:
        res["idle"] = "not closed: %s" % e
ts = [threading.Thread(target=f) for f in (silent, slow, idle)]
for t in ts: t.start()
time.sleep(0.5)
# Meanwhile, other connections are served.
res["good"] = urllib.request.urlopen("http://127.0.0.1:{port}/v1/users/2", timeout=5).status
for t in ts: t.join()
print(json.dumps(res))
"#,
        port = p.out_port
    );
    let (ok, out) = python(dir.path(), &script);
    assert!(ok, "{out}\n{}", p.outbound.logs());
    let res: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(res["good"], 200, "{out}");
    assert_eq!(res["silent"], true, "{out}");
    assert_eq!(res["slow"], true, "{out}");
    assert_eq!(res["idle"], true, "{out}");
    let errors = |reason: &str| {
        p.outbound.metric(&format!(
            "svidcar_connection_errors_total{{listener=\"users\",reason=\"{reason}\"}}"
        ))
    };
    assert_eq!(errors("request_header_timeout"), 2.0, "silent and slow");
    assert!(errors("idle_timeout") >= 1.0);
    // The slow client's head never reached the app.
    assert!(
        app.requests()
            .iter()
            .all(|r| header(r, "x-slow").is_empty()),
        "{:?}",
        app.requests()
    );
}

/// An upstream that does not answer within `request_timeout` gets the caller a 504,
/// counted; the app's late answer is dropped.
#[test]
fn a_slow_upstream_gets_504() {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path());
    let p = pair(dir.path(), app.port, "    request_timeout: 1s\n", "", "1h");
    let (reply, _) = raw(
        dir.path(),
        p.out_port,
        None,
        b"GET /slow HTTP/1.1\r\nHost: users\r\nConnection: close\r\n\r\n",
    );
    assert!(
        status_line(&reply).starts_with("HTTP/1.1 504"),
        "{reply}\n{}",
        p.inbound.logs()
    );
    assert!(reply.ends_with("upstream timeout\n"), "{reply}");
    assert_eq!(requests_total(&p.inbound, "504"), 1.0);
    p.inbound
        .wait_log(&["upstream did not answer within request_timeout"]);
}

/// A websocket upgrade and a `CONNECT` tunnel from the app pass through the pair with
/// bytes both ways; the app sees the caller's identity on the upgrade request; the
/// rules still decide (an upgrade to a denied path gets 403 and never reaches the app).
#[test]
fn upgrades_and_connect_pass_through_with_identity_and_rules() {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path());
    let rules = "    authorization:\n      - action: DENY\n        paths: [{prefix: /admin}]\n";
    let p = pair(dir.path(), app.port, rules, "", "1h");
    let script = format!(
        r#"
import socket, json
def tunnel(head, msgs):
    s = socket.create_connection(("127.0.0.1", {port}), 5); s.settimeout(5)
    s.sendall(head)
    buf = b""
    while b"\r\n\r\n" not in buf:
        d = s.recv(65536)
        if not d: return {{"head": buf.decode("latin-1"), "echo": []}}
        buf += d
    head, _, rest = buf.partition(b"\r\n\r\n")
    echoes = []
    if head.split(b" ")[1] in (b"101", b"200"):
        for m in msgs:
            s.sendall(m)
            want = b"echo:" + m
            while len(rest) < len(want):
                d = s.recv(65536)
                if not d: break
                rest += d
            echoes.append(rest[:len(want)].decode()); rest = rest[len(want):]
    return {{"head": head.decode("latin-1"), "echo": echoes}}
ws = tunnel(b"GET /chat HTTP/1.1\r\nHost: users\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            b"X-Workload-ID: spiffe://example.org/ns/default/sa/admin\r\n\r\n", [b"hello", b"again"])
connect = tunnel(b"CONNECT db.internal:5432 HTTP/1.1\r\nHost: db.internal:5432\r\n\r\n", [b"ping"])
denied = tunnel(b"GET /admin/ws HTTP/1.1\r\nHost: users\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", [b"x"])
print(json.dumps({{"ws": ws, "connect": connect, "denied": denied}}))
"#,
        port = p.out_port
    );
    let (ok, out) = python(dir.path(), &script);
    assert!(ok, "{out}\n{}\n{}", p.outbound.logs(), p.inbound.logs());
    let res: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let ws_head = res["ws"]["head"].as_str().unwrap().to_ascii_lowercase();
    assert!(
        ws_head.starts_with("http/1.1 101"),
        "{out}\n{}",
        p.inbound.logs()
    );
    assert!(ws_head.contains("upgrade: websocket"), "{ws_head}");
    assert_eq!(
        res["ws"]["echo"],
        serde_json::json!(["echo:hello", "echo:again"])
    );
    assert!(
        res["connect"]["head"]
            .as_str()
            .unwrap()
            .starts_with("HTTP/1.1 200"),
        "{out}"
    );
    assert_eq!(res["connect"]["echo"], serde_json::json!(["echo:ping"]));
    assert!(
        res["denied"]["head"]
            .as_str()
            .unwrap()
            .starts_with("HTTP/1.1 403"),
        "{out}"
    );
    let seen = app.requests();
    assert_eq!(seen.len(), 2, "{seen:?}");
    let ws = &seen[0];
    assert_eq!(ws["path"], "/chat");
    assert_eq!(header(ws, "upgrade"), vec!["websocket"]);
    assert_eq!(header(ws, "x-workload-id"), vec![PAYMENT], "{ws}");
    let xfcc = header(ws, "x-forwarded-client-cert");
    assert_eq!(xfcc.len(), 1, "{ws}");
    assert!(xfcc[0].ends_with(&format!(";URI={PAYMENT}")), "{ws}");
    assert_eq!(seen[1]["method"], "CONNECT");
    assert_eq!(seen[1]["path"], "db.internal:5432");
    assert_eq!(header(&seen[1], "x-workload-id"), vec![PAYMENT]);
    assert_eq!(requests_total(&p.inbound, "101"), 1.0);
    assert_eq!(requests_total(&p.inbound, "403"), 1.0);
}

/// hyper's pool is keyed by the authority the caller names: a caller making up names
/// gets a connection per name only up to `max_upstream_connections`, then 503, counted;
/// a name that has its connection keeps working.
#[test]
fn made_up_authorities_open_no_more_than_max_upstream_connections() {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path());
    let p = pair(
        dir.path(),
        app.port,
        "",
        "    max_upstream_connections: 2\n",
        "1h",
    );
    let script = format!(
        r#"
import http.client, json
c = http.client.HTTPConnection("127.0.0.1", {port}, timeout=10)
codes = []
for host in ["a1.example", "a2.example", "a3.example", "a1.example"]:
    c.request("GET", "/v1/users/1", headers={{"Host": host}})
    r = c.getresponse(); r.read(); codes.append(r.status)
print(json.dumps(codes))
"#,
        port = p.out_port
    );
    let (ok, out) = python(dir.path(), &script);
    assert!(ok, "{out}\n{}", p.outbound.logs());
    let codes: Vec<u16> = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(codes, [200, 200, 503, 200], "{}", p.outbound.logs());
    p.outbound
        .wait_log(&["no new upstream connection", "max_upstream_connections"]);
    assert_eq!(
        p.outbound.metric(
            "svidcar_connection_errors_total{listener=\"users\",reason=\"upstream_connection_limit\"}"
        ),
        1.0
    );
}

/// A peer that stops answering without closing (here: its process stopped) leaves a
/// pooled h2 connection that looks open. The outbound pings it; with no answer the
/// connection leaves the pool, and the next request, once the peer is back, goes on a
/// new connection instead of waiting on the dead one.
#[test]
fn a_silent_peer_connection_leaves_the_pool() {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path());
    let p = pair(dir.path(), app.port, "", "", "1h");
    let get = || {
        let script = format!(
            "import urllib.request\nprint(urllib.request.urlopen('http://127.0.0.1:{}/v1/users/1', timeout=20).status)",
            p.out_port
        );
        python(dir.path(), &script)
    };
    let handshakes = || {
        ["full", "resumed"]
            .iter()
            .map(|k| {
                p.inbound.metric(&format!(
                    "svidcar_tls_handshakes_total{{kind=\"{k}\",listener=\"users\"}}"
                ))
            })
            .sum::<f64>()
    };
    assert_eq!(get().1.trim(), "200");
    assert_eq!(handshakes(), 1.0);
    // A ping every 30 s, 10 s for the answer: the outbound closes it within 40 s.
    let open_to_peer = || {
        let out = std::process::Command::new("ss")
            .args([
                "-Htn",
                "state",
                "established",
                "dport",
                "=",
                &format!(":{}", p.in_port),
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).lines().count()
    };
    assert_eq!(open_to_peer(), 1);
    signal(p.inbound.pid(), "-STOP");
    wait_until(
        "the outbound closed the silent connection",
        Duration::from_secs(60),
        || (open_to_peer() == 0).then_some(()),
    );
    signal(p.inbound.pid(), "-CONT");
    let (ok, out) = get();
    assert!(ok && out.trim() == "200", "{out}\n{}", p.outbound.logs());
    assert_eq!(
        handshakes(),
        2.0,
        "the request went on the silent connection"
    );
}

/// An upgraded connection is a byte stream like a TCP listener's: traffic keeps it open
/// past `idle_timeout`, and once nothing moves for `idle_timeout` it is closed (never
/// earlier), counted as an idle close; its bytes are counted in `svidcar_bytes_total`.
#[test]
fn an_upgraded_connection_closes_when_idle_and_its_bytes_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path());
    let idle = "    idle_timeout: 1s\n";
    let p = pair(dir.path(), app.port, idle, idle, "1h");
    let script = format!(
        r#"
import socket, json, time
s = socket.create_connection(("127.0.0.1", {port}), 5); s.settimeout(10)
s.sendall(b"GET /chat HTTP/1.1\r\nHost: users\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
buf = b""
while b"\r\n\r\n" not in buf:
    d = s.recv(65536)
    assert d, buf
    buf += d
head, _, rest = buf.partition(b"\r\n\r\n")
assert head.startswith(b"HTTP/1.1 101"), head
# A message every 0.4 s for 2 s: twice the idle timeout, each one echoed.
for i in range(5):
    time.sleep(0.4)
    m = b"message %d" % i
    s.sendall(m)
    want = b"echo:" + m
    while len(rest) < len(want):
        d = s.recv(65536)
        assert d, ("closed while in use", i)
        rest += d
    assert rest[:len(want)] == want, rest
    rest = rest[len(want):]
quiet = time.monotonic()
while s.recv(65536):
    pass
print(json.dumps({{"quiet": time.monotonic() - quiet}}))
"#,
        port = p.out_port
    );
    let (ok, out) = python(dir.path(), &script);
    assert!(ok, "{out}\n{}\n{}", p.outbound.logs(), p.inbound.logs());
    let res: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let quiet = res["quiet"].as_f64().unwrap();
    // Closed between the timeout and a quarter of it later; slack for a loaded machine.
    assert!((1.0..5.0).contains(&quiet), "closed after {quiet} s quiet");
    let sent = (0..5).map(|i| format!("message {i}").len()).sum::<usize>() as f64;
    let echoed = sent + 5.0 * "echo:".len() as f64;
    for s in [&p.outbound, &p.inbound] {
        let bytes = |dir: &str| {
            s.metric(&format!(
                "svidcar_bytes_total{{direction=\"{dir}\",listener=\"users\"}}"
            ))
        };
        assert_eq!((bytes("rx"), bytes("tx")), (sent, echoed));
    }
    let idle_closes: f64 = [&p.outbound, &p.inbound]
        .iter()
        .map(|s| {
            s.metric("svidcar_connection_errors_total{listener=\"users\",reason=\"idle_timeout\"}")
        })
        .sum();
    assert!(idle_closes >= 1.0, "no idle close counted");
}

/// After the caller's SVID rotates, new requests travel on a new mTLS connection made
/// with the new certificate (the XFCC `Hash` the app sees changes); no request fails.
#[test]
fn after_an_svid_rotation_new_requests_use_the_new_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path());
    let p = pair(dir.path(), app.port, "", "", "6s");
    let hash = || {
        let out = Command::new("curl")
            .args(["-s", "-m", "10", "-w", "\n%{http_code}"])
            .arg(format!("http://127.0.0.1:{}/v1/users/1", p.out_port))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').unwrap();
        assert_eq!(code, "200", "{body}\n{}", p.outbound.logs());
        let seen: serde_json::Value = serde_json::from_str(body).unwrap();
        let xfcc = header(&seen, "x-forwarded-client-cert")[0].to_string();
        let h = xfcc.split(';').find(|f| f.starts_with("Hash=")).unwrap();
        h.to_string()
    };
    let first_serial = p.outbound.serial();
    let before = hash();
    assert_eq!(hash(), before, "pooled: the same connection");
    wait_until(
        "the caller's SVID to rotate",
        Duration::from_secs(15),
        || (p.outbound.serial() != first_serial).then_some(()),
    );
    let after = wait_until(
        "a request over a connection with the new SVID",
        Duration::from_secs(10),
        || Some(hash()).filter(|h| *h != before),
    );
    assert_ne!(after, before);
    assert_eq!(requests_total(&p.inbound, "503"), 0.0);
    assert!(
        p.inbound
            .metric("svidcar_connections_total{direction=\"inbound\",listener=\"users\"}")
            >= 2.0
    );
}

/// h2 frames by hand (no h2 client library is needed): the client preface, SETTINGS,
/// and HEADERS for `GET /` or `CONNECT`, HPACK without Huffman or indexing.
const H2_CLIENT: &str = r#"
import socket, struct, time
def frame(t, flags, sid, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([t, flags]) + struct.pack(">I", sid) + payload
def lit(idx, value):
    return bytes([idx]) + bytes([len(value)]) + value
def get(sid):
    return frame(1, 0x5, sid, b"\x82\x86\x84" + lit(0x01, b"users"))
def connect(sid):
    return frame(1, 0x4, sid, lit(0x02, b"CONNECT") + lit(0x01, b"db.internal:5432"))
def rst(sid):
    return frame(3, 0, sid, struct.pack(">I", 8))
def h2conn():
    s = socket.create_connection(("127.0.0.1", PORT), 5); s.settimeout(10)
    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0))
    return s
def frames(s, until):
    buf = b""; seen = []
    while True:
        while len(buf) >= 9:
            n = int.from_bytes(buf[:3], "big")
            if len(buf) < 9 + n: break
            t, flags, sid = buf[3], buf[4], int.from_bytes(buf[5:9], "big") & 0x7fffffff
            seen.append((t, flags, sid, buf[9:9+n])); buf = buf[9+n:]
            if until(seen): return seen, False
        try:
            d = s.recv(65536)
        except OSError:
            return seen, True
        if not d: return seen, True
        buf += d
"#;

/// h2 abuse from the app: a rapid-reset burst (streams opened and cancelled at once) ends
/// that connection with GOAWAY, and a new connection is served; `CONNECT` over h2 gets a
/// counted 501.
#[test]
fn h2_rapid_reset_gets_goaway_and_others_keep_flowing() {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path());
    let p = pair(dir.path(), app.port, "", "", "1h");
    let script = format!(
        r#"
PORT = {port}
{H2_CLIENT}
import json
res = {{}}
s = h2conn()
s.sendall(b"".join(get(i) + rst(i) for i in range(1, 4001, 2)))
seen, closed = frames(s, lambda f: any(t == 7 for t, *_ in f))
goaway = [p for t, _, _, p in seen if t == 7]
res["goaway"] = int.from_bytes(goaway[0][4:8], "big") if goaway else None
s = h2conn()
s.sendall(connect(1))
seen, _ = frames(s, lambda f: any(t == 1 and sid == 1 for t, _, sid, _ in f))
s = h2conn()
s.sendall(get(1))
seen, _ = frames(s, lambda f: any(t == 0 and sid == 1 and fl & 1 for t, fl, sid, _ in f))
res["good"] = any(t == 0 and sid == 1 for t, _, sid, _ in seen)
print(json.dumps(res))
"#,
        port = p.out_port
    );
    let (ok, out) = python(dir.path(), &script);
    assert!(ok, "{out}\n{}", p.outbound.logs());
    let res: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    // ENHANCE_YOUR_CALM (RFC 9113 §7).
    assert_eq!(res["goaway"], 11, "{out}");
    assert_eq!(res["good"], true, "{out}");
    assert_eq!(requests_total(&p.outbound, "501"), 1.0);
    // The burst did not turn into thousands of requests to the app.
    assert!(app.requests().len() < 100, "{}", app.requests().len());
}

/// Request trailers are cleaned like the headers: a caller's `X-Workload-ID` or XFCC in
/// the trailers never reaches the app.
#[test]
fn request_trailers_are_cleaned_of_identity_headers() {
    let dir = tempfile::tempdir().unwrap();
    // An app that reads a chunked request to its end and logs the raw bytes.
    let port = free_port();
    let log = dir.path().join("raw.log");
    let script = format!(
        r#"
import socket, threading
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", {port})); srv.listen(16)
print("ready", flush=True)
def serve(c):
    buf = b""
    while not (b"\r\n0\r\n" in buf and buf.endswith(b"\r\n\r\n")):
        d = c.recv(65536)
        if not d: break
        buf += d
    open({log:?}, "ab").write(buf)
    c.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
    c.close()
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,)).start()
"#,
        log = log.display().to_string()
    );
    let path = dir.path().join("raw_app.py");
    std::fs::write(&path, script).unwrap();
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
    let p = pair(dir.path(), port, "", "", "1h");
    let (reply, _) = raw(
        dir.path(),
        p.out_port,
        None,
        b"POST /v1/users HTTP/1.1\r\nHost: users\r\nConnection: close\r\nTransfer-Encoding: chunked\r\nTrailer: X-Workload-ID, X-Forwarded-Client-Cert, X-Note\r\n\r\n5\r\nhello\r\n0\r\nX-Workload-ID: spiffe://example.org/ns/default/sa/admin\r\nX-Forwarded-Client-Cert: By=forged\r\nX-Note: kept\r\n\r\n",
    );
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        status_line(&reply).starts_with("HTTP/1.1 200"),
        "{reply}\n{}",
        p.inbound.logs()
    );
    let seen = std::fs::read_to_string(&log).unwrap().to_ascii_lowercase();
    assert!(seen.contains("hello"), "{seen}");
    assert!(seen.contains("x-note: kept"), "trailers arrive: {seen}");
    assert!(
        seen.contains(&format!("x-workload-id: {PAYMENT}")),
        "{seen}"
    );
    assert_eq!(seen.matches("x-workload-id:").count(), 1, "{seen}");
    assert!(!seen.contains("forged"), "{seen}");
    assert!(!seen.contains("sa/admin"), "{seen}");
}
