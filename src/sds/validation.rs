//! Which validation context an Envoy gets, decided per stream from the node it sends,
//! the way SPIRE Agent's SDS does: Envoy's SPIFFE certificate validator
//! (`envoy.tls.cert_validator.spiffe`) for Envoy 1.18 or newer, `trusted_ca` for older
//! Envoys and for clients that send no build version. The SPIFFE validator is what
//! makes Envoy itself enforce the X.509-SVID rules (one URI SAN, a SPIFFE ID with a
//! path, the trust domain's own roots); `trusted_ca` only checks the chain.

use prost_types::value::Kind;

use crate::proto::envoy::config::core::v3::{node::UserAgentVersionType, Node};

/// Node metadata key with which one Envoy opts out of (or, when the global switch is
/// on, back into) the SPIFFE validator; SPIRE's name.
pub const DISABLE_KEY: &str = "disable_spiffe_cert_validation";

/// True when bundles for this node go out with the SPIFFE validator.
///
/// `disabled_globally` is `sds.disable_spiffe_cert_validation`. A node metadata value
/// under [`DISABLE_KEY`] (a bool, or a string Go's `strconv.ParseBool` accepts)
/// overrides it for that node, either way, as in SPIRE; any other value is ignored.
pub fn spiffe_validator_for(node: Option<&Node>, disabled_globally: bool) -> bool {
    let Some(node) = node else {
        return false;
    };
    let disabled = node
        .metadata
        .as_ref()
        .and_then(|m| m.fields.get(DISABLE_KEY))
        .and_then(|v| v.kind.as_ref())
        .and_then(parse_bool)
        .unwrap_or(disabled_globally);
    !disabled && supports_spiffe_validator(node)
}

/// Envoy 1.18 was the first with the SPIFFE validator; the version comes from
/// `user_agent_build_version` (Envoy always sends it), never from the free-form string.
fn supports_spiffe_validator(node: &Node) -> bool {
    match &node.user_agent_version_type {
        Some(UserAgentVersionType::UserAgentBuildVersion(b)) => b
            .version
            .as_ref()
            .is_some_and(|v| v.major_number > 1 || (v.major_number == 1 && v.minor_number >= 18)),
        _ => false,
    }
}

/// A bool, or the strings Go's `strconv.ParseBool` takes (SPIRE reads the key with it).
fn parse_bool(k: &Kind) -> Option<bool> {
    match k {
        Kind::BoolValue(b) => Some(*b),
        Kind::StringValue(s) => match s.as_str() {
            "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
            "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::envoy::config::core::v3::{BuildVersion, SemanticVersion};

    fn node(version: Option<(u32, u32)>, meta: Option<Kind>) -> Node {
        Node {
            user_agent_version_type: version.map(|(major_number, minor_number)| {
                UserAgentVersionType::UserAgentBuildVersion(BuildVersion {
                    version: Some(SemanticVersion {
                        major_number,
                        minor_number,
                        patch: 0,
                    }),
                    metadata: None,
                })
            }),
            metadata: meta.map(|k| prost_types::Struct {
                fields: [(
                    DISABLE_KEY.to_string(),
                    prost_types::Value { kind: Some(k) },
                )]
                .into(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn spire_rules() {
        let s = |v: &str| Some(Kind::StringValue(v.into()));
        assert!(!spiffe_validator_for(None, false));
        assert!(!spiffe_validator_for(Some(&node(None, None)), false));
        assert!(!spiffe_validator_for(
            Some(&node(Some((1, 17)), None)),
            false
        ));
        assert!(spiffe_validator_for(
            Some(&node(Some((1, 18)), None)),
            false
        ));
        assert!(spiffe_validator_for(
            Some(&node(Some((1, 40)), None)),
            false
        ));
        assert!(spiffe_validator_for(Some(&node(Some((2, 0)), None)), false));
        // Global switch, and per-node metadata overriding it both ways.
        assert!(!spiffe_validator_for(
            Some(&node(Some((1, 40)), None)),
            true
        ));
        assert!(!spiffe_validator_for(
            Some(&node(Some((1, 40)), Some(Kind::BoolValue(true)))),
            false
        ));
        assert!(!spiffe_validator_for(
            Some(&node(Some((1, 40)), s("True"))),
            false
        ));
        assert!(spiffe_validator_for(
            Some(&node(Some((1, 40)), s("false"))),
            true
        ));
        // A value SPIRE cannot read leaves the global setting.
        assert!(spiffe_validator_for(
            Some(&node(Some((1, 40)), s("yes"))),
            false
        ));
        assert!(!spiffe_validator_for(
            Some(&node(Some((1, 40)), s("yes"))),
            true
        ));
        // Metadata never turns the validator on for an old Envoy.
        assert!(!spiffe_validator_for(
            Some(&node(Some((1, 17)), s("false"))),
            false
        ));
    }
}
