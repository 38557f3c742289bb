//! The shipped Kubernetes manifests (deploy/, issue 13): every object validates against the
//! Kubernetes 1.33 schemas (kubernetes-validate, strict); the custom resources we do not
//! ship a CRD for (ClusterSPIFFEID, cert-manager's Issuer and Certificate) are checked
//! field by field for what svidcar relies on; the webhook's pieces name each other
//! consistently; `svidcar inject` over the example's workloads gives valid objects; the
//! webhook config in the ConfigMap starts `svidcar webhook`, which answers /healthz.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy");

/// Checks every document of the files given: built-in kinds with kubernetes-validate
/// (1.33, strict: unknown fields are errors); the custom kinds below by hand, since we
/// ship no CRD for them. Any other kind is an error. Prints one line per object.
const VALIDATE: &str = r#"
import sys, yaml, kubernetes_validate

# The fields of the custom resources' specs (from their CRDs); a misspelt field is an error.
CLUSTER_SPIFFE_ID = {"spiffeIDTemplate", "namespaceSelector", "podSelector", "workloadSelectorTemplates",
                     "dnsNameTemplates", "federatesWith", "ttl", "jwtTtl", "admin", "downstream",
                     "autoPopulateDNSNames", "className", "fallback", "hint"}
ISSUER = {"selfSigned", "ca", "acme", "vault", "venafi"}
CERTIFICATE = {"secretName", "dnsNames", "ipAddresses", "uris", "commonName", "duration", "renewBefore",
               "isCA", "privateKey", "issuerRef", "usages", "subject", "secretTemplate", "keystores",
               "revisionHistoryLimit", "emailAddresses", "literalSubject", "nameConstraints",
               "otherNames", "encodeUsagesInRequest", "additionalOutputFormats", "renewBeforePercentage"}
PRIVATE_KEY = {"algorithm", "size", "encoding", "rotationPolicy"}

def check_keys(what, got, allowed):
    extra = set(got) - allowed
    if extra:
        raise ValueError(f"{what}: unknown field(s) {sorted(extra)}")

def check_custom(obj, issuers):
    kind, spec = obj["kind"], obj.get("spec")
    if not isinstance(spec, dict):
        raise ValueError(f"{kind} has no spec")
    if kind == "ClusterSPIFFEID":
        assert obj["apiVersion"] == "spire.spiffe.io/v1alpha1", obj["apiVersion"]
        check_keys("ClusterSPIFFEID.spec", spec, CLUSTER_SPIFFE_ID)
        # svidcar's allow rules name spiffe://example.org/ns/<ns>/sa/<sa>.
        want = "spiffe://example.org/ns/{{ .PodMeta.Namespace }}/sa/{{ .PodSpec.ServiceAccountName }}"
        if spec.get("spiffeIDTemplate") != want:
            raise ValueError(f"spiffeIDTemplate is {spec.get('spiffeIDTemplate')!r}, want {want!r}")
        # The same namespaces the webhook injects.
        if spec.get("namespaceSelector", {}).get("matchLabels") != {"svidcar.io/inject": "enabled"}:
            raise ValueError("namespaceSelector must select svidcar.io/inject=enabled")
    elif kind == "Issuer":
        assert obj["apiVersion"] == "cert-manager.io/v1", obj["apiVersion"]
        check_keys("Issuer.spec", spec, ISSUER)
        if len(spec) != 1:
            raise ValueError(f"an Issuer has exactly one type, got {sorted(spec)}")
    elif kind == "Certificate":
        assert obj["apiVersion"] == "cert-manager.io/v1", obj["apiVersion"]
        check_keys("Certificate.spec", spec, CERTIFICATE)
        check_keys("Certificate.spec.privateKey", spec.get("privateKey", {}), PRIVATE_KEY)
        if not spec.get("secretName"):
            raise ValueError("Certificate without secretName")
        ref = spec.get("issuerRef", {})
        if (ref.get("kind"), obj["metadata"].get("namespace"), ref.get("name")) not in issuers:
            raise ValueError(f"issuerRef {ref} names no Issuer shipped in its namespace")
    else:
        raise ValueError(f"unknown custom kind {kind}")

CUSTOM = {"spire.spiffe.io", "cert-manager.io"}
docs = []
for path in sys.argv[1:]:
    for doc in yaml.safe_load_all(open(path)):
        if doc:
            docs += [(path, o) for o in (doc["items"] if doc.get("kind", "").endswith("List") else [doc])]
