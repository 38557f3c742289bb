//! The core sidecar, end to end: two svidcar processes sharing a dev CA, real peers
//! (openssl s_client, curl), and the reasons svidcar gives when it refuses.

mod common;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, SystemTime};

use common::*;

const WEB: &str = "spiffe://example.org/ns/default/sa/web";
const BACKEND: &str = "spiffe://example.org/ns/default/sa/backend";

fn dev_identity(ca: &(std::path::PathBuf, std::path::PathBuf), id: &str, ttl: &str) -> String {
    format!(
        "identity:\n  dev: {{trust_domain: example.org, spiffe_id: \"{id}\", svid_ttl: {ttl}, ca_cert: {}, ca_key: {}}}\n",
        ca.0.display(),
        ca.1.display()
    )
}

/// The backend side: an inbound svidcar in front of `app_port`, allowing `allow`.
fn backend(
    dir: &Path,
    ca: &(std::path::PathBuf, std::path::PathBuf),
    app_port: u16,
    allow: &str,
    ttl: &str,
) -> (Svidcar, u16) {
    let port = free_port();
    let cfg = format!(
        "{}inbound:\n  - name: app\n    listen: 127.0.0.1:{port}\n    forward: 127.0.0.1:{app_port}\n    allow:\n      - {allow}\n",
        dev_identity(ca, BACKEND, ttl)
    );
    (Svidcar::start(dir, "backend", &cfg), port)
}

/// The client side: an outbound svidcar to `peer_port`, expecting `expect`.
fn frontend(
    dir: &Path,
    ca: &(std::path::PathBuf, std::path::PathBuf),
    peer_port: u16,
    expect: &str,
    ttl: &str,
) -> (Svidcar, u16) {
    let port = free_port();
    let cfg = format!(
        "{}outbound:\n  - name: to-backend\n    listen: 127.0.0.1:{port}\n    connect: localhost:{peer_port}\n    expect:\n      - {expect}\n",
        dev_identity(ca, WEB, ttl)
    );
    (Svidcar::start(dir, "frontend", &cfg), port)
}

fn pattern(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x1234_5678;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

#[test]
fn pair_carries_bytes_both_ways_50mib_and_half_close() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dev_ca(dir.path(), "example.org");
    let echo = EchoServer::start();
    let (back, in_port) = backend(dir.path(), &ca, echo.port, &format!("exact: {WEB}"), "1h");
    let (front, out_port) = frontend(dir.path(), &ca, in_port, &format!("exact: {BACKEND}"), "1h");

    // A small round trip.
    let mut s = connect(out_port);
    assert_eq!(
        echo_roundtrip(&mut s, b"hello through mTLS").unwrap(),
        b"hello through mTLS"
    );

    // 50 MiB: a writer thread streams, this thread reads the echo and compares.
    let data = pattern(50 * 1024 * 1024);
    let mut w = s.try_clone().unwrap();
    let to_send = data.clone();
    let writer = thread::spawn(move || {
        for chunk in to_send.chunks(256 * 1024) {
            w.write_all(chunk).unwrap();
        }
        // Half-close: no more bytes from us, the echo must still come back whole.
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut got = Vec::with_capacity(data.len());
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.read_to_end(&mut got).unwrap();
    writer.join().unwrap();
    assert_eq!(got.len(), data.len(), "all 50 MiB came back");
    assert!(got == data, "bytes intact");

    // The peer IDs were checked and logged both ways.
    back.wait_log(&["accepted mTLS connection", WEB]);
    front.wait_log(&["established mTLS connection", BACKEND]);
    assert!(
        back.metric("svidcar_bytes_total{direction=\"rx\",listener=\"app\"}") >= data.len() as f64
    );
}

#[test]
fn half_close_server_answers_after_client_eof() {
    // A server that reads to EOF and only then answers: needs the FIN carried through
    // both proxies (as close_notify over TLS) while the return path stays open.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let app_port = l.local_addr().unwrap().port();
    thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut req = Vec::new();
        c.read_to_end(&mut req).unwrap();
        c.write_all(format!("got {} bytes", req.len()).as_bytes())
            .unwrap();
    });
    let dir = tempfile::tempdir().unwrap();
    let ca = dev_ca(dir.path(), "example.org");
    let (_back, in_port) = backend(dir.path(), &ca, app_port, &format!("exact: {WEB}"), "1h");
    let (_front, out_port) = frontend(dir.path(), &ca, in_port, &format!("exact: {BACKEND}"), "1h");
    let mut s = connect(out_port);
    s.write_all(&[7u8; 100_000]).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_all(&mut s), b"got 100000 bytes");
}

