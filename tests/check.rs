//! `svidcar check`: broken configs get one clear line naming the key and the problem,
//! and a non-zero exit; a good one passes.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime};

use common::*;

const LISTENER: &str = "inbound:\n  - name: web\n    listen: 127.0.0.1:8443\n    forward: 127.0.0.1:8080\n    allow:\n      - exact: spiffe://example.org/ns/default/sa/frontend\n";

#[test]
fn broken_configs_name_key_and_problem() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = TestCa::new("example.org");
    let (ca_cert, _) = ca.write(d, "ca");
    let (svid, svid_key) = ca.valid_leaf(d, "svid", "spiffe://example.org/ns/default/sa/web");
    let (_, other_key) = ca.valid_leaf(d, "other", "spiffe://example.org/ns/default/sa/other");
    let now = SystemTime::now();
    let day = Duration::from_secs(86400);
    let (dns_only, dns_only_key) = ca.leaf(d, "nouri", &[], now - day, now + day);
    let other_ca = TestCa::new("example.org");
    let (foreign, foreign_key) =
        other_ca.valid_leaf(d, "svid-foreign", "spiffe://example.org/ns/default/sa/web");
    let (old, old_key) = ca.leaf(
        d,
        "old",
        &["spiffe://example.org/ns/default/sa/web"],
        now - 2 * day,
        now - day,
    );
    let files = |cert: &Path, key: &Path| {
        format!(
            "identity:\n  files: {{cert: {}, key: {}, bundle: {}}}\n{LISTENER}",
            cert.display(),
            key.display(),
            ca_cert.display()
        )
    };
    let dev = "identity:\n  dev: {trust_domain: example.org, spiffe_id: \"spiffe://example.org/ns/default/sa/web\"}\n";

    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        ("bad-listen", format!("{dev}{}", LISTENER.replace("127.0.0.1:8443", "8443")), vec!["inbound[0].listen", "invalid socket address"]),
        ("typo-key", format!("{dev}{}", LISTENER.replace("forward:", "forwrd:")), vec!["inbound[0]", "unknown field `forwrd`"]),
        ("missing-pem", files(&d.join("nope.pem"), &svid_key), vec!["identity.files.cert", "nope.pem", "cannot read"]),
        ("key-mismatch", files(&svid, &other_key), vec!["private key does not match the certificate", "spiffe://example.org/ns/default/sa/web"]),
        ("no-spiffe-uri", files(&dns_only, &dns_only_key), vec!["nouri.pem", "no spiffe:// URI SAN"]),
        ("bad-duration", format!("{}{LISTENER}", dev.replace("}\n", ", svid_ttl: soon}\n")), vec!["identity.dev.svid_ttl", "invalid duration"]),
        ("two-sources", format!("{dev}  files: {{cert: a, key: b}}\n{LISTENER}"), vec!["identity", "exactly one of dev, files, workload_api", "dev, files"]),
        ("bad-regex", format!("{dev}{}", LISTENER.replace("exact: spiffe://example.org/ns/default/sa/frontend", "safe_regex: {regex: \"spiffe://(\"}")), vec!["inbound[0].allow[0]", "safe_regex.regex"]),
        ("non-canonical-id", format!("{dev}{}", LISTENER.replace("ns/default/sa/frontend", "ns//frontend")), vec!["inbound[0].allow[0]", "empty segments"]),
        ("empty-allow", format!("{dev}inbound:\n  - name: web\n    listen: 127.0.0.1:8443\n    forward: 127.0.0.1:8080\n"), vec!["inbound[0].allow", "refuse every peer"]),
        ("ca-not-ca", format!("identity:\n  dev: {{spiffe_id: \"spiffe://example.org/a\", ca_cert: {}, ca_key: {}}}\n{LISTENER}", svid.display(), svid_key.display()), vec!["svid.pem", "not a CA certificate"]),
        ("ca-key-mismatch", format!("identity:\n  dev: {{spiffe_id: \"spiffe://example.org/a\", ca_cert: {}, ca_key: {}}}\n{LISTENER}", ca_cert.display(), other_key.display()), vec!["other.key", "does not match the CA certificate"]),
        ("huge-max-connections", format!("{dev}{}", LISTENER.replace("forward: 127.0.0.1:8080", "forward: 127.0.0.1:8080\n    max_connections: 18446744073709551615")), vec!["inbound[0].max_connections", "from 1 to"]),
        ("huge-ttl", format!("{}{LISTENER}", dev.replace("}\n", ", svid_ttl: 10000y}\n")), vec!["identity.dev.svid_ttl", "too long"]),
        ("ignore-case-regex", format!("{dev}{}", LISTENER.replace("exact: spiffe://example.org/ns/default/sa/frontend", "{safe_regex: {regex: x}, ignore_case: true}")), vec!["inbound[0].allow[0]", "ignore_case has no effect"]),
        ("bad-sni", format!("{dev}outbound:\n  - name: o\n    listen: 127.0.0.1:9001\n    connect: 127.0.0.1:8443\n    sni: \"not a name\"\n    expect: [{{exact: \"spiffe://example.org/a\"}}]\n"), vec!["outbound[0].sni", "not a valid server name"]),
        ("own-td-twice", files(&svid, &svid_key).replace("}\ninbound", &format!(", bundles: {{example.org: {}}}}}\ninbound", ca_cert.display())), vec!["bundles.example.org", "already sets"]),
        ("svid-from-other-ca", files(&foreign, &foreign_key), vec!["svid-foreign.pem", "not signed by the bundle of example.org"]),
        ("expired-svid", files(&old, &old_key), vec!["old.pem", "has expired"]),
        ("leaf-as-bundle", files(&svid, &svid_key).replace(&format!("bundle: {}", ca_cert.display()), &format!("bundle: {}", svid.display())), vec!["svid.pem", "is not a CA"]),
        ("workload-api-no-socket", format!("identity:\n  workload_api: {{}}\n{LISTENER}"), vec!["identity.workload_api.socket", "SPIFFE_ENDPOINT_SOCKET is not set"]),
        ("workload-api-tcp", format!("identity:\n  workload_api: {{socket: \"tcp://127.0.0.1:8081\"}}\n{LISTENER}"), vec!["identity.workload_api.socket", "only unix sockets"]),
        ("workload-api-bad-id", format!("identity:\n  workload_api: {{socket: \"unix:///run/a.sock\", spiffe_id: \"spiffe://Example.org/x\"}}\n{LISTENER}"), vec!["identity.workload_api.spiffe_id", "canonical"]),
        ("yaml-syntax", format!("{dev}inbound: [\n"), vec!["not valid YAML", "line 4"]),
        ("yaml-syntax-in-flow-map", format!("{}{LISTENER}", dev.replace("}\n", "\n")), vec!["not valid YAML", "line 3", "flow mapping at line 2"]),
        ("log-level-typo", format!("log: {{level: infro}}\n{dev}{LISTENER}"), vec!["log.level", "\"infro\" is not a log level"]),
        ("log-directive-typo", format!("log: {{level: \"svidcar=debgu\"}}\n{dev}{LISTENER}"), vec!["log.level", "svidcar=debgu"]),
        ("listener-duration-line", format!("{dev}{LISTENER}    idle_timeout: 3 fortnights\n"), vec!["inbound[0].idle_timeout", "3 fortnights", "(line 9, column 19)"]),
        ("allow-id-without-path", format!("{dev}{}", LISTENER.replace("spiffe://example.org/ns/default/sa/frontend", "spiffe://example.org")), vec!["inbound[0].allow[0]", "exact", "path"]),
        ("ca-key-is-a-device", format!("identity:\n  dev: {{spiffe_id: \"spiffe://example.org/a\", ca_cert: {}, ca_key: /dev/zero}}\n{LISTENER}", ca_cert.display()), vec!["identity.dev.ca_key", "/dev/zero", "not a regular file"]),
        ("ca-key-missing", format!("identity:\n  dev: {{spiffe_id: \"spiffe://example.org/a\", ca_cert: {}, ca_key: {}}}\n{LISTENER}", ca_cert.display(), d.join("absent.key").display()), vec!["identity.dev.ca_key", "absent.key", "cannot read"]),
    ];
    for (name, yaml, expect) in &cases {
        let (ok, out) = check_config(d, name, yaml);
        assert!(!ok, "{name} must fail: {out}");
        for e in expect {
            assert!(out.contains(e), "{name}: expected {e:?} in {out:?}");
        }
        assert_eq!(out.trim().lines().count(), 1, "{name}: one line: {out}");
        // The key is named once, not once by svidcar and again by the YAML parser.
        let key = expect[0];
        if key.contains(['.', '[']) {
            assert_eq!(out.matches(key).count(), 1, "{name}: key named once: {out}");
        }
        assert!(
            !out.contains("PRIVATE KEY"),
            "{name}: key material in error"
        );
    }

    let (ok, out) = check_config(d, "good-files", &files(&svid, &svid_key));
    assert!(ok, "{out}");
    assert!(
        out.contains("config OK: identity spiffe://example.org/ns/default/sa/web"),
        "{out}"
    );
    let (ok, out) = check_config(d, "good-dev", &format!("{dev}{LISTENER}"));
    assert!(ok, "{out}");
    // Envoy's spelling of the level, and directives.
    let (ok, out) = check_config(
        d,
        "log-warning",
        &format!("log: {{level: \"warning,svidcar=debug\"}}\n{dev}{LISTENER}"),
    );
    assert!(ok, "{out}");
    let wl = format!("identity:\n  workload_api: {{socket: \"unix:///run/spire/sockets/agent.sock\"}}\n{LISTENER}");
    let (ok, out) = check_config(d, "good-workload-api", &wl);
    assert!(
        ok && out.contains("workload_api at unix:///run/spire/sockets/agent.sock"),
        "{out}"
    );
}

