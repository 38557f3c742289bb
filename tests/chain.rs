//! Chain verification against real peers: openssl s_client presenting bad chains to a
//! svidcar inbound, openssl s_server presenting them to a svidcar outbound. Each bad
//! chain is refused for its stated reason (log text and metric label); good chains pass.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime};

use common::*;
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};

const WEB: &str = "spiffe://example.org/ns/default/sa/web";
const PEER: &str = "spiffe://example.org/ns/default/sa/peer";
const DAY: Duration = Duration::from_secs(86400);

/// A CA made with rcgen as a CA operator would: name, validity, path length, key usage.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert: Certificate,
}

fn ca_params(
    cn: &str,
    path_len: Option<u8>,
    usages: Vec<KeyUsagePurpose>,
    valid: (SystemTime, SystemTime),
) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(match path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    p.key_usages = usages;
    p.not_before = valid.0.into();
    p.not_after = valid.1.into();
    p
}

fn signing() -> Vec<KeyUsagePurpose> {
    vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign]
}

fn always() -> (SystemTime, SystemTime) {
    let now = SystemTime::now();
    (now - 365 * DAY, now + 365 * DAY)
}

impl Ca {
    fn root(cn: &str, path_len: Option<u8>, valid: (SystemTime, SystemTime)) -> Self {
        let key = KeyPair::generate().unwrap();
        let p = ca_params(cn, path_len, signing(), valid);
        let cert = p.self_signed(&key).unwrap();
        Self {
            issuer: Issuer::new(p, key),
            cert,
        }
    }

    fn intermediate(&self, cn: &str, usages: Vec<KeyUsagePurpose>) -> Self {
        let key = KeyPair::generate().unwrap();
        let p = ca_params(cn, None, usages, always());
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        Self {
            issuer: Issuer::new(p, key),
            cert,
        }
    }

    /// A leaf with one URI SAN, valid for a day around now; returns (cert PEM, key PEM).
    fn leaf(&self, uri: &str) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ];
        let now = SystemTime::now();
        p.not_before = (now - DAY).into();
        p.not_after = (now + DAY).into();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// The files of one peer: leaf, key, and the intermediates it sends (may be empty).
struct Peer {
    cert: PathBuf,
    key: PathBuf,
    chain: PathBuf,
}

fn write_peer(dir: &Path, name: &str, leaf: (String, String), chain: &[&Certificate]) -> Peer {
    let p = Peer {
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
        chain: dir.join(format!("{name}-chain.pem")),
    };
    std::fs::write(&p.cert, leaf.0).unwrap();
    std::fs::write(&p.key, leaf.1).unwrap();
    let chain_pem: String = chain.iter().map(|c| c.pem()).collect();
    std::fs::write(&p.chain, chain_pem).unwrap();
    p
}

/// The roots of example.org in one bundle file, as a CA rotation leaves them: the
/// current root, an old one that has expired, and one limited to pathLen 0.
struct World {
    good: Ca,
    expired: Ca,
    pl0: Ca,
    bundle: PathBuf,
    own: Peer,
}

fn world(dir: &Path) -> World {
    let now = SystemTime::now();
    let good = Ca::root("example.org root 2026", None, always());
    let expired = Ca::root("example.org root 2024", None, (now - 400 * DAY, now - DAY));
    let pl0 = Ca::root("example.org issuing root pathlen 0", Some(0), always());
    let bundle = dir.join("bundle.pem");
    std::fs::write(
        &bundle,
        format!(
            "{}{}{}",
            good.cert.pem(),
            expired.cert.pem(),
            pl0.cert.pem()
        ),
    )
    .unwrap();
    let own = write_peer(dir, "own", good.leaf(WEB), &[]);
    World {
        good,
        expired,
        pl0,
        bundle,
        own,
    }
}

fn files_identity(w: &World) -> String {
    format!(
        "identity:\n  files: {{cert: {}, key: {}, bundle: {}}}\n",
        w.own.cert.display(),
        w.own.key.display(),
        w.bundle.display()
    )
}

