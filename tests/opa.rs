//! An external OPA decides each request (`opa: {url, timeout, on_error}`, issue 12 point
//! 4): an HTTP outbound → inbound pair in front of an app that echoes what it received,
//! with the inbound asking an OPA-REST-compatible server. There is no OPA binary on this
//! machine, so tests/opa/opa_server.py implements OPA's Data API (POST
//! /v1/data/<rule> with {"input": ...}) over rego-cpp (PyPI `regopy`), an independent
//! Rego engine; it logs each input it was sent, so the test sees what OPA would see.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::*;
use serde_json::Value;

const PAYMENT: &str = "spiffe://example.org/ns/default/sa/payment";
const USERS: &str = "spiffe://example.org/ns/default/sa/users";

/// A child process that printed "ready"; killed on drop.
struct Server {
    child: Child,
    port: u16,
}

impl Server {
    fn start(program: &str, args: &[String]) -> Self {
        let port = free_port();
        let mut child = Command::new(program)
            .arg(&args[0])
            .arg(port.to_string())
            .args(&args[1..])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line.trim(), "ready", "{program} {args:?} did not start");
        Self { child, port }
    }

    fn app(dir: &Path) -> Self {
        let script = dir.join("echo_app.py");
        std::fs::write(&script, ECHO_APP).unwrap();
        Self::start("python3", &[script.display().to_string()])
    }

    /// The OPA stand-in over `policies` (tests/rego and tests/opa fixtures), logging
    /// inputs to `log`; `extra` options such as `--delay`.
    fn opa(log: &Path, extra: &[&str], policies: &[&str]) -> Self {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
        let mut args = vec![root.join("opa/opa_server.py").display().to_string()];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend(["--log".to_string(), log.display().to_string()]);
        args.extend(policies.iter().map(|p| root.join(p).display().to_string()));
        Self::start("python3", &args)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One inbound per `(name, extra keys)` in front of the app, and an outbound for the
/// caller PAYMENT to each; returns both sidecars and the outbound port of each name.
fn sidecars(
    dir: &Path,
    app: u16,
    listeners: &[(&str, String)],
) -> (Svidcar, Svidcar, Vec<(String, u16)>) {
    let (ca, key) = dev_ca(dir, "example.org");
    let identity = |id: &str| {
        format!(
            "identity:\n  dev: {{spiffe_id: \"{id}\", ca_cert: {}, ca_key: {}}}\n",
            ca.display(),
            key.display()
        )
    };
    let (mut inbound, mut outbound) = (
        identity(USERS) + "inbound:\n",
        identity(PAYMENT) + "outbound:\n",
    );
    let mut ports = Vec::new();
    for (name, extra) in listeners {
        let (i, o) = (free_port(), free_port());
        inbound += &format!(
            "  - name: {name}\n    listen: 127.0.0.1:{i}\n    forward: 127.0.0.1:{app}\n    protocol: http\n    allow: [{{trust_domain: example.org}}]\n    identity_header: X-Workload-ID\n{extra}"
        );
        outbound += &format!(
            "  - name: {name}\n    listen: 127.0.0.1:{o}\n    connect: 127.0.0.1:{i}\n    protocol: http\n    expect: [{{exact: \"{USERS}\"}}]\n"
        );
        ports.push((name.to_string(), o));
    }
    let inbound = Svidcar::start(dir, "users", &inbound);
    let outbound = Svidcar::start(dir, "payment", &outbound);
    (inbound, outbound, ports)
}

/// A request through the outbound named `name`: (status, response headers, body).
fn call(ports: &[(String, u16)], name: &str, method: &str, path: &str) -> (u16, String, String) {
    let port = ports.iter().find(|(n, _)| n == name).unwrap().1;
    let out = Command::new("curl")
        .args(["-s", "-m", "15", "-D", "-", "-X", method])
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_ascii_lowercase(), body.to_string())
}

/// The values of header `name` the app saw, from its echo.
fn app_saw(body: &str, name: &str) -> Vec<String> {
    let seen: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    seen["headers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h[0] == name)
        .map(|h| h[1].as_str().unwrap().to_string())
        .collect()
}

/// Every `(path, input)` the OPA stand-in was sent.
fn opa_inputs(log: &Path) -> Vec<(String, Value)> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["path"].as_str().unwrap().to_string(), v["input"].clone())
        })
        .collect()
}

fn opa(url: String, more: &str) -> String {
    format!("    opa: {{url: \"{url}\"{more}}}\n")
}