issuers = {("Issuer", o["metadata"].get("namespace"), o["metadata"]["name"]) for _, o in docs if o.get("kind") == "Issuer"}
ok = True
for path, obj in docs:
    name = obj.get("metadata", {}).get("name")
    try:
        if obj.get("apiVersion", "").split("/")[0] in CUSTOM:
            check_custom(obj, issuers)
        else:
            kubernetes_validate.validate(obj, "1.33.0", strict=True)
        print("valid", path, obj["kind"], name)
    except Exception as e:
        ok = False
        print("INVALID", path, obj.get("kind"), name, str(e)[:600])
sys.exit(0 if ok else 1)
"#;

/// Every `.yaml` under `dir`, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(yaml_files(&p));
        } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// Runs a Python script with args; (exit status success, stdout + stderr).
fn run_python(script: &str, args: &[PathBuf]) -> (bool, String) {
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn validate(files: &[PathBuf]) -> (bool, String) {
    run_python(VALIDATE, files)
}

/// Every document under deploy/ validates; none is skipped.
#[test]
fn every_shipped_manifest_validates() {
    let files = yaml_files(Path::new(DEPLOY));
    assert!(files.len() >= 10, "{files:?}");
    let (ok, report) = validate(&files);
    assert!(ok, "{report}");
    let valid = report.lines().filter(|l| l.starts_with("valid ")).count();
    // Count documents independently of the validator: each non-empty one must be reported valid.
    let (counted, n) = run_python(
        "import sys, yaml\nprint(sum(1 for p in sys.argv[1:] for d in yaml.safe_load_all(open(p)) if d))",
        &files,
    );
    assert!(counted, "{n}");
    assert_eq!(valid.to_string(), n.trim(), "{report}");
    for kind in [
        "MutatingWebhookConfiguration",
        "Deployment",
        "StatefulSet",
        "DaemonSet",
        "CSIDriver",
        "ClusterSPIFFEID",
        "Certificate",
    ] {
        assert!(
            report.lines().any(|l| l.split(' ').nth(2) == Some(kind)),
            "no {kind} shipped:\n{report}"
        );
    }
}

/// The negative check: a misspelt field in a built-in kind, and in each custom kind, is
/// refused and named.
#[test]
fn a_misspelt_field_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "webhook/30-deployment.yaml",
            "  replicas: 2\n",
            "  replica: 2\n",
            "replica",
        ),
        (
            "example/spire/40-clusterspiffeid.yaml",
            "spiffeIDTemplate:",
            "spiffeIdTemplate:",
            "spiffeIdTemplate",
        ),
        (
            "webhook/cert-manager/certificate.yaml",
            "  secretName: svidcar-webhook-tls\n",
            "  secretName: svidcar-webhook-tls\n  dnsName: x\n",
            "dnsName",
        ),
    ];
    for (i, (file, from, to, field)) in cases.iter().enumerate() {
        let text = std::fs::read_to_string(Path::new(DEPLOY).join(file)).unwrap();
        assert!(text.contains(from), "{file} has no {from:?}");
        let bad = dir.path().join(format!("bad{i}.yaml"));
        std::fs::write(&bad, text.replacen(from, to, 1)).unwrap();
        let (ok, report) = validate(&[bad]);
        assert!(!ok, "{file} with {field:?} passed:\n{report}");
        assert!(
            report
                .lines()
                .any(|l| l.starts_with("INVALID") && l.contains(field)),
            "{report}"
        );
    }
}

/// The webhook's objects name each other: the Deployment's --config is the ConfigMap's
/// key; the config's TLS files are in the mounted Secret that cert-manager writes; the
/// Service targets the port the config listens on; the MutatingWebhookConfiguration
/// calls that Service on the config's path and cert-manager injects its CA.
const WEBHOOK_WIRING: &str = r#"
import sys, os, yaml
objs = {}
for p in sys.argv[1:]:
    for d in yaml.safe_load_all(open(p)):
        if d: objs[(d["kind"], d["metadata"]["name"])] = d
