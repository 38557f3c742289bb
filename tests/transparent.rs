//! Transparent mTLS between unmodified apps (issue 11): "pods" are network namespaces
//! on a bridge; in each, `svidcar redirect` installs the rules and `svidcar run` runs
//! as uid 1337. Apps are plain Python servers and curl, run as uid 1000, that know
//! nothing of svidcar: they call each other's real addresses and ports.

mod common;

use std::path::Path;
use std::time::Duration;

use common::netns::{self, read, Capture, Lan, Pod};
use common::*;

const A: &str = "spiffe://example.org/ns/shop/sa/frontend";
const B: &str = "spiffe://example.org/ns/shop/sa/backend";
const INTRUDER: &str = "spiffe://example.org/ns/other/sa/intruder";

/// The config of a pod with identity `id`: inbound allows `allow`, outbound routes the
/// LAN's ports 8080 and 9090 to servers that must be `expect`.
fn pod_config(dir: &Path, id: &str, allow: &str, expect: &str, extra_out: &str) -> String {
    format!(
        r#"identity:
  dev: {{spiffe_id: "{id}", ca_cert: {ca}, ca_key: {key}}}
admin: {{listen: "127.0.0.1:15000"}}
transparent:
  proxy_uid: 1337
  inbound:
    listen: "[::]:15006"
    mode: strict
    allow: [{{exact: "{allow}"}}]
    ports:
      "9090": {{mode: permissive}}
      "3306": {{mode: permissive}}
      "9443": {{allow: [{{exact: "{INTRUDER}"}}]}}
    exclude_ports: [7070]
  outbound:
    listen: "127.0.0.1:15001"
    routes:
      - to: ["10.210.0.2/32", "fd10::2/128"]
        ports: [8080, 9090, 9443]
        expect: [{{exact: "{expect}"}}]
      - to: ["10.210.0.3/32"]
        ports: [8080]
        expect: [{{exact: "spiffe://example.org/ns/shop/sa/expected-at-c"}}]
{extra_out}"#,
        ca = dir.join("ca.pem").display(),
        key = dir.join("ca.key").display(),
    )
}

/// A LAN with pod A (10.210.0.1, frontend) and pod B (10.210.0.2, backend) running
/// svidcar, B's app on 8080 and 9090, and a banner server on 3306.
struct Setup {
    dir: tempfile::TempDir,
    lan: Lan,
    a: Pod,
    b: Pod,
    a_log: std::path::PathBuf,
    b_log: std::path::PathBuf,
}

fn setup(a_extra: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (ca, key) = dev_ca(d, "example.org");
    std::fs::rename(ca, d.join("ca.pem")).unwrap();
    std::fs::rename(key, d.join("ca.key")).unwrap();
    let www = d.join("www");
    std::fs::create_dir(&www).unwrap();
    std::fs::write(www.join("index.html"), "hello from the backend app\n").unwrap();
    let mut lan = Lan::new();
    let mut a = lan.pod("a");
    let mut b = lan.pod("b");
    b.http_app(8080, &www, &d.join("app-8080.log"));
    b.http_app(9090, &www, &d.join("app-9090.log"));
    b.http_app(9443, &www, &d.join("app-9443.log"));
    let mut banner = b.ns.cmd_as(1000, "/usr/bin/python3");
    banner.args([
        "-c",
        "import socket\ns=socket.socket(socket.AF_INET6); s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('::', 3306)); s.listen()\nwhile True:\n    c,_=s.accept(); c.sendall(b'BANNER mysql-ish\\n'); c.close()",
    ]);
    b.spawn(&mut banner, &d.join("app-3306.log"));
    b.wait_port(3306);
    let a_log = a.sidecar(d, "a", &pod_config(d, A, B, B, a_extra));
    let b_log = b.sidecar(d, "b", &pod_config(d, B, A, A, ""));
    Setup {
        dir,
        lan,
        a,
        b,
        a_log,
        b_log,
    }
}

