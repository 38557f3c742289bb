//! `svidcar webhook` (issue 13): a real AdmissionReview v1 over real TLS; the JSONPatch,
//! applied with Python's `jsonpatch`, gives exactly what `svidcar inject` gives for the
//! same pod; malformed reviews get error answers; the certificate is reloaded.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

/// An openssl self-signed server certificate as a user makes one (default key format).
fn server_cert(dir: &Path, name: &str) {
    let out = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=svidcar-webhook.svidcar.svc"])
        .args([
            "-addext",
            "subjectAltName=DNS:svidcar-webhook.svidcar.svc,DNS:localhost,IP:127.0.0.1",
        ])
        .arg("-keyout")
        .arg(dir.join(format!("{name}.key")))
        .arg("-out")
        .arg(dir.join(format!("{name}.pem")))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Webhook {
    child: Child,
    port: u16,
}

impl Drop for Webhook {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(dir: &Path, extra: &str) -> Webhook {
    let port = free_port();
    let config = dir.join("webhook.yaml");
    std::fs::write(
        &config,
        format!("listen: 127.0.0.1:{port}\ntls: {{cert: tls.pem, key: tls.key}}\ninject:\n  image: svidcar:test\n{extra}"),
    )
    .unwrap();
    let child = Command::new(BIN)
        .args(["webhook", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("webhook.log")).unwrap())
        .spawn()
        .unwrap();
    let w = Webhook { child, port };
    wait_until("webhook port", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    w
}

/// The pod of a Deployment's template as the API server sends it in a review.
const POD: &str = r#"{
  "apiVersion": "v1", "kind": "Pod",
  "metadata": {"generateName": "users-5d8f7c9b6-", "namespace": "shop",
               "labels": {"app": "users", "pod-template-hash": "5d8f7c9b6"},
               "annotations": {"svidcar.io/allow": "example.org"},
               "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "users-5d8f7c9b6",
                                    "uid": "5b1d0c1e-8f1e-4d55-9c3b-2f0f0a3c1e11", "controller": true, "blockOwnerDeletion": true}]},
  "spec": {
    "containers": [{"name": "app", "image": "registry.example/users:1.4.2",
                    "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                    "readinessProbe": {"httpGet": {"path": "/ready", "port": "http", "scheme": "HTTP"},
                                       "timeoutSeconds": 1, "periodSeconds": 10, "successThreshold": 1, "failureThreshold": 3},
                    "resources": {}, "terminationMessagePath": "/dev/termination-log",
                    "terminationMessagePolicy": "File", "imagePullPolicy": "IfNotPresent"}],
    "restartPolicy": "Always", "terminationGracePeriodSeconds": 30, "dnsPolicy": "ClusterFirst",
    "serviceAccountName": "users", "securityContext": {}, "schedulerName": "default-scheduler"
  },
  "status": {}
}"#;

fn review_json(uid: &str, object: &str) -> String {
    format!(
        r#"{{"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1",
  "request": {{"uid": "{uid}",
    "kind": {{"group": "", "version": "v1", "kind": "Pod"}},
    "resource": {{"group": "", "version": "v1", "resource": "pods"}},
    "requestKind": {{"group": "", "version": "v1", "kind": "Pod"}},
    "requestResource": {{"group": "", "version": "v1", "resource": "pods"}},
    "namespace": "shop", "operation": "CREATE",
    "userInfo": {{"username": "system:serviceaccount:kube-system:replicaset-controller",
                 "uid": "0c2b5e6e-3a3e-4c3f-9d0a-1b2c3d4e5f60",
                 "groups": ["system:serviceaccounts", "system:serviceaccounts:kube-system", "system:authenticated"]}},
    "object": {object}, "oldObject": null, "dryRun": false,
    "options": {{"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"}}}}}}"#
    )
}

/// POSTs `body` to the webhook over TLS verified with `tls.pem`; (status, body).
const POST: &str = r#"
import json, ssl, sys, urllib.request, urllib.error
port, ca, path, body = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
ctx = ssl.create_default_context(cafile=ca)
req = urllib.request.Request(f"https://localhost:{port}{path}", data=open(body, "rb").read(),
                             headers={"Content-Type": "application/json"}, method="POST")
try:
    with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
        print(r.status); print(r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code); print(e.read().decode())
"#;

fn post(dir: &Path, port: u16, path: &str, body: &str) -> (u16, serde_json::Value) {
    let f = dir.join("body.json");
    std::fs::write(&f, body).unwrap();
    let out = Command::new("python3")
        .args(["-c", POST, &port.to_string()])
        .arg(dir.join("tls.pem"))
        .arg(path)
        .arg(&f)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (status, body) = text.split_once('\n').unwrap();
    (
        status.parse().unwrap(),
        serde_json::from_str(body.trim()).unwrap_or(serde_json::Value::Null),
    )
}

