//! PROXY protocol v2 to the app (issue 14): the caller's real address and port, the TLS
//! facts and its SPIFFE ID in a custom TLV, read by an independent parser (the `ppp`
//! crate) and by nginx (`listen ... proxy_protocol`), which logs the real address.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const CLIENT: &str = "spiffe://example.org/ns/shop/sa/payment";

/// A TLS client with `cert` bound to `source` (so the address the app is told can be
/// checked), sends `msg`, prints its own port and what came back.
const CLIENT_PY: &str = r#"
import socket, ssl, sys
port, cert, key, ca, msg = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.load_verify_locations(ca)
ctx.load_cert_chain(cert, key)
ctx.set_alpn_protocols(["svidcar-test"])
raw = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=("127.0.0.5", 0))
s = ctx.wrap_socket(raw, server_hostname="users.shop.svc")
s.sendall(msg.encode())
print(s.getsockname()[1])
print(s.recv(1000).decode(errors="replace"))
"#;

fn tls_client(dir: &Path, port: u16, cert: (&Path, &Path), ca: &Path, msg: &str) -> (u16, String) {
    let out = Command::new("python3")
        .args(["-c", CLIENT_PY, &port.to_string()])
        .arg(cert.0)
        .arg(cert.1)
        .arg(ca)
        .arg(msg)
        .current_dir(dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (p, rest) = text.split_once('\n').unwrap();
    (p.trim().parse().unwrap(), rest.trim().to_string())
}

fn sidecar(dir: &Path, forward: u16, pp: &str) -> (Svidcar, u16) {
    let (ca, key) = dev_ca(dir, "example.org");
    let port = free_port();
    let s = Svidcar::start(
        dir,
        "in",
        &format!(
            "identity: {{dev: {{spiffe_id: \"spiffe://example.org/ns/shop/sa/users\", ca_cert: {}, ca_key: {}}}}}\ninbound:\n  - name: users\n    listen: 127.0.0.1:{port}\n    forward: 127.0.0.1:{forward}\n    allow: [{{exact: \"{CLIENT}\"}}]\n    alpn: [svidcar-test]\n{pp}",
            ca.display(),
            key.display()
        ),
    );
    (s, port)
}

#[test]
fn the_app_reads_the_callers_address_and_spiffe_id_with_an_independent_parser() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let app = TcpListener::bind("127.0.0.1:0").unwrap();
    let app_port = app.local_addr().unwrap().port();
    let (s, port) = sidecar(d, app_port, "    proxy_protocol: v2\n");
    let ca = TestCa::load(&d.join("ca.pem"), &d.join("ca.key"));
    let cert = ca.valid_leaf(d, "payment", CLIENT);
    // The app: reads the header (its length is in bytes 14..16), then the payload.
    let reader = std::thread::spawn(move || {
        let (mut c, _) = app.accept().unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut head = [0u8; 16];
        c.read_exact(&mut head).unwrap();
        let len = u16::from_be_bytes([head[14], head[15]]) as usize;
        let mut rest = vec![0u8; len];
        c.read_exact(&mut rest).unwrap();
        let mut payload = [0u8; 5];
        c.read_exact(&mut payload).unwrap();
        c.write_all(b"ok").unwrap();
        ([head.to_vec(), rest].concat(), payload)
    });
    let (client_port, reply) = tls_client(d, port, (&cert.0, &cert.1), &d.join("ca.pem"), "hello");
    assert_eq!(reply, "ok");
    let (header, payload) = reader.join().unwrap();
    assert_eq!(&payload, b"hello");

    let parsed = ppp::v2::Header::try_from(&header[..]).expect("ppp parses the header");
    assert_eq!(parsed.command, ppp::v2::Command::Proxy);
    match parsed.addresses {
        ppp::v2::Addresses::IPv4(a) => {
            assert_eq!(a.source_address.to_string(), "127.0.0.5");
            assert_eq!(a.source_port, client_port);
            assert_eq!(a.destination_address.to_string(), "127.0.0.1");
            assert_eq!(a.destination_port, port);
        }
        other => panic!("not IPv4: {other:?}"),
    }
    let tlvs: Vec<(u8, Vec<u8>)> = parsed
        .tlvs()
        .map(|t| {
            let t = t.unwrap();
            (t.kind, t.value.to_vec())
        })
        .collect();
    let find = |kind: u8| {
        tlvs.iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(find(0xE0).unwrap(), CLIENT.as_bytes(), "{tlvs:?}");
    assert_eq!(find(0x01).unwrap(), b"svidcar-test");
    assert_eq!(find(0x02).unwrap(), b"users.shop.svc");
    let ssl = find(0x20).unwrap();
    assert_eq!(
        ssl[0], 0x07,
        "client: SSL + cert on connection + cert in session"
    );
    assert_eq!(&ssl[1..5], &[0, 0, 0, 0], "verify: 0 = verified");
    assert!(String::from_utf8_lossy(&ssl[5..]).contains("TLSv1.3"));
    drop(s);
}

#[test]
fn nginx_logs_the_callers_real_address() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ngx_port = free_port();
    open_up(d);
    std::fs::write(
        d.join("nginx.conf"),
        format!(
            "worker_processes 1; daemon off; pid {d}/nginx.pid; error_log {d}/nginx.err;\n\
             events {{ worker_connections 64; }}\n\
             http {{ log_format pp '$proxy_protocol_addr:$proxy_protocol_port via $remote_addr';\n\
               access_log {d}/access.log pp;\n\
               server {{ listen 127.0.0.1:{ngx_port} proxy_protocol; location / {{ return 200 \"hi\\n\"; }} }} }}\n",
            d = d.display()
        ),
    )
    .unwrap();
    let _nginx = Nginx(
        Command::new("nginx")
            .arg("-c")
            .arg(d.join("nginx.conf"))
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_until("nginx", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", ngx_port)).ok()
    });
    let (s, port) = sidecar(
        d,
        ngx_port,
        "    proxy_protocol: {version: v2, spiffe_id_tlv: 0xE3}\n",
    );
    let ca = TestCa::load(&d.join("ca.pem"), &d.join("ca.key"));
    let cert = ca.valid_leaf(d, "payment", CLIENT);
    let (client_port, reply) = tls_client(
        d,
        port,
        (&cert.0, &cert.1),
        &d.join("ca.pem"),
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    let line = wait_until("access log", Duration::from_secs(5), || {
        let log = std::fs::read_to_string(d.join("access.log")).unwrap_or_default();
        log.lines().next().map(str::to_string)
    });
    assert_eq!(line, format!("127.0.0.5:{client_port} via 127.0.0.1"));
    drop(s);
}

/// nginx, stopped on drop (a failed assertion too) with SIGTERM, on which the master
/// stops its worker: SIGKILL would leave the worker running, still listening.
struct Nginx(std::process::Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

#[test]
fn proxy_protocol_config_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (ca, key) = dev_ca(d, "example.org");
    let base = format!(
        "identity: {{dev: {{spiffe_id: \"spiffe://example.org/a\", ca_cert: {}, ca_key: {}}}}}\ninbound:\n  - name: a\n    listen: 127.0.0.1:0\n    forward: 127.0.0.1:1\n    allow: [{{trust_domain: example.org}}]\n",
        ca.display(),
        key.display()
    );
    for (extra, want) in [
        (
            "    proxy_protocol: v1\n",
            "inbound[0].proxy_protocol: \"v1\": only v2",
        ),
        (
            "    proxy_protocol: {version: v2, spiffe_id_tlv: 0x20}\n",
            "inbound[0].proxy_protocol.spiffe_id_tlv: 0x20: use a custom type",
        ),
        (
            "    protocol: http\n    proxy_protocol: v2\n",
            "inbound[0].proxy_protocol: only with protocol: tcp",
        ),
    ] {
        let (ok, out) = check_config(d, "c", &format!("{base}{extra}"));
        assert!(!ok && out.contains(want), "{extra}: {out}");
    }
}