#[test]
fn inbound_refuses_bad_clients_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (ca_cert, ca_key) = dev_ca(d, "example.org");
    let echo = EchoServer::start();
    let (back, in_port) = backend(
        d,
        &(ca_cert.clone(), ca_key.clone()),
        echo.port,
        &format!("exact: {WEB}"),
        "1h",
    );

    // The test's own copy of the shared CA signs its clients.
    let shared = TestCa::load(&ca_cert, &ca_key);
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);

    // A client that is allowed gets through (control case for the refusals below).
    let good = shared.valid_leaf(d, "good", WEB);
    let out = s_client(in_port, Some((&good.0, &good.1)), &[], b"ping");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("ping"),
        "allowed client must be echoed: {out:?}"
    );

    let failures = |reason: &str| {
        back.metric(&format!(
            "svidcar_handshake_failures_total{{listener=\"app\",reason=\"{reason}\"}}"
        ))
    };

    // 1. A valid SVID whose SPIFFE ID is not on the allowlist.
    let other = shared.valid_leaf(d, "other", "spiffe://example.org/ns/default/sa/intruder");
    let out = s_client(in_port, Some((&other.0, &other.1)), &[], b"ping");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("ping"));
    back.wait_log(&[
        "handshake rejected",
        "spiffe://example.org/ns/default/sa/intruder not allowed",
        "spiffe_id_not_allowed",
    ]);
    assert_eq!(failures("spiffe_id_not_allowed"), 1.0);

    // 2. No client certificate.
    let out = s_client(in_port, None, &[], b"ping");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("ping"));
    back.wait_log(&["handshake rejected", "no client certificate presented"]);
    assert_eq!(failures("no_client_certificate"), 1.0);

    // 3. Another CA claiming the same trust domain and an allowed ID.
    let rogue = TestCa::new("example.org");
    let forged = rogue.valid_leaf(d, "forged", WEB);
    let out = s_client(in_port, Some((&forged.0, &forged.1)), &[], b"ping");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("ping"));
    back.wait_log(&[
        "handshake rejected",
        "chain invalid",
        "not signed by a CA of trust domain example.org",
    ]);
    assert_eq!(failures("chain_invalid"), 1.0);

    // 4. An expired SVID from the right CA with an allowed ID.
    let expired = shared.leaf(d, "expired", &[WEB], now - 2 * hour, now - hour);
    let out = s_client(in_port, Some((&expired.0, &expired.1)), &[], b"ping");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("ping"));
    back.wait_log(&["handshake rejected", "peer certificate expired", WEB]);
    assert_eq!(failures("expired"), 1.0);

    // 5. Plain TCP garbage.
    let mut s = connect(in_port);
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let answer = read_all(&mut s);
    assert!(
        !answer.starts_with(b"HTTP"),
        "garbage must not reach the app: {answer:?}"
    );
    back.wait_log(&["handshake rejected", "TLS protocol error"]);
    assert_eq!(failures("protocol_error"), 1.0);

    // 6. Two URI SANs, and a trust domain we have no bundle for.
    let two = shared.leaf(
        d,
        "two",
        &[WEB, "spiffe://example.org/x"],
        now - hour,
        now + hour,
    );
    s_client(in_port, Some((&two.0, &two.1)), &[], b"ping");
    back.wait_log(&["handshake rejected", "2 URI SANs"]);
    let foreign = TestCa::new("partner.example");
    let partner = foreign.valid_leaf(d, "partner", "spiffe://partner.example/web");
    s_client(in_port, Some((&partner.0, &partner.1)), &[], b"ping");
    back.wait_log(&["handshake rejected", "unknown trust domain partner.example"]);

    // Nothing of this disturbed the allowed client.
    let out = s_client(in_port, Some((&good.0, &good.1)), &[], b"pong");
    assert!(String::from_utf8_lossy(&out.stdout).contains("pong"));
    // Keys never reach the log.
    assert!(!back.logs().contains("PRIVATE KEY"));
}

