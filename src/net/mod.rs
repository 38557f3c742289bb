//! Addresses and sockets: `host:port` targets, accept errors told apart, original
//! destinations of redirected connections, unix sockets (bind safely, connect as a
//! gRPC channel).

pub mod accept;
mod original_dst;
pub mod proxy_protocol;
pub mod unix;

pub use original_dst::original_dst;

use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// A `host:port` as users write it for an upstream: a DNS name or an IP literal
/// (`[v6]:port` too). The IP is parsed once, so literal addresses never touch DNS.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPort {
    host: String,
    port: u16,
    ip: Option<IpAddr>,
}

impl HostPort {
    /// Splits and checks `host:port`; the problem in words otherwise.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("{s:?} is not host:port"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| format!("{s:?}: port {port:?} is not a number from 1 to 65535"))?;
        if port == 0 {
            return Err(format!("{s:?}: port must not be 0"));
        }
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("{s:?}: host is empty"));
        }
        Ok(Self {
            host: host.to_string(),
            port,
            ip: host.parse().ok(),
        })
    }

    /// The host without brackets: what SNI and DNS take.
    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The socket address when the host is an IP literal.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        self.ip.map(|ip| SocketAddr::new(ip, self.port))
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip {
            Some(IpAddr::V6(_)) => write!(f, "[{}]:{}", self.host, self.port),
            _ => write!(f, "{}:{}", self.host, self.port),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port() {
        let hp = |s| HostPort::parse(s).map(|h| (h.host().to_string(), h.port()));
        assert_eq!(hp("a.b:80").unwrap(), ("a.b".into(), 80));
        assert_eq!(hp("[::1]:80").unwrap(), ("::1".into(), 80));
        assert!(hp("a.b").is_err());
        assert!(hp("a.b:0").is_err());
        assert!(hp(":80").is_err());
        let v6 = HostPort::parse("[::1]:80").unwrap();
        assert_eq!(v6.to_string(), "[::1]:80");
        assert_eq!(v6.socket_addr(), Some("[::1]:80".parse().unwrap()));
        assert_eq!(HostPort::parse("a.b:80").unwrap().socket_addr(), None);
    }
}
