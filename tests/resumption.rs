//! TLS session resumption that never weakens a check (issue 15). The client is Python's
//! ssl (OpenSSL): one full handshake, its session kept, then a second connection that
//! offers it. A resumed session is refused whenever a full handshake would be: the
//! peer's SVID expired, the allowlist changed, a CA left the bundle, our SVID rotated.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, SystemTime};

use common::*;

/// Connects once (full handshake, echo), keeps the session and prints `first ok`;
/// on each line from stdin connects again offering it and prints one line of JSON:
/// whether the session was reused and whether the echo came back.
const CLIENT: &str = r#"
import json, socket, ssl, sys
port, cert, key, ca = sys.argv[1:5]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.load_verify_locations(ca)
ctx.load_cert_chain(cert, key)
def once(session=None):
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", int(port))), session=session)
    s.settimeout(5)
    s.sendall(b"hello")
    got = b""
    try:
        while len(got) < 5:
            b = s.recv(5 - len(got))
            if not b:
                break
            got += b
    except Exception as e:
        got = ("error: %s" % e).encode()
    return s, got
s, got = once()
assert got == b"hello", got
session = s.session
lifetime = session.ticket_lifetime_hint if session is not None else -1
s.close()
print("first ok %d" % lifetime, flush=True)
while sys.stdin.readline():
    try:
        s2, got2 = once(session)
        out = {"reused": s2.session_reused, "echo": got2 == b"hello", "got": got2.decode(errors="replace")}
    except Exception as e:
        out = {"reused": False, "echo": False, "got": "handshake failed: %s" % e}
    print(json.dumps(out), flush=True)
"#;

struct Client {
    child: Child,
    stdin: ChildStdin,
    out: BufReader<std::process::ChildStdout>,
    /// The ticket lifetime the server announced, in seconds.
    lifetime: i64,
}

impl Client {
    fn start(dir: &Path, port: u16, cert: &(PathBuf, PathBuf), ca: &Path) -> Self {
        let script = dir.join("resume.py");
        std::fs::write(&script, CLIENT).unwrap();
        let mut child = Command::new("python3")
            .arg(&script)
            .arg(port.to_string())
            .arg(&cert.0)
            .arg(&cert.1)
            .arg(ca)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let lifetime = line
            .trim()
            .strip_prefix("first ok ")
            .unwrap_or_else(|| panic!("first connection: {line}"))
            .parse()
            .unwrap();
        Self {
            child,
            stdin,
            out,
            lifetime,
        }
    }

