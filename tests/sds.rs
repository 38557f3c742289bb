//! SDS against a real Envoy 1.40: Envoy takes its certificate and trust from svidcar's
//! socket with SPIRE Agent's names, shows svidcar's serial in /certs, follows rotation
//! without a restart, and carries traffic from an svidcar outbound.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const WEB: &str = "spiffe://example.org/ns/default/sa/web";

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
        envoy.logs()
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
        envoy.logs()
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

/// Raw gRPC calls from Python (gRPC C-core) against the SDS unix socket, named by its
/// absolute path as users write it.
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
ch = grpc.insecure_channel('unix://' + __import__('os').path.abspath('sds.sock'))
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
# (on a connection of its own: one connection's third stream would wait for a free slot)
other = grpc.insecure_channel('unix://' + __import__('os').path.abspath('sds.sock'), options=[('grpc.use_local_subchannel_pool', 1)])
call('third-stream', lambda: next(other.stream_stream('/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets')(iter([names('ROOTCA')]))))
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
        out.contains("third-stream RESOURCE_EXHAUSTED too many SDS streams on this listener (sds.max_streams: 2)"),
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

/// Python prelude for hand-made xDS messages (no Envoy protos needed): a tiny protobuf
/// encoder/decoder, nodes with a build version and metadata, requests, NACKs.
const XDS_PY: &str = r#"
import grpc, queue, threading
SDS = '/envoy.service.secret.v3.SecretDiscoveryService/'
def varint(n):
    out = b''
    while True:
        b, n = n & 0x7f, n >> 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])
def enc(x):
    return x.encode() if isinstance(x, str) else x
def ld(num, payload):
    payload = enc(payload)
    return varint(num << 3 | 2) + varint(len(payload)) + payload
def vi(num, v):
    return varint(num << 3) + varint(v)
def rv(b, i):
    n = s = 0
    while True:
        c = b[i]; i += 1
        n |= (c & 0x7f) << s; s += 7
        if c < 0x80:
            return n, i
def fields(b):
    i, out = 0, {}
    while i < len(b):
        k, i = rv(b, i)
        if k & 7 == 0:
            v, i = rv(b, i)
        else:
            l, i = rv(b, i); v = b[i:i + l]; i += l
        out.setdefault(k >> 3, []).append(v)
    return out
def node(id='test-node', version=None, disable=None):
    b = ld(1, id)
    if disable is not None:
        val = vi(4, int(disable)) if isinstance(disable, bool) else ld(3, disable)
        b += ld(3, ld(1, ld(1, 'disable_spiffe_cert_validation') + ld(2, val)))
    if version is not None:
        b += ld(8, ld(1, vi(1, version[0]) + vi(2, version[1])))
    return b
def request(names=(), node=None, nonce=None, error=None):
    b = b''
    if node is not None:
        b += ld(2, node)
    for n in names:
        b += ld(3, n)
    if nonce:
        b += ld(5, nonce)
    if error is not None:
        b += ld(6, vi(1, 3) + ld(2, error))
    return b
def nonce(resp):
    return fields(resp)[5][0].decode()
def validator(resp):
    return 'spiffe' if b'envoy.tls.cert_validator.spiffe' in resp else 'trusted_ca'
class Held:
    '''A StreamSecrets stream kept open: send() requests, next() responses.'''
    def __init__(self, ch, timeout=None):
        self.q = queue.Queue()
        self.it = ch.stream_stream(SDS + 'StreamSecrets')(iter(self.q.get, None), timeout=timeout)
    def send(self, req):
        self.q.put(req); return self
    def next(self):
        return next(self.it)
def outcome(label, f):
    try:
        r = f()
        print(label, 'OK', r if isinstance(r, str) else len(r), flush=True)
    except grpc.RpcError as e:
        print(label, e.code().name, e.details(), flush=True)
"#;

/// Runs `body` after [`XDS_PY`] in `dir` (where the socket `sds.sock` is).
fn xds_python(dir: &Path, body: &str) -> String {
    let (ok, out) = python(dir, &format!("{XDS_PY}\n{body}"));
    assert!(ok, "{out}");
    out
}

