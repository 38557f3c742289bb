//! Private keys exactly as `openssl` writes them — PKCS#8, SEC1 (with and without the
//! `EC PARAMETERS` block), PKCS#1 — for the dev CA, the dev-agent CA and the `files`
//! SVID; RSA end to end (svidcar pairs, openssl, the Workload API, Envoy over SDS);
//! `dev-ca --key-type`; clear errors for encrypted, garbage and unsupported keys; and a
//! `svidcar check` that writes nothing.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const WEB: &str = "spiffe://example.org/ns/default/sa/web";
const BACKEND: &str = "spiffe://example.org/ns/default/sa/backend";

/// Runs a shell command in `dir`; it must succeed. Returns stdout + stderr.
fn sh(dir: &Path, cmd: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .current_dir(dir)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "`{cmd}` failed: {text}");
    text
}

/// A CA certificate made by the openssl CLI over the key that `keygen` writes to
/// `NAME.key`, as the issue spells it.
fn openssl_ca(dir: &Path, name: &str, keygen: &str) -> (PathBuf, PathBuf) {
    sh(dir, &keygen.replace("KEY", &format!("{name}.key")));
    sh(
        dir,
        &format!(
            "openssl req -x509 -new -key {name}.key -subj '/O=test/CN=example.org' -days 30 \
             -addext basicConstraints=critical,CA:TRUE \
             -addext keyUsage=critical,keyCertSign,cRLSign \
             -addext subjectAltName=URI:spiffe://example.org -out {name}.pem"
        ),
    );
    (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    )
}

/// An X509-SVID for `id` signed by `ca` with the openssl CLI, over the key `keygen`
/// writes to `NAME.key`.
fn openssl_leaf(
    dir: &Path,
    ca: &(PathBuf, PathBuf),
    name: &str,
    id: &str,
    keygen: &str,
) -> (PathBuf, PathBuf) {
    sh(dir, &keygen.replace("KEY", &format!("{name}.key")));
    std::fs::write(
        dir.join(format!("{name}.ext")),
        format!(
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
             extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=URI:{id}\n"
        ),
    )
    .unwrap();
    sh(
        dir,
        &format!(
            "openssl req -new -key {name}.key -subj '/O=test' -out {name}.csr && \
             openssl x509 -req -in {name}.csr -CA {} -CAkey {} -CAcreateserial -CAserial {name}.srl \
             -days 1 -extfile {name}.ext -out {name}.pem",
            ca.0.display(),
            ca.1.display()
        ),
    );
    (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    )
}

const EC_KEY: &str = "openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out KEY";
const RSA_KEY: &str = "openssl genrsa -out KEY 2048";

/// The first PEM label in a file, to show which form openssl wrote.
fn first_label(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("-----BEGIN "))
        .unwrap_or_default()
        .trim_end_matches('-')
        .to_string()
}

/// All PEM labels in a file, in order.
fn labels(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("-----BEGIN "))
        .map(|l| l.trim_end_matches('-').to_string())
        .collect()
}

fn dev_identity(id: &str, ca: &(PathBuf, PathBuf)) -> String {
    format!(
        "identity:\n  dev: {{spiffe_id: \"{id}\", ca_cert: {}, ca_key: {}}}\n",
        ca.0.display(),
        ca.1.display()
    )
}

fn inbound(name: &str, port: u16, app: u16, allow: &str) -> String {
    format!("  - name: {name}\n    listen: 127.0.0.1:{port}\n    forward: 127.0.0.1:{app}\n    allow: [{{exact: \"{allow}\"}}]\n")
}

fn outbound(name: &str, port: u16, peer: u16, expect: &str) -> String {
    format!("  - name: {name}\n    listen: 127.0.0.1:{port}\n    connect: 127.0.0.1:{peer}\n    expect: [{{exact: \"{expect}\"}}]\n")
}

/// What openssl sees of the server at `port` when it connects with `client` and checks
/// the server against `ca`: s_client's report, then the server leaf as text.
fn server_leaf(dir: &Path, port: u16, client: &(PathBuf, PathBuf), ca: &Path) -> String {
    let out = dir.join(format!("s_client-{port}.txt"));
    let report = sh(
        dir,
        &format!(
            "openssl s_client -connect 127.0.0.1:{port} -cert {} -key {} -CAfile {} \
             -verify_return_error </dev/null >{} 2>&1; cat {}",
            client.0.display(),
            client.1.display(),
            ca.display(),
            out.display(),
            out.display()
        ),
    );
    let leaf = sh(
        dir,
        &format!("openssl x509 -noout -text -in {}", out.display()),
    );
    format!("{report}\n{leaf}")
}