#[test]
fn outbound_refuses_unexpected_server_id() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dev_ca(dir.path(), "example.org");
    let echo = EchoServer::start();
    let (_back, in_port) = backend(dir.path(), &ca, echo.port, &format!("exact: {WEB}"), "1h");
    let (front, out_port) = frontend(
        dir.path(),
        &ca,
        in_port,
        "exact: spiffe://example.org/ns/default/sa/somebody-else",
        "1h",
    );
    let mut s = connect(out_port);
    let _ = s.write_all(b"secret request");
    assert!(read_all(&mut s).is_empty(), "nothing may come back");
    front.wait_log(&[
        "handshake rejected",
        &format!("SPIFFE ID {BACKEND} not allowed"),
    ]);
    assert_eq!(
        front.metric("svidcar_handshake_failures_total{listener=\"to-backend\",reason=\"spiffe_id_not_allowed\"}"),
        1.0
    );
}

#[test]
fn interop_openssl_and_curl_as_mtls_clients() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = TestCa::new("example.org");
    let (ca_cert, ca_key) = ca.write(d, "ca");
    let app = http_server("hello from the app\n");
    let (back, in_port) = backend(
        d,
        &(ca_cert.clone(), ca_key),
        app,
        &format!("exact: {WEB}"),
        "1h",
    );
    let client = ca.valid_leaf(d, "web", WEB);

    // openssl verifies svidcar's chain against the CA and speaks HTTP through it.
    let out = s_client(
        in_port,
        Some((&client.0, &client.1)),
        &["-CAfile", ca_cert.to_str().unwrap(), "-verify_return_error"],
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("hello from the app"), "{out:?}");

    // curl: an HTTP client over mTLS. svidcar's SVID has no DNS name, so curl's host
    // check is off (-k) and the SPIFFE check is svidcar's inbound side.
    let out = Command::new("curl")
        .args(["-sS", "-k", "--cert"])
        .arg(&client.0)
        .arg("--key")
        .arg(&client.1)
        .arg(format!("https://127.0.0.1:{in_port}/"))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from the app\n",
        "{out:?}"
    );
    back.wait_log(&["accepted mTLS connection", WEB]);

    // TLS 1.2 is refused by default (min_version 1.3).
    let out = s_client(
        in_port,
        Some((&client.0, &client.1)),
        &["-tls1_2"],
        b"GET / HTTP/1.0\r\n\r\n",
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("hello"));
}

#[test]
fn tls12_when_allowed_by_config() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = TestCa::new("example.org");
    let (ca_cert, ca_key) = ca.write(d, "ca");
    let app = http_server("v12\n");
    let port = free_port();
    let cfg = format!(
        "{}tls: {{min_version: \"1.2\"}}\ninbound:\n  - name: app\n    listen: 127.0.0.1:{port}\n    forward: 127.0.0.1:{app}\n    allow: [{{exact: \"{WEB}\"}}]\n",
        dev_identity(&(ca_cert, ca_key), BACKEND, "1h")
    );
    let _s = Svidcar::start(d, "tls12", &cfg);
    let client = ca.valid_leaf(d, "web", WEB);
    let out = s_client(
        port,
        Some((&client.0, &client.1)),
        &["-tls1_2"],
        b"GET / HTTP/1.0\r\n\r\n",
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("v12"), "{out:?}");
}

