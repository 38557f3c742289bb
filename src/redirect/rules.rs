//! Rule generation: one description of the redirect rules, rendered per address
//! family (IPv4 for `iptables`, IPv6 for `ip6tables`) in the exact canonical form
//! `iptables-save` prints, so that what svidcar writes, what `-save` shows and the
//! golden files are the same text. Also the `iptables-restore --noflush` inputs that
//! apply the rules idempotently and remove them again. Pure text: nothing here runs
//! a command.

use std::fmt::Write as _;
use std::net::SocketAddr;

use ipnet::IpNet;

use crate::config::RedirectSpec;

/// Chain that PREROUTING jumps to: inbound TCP, before the exclusions.
pub const INBOUND: &str = "SVIDCAR_INBOUND";
/// Chain holding the one REDIRECT to the inbound listener (also the hairpin's target).
pub const IN_REDIRECT: &str = "SVIDCAR_IN_REDIRECT";
/// Chain that OUTPUT jumps to: locally generated TCP, before the exclusions.
pub const OUTPUT: &str = "SVIDCAR_OUTPUT";
/// Chain holding the one REDIRECT to the outbound listener.
pub const REDIRECT: &str = "SVIDCAR_REDIRECT";

/// All chains svidcar may create, in the order `-save` lists them (by name, ASCII).
/// Every apply and cleanup declares all four, so chains an older config made are
/// flushed (and deleted when unused) too.
pub const CHAINS: [&str; 4] = [INBOUND, IN_REDIRECT, OUTPUT, REDIRECT];

/// What every chain and rule svidcar owns has in its name or comment.
pub const MARK: &str = "SVIDCAR_";

/// The nat table's built-in chains as `-save` declares them (counters normalised).
const BUILTIN: [&str; 4] = [
    ":PREROUTING ACCEPT [0:0]",
    ":INPUT ACCEPT [0:0]",
    ":OUTPUT ACCEPT [0:0]",
    ":POSTROUTING ACCEPT [0:0]",
];

/// An address family: which tool writes it and how it spells loopback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    /// `iptables` or `ip6tables`: the prefix of every binary for this family.
    pub fn tool(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    /// For messages: `IPv4`, `IPv6`.
    pub fn label(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }

    /// The loopback host route as `-save` prints it (the prefix length is always there).
    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.1/32",
            Family::V6 => "::1/128",
        }
    }

    fn holds(self, net: &IpNet) -> bool {
        matches!(
            (self, net),
            (Family::V4, IpNet::V4(_)) | (Family::V6, IpNet::V6(_))
        )
    }
}

/// The families an inbound listener on `listen` can accept redirected connections
/// in: an IPv4 address takes only IPv4; `[::]` is dual-stack; any other IPv6
/// address (but a v4-mapped one) takes only IPv6. Capturing a family the listener
/// cannot take would turn every such connection into "connection refused".
pub fn inbound_families(listen: SocketAddr) -> (bool, bool) {
    match listen {
        SocketAddr::V4(_) => (true, false),
        SocketAddr::V6(a) if a.ip().is_unspecified() => (true, true),
        SocketAddr::V6(a) if a.ip().to_ipv4_mapped().is_some() => (true, false),
        SocketAddr::V6(_) => (false, true),
    }
}

/// The rules of one family, in the order `-save` lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    pub family: Family,
    /// The chains this family uses, in `-save` order.
    pub chains: Vec<&'static str>,
    /// The `-A PREROUTING`/`-A OUTPUT` rules that jump into svidcar's chains.
    pub hooks: Vec<String>,
    /// The rules of svidcar's own chains, chain by chain in `-save` order.
    pub rules: Vec<String>,
}

