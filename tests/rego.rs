//! Rego policies in-process (`svidcar::authz::rego`): a seed-style policy (Rego v0,
//! `input.client_spiffe_id`, `input.method`, `input.path`) and an OPA-Envoy-style policy
//! (Rego v1, `input.attributes...`, `parsed_path`, `parsed_query`, an object decision)
//! decide as written, and give the same results as a reference Rego engine for the same
//! policies and inputs.
//!
//! The reference is rego-cpp through PyPI `regopy` (scripts/test installs it). The
//! issue names OPA itself through PyPI `opa-golib-python-bindings`, but every release of
//! that package requires Python 3.14 or newer and this machine's Python is 3.11, so
//! rego-cpp, an independent implementation checked against OPA's conformance suite,
//! stands in.
//!
//! There is no HTTP listener using the module yet, so the test calls the library: the
//! same input document goes to both engines.

mod common;

use std::path::{Path, PathBuf};

use http::{HeaderMap, HeaderValue, StatusCode};
use serde_json::{json, Value};
use svidcar::authz::rego::{
    Backend, Decision, DenyReason, Input, NotCompiled, RegoAuthorizer, RequestView,
};

const PAYMENT: &str = "spiffe://example.org/ns/default/sa/payment";
const WEB: &str = "spiffe://example.org/ns/default/sa/web";
const ADMIN: &str = "spiffe://example.org/ns/ops/sa/admin";

/// One request, and what each policy must decide for it.
struct Case {
    what: &'static str,
    caller: Option<&'static str>,
    method: &'static str,
    path: &'static str,
    query: Option<&'static str>,
    /// The caller's ID in the identity header, as the app will receive it.
    identity_header: bool,
    jwt_aud: Option<&'static str>,
    /// Expected: seed policy (`data.authz.allow`) allows.
    seed: bool,
    /// Expected: OPA-Envoy policy's `data.envoy.authz.response`.
    envoy: Expect,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    Allow,
    /// The object denial: 404 with a body.
    NotFound,
    /// No rule matched: undefined, denied.
    Undefined,
}

fn cases() -> Vec<Case> {
    let c = |what, caller, method, path, query, seed, envoy| Case {
        what,
        caller,
        method,
        path,
        query,
        identity_header: true,
        jwt_aud: None,
        seed,
        envoy,
    };
    vec![
        c(
            "payment reads a user",
            Some(PAYMENT),
            "GET",
            "/v1/users/42",
            None,
            true,
            Expect::Allow,
        ),
        c(
            "payment deletes a user",
            Some(PAYMENT),
            "DELETE",
            "/v1/users/42",
            None,
            false,
            Expect::Undefined,
        ),
        c(
            "payment reads orders",
            Some(PAYMENT),
            "GET",
            "/v1/orders/1",
            None,
            false,
            Expect::Undefined,
        ),
        c(
            "web reads a user",
            Some(WEB),
            "GET",
            "/v1/users/42",
            None,
            false,
            Expect::Undefined,
        ),
        c(
            "no caller reads a user",
            None,
            "GET",
            "/v1/users/42",
            None,
            false,
            Expect::Undefined,
        ),
        c(
            "payment reads below a user (prefix vs exact segments)",
            Some(PAYMENT),
            "GET",
            "/v1/users/42/keys",
            None,
            true,
            Expect::Undefined,
        ),
        c(
            "payment reads a percent-encoded user",
            Some(PAYMENT),
            "GET",
            "/v1/users/%34%32",
            None,
            true,
            Expect::Allow,
        ),
        c(
            "admin with debug=1",
            Some(ADMIN),
            "GET",
            "/admin/stats",
            Some("debug=1"),
            true,
            Expect::Allow,
        ),
        c(
            "admin deletes",
            Some(ADMIN),
            "DELETE",
            "/admin/stats",
            None,
            false,
            Expect::NotFound,
        ),
        c(
            "admin with two debug values",
            Some(ADMIN),
            "POST",
            "/admin/stats",
            Some("debug=1&debug=2"),
            true,
            Expect::NotFound,
        ),
        Case {
            identity_header: false,
            ..c(
                "admin with debug=1 but no identity header",
                Some(ADMIN),
                "GET",
                "/admin/stats",
                Some("debug=1"),
                true,
                Expect::NotFound,
            )
        },
        c(
            "web lists 5 users",
            Some(WEB),
            "GET",
            "/v1/users",
            Some("limit=5"),
            false,
            Expect::Allow,
        ),
        c(
            "web lists 50 users",
            Some(WEB),
            "GET",
            "/v1/users",
            Some("limit=50"),
            false,
            Expect::Undefined,
        ),
        c(
            "web lists with a limit that is not a number",
            Some(WEB),
            "GET",
            "/v1/users",
            Some("limit=ten"),
            false,
            Expect::Undefined,
        ),
        Case {
            jwt_aud: Some("users"),
            ..c(
                "web with a JWT-SVID for users",
                Some(WEB),
                "GET",
                "/v1/health",
                None,
                false,
                Expect::Allow,
            )
        },
        Case {
            jwt_aud: Some("orders"),
            ..c(
                "web with a JWT-SVID for orders",
                Some(WEB),
                "GET",
                "/v1/health",
                None,
                false,
                Expect::Undefined,
            )
        },
    ]
}

