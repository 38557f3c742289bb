//! Per-request authorization rules of an HTTP listener (`authorization:`), with Istio
//! AuthorizationPolicy semantics: any matching `DENY` rule refuses; otherwise, when
//! `ALLOW` rules exist, one of them must match; with no rules every request passes.
//! A rule matches when all the fields it has match. The rules are compiled once by
//! `config`; evaluating them reads the request and allocates nothing, because a
//! listener runs the whole list on every request.
//!
//! Paths are matched on the normalized path (`proxy::http::path`), query excluded, so
//! what a rule allowed is what the app receives.

pub use super::string_match::StrMatch;

/// What a matching rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
        }
    }
}

/// Which identity a rule's `principals` are matched against.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PrincipalSource {
    /// The SPIFFE ID of the peer's X509-SVID (mTLS).
    #[default]
    Peer,
    /// The SPIFFE ID (`sub`) of a validated JWT-SVID.
    Jwt,
}

/// One part of a compiled path template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum TemplatePart {
    /// Literal text, slashes included.
    Literal(String),
    /// `{*}`: exactly one non-empty segment.
    Segment,
    /// `{**}`: zero or more characters, `/` included (only as the last operator).
    Rest,
}

/// Istio's path templates (Envoy's URI templates): `/v1/users/{*}` and `/static/{**}`.
/// An operator fills a whole segment; `{**}` may only be the last operator, literal
/// text may follow it (`/a/{**}/edit`). Matching is what Envoy compiles them to (a full
/// regex match): `{*}` is one or more characters other than `/`, `{**}` zero or more
/// characters, `/` included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTemplate {
    parts: Vec<TemplatePart>,
}

impl PathTemplate {
    /// True when `text` uses a template operator (how Istio tells templates from globs).
    pub fn is_template(text: &str) -> bool {
        text.contains("{*}") || text.contains("{**}")
    }

    /// Compiles a template; the problem in words otherwise.
    pub fn parse(text: &str) -> Result<Self, String> {
        if !text.starts_with('/') {
            return Err(format!("template {text:?} must start with /"));
        }
        if text.contains("//") {
            // Normalized paths never hold `//`: such a template could never match.
            return Err(format!("template {text:?}: double slashes never match"));
        }
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut seen_rest = false;
        let segments: Vec<&str> = text.split('/').collect();
        for (i, seg) in segments.iter().enumerate() {
            if i > 0 {
                literal.push('/');
            }
            match *seg {
                "{*}" | "{**}" => {
                    if seen_rest {
                        return Err(format!(
                            "template {text:?}: {{**}} must be the last operator"
                        ));
                    }
                    if !literal.is_empty() {
                        parts.push(TemplatePart::Literal(std::mem::take(&mut literal)));
                    }
                    if *seg == "{**}" {
                        seen_rest = true;
                        parts.push(TemplatePart::Rest);
                    } else {
                        parts.push(TemplatePart::Segment);
                    }
                }
                s if s.contains(['*', '{', '}']) => {
                    return Err(format!(
                        "template {text:?}: `*`, `{{` and `}}` are only allowed as a whole segment {{*}} or {{**}}"
                    ));
                }
                s => literal.push_str(s),
            }
        }
        if !literal.is_empty() {
            parts.push(TemplatePart::Literal(literal));
        }
        Ok(Self { parts })
    }

    pub fn matches(&self, path: &str) -> bool {
        let mut rest = path;
        let mut parts = self.parts.iter();
        while let Some(part) = parts.next() {
            match part {
                TemplatePart::Literal(l) => match rest.strip_prefix(l.as_str()) {
                    Some(r) => rest = r,
                    None => return false,
                },
                TemplatePart::Segment => {
                    let end = rest.find('/').unwrap_or(rest.len());
                    if end == 0 {
                        return false;
                    }
                    rest = &rest[end..];
                }
                TemplatePart::Rest => {
                    // Only literals can follow: they must end the path.
                    let mut suffix_len = 0;
                    for p in parts.by_ref() {
                        if let TemplatePart::Literal(l) = p {
                            suffix_len += l.len();
                            if !rest.ends_with(l.as_str()) {
                                return false;
                            }
                        }
                    }
                    return rest.len() >= suffix_len;
                }
            }
        }
        rest.is_empty()
    }
}

/// A `paths` / `not_paths` entry.
#[derive(Debug, Clone)]
pub enum PathMatch {
    Str(StrMatch),
    Template(PathTemplate),
}