/// Builds the rules of one family from the spec. `inbound` says whether this family's
/// inbound traffic is captured (see [`inbound_families`]); outbound is captured in
/// both families when the spec has an outbound section (svidcar listens on
/// `127.0.0.1` and `[::1]`: OUTPUT REDIRECT sends to the family's loopback address).
pub fn rules(spec: &RedirectSpec, family: Family, inbound: bool) -> Rules {
    let inbound = spec.inbound.as_ref().filter(|_| inbound);
    let mut hooks = Vec::new();
    let mut chains = Vec::new();
    let mut rules = Vec::new();
    let rule = |chain: &str, matches: &str, comment: &str, target: &str| {
        format!("-A {chain} {matches} -m comment --comment \"svidcar: {comment}\" -j {target}")
    };
    // Ports never redirected in a direction: svidcar's own first (a peer reaching
    // the admin or SDS port, or a listener directly, must not be looped into a
    // listener), then the configured exclusions.
    let port_returns = |chain: &str, dir: &str, excluded: &[u16]| -> Vec<String> {
        let own = spec.own_ports.iter().map(|p| (*p, "own port"));
        let excl = excluded
            .iter()
            .filter(|p| !spec.own_ports.contains(p))
            .map(|p| (*p, "excluded port"));
        let mut all: Vec<(u16, &str)> = own.chain(excl).collect();
        all.sort_unstable();
        all.into_iter()
            .map(|(p, why)| {
                rule(
                    chain,
                    &format!("-p tcp -m tcp --dport {p}"),
                    &format!("{dir}: {why} {p}"),
                    "RETURN",
                )
            })
            .collect()
    };

    if let Some(i) = inbound {
        hooks.push(rule("PREROUTING", "-p tcp", "inbound hook", INBOUND));
        chains.extend([INBOUND, IN_REDIRECT]);
        rules.extend(port_returns(INBOUND, "inbound", &i.exclude_ports));
        if i.include_ports.is_empty() {
            rules.push(rule(INBOUND, "-p tcp", "inbound capture", IN_REDIRECT));
        } else {
            // Only the listed ports (exclusions above still win); others reach the pod
            // as they are.
            for p in &i.include_ports {
                rules.push(rule(
                    INBOUND,
                    &format!("-p tcp -m tcp --dport {p}"),
                    &format!("inbound capture port {p}"),
                    IN_REDIRECT,
                ));
            }
        }
        rules.push(rule(
            IN_REDIRECT,
            "-p tcp",
            "to inbound listener",
            &format!("REDIRECT --to-ports {}", i.port),
        ));
    }
    if let Some(o) = &spec.outbound {
        let (uid, gid, lo) = (spec.proxy_uid, spec.proxy_gid, family.loopback());
        hooks.push(rule("OUTPUT", "-p tcp", "outbound hook", OUTPUT));
        chains.extend([OUTPUT, REDIRECT]);
        rules.extend(port_returns(OUTPUT, "outbound", &o.exclude_ports));
        if inbound.is_some() {
            // svidcar connecting to its own pod's address (a service address that
            // resolved to this pod) leaves over lo: treat it as a peer arriving.
            rules.push(rule(
                OUTPUT,
                &format!("! -d {lo} -o lo -p tcp -m owner --uid-owner {uid}"),
                "proxy to own pod address goes inbound",
                IN_REDIRECT,
            ));
        }
        // The app talking to itself over loopback stays plain: it never leaves the pod.
        rules.push(rule(
            OUTPUT,
            &format!("-o lo -m owner ! --uid-owner {uid}"),
            "app loopback not redirected",
            "RETURN",
        ));
        // The loop breaker: svidcar's own upstream connections go out as they are.
        rules.push(rule(
            OUTPUT,
            &format!("-m owner --uid-owner {uid}"),
            "proxy uid not redirected",
            "RETURN",
        ));
        rules.push(rule(
            OUTPUT,
            &format!("-m owner --gid-owner {gid}"),
            "proxy gid not redirected",
            "RETURN",
        ));
        rules.push(rule(
            OUTPUT,
            &format!("-d {lo}"),
            "localhost not redirected",
            "RETURN",
        ));
        for net in o.exclude_cidrs.iter().filter(|n| family.holds(n)) {
            rules.push(rule(
                OUTPUT,
                &format!("-d {net}"),
                &format!("excluded cidr {net}"),
                "RETURN",
            ));
        }
        rules.push(rule(OUTPUT, "-p tcp", "outbound capture", REDIRECT));
        rules.push(rule(
            REDIRECT,
            "-p tcp",
            "to outbound listener",
            &format!("REDIRECT --to-ports {}", o.port),
        ));
    }
    // `-save` lists rules chain by chain, user chains by name.
    rules.sort_by_key(|r| chain_of(r).map(|c| CHAINS.iter().position(|x| *x == c)));
    Rules {
        family,
        chains,
        hooks,
        rules,
    }
}

/// The chain an `-A CHAIN …` line appends to.
fn chain_of(line: &str) -> Option<&str> {
    line.strip_prefix("-A ")?.split(' ').next()
}