/// The app in A calls B's address and port as if there were no mesh, over IPv4 and
/// IPv6: it gets B's answer; B's svidcar saw A's SPIFFE ID; the bytes on the wire
/// between the pods are TLS, never the HTTP request or answer.
#[test]
fn an_unmodified_app_reaches_its_peer_over_mtls() {
    let s = setup("");
    let capture = Capture::start(s.lan.bridge(), "p2", s.dir.path());
    let (code, body) = s.a.curl(1000, "http://10.210.0.2:8080/index.html");
    assert_eq!(
        (code, body.as_str()),
        (0, "hello from the backend app\n"),
        "{}",
        read(&s.a_log)
    );
    let (code, body) = s.a.curl(1000, "http://[fd10::2]:8080/index.html");
    assert_eq!(
        (code, body.as_str()),
        (0, "hello from the backend app\n"),
        "{}",
        read(&s.a_log)
    );
    let wire = capture.finish();

    let b_log = read(&s.b_log);
    let accepted: Vec<&str> = b_log
        .lines()
        .filter(|l| l.contains("accepted mTLS connection") && l.contains(&format!("peer_id={A}")))
        .collect();
    assert_eq!(
        accepted.len(),
        2,
        "B logs A's SPIFFE ID for each call: {b_log}"
    );
    assert!(
        accepted.iter().any(|l| l.contains("peer=[fd10::1]")),
        "{b_log}"
    );
    assert!(
        accepted
            .iter()
            .any(|l| l.contains("peer=[::ffff:10.210.0.1]")),
        "{b_log}"
    );
    assert_eq!(
        s.a.metric("svidcar_transparent_connections_total{listener=\"transparent-outbound\",outcome=\"mtls\"}"),
        2.0
    );
    assert_eq!(
        s.b.metric("svidcar_transparent_connections_total{listener=\"transparent-inbound\",outcome=\"mtls\"}"),
        2.0
    );
    // The capture saw the traffic (TLS application data records) and no plaintext.
    assert!(
        wire.len() > 1000,
        "the capture saw the calls ({} bytes)",
        wire.len()
    );
    let has = |needle: &[u8]| wire.windows(needle.len()).any(|w| w == needle);
    assert!(has(&[0x17, 0x03, 0x03]), "TLS records on the wire");
    assert!(!has(b"GET /index.html"), "the request crossed in plaintext");
    assert!(
        !has(b"hello from the backend app"),
        "the answer crossed in plaintext"
    );
}

/// From a pod without svidcar: plaintext to B's strict port is refused for that reason
/// (B's app never sees it), and served on B's permissive port; a server-speaks-first
/// service answers at once.
#[test]
fn strict_refuses_plaintext_and_permissive_serves_it() {
    let mut s = setup("");
    let c = s.lan.pod("c");
    let (code, _) = c.curl(1000, "http://10.210.0.2:8080/index.html");
    assert_ne!(code, 0, "plaintext to a strict port must fail");
    let b_log = read(&s.b_log);
    assert!(
        b_log.contains("reason=\"plaintext_refused\"") && b_log.contains("plaintext on port 8080"),
        "{b_log}"
    );
    assert_eq!(
        s.b.metric("svidcar_connection_errors_total{listener=\"transparent-inbound\",reason=\"plaintext_refused\"}"),
        1.0
    );
    let app = read(&s.dir.path().join("app-8080.log"));
    assert!(
        !app.contains("10.210.0.3") && !app.contains("GET"),
        "B's app saw: {app}"
    );

    let (code, body) = c.curl(1000, "http://10.210.0.2:9090/index.html");
    assert_eq!((code, body.as_str()), (0, "hello from the backend app\n"));
    assert_eq!(
        s.b.metric("svidcar_protocol_detection_total{listener=\"transparent-inbound\",result=\"plaintext\"}"),
        1.0
    );

    // 3306 is a server-first port: no waiting for the client's first bytes.
    let script = "import socket,time\nt=time.time(); s=socket.create_connection(('10.210.0.2',3306),5); s.settimeout(5)\nd=s.recv(100); print(d.decode().strip(), round(time.time()-t,3))";
    let out =
        c.ns.cmd("/usr/bin/python3")
            .args(["-c", script])
            .output()
            .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("BANNER mysql-ish"),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        s.b.metric("svidcar_protocol_detection_total{listener=\"transparent-inbound\",result=\"server_first\"}"),
        1.0
    );
}

