//! SPIFFE ID allowlists with Envoy's `StringMatcher` semantics, so entries can be
//! pasted from an Envoy `match_subject_alt_names` / `match_typed_subject_alt_names`.

use regex::Regex;

use crate::config::MatcherConfig;
use crate::spiffe::{parse_spiffe_id, parse_trust_domain, SpiffeId, TrustDomain};

#[derive(Debug, Clone)]
enum Rule {
    Exact(String, bool),
    Prefix(String, bool),
    Suffix(String, bool),
    Contains(String, bool),
    /// Envoy's `safe_regex` matches the whole string; `ignore_case` has no effect on it.
    Regex(Regex),
    TrustDomain(TrustDomain),
}

/// An ordered list of rules; a peer is allowed when any rule matches its SPIFFE ID.
#[derive(Debug, Clone, Default)]
pub struct SpiffeIdMatcher {
    rules: Vec<Rule>,
}

impl SpiffeIdMatcher {
    /// Builds a matcher from config entries; `any_in` adds "any ID of this trust
    /// domain". An error carries the index of the bad entry and the problem.
    pub fn build(
        entries: &[MatcherConfig],
        any_in: Option<TrustDomain>,
    ) -> Result<Self, (usize, String)> {
        let mut rules = Vec::with_capacity(entries.len() + 1);
        for (i, e) in entries.iter().enumerate() {
            rules.push(Rule::from_config(e).map_err(|p| (i, p))?);
        }
        if let Some(td) = any_in {
            rules.push(Rule::TrustDomain(td));
        }
        Ok(Self { rules })
    }

    pub fn matches(&self, id: &SpiffeId) -> bool {
        let text = id.to_string();
        self.rules.iter().any(|r| r.matches(id, &text))
    }
}

impl Rule {
    fn from_config(e: &MatcherConfig) -> Result<Self, String> {
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
        let ic = e.ignore_case;
        if ic && (e.safe_regex.is_some() || e.trust_domain.is_some()) {
            return Err(
                "ignore_case has no effect on safe_regex or trust_domain (use (?i) in the regex)"
                    .into(),
            );
        }
        let fold = |s: &str| {
            if ic {
                s.to_ascii_lowercase()
            } else {
                s.to_string()
            }
        };
        if let Some(x) = &e.exact {
            if !ic {
                parse_spiffe_id(x).map_err(|err| format!("exact: {err}"))?;
            }
            return Ok(Rule::Exact(fold(x), ic));
        }
        if let Some(x) = &e.prefix {
            return Ok(Rule::Prefix(fold(x), ic));
        }
        if let Some(x) = &e.suffix {
            return Ok(Rule::Suffix(fold(x), ic));
        }
        if let Some(x) = &e.contains {
            return Ok(Rule::Contains(fold(x), ic));
        }
        if let Some(r) = &e.safe_regex {
            let re = Regex::new(&format!("^(?:{})$", r.regex)).map_err(|err| {
                // regex errors draw a caret over several lines; keep the last one.
                let text = err.to_string();
                let why = text.lines().last().unwrap_or_default().trim().to_string();
                format!(
                    "safe_regex.regex: {:?} is not a valid regex: {why}",
                    r.regex
                )
            })?;
            return Ok(Rule::Regex(re));
        }
        let td = e.trust_domain.as_deref().unwrap_or_default();
        let td = parse_trust_domain(td).map_err(|err| format!("trust_domain: {err}"))?;
        Ok(Rule::TrustDomain(td))
    }

