//! What an operator and an attacker meet on a running svidcar: admin probes that stay
//! answered while idle connections are held, refusal log lines that cannot flood the log,
//! and SIGHUP (a config reload) that neither kills nor drops connections.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use common::*;

fn config(dir: &std::path::Path, app: u16) -> (String, u16) {
    let ca = dev_ca(dir, "example.org");
    let port = free_port();
    let cfg = format!(
        "identity:\n  dev: {{spiffe_id: \"spiffe://example.org/backend\", ca_cert: {}, ca_key: {}}}\ninbound:\n  - name: app\n    listen: 127.0.0.1:{port}\n    forward: 127.0.0.1:{app}\n    allow_any_in_trust_domain: true\n",
        ca.0.display(),
        ca.1.display()
    );
    (cfg, port)
}

/// 64 idle TCP connections (the admin connection limit) used to make every probe fail.
#[test]
fn probes_keep_answering_while_idle_connections_are_held() {
    let dir = tempfile::tempdir().unwrap();
    let echo = EchoServer::start();
    let (cfg, _) = config(dir.path(), echo.port);
    let s = Svidcar::start(dir.path(), "admin", &cfg);
    // Twice the limit, held open, sending nothing.
    let idle: Vec<TcpStream> = (0..128)
        .map(|_| TcpStream::connect(("127.0.0.1", s.admin)).unwrap())
        .collect();
    for _ in 0..20 {
        assert_eq!(
            http_get(s.admin, "/live").map(|(c, _)| c),
            Some(200),
            "/live must answer with idle connections held"
        );
        assert_eq!(http_get(s.admin, "/ready").map(|(c, _)| c), Some(200));
    }
    drop(idle);
}

/// 500 garbage connections: the metric counts every one, the log holds a bounded number
/// of lines for that reason plus a summary saying how many were left out.
#[test]
fn refusal_log_lines_are_rate_limited_and_summarised() {
    let dir = tempfile::tempdir().unwrap();
    let echo = EchoServer::start();
    let (cfg, port) = config(dir.path(), echo.port);
    let s = Svidcar::start(dir.path(), "flood", &cfg);
    let series = "svidcar_handshake_failures_total{listener=\"app\",reason=\"protocol_error\"}";
    for _ in 0..500 {
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let _ = c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        let _ = std::io::Read::read(&mut c, &mut [0u8; 64]);
    }
    wait_until("500 refusals counted", Duration::from_secs(20), || {
        (s.metric(series) == 500.0).then_some(())
    });
    let summary = wait_until("a summary line", Duration::from_secs(30), || {
        s.logs()
            .lines()
            .find(|l| l.contains("more log lines suppressed") && l.contains("protocol_error"))
            .map(str::to_string)
    });
    let lines = s
        .logs()
        .lines()
        .filter(|l| l.contains("handshake rejected: TLS protocol error"))
        .count();
    assert!(
        (1..=40).contains(&lines),
        "at most 20 lines per 10 s window, got {lines}"
    );
    let suppressed: u64 = summary
        .split("suppressed=")
        .nth(1)
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("suppressed=N in the summary");
    assert!(suppressed >= 400, "{summary}");
}

/// SIGHUP used to kill svidcar at once. Now it reloads the config; with the file
/// unchanged nothing changes: the process and an open connection keep going.
#[test]
fn sighup_with_an_unchanged_config_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dev_ca(dir.path(), "example.org");
    let echo = EchoServer::start();
    let inbound_port = free_port();
    let out_port = free_port();
    let cfg = format!(
        "identity:\n  dev: {{spiffe_id: \"spiffe://example.org/web\", ca_cert: {}, ca_key: {}}}\ninbound:\n  - name: in\n    listen: 127.0.0.1:{inbound_port}\n    forward: 127.0.0.1:{}\n    allow_any_in_trust_domain: true\noutbound:\n  - name: out\n    listen: 127.0.0.1:{out_port}\n    connect: 127.0.0.1:{inbound_port}\n    allow_any_in_trust_domain: true\n",
        ca.0.display(),
        ca.1.display(),
        echo.port
    );
    let mut s = Svidcar::start(dir.path(), "hup", &cfg);
    let mut conn = connect(out_port);
    assert_eq!(echo_roundtrip(&mut conn, b"before").unwrap(), b"before");
    signal(s.pid(), "-HUP");
    s.wait_log(&["config reload: no change", "SIGHUP"]);
    assert!(s.try_exit().is_none(), "still running after SIGHUP");
    assert_eq!(echo_roundtrip(&mut conn, b"after").unwrap(), b"after");
    assert_eq!(http_get(s.admin, "/ready").map(|(c, _)| c), Some(200));
}

