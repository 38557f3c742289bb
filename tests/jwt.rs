//! JWT-SVIDs (issue 12, point 6) through the real binary: an outbound `jwt: {audience}`
//! fed by `svidcar dev-agent` sets the token, an inbound `jwt: {audiences, required}`
//! validates it and `source: jwt` rules admit its SPIFFE ID; attack tokens made the way
//! an attacker's tool makes them (PyJWT, or hand-built bytes where PyJWT refuses) are
//! each refused with 401 and their reason in the log and in
//! `svidcar_jwt_refused_total{reason}`; a key removed from `files.jwt_bundles` stops
//! verifying once the file is reloaded.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

const PAYMENT: &str = "spiffe://example.org/ns/default/sa/payment";
const OTHER: &str = "spiffe://example.org/ns/default/sa/other";
const USERS: &str = "spiffe://example.org/ns/default/sa/users";

/// curl; (HTTP status, body).
fn curl(url: &str, args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "-m", "10", "-w", "\n%{http_code}"])
        .args(args)
        .arg(url)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn authorization(body: &str) -> Vec<String> {
    let seen: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("{body}"));
    seen["headers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h[0] == "authorization")
        .map(|h| h[1].as_str().unwrap().to_string())
        .collect()
}

/// The claims of a token, read without verification.
fn claims(token: &str) -> serde_json::Value {
    use base64::Engine;
    let part = token.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

fn python_ok(dir: &Path, script: &str) -> String {
    let (ok, out) = python(dir, script);
    assert!(ok, "{out}");
    out
}

/// dev-agent → outbound (`jwt: {audience: users}`) → inbound (`jwt: {audiences: [users],
/// required: true}`, a `source: jwt` rule) → app. The app receives the Bearer token the
/// agent issued; the app's own Authorization header is forwarded, not overwritten, and
/// judged by the inbound; a token for another audience (fetched with py-spiffe) is 401.
#[test]
fn jwt_svids_from_the_dev_agent_cross_the_pair() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let agent = DevAgent::start(
        d,
        &format!("trust_domain: example.org\nentries:\n  - spiffe_id: {PAYMENT}\n    selectors: [\"unix:uid:0\"]\n"),
    );
    let identity = format!(
        "identity:\n  workload_api: {{socket: \"{}\"}}\n",
        agent.url()
    );
    let app = echo_app(d);
    let in_port = free_port();
    let inbound = Svidcar::start(
        d,
        "users",
        &format!(
            r#"{identity}inbound:
  - name: users
    listen: 127.0.0.1:{in_port}
    forward: 127.0.0.1:{app}
    protocol: http
    allow: [{{trust_domain: example.org}}]
    jwt: {{audiences: [users], required: true}}
    authorization:
      - action: ALLOW
        source: jwt
        principals: [{{exact: "{PAYMENT}"}}]
"#,
            app = app.port
        ),
    );
    let out_port = free_port();
    let outbound = Svidcar::start(
        d,
        "caller",
        &format!(
            r#"{identity}outbound:
  - name: users
    listen: 127.0.0.1:{out_port}
    connect: 127.0.0.1:{in_port}
    protocol: http
    expect: [{{exact: "{PAYMENT}"}}]
    jwt: {{audience: users}}
"#
        ),
    );
    // The inbound has the agent's JWT bundle (FetchJWTBundles).
    inbound.wait_log(&["JWT bundles updated", "workload_api", "example.org: 1"]);
    let url = format!("http://127.0.0.1:{out_port}/v1/users/42");

    let (code, body) = curl(&url, &[]);
    assert_eq!(code, 200, "{body}\n{}", inbound.logs());
    let auth = authorization(&body);
    assert_eq!(auth.len(), 1, "{body}");
    let token = auth[0].strip_prefix("Bearer ").expect("a Bearer token");
    let c = claims(token);
    assert_eq!(c["sub"], PAYMENT);
    assert_eq!(c["aud"], serde_json::json!(["users"]));
    assert_eq!(
        outbound.metric(r#"svidcar_jwt_outbound_total{listener="users",outcome="injected"}"#),
        1.0
    );

    // Tokens the app fetched itself (py-spiffe) go as they are: one for `users` passes,
    // one for `orders` is refused by the inbound for its audience.
    let out = python_ok(
        d,
        &r#"
from spiffe import WorkloadApiClient
c = WorkloadApiClient(socket_path='SOCKET')
for aud in ('users', 'orders'):
    print(aud, c.fetch_jwt_svid(audience={aud}).token)
"#
        .replace("SOCKET", &agent.url()),
    );
    let token_for = |aud: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{aud} ")))
            .unwrap_or_else(|| panic!("{out}"))
            .trim()
            .to_string()
    };
    let users = token_for("users");
    let (code, body) = curl(&url, &["-H", &format!("Authorization: Bearer {users}")]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(authorization(&body), [format!("Bearer {users}")]);
    let orders = token_for("orders");
    let (code, body) = curl(&url, &["-H", &format!("Authorization: Bearer {orders}")]);
    assert_eq!((code, body.as_str()), (401, "unauthorized\n"));
    assert_eq!(
        outbound
            .metric(r#"svidcar_jwt_outbound_total{listener="users",outcome="app_header_kept"}"#),
        2.0
    );
    outbound.wait_log(&["the app sent its own Authorization header"]);
    let line = inbound.wait_log(&["JWT-SVID refused", "wrong_audience"]);
    assert!(line.contains(PAYMENT), "the mTLS caller is named: {line}");
    assert_eq!(
        inbound.metric(r#"svidcar_jwt_refused_total{listener="users",reason="wrong_audience"}"#),
        1.0
    );
    assert_eq!(
        inbound.metric(r#"svidcar_http_requests_total{code="401",listener="users"}"#),
        1.0
    );
    for t in [&users, &orders, &token.to_string()] {
        let sig = t.rsplit('.').next().unwrap();
        assert!(!inbound.logs().contains(sig), "a token reached the log");
        assert!(!outbound.logs().contains(sig), "a token reached the log");
    }
}

/// Keys and attack tokens, written the way attackers' tools write them. PyJWT signs
/// where it will; `alg: none` and HS256-with-the-public-key are built by hand, since
/// PyJWT refuses to use a public key as an HMAC secret (that refusal is the defence
/// we test svidcar for).
const MAKE_TOKENS: &str = r#"
import base64, hashlib, hmac, json, time, jwt
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives import serialization
from jwt.algorithms import ECAlgorithm

def b64(b): return base64.urlsafe_b64encode(b).rstrip(b'=').decode()
keys = {n: ec.generate_private_key(ec.SECP256R1()) for n in ('a1', 'a2', 'b1', 'c1')}
def jwk(n):
    d = ECAlgorithm.to_jwk(keys[n].public_key(), as_dict=True)
    d.update(kid=n, use='jwt-svid')
    return d
json.dump({'keys': [jwk('a1'), jwk('a2')]}, open('example.org.jwks', 'w'))
json.dump({'keys': [jwk('b1')]}, open('other.org.jwks', 'w'))
json.dump({'keys': [jwk('a1')]}, open('example.org.jwks.a1only', 'w'))

now = int(time.time())
def claims(sub='PAYMENT', aud=['users'], exp=300):
    return {'sub': sub, 'aud': aud, 'iat': now, 'exp': now + exp}
def signed(c, key, kid):
    h = {'kid': kid} if kid else {}
    return jwt.encode(c, keys[key], algorithm='ES256', headers=h)
def by_hand(header, c, secret):
    si = b64(json.dumps(header).encode()) + '.' + b64(json.dumps(c).encode())
    sig = b64(hmac.new(secret, si.encode(), hashlib.sha256).digest()) if secret else ''
    return si + '.' + sig
pem = keys['a1'].public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
tokens = {
    'good_a1': signed(claims(), 'a1', 'a1'),
    'good_a2': signed(claims(), 'a2', 'a2'),
    'other_sub': signed(claims(sub='OTHER'), 'a1', 'a1'),
    'within_leeway': signed(claims(exp=-10), 'a1', 'a1'),
    'none': jwt.encode(claims(), None, algorithm='none', headers={'kid': 'a1'}),
    'hs256_pem': by_hand({'alg': 'HS256', 'typ': 'JWT', 'kid': 'a1'}, claims(), pem),
    'hs256_jwk': by_hand({'alg': 'HS256', 'typ': 'JWT', 'kid': 'a1'}, claims(), json.dumps(jwk('a1')).encode()),
    'no_kid': signed(claims(), 'a1', None),
    'wrong_aud': signed(claims(aud=['orders']), 'a1', 'a1'),
    'expired': signed(claims(exp=-120), 'a1', 'a1'),
    'foreign': signed(claims(), 'b1', 'b1'),
    'unknown': signed(claims(), 'c1', 'c1'),
    'forged_kid': signed(claims(), 'c1', 'a1'),
}
json.dump(tokens, open('tokens.json', 'w'))
print('ok')
"#;

/// An inbound with `files` identity and `jwt_bundles` for two trust domains; a client
/// with an mTLS certificate of `PAYMENT` (curl) sends each token directly.
#[test]
fn attack_tokens_are_refused_for_their_reason() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    python_ok(
        d,
        &MAKE_TOKENS
            .replace("'PAYMENT'", &format!("'{PAYMENT}'"))
            .replace("'OTHER'", &format!("'{OTHER}'")),
    );
    let tokens: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("tokens.json")).unwrap()).unwrap();
    let token = |n: &str| tokens[n].as_str().unwrap().to_string();
    let ca = TestCa::new("example.org");
    let (ca_pem, _) = ca.write(d, "ca");
    let (cert, key) = ca.valid_leaf(d, "users", USERS);
    let (client_cert, client_key) = ca.valid_leaf(d, "client", PAYMENT);
    let app = echo_app(d);
    let port = free_port();
    let sc = Svidcar::start(
        d,
        "users",
        &format!(
            r#"identity:
  files:
    cert: {cert}
    key: {key}
    bundle: {ca}
    jwt_bundles:
      example.org: {d}/example.org.jwks
      other.org: {d}/other.org.jwks
inbound:
  - name: users
    listen: 127.0.0.1:{port}
    forward: 127.0.0.1:{app}
    protocol: http
    allow: [{{trust_domain: example.org}}]
    jwt: {{audiences: [users], required: true}}
    authorization:
      - action: ALLOW
        source: jwt
        principals: [{{exact: "{PAYMENT}"}}]
"#,
            cert = cert.display(),
            key = key.display(),
            ca = ca_pem.display(),
            d = d.display(),
            app = app.port,
        ),
    );
    let url = format!("https://127.0.0.1:{port}/v1/users/42");
    let (cc, ck) = (
        client_cert.display().to_string(),
        client_key.display().to_string(),
    );
    let send = |t: Option<&str>| {
        let mut args = vec!["-k", "--cert", &cc, "--key", &ck];
        let h;
        if let Some(t) = t {
            h = format!("Authorization: Bearer {t}");
            args.extend(["-H", &h]);
        }
        curl(&url, &args)
    };
    let refused = |reason: &str| {
        sc.metric(&format!(
            r#"svidcar_jwt_refused_total{{listener="users",reason="{reason}"}}"#
        ))
    };

    // A good token: the app gets it, and the rule on its sub admits it.
    let (code, body) = send(Some(&token("good_a1")));
    assert_eq!(code, 200, "{body}\n{}", sc.logs());
    assert_eq!(
        authorization(&body),
        [format!("Bearer {}", token("good_a1"))]
    );
    // Expired 10 s ago: within the default 30 s leeway.
    assert_eq!(send(Some(&token("within_leeway"))).0, 200);
    // Valid, but its sub is not the one the rule names (the mTLS peer is): 403.
    assert_eq!(send(Some(&token("other_sub"))).0, 403);

    let attacks = [
        ("none", "bad_alg", "alg none is not allowed"),
        ("hs256_pem", "bad_alg", "alg HS256 is not allowed"),
        ("hs256_jwk", "bad_alg", "alg HS256 is not allowed"),
        ("no_kid", "missing_kid", "no kid in the header"),
        ("wrong_aud", "wrong_audience", "aud holds none"),
        ("expired", "expired", "leeway 30 s"),
        (
            "foreign",
            "foreign_trust_domain",
            "key b1 belongs to trust domain other.org",
        ),
        ("unknown", "unknown_key", "key c1 is not in the JWT bundle"),
        ("forged_kid", "bad_signature", "does not verify with key a1"),
    ];
    for (name, reason, text) in attacks {
        let before = refused(reason);
        let (code, body) = send(Some(&token(name)));
        assert_eq!((code, body.as_str()), (401, "unauthorized\n"), "{name}");
        assert_eq!(refused(reason), before + 1.0, "{name}");
        sc.wait_log(&["JWT-SVID refused", reason, text]);
    }
    // No token at all, with `required: true`.
    assert_eq!(send(None).0, 401);
    assert_eq!(refused("missing"), 1.0);
    sc.wait_log(&["JWT-SVID refused", "no bearer token"]);

    // A key removed from the bundle file: a2 verifies, the file is replaced (by rename,
    // as writers do) without a2, and after the reload a2's token is refused.
    assert_eq!(send(Some(&token("good_a2"))).0, 200);
    let series = r#"svidcar_jwt_bundle_keys{trust_domain="example.org"}"#;
    assert_eq!(sc.metric(series), 2.0);
    std::fs::rename(
        d.join("example.org.jwks.a1only"),
        d.join("example.org.jwks"),
    )
    .unwrap();
    wait_until(
        "JWT bundle reload",
        std::time::Duration::from_secs(10),
        || (sc.metric(series) == 1.0).then_some(()),
    );
    let before = refused("unknown_key");
    assert_eq!(send(Some(&token("good_a2"))).0, 401);
    assert_eq!(refused("unknown_key"), before + 1.0);
    sc.wait_log(&[
        "JWT-SVID refused",
        "key a2 is not in the JWT bundle of example.org",
    ]);

    // A broken file keeps the bundle it replaces.
    std::fs::write(d.join("example.org.jwks"), "{not json").unwrap();
    sc.wait_log(&[
        "does not load; keeping the previous bundle",
        "example.org.jwks",
    ]);
    assert_eq!(send(Some(&token("good_a1"))).0, 200);
    assert_eq!(sc.metric(series), 1.0);

    let logs = sc.logs();
    for (name, _) in tokens.as_object().unwrap() {
        let sig = token(name);
        let sig = sig.rsplit('.').next().unwrap();
        assert!(
            sig.is_empty() || !logs.contains(sig),
            "{name} reached the log"
        );
    }
}

/// The dev CA mints and validates: two `dev` svidcars loading the same CA files agree
/// on the JWT key (derived from the CA key). The claims reach Rego (`input.jwt_claims`);
/// with `required: false` a request whose app sent another scheme (Basic) passes the JWT
/// check without claims, and the policy refuses it.
#[test]
fn dev_ca_sidecars_mint_and_validate_each_others_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (ca, key) = dev_ca(d, "example.org");
    let app = echo_app(d);
    let (in_port, out_port) = (free_port(), free_port());
    std::fs::write(
        d.join("policy.rego"),
        format!(
            "package authz\ndefault allow = false\nallow {{\n  input.jwt_claims.sub == \"{PAYMENT}\"\n  input.jwt_claims.aud[_] == \"users\"\n}}\n"
        ),
    )
    .unwrap();
    let dev = |id: &str| {
        format!(
            "identity:\n  dev: {{spiffe_id: \"{id}\", ca_cert: {}, ca_key: {}}}\n",
            ca.display(),
            key.display()
        )
    };
    let inbound = Svidcar::start(
        d,
        "users",
        &format!(
            r#"{}inbound:
  - name: users
    listen: 127.0.0.1:{in_port}
    forward: 127.0.0.1:{app}
    protocol: http
    allow: [{{trust_domain: example.org}}]
    jwt: {{audiences: [users], required: false}}
    rego: {{policy: [policy.rego], query: data.authz.allow}}
"#,
            dev(USERS),
            app = app.port
        ),
    );
    let _outbound = Svidcar::start(
        d,
        "caller",
        &format!(
            r#"{}outbound:
  - name: users
    listen: 127.0.0.1:{out_port}
    connect: 127.0.0.1:{in_port}
    protocol: http
    expect: [{{exact: "{USERS}"}}]
    jwt: {{audience: users}}
"#,
            dev(PAYMENT)
        ),
    );
    let url = format!("http://127.0.0.1:{out_port}/");
    let (code, body) = curl(&url, &[]);
    assert_eq!(code, 200, "{body}\n{}", inbound.logs());
    let auth = authorization(&body);
    let c = claims(auth[0].strip_prefix("Bearer ").unwrap());
    assert_eq!(
        (c["sub"].as_str(), c["aud"][0].as_str()),
        (Some(PAYMENT), Some("users"))
    );
    let (code, body) = curl(&url, &["-H", "Authorization: Basic dXNlcjpwdw=="]);
    assert_eq!((code, body.as_str()), (403, "forbidden\n"));
    inbound.wait_log(&["request refused by the Rego policy"]);
    assert_eq!(
        inbound.metric(r#"svidcar_jwt_refused_total{listener="users",reason="missing"}"#),
        0.0,
        "not required: no refusal"
    );
}

/// No JWT-SVID can be had (the agent is gone before the first request; the X.509
/// identity is cached): the app gets 503, the failure is logged and counted.
#[test]
fn no_jwt_svid_means_503_to_the_app() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut agent = DevAgent::start(
        d,
        &format!("trust_domain: example.org\nentries:\n  - spiffe_id: {PAYMENT}\n    selectors: [\"unix:uid:0\"]\n"),
    );
    let out_port = free_port();
    let outbound = Svidcar::start(
        d,
        "caller",
        &format!(
            r#"identity:
  workload_api: {{socket: "{}"}}
outbound:
  - name: users
    listen: 127.0.0.1:{out_port}
    connect: 127.0.0.1:{}
    protocol: http
    expect: [{{exact: "{PAYMENT}"}}]
    jwt: {{audience: users}}
"#,
            agent.url(),
            free_port()
        ),
    );
    agent.kill();
    let (code, body) = curl(&format!("http://127.0.0.1:{out_port}/"), &[]);
    assert_eq!((code, body.as_str()), (503, "no JWT-SVID available\n"));
    outbound.wait_log(&["no JWT-SVID for the request; answering 503", "FetchJWTSVID"]);
    assert_eq!(
        outbound.metric(r#"svidcar_jwt_outbound_total{listener="users",outcome="fetch_failed"}"#),
        1.0
    );
}