cm = objs[("ConfigMap", "svidcar-webhook")]
dep = objs[("Deployment", "svidcar-webhook")]
svc = objs[("Service", "svidcar-webhook")]
mwc = objs[("MutatingWebhookConfiguration", "svidcar")]
cert = objs[("Certificate", "svidcar-webhook")]
conf = yaml.safe_load(cm["data"]["webhook.yaml"])
pod = dep["spec"]["template"]["spec"]
c = pod["containers"][0]
assert dep["spec"]["replicas"] == 2
assert c["args"][:2] == ["webhook", "--config"], c["args"]
mounts = {m["name"]: m for m in c["volumeMounts"]}
vols = {v["name"]: v for v in pod["volumes"]}
cfg = [m for m in mounts.values() if m["mountPath"] == c["args"][2]]
assert cfg and vols[cfg[0]["name"]]["configMap"]["name"] == "svidcar-webhook" and cfg[0]["subPath"] == "webhook.yaml", cfg
for f in (conf["tls"]["cert"], conf["tls"]["key"]):
    m = [m for m in mounts.values() if os.path.dirname(f) == m["mountPath"]]
    assert m, f"{f} is in no mounted directory"
    assert "subPath" not in m[0], "a subPath mount never sees renewals"
    assert vols[m[0]["name"]]["secret"]["secretName"] == cert["spec"]["secretName"]
    assert os.path.basename(f) in ("tls.crt", "tls.key")
port = int(conf["listen"].rsplit(":", 1)[1])
ports = {p["name"]: p["containerPort"] for p in c["ports"]}
assert ports[svc["spec"]["ports"][0]["targetPort"]] == port and svc["spec"]["ports"][0]["port"] == 443
for probe in ("readinessProbe", "livenessProbe"):
    g = c[probe]["httpGet"]
    assert g["path"] == "/healthz" and g["scheme"] == "HTTPS" and ports[g["port"]] == port, g
sc, psc = c["securityContext"], pod["securityContext"]
assert psc["runAsUser"] == 1337 and psc["runAsNonRoot"] and sc["readOnlyRootFilesystem"], (sc, psc)
assert sc["capabilities"] == {"drop": ["ALL"]} and sc["allowPrivilegeEscalation"] is False
assert pod["automountServiceAccountToken"] is False
assert objs[("ServiceAccount", "svidcar-webhook")]["automountServiceAccountToken"] is False
assert mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == "svidcar/svidcar-webhook"
assert "svidcar-webhook.svidcar.svc" in cert["spec"]["dnsNames"]
assert len(mwc["webhooks"]) == 2
for w in mwc["webhooks"]:
    s = w["clientConfig"]["service"]
    assert (s["name"], s["namespace"], s["path"], s["port"]) == ("svidcar-webhook", "svidcar", conf.get("path", "/mutate"), 443), s
    assert w["admissionReviewVersions"] == ["v1"] and w["sideEffects"] == "None"
    assert w["rules"][0]["operations"] == ["CREATE"] and w["rules"][0]["resources"] == ["pods"]
    excluded = [e for e in w["namespaceSelector"]["matchExpressions"] if e["key"] == "kubernetes.io/metadata.name"]
    assert set(excluded[0]["values"]) >= {"kube-system", "svidcar", "spire"}, w["name"]
print("wired")
"#;

#[test]
fn the_webhook_objects_name_each_other() {
    let files = yaml_files(&Path::new(DEPLOY).join("webhook"));
    let (ok, report) = run_python(WEBHOOK_WIRING, &files);
    assert!(ok && report.contains("wired"), "{report}");
}