/// Boolean and object decisions from OPA, undefined results, and `rego:` with `opa:`
/// together (both must allow); OPA gets the input the in-process engine gets.
#[test]
fn opa_decides_each_request() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let log: PathBuf = d.join("opa-inputs.jsonl");
    let app = Server::app(d);
    let server = Server::opa(&log, &[], &["rego/seed.rego", "rego/envoy.rego"]);
    let base = format!("http://127.0.0.1:{}/v1/data", server.port);
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/rego/seed.rego"),
        d.join("seed.rego"),
    )
    .unwrap();
    let (inbound, _outbound, ports) = sidecars(
        d,
        app.port,
        &[
            ("seed", opa(format!("{base}/authz/allow"), "")),
            ("envoy", opa(format!("{base}/envoy/authz/response"), "")),
            (
                "both",
                "    rego: {policy: [seed.rego], query: data.authz.allow}\n".to_string()
                    + &opa(format!("{base}/envoy/authz/allow"), ""),
            ),
        ],
    );

    // A boolean decision: allowed, then denied for the stated reason.
    let (code, _, body) = call(&ports, "seed", "GET", "/v1/users/42");
    assert_eq!(code, 200, "{body} {}", inbound.logs());
    assert_eq!(app_saw(&body, "x-workload-id"), [PAYMENT]);
    let (code, _, body) = call(&ports, "seed", "DELETE", "/v1/users/42");
    assert_eq!((code, body.as_str()), (403, "forbidden\n"));
    inbound.wait_log(&[
        "request refused by the OPA policy",
        "listener=seed",
        "method=\"DELETE\"",
        "reason=\"policy\"",
    ]);
    // OPA saw the same input the in-process engine gets: both shapes, and the headers
    // as the app receives them (identity header and XFCC set by svidcar).
    let inputs = opa_inputs(&log);
    let (path, input) = inputs
        .iter()
        .find(|(p, i)| p == "/v1/data/authz/allow" && i["method"] == "GET")
        .unwrap_or_else(|| panic!("{inputs:?}"));
    assert_eq!(path, "/v1/data/authz/allow");
    assert_eq!(input["client_spiffe_id"], PAYMENT);
    assert_eq!(input["path"], "/v1/users/42");
    assert_eq!(input["attributes"]["source"]["principal"], PAYMENT);
    assert_eq!(
        input["parsed_path"],
        serde_json::json!(["v1", "users", "42"])
    );
    let headers = &input["attributes"]["request"]["http"]["headers"];
    assert_eq!(headers["x-workload-id"], PAYMENT);
    assert!(
        headers["x-forwarded-client-cert"]
            .as_str()
            .is_some_and(|x| x.contains(&format!("URI={PAYMENT}"))),
        "{headers}"
    );

    // OPA-Envoy's object: headers added to an allowed request; a denial with its own
    // status, headers and body; an undefined result denies.
    let (code, _, body) = call(&ports, "envoy", "GET", "/v1/users/42");
    assert_eq!(code, 200, "{body}");
    assert_eq!(app_saw(&body, "x-authz"), ["rego"]);
    let (code, head, body) = call(&ports, "envoy", "GET", "/admin/stats");
    assert_eq!((code, body.as_str()), (404, "no such route"));
    assert!(head.contains("x-authz: rego"), "{head}");
    let (code, _, body) = call(&ports, "envoy", "GET", "/v1/orders/1");
    assert_eq!((code, body.as_str()), (403, "forbidden\n"));
    inbound.wait_log(&[
        "request refused by the OPA policy",
        "listener=envoy",
        "reason=\"undefined\"",
    ]);

    // rego and opa: both must allow. The seed policy allows everything under
    // /v1/users/ for payment; OPA's policy only /v1/users/<id>.
    let (code, _, body) = call(&ports, "both", "GET", "/v1/users/42");
    assert_eq!(code, 200, "{body}");
    let (code, _, _) = call(&ports, "both", "GET", "/v1/users/42/keys");
    assert_eq!(code, 403);
    inbound.wait_log(&["request refused by the OPA policy", "listener=both"]);
    let (code, _, _) = call(&ports, "both", "DELETE", "/v1/users/42");
    assert_eq!(code, 403);
    inbound.wait_log(&[
        "request refused by the Rego policy",
        "listener=both",
        "method=\"DELETE\"",
    ]);
    // Refused in-process: OPA was not asked.
    assert!(
        !opa_inputs(&log)
            .iter()
            .any(|(p, i)| p == "/v1/data/envoy/authz/allow" && i["method"] == "DELETE"),
        "OPA was asked about a request the Rego policy had refused"
    );
    assert_eq!(
        inbound.metric("svidcar_http_requests_total{code=\"404\",listener=\"envoy\"}"),
        1.0
    );
}