impl PathMatch {
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Str(m) => m.matches(path),
            PathMatch::Template(t) => t.matches(path),
        }
    }
}

/// One rule. `None` fields are absent and match anything; a present list matches when
/// any of its entries does (`not_paths`: when none does).
#[derive(Debug, Clone)]
pub struct HttpRule {
    pub action: Action,
    pub source: PrincipalSource,
    pub principals: Option<Vec<StrMatch>>,
    /// Exact and case-sensitive, as Istio.
    pub methods: Option<Vec<String>>,
    pub paths: Option<Vec<PathMatch>>,
    pub not_paths: Option<Vec<PathMatch>>,
    pub ports: Option<Vec<u16>>,
}

impl HttpRule {
    /// A rule with only an action: it matches every request.
    pub fn new(action: Action) -> Self {
        Self {
            action,
            source: PrincipalSource::Peer,
            principals: None,
            methods: None,
            paths: None,
            not_paths: None,
            ports: None,
        }
    }

    pub fn matches(&self, req: &RequestView<'_>) -> bool {
        if let Some(principals) = &self.principals {
            let id = match self.source {
                PrincipalSource::Peer => req.principal,
                PrincipalSource::Jwt => req.jwt_principal,
            };
            // No identity matches no principal rule (as Istio: a plaintext caller
            // never matches `principals`).
            match id {
                Some(id) if principals.iter().any(|m| m.matches(id)) => {}
                _ => return false,
            }
        }
        if let Some(methods) = &self.methods {
            if !methods.iter().any(|m| m == req.method) {
                return false;
            }
        }
        if let Some(paths) = &self.paths {
            if !paths.iter().any(|m| m.matches(req.path)) {
                return false;
            }
        }
        if let Some(not_paths) = &self.not_paths {
            if not_paths.iter().any(|m| m.matches(req.path)) {
                return false;
            }
        }
        if let Some(ports) = &self.ports {
            if !ports.contains(&req.port) {
                return false;
            }
        }
        true
    }
}

/// What the rules look at in a request.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    /// The caller's SPIFFE ID from mTLS; `None` for a plaintext caller.
    pub principal: Option<&'a str>,
    /// The SPIFFE ID of a validated JWT-SVID, if any.
    pub jwt_principal: Option<&'a str>,
    pub method: &'a str,
    /// The normalized path, query excluded (`proxy::http::path::normalize_target`).
    pub path: &'a str,
    /// The listener's port, or the original destination port on a transparent listener.
    pub port: u16,
}

/// The outcome of [`HttpRules::evaluate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    /// `rule: Some(i)`: rule `i` (its index in the configured list) is the `DENY` rule
    /// that matched. `rule: None` (with `action: Allow`): `ALLOW` rules exist and none
    /// matched.
    Denied {
        rule: Option<usize>,
        action: Action,
    },
}

impl std::fmt::Display for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Decision::Allowed => f.write_str("allowed"),
            Decision::Denied {
                rule: Some(i),
                action,
            } => write!(f, "refused by rule {i} ({})", action.as_str()),
            Decision::Denied { rule: None, .. } => f.write_str("refused: no ALLOW rule matched"),
        }
    }
}

/// A listener's `authorization:` list, compiled.
#[derive(Debug, Clone, Default)]
pub struct HttpRules {
    rules: Vec<HttpRule>,
    has_allow: bool,
}

