//! Envoy's `StringMatcher` on text, in one place: SPIFFE ID allowlists and HTTP rules
//! (principals, paths) both match through it. Matching compares in place and allocates
//! nothing, because it runs on every handshake and every request.

use regex::Regex;

/// Envoy `StringMatcher` semantics on some text. With `ignore_case` the value is stored
/// lower-cased and compared ASCII-case-insensitively in place (no lower-cased copy of
/// the input is made).
#[derive(Debug, Clone)]
pub enum StrMatch {
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
    /// Whole-string match (anchored when compiled, as RE2 FullMatch in Envoy).
    Regex(Regex),
}

fn eq(a: &[u8], b: &[u8], ignore_case: bool) -> bool {
    if ignore_case {
        a.eq_ignore_ascii_case(b)
    } else {
        a == b
    }
}

impl StrMatch {
    pub fn matches(&self, text: &str) -> bool {
        let t = text.as_bytes();
        match self {
            StrMatch::Exact { value, ignore_case } => eq(t, value.as_bytes(), *ignore_case),
            StrMatch::Prefix { value, ignore_case } => {
                let v = value.as_bytes();
                t.len() >= v.len() && eq(&t[..v.len()], v, *ignore_case)
            }
            StrMatch::Suffix { value, ignore_case } => {
                let v = value.as_bytes();
                t.len() >= v.len() && eq(&t[t.len() - v.len()..], v, *ignore_case)
            }
            StrMatch::Contains { value, ignore_case } => {
                let v = value.as_bytes();
                if !*ignore_case {
                    return text.contains(value.as_str());
                }
                v.is_empty() || t.windows(v.len()).any(|w| w.eq_ignore_ascii_case(v))
            }
            StrMatch::Regex(re) => re.is_match(text),
        }
    }
}