    fn matches(&self, id: &SpiffeId, text: &str) -> bool {
        let cmp = |ic: bool| {
            if ic {
                std::borrow::Cow::Owned(text.to_ascii_lowercase())
            } else {
                std::borrow::Cow::Borrowed(text)
            }
        };
        match self {
            Rule::Exact(s, ic) => cmp(*ic) == s.as_str(),
            Rule::Prefix(s, ic) => cmp(*ic).starts_with(s.as_str()),
            Rule::Suffix(s, ic) => cmp(*ic).ends_with(s.as_str()),
            Rule::Contains(s, ic) => cmp(*ic).contains(s.as_str()),
            Rule::Regex(re) => re.is_match(text),
            Rule::TrustDomain(td) => id.is_member_of(td),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SafeRegex;

    fn id(s: &str) -> SpiffeId {
        parse_spiffe_id(s).unwrap()
    }

    fn m(e: MatcherConfig) -> SpiffeIdMatcher {
        SpiffeIdMatcher::build(&[e], None).unwrap()
    }

    #[test]
    fn envoy_string_matcher_semantics() {
        let web = id("spiffe://example.org/ns/prod/sa/web");
        let exact = |s: &str, ic| MatcherConfig {
            exact: Some(s.into()),
            ignore_case: ic,
            ..Default::default()
        };
        assert!(m(exact("spiffe://example.org/ns/prod/sa/web", false)).matches(&web));
        assert!(!m(exact("spiffe://example.org/ns/prod/sa/WEB", true))
            .matches(&id("spiffe://example.org/ns/prod/sa/api")));
        assert!(m(exact("spiffe://example.org/ns/prod/sa/WEB", true)).matches(&web));
        let prefix = MatcherConfig {
            prefix: Some("spiffe://example.org/ns/prod/".into()),
            ..Default::default()
        };
        assert!(m(prefix.clone()).matches(&web));
        assert!(!m(prefix).matches(&id("spiffe://example.org/ns/dev/sa/web")));
        let suffix = MatcherConfig {
            suffix: Some("/sa/web".into()),
            ..Default::default()
        };
        assert!(m(suffix).matches(&web));
        let contains = MatcherConfig {
            contains: Some("/PROD/".into()),
            ignore_case: true,
            ..Default::default()
        };
        assert!(m(contains).matches(&web));
        let contains_cs = MatcherConfig {
            contains: Some("/PROD/".into()),
            ..Default::default()
        };
        assert!(!m(contains_cs).matches(&web));
        // safe_regex is a full match, as RE2 FullMatch in Envoy.
        let re = |r: &str| MatcherConfig {
            safe_regex: Some(SafeRegex { regex: r.into() }),
            ..Default::default()
        };
        assert!(m(re(r"spiffe://example\.org/ns/[^/]+/sa/web")).matches(&web));
        assert!(!m(re("sa/web")).matches(&web));
        let td = MatcherConfig {
            trust_domain: Some("example.org".into()),
            ..Default::default()
        };
        assert!(m(td.clone()).matches(&web));
        assert!(!m(td).matches(&id("spiffe://example.com/ns/prod/sa/web")));
    }

    #[test]
    fn prefix_does_not_cross_trust_domains_by_accident() {
        // A prefix without the trailing slash would match example.org.evil; users are
        // expected to write the slash, as with Envoy. Show the difference.
        let loose = MatcherConfig {
            prefix: Some("spiffe://example.org".into()),
            ..Default::default()
        };
        assert!(m(loose).matches(&id("spiffe://example.org.evil/x")));
        let strict = MatcherConfig {
            prefix: Some("spiffe://example.org/".into()),
            ..Default::default()
        };
        assert!(!m(strict).matches(&id("spiffe://example.org.evil/x")));
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
        assert_eq!(
            SpiffeIdMatcher::build(&[ok.clone(), two], None)
                .unwrap_err()
                .0,
            1
        );
        let bad_re = MatcherConfig {
            safe_regex: Some(SafeRegex { regex: "(".into() }),
            ..Default::default()
        };
        assert!(SpiffeIdMatcher::build(&[bad_re], None)
            .unwrap_err()
            .1
            .contains("safe_regex"));
        let bad_exact = MatcherConfig {
            exact: Some("spiffe://example.org/a/../b".into()),
            ..Default::default()
        };
        assert!(SpiffeIdMatcher::build(&[bad_exact], None).is_err());
        let none = MatcherConfig::default();
        assert!(SpiffeIdMatcher::build(&[none], None).is_err());
    }

    #[test]
    fn any_in_trust_domain() {
        let td = parse_trust_domain("example.org").unwrap();
        let all = SpiffeIdMatcher::build(&[], Some(td)).unwrap();
        assert!(all.matches(&id("spiffe://example.org/anything")));
        assert!(!all.matches(&id("spiffe://other.org/anything")));
        assert!(!SpiffeIdMatcher::build(&[], None)
            .unwrap()
            .matches(&id("spiffe://example.org/a")));
    }
}
