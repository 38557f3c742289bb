//! SPIFFE ID and trust domain parsing.
//!
//! The `spiffe` crate checks the grammar of the SPIFFE ID spec. It is lenient about
//! case (it lower-cases the scheme and trust domain), so we add one rule on top: an ID
//! must already be in canonical form. A peer presenting `spiffe://Example.org/x` is
//! refused rather than silently treated as `spiffe://example.org/x`.
//!
//! A second rule applies where an ID names a workload (an X509-SVID, our own identity,
//! a dev-agent entry): it must have a path. `spiffe://example.org` names the trust
//! domain itself, and X509-SVID §5.2 forbids it in a leaf.

pub use spiffe::{SpiffeId, TrustDomain};

/// Why a string is not an acceptable SPIFFE ID or trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("invalid SPIFFE ID {input:?}: {reason}")]
    Grammar { input: String, reason: String },
    #[error("SPIFFE ID {input:?} is not in canonical form (expected {canonical:?})")]
    NotCanonical { input: String, canonical: String },
    #[error("SPIFFE ID {input:?} has no path: it names the trust domain, not a workload (X509-SVID §5.2)")]
    NoPath { input: String },
}

/// Parses a SPIFFE ID that must be exactly in canonical form.
pub fn parse_spiffe_id(input: &str) -> Result<SpiffeId, IdError> {
    let id = SpiffeId::new(input).map_err(|e| IdError::Grammar {
        input: input.to_string(),
        reason: e.to_string(),
    })?;
    let canonical = id.to_string();
    if canonical != input {
        return Err(IdError::NotCanonical {
            input: input.to_string(),
            canonical,
        });
    }
    Ok(id)
}

/// Parses the SPIFFE ID of a workload: canonical, and with a non-empty path. Used for
/// every X509-SVID (ours and peers') and every ID that svidcar or the dev-agent issues.
pub fn parse_workload_id(input: &str) -> Result<SpiffeId, IdError> {
    let id = parse_spiffe_id(input)?;
    if id.path().is_empty() {
        return Err(IdError::NoPath {
            input: input.to_string(),
        });
    }
    Ok(id)
}

/// Parses a trust domain given as a bare name (`example.org`) or as its ID
/// (`spiffe://example.org`); in both forms it must be lower-case already.
pub fn parse_trust_domain(input: &str) -> Result<TrustDomain, IdError> {
    let td = TrustDomain::new(input).map_err(|e| IdError::Grammar {
        input: input.to_string(),
        reason: e.to_string(),
    })?;
    let name_ok = td.as_str() == input || td.id_string() == input;
    if !name_ok {
        return Err(IdError::NotCanonical {
            input: input.to_string(),
            canonical: td.as_str().to_string(),
        });
    }
    Ok(td)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_canonical_ids() {
        let id = parse_spiffe_id("spiffe://example.org/ns/default/sa/web").unwrap();
        assert_eq!(id.trust_domain_name(), "example.org");
        assert_eq!(id.path(), "/ns/default/sa/web");
        assert!(parse_spiffe_id("spiffe://example.org").is_ok());
    }

    #[test]
    fn refuses_non_canonical_ids() {
        for bad in [
            "spiffe://Example.org/web",
            "SPIFFE://example.org/web",
            "spiffe://example.org/a/../b",
            "spiffe://example.org/a/./b",
            "spiffe://example.org/a//b",
            "spiffe://example.org/a/",
            "spiffe://example.org/a%2Fb",
            "spiffe://example.org:443/web",
            "spiffe://user@example.org/web",
            "https://example.org/web",
            "spiffe:///web",
            "",
        ] {
            assert!(parse_spiffe_id(bad).is_err(), "{bad} must be refused");
        }
    }

    #[test]
    fn workload_ids_need_a_path() {
        assert!(parse_workload_id("spiffe://example.org/web").is_ok());
        let e = parse_workload_id("spiffe://example.org").unwrap_err();
        assert!(matches!(e, IdError::NoPath { .. }), "{e}");
        assert!(e.to_string().contains("has no path"), "{e}");
        assert!(parse_workload_id("spiffe://example.org/a//b").is_err());
    }

    #[test]
    fn trust_domain_forms() {
        assert_eq!(
            parse_trust_domain("example.org").unwrap().as_str(),
            "example.org"
        );
        assert_eq!(
            parse_trust_domain("spiffe://example.org").unwrap().as_str(),
            "example.org"
        );
        assert!(parse_trust_domain("Example.org").is_err());
        assert!(parse_trust_domain("example.org:80").is_err());
    }
}

#[cfg(test)]
mod properties {
    //! Generated IDs: whatever the text, parsing does not panic; what is accepted is
    //! exactly its canonical form; every ID the spec's grammar allows is accepted.
    use super::*;
    use proptest::prelude::*;

    fn trust_domain() -> impl Strategy<Value = String> {
        "[a-z0-9._-]{1,30}"
    }

    fn segment() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9._-]{1,12}".prop_filter("dot segment", |s| s != "." && s != "..")
    }

    fn valid_id() -> impl Strategy<Value = String> {
        (trust_domain(), prop::collection::vec(segment(), 1..6))
            .prop_map(|(td, segs)| format!("spiffe://{td}/{}", segs.join("/")))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        #[test]
        fn accepted_ids_are_canonical(input in prop_oneof![
            any::<String>(),
            "spiffe://[a-zA-Z0-9.:_%/-]{0,40}",
            "[sS][pP][iI][fF][fF][eE]://[a-z.]{0,10}(/[a-z.%]{0,5}){0,4}",
        ]) {
            if let Ok(id) = parse_spiffe_id(&input) {
                prop_assert_eq!(id.to_string(), input.clone());
                prop_assert!(!id.trust_domain_name().bytes().any(|b| b.is_ascii_uppercase()));
                prop_assert!(parse_trust_domain(id.trust_domain_name()).is_ok());
            }
            if let Ok(id) = parse_workload_id(&input) {
                prop_assert!(!id.path().is_empty());
            }
        }

        #[test]
        fn grammar_ids_are_accepted(input in valid_id()) {
            let id = parse_workload_id(&input).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(id.to_string(), input);
        }

        #[test]
        fn upper_case_trust_domains_are_refused(input in valid_id(), at in any::<prop::sample::Index>()) {
            let td_end = input[9..].find('/').map(|i| i + 9).unwrap_or(input.len());
            let letters: Vec<usize> = (9..td_end).filter(|&i| input.as_bytes()[i].is_ascii_lowercase()).collect();
            if letters.is_empty() { return Ok(()) }
            let i = letters[at.index(letters.len())];
            let mut shouted = input.into_bytes();
            shouted[i] = shouted[i].to_ascii_uppercase();
            let shouted = String::from_utf8(shouted).expect("ASCII");
            prop_assert!(parse_spiffe_id(&shouted).is_err());
        }

        #[test]
        fn trust_domains(input in prop_oneof![any::<String>(), "(spiffe://)?[a-zA-Z0-9._/:-]{0,30}"]) {
            if let Ok(td) = parse_trust_domain(&input) {
                prop_assert!(td.as_str() == input || td.id_string() == input);
                prop_assert!(!td.as_str().bytes().any(|b| b.is_ascii_uppercase()));
            }
        }
    }
}