/// `sds-fetch` and `workload` read sockets the same way, and pointed at the other
/// service's socket they say so instead of a bare `Unimplemented:`.
#[test]
fn commands_say_which_service_a_socket_does_not_serve() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let agent = DevAgent::start(
        d,
        "trust_domain: example.org\nentries:\n  - {spiffe_id: \"spiffe://example.org/web\", selectors: [\"unix:uid:0\"]}\n",
    );
    let ca = dev_ca(d, "example.org");
    let sds = d.join("sds.sock");
    let s = Svidcar::start(
        d,
        "sds",
        &format!(
            "identity:\n  dev: {{spiffe_id: \"spiffe://example.org/web\", ca_cert: {}, ca_key: {}}}\nsds: {{listen: \"unix://{}\"}}\n",
            ca.0.display(),
            ca.1.display(),
            sds.display()
        ),
    );
    let run = |args: &[&str]| {
        let out = std::process::Command::new(BIN).args(args).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let agent_sock = agent.socket.display().to_string();
    let (ok, out) = run(&["sds-fetch", "--socket", &agent_sock, "default"]);
    assert!(!ok);
    assert!(
        out.contains(&format!(
            "unix://{agent_sock} does not serve Envoy's Secret Discovery Service"
        )),
        "{out}"
    );
    let sds_sock = sds.display().to_string();
    let (ok, out) = run(&["workload", "--socket", &sds_sock, "jwt-bundles"]);
    assert!(!ok);
    assert!(
        out.contains(&format!(
            "unix://{sds_sock} does not serve the SPIFFE Workload API"
        )),
        "{out}"
    );
    // Every socket form reaches the SDS socket.
    let serial = s.serial();
    for form in [
        sds_sock.clone(),
        format!("unix:{sds_sock}"),
        format!("unix://{sds_sock}"),
    ] {
        let (ok, out) = run(&["sds-fetch", "--socket", &form, "default"]);
        assert!(ok && out.contains(&serial), "{form}: {out}");
    }
}

/// /certs gives expiry as RFC 3339 text beside the epoch seconds, and both agree.
#[test]
fn certs_expiry_in_rfc3339() {
    let dir = tempfile::tempdir().unwrap();
    let echo = EchoServer::start();
    let (cfg, _) = config(dir.path(), echo.port);
    let s = Svidcar::start(dir.path(), "certs", &cfg);
    let (_, body) = http_get(s.admin, "/certs").unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let epoch = v["svids"][0]["not_after"].as_u64().unwrap();
    let text = v["svids"][0]["not_after_rfc3339"].as_str().unwrap();
    let parsed = humantime::parse_rfc3339(text).expect("RFC 3339");
    assert_eq!(
        parsed
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
        epoch
    );
}

/// `/ready` may say 200 only once every listener is bound: admin comes up last, and a
/// listener that cannot bind stops start-up before admin ever answers.
#[test]
fn ready_only_after_every_listener_is_bound() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let echo = EchoServer::start();
    let (cfg, _) = config(d, echo.port);
    let s = Svidcar::start(d, "order", &cfg);
    let logs = s.logs();
    let pos = |what: &str| {
        logs.find(what)
            .unwrap_or_else(|| panic!("no {what:?} in {logs}"))
    };
    assert!(pos("inbound listening") < pos("admin listening"), "{logs}");
    drop(s);

    // A second listener on a port that is taken: svidcar exits with the reason, and its
    // admin port never answered.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    let admin = free_port();
    let path = d.join("taken.yaml");
    std::fs::write(
        &path,
        format!(
            "admin: {{listen: 127.0.0.1:{admin}}}\n{cfg}  - name: second\n    listen: 127.0.0.1:{taken_port}\n    forward: 127.0.0.1:{}\n    allow_any_in_trust_domain: true\n",
            echo.port
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(BIN)
        .args(["run", "--config"])
        .arg(&path)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut answered = false;
    let status = wait_until("svidcar exits", Duration::from_secs(20), || {
        answered |= http_get(admin, "/ready").is_some();
        child.try_wait().unwrap()
    });
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(
        err.contains("inbound[1].listen: cannot bind"),
        "the reason names the listener: {err}"
    );
    assert!(
        !answered,
        "admin must not answer before every listener is bound"
    );
    assert!(!err.contains("admin listening"), "{err}");
}

/// A task that serves (an SDS server, a listener) and dies stops the process with the
/// reason, instead of leaving a sidecar whose /ready says 200 while it serves nothing.
/// The listening socket is destroyed from outside with `ss -K`; accept() then fails
/// for good (EINVAL) and would otherwise spin.
#[test]
fn a_dead_sds_server_or_listener_stops_the_process() {
    for victim in ["sds", "inbound"] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let echo = EchoServer::start();
        let (cfg, inbound_port) = config(d, echo.port);
        let sds_port = free_port();
        let cfg = format!("{cfg}sds:\n  listen: tcp://127.0.0.1:{sds_port}\n");
        let mut s = Svidcar::start(d, victim, &cfg);
        let (port, reason) = match victim {
            "sds" => (
                sds_port,
                format!("SDS server tcp://127.0.0.1:{sds_port} failed: cannot accept"),
            ),
            _ => (
                inbound_port,
                "listener app failed: cannot accept".to_string(),
            ),
        };
        let out = std::process::Command::new("ss")
            .args([
                "-K",
                "state",
                "listening",
                "sport",
                "=",
                &format!(":{port}"),
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "ss -K: {out:?}");
        let code = wait_until("svidcar exits", Duration::from_secs(10), || s.try_exit());
        assert!(code != Some(0), "{victim}: exit {code:?}: {}", s.logs());
        let logs = s.logs();
        assert!(
            logs.contains(&reason) && logs.contains("Invalid argument") && logs.contains("exiting"),
            "{victim}: the log says which task died and why: {logs}"
        );
    }
}