/// An intruder (another SPIFFE ID) is refused by B's allowlist, but served on the port
/// whose own allowlist names it (where A is refused); A refuses a server whose ID its
/// route does not expect; a destination with no route is passed through, or denied when
/// the config says so.
#[test]
fn intruders_wrong_servers_and_unrouted_destinations() {
    let mut s = setup("");
    let d = s.dir.path().to_path_buf();
    let mut c = s.lan.pod("c");
    let www = d.join("www");
    c.http_app(8080, &www, &d.join("c-8080.log"));
    c.http_app(7070, &www, &d.join("c-7070.log"));
    let c_log = c.sidecar(&d, "c", &pod_config(&d, INTRUDER, A, B, ""));

    // The intruder's app calls B: B's svidcar refuses its ID.
    let (code, _) = c.curl(1000, "http://10.210.0.2:8080/index.html");
    assert_ne!(code, 0);
    let b_log = read(&s.b_log);
    assert!(
        b_log.contains(&format!("SPIFFE ID {INTRUDER} not allowed")),
        "{b_log}"
    );
    assert_eq!(
        s.b.metric("svidcar_handshake_failures_total{listener=\"transparent-inbound\",reason=\"spiffe_id_not_allowed\"}"),
        1.0
    );

    // Port 9443 has its own allowlist: the intruder only.
    let (code, body) = c.curl(1000, "http://10.210.0.2:9443/index.html");
    assert_eq!(
        (code, body.as_str()),
        (0, "hello from the backend app\n"),
        "{}",
        read(&s.b_log)
    );
    let (code, _) = s.a.curl(1000, "http://10.210.0.2:9443/index.html");
    assert_ne!(code, 0);
    assert!(
        read(&s.b_log).contains(&format!("SPIFFE ID {A} not allowed")),
        "{}",
        read(&s.b_log)
    );
    assert_eq!(read(&d.join("app-9443.log")).matches("GET").count(), 1);

    // A's route to C expects another ID than C presents.
    let (code, _) = s.a.curl(1000, "http://10.210.0.3:8080/index.html");
    assert_ne!(code, 0);
    assert!(
        read(&s.a_log).contains(&format!("SPIFFE ID {INTRUDER} not allowed")),
        "{}",
        read(&s.a_log)
    );
    assert!(
        !read(&d.join("c-8080.log")).contains("GET"),
        "C's app must not be reached"
    );

    // No route covers C's port 7070 (C leaves it unredirected): passed through.
    let (code, body) = s.a.curl(1000, "http://10.210.0.3:7070/index.html");
    assert_eq!(
        (code, body.as_str()),
        (0, "hello from the backend app\n"),
        "{}",
        read(&c_log)
    );
    assert_eq!(
        s.a.metric("svidcar_transparent_connections_total{listener=\"transparent-outbound\",outcome=\"passthrough\"}"),
        1.0
    );

    // The same with `otherwise: deny`: refused, logged, counted.
    s.a.stop_last();
    let a_log = s.a.sidecar(
        &d,
        "a-deny",
        &pod_config(&d, A, B, B, "    otherwise: deny\n"),
    );
    let (code, _) = s.a.curl(1000, "http://10.210.0.3:7070/index.html");
    assert_ne!(code, 0);
    let log = read(&a_log);
    assert!(
        log.contains("reason=\"no_route\"") && log.contains("no route covers 10.210.0.3:7070"),
        "{log}"
    );
    assert_eq!(
        s.a.metric("svidcar_connection_errors_total{listener=\"transparent-outbound\",reason=\"no_route\"}"),
        1.0
    );
    assert_eq!(read(&d.join("c-7070.log")).matches("GET").count(), 1);
}