    /// One more connection offering the first one's session: (session reused, echo
    /// came back).
    fn again(&mut self) -> (bool, bool) {
        writeln!(self.stdin).unwrap();
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        (v["reused"] == true, v["echo"] == true)
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

fn server_config(dir: &Path, port: u16, app: u16, allow: &str, extra: &str) -> String {
    format!(
        "{extra}identity:\n  dev: {{spiffe_id: \"spiffe://example.org/server\", ca_cert: {}, ca_key: {}}}\ninbound:\n  - name: in\n    listen: 127.0.0.1:{port}\n    forward: 127.0.0.1:{app}\n    allow: [{allow}]\n",
        dir.join("ca.pem").display(),
        dir.join("ca.key").display(),
    )
}

struct Setup {
    dir: tempfile::TempDir,
    echo: EchoServer,
    port: u16,
    ca: TestCa,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let (c, k) = dev_ca(dir.path(), "example.org");
    std::fs::rename(&c, dir.path().join("ca.pem")).unwrap();
    std::fs::rename(&k, dir.path().join("ca.key")).unwrap();
    let ca = TestCa::load(&dir.path().join("ca.pem"), &dir.path().join("ca.key"));
    Setup {
        dir,
        echo: EchoServer::start(),
        port: free_port(),
        ca,
    }
}

const RESUMED: &str = "svidcar_tls_handshakes_total{kind=\"resumed\",listener=\"in\"}";

/// The base case: the second connection resumes, and the ticket lives no longer than our
/// SVID (an hour at most).
#[test]
fn a_second_connection_resumes() {
    let s = setup();
    let d = s.dir.path();
    let a = s.ca.valid_leaf(d, "a", "spiffe://example.org/a");
    let server = Svidcar::start(
        d,
        "server",
        &server_config(d, s.port, s.echo.port, "{trust_domain: example.org}", ""),
    );
    let mut c = Client::start(d, s.port, &a, &d.join("ca.pem"));
    assert!(
        (1..=3600).contains(&c.lifetime),
        "ticket lifetime {}",
        c.lifetime
    );
    assert_eq!(c.again(), (true, true));
    assert_eq!(server.metric(RESUMED), 1.0);
}

/// `tls.session_resumption: false`: every connection is a full handshake.
#[test]
fn resumption_can_be_turned_off() {
    let s = setup();
    let d = s.dir.path();
    let a = s.ca.valid_leaf(d, "a", "spiffe://example.org/a");
    let server = Svidcar::start(
        d,
        "server",
        &server_config(
            d,
            s.port,
            s.echo.port,
            "{trust_domain: example.org}",
            "tls: {session_resumption: false}\n",
        ),
    );
    let mut c = Client::start(d, s.port, &a, &d.join("ca.pem"));
    assert_eq!(c.again(), (false, true));
    assert_eq!(server.metric(RESUMED), 0.0);
}

/// The peer's SVID expires between the two connections: the session resumes at the TLS
/// level, and is refused at once for that reason.
#[test]
fn a_resumed_peer_whose_svid_expired_is_refused() {
    let s = setup();
    let d = s.dir.path();
    let now = SystemTime::now();
    let short = s.ca.leaf(
        d,
        "short",
        &["spiffe://example.org/short"],
        now - Duration::from_secs(60),
        now + Duration::from_secs(3),
    );
    let server = Svidcar::start(
        d,
        "server",
        &server_config(d, s.port, s.echo.port, "{trust_domain: example.org}", ""),
    );
    let mut c = Client::start(d, s.port, &short, &d.join("ca.pem"));
    wait_until("the peer's SVID expired", Duration::from_secs(10), || {
        (SystemTime::now() > now + Duration::from_secs(4)).then_some(())
    });
    let (_, echo) = c.again();
    assert!(!echo, "an expired peer got through on a resumed session");
    let line = server.wait_log(&["handshake rejected", "spiffe://example.org/short"]);
    assert!(line.contains("reason=\"expired\""), "{line}");
    assert_eq!(server.metric(RESUMED), 1.0);
}

/// A CA in the peer's chain expires between two resumptions of the same session, its
/// leaf still valid: the second is refused, as a full handshake would be. (A check of
/// resumed peers cached until the leaf's expiry let it through.)
#[test]
fn a_resumed_peer_whose_intermediate_expired_is_refused() {
    let s = setup();
    let d = s.dir.path();
    let expires = SystemTime::now() + Duration::from_secs(8);
    let intermediate = s.ca.intermediate(expires);
    let peer = intermediate.valid_leaf(d, "behind", "spiffe://example.org/behind");
    intermediate.append_to(&peer.0);
    let server = Svidcar::start(
        d,
        "server",
        &server_config(d, s.port, s.echo.port, "{trust_domain: example.org}", ""),
    );
    let mut c = Client::start(d, s.port, &peer, &d.join("ca.pem"));
    assert_eq!(
        c.again(),
        (true, true),
        "no resumption before the CA expired"
    );
    wait_until("the intermediate expired", Duration::from_secs(15), || {
        (SystemTime::now() > expires + Duration::from_secs(1)).then_some(())
    });
    let (_, echo) = c.again();
    assert!(
        !echo,
        "a peer whose CA expired got through on a resumed session"
    );
    let line = server.wait_log(&["handshake rejected", "spiffe://example.org/behind"]);
    // As a full handshake says it: a certificate of the chain has expired.
    assert!(line.contains("reason=\"expired\""), "{line}");
    assert_eq!(server.metric(RESUMED), 2.0);
}

/// The allowlist changes between the two connections: the ticket is worthless, the full
/// handshake refuses the peer.
#[test]
fn a_changed_allowlist_is_not_bypassed_by_a_ticket() {
    let s = setup();
    let d = s.dir.path();
    let a = s.ca.valid_leaf(d, "a", "spiffe://example.org/a");
    let server = Svidcar::start(
        d,
        "server",
        &server_config(
            d,
            s.port,
            s.echo.port,
            "{exact: \"spiffe://example.org/a\"}",
            "",
        ),
    );
    let mut c = Client::start(d, s.port, &a, &d.join("ca.pem"));
    replace_file(
        &d.join("server.yaml"),
        &format!(
            "admin: {{listen: 127.0.0.1:{}}}\n{}",
            server.admin,
            server_config(
                d,
                s.port,
                s.echo.port,
                "{exact: \"spiffe://example.org/b\"}",
                ""
            )
        ),
    );
    server.wait_log(&["config reloaded"]);
    assert_eq!(c.again(), (false, false));
    server.wait_log(&[
        "handshake rejected",
        "spiffe://example.org/a",
        "not allowed",
    ]);
    assert_eq!(server.metric(RESUMED), 0.0);
}

/// Our SVID rotates between the two connections: a full handshake, with the new SVID.
#[test]
fn after_our_svid_rotates_the_next_connection_is_a_full_handshake() {
    let s = setup();
    let d = s.dir.path();
    let a = s.ca.valid_leaf(d, "a", "spiffe://example.org/a");
    let config = format!(
        "identity:\n  dev: {{spiffe_id: \"spiffe://example.org/server\", ca_cert: {}, ca_key: {}, svid_ttl: 4s}}\ninbound:\n  - name: in\n    listen: 127.0.0.1:{}\n    forward: 127.0.0.1:{}\n    allow: [{{trust_domain: example.org}}]\n",
        d.join("ca.pem").display(),
        d.join("ca.key").display(),
        s.port,
        s.echo.port
    );
    let server = Svidcar::start(d, "server", &config);
    let serial = server.serial();
    let mut c = Client::start(d, s.port, &a, &d.join("ca.pem"));
    assert!(c.lifetime <= 4, "ticket outlives our SVID: {}", c.lifetime);
    wait_until("our SVID rotated", Duration::from_secs(10), || {
        (server.serial() != serial).then_some(())
    });
    assert_eq!(c.again(), (false, true));
    assert_eq!(server.metric(RESUMED), 0.0);
}

/// A CA leaves the bundle (files identity, bundle file rewritten) between the two
/// connections: the peer it signed is refused, ticket or not.
#[test]
fn a_ca_removed_from_the_bundle_is_not_bypassed_by_a_ticket() {
    let s = setup();
    let d = s.dir.path();
    let other = TestCa::new("example.org");
    let peer = other.valid_leaf(d, "peer", "spiffe://example.org/peer");
    let own = s.ca.valid_leaf(d, "own", "spiffe://example.org/server");
    let bundle = d.join("bundle.pem");
    let ca_pem = std::fs::read_to_string(d.join("ca.pem")).unwrap();
    std::fs::write(&bundle, ca_pem.clone() + &other.cert_pem).unwrap();
    let server = Svidcar::start(
        d,
        "server",
        &format!(
            "identity:\n  files: {{cert: {}, key: {}, bundle: {}}}\ninbound:\n  - name: in\n    listen: 127.0.0.1:{}\n    forward: 127.0.0.1:{}\n    allow: [{{trust_domain: example.org}}]\n",
            own.0.display(),
            own.1.display(),
            bundle.display(),
            s.port,
            s.echo.port
        ),
    );
    let mut c = Client::start(d, s.port, &peer, &d.join("ca.pem"));
    replace_file(&bundle, &ca_pem);
    server.wait_log(&["identity updated", "bundles=1"]);
    assert_eq!(c.again(), (false, false));
    server.wait_log(&["handshake rejected", "chain_invalid"]);
    assert_eq!(server.metric(RESUMED), 0.0);
}

/// Between two svidcars: the outbound side resumes its sessions to the inbound side.
#[test]
fn a_pair_resumes_between_its_sidecars() {
    let s = setup();
    let d = s.dir.path();
    let server = Svidcar::start(
        d,
        "server",
        &server_config(d, s.port, s.echo.port, "{trust_domain: example.org}", ""),
    );
    let out = free_port();
    let client = Svidcar::start(
        d,
        "client",
        &format!(
            "identity:\n  dev: {{spiffe_id: \"spiffe://example.org/client\", ca_cert: {}, ca_key: {}}}\noutbound:\n  - name: out\n    listen: 127.0.0.1:{out}\n    connect: 127.0.0.1:{}\n    expect: [{{exact: \"spiffe://example.org/server\"}}]\n",
            d.join("ca.pem").display(),
            d.join("ca.key").display(),
            s.port
        ),
    );
    for i in 0..5 {
        let msg = format!("round {i}");
        assert_eq!(
            echo_roundtrip(&mut connect(out), msg.as_bytes()).unwrap(),
            msg.as_bytes()
        );
    }
    wait_until("4 resumed", Duration::from_secs(10), || {
        (server.metric(RESUMED) == 4.0).then_some(())
    });
    assert_eq!(
        client.metric("svidcar_tls_handshakes_total{kind=\"resumed\",listener=\"out\"}"),
        4.0
    );
}
