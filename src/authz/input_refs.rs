//! Which top-level `input` keys a set of Rego policies can read.
//!
//! Building the full input (OPA-Envoy's `attributes` with every header, `parsed_path`,
//! `parsed_query`...) costs more than evaluating a small seed-style policy that reads only
//! `input.method` and `input.path`. A policy can reach `input` only through the `input`
//! keyword, so a scan of its text tells which top-level keys it may read: every
//! `input.KEY` names one; any other use of the word (`input[...]`, `walk(input, ...)`,
//! `x := input`, `import input`) may read anything, and then the whole input is built.
//! The scan over-approximates on purpose: comments and strings that mention `input.x`
//! only add keys.

use std::collections::BTreeSet;

/// The top-level input keys the policies may read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InputKeys {
    /// Some use of `input` is not `input.KEY`: build everything.
    All,
    /// Only these keys are ever read.
    Only(BTreeSet<String>),
}

impl InputKeys {
    /// Scans the policy texts.
    pub fn of_sources<'a>(texts: impl IntoIterator<Item = &'a str>) -> Self {
        let mut keys = BTreeSet::new();
        for text in texts {
            if !scan(text, &mut keys) {
                return InputKeys::All;
            }
        }
        InputKeys::Only(keys)
    }

    /// Whether `key` must be in the input.
    pub fn wants(&self, key: &str) -> bool {
        match self {
            InputKeys::All => true,
            InputKeys::Only(keys) => keys.contains(key),
        }
    }
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// Adds the keys of every `input.KEY` in `text`; false when `input` is used another way.
fn scan(text: &str, keys: &mut BTreeSet<String>) -> bool {
    let bytes = text.as_bytes();
    let mut from = 0;
    while let Some(at) = text[from..].find("input") {
        let start = from + at;
        let end = start + "input".len();
        from = end;
        // A word of its own: `my_input.x` and `inputs` are other identifiers.
        if start > 0 && is_ident(bytes[start - 1]) {
            continue;
        }
        if end < bytes.len() && is_ident(bytes[end]) {
            continue;
        }
        if bytes.get(end) != Some(&b'.') {
            return false;
        }
        let key_len = bytes[end + 1..]
            .iter()
            .take_while(|b| is_ident(**b))
            .count();
        if key_len == 0 {
            return false;
        }
        keys.insert(text[end + 1..end + 1 + key_len].to_string());
        from = end + 1 + key_len;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(text: &str) -> InputKeys {
        InputKeys::of_sources([text])
    }

    fn only(list: &[&str]) -> InputKeys {
        InputKeys::Only(list.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn seed_style_policy_reads_three_keys() {
        let policy = r#"
package authz
default allow = false
allow {
  input.client_spiffe_id == "spiffe://example.org/payment"
  input.method == "GET"
  startswith(input.path, "/v1/users/")
}"#;
        assert_eq!(keys(policy), only(&["client_spiffe_id", "method", "path"]));
    }

    #[test]
    fn opa_envoy_import_names_attributes() {
        let policy = r#"
package envoy.authz
import input.attributes.request.http as http_request
allow if http_request.method == "GET"
allow if input.parsed_path[0] == "health"
"#;
        assert_eq!(keys(policy), only(&["attributes", "parsed_path"]));
    }

    #[test]
    fn any_other_use_of_input_means_all() {
        for policy in [
            "allow if input[\"method\"] == \"GET\"",
            "allow if { x := input; x.method == \"GET\" }",
            "allow if walk(input, [p, v])",
            "import input\nallow if input.method == \"GET\"",
            "allow if object.get(input, \"method\", \"\") == \"GET\"",
            "allow if input . method == \"GET\"",
            "allow if input.",
        ] {
            assert_eq!(keys(policy), InputKeys::All, "{policy}");
        }
    }

    #[test]
    fn other_identifiers_containing_input_are_not_input() {
        let policy = "my_input := 1\ninputs := 2\nallow if { my_input.x; input.method }";
        assert_eq!(keys(policy), only(&["method"]));
    }

    #[test]
    fn keys_from_every_file() {
        let k = InputKeys::of_sources(["allow if input.method", "deny if input.jwt_claims.sub"]);
        assert!(k.wants("method") && k.wants("jwt_claims") && !k.wants("attributes"));
        let all = InputKeys::of_sources(["allow if input.method", "deny if input == {}"]);
        assert!(all.wants("attributes"));
    }
}