/// Issue 9, 3.2: streams are pooled per listener and capped per connection, so TCP
/// clients holding every TCP stream leave the unix socket's Envoy its secrets, and one
/// connection cannot hold more than `max_streams_per_connection`.
#[test]
fn tcp_clients_cannot_starve_the_socket_nor_one_connection_take_a_pool() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tcp = free_port();
    let cfg = format!(
        "identity:\n  dev: {{spiffe_id: \"{WEB}\"}}\nsds:\n  listen: [\"unix://{}\", \"tcp://127.0.0.1:{tcp}\"]\n  max_streams: 4\n  max_streams_per_connection: 2\n",
        d.join("sds.sock").display()
    );
    let s = Svidcar::start(d, "sds", &cfg);
    let out = xds_python(
        d,
        &format!(
            r#"
def conn():
    # A channel of its own: its own TCP connection.
    return grpc.insecure_channel('127.0.0.1:{tcp}', options=[('grpc.use_local_subchannel_pool', 1)])
a = conn()
held = [Held(a).send(request(['ROOTCA'])) for _ in range(2)]
for h in held: h.next()
print('conn-a holds 2', flush=True)
# A third stream on the same connection waits for a free slot: the server never sees it.
extra = Held(a, timeout=2).send(request(['ROOTCA']))
outcome('third-on-one-connection', extra.next)
b = conn()
more = [Held(b).send(request(['ROOTCA'])) for _ in range(2)]
for h in more: h.next()
print('tcp pool full', flush=True)
outcome('tcp-over-pool', lambda: Held(conn()).send(request(['ROOTCA'])).next())
u = grpc.insecure_channel('unix://' + __import__('os').path.abspath('sds.sock'))
outcome('unix-stream', lambda: Held(u).send(request(['default'])).next())
"#
        ),
    );
    assert!(out.contains("conn-a holds 2"), "{out}");
    assert!(
        out.contains("third-on-one-connection DEADLINE_EXCEEDED"),
        "{out}"
    );
    assert!(out.contains("tcp pool full"), "{out}");
    assert!(
        out.contains(
            "tcp-over-pool RESOURCE_EXHAUSTED too many SDS streams on this listener (sds.max_streams: 4)"
        ),
        "{out}"
    );
    assert!(out.contains("unix-stream OK"), "{out}");
    s.wait_log(&["SDS stream refused", "Tcp"]);
    assert_eq!(
        s.metric("svidcar_sds_requests_total{kind=\"exhausted\"}"),
        1.0
    );
}

/// Issue 9, 3.3: NACK text cannot forge log lines or flood the log: one escaped,
/// truncated line per logged NACK, the rest summed up in a summary line, every NACK
/// counted.
#[test]
fn nack_text_is_escaped_truncated_and_rate_limited() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cfg = format!(
        "identity:\n  dev: {{spiffe_id: \"{WEB}\"}}\nsds:\n  listen: unix://{}\n",
        d.join("sds.sock").display()
    );
    let s = Svidcar::start(d, "sds", &cfg);
    let out = xds_python(
        d,
        r#"
forged = 'bad secret\n2026-11-23T00:00:00.000000Z  INFO svidcar: FORGED LINE\n' + 'x' * (900 * 1024)
st = Held(grpc.insecure_channel('unix://' + __import__('os').path.abspath('sds.sock')))
n = nonce(st.send(request(['ROOTCA'], node=node('nacker\nFORGED NODE'))).next())
st.send(request(['ROOTCA'], nonce=n, error=forged))
# A changed name list is answered: by then the NACK before it was handled.
n = nonce(st.send(request(['ROOTCA', 'default'], nonce=n)).next())
for _ in range(19):
    st.send(request(['ROOTCA', 'default'], nonce=n, error=forged))
st.send(request(['default'], nonce=n)).next()
print('sent 20 NACKs', flush=True)
"#,
    );
    assert!(out.contains("sent 20 NACKs"), "{out}");
    assert_eq!(s.metric("svidcar_sds_requests_total{kind=\"nack\"}"), 20.0);
    // Logged NACK lines plus the suppressed ones the summaries report make all 20.
    let count = |logs: &str| {
        let lines = logs
            .lines()
            .filter(|l| l.contains("Envoy rejected SDS response (NACK)"))
            .count();
        let suppressed: usize = logs
            .lines()
            .filter(|l| l.contains("SDS NACK: ") && l.contains("more log lines suppressed"))
            .filter_map(|l| l.split("suppressed=").nth(1))
            .filter_map(|v| v.split_whitespace().next()?.parse::<usize>().ok())
            .sum();
        (lines, suppressed)
    };
    let (lines, suppressed) = wait_until("NACK summary", Duration::from_secs(20), || {
        let (l, n) = count(&s.logs());
        (l + n == 20).then_some((l, n))
    });
    assert!(suppressed >= 1 && lines < 20, "{lines} {suppressed}");
    let logs = s.logs();
    let first = logs
        .lines()
        .find(|l| l.contains("Envoy rejected SDS response (NACK)"))
        .unwrap();
    assert!(
        first.contains(r"bad secret\n2026-11-23T00:00:00.000000Z  INFO svidcar: FORGED LINE\n"),
        "{first}"
    );
    assert!(first.contains(r"nacker\nFORGED NODE"), "{first}");
    assert!(
        first.contains("[truncated, ") && first.len() < 1024,
        "{}",
        first.len()
    );
    // The forged text never starts a line of its own.
    for l in logs.lines() {
        assert!(
            !(l.contains("FORGED") && !l.contains("NACK") && !l.contains("SDS")),
            "forged line in the log: {l}"
        );
    }
    assert!(logs.len() < 64 * 1024, "log is {} bytes", logs.len());
}

