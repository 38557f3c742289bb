//! `svidcar dev-agent` under attack and at shutdown: the fork+exec attestation spoof,
//! SIGTERM with a FetchX509SVID stream open, and config values that would hurt it.
//!
//! The spoof needs a gRPC call made by a process other than the one that connected, over
//! an inherited socket; no gRPC stack does that, so the calls are written as raw HTTP/2
//! frames by a small Python client (`H2`), exactly as a gRPC client puts them on the wire.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::*;

const WEB: &str = "spiffe://example.org/ns/default/sa/web";
const BACKEND: &str = "spiffe://example.org/ns/default/sa/backend";

/// A minimal HTTP/2 gRPC client over a connected unix socket: HPACK literals without
/// indexing or Huffman, one empty request message per `call`. `first(sock, sid)` returns
/// the bytes of the first response message (empty when the call was refused) and how
/// the stream ended.
const H2: &str = r#"
import os, socket, struct, sys, time
FETCH = b'/SpiffeWorkloadAPI/FetchX509SVID'
def frame(t, flags, sid, payload=b''):
    return struct.pack('>I', len(payload))[1:] + bytes([t, flags]) + struct.pack('>I', sid) + payload
def lit(name, value):
    return b'\x00' + bytes([len(name)]) + name + bytes([len(value)]) + value
def start(sock):
    sock.sendall(b'PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n' + frame(4, 0, 0))
def call(sock, sid, path=FETCH):
    h = (lit(b':method', b'POST') + lit(b':scheme', b'http') + lit(b':path', path)
         + lit(b':authority', b'localhost') + lit(b'content-type', b'application/grpc')
         + lit(b'te', b'trailers') + lit(b'workload.spiffe.io', b'true'))
    sock.sendall(frame(1, 4, sid, h) + frame(0, 1, sid, b'\x00\x00\x00\x00\x00'))
def recvn(sock, n):
    b = b''
    while len(b) < n:
        c = sock.recv(n - len(b))
        if not c:
            raise EOFError()
        b += c
    return b
def read_frame(sock):
    h = recvn(sock, 9)
    n = int.from_bytes(h[:3], 'big')
    return h[3], h[4], int.from_bytes(h[5:9], 'big') & 0x7fffffff, recvn(sock, n)
def first(sock, sid, stop_at_data=True):
    data = b''
    try:
        while True:
            t, fl, s, p = read_frame(sock)
            if t == 4 and not fl & 1:
                sock.sendall(frame(4, 1, 0))
            elif t == 6 and not fl & 1:
                sock.sendall(frame(6, 1, 0, p))
            elif t == 7:
                return data, 'goaway'
            elif s == sid and t == 0:
                data += p
                if fl & 1:
                    return data, 'end'
                if stop_at_data and data:
                    return data, 'open'
            elif s == sid and t == 1 and fl & 1:
                return data, 'end'
            elif s == sid and t == 3:
                return data, 'reset'
    except EOFError:
        return data, 'eof'