/// Relative paths in a config are read relative to the config file, from any working
/// directory; an error about such a file names the key and the resolved path.
#[test]
fn relative_paths_follow_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let conf_dir = dir.path().join("conf");
    std::fs::create_dir(&conf_dir).unwrap();
    dev_ca(&conf_dir, "example.org");
    let yaml = format!(
        "identity:\n  dev: {{spiffe_id: \"spiffe://example.org/web\", ca_cert: ca.pem, ca_key: ca.key}}\n{LISTENER}"
    );
    let path = conf_dir.join("svidcar.yaml");
    std::fs::write(&path, &yaml).unwrap();
    let run = |cwd: &Path| {
        let out = Command::new(BIN)
            .args(["check", "--config"])
            .arg(&path)
            .current_dir(cwd)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string()
                + &String::from_utf8_lossy(&out.stdout),
        )
    };
    let (ok, out) = run(Path::new("/"));
    assert!(ok, "from /: {out}");
    std::fs::remove_file(conf_dir.join("ca.key")).unwrap();
    let (ok, out) = run(Path::new("/"));
    assert!(!ok);
    let want = format!(
        "identity.dev.ca_key: {}: cannot read",
        conf_dir.join("ca.key").display()
    );
    assert!(out.contains(&want), "expected {want:?} in {out}");
}