fn input(case: &Case) -> Input {
    let mut headers = HeaderMap::new();
    headers.insert("user-agent", HeaderValue::from_static("curl/8.14.1"));
    headers.insert(
        "x-forwarded-client-cert",
        HeaderValue::from_static("By=spiffe://example.org/ns/default/sa/users;URI=spiffe://x"),
    );
    if let (true, Some(caller)) = (case.identity_header, case.caller) {
        headers.insert("x-workload-id", HeaderValue::from_str(caller).unwrap());
    }
    let claims = case
        .jwt_aud
        .map(|aud| json!({"sub": case.caller, "aud": [aud], "exp": 4102444800u64}));
    Input::build(&RequestView {
        caller: case.caller,
        method: case.method,
        path: case.path,
        query: case.query,
        host: "users.default.svc",
        headers: &headers,
        jwt_claims: claims.as_ref().and_then(Value::as_object),
    })
    .unwrap()
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/rego")
        .join(name)
}

/// What the reference engine returns for `query` on each input: the value as JSON, or
/// null for undefined (marked separately so a policy returning null would show).
fn reference(
    dir: &Path,
    policies: &[PathBuf],
    query: &str,
    inputs: &[Input],
) -> Vec<Option<Value>> {
    let docs: Vec<Value> = inputs.iter().map(Input::to_json).collect();
    std::fs::write(dir.join("inputs.json"), serde_json::to_vec(&docs).unwrap()).unwrap();
    let files: Vec<String> = policies.iter().map(|p| p.display().to_string()).collect();
    let script = format!(
        r#"
import json, regopy
r = regopy.Interpreter()
for f in {files}:
    r.add_module(f, open(f).read())
results = []
for doc in json.load(open("inputs.json")):
    r.set_input_term(json.dumps(doc))
    out = r.query("x = " + {query:?})
    if not out.ok():
        raise SystemExit("regopy error: " + str(out))
    if str(out) == "undefined":
        results.append({{"undefined": True}})
    else:
        results.append({{"value": json.loads(out.binding("x").json())}})
json.dump(results, open("results.json", "w"))
"#,
        files = serde_json::to_string(&files).unwrap(),
    );
    let (ok, text) = common::python(dir, &script);
    assert!(
        ok && dir.join("results.json").exists(),
        "the reference engine (PyPI regopy) did not run: {text}"
    );
    let results: Vec<Value> =
        serde_json::from_slice(&std::fs::read(dir.join("results.json")).unwrap()).unwrap();
    std::fs::remove_file(dir.join("results.json")).unwrap();
    results
        .into_iter()
        .map(|r| {
            if r.get("undefined").is_some() {
                None
            } else {
                Some(r["value"].clone())
            }
        })
        .collect()
}

/// Numbers compared by value (one engine may write 404, the other 404.0).
fn same_value(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same_value(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_value(v, w)))
        }
        _ => a == b,
    }
}

/// Which engine must evaluate a policy.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Engine {
    Vm,
    /// The interpreter, because the policy could conflict.
    InterpreterMayConflict,
    /// The interpreter, because the policy uses a construct the VM evaluates otherwise.
    InterpreterConstruct,
}

