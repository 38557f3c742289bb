//! `svidcar inject` (issue 13): golden files for each kind of input, idempotence, schema
//! validation with `kubernetes-validate` (Kubernetes 1.33, strict), and an injected pair
//! of pods run for real: the generated init container, sidecar command and config in
//! network namespaces, a client reaching the app over mTLS, kubelet-style probes.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::netns::{read, Lan, Pod};
use common::*;
use serde_norway::Value;

const SAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/inject");

fn inject(args: &[&str], input: &Path) -> Output {
    Command::new(BIN)
        .arg("inject")
        .args(args)
        .arg(input)
        .output()
        .unwrap()
}

fn inject_text(args: &[&str], text: &str) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("in.yaml");
    std::fs::write(&f, text).unwrap();
    inject(args, &f)
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// Validates YAML streams against the Kubernetes 1.33 schemas, strict (unknown fields are
/// errors); `List` items one by one. (ok, report).
fn k8s_validate(files: &[PathBuf]) -> (bool, String) {
    let script = r#"
import sys, yaml, kubernetes_validate
ok = True
for path in sys.argv[1:]:
    for doc in yaml.safe_load_all(open(path)):
        if not doc:
            continue
        objs = doc["items"] if doc.get("kind", "").endswith("List") and "items" in doc else [doc]
        for obj in objs:
            try:
                kubernetes_validate.validate(obj, "1.33.0", strict=True)
                print("valid", path, obj["kind"], obj["metadata"].get("name"))
            except Exception as e:
                ok = False
                print("INVALID", path, obj.get("kind"), obj.get("metadata", {}).get("name"), str(e)[:600])
sys.exit(0 if ok else 1)
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(files)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!("{}{}", stdout(&out), stderr(&out)),
    )
}

const GOLDEN_ARGS: &[&str] = &["--image", "svidcar:test"];

/// Every sample matches its golden file; injecting the output again gives the same bytes;
/// skipped objects are reported on stderr. `UPDATE_GOLDEN=1` rewrites the golden files.
#[test]
fn golden_files_and_idempotence() {
    let samples = [
        ("deployment", vec![]),
        ("job", vec![]),
        ("cronjob", vec![]),
        ("multi", vec![]),
        (
            "list",
            vec!["skipped DaemonSet/agent: annotated svidcar.io/inject: \"false\""],
        ),
        (
            "hostnetwork",
            vec!["skipped Pod/node-exporter: hostNetwork pod"],
        ),
        (
            "already-injected",
            vec!["Pod/shop/reporter already injected"],
        ),
    ];
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    for (name, reports) in samples {
        let input = Path::new(SAMPLES).join("in").join(format!("{name}.yaml"));
        let golden = Path::new(SAMPLES)
            .join("golden")
            .join(format!("{name}.yaml"));
        let out = inject(GOLDEN_ARGS, &input);
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        for r in reports {
            assert!(
                stderr(&out).contains(r),
                "{name}: no report {r:?} in {}",
                stderr(&out)
            );
        }
        if update {
            std::fs::write(&golden, &out.stdout).unwrap();
        }
        let want = std::fs::read_to_string(&golden).unwrap();
        assert_eq!(
            stdout(&out),
            want,
            "{name}: output differs from {}",
            golden.display()
        );
        let again = inject_text(GOLDEN_ARGS, &want);
        assert!(again.status.success(), "{name} again: {}", stderr(&again));
        assert_eq!(stdout(&again), want, "{name}: injecting twice changed it");
    }
    // An already injected pod comes out byte for byte as it went in.
    let already = Path::new(SAMPLES).join("in/already-injected.yaml");
    assert_eq!(
        stdout(&inject(GOLDEN_ARGS, &already)),
        std::fs::read_to_string(&already).unwrap()
    );
}

