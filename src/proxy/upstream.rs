//! The upstream layer: where a connection goes and how svidcar gets there. One place
//! connects (DNS answers cached, timeout, socket options, failures logged and counted);
//! one originates mTLS. Outbound TCP uses both; transparent outbound and the HTTP
//! client pool are meant to use the same two.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::IntCounter;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::handshake;
use crate::net::HostPort;
use crate::tls::Rejection;

/// How long a DNS answer is used before it is asked again (Envoy's default
/// `dns_refresh_rate` is 5 s too). A failed connect forgets it at once.
const DNS_TTL: Duration = Duration::from_secs(5);

/// Where a listener sends its connections.
#[derive(Debug, Clone)]
pub enum Target {
    /// A configured `host:port`.
    Fixed(HostPort),
    /// Where the client meant to go, recovered from a redirect rule.
    OriginalDst,
}

/// Opens TCP connections to a target.
pub struct Connector {
    listener: Arc<str>,
    target: Target,
    timeout: Duration,
    failed: IntCounter,
    dns: DnsCache,
}

impl Connector {
    pub fn new(listener: Arc<str>, target: Target, timeout: Duration, failed: IntCounter) -> Self {
        Self {
            listener,
            target,
            timeout,
            failed,
            dns: DnsCache::default(),
        }
    }

    /// The target as logs show it.
    pub fn describe(&self) -> String {
        match &self.target {
            Target::Fixed(hp) => hp.to_string(),
            Target::OriginalDst => "the original destination".into(),
        }
    }

    /// Connects within the timeout, trying each address in turn; `None` when it cannot
    /// (logged and counted here).
    pub async fn connect(&self, original_dst: Option<SocketAddr>) -> Option<TcpStream> {
        let res = tokio::time::timeout(self.timeout, self.try_connect(original_dst)).await;
        let err = match res {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                return Some(s);
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("timed out after {:?}", self.timeout),
        };
        self.dns.forget();
        self.failed.inc();
        tracing::warn!(listener = %self.listener, upstream = %self.describe(), "cannot connect upstream: {err}");
        None
    }

    async fn try_connect(&self, original_dst: Option<SocketAddr>) -> io::Result<TcpStream> {
        let hp = match &self.target {
            Target::Fixed(hp) => hp,
            Target::OriginalDst => {
                let addr = original_dst.ok_or_else(|| {
                    io::Error::new(io::ErrorKind::NotFound, "no original destination")
                })?;
                return TcpStream::connect(addr).await;
            }
        };
        if let Some(addr) = hp.socket_addr() {
            return TcpStream::connect(addr).await;
        }
        let addrs = self.dns.resolve(hp).await?;
        let mut last = None;
        for addr in addrs.iter() {
            match TcpStream::connect(addr).await {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("{hp}: no address"))
        }))
    }
}

/// The last DNS answer for one name, shared by every connection of a listener.
#[derive(Default)]
struct DnsCache {
    answer: Mutex<Option<(Instant, Arc<[SocketAddr]>)>>,
}

impl DnsCache {
    async fn resolve(&self, hp: &HostPort) -> io::Result<Arc<[SocketAddr]>> {
        let stale = {
            let guard = self.answer.lock().unwrap_or_else(|p| p.into_inner());
            match &*guard {
                Some((at, addrs)) if at.elapsed() < DNS_TTL => return Ok(addrs.clone()),
                other => other.as_ref().map(|(_, a)| a.clone()),
            }
        };
        match tokio::net::lookup_host((hp.host(), hp.port())).await {
            Ok(found) => {
                let addrs: Arc<[SocketAddr]> = found.collect();
                if addrs.is_empty() {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("{hp}: no address"),
                    ));
                }
                *self.answer.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some((Instant::now(), addrs.clone()));
                Ok(addrs)
            }
            // The resolver is down for a moment: the last answer is better than none.
            Err(e) => stale.ok_or(e),
        }
    }

    fn forget(&self) {
        *self.answer.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// Originates mTLS with our SVID; the server's SPIFFE ID is checked inside the
/// handshake (the connector's verifier), before any byte of the app is sent.
pub struct MtlsOriginator {
    pub connector: TlsConnector,
    pub server_name: ServerName<'static>,
    pub handshake_timeout: Duration,
}

impl MtlsOriginator {
    pub async fn originate(&self, tcp: TcpStream) -> Result<TlsStream<TcpStream>, Rejection> {
        let connect = self.connector.connect(self.server_name.clone(), tcp);
        handshake(self.handshake_timeout, connect).await
    }
}