#[test]
fn rotation_under_load_drops_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca_files = dev_ca(d, "example.org");
    let echo = EchoServer::start();
    // TTL 4s: a new SVID every 2 s on both sides.
    let (back, in_port) = backend(d, &ca_files, echo.port, &format!("exact: {WEB}"), "4s");
    let (front, out_port) = frontend(d, &ca_files, in_port, &format!("exact: {BACKEND}"), "4s");

    let shared = TestCa::load(&ca_files.0, &ca_files.1);
    let probe = shared.valid_leaf(d, "probe", WEB);

    // A connection opened before any rotation, used throughout.
    let mut long_lived = connect(out_port);
    let first_serial = presented_serial(in_port, (&probe.0, &probe.1));
    assert_eq!(
        first_serial,
        back.serial(),
        "openssl sees what /certs reports"
    );

    let mut serials = vec![first_serial];
    let mut requests = 0u32;
    let mut failures = Vec::new();
    let start_version = back.metric("svidcar_identity_version");
    while back.metric("svidcar_identity_version") < start_version + 3.0
        || front.metric("svidcar_identity_version") < start_version + 3.0
    {
        // A new connection per request...
        let msg = format!("request {requests}");
        match std::net::TcpStream::connect(("127.0.0.1", out_port)).and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            echo_roundtrip(&mut s, msg.as_bytes())
        }) {
            Ok(back) if back == msg.as_bytes() => {}
            other => failures.push(format!("{msg}: {other:?}")),
        }
        // ...and one on the connection opened before the rotations.
        match echo_roundtrip(&mut long_lived, msg.as_bytes()) {
            Ok(back) if back == msg.as_bytes() => {}
            other => failures.push(format!("long-lived {msg}: {other:?}")),
        }
        requests += 1;
        if requests.is_multiple_of(20) {
            let s = presented_serial(in_port, (&probe.0, &probe.1));
            if serials.last() != Some(&s) {
                serials.push(s);
            }
        }
        assert!(requests < 200_000, "rotations did not happen");
    }
    let s = presented_serial(in_port, (&probe.0, &probe.1));
    if serials.last() != Some(&s) {
        serials.push(s);
    }
    assert!(
        failures.is_empty(),
        "{} of {requests} requests failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(
        serials.len() >= 3,
        "presented serial must change with rotation: {serials:?}"
    );
    assert!(requests > 50, "load was applied ({requests} requests)");
    assert_eq!(
        back.metric("svidcar_handshake_failures_total{listener=\"app\",reason=\"expired\"}"),
        0.0
    );
}

#[test]
fn connection_limit_and_worker_threads() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = dev_ca(d, "example.org");
    let echo = EchoServer::start();
    let port = free_port();
    let peer = free_port();
    // One process is both ends: outbound (limit 1) -> its own inbound -> echo.
    let cfg = format!(
        "{}worker_threads: 1\noutbound:\n  - name: limited\n    listen: 127.0.0.1:{port}\n    connect: 127.0.0.1:{peer}\n    max_connections: 1\n    expect: [{{exact: \"{WEB}\"}}]\ninbound:\n  - name: app\n    listen: 127.0.0.1:{peer}\n    forward: 127.0.0.1:{}\n    allow_any_in_trust_domain: true\n",
        dev_identity(&ca, WEB, "1h"),
        echo.port
    );
    let s = Svidcar::start(d, "limited", &cfg);
    let mut first = connect(port);
    assert_eq!(echo_roundtrip(&mut first, b"one").unwrap(), b"one");
    let mut second = connect(port);
    assert!(
        echo_roundtrip(&mut second, b"two").is_err(),
        "second connection is over the limit"
    );
    s.wait_log(&["connection refused", "connection limit"]);
    assert_eq!(
        s.metric("svidcar_connection_errors_total{listener=\"limited\",reason=\"over_limit\"}"),
        1.0
    );
    // The first connection is unaffected.
    assert_eq!(echo_roundtrip(&mut first, b"still").unwrap(), b"still");

    // worker_threads: 1 means one thread carries all traffic: the main thread runs the
    // one event loop. Besides it there is only the config file's watcher (no
    // blocking-pool thread is started by this config: dev identity, IP addresses only).
    let mut threads: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", s.pid()))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|c| c.trim().to_string())
        .filter(|c| !c.starts_with("notify-rs"))
        .collect();
    threads.sort();
    assert_eq!(threads, ["svidcar"]);
}