/// The `*nat` section of an `iptables-save` dump (without `*nat` and `COMMIT`),
/// empty when the table is not there.
pub fn nat_section(save: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut inside = false;
    for line in save.lines() {
        if line.starts_with('*') {
            inside = line == "*nat";
        } else if line == "COMMIT" {
            inside = false;
        } else if inside {
            out.push(line.to_string());
        }
    }
    out
}

/// The hook rules that jump from a built-in chain into one of svidcar's, as the
/// nat section lists them: each must be deleted (`-D` with the same text) before its
/// target chain can be flushed and deleted, or re-added. Only built-in chains: a
/// jump from another tool's chain is that tool's rule, and stays (a cleanup then
/// fails, saying the chain is in use, rather than editing someone else's chain).
pub fn hooks_in(nat: &[String]) -> Vec<&str> {
    const HOOKED: [&str; 4] = ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"];
    nat.iter()
        .map(String::as_str)
        .filter(|l| {
            chain_of(l).is_some_and(|c| HOOKED.contains(&c))
                && l.split(' ')
                    .collect::<Vec<_>>()
                    .windows(2)
                    .any(|w| w[0] == "-j" && w[1].starts_with(MARK))
        })
        .collect()
}

/// Whether a nat section holds anything of svidcar's (a chain or a jump to one).
pub fn has_svidcar(nat: &[String]) -> bool {
    nat.iter().any(|l| l.contains(MARK))
}

impl Rules {
    /// The input for `<tool>-restore --noflush` that makes the nat table hold exactly
    /// these rules, given the table now (`nat`, from `-save`): declare the four chains
    /// (which creates or flushes them), delete the hooks that are there, append the
    /// rules and the hooks, delete the chains this config does not use. One
    /// transaction: it applies entirely or not at all, and running it again yields
    /// the same table, with rules of other tools untouched.
    pub fn restore_input(&self, nat: &[String]) -> String {
        let mut s = String::from("*nat\n");
        for c in CHAINS {
            let _ = writeln!(s, ":{c} - [0:0]");
        }
        for h in hooks_in(nat) {
            let _ = writeln!(s, "-D{}", &h[2..]);
        }
        for r in self.rules.iter().chain(&self.hooks) {
            let _ = writeln!(s, "{r}");
        }
        for c in CHAINS.iter().filter(|c| !self.chains.contains(c)) {
            let _ = writeln!(s, "-X {c}");
        }
        s.push_str("COMMIT\n");
        s
    }

    /// What `<tool>-save -t nat` prints for a nat table that held nothing before,
    /// without the `#` lines and with counters at `[0:0]`: the golden files.
    pub fn save_form(&self) -> String {
        let mut s = String::from("*nat\n");
        for b in BUILTIN {
            let _ = writeln!(s, "{b}");
        }
        for c in &self.chains {
            let _ = writeln!(s, ":{c} - [0:0]");
        }
        for r in self.hooks.iter().chain(&self.rules) {
            let _ = writeln!(s, "{r}");
        }
        s.push_str("COMMIT\n");
        s
    }
}

/// The input for `<tool>-restore --noflush` that removes everything svidcar made
/// from the nat table as it is now: delete the hooks, then declare (creating or
/// flushing) and delete the four chains. Succeeds whether they exist or not, and
/// leaves every other rule in place.
pub fn cleanup_input(nat: &[String]) -> String {
    let mut s = String::from("*nat\n");
    for h in hooks_in(nat) {
        let _ = writeln!(s, "-D{}", &h[2..]);
    }
    for c in CHAINS {
        let _ = writeln!(s, ":{c} - [0:0]");
    }
    for c in CHAINS {
        let _ = writeln!(s, "-X {c}");
    }
    s.push_str("COMMIT\n");
    s
}

