//! Authorization: whether an authenticated peer may talk to us. The TLS layer proves
//! who the peer is and hands over a [`PeerIdentity`]; the rules here decide what that
//! identity may do. They are typed values built by `config` once; nothing here reads
//! config types, and a listener holds its rules in a [`PeerPolicy`] so a reload can
//! swap them while connections are being accepted.

mod decision_cache;
pub mod http_rules;
mod idle;
mod input_refs;
pub mod opa;
mod opa_error;
mod rego_recursion;
mod rego_vm;
pub mod string_match;

pub use string_match::StrMatch;

use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;

use crate::spiffe::{SpiffeId, TrustDomain};

pub mod rego;

/// Who an authenticated peer is: what its X509-SVID proved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    pub spiffe_id: SpiffeId,
    /// The ID as text (canonical: that is how it was accepted), made once per handshake
    /// for matching, logs and headers.
    pub uri: String,
    /// SHA-256 of the leaf certificate's DER (XFCC's `Hash`).
    pub leaf_sha256: [u8; 32],
    pub not_after: SystemTime,
}

impl PeerIdentity {
    pub fn new(spiffe_id: SpiffeId, leaf_sha256: [u8; 32], not_after: SystemTime) -> Self {
        Self {
            uri: spiffe_id.to_string(),
            spiffe_id,
            leaf_sha256,
            not_after,
        }
    }
}

/// Why a peer was refused by policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("SPIFFE ID {0} not allowed")]
    NotAllowed(String),
}

/// The peer rules of one listener, swappable as a whole. A handshake loads them once
/// (lock-free), so a swap applies to the next connection and never to half of one.
#[derive(Debug, Clone)]
pub struct PeerPolicy(Arc<ArcSwap<SpiffeIdMatcher>>);

impl PeerPolicy {
    pub fn new(matcher: SpiffeIdMatcher) -> Self {
        Self(Arc::new(ArcSwap::from_pointee(matcher)))
    }

    /// Replaces the rules for connections accepted from now on.
    pub fn swap(&self, matcher: SpiffeIdMatcher) {
        self.0.store(Arc::new(matcher));
    }

    /// Takes the rules `other` has now (a scope that was removed falls back to them).
    pub fn follow(&self, other: &PeerPolicy) {
        self.0.store(other.0.load_full());
    }

    pub fn check(&self, peer: &PeerIdentity) -> Result<(), Denied> {
        if self.0.load().matches(peer) {
            Ok(())
        } else {
            Err(Denied::NotAllowed(peer.uri.clone()))
        }
    }
}

/// One allowlist entry: an Envoy `StringMatcher` on the SPIFFE ID text (so entries can
/// be pasted from `match_subject_alt_names`), or a whole trust domain.
#[derive(Debug, Clone)]
pub enum IdRule {
    Text(StrMatch),
    TrustDomain(TrustDomain),
}

/// An allowlist as configured. "Any ID of our own trust domain" stays symbolic until
/// our SVID is loaded: with the `files` and `workload_api` sources the config does not
/// say which trust domain we are in.
#[derive(Debug, Clone, Default)]
pub struct AllowList {
    pub rules: Vec<IdRule>,
    pub any_in_own_trust_domain: bool,
}

impl AllowList {
    /// The matcher for a workload in `own`.
    pub fn matcher(&self, own: &TrustDomain) -> SpiffeIdMatcher {
        let mut rules = self.rules.clone();
        if self.any_in_own_trust_domain {
            rules.push(IdRule::TrustDomain(own.clone()));
        }
        SpiffeIdMatcher::new(rules)
    }
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

    pub fn matches(&self, peer: &PeerIdentity) -> bool {
        self.rules
            .iter()
            .any(|r| r.matches(&peer.spiffe_id, &peer.uri))
    }

    /// [`Self::matches`] for an ID alone (tests, tools).
    pub fn matches_id(&self, id: &SpiffeId) -> bool {
        self.matches(&PeerIdentity::new(
            id.clone(),
            [0; 32],
            SystemTime::UNIX_EPOCH,
        ))
    }
}

impl IdRule {
    fn matches(&self, id: &SpiffeId, text: &str) -> bool {
        match self {
            IdRule::Text(m) => m.matches(text),
            IdRule::TrustDomain(td) => id.is_member_of(td),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spiffe::parse_workload_id;

    fn peer(id: &str) -> PeerIdentity {
        PeerIdentity::new(parse_workload_id(id).unwrap(), [0; 32], SystemTime::now())
    }

    #[test]
    fn a_swapped_policy_applies_to_the_next_check() {
        let only = |id: &str| {
            SpiffeIdMatcher::new(vec![IdRule::Text(StrMatch::Exact {
                value: id.into(),
                ignore_case: false,
            })])
        };
        let policy = PeerPolicy::new(only("spiffe://example.org/a"));
        let shared = policy.clone();
        assert!(policy.check(&peer("spiffe://example.org/a")).is_ok());
        shared.swap(only("spiffe://example.org/b"));
        assert_eq!(
            policy.check(&peer("spiffe://example.org/a")),
            Err(Denied::NotAllowed("spiffe://example.org/a".into()))
        );
        assert!(policy.check(&peer("spiffe://example.org/b")).is_ok());
    }

    #[test]
    fn own_trust_domain_is_bound_when_the_matcher_is_made() {
        let list = AllowList {
            rules: Vec::new(),
            any_in_own_trust_domain: true,
        };
        let td = crate::spiffe::parse_trust_domain("example.org").unwrap();
        let m = list.matcher(&td);
        assert!(m.matches(&peer("spiffe://example.org/x")));
        assert!(!m.matches(&peer("spiffe://other.org/x")));
    }
}
