//! Key exchange parity with Envoy (issue 15): svidcar offers and prefers the post-quantum
//! hybrid X25519MLKEM768, as Envoy 1.40 (BoringSSL) does, and still agrees a classical
//! group with a peer that has no ML-KEM. Each side's own counters say which group was
//! negotiated: svidcar's `svidcar_tls_key_exchange_total{group}`, Envoy's `ssl.curves.*`.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

const MLKEM: &str = "svidcar_tls_key_exchange_total{group=\"X25519MLKEM768\"}";
const X25519: &str = "svidcar_tls_key_exchange_total{group=\"X25519\"}";

fn inbound(d: &Path, port: u16, app: u16, id: &str, allow: &str) -> String {
    format!(
        "identity:\n  dev: {{spiffe_id: \"{id}\", ca_cert: {}, ca_key: {}}}\ninbound:\n  - name: in\n    listen: 127.0.0.1:{port}\n    forward: 127.0.0.1:{app}\n    allow: [{{exact: \"{allow}\"}}]\n",
        d.join("ca.pem").display(),
        d.join("ca.key").display(),
    )
}

/// A svidcar terminating mTLS on `port` for `app`, as `spiffe://example.org/server`,
/// admitting `peer` only.
fn server(d: &Path, port: u16, app: u16, peer: &str) -> Svidcar {
    Svidcar::start(
        d,
        "server",
        &inbound(d, port, app, "spiffe://example.org/server", peer),
    )
}

fn outbound(d: &Path, port: u16, to: u16, id: &str, expect: &str) -> String {
    format!(
        "identity:\n  dev: {{spiffe_id: \"{id}\", ca_cert: {}, ca_key: {}}}\noutbound:\n  - name: out\n    listen: 127.0.0.1:{port}\n    connect: 127.0.0.1:{to}\n    expect: [{{exact: \"{expect}\"}}]\n",
        d.join("ca.pem").display(),
        d.join("ca.key").display(),
    )
}

fn ca(d: &Path) -> TestCa {
    let (c, k) = dev_ca(d, "example.org");
    std::fs::rename(&c, d.join("ca.pem")).unwrap();
    std::fs::rename(&k, d.join("ca.key")).unwrap();
    TestCa::load(&d.join("ca.pem"), &d.join("ca.key"))
}

/// Sum of an Envoy counter family (`filter` is a regex on stat names), from its admin.
fn envoy_stat(envoy: &Envoy, filter: &str) -> u64 {
    let (_, body) = http_get(envoy.admin, &format!("/stats?filter={filter}")).expect("stats");
    body.lines()
        .filter_map(|l| {
            l.rsplit_once(": ")
                .and_then(|(_, v)| v.trim().parse::<u64>().ok())
        })
        .sum()
}

#[test]
fn a_pair_agrees_on_x25519mlkem768() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ca(d);
    let echo = EchoServer::start();
    let (inp, outp) = (free_port(), free_port());
    let server = server(d, inp, echo.port, "spiffe://example.org/client");
    let client = Svidcar::start(
        d,
        "client",
        &outbound(
            d,
            outp,
            inp,
            "spiffe://example.org/client",
            "spiffe://example.org/server",
        ),
    );
    assert_eq!(echo_roundtrip(&mut connect(outp), b"pq").unwrap(), b"pq");
    wait_until(
        "the server counted the handshake",
        Duration::from_secs(5),
        || (server.metric(MLKEM) == 1.0).then_some(()),
    );
    assert_eq!(client.metric(MLKEM), 1.0, "{}", client.logs());
    assert_eq!(server.metric(X25519) + client.metric(X25519), 0.0);
}

#[test]
fn a_client_without_mlkem_gets_x25519() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = ca(d);
    let echo = EchoServer::start();
    let port = free_port();
    let server = server(d, port, echo.port, "spiffe://example.org/client");
    let (c, k) = ca.valid_leaf(d, "client", "spiffe://example.org/client");
    // The groups an OpenSSL before 3.5 offers (whatever version runs the test).
    let out = s_client(
        port,
        Some((&c, &k)),
        &["-groups", "X25519:P-256"],
        b"classic\n",
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("classic"),
        "no echo: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until(
        "the server counted the handshake",
        Duration::from_secs(5),
        || (server.metric(X25519) == 1.0).then_some(()),
    );
    assert_eq!(server.metric(MLKEM), 0.0);
}

#[test]
fn envoy_and_svidcar_agree_on_x25519mlkem768_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = ca(d);
    let echo = EchoServer::start();
    let ca_pem = d.join("ca.pem").display().to_string();

    // Envoy originates, svidcar terminates. (Envoy::start waits for /ready: its static
    // listeners are bound; probing them would proxy a connection and count a handshake.)
    let inp = free_port();
    let server = server(d, inp, echo.port, "spiffe://example.org/envoy");
    let (ec, ek) = ca.valid_leaf(d, "envoy", "spiffe://example.org/envoy");
    let envoy_out_port = free_port();
    let envoy_out = Envoy::start(
        d,
        "pair-outbound-static.yaml",
        &[
            ("LISTEN_PORT", envoy_out_port.to_string()),
            ("TARGET_PORT", inp.to_string()),
            ("CERT", ec.display().to_string()),
            ("KEY", ek.display().to_string()),
            ("CA", ca_pem.clone()),
            ("PEER_ID", "spiffe://example.org/server".into()),
        ],
    );
    assert_eq!(
        echo_roundtrip(&mut connect(envoy_out_port), b"e2s").unwrap(),
        b"e2s"
    );
    wait_until(
        "svidcar counted the handshake",
        Duration::from_secs(5),
        || (server.metric(MLKEM) + server.metric(X25519) == 1.0).then_some(()),
    );
    assert_eq!(
        server.metric(MLKEM),
        1.0,
        "svidcar: X25519 {}",
        server.metric(X25519)
    );
    assert_eq!(
        envoy_stat(&envoy_out, "ssl.curves.X25519MLKEM768"),
        1,
        "{}",
        envoy_out.logs()
    );

    // svidcar originates, Envoy terminates.
    let envoy_in_port = free_port();
    let envoy_in = Envoy::start(
        d,
        "pair-inbound-static.yaml",
        &[
            ("LISTEN_PORT", envoy_in_port.to_string()),
            ("TARGET_PORT", echo.port.to_string()),
            ("CERT", ec.display().to_string()),
            ("KEY", ek.display().to_string()),
            ("CA", ca_pem),
            ("PEER_ID", "spiffe://example.org/client".into()),
        ],
    );
    let outp = free_port();
    let client = Svidcar::start(
        d,
        "client",
        &outbound(
            d,
            outp,
            envoy_in_port,
            "spiffe://example.org/client",
            "spiffe://example.org/envoy",
        ),
    );
    assert_eq!(echo_roundtrip(&mut connect(outp), b"s2e").unwrap(), b"s2e");
    assert_eq!(client.metric(MLKEM), 1.0, "{}", client.logs());
    assert_eq!(
        envoy_stat(&envoy_in, "ssl.curves.X25519MLKEM768"),
        1,
        "{}",
        envoy_in.logs()
    );
}