/// A save dump made comparable: `#` lines dropped, every `[packets:bytes]` counter
/// set to `[0:0]` (legacy counts traffic on the built-in chains).
pub fn normalise(save: &str) -> String {
    let mut out = String::new();
    for line in save.lines().filter(|l| !l.starts_with('#')) {
        match (line.starts_with(':'), line.rfind(" [")) {
            (true, Some(i)) if line.ends_with(']') => {
                let _ = writeln!(out, "{} [0:0]", &line[..i]);
            }
            _ => {
                let _ = writeln!(out, "{line}");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// The config the golden files are made from (tests/redirect.rs uses the same).
    const GOLDEN_CONFIG: &str = include_str!("../../tests/golden/redirect.yaml");

    fn spec(yaml: &str) -> (RedirectSpec, Option<SocketAddr>) {
        let c = Config::parse(yaml).unwrap();
        let listen = c
            .listeners
            .iter()
            .find(|l| matches!(l.kind, crate::config::ListenerKind::TransparentInbound(_)))
            .map(|l| l.listen);
        (c.redirect.unwrap(), listen)
    }

    fn both(yaml: &str) -> (Rules, Rules) {
        let (s, listen) = spec(yaml);
        let (v4, v6) = listen.map(inbound_families).unwrap_or((false, false));
        (rules(&s, Family::V4, v4), rules(&s, Family::V6, v6))
    }

    const MINIMAL: &str = "identity:\n  dev: {spiffe_id: \"spiffe://example.org/w\"}\ntransparent:\n  proxy_uid: 1337\n";
    const IN_SECTION: &str =
        "  inbound:\n    listen: \"[::]:15006\"\n    allow: [{trust_domain: example.org}]\n";
    const OUT_SECTION: &str = "  outbound:\n    listen: \"127.0.0.1:15001\"\n    routes: []\n";

    #[test]
    fn the_golden_config_renders_the_golden_files() {
        let (v4, v6) = both(GOLDEN_CONFIG);
        assert_eq!(
            v4.save_form(),
            include_str!("../../tests/golden/redirect-ipv4.rules")
        );
        assert_eq!(
            v6.save_form(),
            include_str!("../../tests/golden/redirect-ipv6.rules")
        );
    }

    #[test]
    fn a_sample_spec_in_both_families() {
        let yaml = format!(
            "{MINIMAL}  proxy_gid: 2000\n{IN_SECTION}    exclude_ports: [22, 15006]\n{OUT_SECTION}    exclude_ports: [53]\n    exclude_cidrs: [\"10.96.0.0/12\", \"169.254.169.254\", \"fd96::/64\"]\nadmin: {{listen: \"127.0.0.1:15000\"}}\n"
        );
        let (v4, v6) = both(&yaml);
        let expect_v4 = [
            "-A SVIDCAR_INBOUND -p tcp -m tcp --dport 22 -m comment --comment \"svidcar: inbound: excluded port 22\" -j RETURN",
            "-A SVIDCAR_INBOUND -p tcp -m tcp --dport 15000 -m comment --comment \"svidcar: inbound: own port 15000\" -j RETURN",
            "-A SVIDCAR_INBOUND -p tcp -m tcp --dport 15001 -m comment --comment \"svidcar: inbound: own port 15001\" -j RETURN",
            "-A SVIDCAR_INBOUND -p tcp -m tcp --dport 15006 -m comment --comment \"svidcar: inbound: own port 15006\" -j RETURN",
            "-A SVIDCAR_INBOUND -p tcp -m comment --comment \"svidcar: inbound capture\" -j SVIDCAR_IN_REDIRECT",
            "-A SVIDCAR_IN_REDIRECT -p tcp -m comment --comment \"svidcar: to inbound listener\" -j REDIRECT --to-ports 15006",
            "-A SVIDCAR_OUTPUT -p tcp -m tcp --dport 53 -m comment --comment \"svidcar: outbound: excluded port 53\" -j RETURN",
            "-A SVIDCAR_OUTPUT -p tcp -m tcp --dport 15000 -m comment --comment \"svidcar: outbound: own port 15000\" -j RETURN",
            "-A SVIDCAR_OUTPUT -p tcp -m tcp --dport 15001 -m comment --comment \"svidcar: outbound: own port 15001\" -j RETURN",
            "-A SVIDCAR_OUTPUT -p tcp -m tcp --dport 15006 -m comment --comment \"svidcar: outbound: own port 15006\" -j RETURN",
            "-A SVIDCAR_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m owner --uid-owner 1337 -m comment --comment \"svidcar: proxy to own pod address goes inbound\" -j SVIDCAR_IN_REDIRECT",
            "-A SVIDCAR_OUTPUT -o lo -m owner ! --uid-owner 1337 -m comment --comment \"svidcar: app loopback not redirected\" -j RETURN",
            "-A SVIDCAR_OUTPUT -m owner --uid-owner 1337 -m comment --comment \"svidcar: proxy uid not redirected\" -j RETURN",
            "-A SVIDCAR_OUTPUT -m owner --gid-owner 2000 -m comment --comment \"svidcar: proxy gid not redirected\" -j RETURN",
            "-A SVIDCAR_OUTPUT -d 127.0.0.1/32 -m comment --comment \"svidcar: localhost not redirected\" -j RETURN",
            "-A SVIDCAR_OUTPUT -d 10.96.0.0/12 -m comment --comment \"svidcar: excluded cidr 10.96.0.0/12\" -j RETURN",
            "-A SVIDCAR_OUTPUT -d 169.254.169.254/32 -m comment --comment \"svidcar: excluded cidr 169.254.169.254/32\" -j RETURN",
            "-A SVIDCAR_OUTPUT -p tcp -m comment --comment \"svidcar: outbound capture\" -j SVIDCAR_REDIRECT",
            "-A SVIDCAR_REDIRECT -p tcp -m comment --comment \"svidcar: to outbound listener\" -j REDIRECT --to-ports 15001",
        ];
        assert_eq!(v4.rules, expect_v4);
        assert_eq!(
            v4.hooks,
            [
                "-A PREROUTING -p tcp -m comment --comment \"svidcar: inbound hook\" -j SVIDCAR_INBOUND",
                "-A OUTPUT -p tcp -m comment --comment \"svidcar: outbound hook\" -j SVIDCAR_OUTPUT",
            ]
        );
        assert_eq!(v4.chains, CHAINS);
        // IPv6: the same rules with the IPv6 loopback and only the IPv6 CIDR.
        let expect_v6: Vec<String> = expect_v4
            .iter()
            .filter(|r| !r.contains("169.254"))
            .map(|r| {
                r.replace("127.0.0.1/32", "::1/128")
                    .replace("10.96.0.0/12", "fd96::/64")
            })
            .collect();
        assert_eq!(v6.rules, expect_v6);
        assert_eq!(v6.hooks, v4.hooks);
    }

    #[test]
    fn include_ports_capture_only_those_ports_and_exclusions_still_win() {
        let (v4, _) = both(&format!(
            "{MINIMAL}{IN_SECTION}    include_ports: [8080, 22]\n    exclude_ports: [22]\n"
        ));
        let inbound: Vec<&String> = v4
            .rules
            .iter()
            .filter(|r| r.starts_with("-A SVIDCAR_INBOUND "))
            .collect();
        let excluded = inbound
            .iter()
            .position(|r| r.contains("excluded port 22"))
            .unwrap();
        let captured: Vec<usize> = inbound
            .iter()
            .enumerate()
            .filter(|(_, r)| r.ends_with("-j SVIDCAR_IN_REDIRECT"))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(captured.len(), 2, "{inbound:?}");
        assert!(captured.iter().all(|i| *i > excluded));
        assert!(inbound[captured[0]].contains("--dport 22 "));
        assert!(inbound[captured[1]].contains("--dport 8080 "));
        assert!(!inbound
            .iter()
            .any(|r| r.contains("\"svidcar: inbound capture\"")));
    }

    #[test]
    fn no_inbound_section_means_no_inbound_chains_or_hook() {
        let (v4, v6) = both(&format!("{MINIMAL}{OUT_SECTION}"));
        for r in [&v4, &v6] {
            assert_eq!(r.chains, [OUTPUT, REDIRECT]);
            assert_eq!(r.hooks.len(), 1);
            assert!(r.hooks[0].starts_with("-A OUTPUT "));
            assert!(!r.rules.iter().any(|l| l.contains("SVIDCAR_IN")), "{r:?}");
            assert!(!r.rules.iter().any(|l| l.contains("own pod address")));
            let input = r.restore_input(&[]);
            assert!(input.contains("-X SVIDCAR_INBOUND\n-X SVIDCAR_IN_REDIRECT\n"));
        }
    }

    #[test]
    fn no_outbound_section_means_no_outbound_chains_or_hook() {
        let (v4, v6) = both(&format!("{MINIMAL}{IN_SECTION}"));
        for r in [&v4, &v6] {
            assert_eq!(r.chains, [INBOUND, IN_REDIRECT]);
            assert_eq!(r.hooks.len(), 1);
            assert!(r.hooks[0].starts_with("-A PREROUTING "));
            assert!(!r.rules.iter().any(|l| l.contains("OUTPUT")));
        }
    }

    #[test]
    fn an_ipv4_only_inbound_listener_gets_no_ipv6_inbound_capture() {
        for listen in [
            "0.0.0.0:15006",
            "127.0.0.1:15006",
            "[::ffff:10.0.0.1]:15006",
        ] {
            let yaml = format!("{MINIMAL}{IN_SECTION}{OUT_SECTION}").replace("[::]:15006", listen);
            let (v4, v6) = both(&yaml);
            assert_eq!(v4.chains, CHAINS, "{listen}");
            assert_eq!(v6.chains, [OUTPUT, REDIRECT], "{listen}");
            // No hairpin into a chain that is not there; outbound capture stays.
            assert!(!v6.rules.iter().any(|l| l.contains("SVIDCAR_IN")));
            assert!(v6.rules.iter().any(|l| l.contains("outbound capture")));
        }
        let yaml = format!("{MINIMAL}{IN_SECTION}").replace("[::]:15006", "[fd00::5]:15006");
        let (v4, v6) = both(&yaml);
        assert!(v4.chains.is_empty() && v4.hooks.is_empty());
        assert_eq!(v6.chains, [INBOUND, IN_REDIRECT]);
    }

    #[test]
    fn restore_input_replaces_existing_hooks_and_keeps_foreign_rules() {
        let (v4, _) = both(GOLDEN_CONFIG);
        let save = format!(
            "# Generated by iptables-save v1.8.9\n*filter\n:INPUT ACCEPT [3:180]\n-A INPUT -j SVIDCAR_X\nCOMMIT\n{}# Completed\n",
            v4.save_form()
                .replace(
                    "COMMIT\n",
                    "-A OUTPUT -p udp -j RETURN\n-A FOREIGN -j SVIDCAR_OUTPUT\nCOMMIT\n"
                )
        );
        let nat = nat_section(&save);
        assert_eq!(hooks_in(&nat).len(), 2);
        let input = v4.restore_input(&nat);
        let lines: Vec<&str> = input.lines().collect();
        assert_eq!(lines[0], "*nat");
        assert_eq!(lines[1..5], CHAINS.map(|c| format!(":{c} - [0:0]")));
        assert_eq!(lines[5], v4.hooks[0].replacen("-A", "-D", 1));
        assert_eq!(lines[6], v4.hooks[1].replacen("-A", "-D", 1));
        assert!(!input.contains("udp"), "foreign rules are not touched");
        assert!(!input.contains("FOREIGN"), "nor jumps from foreign chains");
        assert!(!input.contains("-X"), "every chain is used");
        assert_eq!(*lines.last().unwrap(), "COMMIT");
        // Hooks go in last, after the chains they jump to are filled.
        assert_eq!(lines[lines.len() - 3..lines.len() - 1], v4.hooks);
    }

    #[test]
    fn cleanup_deletes_hooks_then_chains() {
        let (v4, _) = both(GOLDEN_CONFIG);
        let nat = nat_section(&v4.save_form());
        let input = cleanup_input(&nat);
        let lines: Vec<&str> = input.lines().collect();
        assert!(lines[1].starts_with("-D PREROUTING "));
        assert!(lines[2].starts_with("-D OUTPUT "));
        assert!(lines.contains(&"-X SVIDCAR_REDIRECT"));
        assert!(has_svidcar(&nat));
        assert!(!has_svidcar(&nat_section(
            "*nat\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"
        )));
        // Nothing there: still a valid input that changes nothing.
        assert_eq!(cleanup_input(&[]).matches("-D").count(), 0);
    }

    #[test]
    fn normalise_drops_comments_and_counters() {
        let save = "# Generated by iptables-save v1.8.9 on Mon\n*nat\n:OUTPUT ACCEPT [12:720]\n:SVIDCAR_OUTPUT - [0:0]\n-A OUTPUT -m comment --comment \"a [1:2]\" -j RETURN\nCOMMIT\n# Completed on Mon\n";
        assert_eq!(
            normalise(save),
            "*nat\n:OUTPUT ACCEPT [0:0]\n:SVIDCAR_OUTPUT - [0:0]\n-A OUTPUT -m comment --comment \"a [1:2]\" -j RETURN\nCOMMIT\n"
        );
    }
}
