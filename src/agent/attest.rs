//! Workload attestation from a unix socket's peer credentials, like SPIRE's `unix`
//! attestor: the caller's uid, gid and executable path become selectors, and an entry
//! matches when all of its selectors are among them.

use tokio::net::unix::UCred;

/// Selectors of the process on the other end of the socket.
pub fn selectors(cred: &UCred) -> Vec<String> {
    let mut out = vec![
        format!("unix:uid:{}", cred.uid()),
        format!("unix:gid:{}", cred.gid()),
    ];
    if let Some(pid) = cred.pid() {
        if let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe")) {
            out.push(format!("unix:path:{}", exe.display()));
        }
    }
    out
}

/// Checks that a configured selector is one this attestor can produce.
pub fn validate_selector(s: &str) -> Result<(), String> {
    let (kind, value) = s
        .strip_prefix("unix:")
        .and_then(|r| r.split_once(':'))
        .ok_or_else(|| {
            format!(
                "{s:?}: selectors look like unix:uid:1000, unix:gid:1000 or unix:path:/usr/bin/app"
            )
        })?;
    match kind {
        "uid" | "gid" => value
            .parse::<u32>()
            .map(|_| ())
            .map_err(|_| format!("{s:?}: {kind} must be a number")),
        "path" if value.starts_with('/') => Ok(()),
        "path" => Err(format!("{s:?}: path must be absolute")),
        _ => Err(format!(
            "{s:?}: unknown selector type {kind:?} (uid, gid, path)"
        )),
    }
}

/// An entry matches when every one of its selectors is among the caller's.
pub fn matches(entry: &[String], caller: &[String]) -> bool {
    !entry.is_empty() && entry.iter().all(|s| caller.contains(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subset_matching() {
        let caller = vec!["unix:uid:1000".to_string(), "unix:gid:100".to_string()];
        assert!(matches(&["unix:uid:1000".into()], &caller));
        assert!(matches(
            &["unix:uid:1000".into(), "unix:gid:100".into()],
            &caller
        ));
        assert!(!matches(
            &["unix:uid:1000".into(), "unix:gid:0".into()],
            &caller
        ));
        assert!(!matches(&[], &caller));
    }

    #[test]
    fn selector_syntax() {
        assert!(validate_selector("unix:uid:1000").is_ok());
        assert!(validate_selector("unix:path:/bin/x").is_ok());
        assert!(validate_selector("unix:uid:bob").is_err());
        assert!(validate_selector("k8s:ns:default").is_err());
        assert!(validate_selector("unix:path:bin").is_err());
    }
}