def connect(path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    start(sock)
    return sock
"#;

/// The real path of a program on PATH, as /proc/PID/exe shows it.
fn real_path(program: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("readlink -f \"$(command -v {program})\""))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn python_path() -> String {
    let out = Command::new("python3")
        .args([
            "-c",
            "import os,sys; print(os.path.realpath(sys.executable))",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn agent_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default()
}

#[test]
fn fork_exec_spoof_is_refused_and_a_registered_process_still_gets_its_svid() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sh = real_path("sh");
    let py = python_path();
    // WEB belongs to the shell binary; BACKEND to python, the legit caller below.
    let agent = DevAgent::start(
        d,
        &format!(
            "trust_domain: example.org\nentries:\n  - spiffe_id: {WEB}\n    selectors: [\"unix:path:{sh}\"]\n  - spiffe_id: {BACKEND}\n    selectors: [\"unix:path:{py}\"]\n"
        ),
    );
    let sock = agent.socket.display().to_string();

    // A registered process gets its SVID, twice on the same connection.
    let (ok, out) = python(
        d,
        &format!(
            "{H2}\ns = connect({sock:?})\nfor sid in (1, 3):\n    call(s, sid)\n    data, how = first(s, sid)\n    print('legit', sid, len(data), b{BACKEND:?} in data, how)\n"
        ),
    );
    assert!(ok, "{out}");
    assert!(
        out.contains("legit 1 ") && out.contains("legit 3 "),
        "{out}"
    );
    for line in out.lines().filter(|l| l.starts_with("legit")) {
        assert!(
            line.ends_with("True open"),
            "legit call must get BACKEND: {out}"
        );
    }

    // The spoof: python connects and makes one call (attested as python, it gets
    // BACKEND); then it forks, the parent execs the shell (registered for WEB) and the
    // child, once the parent runs the shell, calls again over the inherited socket.
    let result = d.join("spoof-result");
    let (ok, out) = python(
        d,
        &format!(
            r#"{H2}
s = connect({sock:?})
call(s, 1)
data, how = first(s, 1)
print('first call', len(data), how, flush=True)
result = {result:?}
target = {sh:?}
if os.fork() == 0:
    parent = os.getppid()
    while os.readlink('/proc/%d/exe' % parent) != target:
        time.sleep(0.01)
    call(s, 3)
    data, how = first(s, 3)
    with open(result + '.tmp', 'w') as f:
        f.write('%d %s %s' % (len(data), b{WEB:?} in data, how))
    os.rename(result + '.tmp', result)
    os._exit(0)
os.execv(target, [target, '-c', 'while [ ! -e "$0" ]; do sleep 0.05; done', result])
"#
        ),
    );
    assert!(ok, "{out}");
    assert!(out.contains("first call"), "{out}");
    let verdict = std::fs::read_to_string(&result).unwrap();
    assert!(
        verdict.starts_with("0 False "),
        "the child must get nothing (bytes, WEB present, end): {verdict}\n{}",
        agent_log(d)
    );
    wait_until("spoof refusal logged", Duration::from_secs(10), || {
        agent_log(d)
            .lines()
            .find(|l| l.contains("call refused") && l.contains("exec'd") && l.contains(&sh))
            .map(|_| ())
    });
    assert!(!agent_log(d).contains("PRIVATE KEY"));
}

#[test]
fn sigterm_with_an_open_stream_exits_within_the_drain_time() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let socket = d.join("agent.sock");
    let config = d.join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "socket: {}\ntrust_domain: example.org\nentries:\n  - spiffe_id: {WEB}\n    selectors: [\"unix:uid:0\"]\n",
            socket.display()
        ),
    )
    .unwrap();
    let mut agent = Command::new(BIN)
        .args(["dev-agent", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(d.join("agent.log")).unwrap())
        .spawn()
        .unwrap();
    wait_until("dev-agent socket", Duration::from_secs(15), || {
        std::os::unix::net::UnixStream::connect(&socket).ok()
    });

    // A client holds a FetchX509SVID stream open and reports when the stream ends.
    let mut client = Command::new("python3")
        .arg("-c")
        .arg(format!(
            "{H2}\ns = connect({:?})\ncall(s, 1)\ndata, how = first(s, 1)\nprint('streaming', len(data) > 0, how, flush=True)\ndata, how = first(s, 1, stop_at_data=False)\nprint('ended', how, flush=True)\n",
            socket.display().to_string()
        ))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let reader = {
        let lines = lines.clone();
        let out = client.stdout.take().unwrap();
        thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(l);
            }
        })
    };
    wait_until("stream open", Duration::from_secs(15), || {
        lines
            .lock()
            .unwrap()
            .iter()
            .find(|l| l.starts_with("streaming"))
            .cloned()
    });
    assert!(
        lines.lock().unwrap()[0] == "streaming True open",
        "{:?}",
        lines.lock().unwrap()
    );

    signal(agent.id(), "-TERM");
    // The drain time is 5 s; a stuck agent stays up for minutes.
    let status = wait_until(
        "dev-agent exit after SIGTERM",
        Duration::from_secs(30),
        || agent.try_wait().ok().flatten(),
    );
    assert!(status.success(), "{status:?}: {}", agent_log(d));
    assert!(!socket.exists(), "socket file removed at exit");
    let ended = wait_until("client saw the stream end", Duration::from_secs(15), || {
        lines
            .lock()
            .unwrap()
            .iter()
            .find(|l| l.starts_with("ended"))
            .cloned()
    });
    assert_ne!(ended, "ended open", "{ended}");
    let _ = client.kill();
    let _ = client.wait();
    let _ = reader.join();
    assert!(
        agent_log(d).contains("ending open streams"),
        "{}",
        agent_log(d)
    );
}

#[test]
fn bad_agent_configs_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cases = [
        (
            "tiny-ttl",
            format!("trust_domain: example.org\nsvid_ttl: 10ms\nentries:\n  - spiffe_id: {WEB}\n    selectors: [\"unix:uid:0\"]\n"),
            vec!["svid_ttl", "10ms is too short", "at least 2s"],
        ),
        (
            "zero-ttl",
            format!("trust_domain: example.org\nsvid_ttl: 0s\nentries:\n  - spiffe_id: {WEB}\n    selectors: [\"unix:uid:0\"]\n"),
            vec!["svid_ttl", "greater than zero"],
        ),
        (
            "entry-without-path",
            "trust_domain: example.org\nentries:\n  - spiffe_id: spiffe://example.org\n    selectors: [\"unix:uid:0\"]\n".to_string(),
            vec!["entries[0].spiffe_id", "has no path"],
        ),
    ];
    for (name, yaml, expect) in cases {
        let config = d.join(format!("{name}.yaml"));
        let socket = d.join(format!("{name}.sock"));
        std::fs::write(&config, format!("socket: {}\n{yaml}", socket.display())).unwrap();
        let out = wait_output(
            Command::new(BIN)
                .args(["dev-agent", "--config"])
                .arg(&config)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
            Duration::from_secs(20),
        );
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        let head: String = err.chars().take(600).collect();
        assert!(!out.status.success(), "{name} must fail: {head}");
        assert!(!err.contains("panicked"), "{name}: {err}");
        for e in expect {
            assert!(err.contains(e), "{name}: expected {e:?} in {head:?}");
        }
    }
}