/// OPA down, too slow or failing: the configured default decides (deny unless
/// `on_error: allow`), each failure logged with its reason and counted by reason.
#[test]
fn an_opa_that_cannot_answer_decides_on_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let app = Server::app(d);
    let broken = Server::opa(&d.join("broken.jsonl"), &[], &["opa/broken.rego"]);
    let slow = Server::opa(
        &d.join("slow.jsonl"),
        &["--delay", "5"],
        &["rego/seed.rego"],
    );
    let down = format!("http://127.0.0.1:{}/v1/data/authz/allow", free_port());
    let (inbound, _outbound, ports) = sidecars(
        d,
        app.port,
        &[
            ("down", opa(down.clone(), "")),
            ("down-open", opa(down, ", on_error: allow")),
            (
                "slow",
                opa(
                    format!("http://127.0.0.1:{}/v1/data/authz/allow", slow.port),
                    ", timeout: 300ms",
                ),
            ),
            (
                "broken",
                opa(
                    format!("http://127.0.0.1:{}/v1/data/broken/allow", broken.port),
                    "",
                ),
            ),
        ],
    );
    let errors = |listener: &str, reason: &str| {
        inbound.metric(&format!(
            "svidcar_opa_errors_total{{listener=\"{listener}\",reason=\"{reason}\"}}"
        ))
    };

    // Nothing listens: refused (fail closed), or let through with on_error: allow.
    let (code, _, body) = call(&ports, "down", "GET", "/v1/users/42");
    assert_eq!((code, body.as_str()), (403, "forbidden\n"));
    inbound.wait_log(&[
        "OPA gave no decision",
        "listener=down",
        "reason=\"connect\"",
    ]);
    inbound.wait_log(&[
        "request refused by the OPA policy",
        "listener=down",
        "reason=\"opa_error\"",
    ]);
    assert_eq!(errors("down", "connect"), 1.0);
    let (code, _, body) = call(&ports, "down-open", "GET", "/v1/users/42");
    assert_eq!(code, 200, "{body}");
    assert_eq!(app_saw(&body, "x-workload-id"), [PAYMENT]);
    assert_eq!(errors("down-open", "connect"), 1.0);

    // Too slow: the timeout decides, and says so.
    let (code, _, _) = call(&ports, "slow", "GET", "/v1/users/42");
    assert_eq!(code, 403);
    inbound.wait_log(&[
        "OPA gave no decision",
        "listener=slow",
        "reason=\"timeout\"",
    ]);
    assert_eq!(errors("slow", "timeout"), 1.0);

    // OPA answers 500 (its evaluation failed): denied, counted as such.
    let (code, _, _) = call(&ports, "broken", "GET", "/v1/users/42");
    assert_eq!(code, 403);
    inbound.wait_log(&["OPA gave no decision", "listener=broken", "HTTP 500"]);
    assert_eq!(errors("broken", "http_5xx"), 1.0);

    // Other requests keep flowing on the same listeners.
    let (code, _, _) = call(&ports, "down-open", "POST", "/v1/users");
    assert_eq!(code, 200);
}

/// `opa:` keys checked when the config is read: one error naming the key.
#[test]
fn bad_opa_settings_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let config = |protocol: &str, opa: &str| {
        format!(
            "identity:\n  dev: {{spiffe_id: \"{USERS}\"}}\ninbound:\n  - name: users\n    listen: 127.0.0.1:8443\n    forward: 127.0.0.1:8080\n    protocol: {protocol}\n    allow: [{{trust_domain: example.org}}]\n    opa: {opa}\n"
        )
    };
    for (name, protocol, opa, want) in [
        (
            "https",
            "http",
            "{url: \"https://opa:8181/v1/data/authz/allow\"}",
            "inbound[0].opa.url: \"https://opa:8181/v1/data/authz/allow\": must be http://",
        ),
        (
            "credentials",
            "http",
            "{url: \"http://admin:secret@127.0.0.1:8181/v1/data/a/b\"}",
            "inbound[0].opa.url: credentials in the URL are not supported",
        ),
        (
            "no-rule",
            "http",
            "{url: \"http://127.0.0.1:8181\"}",
            "inbound[0].opa.url: \"http://127.0.0.1:8181\" names no rule",
        ),
        (
            "not-a-url",
            "http",
            "{url: \"http://a b\"}",
            "inbound[0].opa.url: \"http://a b\" is not a URL",
        ),
        (
            "zero-timeout",
            "http",
            "{url: \"http://127.0.0.1:8181/v1/data/a/b\", timeout: 0s}",
            "inbound[0].opa.timeout: duration must be greater than zero",
        ),
        (
            "on-error",
            "http",
            "{url: \"http://127.0.0.1:8181/v1/data/a/b\", on_error: maybe}",
            "on_error",
        ),
        (
            "tcp",
            "tcp",
            "{url: \"http://127.0.0.1:8181/v1/data/a/b\"}",
            "inbound[0].opa: only for HTTP listeners",
        ),
    ] {
        let (ok, text) = check_config(d, name, &config(protocol, opa));
        assert!(!ok, "{name}: accepted");
        assert!(text.contains(want), "{name}: {text}");
        assert!(
            !text.contains("secret"),
            "{name}: a password in an error: {text}"
        );
    }
    let (ok, text) = check_config(
        d,
        "good",
        &config(
            "http",
            "{url: \"http://127.0.0.1:8181/v1/data/authz/allow\", timeout: 250ms, on_error: allow}",
        ),
    );
    assert!(ok, "{text}");
}