#[test]
fn files_source_reloads_on_atomic_rename() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = TestCa::new("example.org");
    let (ca_cert, _) = ca.write(d, "ca");
    let certs = d.join("certs");
    std::fs::create_dir(&certs).unwrap();
    let (c, k) = ca.valid_leaf(&certs, "svid", BACKEND);
    let echo = EchoServer::start();
    let port = free_port();
    let cfg = format!(
        "identity:\n  files: {{cert: {}, key: {}, bundle: {}}}\ninbound:\n  - name: app\n    listen: 127.0.0.1:{port}\n    forward: 127.0.0.1:{}\n    allow: [{{exact: \"{WEB}\"}}]\n",
        c.display(), k.display(), ca_cert.display(), echo.port
    );
    let s = Svidcar::start(d, "files", &cfg);
    let client = ca.valid_leaf(d, "web", WEB);
    let before = presented_serial(port, (&client.0, &client.1));
    assert_eq!(before, s.serial());

    // Write the new pair beside, then rename over (as spiffe-helper and csi drivers do).
    let (nc, nk) = ca.valid_leaf(&certs, "next", BACKEND);
    std::fs::rename(&nk, &k).unwrap();
    std::fs::rename(&nc, &c).unwrap();
    let after = wait_until("reloaded serial", Duration::from_secs(10), || {
        let now = s.serial();
        (now != before).then_some(now)
    });
    assert_eq!(presented_serial(port, (&client.0, &client.1)), after);

    // A broken write is not loaded: the current identity stays.
    std::fs::write(&c, "-----BEGIN CERTIFICATE-----\nnot base64\n").unwrap();
    s.wait_log(&["do not load", "keeping the current identity"]);
    assert_eq!(s.serial(), after);
    let out = s_client(port, Some((&client.0, &client.1)), &[], b"ok?");
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok?"));
}

#[test]
fn tcp_probes_are_not_rejections() {
    // A kubelet TCP probe connects and closes: counted, logged at debug, not a warning.
    let dir = tempfile::tempdir().unwrap();
    let ca = dev_ca(dir.path(), "example.org");
    let echo = EchoServer::start();
    let (back, in_port) = backend(dir.path(), &ca, echo.port, &format!("exact: {WEB}"), "1h");
    drop(connect(in_port));
    back.wait_log(&[
        "DEBUG",
        "handshake not completed",
        "closed_during_handshake",
    ]);
    assert!(!back.logs().contains("WARN"), "{}", back.logs());
}

#[test]
fn alpn_idle_timeout_and_upstream_failure() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = TestCa::new("example.org");
    let (ca_cert, ca_key) = ca.write(d, "ca");
    let echo = EchoServer::start();
    let (port, dead_port, out_port) = (free_port(), free_port(), free_port());
    let cfg = format!(
        "{}inbound:\n  - name: app\n    listen: 127.0.0.1:{port}\n    forward: 127.0.0.1:{}\n    alpn: [h2, http/1.1]\n    idle_timeout: 1s\n    allow: [{{exact: \"{WEB}\"}}]\noutbound:\n  - name: nowhere\n    listen: 127.0.0.1:{out_port}\n    connect: 127.0.0.1:{dead_port}\n    connect_timeout: 2s\n    expect: [{{exact: \"{WEB}\"}}]\n",
        dev_identity(&(ca_cert, ca_key), BACKEND, "1h"),
        echo.port
    );
    let s = Svidcar::start(d, "alpn", &cfg);
    let client = ca.valid_leaf(d, "web", WEB);

    // ALPN: the configured protocol is negotiated.
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-alpn",
            "h2",
            "-cert",
        ])
        .arg(&client.0)
        .arg("-key")
        .arg(&client.1)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("ALPN protocol: h2"), "{text}");

    // Idle: a connection with no traffic is closed by svidcar after 1 s.
    let mut c = std::process::Command::new("openssl")
        .args([
            "s_client",
            "-quiet",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-cert",
        ])
        .arg(&client.0)
        .arg("-key")
        .arg(&client.1)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let _keep_stdin_open = c.stdin.take();
    let out = wait_output(c, Duration::from_secs(10));
    assert!(
        out.status.code().is_some(),
        "openssl must exit because svidcar closed the idle connection"
    );
    s.wait_log(&["connection closed: idle timeout"]);
    assert_eq!(
        s.metric("svidcar_connection_errors_total{listener=\"app\",reason=\"idle_timeout\"}"),
        1.0
    );

    // Upstream down: the app's connection is closed, the reason logged and counted.
    let mut app = connect(out_port);
    assert!(read_all(&mut app).is_empty());
    s.wait_log(&["cannot connect upstream", &format!("127.0.0.1:{dead_port}")]);
    assert_eq!(s.metric("svidcar_connection_errors_total{listener=\"nowhere\",reason=\"upstream_connect_failed\"}"), 1.0);
}

