//! `svidcar check`: broken configs get one clear line naming the key and the problem,
//! and a non-zero exit; a good one passes.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime};

use common::*;

fn check(dir: &Path, name: &str, yaml: &str) -> (bool, String) {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&path)
        .env_remove("SPIFFE_ENDPOINT_SOCKET")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!stderr.contains("panicked"), "{name}: {stderr}");
    (
        out.status.success(),
        stderr + &String::from_utf8_lossy(&out.stdout),
    )
}

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
        ("missing-pem", files(&d.join("nope.pem"), &svid_key), vec!["nope.pem", "cannot read"]),
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
        ("yaml-syntax", format!("{dev}inbound: [\n"), vec!["inbound", "line 4"]),
    ];
    for (name, yaml, expect) in &cases {
        let (ok, out) = check(d, name, yaml);
        assert!(!ok, "{name} must fail: {out}");
        for e in expect {
            assert!(out.contains(e), "{name}: expected {e:?} in {out:?}");
        }
        assert_eq!(out.trim().lines().count(), 1, "{name}: one line: {out}");
        assert!(
            !out.contains("PRIVATE KEY"),
            "{name}: key material in error"
        );
    }

    let (ok, out) = check(d, "good-files", &files(&svid, &svid_key));
    assert!(ok, "{out}");
    assert!(
        out.contains("config OK: identity spiffe://example.org/ns/default/sa/web"),
        "{out}"
    );
    let (ok, out) = check(d, "good-dev", &format!("{dev}{LISTENER}"));
    assert!(ok, "{out}");
    let wl = format!("identity:\n  workload_api: {{socket: \"unix:///run/spire/sockets/agent.sock\"}}\n{LISTENER}");
    let (ok, out) = check(d, "good-workload-api", &wl);
    assert!(
        ok && out.contains("workload_api at unix:///run/spire/sockets/agent.sock"),
        "{out}"
    );
}
