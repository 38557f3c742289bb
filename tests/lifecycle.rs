//! Lifecycle against the real binary: SIGTERM under load fails no request in flight;
//! `POST /quitquitquit` drains like SIGTERM; `svidcar wait` blocks until the sidecar is
//! ready; `/ready` turns 503 when the SVID is about to expire with no renewal.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use common::*;

/// An HTTP app that takes a second per request and logs each one it starts (`got`),
/// so the test knows the requests are in flight.
const SLOW_APP: &str = r#"
import http.server, sys, time
log = open(sys.argv[2], "a", buffering=1)
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        log.write("got %s\n" % self.path)
        time.sleep(1)
        body = b"done " + self.path.encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
srv = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H)
print("ready", flush=True)
srv.serve_forever()
"#;

fn identity(d: &std::path::Path, id: &str) -> String {
    let (ca, key) = (d.join("ca.pem"), d.join("ca.key"));
    if !ca.exists() {
        let (c, k) = dev_ca(d, "example.org");
        std::fs::rename(c, &ca).unwrap();
        std::fs::rename(k, &key).unwrap();
    }
    format!(
        "identity:\n  dev: {{spiffe_id: \"{id}\", ca_cert: {}, ca_key: {}}}\n",
        ca.display(),
        key.display()
    )
}

/// Requests in flight through an HTTP pair when the server side gets SIGTERM: every
/// one gets its whole answer, new connections are refused, and the process exits 0 as
/// soon as they are done, long before `drain_timeout`.
#[test]
fn sigterm_under_load_fails_no_request_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let seen = d.join("seen.log");
    let app = PyApp::start(d, "slow.py", SLOW_APP, &[seen.as_os_str()]);
    let (in_port, out_port) = (free_port(), free_port());
    let mut server = Svidcar::start(
        d,
        "server",
        &format!(
            "drain_timeout: 30s\n{}inbound:\n  - name: in\n    listen: 127.0.0.1:{in_port}\n    forward: 127.0.0.1:{}\n    protocol: http\n    allow: [{{trust_domain: example.org}}]\n",
            identity(d, "spiffe://example.org/server"),
            app.port
        ),
    );
    let _client = Svidcar::start(
        d,
        "client",
        &format!(
            "{}outbound:\n  - name: out\n    listen: 127.0.0.1:{out_port}\n    connect: 127.0.0.1:{in_port}\n    protocol: http\n    expect: [{{exact: \"spiffe://example.org/server\"}}]\n",
            identity(d, "spiffe://example.org/client"),
        ),
    );
    const N: usize = 8;
    let curls: Vec<_> = (0..N)
        .map(|i| {
            Command::new("curl")
                .args(["-s", "-m", "20", "-w", " %{http_code}"])
                .arg(format!("http://127.0.0.1:{out_port}/r{i}"))
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    wait_until("every request at the app", Duration::from_secs(10), || {
        let n = std::fs::read_to_string(&seen)
            .unwrap_or_default()
            .lines()
            .count();
        (n == N).then_some(())
    });
    let started = std::time::Instant::now();
    signal(server.pid(), "-TERM");
    server.wait_log(&["shutting down"]);
    wait_until("no longer accepting", Duration::from_secs(5), || {
        std::net::TcpStream::connect(("127.0.0.1", in_port))
            .is_err()
            .then_some(())
    });
    for (i, c) in curls.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("done /r{i} 200"),
            "request {i}"
        );
    }
    let code = wait_until("server exit", Duration::from_secs(20), || server.try_exit());
    assert_eq!(code, Some(0));
    eprintln!(
        "exited {:?} after SIGTERM (drain_timeout 30 s)",
        started.elapsed()
    );
}