#[test]
fn webhook_patch_gives_what_inject_gives() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    server_cert(d, "tls");
    let w = start(d, "");
    let (status, answer) = post(d, w.port, "/mutate", &review_json("7f1c2a4e-1", POD));
    assert_eq!(status, 200, "{answer}");
    let resp = &answer["response"];
    assert_eq!(answer["kind"], "AdmissionReview");
    assert_eq!(resp["uid"], "7f1c2a4e-1");
    assert_eq!(resp["allowed"], true);
    assert_eq!(resp["patchType"], "JSONPatch");

    // Apply the patch with Python's jsonpatch; inject the same pod with the CLI; compare.
    std::fs::write(d.join("pod.json"), POD).unwrap();
    std::fs::write(d.join("answer.json"), answer.to_string()).unwrap();
    let inject = Command::new(BIN)
        .args(["inject", "--image", "svidcar:test"])
        .arg(d.join("pod.json"))
        .output()
        .unwrap();
    assert!(inject.status.success());
    std::fs::write(d.join("injected.yaml"), &inject.stdout).unwrap();
    let (same, report) = python(
        d,
        r#"
import base64, json, jsonpatch, yaml
pod = json.load(open("pod.json"))
answer = json.load(open("answer.json"))
patch = jsonpatch.JsonPatch(json.loads(base64.b64decode(answer["response"]["patch"])))
patched = patch.apply(pod)
injected = yaml.safe_load(open("injected.yaml"))
assert patched["spec"]["initContainers"][1]["name"] == "svidcar", patched
print("same" if patched == injected else "DIFFERENT\n" + json.dumps(patched, indent=1) + "\n" + json.dumps(injected, indent=1))
"#,
    );
    assert!(same && report.trim() == "same", "{report}");
}

#[test]
fn malformed_reviews_get_error_answers_and_the_webhook_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    server_cert(d, "tls");
    let w = start(d, "");
    // Garbage, an empty object, a review of another kind, a review without its object.
    let (s, _) = post(d, w.port, "/mutate", "\u{1}garbage{");
    assert_eq!(s, 400);
    let (s, _) = post(d, w.port, "/mutate", "{}");
    assert_eq!(s, 400);
    let deployment = review_json("u-2", r#"{"kind": "Deployment"}"#)
        .replace(r#""kind": "Pod"}"#, r#""kind": "Deployment"}"#)
        .replace(r#""group": """#, r#""group": "apps""#);
    let (s, a) = post(d, w.port, "/mutate", &deployment);
    assert_eq!(
        (s, &a["response"]["uid"], &a["response"]["allowed"]),
        (200, &"u-2".into(), &false.into()),
        "{a}"
    );
    assert!(a["response"]["status"]["message"]
        .as_str()
        .unwrap()
        .contains("injects pods"));
    let no_object = review_json("u-3", "null");
    let (s, a) = post(d, w.port, "/mutate", &no_object);
    assert_eq!((s, &a["response"]["allowed"]), (200, &false.into()), "{a}");
    // A pod with a bad annotation: allowed unchanged, with a warning (the default).
    let bad = POD.replace(
        r#""svidcar.io/allow": "example.org""#,
        r#""svidcar.io/mode": "lenient""#,
    );
    let (s, a) = post(d, w.port, "/mutate", &review_json("u-4", &bad));
    assert_eq!((s, &a["response"]["allowed"]), (200, &true.into()), "{a}");
    assert!(a["response"].get("patch").is_none());
    assert!(a["response"]["warnings"][0]
        .as_str()
        .unwrap()
        .contains("svidcar.io/mode"));
    // Wrong path and method.
    let (s, _) = post(d, w.port, "/other", &review_json("u-5", POD));
    assert_eq!(s, 404);
    // Still serving.
    let (s, a) = post(d, w.port, "/mutate", &review_json("u-6", POD));
    assert_eq!((s, &a["response"]["patchType"]), (200, &"JSONPatch".into()));
}

#[test]
fn on_error_deny_refuses_a_pod_it_cannot_inject() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    server_cert(d, "tls");
    let w = start(d, "on_error: deny\n");
    let bad = POD.replace(
        r#""svidcar.io/allow": "example.org""#,
        r#""svidcar.io/mode": "lenient""#,
    );
    let (s, a) = post(d, w.port, "/mutate", &review_json("u-7", &bad));
    assert_eq!((s, &a["response"]["allowed"]), (200, &false.into()), "{a}");
    assert!(a["response"]["status"]["message"]
        .as_str()
        .unwrap()
        .contains("use strict or permissive"));
}

#[test]
fn the_serving_certificate_is_reloaded_when_its_files_change() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    server_cert(d, "tls");
    let w = start(d, "");
    let serial = |d: &Path| {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "openssl s_client -connect 127.0.0.1:{} </dev/null 2>/dev/null | openssl x509 -noout -serial",
                w.port
            ))
            .current_dir(d)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let file_serial = |name: &str| {
        let out = Command::new("openssl")
            .args(["x509", "-noout", "-serial", "-in"])
            .arg(d.join(name))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(serial(d), file_serial("tls.pem"));
    // A renewal, written as a Secret update would be (new files, then in place).
    server_cert(d, "new");
    std::fs::copy(d.join("new.key"), d.join("tls.key")).unwrap();
    std::fs::copy(d.join("new.pem"), d.join("tls.pem")).unwrap();
    let want = file_serial("new.pem");
    wait_until("new certificate served", Duration::from_secs(15), || {
        (serial(d) == want).then_some(())
    });
    // A broken file keeps the current certificate.
    std::fs::write(d.join("tls.pem"), "not a certificate").unwrap();
    wait_until("refusal logged", Duration::from_secs(15), || {
        std::fs::read_to_string(d.join("webhook.log"))
            .unwrap()
            .contains("does not load; keeping the previous one")
            .then_some(())
    });
    assert_eq!(serial(d), want);
}
