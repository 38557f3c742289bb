//! gRPC C-core clients on svidcar's unix sockets, named by their absolute paths as users
//! write them: py-spiffe and Python `grpcio` against `svidcar dev-agent` and the SDS
//! socket, and Envoy's `google_grpc` SDS source. C-core sends the socket path,
//! percent-encoded, as HTTP/2 `:authority`, which the h2 crate refuses on its own
//! (hyperium/h2#487); svidcar repairs it on the way in (src/h2_authority.rs). A client
//! whose header block cannot be repaired is closed, logged and counted, and others
//! keep being served.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

const WEB: &str = "spiffe://example.org/ns/default/sa/web";

fn python_ok(dir: &Path, script: &str) -> String {
    let (ok, out) = python(dir, script);
    assert!(ok, "python failed: {out}");
    out
}

#[test]
fn py_spiffe_client_and_x509_source_with_the_absolute_socket_path() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let agent = DevAgent::start(
        d,
        &format!("trust_domain: example.org\nentries:\n  - spiffe_id: {WEB}\n    selectors: [\"unix:uid:0\"]\n"),
    );
    let url = agent.url();
    assert!(url.starts_with("unix:///"), "{url}");
    let out = python_ok(
        d,
        &format!(
            r#"
import os
from spiffe import WorkloadApiClient, X509Source
c = WorkloadApiClient(socket_path='{url}')
s = c.fetch_x509_svid()
print('client', s.spiffe_id)
b = c.fetch_x509_bundles().get_bundle_for_trust_domain(s.spiffe_id.trust_domain)
print('roots', len(b.x509_authorities))
print('jwt', c.fetch_jwt_svid(audience={{'api'}}).spiffe_id)
src = X509Source(socket_path='{url}', timeout_in_seconds=10)
print('source', src.svid.spiffe_id)
src.close()
# The way most workloads are pointed at the agent: the environment variable.
os.environ['SPIFFE_ENDPOINT_SOCKET'] = '{url}'
print('env', WorkloadApiClient().fetch_x509_svid().spiffe_id)
"#
        ),
    );
    for line in ["client", "jwt", "source", "env"] {
        assert!(out.contains(&format!("{line} {WEB}")), "{line}: {out}");
    }
    assert!(out.contains("roots 1"), "{out}");
}

/// Raw gRPC SDS calls from Python `grpcio`; prints the serials of the certificates in
/// each response. DiscoveryRequest is written by hand (resource_names = 3, type_url = 4).
fn python_sds(dir: &Path, sock: &Path, body: &str) -> String {
    let script = format!(
        r#"
import grpc, queue, re, socket
from cryptography import x509
SOCK = '{sock}'
def req(*names):
    out = b''
    for n in names:
        n = n.encode(); out += b'\x1a' + bytes([len(n)]) + n
    url = b'type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret'
    return out + b'\x22' + bytes([len(url)]) + url
def serials(resp):
    pems = re.findall(rb'-----BEGIN CERTIFICATE-----[^-]+-----END CERTIFICATE-----', resp)
    return ' '.join(format(x509.load_pem_x509_certificate(p).serial_number, 'x') for p in pems)
ch = grpc.insecure_channel('unix://' + SOCK)
fetch = ch.unary_unary('/envoy.service.secret.v3.SecretDiscoveryService/FetchSecrets')
stream = ch.stream_stream('/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets')
requests = queue.Queue()
def pending():
    while True:
        r = requests.get()
        if r is None:
            return
        yield r
{body}
"#,
        sock = sock.display()
    );
    python_ok(dir, &script)
}

fn sds_sidecar(d: &Path) -> (Svidcar, PathBuf) {
    let sock = d.join("sds.sock");
    let cfg = format!(
        "identity:\n  dev: {{spiffe_id: \"{WEB}\"}}\nsds:\n  listen: unix://{}\n  allowed_uids: [0]\n",
        sock.display()
    );
    (Svidcar::start(d, "sds", &cfg), sock)
}

#[test]
fn grpcio_sds_client_fetches_and_streams_over_the_absolute_socket_path() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (s, sock) = sds_sidecar(d);
    let out = python_sds(
        d,
        &sock,
        r#"
r = fetch(req('default'), timeout=10)
print('fetch', serials(r), 'key' if b'PRIVATE KEY' in r else 'nokey')
requests.put(req('default', 'ROOTCA'))
it = stream(pending(), timeout=20)
print('stream', serials(next(it)))
requests.put(None)
"#,
    );
    let serial = norm_serial(&s.serial());
    let line = |p: &str| {
        out.lines()
            .find(|l| l.starts_with(p))
            .unwrap_or_else(|| panic!("no {p} line in {out}"))
            .to_string()
    };
    let fetch = line("fetch ");
    assert!(fetch.split(' ').any(|x| x == serial), "{fetch} vs {serial}");
    assert!(fetch.ends_with(" key"), "the SVID's key came too: {fetch}");
    // The stream answered both names: the SVID and the bundle (a second certificate).
    let stream = line("stream ");
    assert!(
        stream.split(' ').any(|x| x == serial),
        "{stream} vs {serial}"
    );
    assert_eq!(stream.split(' ').count(), 3, "{stream}");
    // The caller was checked by its peer credentials (allowed_uids), which still reach
    // the service through the repair.
    assert_eq!(s.metric("svidcar_sds_requests_total{kind=\"denied\"}"), 0.0);
}