/// Rules that forget to exclude svidcar's own uid would send its upstream connection
/// back to itself: one counted refusal, no storm, and svidcar stays healthy.
#[test]
fn a_missing_uid_exclusion_costs_one_counted_refusal() {
    let s = setup("");
    // Take the owner matches out of A's rules, both families.
    for tool in ["iptables", "ip6tables"] {
        let out =
            s.a.ns
                .cmd(tool)
                .args(["-t", "nat", "-S", "SVIDCAR_OUTPUT"])
                .output()
                .unwrap();
        for rule in String::from_utf8_lossy(&out.stdout).lines() {
            if rule.contains("-owner") {
                let args = shell_words(&rule.replacen("-A ", "-D ", 1));
                netns::must(s.a.ns.cmd(tool).args(["-t", "nat"]).args(&args));
            }
        }
    }
    let (code, _) = s.a.curl(1000, "http://10.210.0.2:8080/index.html");
    assert_ne!(code, 0);
    let loops =
        "svidcar_connection_errors_total{listener=\"transparent-outbound\",reason=\"loop\"}";
    assert_eq!(s.a.metric(loops), 1.0, "{}", read(&s.a_log));
    assert!(
        read(&s.a_log).contains("redirected back"),
        "{}",
        read(&s.a_log)
    );
    assert_eq!(s.a.admin_status("/ready"), 200);
    assert_eq!(s.a.metric(loops), 1.0, "no storm");
    assert_eq!(
        s.a.metric(
            "svidcar_connections_total{direction=\"outbound\",listener=\"transparent-outbound\"}"
        ),
        2.0,
        "the app's connection and the one looped back, nothing more"
    );
}

/// Splits an `iptables -S` line into arguments (quoted comments stay whole).
fn shell_words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for ch in line.chars() {
        match ch {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Eviction on the transparent listeners. A's app holds a connection to B's echo app on
/// 7000, through both sidecars. B's allowlist edited to drop A: B closes it, counted on
/// its transparent inbound listener. With A allowed again, a new connection; A's route
/// edited to expect another server: A closes it, counted on its transparent outbound.
#[test]
fn transparent_connections_meet_a_changed_allowlist_or_expect() {
    let route = |expect: &str| {
        format!("      - to: [\"10.210.0.2/32\"]\n        ports: [7000]\n        expect: [{{exact: \"{expect}\"}}]\n")
    };
    let mut s = setup(&route(B));
    let d = s.dir.path().to_path_buf();
    let mut echo = s.b.ns.cmd_as(1000, "/usr/bin/python3");
    echo.args([
        "-c",
        "import socket, threading\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('0.0.0.0', 7000)); s.listen()\ndef serve(c):\n    while True:\n        b = c.recv(65536)\n        if not b: break\n        c.sendall(b)\n    c.close()\nwhile True:\n    c,_=s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()",
    ]);
    s.b.spawn(&mut echo, &d.join("app-7000.log"));
    s.b.wait_port(7000);
    let peers = d.join("peers");
    std::fs::create_dir(&peers).unwrap();
    std::fs::set_permissions(&peers, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let plain = ("-".into(), "-".into());
    let app_peer = |name: &str| {
        Peer::start_with(
            s.a.ns.cmd_as(1000, "/usr/bin/python3"),
            &peers,
            name,
            "10.210.0.2",
            7000,
            &plain,
            Path::new("-"),
        )
    };
    let reloads = |log: &Path| read(log).matches("config reloaded").count();

    let first = app_peer("first");
    replace_file(&d.join("b.yaml"), &pod_config(&d, B, INTRUDER, A, ""));
    let why = wait_until("B cuts A off", Duration::from_secs(10), || first.ended());
    assert!(why.starts_with("closed"), "{why}");
    assert_eq!(
        s.b.metric("svidcar_connections_revoked_total{listener=\"transparent-inbound\",reason=\"spiffe_id_not_allowed\"}"),
        1.0,
        "{}",
        read(&s.b_log)
    );

    replace_file(&d.join("b.yaml"), &pod_config(&d, B, A, A, ""));
    wait_until("B reloaded again", Duration::from_secs(10), || {
        (reloads(&s.b_log) == 2).then_some(())
    });
    let second = app_peer("second");
    replace_file(
        &d.join("a.yaml"),
        &pod_config(&d, A, B, B, &route(INTRUDER)),
    );
    let why = wait_until("A cuts B off", Duration::from_secs(10), || second.ended());
    assert!(why.starts_with("closed"), "{why}");
    assert_eq!(
        s.a.metric("svidcar_connections_revoked_total{listener=\"transparent-outbound\",reason=\"spiffe_id_not_allowed\"}"),
        1.0,
        "{}",
        read(&s.a_log)
    );
    // B was not touched by A's change: its counter is still 1.
    assert_eq!(
        s.b.metric("svidcar_connections_revoked_total{listener=\"transparent-inbound\",reason=\"spiffe_id_not_allowed\"}"),
        1.0
    );
}
