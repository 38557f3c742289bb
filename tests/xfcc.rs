//! The `x-forwarded-client-cert` header svidcar writes (`svidcar::proxy::http::xfcc`)
//! against the one a real Envoy 1.40 hands its app, byte for byte, for the same server
//! and client certificates, in every `forward_client_cert_details` mode, with and
//! without a client certificate, with and without forged incoming headers.
//!
//! Envoy (envoy/xfcc.yaml) terminates TLS in front of a small Python app that answers
//! with the raw XFCC lines it received; curl is the client. svidcar's pure function is
//! then given the same certificates and incoming lines.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime};

use common::*;
use http::{HeaderMap, HeaderValue};
use rcgen::{
    CertificateParams, DistinguishedName, DnType, DnValue, ExtendedKeyUsagePurpose, KeyPair,
    KeyUsagePurpose, SanType,
};
use svidcar::proxy::http::xfcc::{Xfcc, XfccDetails, XfccField, XfccMode, XFCC};

const BY: &str = "spiffe://example.org/ns/default/sa/users";
const PEER: &str = "spiffe://example.org/ns/default/sa/payment";
const FORGED: &str =
    "By=spiffe://example.org/ns/default/sa/users;URI=spiffe://example.org/ns/default/sa/admin";
const FORGED2: &str = "Hash=00;URI=spiffe://evil.example/x";

/// The app: answers every request with a JSON list of the raw `x-forwarded-client-cert`
/// lines it received (value after the colon, surrounding blanks removed), in order.
const APP: &str = r#"
import json, socketserver, sys
class H(socketserver.StreamRequestHandler):
    def handle(self):
        while True:
            line = self.rfile.readline()
            if not line:
                return
            got = []
            while line not in (b"\r\n", b"\n", b""):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"x-forwarded-client-cert":
                    got.append(value.strip(b" \t\r\n").decode("latin-1"))
                line = self.rfile.readline()
            body = json.dumps(got).encode()
            self.wfile.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
            self.wfile.flush()
