//! The `authorization:` list of an HTTP listener as written in YAML, and its checking
//! into compiled [`HttpRules`]. Errors name the entry and the field
//! (`inbound[0].authorization[2].paths[0]: ...`).
//!
//! ```yaml
//! authorization:
//!   - action: ALLOW
//!     principals: [{exact: spiffe://example.org/ns/default/sa/payment}]
//!     methods: [GET]
//!     paths: [{prefix: /v1/users/}, "/v1/items/{*}"]
//!   - action: DENY
//!     not_paths: ["/public*"]
//!     ports: [9090]
//! ```
//!
//! A `paths` / `not_paths` entry is either an Envoy StringMatcher (`exact`, `prefix`,
//! `suffix`, `contains`, `safe_regex`, with `ignore_case`; or `template`), or a plain
//! string as Istio writes it: `/a` exact, `/a*` prefix, `*.json` suffix, `*` any, and
//! a string with `{*}` / `{**}` a path template.

use regex::Regex;

use super::matchers::allow_list;
use super::raw::{
    ActionConfig, AuthorizationRuleConfig, PathMatcherConfig, PathStringMatcher, RulePortConfig,
    SourceConfig,
};
use super::ConfigError;
use crate::authz::http_rules::{
    Action, HttpRule, HttpRules, PathMatch, PathTemplate, PrincipalSource, StrMatch,
};
use crate::authz::IdRule;

/// Checks an `authorization:` list and compiles it. `at` is the key of the list
/// (`inbound[0].authorization`).
pub fn authorization_rules(
    at: &str,
    list: &[AuthorizationRuleConfig],
) -> Result<HttpRules, ConfigError> {
    list.iter()
        .enumerate()
        .map(|(i, r)| r.rule(&format!("{at}[{i}]")))
        .collect::<Result<Vec<_>, _>>()
        .map(HttpRules::new)
}

/// A present list must not be empty: Istio reads `paths: []` as "no condition", which
/// would make a rule silently broader than it looks.
fn non_empty<'a, T>(
    at: &str,
    key: &str,
    list: &'a Option<Vec<T>>,
) -> Result<Option<&'a [T]>, ConfigError> {
    match list {
        Some(l) if l.is_empty() => Err(ConfigError::new(
            format!("{at}.{key}"),
            "empty: remove the key to match any value, or list at least one",
        )),
        Some(l) => Ok(Some(l)),
        None => Ok(None),
    }
}

