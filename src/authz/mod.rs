//! Authorization: whether an authenticated peer may talk to us. The TLS layer proves
//! who the peer is (its SPIFFE ID, checked against its trust domain's bundle); the rules
//! here decide what that ID may do. They are typed values built by `config` once; nothing
//! here reads config types, so a reload can build new rules and swap them.

use regex::Regex;

use crate::spiffe::{SpiffeId, TrustDomain};

/// One allowlist entry, with Envoy's `StringMatcher` semantics on the SPIFFE ID text
/// (so entries can be pasted from `match_subject_alt_names`), or a whole trust domain.
#[derive(Debug, Clone)]
pub enum IdRule {
    /// The value is stored lower-cased when `ignore_case` is set.
    Exact {
        value: String,
        ignore_case: bool,
    },
    Prefix {
        value: String,
        ignore_case: bool,
    },
    Suffix {
        value: String,
        ignore_case: bool,
    },
    Contains {
        value: String,
        ignore_case: bool,
    },
    /// Envoy's `safe_regex` matches the whole string; `ignore_case` has no effect on it.
    Regex(Regex),
    TrustDomain(TrustDomain),
}

/// An ordered list of rules; a peer is allowed when any rule matches its SPIFFE ID.
#[derive(Debug, Clone, Default)]
pub struct SpiffeIdMatcher {
    rules: Vec<IdRule>,
}

impl SpiffeIdMatcher {
    pub fn new(rules: Vec<IdRule>) -> Self {
        Self { rules }
    }

    pub fn matches(&self, id: &SpiffeId) -> bool {
        let text = id.to_string();
        self.rules.iter().any(|r| r.matches(id, &text))
    }
}

impl IdRule {
    fn matches(&self, id: &SpiffeId, text: &str) -> bool {
        let cmp = |ic: bool| {
            if ic {
                std::borrow::Cow::Owned(text.to_ascii_lowercase())
            } else {
                std::borrow::Cow::Borrowed(text)
            }
        };
        match self {
            IdRule::Exact { value, ignore_case } => cmp(*ignore_case) == value.as_str(),
            IdRule::Prefix { value, ignore_case } => cmp(*ignore_case).starts_with(value.as_str()),
            IdRule::Suffix { value, ignore_case } => cmp(*ignore_case).ends_with(value.as_str()),
            IdRule::Contains { value, ignore_case } => cmp(*ignore_case).contains(value.as_str()),
            IdRule::Regex(re) => re.is_match(text),
            IdRule::TrustDomain(td) => id.is_member_of(td),
        }
    }
}