#[test]
fn sigterm_drains_open_connections() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dev_ca(dir.path(), "example.org");
    let echo = EchoServer::start();
    let (mut back, in_port) = backend(dir.path(), &ca, echo.port, &format!("exact: {WEB}"), "1h");
    let (_front, out_port) = frontend(dir.path(), &ca, in_port, &format!("exact: {BACKEND}"), "1h");
    let mut open = connect(out_port);
    assert_eq!(echo_roundtrip(&mut open, b"before").unwrap(), b"before");

    // SIGTERM the backend: it stops accepting but the open connection keeps working.
    signal(back.pid(), "-TERM");
    back.wait_log(&["shutting down", "draining"]);
    back.wait_log(&["stopped accepting"]);
    assert_eq!(
        echo_roundtrip(&mut open, b"during drain").unwrap(),
        b"during drain"
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", in_port)).is_err(),
        "no new connections"
    );
    // Closing the last connection lets the process exit cleanly before the drain timeout.
    open.shutdown(Shutdown::Write).unwrap();
    read_all(&mut open);
    let code = wait_until("backend exit", Duration::from_secs(10), || back.try_exit());
    assert_eq!(code, Some(0));
}

#[test]
fn a_ticket_does_not_outlive_a_ca_removed_from_the_bundle() {
    // rustls skips certificate verification on a resumed session: svidcar's tickets die
    // with every identity change, and a resumed peer is checked again (tls::resumption).
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let old_ca = TestCa::new("example.org");
    let new_ca = TestCa::new("example.org");
    let bundle = d.join("bundle.pem");
    std::fs::write(&bundle, format!("{}{}", old_ca.cert_pem, new_ca.cert_pem)).unwrap();
    let (c, k) = new_ca.valid_leaf(d, "svid", BACKEND);
    let echo = EchoServer::start();
    let port = free_port();
    let cfg = format!(
        "identity:\n  files: {{cert: {}, key: {}, bundle: {}}}\ninbound:\n  - name: app\n    listen: 127.0.0.1:{port}\n    forward: 127.0.0.1:{}\n    allow: [{{exact: \"{WEB}\"}}]\n",
        c.display(), k.display(), bundle.display(), echo.port
    );
    let s = Svidcar::start(d, "resume", &cfg);
    let client = old_ca.valid_leaf(d, "web", WEB);
    let sess = d.join("session.pem");
    let summary = |extra: &[&str]| {
        let out = Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &format!("127.0.0.1:{port}"),
                "-cert",
            ])
            .arg(&client.0)
            .arg("-key")
            .arg(&client.1)
            .args(extra)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let first = summary(&["-sess_out", sess.to_str().unwrap()]);
    assert!(first.contains("New, TLSv1.3"), "{first}");
    // A ticket, held for later (s_client exits as soon as stdin ends: it may leave
    // before the ticket arrives; then there is nothing to offer).
    let ticket = sess.exists();

    // The old CA leaves the bundle: the same client is refused from the next connection on.
    let tmp = d.join("bundle.new");
    std::fs::write(&tmp, &new_ca.cert_pem).unwrap();
    std::fs::rename(&tmp, &bundle).unwrap();
    wait_until("bundle reload", Duration::from_secs(10), || {
        let (_, certs) = http_get(s.admin, "/certs")?;
        let v: serde_json::Value = serde_json::from_str(&certs).ok()?;
        (v["bundles"][0]["roots"].as_array()?.len() == 1).then_some(())
    });
    let out = s_client(port, Some((&client.0, &client.1)), &[], b"after removal");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("after removal"),
        "{out:?}"
    );
    s.wait_log(&["handshake rejected", "chain invalid", WEB]);
    if ticket {
        let sess = sess.to_str().unwrap();
        let out = s_client(
            port,
            Some((&client.0, &client.1)),
            &["-sess_in", sess],
            b"ticket",
        );
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("ticket"),
            "{out:?}"
        );
    }
}
