//! Network namespaces for transparent-mode tests: "pods" on a bridge (each its own
//! namespace with a veth to a bridge namespace, IPv4 10.210.0.N/24 and IPv6 fd10::N/64),
//! commands run inside them as root or as another uid, all removed on drop.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::{wait_output, wait_until, BIN};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Runs `cmd`, panicking with its output when it fails.
pub fn must(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// One network namespace, deleted (with every process still in it) on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Self {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("svt-{}-{n}-{tag}", std::process::id());
        must(Command::new("ip").args(["netns", "add", &name]));
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `program` run inside the namespace, as root.
    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// `program` run inside the namespace as `uid` (gid the same, no other groups).
    pub fn cmd_as(&self, uid: u32, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, "setpriv"])
            .arg(format!("--reuid={uid}"))
            .arg(format!("--regid={uid}"))
            .args(["--clear-groups", program]);
        c
    }

    /// `ip ARGS` in this namespace; must succeed.
    pub fn ip(&self, args: &[&str]) {
        must(Command::new("ip").args(["-n", &self.name]).args(args));
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A bridge that pods plug into.
pub struct Lan {
    bridge: Netns,
    pods: u8,
}

/// A pod: a namespace on the LAN with its addresses.
pub struct Pod {
    pub ns: Netns,
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
    children: Vec<Child>,
}

impl Lan {
    pub fn new() -> Self {
        let bridge = Netns::new("br");
        bridge.ip(&["link", "add", "br0", "type", "bridge"]);
        bridge.ip(&["link", "set", "br0", "up"]);
        Self { bridge, pods: 0 }
    }

    /// A new pod at 10.210.0.N and fd10::N.
    pub fn pod(&mut self, tag: &str) -> Pod {
        self.pods += 1;
        let n = self.pods;
        let ns = Netns::new(tag);
        let port = format!("p{n}");
        must(Command::new("ip").args([
            "link",
            "add",
            "eth0",
            "netns",
            &ns.name,
            "type",
            "veth",
            "peer",
            "name",
            &port,
            "netns",
            &self.bridge.name,
        ]));
        self.bridge.ip(&["link", "set", &port, "master", "br0"]);
        self.bridge.ip(&["link", "set", &port, "up"]);
        let (ip4, ip6) = (Ipv4Addr::new(10, 210, 0, n), format!("fd10::{n}"));
        ns.ip(&["addr", "add", &format!("{ip4}/24"), "dev", "eth0"]);
        ns.ip(&["addr", "add", &format!("{ip6}/64"), "dev", "eth0", "nodad"]);
        ns.ip(&["link", "set", "eth0", "up"]);
        Pod {
            ns,
            ip4,
            ip6: ip6.parse().unwrap(),
            children: Vec::new(),
        }
    }

    /// The bridge's namespace, with the pods' ports `p1`, `p2`, ... (for captures).
    pub fn bridge(&self) -> &Netns {
        &self.bridge
    }
}

impl Pod {
    /// Starts `cmd` (made with `self.ns.cmd*`), kept until the pod is dropped.
    pub fn spawn(&mut self, cmd: &mut Command, log: &Path) {
        let child = cmd
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        self.children.push(child);
    }

    /// A Python HTTP server as uid 1000 on `port`, serving `dir`; waits until it answers.
    pub fn http_app(&mut self, port: u16, dir: &Path, log: &Path) {
        let mut c = self.ns.cmd_as(1000, "/usr/bin/python3");
        c.args(["-m", "http.server", &port.to_string(), "--directory"])
            .arg(dir);
        self.spawn(&mut c, log);
        self.wait_port(port);
    }

    /// Waits until something listens on `port` in this pod (checked from inside, by root:
    /// loopback traffic is never redirected).
    pub fn wait_port(&self, port: u16) {
        wait_until(
            &format!("port {port} in {}", self.ns.name),
            Duration::from_secs(10),
            || {
                let ok = self
                    .ns
                    .cmd("/usr/bin/python3")
                    .args([
                        "-c",
                        &format!(
                            "import socket; socket.create_connection(('127.0.0.1', {port}), 1)"
                        ),
                    ])
                    .stderr(Stdio::null())
                    .status()
                    .unwrap()
                    .success();
                ok.then_some(())
            },
        );
    }

    /// `svidcar redirect` (as root) then `svidcar run` as uid 1337 with `config`; waits
    /// until it says it is ready. Returns the path of its log.
    pub fn sidecar(&mut self, dir: &Path, name: &str, config: &str) -> std::path::PathBuf {
        let path = dir.join(format!("{name}.yaml"));
        std::fs::write(&path, config).unwrap();
        super::open_up(dir);
        let out = self
            .ns
            .cmd(BIN)
            .args(["redirect", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "svidcar redirect: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let log = dir.join(format!("{name}.log"));
        let mut c = self.ns.cmd_as(1337, BIN);
        c.args(["run", "--config"])
            .arg(&path)
            .env("RUST_LOG", "svidcar=debug");
        self.spawn(&mut c, &log);
        let child = self.children.len() - 1;
        wait_until(&format!("{name} ready"), Duration::from_secs(15), || {
            if let Ok(Some(status)) = self.children[child].try_wait() {
                panic!("{name} exited with {status}: {}", read(&log));
            }
            read(&log).contains("svidcar ready").then_some(())
        });
        log
    }

    /// Stops the last process started (the sidecar, when it was the last).
    pub fn stop_last(&mut self) {
        if let Some(mut c) = self.children.pop() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `curl` as `uid` in this pod; (exit code, body).
    pub fn curl(&self, uid: u32, url: &str) -> (i32, String) {
        let mut c = self.ns.cmd_as(uid, "curl");
        c.args(["-s", "-g", "-m", "10", url]);
        let out = wait_output(
            c.stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
            Duration::from_secs(20),
        );
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    }

    /// One series of this pod's svidcar metrics (admin on 127.0.0.1:15000); 0 when absent.
    pub fn metric(&self, series: &str) -> f64 {
        let out = self
            .ns
            .cmd("curl")
            .args(["-s", "-m", "5", "http://127.0.0.1:15000/metrics"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0.0)
    }

    /// The HTTP status of the admin endpoint `path` (0 when it does not answer).
    pub fn admin_status(&self, path: &str) -> u16 {
        let out = self
            .ns
            .cmd("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "5"])
            .arg(format!("http://127.0.0.1:15000{path}"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0)
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A file's text ("" when absent).
pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Captures every frame on `iface` in `ns` (a raw packet socket, as root) until the
/// returned handle is finished.
pub struct Capture {
    child: Child,
    file: std::path::PathBuf,
}

const SNIFFER: &str = r#"
import socket, sys, os
iface, out, stop = sys.argv[1], sys.argv[2], sys.argv[3]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind((iface, 0))
s.settimeout(0.1)
print("ready", flush=True)
with open(out, "wb") as f:
    while not os.path.exists(stop):
        try:
            f.write(s.recv(65535))
        except socket.timeout:
            pass
"#;

impl Capture {
    pub fn start(ns: &Netns, iface: &str, dir: &Path) -> Self {
        let file = dir.join(format!("capture-{iface}.bin"));
        let stop = dir.join(format!("capture-{iface}.stop"));
        let _ = std::fs::remove_file(&stop);
        let mut child = ns
            .cmd("/usr/bin/python3")
            .args(["-c", SNIFFER, iface])
            .arg(&file)
            .arg(&stop)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line.trim(), "ready", "sniffer did not start");
        Self { child, file }
    }

    /// Stops the capture; returns every byte seen.
    pub fn finish(mut self) -> Vec<u8> {
        let stop = self.file.with_extension("stop");
        std::fs::write(&stop, b"").unwrap();
        let _ = self.child.wait();
        std::fs::read(&self.file).unwrap()
    }
}