/// Issue 9, 3.13: keys over TCP only on loopback; a wildcard address is a config error
/// naming the key. Also: the old `spiffe_cert_validation` key says what to write.
#[test]
fn check_refuses_keys_over_wildcard_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let check = |sds: &str| {
        let path = d.join("check.yaml");
        std::fs::write(
            &path,
            format!("identity:\n  dev: {{spiffe_id: \"{WEB}\"}}\nsds:\n{sds}"),
        )
        .unwrap();
        let o = Command::new(BIN)
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr),
        )
    };
    for addr in ["0.0.0.0:15010", "[::]:15010", "10.1.2.3:15010"] {
        let (ok, out) = check(&format!("  listen: tcp://{addr}\n  tcp_allow_keys: true\n"));
        assert!(!ok, "{addr}: {out}");
        assert!(
            out.contains("sds.tcp_allow_keys")
                && out.contains(&format!("tcp://{addr}"))
                && out.contains("only on a loopback address"),
            "{out}"
        );
    }
    // Without keys a wildcard address is fine; with keys, loopback is.
    assert!(check("  listen: tcp://0.0.0.0:15010\n").0);
    assert!(check("  listen: tcp://127.0.0.1:15010\n  tcp_allow_keys: true\n").0);
    assert!(check("  listen: tcp://[::1]:15010\n  tcp_allow_keys: true\n").0);
    let (ok, out) = check("  listen: unix:///tmp/x.sock\n  spiffe_cert_validation: true\n");
    assert!(!ok);
    assert!(
        out.contains("sds.spiffe_cert_validation")
            && out.contains("disable_spiffe_cert_validation"),
        "{out}"
    );
}

/// Issue 9, 3.14: a regular file or a directory at the socket path is an error naming
/// it, and is not deleted.
#[test]
fn a_non_socket_at_the_socket_path_is_an_error_and_stays() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sock = d.join("sds.sock");
    let cfg = d.join("sds.yaml");
    std::fs::write(
        &cfg,
        format!(
            "identity:\n  dev: {{spiffe_id: \"{WEB}\"}}\nsds:\n  listen: unix://{}\n",
            sock.display()
        ),
    )
    .unwrap();
    let run = || {
        let o = Command::new(BIN)
            .args(["run", "--config"])
            .arg(&cfg)
            .output()
            .unwrap();
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    std::fs::write(&sock, b"precious data").unwrap();
    let err = run();
    assert!(
        err.contains(&format!(
            "{} is a regular file, not a socket",
            sock.display()
        )),
        "{err}"
    );
    assert_eq!(std::fs::read(&sock).unwrap(), b"precious data");
    std::fs::remove_file(&sock).unwrap();
    std::fs::create_dir(&sock).unwrap();
    std::fs::write(sock.join("keep"), b"x").unwrap();
    let err = run();
    assert!(err.contains("is a directory, not a socket"), "{err}");
    assert!(sock.join("keep").exists());
}