/// Each bad chain, with the words its refusal must log and its metric label.
fn bad_peers(dir: &Path, w: &World) -> Vec<(&'static str, Peer, Vec<String>, &'static str)> {
    let int_good = w.good.intermediate("example.org intermediate", signing());
    let int_pl0 = w
        .pl0
        .intermediate("example.org intermediate under pathlen 0", signing());
    let int_noks = w.good.intermediate(
        "example.org intermediate without keyCertSign",
        vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::CrlSign],
    );
    // 120 intermediates that all claim to have issued the leaf: the CPU amplification case.
    let bogus_key = KeyPair::generate().unwrap();
    let bogus: Vec<Certificate> = (0..120)
        .map(|_| {
            ca_params("example.org intermediate", None, signing(), always())
                .self_signed(&bogus_key)
                .unwrap()
        })
        .collect();
    let bogus_refs: Vec<&Certificate> = bogus.iter().collect();
    vec![
        (
            "expired-root",
            write_peer(dir, "expired-root", w.expired.leaf(PEER), &[]),
            vec![
                "root CA".into(),
                "example.org root 2024".into(),
                "expired".into(),
            ],
            "chain_invalid",
        ),
        (
            "root-pathlen",
            write_peer(dir, "root-pathlen", int_pl0.leaf(PEER), &[&int_pl0.cert]),
            vec![
                "path length exceeded".into(),
                "pathlen 0".into(),
                "allows 0 intermediate CA(s) below it, the chain has 1".into(),
            ],
            "chain_invalid",
        ),
        (
            "no-keycertsign",
            write_peer(
                dir,
                "no-keycertsign",
                int_noks.leaf(PEER),
                &[&int_noks.cert],
            ),
            vec![
                "intermediate CA".into(),
                "without keyCertSign".into(),
                "lacks keyCertSign".into(),
            ],
            "chain_invalid",
        ),
        (
            "too-long",
            write_peer(dir, "too-long", int_good.leaf(PEER), &bogus_refs),
            vec!["chain too long (121 certificates, at most 8)".into()],
            "chain_invalid",
        ),
        (
            "no-path",
            write_peer(dir, "no-path", w.good.leaf("spiffe://example.org"), &[]),
            vec!["spiffe://example.org".into(), "has no path".into()],
            "not_an_svid",
        ),
    ]
}

/// The good chains: leaf from the current root directly, through an intermediate, and
/// leaf directly under the pathLen 0 root (no intermediate, so within its limit).
fn good_peers(dir: &Path, w: &World) -> Vec<(&'static str, Peer)> {
    let int_good = w.good.intermediate("example.org intermediate", signing());
    vec![
        (
            "direct",
            write_peer(dir, "good-direct", w.good.leaf(PEER), &[]),
        ),
        (
            "intermediate",
            write_peer(dir, "good-int", int_good.leaf(PEER), &[&int_good.cert]),
        ),
        (
            "pathlen0-direct",
            write_peer(dir, "good-pl0", w.pl0.leaf(PEER), &[]),
        ),
    ]
}

fn client_args(p: &Peer) -> Vec<String> {
    let mut v = vec![];
    if std::fs::metadata(&p.chain).unwrap().len() > 0 {
        v.push("-cert_chain".to_string());
        v.push(p.chain.display().to_string());
    }
    v
}

#[test]
fn inbound_refuses_bad_chains_for_the_stated_reason() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let w = world(d);
    let echo = EchoServer::start();
    let port = free_port();
    let s = Svidcar::start(
        d,
        "inbound",
        &format!(
            "{}inbound:\n  - name: app\n    listen: 127.0.0.1:{port}\n    forward: 127.0.0.1:{}\n    allow:\n      - trust_domain: example.org\n",
            files_identity(&w),
            echo.port
        ),
    );
    let failures = |reason: &str| {
        s.metric(&format!(
            "svidcar_handshake_failures_total{{listener=\"app\",reason=\"{reason}\"}}"
        ))
    };

    for (name, p) in good_peers(d, &w) {
        let extra = client_args(&p);
        let extra: Vec<&str> = extra.iter().map(|x| x.as_str()).collect();
        let out = s_client(port, Some((&p.cert, &p.key)), &extra, b"ping");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("ping"),
            "good chain {name} must pass: {out:?}\n{}",
            s.logs()
        );
    }

    let mut counts = std::collections::BTreeMap::new();
    for (name, p, words, label) in bad_peers(d, &w) {
        let extra = client_args(&p);
        let extra: Vec<&str> = extra.iter().map(|x| x.as_str()).collect();
        let out = s_client(port, Some((&p.cert, &p.key)), &extra, b"ping");
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("ping"),
            "{name}: bad chain reached the app"
        );
        let mut parts: Vec<&str> = vec!["handshake rejected", label];
        parts.extend(words.iter().map(|x| x.as_str()));
        s.wait_log(&parts);
        *counts.entry(label).or_insert(0.0) += 1.0;
        assert_eq!(failures(label), counts[label], "{name}: counted as {label}");
    }

    // The refusals disturbed nobody: a good peer still gets through.
    let (_, p) = good_peers(d, &w).remove(1);
    let extra = client_args(&p);
    let extra: Vec<&str> = extra.iter().map(|x| x.as_str()).collect();
    let out = s_client(port, Some((&p.cert, &p.key)), &extra, b"pong");
    assert!(String::from_utf8_lossy(&out.stdout).contains("pong"));
    assert!(!s.logs().contains("PRIVATE KEY"));
}