/// `svidcar dev-ca` never replaces a CA that sidecars may trust, unless told to.
#[test]
fn dev_ca_refuses_to_overwrite_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = dev_ca(dir.path(), "example.org");
    let before = (std::fs::read(&cert).unwrap(), std::fs::read(&key).unwrap());
    let again = |force: bool| {
        let mut c = Command::new(BIN);
        c.args(["dev-ca", "--trust-domain", "example.org", "--cert"])
            .arg(&cert)
            .arg("--key")
            .arg(&key);
        if force {
            c.arg("--force");
        }
        c.output().unwrap()
    };
    let out = again(false);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&cert.display().to_string()) && err.contains("--force"),
        "{err}"
    );
    assert_eq!(
        before,
        (std::fs::read(&cert).unwrap(), std::fs::read(&key).unwrap()),
        "files untouched"
    );
    // The same file for both: refused, nothing written.
    let out = Command::new(BIN)
        .args(["dev-ca", "--trust-domain", "example.org", "--cert"])
        .arg(dir.path().join("same.pem"))
        .arg("--key")
        .arg(dir.path().join("same.pem"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("same file"));
    assert!(!dir.path().join("same.pem").exists());
    // A missing key directory: refused before the certificate is written.
    let out = Command::new(BIN)
        .args(["dev-ca", "--trust-domain", "example.org", "--cert"])
        .arg(dir.path().join("new.pem"))
        .arg("--key")
        .arg(dir.path().join("absent/new.key"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
    assert!(
        !dir.path().join("new.pem").exists(),
        "no certificate without its key"
    );
    assert!(again(true).status.success());
    assert_ne!(
        before.0,
        std::fs::read(&cert).unwrap(),
        "replaced with --force"
    );
}

/// Socket addresses are read one way everywhere, and a failed call names the socket.
#[test]
fn socket_errors_name_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("absent.sock");
    for form in [
        sock.display().to_string(),
        format!("unix:{}", sock.display()),
        format!("unix://{}", sock.display()),
    ] {
        let out = Command::new(BIN)
            .args(["workload", "--socket", &form, "jwt-bundles"])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("cannot reach unix://{}", sock.display()))
                && err.contains("No such file"),
            "{form}: {err}"
        );
    }
    let out = Command::new(BIN)
        .args(["workload", "--socket", "unix:relative.sock", "jwt-bundles"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--socket") && err.contains("must be absolute"),
        "{err}"
    );
}