/// Issue 9: `svidcar run` removes its SDS socket on exit, also when an Envoy still
/// holds a stream open at SIGTERM (the SDS task is aborted after the drain).
#[test]
fn sds_socket_is_removed_after_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sock = d.join("sds.sock");
    let cfg = format!(
        "identity:\n  dev: {{spiffe_id: \"{WEB}\"}}\nsds:\n  listen: unix://{}\ndrain_timeout: 1s\n",
        sock.display()
    );
    let mut s = Svidcar::start(d, "sds", &cfg);
    // A client holding a stream, as Envoy does.
    let mut holder = Command::new("python3")
        .arg("-c")
        .arg(format!(
            "{XDS_PY}\nst = Held(grpc.insecure_channel('unix://' + __import__('os').path.abspath('sds.sock'))).send(request(['ROOTCA']))\nst.next()\nprint('held', flush=True)\nimport time\ntime.sleep(60)\n"
        ))
        .current_dir(d)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "held");
    assert_eq!(s.metric("svidcar_sds_streams_active"), 1.0);
    signal(s.pid(), "-TERM");
    let code = wait_until("svidcar exit", Duration::from_secs(15), || s.try_exit());
    let _ = holder.kill();
    let _ = holder.wait();
    assert_eq!(code, Some(0), "{}", s.logs());
    assert!(!sock.exists(), "socket left behind");
}

/// Issue 9, section 4: the validation context is chosen per Envoy from its node, as
/// SPIRE Agent does: SPIFFE validator for 1.18 and newer, trusted_ca for older or
/// unknown versions, the node metadata key `disable_spiffe_cert_validation` and the
/// global switch of the same name.
#[test]
fn validation_context_is_chosen_per_node_like_spire() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sock = d.join("sds.sock");
    let base = format!(
        "identity:\n  dev: {{spiffe_id: \"{WEB}\"}}\nsds:\n  listen: unix://{}\n",
        sock.display()
    );
    let body = r#"
ch = grpc.insecure_channel('unix://' + __import__('os').path.abspath('sds.sock'))
fetch = ch.unary_unary(SDS + 'FetchSecrets')
cases = [
    ('no-node', None),
    ('no-version', node()),
    ('envoy-1.17', node(version=(1, 17))),
    ('envoy-1.18', node(version=(1, 18))),
    ('envoy-1.40', node(version=(1, 40))),
    ('envoy-1.40-opt-out', node(version=(1, 40), disable=True)),
    ('envoy-1.40-opt-out-str', node(version=(1, 40), disable='true')),
    ('envoy-1.40-opt-in', node(version=(1, 40), disable='false')),
]
for name, n in cases:
    for res in ['ROOTCA', 'spiffe://example.org']:
        outcome(name + ' ' + res, lambda: validator(fetch(request([res], node=n))))
# A stream decides from the node of its first request.
st = Held(ch).send(request(['ROOTCA'], node=node(version=(1, 40))))
outcome('stream-1.40', lambda: validator(st.next()))
st2 = Held(ch).send(request(['ROOTCA'], node=node(version=(1, 17))))
outcome('stream-1.17', lambda: validator(st2.next()))
"#;
    let expect = |out: &str, case: &str, kind: &str| {
        for res in ["ROOTCA", "spiffe://example.org"] {
            let want = format!("{case} {res} OK {kind}");
            assert!(out.contains(&want), "want {want:?} in:\n{out}");
        }
    };
    {
        let _s = Svidcar::start(d, "default", &base);
        let out = xds_python(d, body);
        expect(&out, "no-node", "trusted_ca");
        expect(&out, "no-version", "trusted_ca");
        expect(&out, "envoy-1.17", "trusted_ca");
        expect(&out, "envoy-1.18", "spiffe");
        expect(&out, "envoy-1.40", "spiffe");
        expect(&out, "envoy-1.40-opt-out", "trusted_ca");
        expect(&out, "envoy-1.40-opt-out-str", "trusted_ca");
        expect(&out, "envoy-1.40-opt-in", "spiffe");
        assert!(out.contains("stream-1.40 OK spiffe"), "{out}");
        assert!(out.contains("stream-1.17 OK trusted_ca"), "{out}");
    }
    // The global switch; a node can still opt back in, as in SPIRE.
    let _s = Svidcar::start(
        d,
        "disabled",
        &format!("{base}  disable_spiffe_cert_validation: true\n"),
    );
    let out = xds_python(d, body);
    expect(&out, "envoy-1.18", "trusted_ca");
    expect(&out, "envoy-1.40", "trusted_ca");
    expect(&out, "envoy-1.40-opt-out", "trusted_ca");
    expect(&out, "envoy-1.40-opt-in", "spiffe");
}