impl AuthorizationRuleConfig {
    fn rule(&self, at: &str) -> Result<HttpRule, ConfigError> {
        let principals = match non_empty(at, "principals", &self.principals)? {
            None => None,
            Some(list) => {
                let key = format!("{at}.principals");
                let allow = allow_list(list, false)
                    .map_err(|(i, p)| ConfigError::new(format!("{key}[{i}]"), p))?;
                Some(allow.rules.into_iter().map(principal_matcher).collect())
            }
        };
        if self.source == SourceConfig::Jwt && principals.is_none() {
            return Err(ConfigError::new(
                format!("{at}.source"),
                "only used with principals (it says which identity they match)",
            ));
        }
        let methods = match non_empty(at, "methods", &self.methods)? {
            None => None,
            Some(list) => {
                for (i, m) in list.iter().enumerate() {
                    if m.is_empty() || !m.bytes().all(is_tchar) {
                        return Err(ConfigError::new(
                            format!("{at}.methods[{i}]"),
                            format!(
                                "{m:?} is not an HTTP method (methods match exactly, e.g. GET)"
                            ),
                        ));
                    }
                }
                Some(list.to_vec())
            }
        };
        let paths = path_list(at, "paths", &self.paths)?;
        let not_paths = path_list(at, "not_paths", &self.not_paths)?;
        let ports = match non_empty(at, "ports", &self.ports)? {
            None => None,
            Some(list) => Some(
                list.iter()
                    .enumerate()
                    .map(|(i, p)| {
                        port(p).map_err(|p| ConfigError::new(format!("{at}.ports[{i}]"), p))
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        Ok(HttpRule {
            action: match self.action {
                ActionConfig::Allow => Action::Allow,
                ActionConfig::Deny => Action::Deny,
            },
            source: match self.source {
                SourceConfig::Peer => PrincipalSource::Peer,
                SourceConfig::Jwt => PrincipalSource::Jwt,
            },
            principals,
            methods,
            paths,
            not_paths,
            ports,
        })
    }
}

/// RFC 9110 token characters (a method is a token).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn port(p: &RulePortConfig) -> Result<u16, String> {
    let n = match p {
        RulePortConfig::Number(n) => *n,
        RulePortConfig::Text(t) => t
            .parse::<u16>()
            .map_err(|_| format!("{t:?} is not a port number"))?,
    };
    if n == 0 {
        return Err("port 0 is not a port".into());
    }
    Ok(n)
}

/// An allowlist rule as a matcher on the SPIFFE ID text. IDs are accepted only in
/// canonical form (lower-case trust domain), so a trust domain is a prefix.
fn principal_matcher(rule: IdRule) -> StrMatch {
    match rule {
        IdRule::Text(m) => m,
        IdRule::TrustDomain(td) => StrMatch::Prefix {
            value: format!("spiffe://{td}/"),
            ignore_case: false,
        },
    }
}

fn path_list(
    at: &str,
    key: &str,
    list: &Option<Vec<PathMatcherConfig>>,
) -> Result<Option<Vec<PathMatch>>, ConfigError> {
    let Some(list) = non_empty(at, key, list)? else {
        return Ok(None);
    };
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            m.to_match()
                .map_err(|p| ConfigError::new(format!("{at}.{key}[{i}]"), p))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// Paths are compared with the normalized path, which always starts with `/`.
fn absolute(kind: &str, v: &str) -> Result<(), String> {
    if v.starts_with('/') {
        Ok(())
    } else {
        Err(format!(
            "{kind}: {v:?} must start with / (paths are matched after normalization)"
        ))
    }
}

impl PathMatcherConfig {
    fn to_match(&self) -> Result<PathMatch, String> {
        match self {
            PathMatcherConfig::Istio(s) => istio_path(s),
            PathMatcherConfig::Matcher(m) => m.to_match(),
        }
    }
}

/// Istio's string form: a template, `*`, `*suffix`, `prefix*` or an exact path.
fn istio_path(s: &str) -> Result<PathMatch, String> {
    let str_match = |m| Ok(PathMatch::Str(m));
    if PathTemplate::is_template(s) {
        return PathTemplate::parse(s).map(PathMatch::Template);
    }
    if s == "*" {
        return str_match(StrMatch::Prefix {
            value: String::new(),
            ignore_case: false,
        });
    }
    let inner = s.trim_start_matches('*').trim_end_matches('*');
    if inner.contains('*') || s.starts_with("**") || s.ends_with("**") || s.is_empty() {
        return Err(format!(
            "{s:?}: `*` may only be the first or last character (or use {{*}} / {{**}} templates)"
        ));
    }
    if s.contains(['{', '}']) {
        return Err(format!(
            "{s:?}: only {{*}} and {{**}} are path template operators"
        ));
    }
    match (s.strip_prefix('*'), s.strip_suffix('*')) {
        (Some(_), Some(_)) => Err(format!(
            "{s:?}: `*` at both ends is not an Istio path (use {{contains: ...}})"
        )),
        (Some(suffix), None) => str_match(StrMatch::Suffix {
            value: suffix.into(),
            ignore_case: false,
        }),
        (None, Some(prefix)) => {
            absolute("prefix", prefix)?;
            str_match(StrMatch::Prefix {
                value: prefix.into(),
                ignore_case: false,
            })
        }
        (None, None) => {
            absolute("exact", s)?;
            str_match(StrMatch::Exact {
                value: s.into(),
                ignore_case: false,
            })
        }
    }
}

impl PathStringMatcher {
    fn to_match(&self) -> Result<PathMatch, String> {
        let kinds = [
            self.exact.is_some(),
            self.prefix.is_some(),
            self.suffix.is_some(),
            self.contains.is_some(),
            self.safe_regex.is_some(),
            self.template.is_some(),
        ];
        if kinds.iter().filter(|k| **k).count() != 1 {
            return Err(
                "set exactly one of exact, prefix, suffix, contains, safe_regex, template".into(),
            );
        }
        let ignore_case = self.ignore_case;
        if ignore_case && (self.safe_regex.is_some() || self.template.is_some()) {
            return Err(
                "ignore_case has no effect on safe_regex or template (use (?i) in the regex)"
                    .into(),
            );
        }
        let fold = |s: &str| {
            if ignore_case {
                s.to_ascii_lowercase()
            } else {
                s.to_string()
            }
        };
        let m = if let Some(v) = &self.exact {
            absolute("exact", v)?;
            StrMatch::Exact {
                value: fold(v),
                ignore_case,
            }
        } else if let Some(v) = &self.prefix {
            absolute("prefix", v)?;
            StrMatch::Prefix {
                value: fold(v),
                ignore_case,
            }
        } else if let Some(v) = &self.suffix {
            StrMatch::Suffix {
                value: fold(v),
                ignore_case,
            }
        } else if let Some(v) = &self.contains {
            StrMatch::Contains {
                value: fold(v),
                ignore_case,
            }
        } else if let Some(r) = &self.safe_regex {
            let re = Regex::new(&format!("^(?:{})$", r.regex)).map_err(|err| {
                let text = err.to_string();
                let why = text.lines().last().unwrap_or_default().trim().to_string();
                format!(
                    "safe_regex.regex: {:?} is not a valid regex: {why}",
                    r.regex
                )
            })?;
            StrMatch::Regex(re)
        } else {
            let t = self.template.as_deref().unwrap_or_default();
            return PathTemplate::parse(t)
                .map(PathMatch::Template)
                .map_err(|e| format!("template: {e}"));
        };
        Ok(PathMatch::Str(m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::http_rules::{Decision, RequestView};
    use crate::config::parse_yaml;
    use serde::Deserialize;

    #[derive(Deserialize)]
    struct Doc {
        authorization: Vec<AuthorizationRuleConfig>,
    }

    fn rules(yaml: &str) -> Result<HttpRules, ConfigError> {
        let doc: Doc = parse_yaml(yaml)?;
        authorization_rules("inbound[0].authorization", &doc.authorization)
    }

    fn err(yaml: &str) -> String {
        rules(yaml).unwrap_err().to_string()
    }

    const ISSUE: &str = r#"
authorization:
  - action: ALLOW
    principals: [{exact: spiffe://example.org/ns/default/sa/payment}]
    methods: [GET]
    paths: [{prefix: /v1/users/}]
"#;

    fn view<'a>(principal: &'a str, method: &'a str, path: &'a str) -> RequestView<'a> {
        RequestView {
            principal: Some(principal),
            jwt_principal: None,
            method,
            path,
            port: 8443,
        }
    }

    #[test]
    fn the_issue_shape_allows_payment_get_only() {
        let r = rules(ISSUE).unwrap();
        let payment = "spiffe://example.org/ns/default/sa/payment";
        assert_eq!(
            r.evaluate(&view(payment, "GET", "/v1/users/42")),
            Decision::Allowed
        );
        assert!(matches!(
            r.evaluate(&view(payment, "DELETE", "/v1/users/42")),
            Decision::Denied { rule: None, .. }
        ));
        assert!(matches!(
            r.evaluate(&view(
                "spiffe://example.org/ns/default/sa/web",
                "GET",
                "/v1/users/42"
            )),
            Decision::Denied { .. }
        ));
    }

    #[test]
    fn istio_strings_templates_and_matchers() {
        let r = rules(
            r#"
authorization:
  - action: DENY
    paths: ["/admin*", "*.bak", "/exact", "/v1/{*}/secret", {suffix: .PEM, ignore_case: true}]
  - action: DENY
    principals: [{trust_domain: evil.example}]
  - action: ALLOW
    source: peer
    principals: [{prefix: "spiffe://example.org/"}]
    not_paths: [{template: "/internal/{**}"}, {safe_regex: {regex: "/x/[0-9]+"}}]
    ports: [8443, "9090"]
"#,
        )
        .unwrap();
        let me = "spiffe://example.org/a";
        let deny0 = Decision::Denied {
            rule: Some(0),
            action: Action::Deny,
        };
        for p in [
            "/admin",
            "/admin/x",
            "/a/b.bak",
            "/exact",
            "/v1/u/secret",
            "/k.pem",
        ] {
            assert_eq!(r.evaluate(&view(me, "GET", p)), deny0, "{p}");
        }
        for p in ["/exact/", "/v1/u/v/secret", "/public"] {
            assert_eq!(r.evaluate(&view(me, "GET", p)), Decision::Allowed, "{p}");
        }
        assert_eq!(
            r.evaluate(&view("spiffe://evil.example/a", "GET", "/public")),
            Decision::Denied {
                rule: Some(1),
                action: Action::Deny
            }
        );
        for p in ["/internal/", "/internal/a/b", "/x/12"] {
            assert!(matches!(
                r.evaluate(&view(me, "GET", p)),
                Decision::Denied { rule: None, .. }
            ));
        }
        let other_port = RequestView {
            port: 80,
            ..view(me, "GET", "/public")
        };
        assert!(matches!(r.evaluate(&other_port), Decision::Denied { .. }));
        let jwt = rules(
            "authorization:\n  - action: ALLOW\n    source: jwt\n    principals: [{exact: spiffe://example.org/a}]\n",
        )
        .unwrap();
        assert_eq!(jwt.rules()[0].source, PrincipalSource::Jwt);
    }

    #[test]
    fn errors_name_the_key_and_the_problem() {
        let e = err(&ISSUE.replace("{prefix: /v1/users/}", "{prefix: /a}, {prefx: /b}"));
        assert!(
            e.starts_with("authorization[0].paths[1]") && e.contains("prefx"),
            "{e}"
        );
        let e = err(&ISSUE.replace("{prefix: /v1/users/}", "/a, \"/b/{x}\""));
        assert!(
            e.starts_with("inbound[0].authorization[0].paths[1]:") && e.contains("{x}"),
            "{e}"
        );
        let e = err(&ISSUE.replace("{prefix: /v1/users/}", "/a, \"/{**}/b/{*}\""));
        assert!(
            e.starts_with("inbound[0].authorization[0].paths[1]:") && e.contains("last"),
            "{e}"
        );
        let e = err(&ISSUE.replace("{prefix: /v1/users/}", "\"/a/*/b\""));
        assert!(
            e.starts_with("inbound[0].authorization[0].paths[0]:"),
            "{e}"
        );
        let e = err(&ISSUE.replace("{prefix: /v1/users/}", "{prefix: v1}"));
        assert!(
            e.starts_with("inbound[0].authorization[0].paths[0]:")
                && e.contains("must start with /"),
            "{e}"
        );
        let e = err(&ISSUE.replace("{prefix: /v1/users/}", "{prefix: /a, exact: /b}"));
        assert!(e.contains("exactly one"), "{e}");
        let e = err(&ISSUE.replace("{prefix: /v1/users/}", "{safe_regex: {regex: \"(\"}}"));
        assert!(
            e.starts_with("inbound[0].authorization[0].paths[0]:") && e.contains("safe_regex"),
            "{e}"
        );
        let e = err(&ISSUE.replace(
            "{exact: spiffe://example.org/ns/default/sa/payment}",
            "{exact: spiffe://example.org/a}, {exact: \"spiffe://example.org/../b\"}",
        ));
        assert!(
            e.starts_with("inbound[0].authorization[0].principals[1]:"),
            "{e}"
        );
        let e = err(&ISSUE.replace("[GET]", "[GET, \"GE T\"]"));
        assert!(
            e.starts_with("inbound[0].authorization[0].methods[1]:"),
            "{e}"
        );
        let e = err(&ISSUE.replace("[GET]", "[]"));
        assert!(
            e.starts_with("inbound[0].authorization[0].methods:") && e.contains("empty"),
            "{e}"
        );
        let e = err(&ISSUE.replace("methods: [GET]", "ports: [8080, \"http\"]"));
        assert!(
            e.starts_with("inbound[0].authorization[0].ports[1]:"),
            "{e}"
        );
        let e = err(&ISSUE.replace("methods: [GET]", "ports: [0]"));
        assert!(
            e.starts_with("inbound[0].authorization[0].ports[0]:"),
            "{e}"
        );
        let e = err(&ISSUE.replace("action: ALLOW", "action: AUDIT"));
        assert!(e.starts_with("authorization[0].action"), "{e}");
        let e = err(&ISSUE.replace("methods:", "method:"));
        assert!(e.contains("method"), "{e}");
        let e = err("authorization:\n  - action: ALLOW\n    source: jwt\n");
        assert!(e.starts_with("inbound[0].authorization[0].source:"), "{e}");
    }
}