/// `openssl s_server` presenting `p`; killed on drop.
struct SServer(Child);

impl SServer {
    fn start(p: &Peer) -> (Self, u16) {
        let port = free_port();
        let mut cmd = Command::new("openssl");
        cmd.args(["s_server", "-accept", &port.to_string(), "-quiet", "-cert"])
            .arg(&p.cert)
            .arg("-key")
            .arg(&p.key);
        if std::fs::metadata(&p.chain).unwrap().len() > 0 {
            cmd.arg("-cert_chain").arg(&p.chain);
        }
        let child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_until("s_server", Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        (Self(child), port)
    }
}

impl Drop for SServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn outbound_refuses_bad_server_chains_for_the_stated_reason() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let w = world(d);
    let mut servers = vec![];
    let mut cfg = format!("{}outbound:\n", files_identity(&w));
    let mut cases = vec![];
    for (name, p) in good_peers(d, &w) {
        let (srv, port) = SServer::start(&p);
        servers.push(srv);
        let listen = free_port();
        cfg.push_str(&format!("  - name: good-{name}\n    listen: 127.0.0.1:{listen}\n    connect: 127.0.0.1:{port}\n    expect:\n      - trust_domain: example.org\n"));
        cases.push((format!("good-{name}"), listen, None));
    }
    for (name, p, words, label) in bad_peers(d, &w) {
        let (srv, port) = SServer::start(&p);
        servers.push(srv);
        let listen = free_port();
        cfg.push_str(&format!("  - name: {name}\n    listen: 127.0.0.1:{listen}\n    connect: 127.0.0.1:{port}\n    expect:\n      - trust_domain: example.org\n"));
        cases.push((name.to_string(), listen, Some((words, label))));
    }
    let s = Svidcar::start(d, "outbound", &cfg);
    for (name, listen, bad) in cases {
        let mut c = connect(listen);
        match bad {
            None => {
                // s_server echoes nothing back, but a refused handshake closes our
                // connection at once; an accepted one logs the established connection.
                use std::io::Write;
                c.write_all(b"hello\n").unwrap();
                s.wait_log(&["established mTLS connection", &name, PEER]);
            }
            Some((words, label)) => {
                use std::io::Write;
                let _ = c.write_all(b"secret request");
                assert!(read_all(&mut c).is_empty(), "{name}: nothing may come back");
                let mut parts: Vec<&str> = vec!["handshake rejected", &name, label];
                parts.extend(words.iter().map(|x| x.as_str()));
                s.wait_log(&parts);
                assert_eq!(
                    s.metric(&format!(
                        "svidcar_handshake_failures_total{{listener=\"{name}\",reason=\"{label}\"}}"
                    )),
                    1.0,
                    "{name}"
                );
            }
        }
    }
}

#[test]
fn check_refuses_an_id_without_a_path_as_our_own() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let w = world(d);
    let listener = "inbound:\n  - name: web\n    listen: 127.0.0.1:8443\n    forward: 127.0.0.1:8080\n    allow:\n      - trust_domain: example.org\n";
    let run_check = |name: &str, yaml: String| {
        let path = d.join(format!("{name}.yaml"));
        std::fs::write(&path, yaml).unwrap();
        let out = Command::new(BIN)
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr).to_string()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(!text.contains("panicked"), "{text}");
        (out.status.success(), text)
    };
    let (ok, out) = run_check(
        "dev-no-path",
        format!("identity:\n  dev: {{trust_domain: example.org, spiffe_id: \"spiffe://example.org\"}}\n{listener}"),
    );
    assert!(!ok, "{out}");
    assert!(
        out.contains("identity.dev.spiffe_id") && out.contains("has no path"),
        "{out}"
    );
    // The same through the files source: an SVID whose ID has no path is not ours.
    let no_path = write_peer(d, "own-no-path", w.good.leaf("spiffe://example.org"), &[]);
    let (ok, out) = run_check(
        "files-no-path",
        format!(
            "identity:\n  files: {{cert: {}, key: {}, bundle: {}}}\n{listener}",
            no_path.cert.display(),
            no_path.key.display(),
            w.bundle.display()
        ),
    );
    assert!(!ok, "{out}");
    assert!(
        out.contains("own-no-path.pem") && out.contains("has no path"),
        "{out}"
    );
    // Control: the good identity passes.
    let (ok, out) = run_check("files-good", format!("{}{listener}", files_identity(&w)));
    assert!(ok, "{out}");
}
