//! Values that appear in many places of the file, read one way everywhere: durations,
//! socket endpoints, log filters.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserializer;

/// A gRPC endpoint as users write it: a unix socket or a TCP address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unix(p) => write!(f, "unix://{}", p.display()),
            Self::Tcp(a) => write!(f, "tcp://{a}"),
        }
    }
}

/// Reads a socket address the one way svidcar reads them everywhere, as SPIFFE
/// libraries do: `unix:///path`, `unix:/path` or a bare absolute `/path`; and, where
/// `tcp` allows it, `tcp://IP:PORT`.
pub fn parse_endpoint(addr: &str, tcp: bool) -> Result<Endpoint, String> {
    let expected = if tcp {
        "expected unix:///path/to.sock, unix:/path/to.sock, /path/to.sock or tcp://IP:PORT"
    } else {
        "expected unix:///path/to.sock, unix:/path/to.sock or /path/to.sock"
    };
    if let Some(hp) = addr.strip_prefix("tcp://") {
        if !tcp {
            return Err(format!(
                "{addr:?}: only unix sockets are supported here; {expected}"
            ));
        }
        return hp
            .parse()
            .map(Endpoint::Tcp)
            .map_err(|_| format!("{addr:?}: {expected} (TCP takes an IP address and a port)"));
    }
    let path = if let Some(rest) = addr.strip_prefix("unix://") {
        rest
    } else if let Some(rest) = addr.strip_prefix("unix:") {
        rest
    } else if addr.starts_with('/') {
        addr
    } else {
        return Err(format!("{addr:?}: {expected}"));
    };
    if !path.starts_with('/') {
        return Err(format!(
            "{addr:?}: the socket path must be absolute; {expected}"
        ));
    }
    Ok(Endpoint::Unix(PathBuf::from(path)))
}

/// A Workload API address: a unix socket, written as [`parse_endpoint`] reads them.
pub fn parse_workload_socket(addr: &str) -> Result<PathBuf, String> {
    match parse_endpoint(addr, false)? {
        Endpoint::Unix(p) => Ok(p),
        Endpoint::Tcp(_) => Err(format!("{addr:?}: only unix sockets are supported")),
    }
}

/// The longest duration svidcar accepts anywhere: far beyond any sane timeout or TTL,
/// and far from the overflow of clock arithmetic.
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Parses a human-readable duration (`500ms`, `12s`, `5m`, `1h`), above zero and at
/// most [`MAX_DURATION`].
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let parsed = humantime::parse_duration(s)
        .map_err(|e| format!("invalid duration {s:?}: {e} (write it like 500ms, 12s, 5m or 1h)"))?;
    if parsed.is_zero() {
        return Err("duration must be greater than zero".into());
    }
    if parsed > MAX_DURATION {
        return Err(format!("duration {s:?} is too long (at most 3650d)"));
    }
    Ok(parsed)
}

/// Deserializes a duration through a visitor, so that a bad value is reported at the
/// line of the value itself (an error raised after deserializing points at the
/// enclosing mapping instead).
pub fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = Duration;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a duration like 500ms, 12s, 5m or 1h")
        }
        fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Duration, E> {
            parse_duration(s).map_err(E::custom)
        }
    }
    d.deserialize_str(V)
}

/// The levels a log filter may name; `warning` (Envoy's spelling) means `warn`.
const LOG_LEVELS: [&str; 7] = ["off", "error", "warn", "warning", "info", "debug", "trace"];

/// Checks `log.level` strictly and returns the tracing filter it means. A typo such as
/// `infro` would otherwise be read as a target name and silence every log line.
/// Accepted: a level (`info`), or comma-separated `target=level` directives with at most
/// one bare level (`info,svidcar=debug`).
pub fn log_filter(level: &str) -> Result<String, String> {
    let known = |l: &str| LOG_LEVELS.contains(&l.to_ascii_lowercase().as_str());
    let norm = |l: &str| {
        let l = l.to_ascii_lowercase();
        if l == "warning" {
            "warn".to_string()
        } else {
            l
        }
    };
    let mut out = Vec::new();
    for part in level.split(',').map(str::trim) {
        let directive = match part.split_once('=') {
            Some((target, lvl)) if !target.is_empty() && known(lvl) => {
                format!("{target}={}", norm(lvl))
            }
            None if known(part) => norm(part),
            _ => {
                return Err(format!(
                    "{part:?} is not a log level: write one of error, warn, info, debug, trace, \
                     off, or target=level (e.g. svidcar=debug)"
                ))
            }
        };
        out.push(directive);
    }
    Ok(out.join(","))
}