/// Asserts the server at `port` presents a verified leaf of `key_text` (e.g.
/// "Public-Key: (2048 bit)") and carries bytes for an openssl client.
fn assert_serves(dir: &Path, port: u16, client: &(PathBuf, PathBuf), ca: &Path, key_text: &[&str]) {
    let seen = server_leaf(dir, port, client, ca);
    assert!(seen.contains("Verify return code: 0 (ok)"), "{seen}");
    for t in key_text {
        assert!(
            seen.contains(t),
            "expected {t:?} in the server leaf: {seen}"
        );
    }
    let msg = format!("hello over {port}");
    let out = s_client(
        port,
        Some((&client.0, &client.1)),
        &["-CAfile", ca.to_str().unwrap()],
        msg.as_bytes(),
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&msg),
        "{out:?}"
    );
}

/// A dev CA whose key `keygen` writes (in the PEM form `form`): `check` passes, a pair of
/// svidcars sharing it carries bytes both ways, and openssl sees a leaf with `leaf_key`.
fn dev_ca_end_to_end(keygen: &str, form: &[&str], leaf_key: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = openssl_ca(d, "ca", keygen);
    assert_eq!(labels(&ca.1), form, "openssl wrote another form");

    let (ok, out) = check_config(
        d,
        "check",
        &format!(
            "{}inbound:\n{}",
            dev_identity(WEB, &ca),
            inbound("a", 8443, 8080, BACKEND)
        ),
    );
    assert!(
        ok && out.contains(&format!("config OK: identity {WEB}")),
        "{out}"
    );

    let echo = EchoServer::start();
    let (a_in, a_out, b_in, b_out) = (free_port(), free_port(), free_port(), free_port());
    let a = Svidcar::start(
        d,
        "a",
        &format!(
            "{}inbound:\n{}outbound:\n{}",
            dev_identity(WEB, &ca),
            inbound("a-in", a_in, echo.port, BACKEND),
            outbound("a-out", a_out, b_in, BACKEND)
        ),
    );
    let b = Svidcar::start(
        d,
        "b",
        &format!(
            "{}inbound:\n{}outbound:\n{}",
            dev_identity(BACKEND, &ca),
            inbound("b-in", b_in, echo.port, WEB),
            outbound("b-out", b_out, a_in, WEB)
        ),
    );
    // A -> B and B -> A: each side's SVID is checked by the other as server and client.
    let mut c = connect(a_out);
    assert_eq!(echo_roundtrip(&mut c, b"a to b").unwrap(), b"a to b");
    let mut c = connect(b_out);
    assert_eq!(echo_roundtrip(&mut c, b"b to a").unwrap(), b"b to a");
    a.wait_log(&["accepted mTLS connection", BACKEND]);
    b.wait_log(&["accepted mTLS connection", WEB]);

    // openssl, with a client SVID it minted itself from the same CA, checks A's SVID.
    let client = openssl_leaf(d, &ca, "client", BACKEND, EC_KEY);
    assert_serves(d, a_in, &client, &ca.0, leaf_key);
}

const RSA_LEAF: &[&str] = &["rsaEncryption", "Public-Key: (2048 bit)"];
const P256_LEAF: &[&str] = &["id-ecPublicKey", "Public-Key: (256 bit)", "prime256v1"];

#[test]
fn ca_key_from_ecparam_genkey_sec1_with_parameters() {
    dev_ca_end_to_end(
        "openssl ecparam -genkey -name prime256v1 -out KEY",
        &["EC PARAMETERS", "EC PRIVATE KEY"],
        P256_LEAF,
    );
}

#[test]
fn ca_key_from_openssl_ec_sec1_without_parameters() {
    dev_ca_end_to_end(
        "openssl ecparam -genkey -name prime256v1 -out raw.key && openssl ec -in raw.key -out KEY",
        &["EC PRIVATE KEY"],
        P256_LEAF,
    );
}

#[test]
fn ca_key_from_genpkey_ec_pkcs8() {
    dev_ca_end_to_end(EC_KEY, &["PRIVATE KEY"], P256_LEAF);
}

#[test]
fn ca_key_from_ecparam_p384_mints_p384_svids() {
    dev_ca_end_to_end(
        "openssl ecparam -genkey -name secp384r1 -out KEY",
        &["EC PARAMETERS", "EC PRIVATE KEY"],
        &["id-ecPublicKey", "Public-Key: (384 bit)", "secp384r1"],
    );
}