class S(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
S(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;

struct App {
    child: Child,
    port: u16,
}

impl App {
    fn start() -> Self {
        let port = free_port();
        let child = Command::new("python3")
            .args(["-c", APP, &port.to_string()])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        wait_until("echo app", Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        Self { child, port }
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client leaf with an awkward subject (every RFC 2253 escape, non-ASCII, a control
/// character, an attribute without a short name), two URI and two DNS SANs, signed by
/// an intermediate; the cert file holds leaf then intermediate, as curl sends them.
fn rich_client(dir: &Path, root: &TestCa) -> (PathBuf, PathBuf) {
    let int = root.intermediate(SystemTime::now() + Duration::from_secs(2 * 86400));
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CountryName,
        DnValue::PrintableString("US".try_into().unwrap()),
    );
    dn.push(DnType::OrganizationName, "Acme, Inc.");
    dn.push(DnType::OrganizationalUnitName, " #team+\"x\"; <y> \\ ");
    dn.push(DnType::CommonName, "#zo\u{eb}\u{7f}=payment");
    dn.push(DnType::CustomDnType(vec![1, 2, 3, 4]), "abc");
    p.distinguished_name = dn;
    p.subject_alt_names = vec![
        SanType::DnsName("payment.default.svc".try_into().unwrap()),
        SanType::URI(PEER.try_into().unwrap()),
        SanType::DnsName("*.example.org".try_into().unwrap()),
        SanType::URI("https://payment.example.org/x?y=1;z".try_into().unwrap()),
    ];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let now = SystemTime::now();
    p.not_before = (now - Duration::from_secs(3600)).into();
    p.not_after = (now + Duration::from_secs(86400)).into();
    let cert = p.signed_by(&key, &int.issuer).unwrap();
    let c = dir.join("rich.pem");
    let k = dir.join("rich.key");
    std::fs::write(&c, cert.pem() + &int.cert_pem).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

/// A client made the way an operator would with the openssl CLI: `ecparam -genkey` key,
/// `req -multivalue-rdn` subject (DC, a two-valued OU+CN RDN, emailAddress), SANs from an
/// extension file, signed by the test CA with `openssl x509 -req`.
fn openssl_client(dir: &Path, ca: &(PathBuf, PathBuf)) -> (PathBuf, PathBuf) {
    let k = dir.join("ossl.key");
    let csr = dir.join("ossl.csr");
    let c = dir.join("ossl.pem");
    let ext = dir.join("ossl.ext");
    std::fs::write(
        &ext,
        format!("subjectAltName=URI:{PEER},DNS:payment.default.svc\nextendedKeyUsage=clientAuth\n"),
    )
    .unwrap();
    let run = |args: &[&str]| {
        let out = Command::new("openssl").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let p = |p: &PathBuf| p.display().to_string();
    run(&["ecparam", "-genkey", "-name", "prime256v1", "-out", &p(&k)]);
    run(&[
        "req",
        "-new",
        "-key",
        &p(&k),
        "-out",
        &p(&csr),
        "-multivalue-rdn",
        "-subj",
        "/DC=org/DC=example/O=Example Org/OU=payments+CN=payment/emailAddress=p@example.org",
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        &p(&csr),
        "-CA",
        &p(&ca.0),
        "-CAkey",
        &p(&ca.1),
        "-days",
        "1",
        "-extfile",
        &p(&ext),
        "-out",
        &p(&c),
    ]);
    (c, k)
}

/// The DER certificates of a PEM file, in file order.
fn ders(path: &Path) -> Vec<Vec<u8>> {
    pem::parse_many(std::fs::read(path).unwrap())
        .unwrap()
        .into_iter()
        .map(|p| p.into_contents())
        .collect()
}

/// GETs / through Envoy on `port` with curl, with `forged` XFCC lines and an optional
/// client certificate; returns the XFCC lines the app received.
fn via_envoy(port: u16, cert: Option<&(PathBuf, PathBuf)>, forged: &[&str]) -> Vec<String> {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--fail", "-k", "--max-time", "10"]);
    if let Some((c, k)) = cert {
        cmd.arg("--cert").arg(c).arg("--key").arg(k);
    }
    for f in forged {
        // curl drops `Name: ` with nothing after the colon; `Name;` sends it empty.
        if f.is_empty() {
            cmd.arg("-H").arg("x-forwarded-client-cert;");
        } else {
            cmd.arg("-H").arg(format!("x-forwarded-client-cert: {f}"));
        }
    }
    cmd.arg(format!("https://127.0.0.1:{port}/"));
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// What svidcar forwards for the same connection and incoming lines.
fn via_svidcar(cfg: &Xfcc, cert: Option<&(PathBuf, PathBuf)>, forged: &[&str]) -> Vec<String> {
    let chain = cert.map(|(c, _)| ders(c)).unwrap_or_default();
    let mut h = HeaderMap::new();
    for f in forged {
        h.append(XFCC, HeaderValue::from_str(f).unwrap());
    }
    cfg.connection(Some(BY), &chain).unwrap().apply(&mut h);
    h.get_all(XFCC)
        .iter()
        .map(|v| String::from_utf8(v.as_bytes().to_vec()).unwrap())
        .collect()
}

fn cfg(mode: XfccMode, details: &[XfccField]) -> Xfcc {
    Xfcc {
        mode,
        details: XfccDetails::from_fields(details),
    }
}

#[test]
fn xfcc_is_byte_identical_to_envoy_in_every_mode() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let root = TestCa::new("example.org");
    let ca_files = root.write(d, "ca");
    let ca = ca_files.0.clone();
    let (server_cert, server_key) = root.valid_leaf(d, "server", BY);
    let svid = root.valid_leaf(d, "client", PEER);
    let rich = rich_client(d, &root);
    let ossl = openssl_client(d, &ca_files);
    let app = App::start();

    let all = [
        XfccField::Uri,
        XfccField::Dns,
        XfccField::Subject,
        XfccField::Cert,
        XfccField::Chain,
    ];
    let listeners = [
        (
            "SANITIZE_SET_URI",
            cfg(XfccMode::SanitizeSet, &[XfccField::Uri]),
        ),
        ("SANITIZE_SET_ALL", cfg(XfccMode::SanitizeSet, &all)),
        ("APPEND_FORWARD_ALL", cfg(XfccMode::AppendForward, &all)),
        ("SANITIZE", cfg(XfccMode::Sanitize, &[])),
        ("FORWARD_ONLY", cfg(XfccMode::ForwardOnly, &[])),
        ("ALWAYS_FORWARD_ONLY", cfg(XfccMode::AlwaysForwardOnly, &[])),
    ];
    let ports: Vec<u16> = listeners.iter().map(|_| free_port()).collect();
    let mut vars = vec![
        ("CERT", server_cert.display().to_string()),
        ("KEY", server_key.display().to_string()),
        ("CA", ca.display().to_string()),
        ("APP_PORT", app.port.to_string()),
    ];
    let names: Vec<String> = listeners.iter().map(|(n, _)| format!("PORT_{n}")).collect();
    for (n, p) in names.iter().zip(&ports) {
        vars.push((n.as_str(), p.to_string()));
    }
    let _envoy = Envoy::start(d, "xfcc.yaml", &vars);

    // The plain SPIFFE case the issue names first: sanitize_set with uri, a forged
    // header replaced by By, Hash and URI.
    let got = via_envoy(ports[0], Some(&svid), &[FORGED]);
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(
        got[0].starts_with(&format!("By={BY};Hash=")) && got[0].ends_with(&format!(";URI={PEER}")),
        "{got:?}"
    );
    assert_eq!(got, via_svidcar(&listeners[0].1, Some(&svid), &[FORGED]));

    let clients: [Option<&(PathBuf, PathBuf)>; 4] = [Some(&svid), Some(&rich), Some(&ossl), None];
    let incoming: [&[&str]; 4] = [&[], &[FORGED], &[FORGED, FORGED2], &[""]];
    let mut compared = 0;
    for ((name, cfg), port) in listeners.iter().zip(&ports) {
        for client in clients {
            for forged in incoming {
                let envoy_saw = via_envoy(*port, client, forged);
                let ours = via_svidcar(cfg, client, forged);
                assert_eq!(
                    ours,
                    envoy_saw,
                    "listener {name}, client {:?}, incoming {forged:?}",
                    client.map(|c| &c.0),
                );
                compared += 1;
            }
        }
    }
    assert_eq!(compared, listeners.len() * clients.len() * incoming.len());

    // The openssl-made client: short names DC and emailAddress, and the two-valued RDN
    // printed in reverse with `+`, as BoringSSL does.
    let got = via_envoy(ports[1], Some(&ossl), &[]);
    assert!(
        got[0].contains(";Subject=\"emailAddress=p@example.org,OU=payments+CN=payment,O=Example Org,DC=example,DC=org\";"),
        "{got:?}"
    );

    // The rich client through sanitize_set with every field: each field present, in
    // Envoy's order, so the comparison above covered Subject escapes (RFC 2253, bytes
    // above 0x7F and control characters as \XX, an unnamed attribute as #DER), several
    // SANs and a two-certificate Chain. `;` inside a URI SAN is not escaped, by Envoy
    // nor by us: consumers must not split the element on `;` blindly.
    let got = via_envoy(ports[1], Some(&rich), &[]);
    let subject = r#";Subject="1.2.3.4=#0C03616263,CN=\#zo\C3\AB\7F=payment,OU=\ #team\+\"x\"\; \<y\> \\\ ,O=Acme\, Inc.,C=US";"#;
    let order = [
        format!("By={BY};Hash="),
        ";Cert=\"-----BEGIN%20CERTIFICATE-----%0A".to_string(),
        ";Chain=\"-----BEGIN%20CERTIFICATE-----%0A".to_string(),
        subject.to_string(),
        format!("URI={PEER};URI=https://payment.example.org/x?y=1;z"),
        ";DNS=payment.default.svc;DNS=*.example.org".to_string(),
    ];
    let mut at = 0;
    for piece in &order {
        let found = got[0][at..].find(piece.as_str());
        assert!(found.is_some(), "{piece} not after byte {at} in {got:?}");
        at += found.unwrap_or_default() + piece.len();
    }
    assert_eq!(at, got[0].len(), "{got:?}");
}