/// The sidecar as the issue asks: a native sidecar after the redirect init container,
/// uid 1337, read-only root, no capabilities; the init container root with NET_ADMIN and
/// NET_RAW only; probes rewritten with the originals kept.
#[test]
fn injected_pod_has_the_promised_shape() {
    let out = inject(GOLDEN_ARGS, &Path::new(SAMPLES).join("in/deployment.yaml"));
    let doc: Value = serde_norway::from_slice(&out.stdout).unwrap();
    let tpl = &doc["spec"]["template"];
    let inits = tpl["spec"]["initContainers"].as_sequence().unwrap();
    assert_eq!(inits[0]["name"], "svidcar-redirect");
    assert_eq!(inits[1]["name"], "svidcar");
    let redirect = &inits[0]["securityContext"];
    assert_eq!(redirect["runAsUser"], 0);
    let caps: Vec<&str> = redirect["capabilities"]["add"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(caps, ["NET_ADMIN", "NET_RAW"]);
    assert_eq!(redirect["capabilities"]["drop"][0], "ALL");
    let sidecar = &inits[1];
    assert_eq!(sidecar["restartPolicy"], "Always");
    assert_eq!(sidecar["startupProbe"]["httpGet"]["path"], "/ready");
    let sc = &sidecar["securityContext"];
    assert_eq!(sc["runAsUser"], 1337);
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["capabilities"]["drop"][0], "ALL");
    assert!(sc["capabilities"].get("add").is_none());
    assert_eq!(sidecar["lifecycle"]["preStop"]["httpGet"]["path"], "/drain");
    // Probes: httpGet rewritten (named port resolved in the original), tcpSocket and
    // exec untouched.
    let app = &tpl["spec"]["containers"][0];
    assert_eq!(
        app["livenessProbe"]["httpGet"]["path"],
        "/app-health/app/liveness"
    );
    assert_eq!(app["livenessProbe"]["httpGet"]["port"], 15020);
    assert_eq!(app["livenessProbe"]["periodSeconds"], 10);
    let cache = &tpl["spec"]["containers"][1];
    assert_eq!(cache["livenessProbe"]["tcpSocket"]["port"], 6379);
    assert!(cache["startupProbe"].get("exec").is_some());
    let originals: serde_json::Value = serde_json::from_str(
        tpl["metadata"]["annotations"]["svidcar.io/original-probes"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        originals["app/liveness"],
        serde_json::json!({"port": 8080, "path": "/healthz", "scheme": "HTTP"})
    );
    assert_eq!(originals["app/readiness"]["headers"][0]["name"], "X-Probe");
    // The generated config redirects the containers' ports and allows what the
    // annotation says.
    let config: Value = serde_norway::from_str(
        tpl["metadata"]["annotations"]["svidcar.io/sidecar-config"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    let inbound = &config["transparent"]["inbound"];
    assert_eq!(
        serde_norway::to_string(&inbound["include_ports"]).unwrap(),
        "- 8080\n- 9090\n- 6379\n"
    );
    assert_eq!(
        inbound["allow"][0]["exact"],
        "spiffe://example.org/ns/shop/sa/payment"
    );
    assert_eq!(inbound["allow"][1]["trust_domain"], "example.org");
}

/// The ConfigMap and image annotations, and the hostPath socket option.
#[test]
fn config_map_image_and_host_path_options() {
    let out = inject(GOLDEN_ARGS, &Path::new(SAMPLES).join("in/multi.yaml"));
    let docs: Vec<Value> = serde_norway::Deserializer::from_slice(&out.stdout)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    let custom = &docs[3];
    assert_eq!(custom["metadata"]["name"], "custom");
    let sidecar = &custom["spec"]["initContainers"][1];
    assert_eq!(sidecar["image"], "registry.example/svidcar:dev");
    assert_eq!(sidecar["args"][2], "/etc/svidcar/config/config.yaml");
    let volumes = custom["spec"]["volumes"].as_sequence().unwrap();
    assert!(volumes
        .iter()
        .any(|v| v["configMap"]["name"] == "custom-svidcar"));
    // No generated config: the ConfigMap's is used.
    assert!(custom["metadata"]["annotations"]
        .get("svidcar.io/sidecar-config")
        .is_none());

    let out = inject(
        &[
            "--image",
            "svidcar:test",
            "--socket-host-path",
            "/run/spire/agent-sockets",
        ],
        &Path::new(SAMPLES).join("in/job.yaml"),
    );
    let doc: Value = serde_norway::from_slice(&out.stdout).unwrap();
    let volumes = doc["spec"]["template"]["spec"]["volumes"]
        .as_sequence()
        .unwrap();
    let api = volumes
        .iter()
        .find(|v| v["name"] == "svidcar-workload-api")
        .unwrap();
    assert_eq!(api["hostPath"]["path"], "/run/spire/agent-sockets");
    assert!(api.get("csi").is_none());
}

/// Every golden output (and so every generated pod) is valid against the Kubernetes 1.33
/// schemas; a broken manifest is caught (the check can fail).
#[test]
fn generated_manifests_validate_against_kubernetes_1_33() {
    let golden: Vec<PathBuf> = std::fs::read_dir(Path::new(SAMPLES).join("golden"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(golden.len() >= 7);
    let (ok, report) = k8s_validate(&golden);
    assert!(ok, "{report}");
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        read(&golden[0]).replacen("restartPolicy: Always", "restartPolicy: Sometimes", 1)
            + "---\napiVersion: v1\nkind: Pod\nmetadata: {name: x}\nspec: {containers: [{name: c, image: i, bogusField: 1}]}\n",
    )
    .unwrap();
    let (ok, report) = k8s_validate(&[bad]);
    assert!(!ok && report.contains("bogusField"), "{report}");
}

/// Bad annotations name the annotation and the problem; the object is written back
/// unchanged and the exit code says so; other objects are still injected.
#[test]
fn bad_annotations_are_named_and_the_object_left_alone() {
    let pod = |name: &str, key: &str, value: &str| {
        format!("apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  annotations: {{{key}: \"{value}\"}}\nspec:\n  containers: [{{name: app, image: app:1}}]\n")
    };
    for (key, value, problem) in [
        ("svidcar.io/mode", "lenient", "use strict or permissive"),
        (
            "svidcar.io/inbound-ports",
            "80,http",
            "\"http\" is not a port",
        ),
        (
            "svidcar.io/exclude-outbound-cidrs",
            "10.0.0.0/33",
            "not an address or CIDR",
        ),
        ("svidcar.io/allow", "spiffe://bad id", "svidcar.io/allow"),
    ] {
        let text = format!("{}---\n{}", pod("bad", key, value), pod("good", "x", "y"));
        let out = inject_text(GOLDEN_ARGS, &text);
        assert!(!out.status.success(), "{key}={value} accepted");
        let err = stderr(&out);
        assert!(
            err.contains("Pod/bad left unchanged") && err.contains(key) && err.contains(problem),
            "{key}: {err}"
        );
        let docs: Vec<Value> = serde_norway::Deserializer::from_str(&stdout(&out))
            .map(|d| serde::Deserialize::deserialize(d).unwrap())
            .collect();
        assert!(
            docs[0]["spec"].get("initContainers").is_none(),
            "bad pod changed"
        );
        assert_eq!(docs[1]["spec"]["initContainers"][1]["name"], "svidcar");
    }
    // Not YAML at all: nothing written.
    let out = inject_text(GOLDEN_ARGS, "kind: Pod\n  bad: [indent\n");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not valid YAML"), "{}", stderr(&out));
    assert!(out.stdout.is_empty());
}

// ---------------------------------------------------------------------------------------
// The injected pods, run.

/// One pod's containers as the injected spec says: (redirect args, sidecar args,
/// sidecar env, config text, probes JSON).
struct Injected {
    redirect_args: Vec<String>,
    sidecar_args: Vec<String>,
    env: Vec<(String, String)>,
    config: String,
    probes: String,
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

fn injected_pod(yaml: &str) -> Injected {
    let out = inject_text(&["--image", "svidcar:test"], yaml);
    assert!(out.status.success(), "{}", stderr(&out));
    let pod: Value = serde_norway::from_slice(&out.stdout).unwrap();
    let inits = &pod["spec"]["initContainers"];
    let notes = &pod["metadata"]["annotations"];
    Injected {
        redirect_args: strings(&inits[0]["args"]),
        sidecar_args: strings(&inits[1]["args"]),
        env: inits[1]["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["name"].as_str().unwrap().to_string(),
                    e["value"].as_str().unwrap().to_string(),
                )
            })
            .collect(),
        config: notes["svidcar.io/sidecar-config"]
            .as_str()
            .unwrap()
            .to_string(),
        probes: notes["svidcar.io/original-probes"]
            .as_str()
            .unwrap()
            .to_string(),
    }
}

/// Runs an injected pod's svidcar containers in `pod`: the downward-API volume is `dir`
/// (config.yaml and probes.json from the annotations; the mount path replaced by it),
/// the Workload API socket is `agent_socket` (the CSI volume).
fn run_injected(pod: &mut Pod, dir: &Path, inj: &Injected, agent_socket: &Path) -> PathBuf {
    let mount = dir.to_str().unwrap();
    let socket = agent_socket.to_str().unwrap();
    let swap = |s: &str| {
        s.replace("/etc/svidcar/pod", mount)
            .replace("/spiffe-workload-api/spire-agent.sock", socket)
    };
    std::fs::write(dir.join("config.yaml"), swap(&inj.config)).unwrap();
    std::fs::write(dir.join("probes.json"), &inj.probes).unwrap();
    open_up(dir);
    // The init container: root, to completion.
    let args: Vec<String> = inj.redirect_args.iter().map(|a| swap(a)).collect();
    let out = pod.ns.cmd(BIN).args(&args).output().unwrap();
    assert!(out.status.success(), "init container: {}", stderr(&out));
    // The sidecar: uid 1337, the env of its spec, the socket where the volume is.
    let log = dir.join("sidecar.log");
    let mut c = pod.ns.cmd_as(1337, BIN);
    c.args(inj.sidecar_args.iter().map(|a| swap(a)));
    for (k, v) in &inj.env {
        c.env(k, swap(v));
    }
    c.env("RUST_LOG", "svidcar=debug");
    pod.spawn(&mut c, &log);
    log
}

/// kubelet: plain HTTP from outside the pod (the bridge's namespace); the status code.
fn kubelet_get(lan: &Lan, url: &str) -> u16 {
    let out = lan
        .bridge()
        .cmd("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-m",
            "5",
            url,
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

const SERVER_POD: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: users
  namespace: shop
spec:
  containers:
  - name: app
    image: python:3
    ports: [{name: http, containerPort: 8080}]
    readinessProbe:
      httpGet: {path: /healthz, port: http}
    livenessProbe:
      tcpSocket: {port: 8080}
  - name: tls
    image: openssl
    ports: [{containerPort: 8443}]
    readinessProbe:
      httpGet: {path: /, port: 8443, scheme: HTTPS}
"#;

const CLIENT_POD: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: client
  namespace: shop
spec:
  containers:
  - name: app
    image: curlimages/curl
"#;

#[test]
fn injected_pods_talk_over_mtls_and_kubelet_probes_work() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (ca, key) = dev_ca(d, "example.org");
    // One dev agent per "node", the same CA, each giving uid 1337 its pod's identity.
    let agent = |name: &str, id: &str| {
        let ad = d.join(name);
        std::fs::create_dir(&ad).unwrap();
        let a = DevAgent::start(
            &ad,
            &format!(
                "trust_domain: example.org\nca_cert: {}\nca_key: {}\nentries:\n  - spiffe_id: {id}\n    selectors: [\"unix:uid:1337\"]\n",
                ca.display(),
                key.display()
            ),
        );
        open_up(&ad);
        a
    };
    let server_agent = agent("node-a", "spiffe://example.org/ns/shop/sa/users");
    let client_agent = agent("node-b", "spiffe://example.org/ns/shop/sa/client");

    let mut lan = Lan::new();
    // The node (kubelet) sits on the bridge with an address of the pods' network.
    lan.bridge()
        .ip(&["addr", "add", "10.210.0.254/24", "dev", "br0"]);
    let mut server = lan.pod("inj-srv");
    let mut client = lan.pod("inj-cli");

    // The server's app: /healthz exists while healthy.
    let www = d.join("www");
    std::fs::create_dir(&www).unwrap();
    std::fs::write(www.join("healthz"), "ok\n").unwrap();
    std::fs::write(www.join("index.html"), "hello from users\n").unwrap();
    open_up(&www);
    server.http_app(8080, &www, &d.join("app.log"));
    // The second container: an HTTPS server with a self-signed certificate, as apps
    // that serve TLS themselves have (kubelet does not verify it, nor does svidcar).
    let tls_key = d.join("app-tls.key");
    let tls_cert = d.join("app-tls.pem");
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=app"])
        .arg("-keyout")
        .arg(&tls_key)
        .arg("-out")
        .arg(&tls_cert)
        .output()
        .unwrap();
    assert!(out.status.success());
    open_up(d);
    let mut tls_app = server.ns.cmd_as(1000, "openssl");
    tls_app
        .args(["s_server", "-quiet", "-www", "-accept", "8443", "-cert"])
        .arg(&tls_cert)
        .arg("-key")
        .arg(&tls_key)
        .stdin(std::process::Stdio::null());
    server.spawn(&mut tls_app, &d.join("tls-app.log"));
    server.wait_port(8443);

    let server_dir = d.join("server-pod");
    let client_dir = d.join("client-pod");
    std::fs::create_dir(&server_dir).unwrap();
    std::fs::create_dir(&client_dir).unwrap();
    let server_log = run_injected(
        &mut server,
        &server_dir,
        &injected_pod(SERVER_POD),
        &server_agent.socket,
    );
    let client_log = run_injected(
        &mut client,
        &client_dir,
        &injected_pod(CLIENT_POD),
        &client_agent.socket,
    );

    // The sidecars' startup probe: /ready on the admin port, as kubelet calls it.
    let srv = server.ip4;
    let cli = client.ip4;
    for (ip, log) in [(srv, &server_log), (cli, &client_log)] {
        let url = format!("http://{ip}:15020/ready");
        for i in 0.. {
            if kubelet_get(&lan, &url) == 200 {
                break;
            }
            assert!(i < 200, "{url} never 200; sidecar log:\n{}", read(log));
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    // The client app (uid 1000, knows nothing of svidcar) calls the server's address.
    let (code, body) = client.curl(1000, &format!("http://{srv}:8080/"));
    assert_eq!(
        (code, body.as_str()),
        (0, "hello from users\n"),
        "client log: {}\nserver log: {}",
        read(&client_log),
        read(&server_log)
    );
    // It went over mTLS between the sidecars, and the server saw the client's SPIFFE ID.
    let metrics = |pod: &Pod| {
        let out = pod
            .ns
            .cmd("curl")
            .args(["-s", "-m", "5", "http://127.0.0.1:15020/metrics"])
            .output()
            .unwrap();
        stdout(&out)
    };
    assert!(
        metrics(&client).contains(
            "svidcar_transparent_connections_total{listener=\"transparent-outbound\",outcome=\"mtls\"} 1"
        ),
        "{}",
        metrics(&client)
    );
    assert!(
        metrics(&server).contains(
            "svidcar_transparent_connections_total{listener=\"transparent-inbound\",outcome=\"mtls\"} 1"
        ),
        "{}",
        metrics(&server)
    );
    assert!(
        read(&server_log).contains("spiffe://example.org/ns/shop/sa/client"),
        "{}",
        read(&server_log)
    );

    // kubelet cannot reach the app's port itself (strict mTLS): that is why probes are
    // rewritten. The rewritten readiness probe succeeds while the app is healthy...
    assert_ne!(
        kubelet_get(&lan, &format!("http://{srv}:8080/healthz")),
        200
    );
    let probe = format!("http://{srv}:15020/app-health/app/readiness");
    assert_eq!(kubelet_get(&lan, &probe), 200);
    // ... and fails when it is not.
    std::fs::remove_file(www.join("healthz")).unwrap();
    assert_eq!(kubelet_get(&lan, &probe), 404);
    std::fs::write(www.join("healthz"), "ok\n").unwrap();
    assert_eq!(kubelet_get(&lan, &probe), 200);
    // The HTTPS app's probe, over TLS to localhost without verification, as kubelet.
    assert_eq!(
        kubelet_get(
            &lan,
            &format!("http://{srv}:15020/app-health/tls/readiness")
        ),
        200
    );
    // A probe the pod does not have.
    assert_eq!(
        kubelet_get(&lan, &format!("http://{srv}:15020/app-health/app/liveness")),
        404
    );
    // preStop: /drain makes the sidecar unready.
    assert_eq!(kubelet_get(&lan, &format!("http://{srv}:15020/drain")), 200);
    assert_eq!(kubelet_get(&lan, &format!("http://{srv}:15020/ready")), 503);
    drop(server_agent);
    drop(client_agent);
}