#[test]
fn rsa_ca_from_genrsa_pkcs8_mints_rsa_svids() {
    dev_ca_end_to_end(RSA_KEY, &["PRIVATE KEY"], RSA_LEAF);
}

#[test]
fn rsa_ca_from_genrsa_traditional_pkcs1_mints_rsa_svids() {
    dev_ca_end_to_end(
        "openssl genrsa -traditional -out KEY 2048",
        &["RSA PRIVATE KEY"],
        RSA_LEAF,
    );
}

#[test]
fn dev_agent_with_rsa_ca_gives_rsa_svid_over_workload_api() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = openssl_ca(d, "ca", "openssl genrsa -traditional -out KEY 2048");
    assert_eq!(first_label(&ca.1), "RSA PRIVATE KEY");
    let agent = DevAgent::start(
        d,
        &format!(
            "trust_domain: example.org\nca_cert: {}\nca_key: {}\nentries:\n  - spiffe_id: {WEB}\n    selectors: [\"unix:uid:0\"]\n",
            ca.0.display(),
            ca.1.display()
        ),
    );
    let echo = EchoServer::start();
    let port = free_port();
    let s = Svidcar::start(
        d,
        "wl",
        &format!(
            "identity:\n  workload_api: {{socket: \"{}\"}}\ninbound:\n{}",
            agent.url(),
            inbound("app", port, echo.port, BACKEND)
        ),
    );
    let client = openssl_leaf(d, &ca, "client", BACKEND, RSA_KEY);
    assert_serves(d, port, &client, &ca.0, RSA_LEAF);
    s.wait_log(&["accepted mTLS connection", BACKEND]);
    // A SPIFFE client nobody here wrote takes the RSA SVID and its key too.
    let (ok, out) = python(
        d,
        r#"
from cryptography.hazmat.primitives.asymmetric import rsa
from spiffe import WorkloadApiClient
s = WorkloadApiClient(socket_path='unix:agent.sock').fetch_x509_svid()
print('svid', s.spiffe_id, isinstance(s.private_key, rsa.RSAPrivateKey), s.private_key.key_size)
"#,
    );
    assert!(
        ok && out.contains(&format!("svid {WEB} True 2048")),
        "{out}"
    );
}

#[test]
fn files_svid_keys_in_sec1_and_pkcs1_form() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = openssl_ca(d, "ca", EC_KEY);
    let client = openssl_leaf(d, &ca, "client", BACKEND, EC_KEY);
    let cases = [
        (
            "ec",
            "openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out p8.key && openssl ec -in p8.key -out KEY",
            "EC PRIVATE KEY",
            P256_LEAF,
        ),
        (
            "rsa",
            "openssl genrsa -out p8.key 2048 && openssl rsa -in p8.key -traditional -out KEY",
            "RSA PRIVATE KEY",
            RSA_LEAF,
        ),
    ];
    for (name, keygen, form, leaf_key) in cases {
        let svid = openssl_leaf(d, &ca, &format!("svid-{name}"), WEB, keygen);
        assert_eq!(first_label(&svid.1), form);
        let echo = EchoServer::start();
        let port = free_port();
        let cfg = format!(
            "identity:\n  files: {{cert: {}, key: {}, bundle: {}}}\ninbound:\n{}",
            svid.0.display(),
            svid.1.display(),
            ca.0.display(),
            inbound("app", port, echo.port, BACKEND)
        );
        let (ok, out) = check_config(d, &format!("check-{name}"), &cfg);
        assert!(ok, "{out}");
        let _s = Svidcar::start(d, &format!("files-{name}"), &cfg);
        assert_serves(d, port, &client, &ca.0, leaf_key);
    }
}