/// The dev-agent reads its relative paths the same way, and names the key in errors.
#[test]
fn dev_agent_relative_paths_follow_its_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let conf_dir = dir.path().join("agent");
    std::fs::create_dir(&conf_dir).unwrap();
    dev_ca(&conf_dir, "example.org");
    std::fs::remove_file(conf_dir.join("ca.key")).unwrap();
    let path = conf_dir.join("agent.yaml");
    std::fs::write(
        &path,
        "socket: agent.sock\ntrust_domain: example.org\nca_cert: ca.pem\nca_key: ca.key\nentries:\n  - {spiffe_id: \"spiffe://example.org/web\", selectors: [\"unix:uid:0\"]}\n",
    )
    .unwrap();
    let child = Command::new(BIN)
        .args(["dev-agent", "--config"])
        .arg(&path)
        .current_dir("/")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_output(child, Duration::from_secs(20));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    let want = format!("ca_key: {}: cannot read", conf_dir.join("ca.key").display());
    assert!(err.contains(&want), "expected {want:?} in {err}");
}

/// The `transparent` section as the issue documents it passes `svidcar check`;
/// overlapping routes are fine; a route without `expect`, `proxy_uid: 0`, a port out of
/// range and a CIDR that does not parse each get one line naming the key.
#[test]
fn transparent_configs_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = r#"identity:
  dev: {spiffe_id: "spiffe://example.org/ns/prod/sa/web"}
transparent:
  proxy_uid: 1337
  inbound:
    listen: "[::]:15006"
    mode: strict
    allow: [{trust_domain: example.org}]
    ports:
      "9090": {mode: permissive}
      "8443": {allow: [{exact: "spiffe://example.org/ns/prod/sa/admin"}]}
    exclude_ports: [22]
  outbound:
    listen: "127.0.0.1:15001"
    routes:
      - to: ["10.77.0.0/16", "fd77::/64"]
        ports: [8080, 8443]
        expect: [{trust_domain: example.org}]
      - to: ["10.0.0.0/8"]
        expect: [{exact: "spiffe://example.org/ns/prod/sa/db"}]
    otherwise: passthrough
    exclude_ports: []
    exclude_cidrs: []
"#;
    let (ok, text) = check_config(d, "good", good);
    assert!(ok, "{text}");
    assert!(text.contains("1 inbound, 1 outbound"), "{text}");
    for (name, from, to, key) in [
        (
            "no-expect",
            "        expect: [{trust_domain: example.org}]\n",
            "",
            "transparent.outbound.routes[0].expect: missing",
        ),
        (
            "uid0",
            "proxy_uid: 1337",
            "proxy_uid: 0",
            "transparent.proxy_uid: must not be 0",
        ),
        (
            "port",
            "ports: [8080, 8443]",
            "ports: [8080, 84430]",
            "transparent.outbound.routes[0].ports",
        ),
        (
            "cidr",
            "\"10.0.0.0/8\"",
            "\"10.0.0.0/88\"",
            "transparent.outbound.routes[1].to[0]: \"10.0.0.0/88\" is not an IP address or CIDR",
        ),
    ] {
        let (ok, text) = check_config(d, name, &good.replacen(from, to, 1));
        assert!(!ok, "{name}: {text}");
        assert!(text.contains(key), "{name}: {text}");
        assert_eq!(text.trim().lines().count(), 1, "{name}: one line: {text}");
    }
}