#[test]
fn unrepairable_header_block_closes_that_connection_only() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (s, sock) = sds_sidecar(d);
    // A stream is open; a client sends a header block with an HPACK index of 0 (invalid);
    // that connection is closed, the open stream and new clients are served.
    let out = python_sds(
        d,
        &sock,
        r#"
requests.put(req('default'))
it = stream(pending(), timeout=30)
print('before', serials(next(it)))
bad = socket.socket(socket.AF_UNIX)
bad.connect(SOCK)
bad.sendall(b'PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n' + bytes.fromhex('000000040000000000') + bytes.fromhex('00000101050000000180'))
bad.settimeout(10)
got = b''
while True:
    d = bad.recv(65536)
    if not d:
        break
    got += d
print('bad closed after', len(got), 'bytes')
requests.put(req('default', 'ROOTCA'))
print('after', serials(next(it)))
print('new', serials(fetch(req('default'), timeout=10)))
requests.put(None)
"#,
    );
    assert!(out.contains("bad closed after"), "{out}");
    let serial = norm_serial(&s.serial());
    for p in ["before ", "after ", "new "] {
        let l = out.lines().find(|l| l.starts_with(p)).unwrap_or_default();
        assert!(l.split(' ').any(|x| x == serial), "{p}: {out}");
    }
    s.wait_log(&[
        "closing a gRPC connection on the unix socket",
        "HPACK",
        "reason=\"hpack\"",
    ]);
    assert_eq!(
        s.metric("svidcar_grpc_connections_closed_total{reason=\"hpack\"}"),
        1.0
    );
}

/// Huffman-coded strings are the costly part of HPACK decoding; a client that sends
/// header blocks full of them is cut off by the decoding budget (it used to stall the
/// runtime: admin probes took 10 s), and everyone else keeps being served.
#[test]
fn hpack_decoding_work_is_bounded_per_connection() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (s, sock) = sds_sidecar(d);
    let out = python_sds(
        d,
        &sock,
        r#"
def lit(n, v):
    return b'\x00' + bytes([len(n)]) + n + bytes([len(v)]) + v
# 500 fields whose name and value are one Huffman-coded character ('a' = 0x1f).
block = lit(b':method', b'POST') + lit(b':scheme', b'http') + lit(b':path', b'/x') + b'\x00\x81\x1f\x81\x1f' * 500
bad = socket.socket(socket.AF_UNIX)
bad.connect(SOCK)
bad.sendall(b'PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n' + bytes.fromhex('000000040000000000'))
sent = 0
try:
    for i in range(600):
        sid = 2 * i + 1
        bad.sendall(len(block).to_bytes(3, 'big') + bytes([1, 5]) + sid.to_bytes(4, 'big') + block)
        sent += 1
except OSError as e:
    print('cut off after', sent, 'blocks:', type(e).__name__)
print('new', serials(fetch(req('default'), timeout=10)))
"#,
    );
    assert!(out.contains("cut off after"), "{out}");
    let serial = norm_serial(&s.serial());
    let l = out
        .lines()
        .find(|l| l.starts_with("new "))
        .unwrap_or_default();
    assert!(l.split(' ').any(|x| x == serial), "{out}");
    assert_eq!(
        s.metric("svidcar_grpc_connections_closed_total{reason=\"decode_budget\"}"),
        1.0
    );
    assert_eq!(http_get(s.admin, "/live").map(|(c, _)| c), Some(200));
}

#[test]
fn envoy_google_grpc_sds_source_by_absolute_path() {
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
    // The SVID comes over target_uri unix:/abs/sds.sock, the bundle over unix:///abs/sds.sock.
    let envoy = Envoy::start(
        d,
        "sds-inbound-google-grpc.yaml",
        &[
            ("LISTEN_PORT", port.to_string()),
            ("APP_PORT", echo.port.to_string()),
            ("SDS_SOCKET", sock.display().to_string()),
            ("SVID_NAME", "default".into()),
            ("BUNDLE_NAME", "ROOTCA".into()),
            ("PEER_ID", WEB.into()),
        ],
    );
    let serial = norm_serial(&s.serial());
    wait_until(
        "envoy holds svidcar's SVID",
        Duration::from_secs(15),
        || envoy.serials("cert_chain").contains(&serial).then_some(()),
    );
    let ca_serial = {
        let out = Command::new("openssl")
            .args(["x509", "-noout", "-serial", "-in"])
            .arg(&ca.0)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        norm_serial(text.trim().trim_start_matches("serial="))
    };
    wait_until(
        "envoy holds svidcar's bundle",
        Duration::from_secs(15),
        || envoy.serials("ca_cert").contains(&ca_serial).then_some(()),
    );

    // A handshake through Envoy: a client of the same trust domain gets to the app.
    let client = TestCa::load(&ca.0, &ca.1).valid_leaf(d, "client", WEB);
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
}