#[test]
fn envoy_takes_an_rsa_svid_over_sds_and_completes_handshakes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = openssl_ca(d, "ca", RSA_KEY);
    let sock = d.join("sds.sock");
    let _s = Svidcar::start(
        d,
        "sds",
        &format!(
            "{}sds:\n  listen: unix://{}\n",
            dev_identity(WEB, &ca),
            sock.display()
        ),
    );
    let echo = EchoServer::start();
    let port = free_port();
    let envoy = Envoy::start(
        d,
        "sds-inbound.yaml",
        &[
            ("LISTEN_PORT", port.to_string()),
            ("APP_PORT", echo.port.to_string()),
            ("SDS_SOCKET", sock.display().to_string()),
            ("SVID_NAME", "default".into()),
            ("BUNDLE_NAME", "ROOTCA".into()),
            ("PEER_ID", BACKEND.into()),
        ],
    );
    wait_until("envoy certs", Duration::from_secs(15), || {
        envoy.has_cert().then_some(())
    });
    // Envoy presents svidcar's RSA SVID (openssl verifies it against the RSA CA) and
    // checks an RSA client SVID against the bundle svidcar served.
    let client = openssl_leaf(d, &ca, "client", BACKEND, RSA_KEY);
    assert_serves(d, port, &client, &ca.0, RSA_LEAF);
    let leaf = server_leaf(d, port, &client, &ca.0);
    assert!(leaf.contains(&format!("URI:{WEB}")), "{leaf}");
}

#[test]
fn dev_ca_key_type_makes_rsa_and_p384_cas() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (kt, ca_text, leaf_key) in [
        ("rsa-2048", "Private-Key: (2048 bit", RSA_LEAF),
        (
            "ec-p384",
            "Private-Key: (384 bit)",
            &["id-ecPublicKey", "Public-Key: (384 bit)", "secp384r1"][..],
        ),
    ] {
        let ca = (d.join(format!("{kt}.pem")), d.join(format!("{kt}.key")));
        let out = Command::new(BIN)
            .args(["dev-ca", "--trust-domain", "example.org", "--key-type", kt])
            .arg("--cert")
            .arg(&ca.0)
            .arg("--key")
            .arg(&ca.1)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        assert_eq!(first_label(&ca.1), "PRIVATE KEY", "PKCS#8, as SPIRE writes");
        let text = sh(
            d,
            &format!("openssl pkey -in {} -noout -text", ca.1.display()),
        );
        assert!(text.contains(ca_text), "{kt}: {text}");

        let echo = EchoServer::start();
        let port = free_port();
        let _s = Svidcar::start(
            d,
            kt,
            &format!(
                "{}inbound:\n{}",
                dev_identity(WEB, &ca),
                inbound("app", port, echo.port, BACKEND)
            ),
        );
        let client = openssl_leaf(d, &ca, &format!("client-{kt}"), BACKEND, EC_KEY);
        assert_serves(d, port, &client, &ca.0, leaf_key);
    }
    let out = Command::new(BIN)
        .args([
            "dev-ca",
            "--trust-domain",
            "example.org",
            "--key-type",
            "rsa-1024",
        ])
        .args(["--cert", "x.pem", "--key", "x.key"])
        .current_dir(d)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--key-type") && err.contains("ec-p256, ec-p384, rsa-2048"),
        "{err}"
    );
    assert!(!d.join("x.key").exists());
}

/// One base64 line from the middle of a key file: must never show up in an error.
fn key_body_line(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .find(|l| !l.starts_with("-----") && !l.contains(':') && l.len() >= 32)
        .unwrap_or_else(|| panic!("no body line in {}", path.display()))
        .to_string()
}