/// Envoy's listener TLS stats (`listener.*.ssl.*`), name -> value.
fn envoy_ssl_stats(envoy: &Envoy) -> Vec<(String, u64)> {
    let Some((_, body)) = http_get(envoy.admin, "/stats?filter=ssl") else {
        return vec![];
    };
    body.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(": ")?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

fn envoy_stat(envoy: &Envoy, suffix: &str) -> u64 {
    envoy_ssl_stats(envoy)
        .iter()
        .filter(|(k, _)| k.starts_with("listener.") && k.ends_with(suffix))
        .map(|(_, v)| v)
        .sum()
}

/// A leaf for `id` signed by `ca` that breaks the X.509-SVID rules for leaves: it says
/// it is a CA (basicConstraints CA:TRUE, keyCertSign). A plain chain check accepts it.
fn ca_flagged_leaf(ca: &TestCa, dir: &Path, name: &str, id: &str) -> (PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose, SanType};
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyCertSign,
    ];
    let now = std::time::SystemTime::now();
    p.not_before = (now - Duration::from_secs(3600)).into();
    p.not_after = (now + Duration::from_secs(86400)).into();
    let cert = p.signed_by(&key, &ca.issuer).unwrap();
    let (c, k) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

/// Issue 9, section 4, end to end: Envoy 1.40 gets the SPIFFE validator for ROOTCA from
/// svidcar, so Envoy itself refuses a peer whose certificate, though issued by the
/// trusted CA and carrying the expected SPIFFE ID, breaks an X.509-SVID rule (a leaf
/// flagged as CA), counted in Envoy's `ssl.fail_verify_error`; a good peer passes.
/// With `disable_spiffe_cert_validation: true` Envoy gets trusted_ca and the same peer
/// gets through: the refusal is the validator's.
#[test]
fn envoy_1_40_gets_the_spiffe_validator_and_refuses_a_non_svid_peer() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = dev_ca(d, "example.org");
    let shared = TestCa::load(&ca.0, &ca.1);
    let good = shared.valid_leaf(d, "good", WEB);
    let bad = ca_flagged_leaf(&shared, d, "ca-flagged", WEB);
    let echo = EchoServer::start();
    let run = |name: &str, extra: &str| {
        let sub = d.join(name);
        std::fs::create_dir(&sub).unwrap();
        let sock = sub.join("sds.sock");
        let cfg = format!(
            "identity:\n  dev: {{spiffe_id: \"{WEB}\", ca_cert: {}, ca_key: {}}}\nsds:\n  listen: unix://{}\n{extra}",
            ca.0.display(),
            ca.1.display(),
            sock.display()
        );
        let s = Svidcar::start(&sub, "sds", &cfg);
        let port = free_port();
        let envoy = Envoy::start(
            &sub,
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
        wait_until("envoy certs", Duration::from_secs(15), || {
            envoy.cert_chain().into_iter().next()
        });
        let talk = |cert: &(PathBuf, PathBuf), msg: &str| {
            let out = s_client(port, Some((&cert.0, &cert.1)), &[], msg.as_bytes());
            String::from_utf8_lossy(&out.stdout).contains(msg)
        };
        let good_ok = talk(&good, "good peer");
        let bad_ok = talk(&bad, "ca-flagged peer");
        (s, envoy, good_ok, bad_ok)
    };
    let (s, envoy, good_ok, bad_ok) = run("default", "");
    assert!(good_ok, "{}", envoy.logs());
    assert!(!bad_ok, "Envoy accepted a leaf flagged as CA");
    assert_eq!(
        envoy_stat(&envoy, "ssl.fail_verify_error"),
        1,
        "{:?}",
        envoy_ssl_stats(&envoy)
    );
    s.wait_log(&["SDS response", "spiffe_validator=true"]);
    drop((s, envoy));
    let (s, envoy, good_ok, bad_ok) = run("disabled", "  disable_spiffe_cert_validation: true\n");
    assert!(good_ok && bad_ok, "trusted_ca lets the CA-flagged leaf in");
    assert_eq!(envoy_stat(&envoy, "ssl.fail_verify_error"), 0);
    s.wait_log(&["SDS response", "spiffe_validator=false"]);
}