/// `POST /quitquitquit` (GET refused): no new connections; an open TCP connection keeps
/// flowing, byte-exact, until `drain_timeout`, then is closed; the process exits 0.
#[test]
fn quitquitquit_drains_like_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let echo = EchoServer::start();
    let port = free_port();
    let mut s = Svidcar::start(
        d,
        "server",
        &format!(
            "drain_timeout: 3s\n{}inbound:\n  - name: in\n    listen: 127.0.0.1:{port}\n    forward: 127.0.0.1:{}\n    allow: [{{trust_domain: example.org}}]\n",
            identity(d, "spiffe://example.org/server"),
            echo.port
        ),
    );
    let ca = TestCa::load(&d.join("ca.pem"), &d.join("ca.key"));
    let job = ca.valid_leaf(d, "job", "spiffe://example.org/job");
    let peer = Peer::start(d, "job", port, &job, &d.join("ca.pem"));
    assert_eq!(
        http_get(s.admin, "/quitquitquit").map(|(c, _)| c),
        Some(405)
    );
    let mut post = std::net::TcpStream::connect(("127.0.0.1", s.admin)).unwrap();
    std::io::Write::write_all(
        &mut post,
        b"POST /quitquitquit HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    )
    .unwrap();
    let answer = read_all(&mut post);
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
    s.wait_log(&["shutdown requested via /quitquitquit"]);
    s.wait_log(&["shutting down"]);
    wait_until("no longer accepting", Duration::from_secs(5), || {
        std::net::TcpStream::connect(("127.0.0.1", port))
            .is_err()
            .then_some(())
    });
    peer.wait_for_round_trips(30);
    let why = wait_until("closed at the drain time", Duration::from_secs(10), || {
        peer.ended()
    });
    assert!(why.starts_with("closed"), "{why}");
    let code = wait_until("exit", Duration::from_secs(10), || s.try_exit());
    assert_eq!(code, Some(0));
}

/// `svidcar wait` started before the sidecar returns once it is ready; against nothing
/// it gives up at its timeout and says what it last saw.
#[test]
fn svidcar_wait_blocks_until_ready() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let nothing = free_port();
    let out = Command::new(BIN)
        .args(["wait", "--timeout", "1s", "--admin"])
        .arg(format!("127.0.0.1:{nothing}"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not ready after 1s") && err.contains("refused"),
        "{err}"
    );

    let admin = free_port();
    let waiting = Command::new(BIN)
        .args(["wait", "--timeout", "30s", "--admin"])
        .arg(format!("127.0.0.1:{admin}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let echo = EchoServer::start();
    let config = d.join("s.yaml");
    std::fs::write(
        &config,
        format!(
            "admin: {{listen: 127.0.0.1:{admin}}}\n{}inbound:\n  - name: in\n    listen: 127.0.0.1:{}\n    forward: 127.0.0.1:{}\n    allow: [{{trust_domain: example.org}}]\n",
            identity(d, "spiffe://example.org/server"),
            free_port(),
            echo.port
        ),
    )
    .unwrap();
    let mut sidecar = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&config)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = wait_output(waiting, Duration::from_secs(30));
    let _ = sidecar.kill();
    let _ = sidecar.wait();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("is ready"));
}

/// A files identity nobody renews: `/ready` is 200 while the SVID has more than
/// `admin.ready_min_svid_validity` left, then 503 saying why.
#[test]
fn ready_turns_503_when_the_svid_nears_expiry_unrenewed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = TestCa::new("example.org");
    let (bundle, _) = ca.write(d, "ca");
    let now = SystemTime::now();
    let (cert, key) = ca.leaf(
        d,
        "svid",
        &["spiffe://example.org/server"],
        now - Duration::from_secs(60),
        now + Duration::from_secs(14),
    );
    let echo = EchoServer::start();
    let s = Svidcar::start_admin(
        d,
        "server",
        ", ready_min_svid_validity: 10s",
        &format!(
            "identity:\n  files: {{cert: {}, key: {}, bundle: {}}}\ninbound:\n  - name: in\n    listen: 127.0.0.1:{}\n    forward: 127.0.0.1:{}\n    allow: [{{trust_domain: example.org}}]\n",
            cert.display(),
            key.display(),
            bundle.display(),
            free_port(),
            echo.port
        ),
    );
    let body = wait_until("/ready 503", Duration::from_secs(15), || {
        match http_get(s.admin, "/ready") {
            Some((503, body)) => Some(body),
            _ => None,
        }
    });
    // It was 200 at start (Svidcar::start waits for that); now it says why not.
    let left: u64 = body
        .split("expires in ")
        .nth(1)
        .and_then(|r| r.split('s').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(99);
    assert!(left < 10, "503 only within the 10 s margin: {body}");
    assert!(
        body.contains("spiffe://example.org/server expires in") && body.contains("no renewal"),
        "{body}"
    );
}