/// Decides every case with our module and with the reference; both must agree on the
/// raw value and on the decision, and the decision must be the expected one.
fn compare(policy: &str, query: &str, engine: Engine, expect: impl Fn(&Case, &Decision)) {
    let dir = tempfile::tempdir().unwrap();
    let files = vec![fixture(policy)];
    let authz = RegoAuthorizer::load(files.clone(), query).unwrap();
    let backend = authz.policy().backend();
    let got = match &backend {
        Backend::Vm => Engine::Vm,
        Backend::Interpreter(NotCompiled::MayConflict { .. }) => Engine::InterpreterMayConflict,
        Backend::Interpreter(NotCompiled::Construct { .. }) => Engine::InterpreterConstruct,
        Backend::Interpreter(why @ NotCompiled::Unsupported(_)) => panic!("{policy}: {why}"),
    };
    assert_eq!(got, engine, "{policy}: {backend}");
    let cases = cases();
    let inputs: Vec<Input> = cases.iter().map(input).collect();
    let theirs = reference(dir.path(), &files, query, &inputs);
    assert_eq!(theirs.len(), cases.len());
    for ((case, input), theirs) in cases.iter().zip(&inputs).zip(&theirs) {
        let ours = authz
            .policy()
            .evaluate(input)
            .unwrap_or_else(|e| panic!("{}: {e}", case.what));
        let same = match (&ours, theirs) {
            (Some(a), Some(b)) => same_value(a, b),
            (None, None) => true,
            _ => false,
        };
        assert!(
            same,
            "{policy} {query}, {}: regorus gave {ours:?}, the reference {theirs:?}",
            case.what
        );
        let decision = authz.decide(input);
        assert_eq!(
            decision,
            Decision::from_result(theirs.as_ref()),
            "{policy}, {}",
            case.what
        );
        expect(case, &decision);
    }
}

#[test]
fn seed_style_v0_policy_decides_as_the_reference() {
    compare(
        "seed.rego",
        "data.authz.allow",
        Engine::Vm,
        |case, d| match d {
            Decision::Allow { headers } => {
                assert!(case.seed, "{}: allowed", case.what);
                assert!(headers.is_empty());
            }
            Decision::Deny { status, reason, .. } => {
                assert!(!case.seed, "{}: denied", case.what);
                assert_eq!(*status, StatusCode::FORBIDDEN);
                assert_eq!(
                    *reason,
                    DenyReason::Policy,
                    "{}: default allow = false",
                    case.what
                );
            }
        },
    );
}

#[test]
fn opa_envoy_style_v1_policy_decides_as_the_reference() {
    // The boolean rule.
    // `response` has two definitions with different values: the interpreter, which
    // reports a conflict as OPA does.
    let engine = Engine::InterpreterMayConflict;
    compare("envoy.rego", "data.envoy.authz.allow", engine, |case, d| {
        assert_eq!(d.is_allowed(), case.envoy == Expect::Allow, "{}", case.what);
    });
    // The object decision built on it.
    compare(
        "envoy.rego",
        "data.envoy.authz.response",
        engine,
        |case, d| {
            let rego = |h: &[(http::HeaderName, HeaderValue)]| {
                h.iter().any(|(n, v)| n == "x-authz" && v == "rego")
            };
            match (case.envoy, d) {
                (Expect::Allow, Decision::Allow { headers }) => {
                    assert!(rego(headers), "{}: {headers:?}", case.what)
                }
                (
                    Expect::NotFound,
                    Decision::Deny {
                        status,
                        headers,
                        body,
                        reason: DenyReason::Policy,
                    },
                ) => {
                    assert_eq!(*status, StatusCode::NOT_FOUND, "{}", case.what);
                    assert_eq!(body.as_deref(), Some("no such route"), "{}", case.what);
                    assert!(rego(headers), "{}: {headers:?}", case.what);
                }
                (Expect::Undefined, d) => {
                    assert_eq!(*d, Decision::deny(DenyReason::Undefined), "{}", case.what)
                }
                (want, got) => panic!("{}: wanted {want:?}, got {got:?}", case.what),
            }
        },
    );
}

/// A policy using `with` (a rule asked again with part of the input replaced).
#[test]
fn with_modifier_policy_decides_as_the_reference() {
    let engine = Engine::InterpreterConstruct;
    compare("with.rego", "data.authz.allow", engine, |case, d| {
        let want = case.caller == Some(PAYMENT)
            && case.path.starts_with("/v1/users/")
            && case.method != "DELETE";
        assert_eq!(d.is_allowed(), want, "{}", case.what);
    });
}

/// The same decisions as envoy.rego's allow rule from a policy the VM evaluates (a set, a
/// function, `some`, `every`, a comprehension, a failing builtin, `regex.match`).
#[test]
fn compiled_policy_decides_as_the_reference() {
    let query = "data.envoy.compiled.allow";
    compare("envoy_compiled.rego", query, Engine::Vm, |case, d| {
        assert_eq!(d.is_allowed(), case.envoy == Expect::Allow, "{}", case.what);
    });
}

/// Where the VM and the interpreter differ and the policy still runs in the VM, the VM
/// decides as the reference engine does.
#[test]
fn vm_differences_from_the_interpreter_side_with_the_reference() {
    compare(
        "vm_differences.rego",
        "data.vmdiff.allow",
        Engine::Vm,
        |case, d| {
            assert!(d.is_allowed(), "{}: {d:?}", case.what);
        },
    );
}
