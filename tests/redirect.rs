//! `svidcar redirect`, end to end: the real binary writes real iptables rules (legacy
//! and nft) in network namespaces this test creates, and real connections show where
//! the rules send traffic. Needs root, `ip` and the iptables package.
//!
//! `SVIDCAR_BLESS=1 cargo test --release --test redirect` rewrites the golden files
//! from what the backends print.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;

const PY: &str = "/usr/bin/python3";

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

/// A network namespace of this test, deleted on drop (also when the test panics).
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let tag = std::process::id() ^ nanos ^ N.fetch_add(1, Ordering::Relaxed).rotate_left(20);
        let name = format!("svt-{tag:08x}");
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .unwrap();
        assert!(out.status.success(), "ip netns add {name}: {out:?}");
        let ns = Self { name };
        ns.ok(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// `ip netns exec NS args…`.
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(args);
        c
    }

    fn output(&self, args: &[&str]) -> Output {
        let child = self
            .cmd(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_output(child, Duration::from_secs(60))
    }

    /// Runs a command that must succeed; its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.output(args);
        assert!(
            out.status.success(),
            "{args:?} in {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `svidcar redirect args…` in this namespace: (success, stdout, stderr).
    fn redirect(&self, args: &[&str]) -> (bool, String, String) {
        let mut all = vec![BIN, "redirect"];
        all.extend_from_slice(args);
        let out = self.output(&all);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `redirect` that must succeed; its log (stderr).
    fn redirect_ok(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.redirect(args);
        assert!(ok, "svidcar redirect {args:?} failed:\n{out}\n{err}");
        err
    }

    /// `<tool>-save` output with `#` lines dropped and counters at [0:0].
    fn save(&self, tool: &str, args: &[&str]) -> String {
        let mut all = vec![tool];
        all.extend_from_slice(args);
        normalise(&self.ok(&all))
    }

    /// What all four backends' `-save` print (every table), labelled.
    fn all_saves(&self) -> String {
        [
            "iptables-legacy",
            "iptables-nft",
            "ip6tables-legacy",
            "ip6tables-nft",
        ]
        .iter()
        .map(|t| format!("== {t}\n{}", self.save(&format!("{t}-save"), &[])))
        .collect()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// The comparison form of a save dump (as src/redirect/rules.rs `normalise`).
fn normalise(save: &str) -> String {
    let mut out = String::new();
    for line in save.lines().filter(|l| !l.starts_with('#')) {
        let line = match line.rfind(" [") {
            Some(i) if line.starts_with(':') && line.ends_with(']') => {
                format!("{} [0:0]", &line[..i])
            }
            _ => line.to_string(),
        };
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// A config file in a fresh directory other uids can read.
fn config(yaml: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("svidcar.yaml");
    std::fs::write(&path, yaml).unwrap();
    open_up(dir.path());
    let p = path.to_string_lossy().into_owned();
    (dir, p)
}

const IDENTITY: &str =
    "identity:\n  dev: {spiffe_id: \"spiffe://example.org/ns/prod/sa/web\"}\nadmin: {listen: \"127.0.0.1:15000\"}\n";

fn transparent(inbound_listen: &str, extra_in: &str, extra_out: &str) -> String {
    format!(
        "{IDENTITY}transparent:\n  proxy_uid: 1337\n  inbound:\n    listen: \"{inbound_listen}\"\n    allow: [{{trust_domain: example.org}}]\n{extra_in}  outbound:\n    listen: \"127.0.0.1:15001\"\n    routes: []\n{extra_out}"
    )
}

fn golden_config() -> String {
    golden("redirect.yaml").to_string_lossy().into_owned()
}

/// Exactly one `error:` line, and no panic: the "one clear error" of bad input.
fn one_error(stderr: &str) -> &str {
    assert!(!stderr.contains("panicked"), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    errors[0]
}

fn nat(ns: &Netns, tool: &str) -> String {
    ns.save(tool, &["-t", "nat"])
}

#[test]
fn golden_rules_on_both_backends_and_twice_is_identical() {
    let bless = std::env::var_os("SVIDCAR_BLESS").is_some();
    for backend in ["legacy", "nft"] {
        let ns = Netns::new();
        let cfg = golden_config();
        let log = ns.redirect_ok(&["--config", &cfg, "--backend", backend]);
        assert!(
            log.contains(&format!(
                "iptables backend {backend}: chosen with --backend"
            )),
            "{log}"
        );
        for (tool, file) in [
            ("iptables", "redirect-ipv4.rules"),
            ("ip6tables", "redirect-ipv6.rules"),
        ] {
            let saved = nat(&ns, &format!("{tool}-{backend}-save"));
            if bless {
                std::fs::write(golden(file), &saved).unwrap();
            }
            let want = std::fs::read_to_string(golden(file)).unwrap();
            assert_eq!(saved, want, "{tool}-{backend}-save -t nat vs {file}");
            assert!(
                saved.lines().all(|l| !l.starts_with("-A")
                    || l.contains("-m comment --comment \"svidcar: ")),
                "every rule names svidcar:\n{saved}"
            );
        }
        // The other backend was not touched.
        let other = if backend == "nft" { "legacy" } else { "nft" };
        assert!(!ns
            .save(&format!("iptables-{other}-save"), &[])
            .contains("SVIDCAR"));
        // Again: byte-identical, in every table of both families.
        let before = ns.all_saves();
        ns.redirect_ok(&["--config", &cfg, "--backend", backend]);
        assert_eq!(ns.all_saves(), before, "second run changed the rules");
        // Cleanup leaves nothing of svidcar's, in either family.
        ns.redirect_ok(&["--cleanup"]);
        let after = ns.all_saves();
        assert!(!after.contains("SVIDCAR"), "{after}");
    }
}

#[test]
fn foreign_rules_survive_apply_and_cleanup() {
    for backend in ["legacy", "nft"] {
        let ns = Netns::new();
        for tool in ["iptables", "ip6tables"] {
            ns.ok(&[
                &format!("{tool}-{backend}"),
                "-t",
                "nat",
                "-A",
                "OUTPUT",
                "-p",
                "udp",
                "-m",
                "comment",
                "--comment",
                "someone else",
                "-j",
                "RETURN",
            ]);
        }
        let foreign = "-A OUTPUT -p udp -m comment --comment \"someone else\" -j RETURN";
        let fresh = ns.all_saves();
        let cfg = golden_config();
        ns.redirect_ok(&["--config", &cfg, "--backend", backend]);
        for (tool, file) in [
            ("iptables", "redirect-ipv4.rules"),
            ("ip6tables", "redirect-ipv6.rules"),
        ] {
            // The golden rules, with the foreign rule kept in front of svidcar's hook.
            let want = std::fs::read_to_string(golden(file)).unwrap().replace(
                "-A OUTPUT -p tcp -m comment --comment \"svidcar: outbound hook\"",
                &format!(
                    "{foreign}\n-A OUTPUT -p tcp -m comment --comment \"svidcar: outbound hook\""
                ),
            );
            assert_eq!(nat(&ns, &format!("{tool}-{backend}-save")), want);
        }
        let applied = ns.all_saves();
        ns.redirect_ok(&["--config", &cfg, "--backend", backend]);
        assert_eq!(ns.all_saves(), applied, "second run changed the rules");
        ns.redirect_ok(&["--cleanup"]);
        assert_eq!(
            ns.all_saves(),
            fresh,
            "cleanup must restore the table as it was"
        );
        assert!(fresh.matches(foreign).count() == 2, "{fresh}");
    }
}

#[test]
fn dry_run_prints_both_families_and_changes_nothing() {
    let ns = Netns::new();
    let cfg = golden_config();
    let before = ns.all_saves();
    let (ok, out, err) = ns.redirect(&["--config", &cfg, "--dry-run"]);
    assert!(ok, "{err}");
    let v4 = out.find("# svidcar redirect --dry-run: IPv4 rules for iptables-nft-restore");
    let v6 = out.find("# svidcar redirect --dry-run: IPv6 rules for ip6tables-nft-restore");
    assert!(v4.is_some() && v6.is_some() && v4 < v6, "{out}");
    for line in std::fs::read_to_string(golden("redirect-ipv4.rules"))
        .unwrap()
        .lines()
        .chain(
            std::fs::read_to_string(golden("redirect-ipv6.rules"))
                .unwrap()
                .lines(),
        )
        .filter(|l| l.starts_with("-A"))
    {
        assert!(out.contains(line), "dry run lacks {line}:\n{out}");
    }
    assert!(err.contains("dry run: nothing was applied"), "{err}");
    assert_eq!(ns.all_saves(), before, "--dry-run changed the tables");
    // The legacy tables were not even created (that would prime the next detection).
    assert_eq!(ns.save("iptables-legacy-save", &[]), "");

    // With rules in place, a dry run shows the hooks it would replace; still no change.
    ns.redirect_ok(&["--config", &cfg]);
    let applied = ns.all_saves();
    let (ok, out, err) = ns.redirect(&["--config", &cfg, "--dry-run"]);
    assert!(ok, "{err}");
    assert!(
        out.contains(
            "-D OUTPUT -p tcp -m comment --comment \"svidcar: outbound hook\" -j SVIDCAR_OUTPUT"
        ),
        "{out}"
    );
    let (ok, out, err) = ns.redirect(&["--cleanup", "--dry-run"]);
    assert!(ok, "{err}");
    assert!(out.contains("-X SVIDCAR_OUTPUT"), "{out}");
    assert_eq!(ns.all_saves(), applied, "--dry-run changed the tables");
}

#[test]
fn detection_picks_legacy_only_when_legacy_holds_rules() {
    let cfg = golden_config();

    let legacy = Netns::new();
    legacy.ok(&[
        "iptables-legacy",
        "-t",
        "filter",
        "-A",
        "INPUT",
        "-p",
        "255",
        "-j",
        "RETURN",
    ]);
    let log = legacy.redirect_ok(&["--config", &cfg]);
    let line =
        "iptables backend legacy: iptables-legacy-save lists 1 rule in this network namespace";
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("iptables backend"))
            .count(),
        1,
        "{log}"
    );
    assert!(log.contains(line), "{log}");
    assert!(nat(&legacy, "iptables-legacy-save").contains("SVIDCAR_OUTPUT"));
    assert!(nat(&legacy, "ip6tables-legacy-save").contains("SVIDCAR_OUTPUT"));
    assert!(!legacy.save("iptables-nft-save", &[]).contains("SVIDCAR"));
    assert!(!legacy.save("ip6tables-nft-save", &[]).contains("SVIDCAR"));
    // Cleanup finds them on legacy without being told.
    let log = legacy.redirect_ok(&["--cleanup"]);
    assert!(
        log.contains("removed svidcar's rules and chains: IPv4 (legacy), IPv6 (legacy)"),
        "{log}"
    );
    assert!(!legacy.all_saves().contains("SVIDCAR"));

    let fresh = Netns::new();
    for _ in 0..2 {
        // Twice: the first run must not make the second one see legacy "in use".
        let log = fresh.redirect_ok(&["--config", &cfg]);
        assert!(
            log.contains("iptables backend nft: no legacy rules in this network namespace"),
            "{log}"
        );
        assert!(nat(&fresh, "iptables-nft-save").contains("SVIDCAR_OUTPUT"));
        assert!(nat(&fresh, "ip6tables-nft-save").contains("SVIDCAR_OUTPUT"));
        assert_eq!(fresh.save("iptables-legacy-save", &[]), "");
        assert_eq!(fresh.save("ip6tables-legacy-save", &[]), "");
    }
    // Nothing left to clean: success.
    fresh.redirect_ok(&["--cleanup"]);
    let log = fresh.redirect_ok(&["--cleanup"]);
    assert!(log.contains("nothing to clean up"), "{log}");
}

/// Bad input: one clear error, non-zero exit, and no SVIDCAR chain anywhere.
#[test]
fn bad_input_is_one_clear_error_and_applies_nothing() {
    let cfg = golden_config();
    let ns = Netns::new();
    let check = |args: &[&str], env_path: Option<&str>, expect: &[&str]| {
        let (ok, _, err) = match env_path {
            Some(p) => {
                let path = format!("PATH={p}");
                let mut all = vec!["env", path.as_str(), BIN, "redirect"];
                all.extend_from_slice(args);
                let out = ns.output(&all);
                (
                    out.status.success(),
                    String::new(),
                    String::from_utf8_lossy(&out.stderr).into_owned(),
                )
            }
            None => ns.redirect(args),
        };
        assert!(!ok, "{args:?} succeeded: {err}");
        let line = one_error(&err).to_string();
        // clap puts the allowed values on the line after its one `error:` line.
        let line = if err.contains("For more information, try '--help'") {
            err.clone()
        } else {
            line
        };
        for e in expect {
            assert!(line.contains(e), "{args:?}: {e:?} not in\n{err}");
        }
        assert!(!ns.all_saves().contains("SVIDCAR"), "{args:?} left rules");
    };

    check(
        &["--config", &cfg, "--backend", "ebpf"],
        None,
        &[
            "invalid value 'ebpf' for '--backend",
            "[possible values: legacy, nft]",
        ],
    );
    let empty = tempfile::tempdir().unwrap();
    let empty_path = empty.path().to_string_lossy().into_owned();
    check(
        &["--config", &cfg],
        Some(&empty_path),
        &[
            "iptables-nft-restore",
            "ip6tables-nft-save",
            "not found in PATH",
            "install iptables",
        ],
    );
    check(
        &["--config", &cfg, "--backend", "legacy"],
        Some(&empty_path),
        &["iptables-legacy-restore", "not found in PATH"],
    );
    check(
        &["--cleanup"],
        Some(&empty_path),
        &["iptables-nft-save", "not found in PATH"],
    );
    let (_d1, port) = config(&transparent(
        "[::]:15006",
        "    exclude_ports: [22, 70000]\n",
        "",
    ));
    check(
        &["--config", &port],
        None,
        &["transparent.inbound.exclude_ports", "70000"],
    );
    let (_d2, cidr) = config(&transparent(
        "[::]:15006",
        "",
        "    exclude_cidrs: [\"10.0.0.0/8\", \"10.0.0.0/33\"]\n",
    ));
    check(
        &["--config", &cidr],
        None,
        &["transparent.outbound.exclude_cidrs[1]", "10.0.0.0/33"],
    );
    let (_d3, none) = config(&format!(
        "{IDENTITY}inbound:\n  - name: app\n    listen: 127.0.0.1:9443\n    forward: 127.0.0.1:8080\n    allow: [{{trust_domain: example.org}}]\n"
    ));
    check(&["--config", &none], None, &["no `transparent` section"]);

    // Not root: the tools' refusal, with what to do about it.
    let (_d4, good) = config(&transparent("[::]:15006", "", ""));
    let out = ns.output(&[
        "setpriv",
        "--reuid",
        "1000",
        "--regid",
        "1000",
        "--clear-groups",
        BIN,
        "redirect",
        "--config",
        &good,
    ]);
    let err2 = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err2}");
    let line = one_error(&err2);
    assert!(line.contains("must run as root"), "{err2}");
    assert!(!ns.all_saves().contains("SVIDCAR"));
}

/// All or nothing across families: when the IPv6 transaction fails (here another
/// tool's IPv6 chain jumps into a chain svidcar would delete), the IPv4 rules that
/// were already applied are removed again.
#[test]
fn a_failing_ipv6_apply_leaves_no_ipv4_rules() {
    let ns = Netns::new();
    for args in [
        &["-N", "SVIDCAR_IN_REDIRECT"][..],
        &["-N", "OTHER"],
        &["-A", "OTHER", "-j", "SVIDCAR_IN_REDIRECT"],
    ] {
        let mut all = vec!["ip6tables-nft", "-t", "nat"];
        all.extend_from_slice(args);
        ns.ok(&all);
    }
    let v6_before = ns.save("ip6tables-nft-save", &[]);
    // IPv4-only inbound: the IPv6 rules need no SVIDCAR_IN_REDIRECT, so svidcar
    // deletes it, which the other tool's jump forbids.
    let (_d, cfg) = config(&transparent("0.0.0.0:15006", "", ""));
    let (ok, _, err) = ns.redirect(&["--config", &cfg]);
    assert!(!ok, "{err}");
    let line = one_error(&err);
    assert!(
        line.contains("IPv6 rules not applied (nft backend)")
            && line.contains("the IPv4 rules were removed again, so nothing is half-applied"),
        "{err}"
    );
    assert!(
        err.contains("takes IPv4 only: no IPv6 inbound capture"),
        "{err}"
    );
    assert!(!ns.save("iptables-nft-save", &[]).contains("SVIDCAR"));
    assert_eq!(ns.save("ip6tables-nft-save", &[]), v6_before);
}

/// A long-running root python in a namespace that answers every connection on each
/// `tag@host@port` with "tag orig=<original destination>" (SO_ORIGINAL_DST).
const SERVER: &str = r#"
import selectors, socket, struct, sys
sel = selectors.DefaultSelector()
for spec in sys.argv[1:]:
    tag, host, port = spec.split('@')
    fam = socket.AF_INET6 if ':' in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if fam == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind((host, int(port)))
    s.listen(64)
    sel.register(s, selectors.EVENT_READ, tag)
print('ready', flush=True)
def orig(c):
    local = c.getsockname()[0]
    try:
        if c.family == socket.AF_INET or local.startswith('::ffff:'):
            b = c.getsockopt(socket.SOL_IP, 80, 16)
            return '%s:%d' % (socket.inet_ntop(socket.AF_INET, b[4:8]), struct.unpack('!H', b[2:4])[0])
        b = c.getsockopt(41, 80, 28)
        return '[%s]:%d' % (socket.inet_ntop(socket.AF_INET6, b[8:24]), struct.unpack('!H', b[2:4])[0])
    except OSError as e:
        return 'none'
while True:
    for key, _ in sel.select():
        c, _ = key.fileobj.accept()
        c.sendall(('%s orig=%s\n' % (key.data, orig(c))).encode())
        c.close()
"#;

/// Connects to argv[1]:argv[2] and prints the first line it gets, or the error.
const CLIENT: &str = r#"
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
    print(s.makefile().readline().strip())
except OSError as e:
    print('error: %s' % e)
"#;

/// A server from [`SERVER`], killed on drop.
struct Server(Child);

impl Server {
    fn start(ns: &Netns, specs: &[String]) -> Self {
        let mut args = vec![PY, "-c", SERVER];
        args.extend(specs.iter().map(String::as_str));
        let mut child = ns
            .cmd(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let server = Self(child);
        assert_eq!(line.trim(), "ready", "server {specs:?} did not start");
        server
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What a client run as `uid` (root when None) in `ns` gets from `host:port`.
fn client(ns: &Netns, uid: Option<u32>, host: &str, port: u16) -> String {
    let port = port.to_string();
    let mut args: Vec<String> = Vec::new();
    if let Some(u) = uid {
        args.extend([
            "setpriv".into(),
            format!("--reuid={u}"),
            format!("--regid={u}"),
            "--clear-groups".into(),
        ]);
    }
    args.extend([PY.into(), "-c".into(), CLIENT.into(), host.into(), port]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ns.ok(&args).trim().to_string()
}

/// Two namespaces joined by a veth: A runs `svidcar redirect` (inbound to 15006,
/// outbound to 15001, proxy uid 1337) with stand-in listeners on those ports; B is
/// a peer with a server on 8080.
fn redirected_traffic_lands_on_the_listeners(backend: &str) {
    let x = (std::process::id() % 200 + 10) as u8;
    let a = Netns::new();
    let b = Netns::new();
    a.ok(&[
        "ip", "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", &b.name,
    ]);
    let (a4, b4) = (format!("10.209.{x}.1"), format!("10.209.{x}.2"));
    let (a6, b6) = (format!("fd09:{x}::1"), format!("fd09:{x}::2"));
    for (ns, dev, v4, v6) in [(&a, "va", &a4, &a6), (&b, "vb", &b4, &b6)] {
        ns.ok(&["ip", "addr", "add", &format!("{v4}/24"), "dev", dev]);
        ns.ok(&[
            "ip",
            "addr",
            "add",
            &format!("{v6}/64"),
            "dev",
            dev,
            "nodad",
        ]);
        ns.ok(&["ip", "link", "set", dev, "up"]);
    }
    let (_dir, cfg) = config(&transparent("[::]:15006", "    exclude_ports: [22]\n", ""));
    a.redirect_ok(&["--config", &cfg, "--backend", backend]);
    let _peer = Server::start(&b, &["B@::@8080".into()]);
    let _listeners = Server::start(
        &a,
        &[
            "A-inbound@::@15006".into(),
            "A-outbound@127.0.0.1@15001".into(),
            "A-outbound@::1@15001".into(),
            "A-app@::@22".into(),
        ],
    );

    for (a_ip, b_ip, a_orig, b_orig) in [
        (&a4, &b4, format!("{a4}:8080"), format!("{b4}:8080")),
        (&a6, &b6, format!("[{a6}]:8080"), format!("[{b6}]:8080")),
    ] {
        // Inbound: a peer's connection to the pod's port 8080 reaches the inbound
        // listener, which can read where it was going.
        assert_eq!(
            client(&b, None, a_ip, 8080),
            format!("A-inbound orig={a_orig}")
        );
        // An excluded port is not redirected.
        assert!(client(&b, None, a_ip, 22).starts_with("A-app "));
        // Outbound: the app (uid 1000) calling the peer lands on the outbound listener.
        assert_eq!(
            client(&a, Some(1000), b_ip, 8080),
            format!("A-outbound orig={b_orig}")
        );
        // The proxy uid goes out as it is: it reaches the peer itself.
        assert!(client(&a, Some(1337), b_ip, 8080).starts_with("B "));
        // Except to its own pod's address (hairpin): that is a peer arriving.
        assert_eq!(
            client(&a, Some(1337), a_ip, 8080),
            format!("A-inbound orig={a_orig}")
        );
        // Nor is the app's own traffic to loopback redirected.
        assert!(client(
            &a,
            Some(1000),
            if a_ip == &a4 { "127.0.0.1" } else { "::1" },
            22
        )
        .starts_with("A-app "));
    }
}

#[test]
fn redirected_traffic_lands_on_the_listeners_nft() {
    redirected_traffic_lands_on_the_listeners("nft");
}

#[test]
fn redirected_traffic_lands_on_the_listeners_legacy() {
    redirected_traffic_lands_on_the_listeners("legacy");
}

/// A changed config replaces the rules of the old one: chains it no longer needs go.
#[test]
fn a_changed_config_replaces_the_old_rules() {
    let ns = Netns::new();
    ns.redirect_ok(&["--config", &golden_config()]);
    let outbound_only = format!(
        "{IDENTITY}transparent:\n  proxy_uid: 1337\n  outbound:\n    listen: \"127.0.0.1:15001\"\n    routes: []\n"
    );
    let (_d, cfg) = config(&outbound_only);
    ns.redirect_ok(&["--config", &cfg]);
    for tool in ["iptables-nft-save", "ip6tables-nft-save"] {
        let saved = nat(&ns, tool);
        assert!(!saved.contains("SVIDCAR_IN"), "{tool}:\n{saved}");
        assert!(!saved.contains("-A PREROUTING"), "{tool}:\n{saved}");
        assert!(!saved.contains("--dport 22 "), "{tool}:\n{saved}");
        assert_eq!(
            saved.matches("-j SVIDCAR_OUTPUT").count(),
            1,
            "{tool}:\n{saved}"
        );
        assert!(
            saved.contains("-j REDIRECT --to-ports 15001"),
            "{tool}:\n{saved}"
        );
    }
    // And back: exactly the golden rules again.
    ns.redirect_ok(&["--config", &golden_config()]);
    assert_eq!(
        nat(&ns, "iptables-nft-save"),
        std::fs::read_to_string(golden("redirect-ipv4.rules")).unwrap()
    );
}
