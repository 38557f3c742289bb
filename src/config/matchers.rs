//! Allowlist entries (Envoy StringMatchers on a SPIFFE ID, or a trust domain) as written,
//! turned into `authz` rules. Listeners and authorization rules both use them.

use super::raw::MatcherConfig;
use crate::authz::{AllowList, IdRule, StrMatch};
use crate::spiffe::parse_trust_domain;

impl MatcherConfig {
    /// The typed rule this entry means; the problem in words otherwise.
    fn to_rule(&self) -> Result<IdRule, String> {
        let e = self;
        let kinds = [
            e.exact.is_some(),
            e.prefix.is_some(),
            e.suffix.is_some(),
            e.contains.is_some(),
            e.safe_regex.is_some(),
            e.trust_domain.is_some(),
        ];
        if kinds.iter().filter(|k| **k).count() != 1 {
            return Err(
                "set exactly one of exact, prefix, suffix, contains, safe_regex, trust_domain"
                    .into(),
            );
        }
        let ignore_case = e.ignore_case;
        if ignore_case && (e.safe_regex.is_some() || e.trust_domain.is_some()) {
            return Err(
                "ignore_case has no effect on safe_regex or trust_domain (use (?i) in the regex)"
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
        if let Some(x) = &e.exact {
            if !ignore_case {
                // An ID without a path names a trust domain: no SVID can carry it.
                crate::spiffe::parse_workload_id(x).map_err(|err| format!("exact: {err}"))?;
            }
            let value = fold(x);
            return Ok(IdRule::Text(StrMatch::Exact { value, ignore_case }));
        }
        if let Some(x) = &e.prefix {
            let value = fold(x);
            return Ok(IdRule::Text(StrMatch::Prefix { value, ignore_case }));
        }
        if let Some(x) = &e.suffix {
            let value = fold(x);
            return Ok(IdRule::Text(StrMatch::Suffix { value, ignore_case }));
        }
        if let Some(x) = &e.contains {
            let value = fold(x);
            return Ok(IdRule::Text(StrMatch::Contains { value, ignore_case }));
        }
        if let Some(r) = &e.safe_regex {
            let re = regex::Regex::new(&format!("^(?:{})$", r.regex)).map_err(|err| {
                // regex errors draw a caret over several lines; keep the last one.
                let text = err.to_string();
                let why = text.lines().last().unwrap_or_default().trim().to_string();
                format!(
                    "safe_regex.regex: {:?} is not a valid regex: {why}",
                    r.regex
                )
            })?;
            return Ok(IdRule::Text(StrMatch::Regex(re)));
        }
        let td = e.trust_domain.as_deref().unwrap_or_default();
        let td = parse_trust_domain(td).map_err(|err| format!("trust_domain: {err}"))?;
        Ok(IdRule::TrustDomain(td))
    }
}

/// Builds an allowlist from config entries. An error carries the index of the bad
/// entry and the problem.
pub fn allow_list(
    entries: &[MatcherConfig],
    any_in_own_trust_domain: bool,
) -> Result<AllowList, (usize, String)> {
    let rules = entries
        .iter()
        .enumerate()
        .map(|(i, e)| e.to_rule().map_err(|p| (i, p)))
        .collect::<Result<_, _>>()?;
    Ok(AllowList {
        rules,
        any_in_own_trust_domain,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::SpiffeIdMatcher;
    use crate::config::raw::SafeRegex;
    use crate::spiffe::{parse_spiffe_id, SpiffeId, TrustDomain};

    fn build_matcher(
        entries: &[MatcherConfig],
        any_in: Option<TrustDomain>,
    ) -> Result<SpiffeIdMatcher, (usize, String)> {
        let own = any_in
            .clone()
            .unwrap_or_else(|| parse_trust_domain("unused.test").unwrap());
        allow_list(entries, any_in.is_some()).map(|l| l.matcher(&own))
    }

    fn id(s: &str) -> SpiffeId {
        parse_spiffe_id(s).unwrap()
    }

    fn m(e: MatcherConfig) -> SpiffeIdMatcher {
        build_matcher(&[e], None).unwrap()
    }

    #[test]
    fn envoy_string_matcher_semantics() {
        let web = id("spiffe://example.org/ns/prod/sa/web");
        let exact = |s: &str, ic| MatcherConfig {
            exact: Some(s.into()),
            ignore_case: ic,
            ..Default::default()
        };
        assert!(m(exact("spiffe://example.org/ns/prod/sa/web", false)).matches_id(&web));
        assert!(!m(exact("spiffe://example.org/ns/prod/sa/WEB", true))
            .matches_id(&id("spiffe://example.org/ns/prod/sa/api")));
        assert!(m(exact("spiffe://example.org/ns/prod/sa/WEB", true)).matches_id(&web));
        let prefix = MatcherConfig {
            prefix: Some("spiffe://example.org/ns/prod/".into()),
            ..Default::default()
        };
        assert!(m(prefix.clone()).matches_id(&web));
        assert!(!m(prefix).matches_id(&id("spiffe://example.org/ns/dev/sa/web")));
        let suffix = MatcherConfig {
            suffix: Some("/sa/web".into()),
            ..Default::default()
        };
        assert!(m(suffix).matches_id(&web));
        let contains = MatcherConfig {
            contains: Some("/PROD/".into()),
            ignore_case: true,
            ..Default::default()
        };
        assert!(m(contains).matches_id(&web));
        let contains_cs = MatcherConfig {
            contains: Some("/PROD/".into()),
            ..Default::default()
        };
        assert!(!m(contains_cs).matches_id(&web));
        // safe_regex is a full match, as RE2 FullMatch in Envoy.
        let re = |r: &str| MatcherConfig {
            safe_regex: Some(SafeRegex { regex: r.into() }),
            ..Default::default()
        };
        assert!(m(re(r"spiffe://example\.org/ns/[^/]+/sa/web")).matches_id(&web));
        assert!(!m(re("sa/web")).matches_id(&web));
        let td = MatcherConfig {
            trust_domain: Some("example.org".into()),
            ..Default::default()
        };
        assert!(m(td.clone()).matches_id(&web));
        assert!(!m(td).matches_id(&id("spiffe://example.com/ns/prod/sa/web")));
    }

    #[test]
    fn prefix_does_not_cross_trust_domains_by_accident() {
        // A prefix without the trailing slash would match example.org.evil; users are
        // expected to write the slash, as with Envoy. Show the difference.
        let loose = MatcherConfig {
            prefix: Some("spiffe://example.org".into()),
            ..Default::default()
        };
        assert!(m(loose).matches_id(&id("spiffe://example.org.evil/x")));
        let strict = MatcherConfig {
            prefix: Some("spiffe://example.org/".into()),
            ..Default::default()
        };
        assert!(!m(strict).matches_id(&id("spiffe://example.org.evil/x")));
    }

    #[test]
    fn bad_entries_are_reported_with_their_index() {
        let ok = MatcherConfig {
            suffix: Some("/x".into()),
            ..Default::default()
        };
        let two = MatcherConfig {
            exact: Some("spiffe://a/b".into()),
            prefix: Some("x".into()),
            ..Default::default()
        };
        assert_eq!(build_matcher(&[ok.clone(), two], None).unwrap_err().0, 1);
        let bad_re = MatcherConfig {
            safe_regex: Some(SafeRegex { regex: "(".into() }),
            ..Default::default()
        };
        assert!(build_matcher(&[bad_re], None)
            .unwrap_err()
            .1
            .contains("safe_regex"));
        let bad_exact = MatcherConfig {
            exact: Some("spiffe://example.org/a/../b".into()),
            ..Default::default()
        };
        assert!(build_matcher(&[bad_exact], None).is_err());
        let none = MatcherConfig::default();
        assert!(build_matcher(&[none], None).is_err());
    }

    #[test]
    fn any_in_trust_domain() {
        let td = crate::spiffe::parse_trust_domain("example.org").unwrap();
        let all = build_matcher(&[], Some(td)).unwrap();
        assert!(all.matches_id(&id("spiffe://example.org/anything")));
        assert!(!all.matches_id(&id("spiffe://other.org/anything")));
        assert!(!build_matcher(&[], None)
            .unwrap()
            .matches_id(&id("spiffe://example.org/a")));
    }
}