/// `svidcar inject` over the example's workloads: both Deployments get the native sidecar,
/// the redirect init container and the CSI volume, users' allow rule reaches its sidecar
/// config, and every object of the output validates.
#[test]
fn the_example_workloads_inject_and_validate() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .arg("inject")
        .arg(Path::new(DEPLOY).join("example/app"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let injected = dir.path().join("injected.yaml");
    std::fs::write(&injected, &out.stdout).unwrap();
    let (ok, report) = validate(std::slice::from_ref(&injected));
    assert!(ok, "{report}");
    let (ok, report) = run_python(
        r#"
import sys, yaml
deps = {d["metadata"]["name"]: d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d["kind"] == "Deployment"}
assert set(deps) == {"frontend", "users"}, set(deps)
for name, d in deps.items():
    t = d["spec"]["template"]
    inits = {c["name"]: c for c in t["spec"]["initContainers"]}
    assert list(inits) == ["svidcar-redirect", "svidcar"], (name, list(inits))
    assert inits["svidcar"]["restartPolicy"] == "Always", name
    csi = [v for v in t["spec"]["volumes"] if "csi" in v]
    assert csi and csi[0]["csi"]["driver"] == "csi.spiffe.io", name
    assert t["metadata"]["annotations"]["svidcar.io/status"] == "injected", name
users = deps["users"]["spec"]["template"]["metadata"]["annotations"]["svidcar.io/sidecar-config"]
assert "spiffe://example.org/ns/demo/sa/frontend" in users, users
print("injected")
"#,
        &[injected],
    );
    assert!(ok && report.contains("injected"), "{report}");
}

struct Webhook(Child);

impl Drop for Webhook {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The ConfigMap's webhook config, with only `listen` and the TLS file paths moved to this
/// machine, starts `svidcar webhook`, and /healthz answers 200 over HTTPS.
#[test]
fn the_webhook_config_in_the_configmap_starts_the_webhook() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=svidcar-webhook.svidcar.svc"])
        .args(["-addext", "subjectAltName=DNS:localhost"])
        .arg("-keyout")
        .arg(d.join("tls.key"))
        .arg("-out")
        .arg(d.join("tls.crt"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let port = free_port();
    let config = d.join("webhook.yaml");
    let (ok, report) = run_python(
        r#"
import sys, yaml
cm = next(d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d["kind"] == "ConfigMap")
conf = yaml.safe_load(cm["data"]["webhook.yaml"])
conf["listen"] = "127.0.0.1:" + sys.argv[3]
conf["tls"] = {"cert": sys.argv[4] + "/tls.crt", "key": sys.argv[4] + "/tls.key"}
yaml.safe_dump(conf, open(sys.argv[2], "w"))
"#,
        &[
            Path::new(DEPLOY).join("webhook/20-configmap.yaml"),
            config.clone(),
            PathBuf::from(port.to_string()),
            d.to_path_buf(),
        ],
    );
    assert!(ok, "{report}");
    let log = d.join("webhook.log");
    let mut w = Webhook(
        Command::new(BIN)
            .args(["webhook", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let health = r#"
import ssl, sys, urllib.request
ctx = ssl.create_default_context(cafile=sys.argv[2])
with urllib.request.urlopen(f"https://localhost:{sys.argv[1]}/healthz", context=ctx, timeout=5) as r:
    print("status", r.status)
"#;
    // Ready when /healthz answers 200; a webhook that exits (a config it refuses) fails
    // the test with its own error message.
    wait_until("webhook /healthz", Duration::from_secs(15), || {
        if let Ok(Some(status)) = w.0.try_wait() {
            panic!(
                "svidcar webhook exited ({status}) with the ConfigMap's config:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        let (ok, report) = run_python(
            health,
            &[PathBuf::from(port.to_string()), d.join("tls.crt")],
        );
        (ok && report.contains("status 200")).then_some(())
    });
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("panicked"), "{text}");
}

/// The README's openssl one-off, run as written (the block between "or once with openssl"
/// and the `kubectl` lines): the certificate it makes is served by `svidcar webhook` and
/// verifies against its CA for the Service's DNS name, the name the API server calls.
#[test]
fn the_readme_openssl_one_off_makes_a_certificate_the_webhook_serves() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = &readme[readme
        .find("or once with openssl")
        .expect("no openssl one-off")..];
    let block = section.split("```").nth(1).expect("no code block");
    let commands: Vec<&str> = block
        .lines()
        .filter(|l| l.starts_with("openssl ") || l.starts_with("printf "))
        .collect();
    assert_eq!(commands.len(), 4, "{block}");
    let out = Command::new("sh")
        .args(["-ec", &commands.join("\n")])
        .current_dir(d)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let port = free_port();
    let config = d.join("webhook.yaml");
    std::fs::write(
        &config,
        format!("listen: 127.0.0.1:{port}\ntls: {{cert: tls.crt, key: tls.key}}\n"),
    )
    .unwrap();
    let log = d.join("webhook.log");
    let _w = Webhook(
        Command::new(BIN)
            .args(["webhook", "--config"])
            .arg(&config)
            .current_dir(d)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    // Connect to 127.0.0.1 but verify the name the API server uses.
    let check = r#"
import socket, ssl, sys
ctx = ssl.create_default_context(cafile=sys.argv[2])
with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5) as s:
    with ctx.wrap_socket(s, server_hostname="svidcar-webhook.svidcar.svc") as t:
        t.sendall(b"GET /healthz HTTP/1.1\r\nHost: svidcar-webhook.svidcar.svc\r\nConnection: close\r\n\r\n")
        print(t.recv(100).decode().splitlines()[0])
"#;
    let mut last = String::new();
    wait_until("webhook /healthz", Duration::from_secs(15), || {
        let (ok, report) = run_python(check, &[PathBuf::from(port.to_string()), d.join("ca.crt")]);
        last = report.clone();
        (ok && report.contains(" 200")).then_some(())
    });
    assert!(last.starts_with("HTTP/1.1 200"), "{last}");
}