#[test]
fn encrypted_garbage_and_unsupported_keys_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = openssl_ca(d, "ca", EC_KEY);
    let svid = openssl_leaf(d, &ca, "svid", WEB, EC_KEY);
    sh(
        d,
        "openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -aes-256-cbc -pass pass:secret -out encrypted.key",
    );
    assert_eq!(
        first_label(&d.join("encrypted.key")),
        "ENCRYPTED PRIVATE KEY"
    );
    sh(
        d,
        "openssl genrsa -aes256 -traditional -passout pass:secret -out legacy.key 2048",
    );
    assert!(std::fs::read_to_string(d.join("legacy.key"))
        .unwrap()
        .contains("Proc-Type: 4,ENCRYPTED"));
    sh(d, "openssl ecparam -genkey -name secp521r1 -out p521.key");
    sh(d, "openssl genpkey -algorithm ed448 -out ed448.key");
    sh(d, "openssl ec -in ca.key -no_public -out nopub.key");
    sh(d, "openssl pkey -in ca.key -outform DER -out der.key");
    std::fs::write(d.join("garbage.key"), "this is not a key\n").unwrap();
    std::fs::write(
        d.join("broken.key"),
        "-----BEGIN PRIVATE KEY-----\nTm90IGEgREVSIHByaXZhdGUga2V5IGF0IGFsbA==\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();

    let cases = [
        ("encrypted.key", vec!["encrypted", "openssl pkey"]),
        ("legacy.key", vec!["encrypted", "Proc-Type"]),
        ("garbage.key", vec!["no private key found"]),
        ("broken.key", vec!["PKCS#8", "malformed"]),
        (
            "p521.key",
            vec!["EC P-521 keys are not supported", "EC P-256"],
        ),
        ("ed448.key", vec!["Ed448 keys are not supported"]),
        ("nopub.key", vec!["lacks its public key"]),
        ("der.key", vec!["not PEM text"]),
    ];
    let listener = inbound("a", 8443, 8080, BACKEND);
    for (key, expect) in &cases {
        let key_path = d.join(key);
        let secret = String::from_utf8_lossy(&std::fs::read(&key_path).unwrap())
            .contains("-----BEGIN")
            .then(|| key_body_line(&key_path));
        // The same key as a dev CA key and as a `files` SVID key.
        let as_ca = format!(
            "identity:\n  dev: {{spiffe_id: \"{WEB}\", ca_cert: {}, ca_key: {}}}\ninbound:\n{listener}",
            ca.0.display(),
            key_path.display()
        );
        let as_svid = format!(
            "identity:\n  files: {{cert: {}, key: {}, bundle: {}}}\ninbound:\n{listener}",
            svid.0.display(),
            key_path.display(),
            ca.0.display()
        );
        for (how, yaml) in [("ca", as_ca), ("svid", as_svid)] {
            let (ok, out) = check_config(d, &format!("{key}-{how}"), &yaml);
            assert!(!ok, "{key} as {how} must fail: {out}");
            assert!(
                out.contains(&format!("{}: ", key_path.display())),
                "{key} as {how}: names the file: {out}"
            );
            for e in expect {
                assert!(out.contains(e), "{key} as {how}: expected {e:?} in {out:?}");
            }
            assert_eq!(
                out.trim().lines().count(),
                1,
                "{key} as {how}: one line: {out}"
            );
            assert!(!out.contains("PRIVATE KEY"), "{key} as {how}: {out}");
            if let Some(line) = &secret {
                assert!(
                    !out.contains(line.as_str()),
                    "{key} as {how}: key bytes in {out}"
                );
            }
        }
    }

    // The dev-agent refuses to start on an encrypted CA key, saying why.
    std::fs::write(
        d.join("agent.yaml"),
        format!(
            "socket: {}\ntrust_domain: example.org\nca_cert: {}\nca_key: {}\nentries:\n  - spiffe_id: {WEB}\n    selectors: [\"unix:uid:0\"]\n",
            d.join("agent.sock").display(),
            ca.0.display(),
            d.join("encrypted.key").display()
        ),
    )
    .unwrap();
    let out = wait_output(
        Command::new(BIN)
            .args(["dev-agent", "--config"])
            .arg(d.join("agent.yaml"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
        Duration::from_secs(30),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("encrypted.key") && err.contains("encrypted"),
        "{err}"
    );
}

#[test]
fn check_leaves_bundle_out_alone() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = openssl_ca(d, "ca", EC_KEY);
    // A bundle a running sidecar wrote, which peers trust: check must not replace it,
    // neither with a loaded CA nor with a freshly generated one.
    let existing = d.join("existing-bundle.pem");
    let before = std::fs::read(&ca.0).unwrap();
    std::fs::write(&existing, &before).unwrap();
    let missing = d.join("missing-bundle.pem");
    for (name, identity) in [
        (
            "loaded",
            format!("ca_cert: {}, ca_key: {}, ", ca.0.display(), ca.1.display()),
        ),
        ("generated", String::new()),
    ] {
        for out_path in [&existing, &missing] {
            let yaml = format!(
                "identity:\n  dev: {{{identity}spiffe_id: \"{WEB}\", bundle_out: {}}}\ninbound:\n{}",
                out_path.display(),
                inbound("a", 8443, 8080, BACKEND)
            );
            let (ok, out) = check_config(d, &format!("check-{name}"), &yaml);
            assert!(ok, "{out}");
            assert_eq!(
                std::fs::read(&existing).unwrap(),
                before,
                "{name}: bundle_out rewritten"
            );
            assert!(!missing.exists(), "{name}: check created bundle_out");
        }
    }
    // `run` with the same config does publish it.
    let _s = Svidcar::start(
        d,
        "run",
        &format!(
            "identity:\n  dev: {{spiffe_id: \"{WEB}\", bundle_out: {}}}\ninbound:\n{}",
            missing.display(),
            inbound("a", free_port(), 8080, BACKEND)
        ),
    );
    assert_eq!(first_label(&missing), "CERTIFICATE");
}