impl HttpRules {
    pub fn new(rules: Vec<HttpRule>) -> Self {
        let has_allow = rules.iter().any(|r| r.action == Action::Allow);
        Self { rules, has_allow }
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn rules(&self) -> &[HttpRule] {
        &self.rules
    }

    /// Decides one request: DENY rules first, then ALLOW rules (if any).
    pub fn evaluate(&self, req: &RequestView<'_>) -> Decision {
        let deny = self
            .rules
            .iter()
            .position(|r| r.action == Action::Deny && r.matches(req));
        if let Some(i) = deny {
            return Decision::Denied {
                rule: Some(i),
                action: Action::Deny,
            };
        }
        if !self.has_allow
            || self
                .rules
                .iter()
                .any(|r| r.action == Action::Allow && r.matches(req))
        {
            Decision::Allowed
        } else {
            Decision::Denied {
                rule: None,
                action: Action::Allow,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn prefix(v: &str) -> StrMatch {
        StrMatch::Prefix {
            value: v.into(),
            ignore_case: false,
        }
    }

    fn exact(v: &str) -> StrMatch {
        StrMatch::Exact {
            value: v.into(),
            ignore_case: false,
        }
    }

    fn req<'a>(principal: Option<&'a str>, method: &'a str, path: &'a str) -> RequestView<'a> {
        RequestView {
            principal,
            jwt_principal: None,
            method,
            path,
            port: 8443,
        }
    }

    const PAYMENT: &str = "spiffe://example.org/ns/default/sa/payment";

    fn payment_may_get_users() -> HttpRules {
        HttpRules::new(vec![HttpRule {
            principals: Some(vec![exact(PAYMENT)]),
            methods: Some(vec!["GET".into()]),
            paths: Some(vec![PathMatch::Str(prefix("/v1/users/"))]),
            ..HttpRule::new(Action::Allow)
        }])
    }

    #[test]
    fn payment_may_get_a_user_but_not_delete_and_nobody_else_may() {
        let rules = payment_may_get_users();
        assert_eq!(
            rules.evaluate(&req(Some(PAYMENT), "GET", "/v1/users/42")),
            Decision::Allowed
        );
        let no = Decision::Denied {
            rule: None,
            action: Action::Allow,
        };
        assert_eq!(
            rules.evaluate(&req(Some(PAYMENT), "DELETE", "/v1/users/42")),
            no
        );
        // Methods are case-sensitive, as in Istio.
        assert_eq!(
            rules.evaluate(&req(Some(PAYMENT), "get", "/v1/users/42")),
            no
        );
        assert_eq!(
            rules.evaluate(&req(
                Some("spiffe://example.org/ns/default/sa/orders"),
                "GET",
                "/v1/users/42"
            )),
            no
        );
        assert_eq!(rules.evaluate(&req(None, "GET", "/v1/users/42")), no);
        assert_eq!(
            rules.evaluate(&req(Some(PAYMENT), "GET", "/v1/orders/1")),
            no
        );
    }

    #[test]
    fn deny_wins_then_allow_must_match_and_no_rules_allow() {
        assert_eq!(
            HttpRules::default().evaluate(&req(None, "GET", "/x")),
            Decision::Allowed
        );
        let only_deny = HttpRules::new(vec![HttpRule {
            paths: Some(vec![PathMatch::Str(prefix("/admin"))]),
            ..HttpRule::new(Action::Deny)
        }]);
        // Only DENY rules: what they do not match is allowed.
        assert_eq!(
            only_deny.evaluate(&req(None, "GET", "/x")),
            Decision::Allowed
        );
        let mut rules = only_deny.rules().to_vec();
        rules.push(HttpRule::new(Action::Allow));
        rules.push(HttpRule {
            paths: Some(vec![PathMatch::Str(exact("/admin/ok"))]),
            ..HttpRule::new(Action::Deny)
        });
        let rules = HttpRules::new(rules);
        // The first matching DENY rule is reported, even though an ALLOW rule matches.
        assert_eq!(
            rules.evaluate(&req(None, "GET", "/admin/ok")),
            Decision::Denied {
                rule: Some(0),
                action: Action::Deny
            }
        );
        assert_eq!(rules.evaluate(&req(None, "GET", "/x")), Decision::Allowed);
        assert_eq!(
            rules.evaluate(&req(None, "GET", "/admin/ok")).to_string(),
            "refused by rule 0 (DENY)"
        );
    }

    #[test]
    fn all_present_fields_must_match() {
        let rule = HttpRule {
            ports: Some(vec![9090]),
            not_paths: Some(vec![PathMatch::Str(prefix("/health"))]),
            ..HttpRule::new(Action::Allow)
        };
        let on = |port, path| {
            rule.matches(&RequestView {
                port,
                ..req(None, "GET", path)
            })
        };
        assert!(on(9090, "/x"));
        assert!(!on(8443, "/x"));
        assert!(!on(9090, "/healthz"));
    }

    #[test]
    fn jwt_source_matches_the_token_id_only() {
        let rule = HttpRule {
            source: PrincipalSource::Jwt,
            principals: Some(vec![exact(PAYMENT)]),
            ..HttpRule::new(Action::Allow)
        };
        assert!(!rule.matches(&req(Some(PAYMENT), "GET", "/")));
        assert!(rule.matches(&RequestView {
            jwt_principal: Some(PAYMENT),
            ..req(None, "GET", "/")
        }));
    }

    #[test]
    fn string_matchers_with_and_without_case() {
        let ic = |m: fn(String, bool) -> StrMatch, v: &str| m(v.to_ascii_lowercase(), true);
        let e = |value, ignore_case| StrMatch::Exact { value, ignore_case };
        let p = |value, ignore_case| StrMatch::Prefix { value, ignore_case };
        let s = |value, ignore_case| StrMatch::Suffix { value, ignore_case };
        let c = |value, ignore_case| StrMatch::Contains { value, ignore_case };
        assert!(ic(e, "/Admin").matches("/ADMIN"));
        assert!(!e("/admin".into(), false).matches("/ADMIN"));
        assert!(ic(p, "/Admin").matches("/aDmin/x"));
        assert!(!ic(p, "/Admin").matches("/adm"));
        assert!(ic(s, ".JSON").matches("/a/b.json"));
        assert!(!s(".JSON".into(), false).matches("/a/b.json"));
        assert!(ic(c, "SECRET").matches("/a/secret/b"));
        assert!(!c("SECRET".into(), false).matches("/a/secret/b"));
        assert!(!ic(c, "SECRET").matches("/a/secre"));
        let re = StrMatch::Regex(regex::Regex::new(r"^(?:/v1/users/[0-9]+)$").unwrap());
        assert!(re.matches("/v1/users/42"));
        assert!(!re.matches("/v1/users/42/delete"));
    }

    #[test]
    fn istio_path_templates() {
        let t = |s: &str| PathTemplate::parse(s).unwrap();
        assert!(t("/foo/{*}").matches("/foo/bar"));
        assert!(!t("/foo/{*}").matches("/foo/bar/baz"));
        assert!(!t("/foo/{*}").matches("/foo/"));
        assert!(!t("/foo/{*}").matches("/foo"));
        assert!(t("/foo/{*}/bar/{**}").matches("/foo/buzz/bar/"));
        assert!(t("/foo/{*}/bar/{**}").matches("/foo/buzz/bar/baz/qux"));
        assert!(!t("/foo/{*}/bar/{**}").matches("/foo/buzz/bar"));
        assert!(t("/static/{**}").matches("/static/"));
        assert!(t("/a/{**}/edit").matches("/a/x/y/edit"));
        assert!(!t("/a/{**}/edit").matches("/a/x/y/view"));
        assert!(t("/v1/users/{*}").matches("/v1/users/42"));
        assert!(!t("/v1/users/{*}").matches("/v1/users/42/delete"));
        for bad in [
            "/*/baz/{*}",
            "/**/baz/{*}",
            "/{**}/foo/{*}",
            "/foo/{*}.txt",
            "/foo/{x}",
            "foo/{*}",
            "/a//{*}",
        ] {
            assert!(PathTemplate::parse(bad).is_err(), "{bad}");
        }
        assert!(PathTemplate::is_template("/a/{*}"));
        assert!(!PathTemplate::is_template("/a/*"));
    }
}

/// The known path-based authorization bypasses, each written as the request an
/// attacker sends, checked against `DENY paths: [prefix /admin]` and
/// `ALLOW not_paths: [/admin*]`: every vector is refused by normalization (400) or
/// normalized to a path under `/admin` that both rules refuse. Never allowed through.
#[cfg(test)]
mod bypass_vectors {
    use super::*;
    use crate::proxy::http::path::{normalize_target, PathOptions, PathRefusal};

    fn admin_prefix() -> PathMatch {
        PathMatch::Str(StrMatch::Prefix {
            value: "/admin".into(),
            ignore_case: false,
        })
    }

    fn deny_admin() -> HttpRules {
        HttpRules::new(vec![HttpRule {
            paths: Some(vec![admin_prefix()]),
            ..HttpRule::new(Action::Deny)
        }])
    }

    fn allow_not_admin() -> HttpRules {
        HttpRules::new(vec![HttpRule {
            not_paths: Some(vec![admin_prefix()]),
            ..HttpRule::new(Action::Allow)
        }])
    }

    /// What the listener does with one request target under `rules`.
    #[derive(Debug, PartialEq)]
    enum Outcome {
        BadRequest(PathRefusal),
        Forbidden,
        Forwarded(String),
    }

    fn send(rules: &HttpRules, target: &str) -> Outcome {
        let t = match normalize_target(target, PathOptions::default()) {
            Ok(t) => t,
            Err(why) => return Outcome::BadRequest(why),
        };
        let view = RequestView {
            principal: Some("spiffe://example.org/ns/default/sa/attacker"),
            jwt_principal: None,
            method: "GET",
            path: &t.path,
            port: 8080,
        };
        match rules.evaluate(&view) {
            Decision::Allowed => Outcome::Forwarded(t.path.into_owned()),
            Decision::Denied { .. } => Outcome::Forbidden,
        }
    }

    /// Runs `target` under both rule sets; returns the outcome (the same under both).
    fn never_reaches_admin(target: &str) -> Outcome {
        let a = send(&deny_admin(), target);
        let b = send(&allow_not_admin(), target);
        assert_eq!(a, b, "{target}: rule sets disagree");
        assert!(
            !matches!(a, Outcome::Forwarded(_)),
            "{target}: forwarded as {a:?}"
        );
        // Refused by normalization, or normalized to the protected path.
        if a == Outcome::Forbidden {
            let t = normalize_target(target, PathOptions::default()).unwrap();
            assert!(t.path.starts_with("/admin"), "{target} -> {}", t.path);
        }
        a
    }

    fn forbidden_as(target: &str, normalized: &str) {
        assert_eq!(never_reaches_admin(target), Outcome::Forbidden, "{target}");
        let t = normalize_target(target, PathOptions::default()).unwrap();
        assert_eq!(t.path, normalized, "{target}");
    }

    fn refused(target: &str, why: PathRefusal) {
        assert_eq!(
            never_reaches_admin(target),
            Outcome::BadRequest(why),
            "{target}"
        );
    }

    #[test]
    fn control_public_paths_pass_both_rule_sets() {
        // Otherwise the vectors below would prove nothing.
        assert_eq!(
            send(&deny_admin(), "/public/x?a=1"),
            Outcome::Forwarded("/public/x".into())
        );
        assert_eq!(
            send(&allow_not_admin(), "/public/x"),
            Outcome::Forwarded("/public/x".into())
        );
        assert_eq!(send(&deny_admin(), "/admin"), Outcome::Forbidden);
        assert_eq!(send(&allow_not_admin(), "/admin/x"), Outcome::Forbidden);
    }

    /// Envoy CVE-2019-9901: paths were matched without normalization, so
    /// `/public/../admin` passed a rule on `/admin` and the app resolved it to `/admin`.
    #[test]
    fn cve_2019_9901_dot_segments() {
        forbidden_as("/public/../admin", "/admin");
        forbidden_as("/public/../admin/users", "/admin/users");
        forbidden_as("/./admin", "/admin");
        forbidden_as("/../admin", "/admin");
        forbidden_as("/public/./../../admin/", "/admin/");
        // Dots percent-encoded (unreserved, so decoded before dot removal).
        forbidden_as("/public/%2e%2e/admin", "/admin");
        forbidden_as("/public/%2E%2E/admin", "/admin");
        forbidden_as("/public/.%2e/admin", "/admin");
        forbidden_as("/%61dmin", "/admin");
        // Backslashes as separators (what Windows servers and some frameworks do).
        forbidden_as("/public\\..\\admin", "/admin");
        // A target must start with `/`; a leading backslash is not a path.
        refused("\\admin", PathRefusal::NotOriginForm);
    }

    /// Envoy CVE-2019-9900: a NUL in the path was passed on, so matching saw one path
    /// and a C-string app another (`/admin\0` vs `/admin`, `/public\0/../admin`).
    #[test]
    fn cve_2019_9900_nul_and_controls() {
        refused("/public\0/../admin", PathRefusal::ControlCharacter);
        refused("/admin\0", PathRefusal::ControlCharacter);
        refused("/public/%00/../../admin", PathRefusal::EncodedControl);
        refused("/adm%00in", PathRefusal::EncodedControl);
        refused("/public\r\n/admin", PathRefusal::ControlCharacter);
        refused("/public/%0d%0a/admin", PathRefusal::EncodedControl);
        refused("/public\x7f/admin", PathRefusal::ControlCharacter);
        refused("/public\t/admin", PathRefusal::ControlCharacter);
    }

    /// Istio CVE-2021-31920: `%2F` and `%5C` were not separators to the proxy but were
    /// decoded by the app: `/public%2F..%2Fadmin` is `/admin` to the app.
    #[test]
    fn cve_2021_31920_encoded_slashes() {
        refused("/public%2F..%2Fadmin", PathRefusal::EncodedSlash);
        refused("/public%2f..%2fadmin", PathRefusal::EncodedSlash);
        refused("/public%5C..%5Cadmin", PathRefusal::EncodedSlash);
        refused("/public%5c..%5cadmin", PathRefusal::EncodedSlash);
        refused("%2Fadmin", PathRefusal::NotOriginForm);
        refused("/%2Fadmin", PathRefusal::EncodedSlash);
    }

    /// Istio CVE-2021-39156: a `#fragment` in the path made `/admin#x` miss a rule on
    /// `/admin` (exact), while the app cut the fragment. Refused outright here.
    #[test]
    fn cve_2021_39156_fragment() {
        refused("/admin#", PathRefusal::Fragment);
        refused("/admin#/public", PathRefusal::Fragment);
        refused("/public#/../admin", PathRefusal::Fragment);
        refused("/public?x=1#/../../admin", PathRefusal::Fragment);
        // An encoded `#` is data, not a fragment: it stays encoded in its segment.
        forbidden_as("/admin%23x", "/admin%23x");
    }

    /// Istio CVE-2021-39155: host rules compared `Host` case-sensitively, so
    /// `ADMIN.example.org` slipped past a rule on `admin.example.org`. Hosts are
    /// lower-cased and their port stripped before any rule or policy sees them; the
    /// path is unaffected by the host's spelling.
    #[test]
    fn cve_2021_39155_host_case() {
        use crate::proxy::http::path::normalize_host;
        for h in [
            "ADMIN.example.org",
            "Admin.Example.Org:443",
            "admin.EXAMPLE.org:8080",
        ] {
            assert_eq!(normalize_host(h).unwrap(), "admin.example.org", "{h}");
        }
        forbidden_as("/ADMIN/../admin", "/admin");
    }

    /// istio#27409: path parameters (`;`) were not understood by the proxy, but
    /// Tomcat and Spring drop them before resolving dots: `/public/..;/admin` is
    /// `/admin` to them, and so are `/public/.;/../admin` and `/;x/admin`.
    #[test]
    fn istio_27409_path_parameters() {
        refused("/public/..;/admin", PathRefusal::DotSegmentParameter);
        refused("/public/..;x=1/admin", PathRefusal::DotSegmentParameter);
        refused("/public/%2e%2e;/admin", PathRefusal::DotSegmentParameter);
        refused("/public/.;/../admin", PathRefusal::DotSegmentParameter);
        refused("/;x/admin", PathRefusal::DotSegmentParameter);
        refused("/public/..;", PathRefusal::DotSegmentParameter);
        // A parameter on a real segment stays (the app may use it) and still matches.
        forbidden_as("/admin;jsessionid=1", "/admin;jsessionid=1");
        forbidden_as("/admin;x/users", "/admin;x/users");
    }

    /// OPA-Envoy CVE-2026-26205: `parsed_path` was built by parsing the path as a URI,
    /// so `//admin/secret` became authority `admin`, path `/secret`, while the app
    /// served `/admin/secret`. Here `//` is merged before anything looks at the path.
    #[test]
    fn cve_2026_26205_double_slash() {
        forbidden_as("//admin/secret", "/admin/secret");
        forbidden_as("//admin", "/admin");
        forbidden_as("///admin//secret", "/admin/secret");
        forbidden_as("/public//..//admin", "/admin");
        forbidden_as("//admin?x=//public", "/admin");
    }

    /// With `%2F` kept encoded instead of refused, the encoded slash is never a
    /// separator for the rules; an app decoding it would see `/public/../admin`, which
    /// is why refusing is the default.
    #[test]
    fn kept_encoded_slashes_are_never_separators() {
        use crate::proxy::http::path::EncodedSlashes;
        let keep = PathOptions {
            encoded_slashes: EncodedSlashes::Keep,
        };
        let t = normalize_target("/admin%2F..%2Fpublic", keep).unwrap();
        assert_eq!(t.path, "/admin%2F..%2Fpublic");
        let view = RequestView {
            principal: None,
            jwt_principal: None,
            method: "GET",
            path: &t.path,
            port: 1,
        };
        assert!(matches!(
            deny_admin().evaluate(&view),
            Decision::Denied { .. }
        ));
    }
}
