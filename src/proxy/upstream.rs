//! The upstream layer: where a connection goes and how svidcar gets there. One place
//! connects (DNS answers cached, timeout, socket options, failures logged and counted);
//! one originates mTLS. Outbound TCP uses both; transparent outbound and the HTTP
//! client pool are meant to use the same two.

use std::collections::HashSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::IntCounter;
use rustls_pki_types::ServerName;
use tokio::net::{TcpSocket, TcpStream};
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
    /// The app in this pod, on the port the client meant: `127.0.0.1:<original port>`.
    LoopbackAtOriginalPort,
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
            Target::LoopbackAtOriginalPort => "127.0.0.1:<original port>".into(),
        }
    }

    /// Connects within the timeout, trying each address in turn; `None` when it cannot
    /// (logged and counted here).
    pub async fn connect(&self, original_dst: Option<SocketAddr>) -> Option<TcpStream> {
        self.connect_tracked(original_dst).await.map(|(s, _)| s)
    }

    /// As [`Self::connect`]; a connection to an original destination also comes with
    /// an [`OwnPort`]: while it lives, a connection from that port back to svidcar is
    /// known to be svidcar's own (a redirect rule that misses the proxy's uid).
    pub async fn connect_tracked(
        &self,
        original_dst: Option<SocketAddr>,
    ) -> Option<(TcpStream, Option<OwnPort>)> {
        let res = tokio::time::timeout(self.timeout, self.try_connect(original_dst)).await;
        let err = match res {
            Ok(Ok((s, own))) => {
                let _ = s.set_nodelay(true);
                return Some((s, own));
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("timed out after {:?}", self.timeout),
        };
        self.dns.forget();
        self.failed.inc();
        tracing::warn!(listener = %self.listener, upstream = %self.describe(), "cannot connect upstream: {err}");
        None
    }

    async fn try_connect(
        &self,
        original_dst: Option<SocketAddr>,
    ) -> io::Result<(TcpStream, Option<OwnPort>)> {
        let original = || {
            original_dst
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no original destination"))
        };
        let hp = match &self.target {
            Target::Fixed(hp) => hp,
            Target::OriginalDst => return connect_own(original()?).await,
            Target::LoopbackAtOriginalPort => {
                let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), original()?.port());
                return Ok((TcpStream::connect(addr).await?, None));
            }
        };
        if let Some(addr) = hp.socket_addr() {
            return Ok((TcpStream::connect(addr).await?, None));
        }
        let addrs = self.dns.resolve(hp).await?;
        let mut last = None;
        for addr in addrs.iter() {
            match TcpStream::connect(addr).await {
                Ok(s) => return Ok((s, None)),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("{hp}: no address"))
        }))
    }
}

/// Local ports of svidcar's own connections to original destinations, in flight.
static OWN_PORTS: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A port in [`OWN_PORTS`], removed when dropped.
#[derive(Debug)]
pub struct OwnPort(u16);

impl Drop for OwnPort {
    fn drop(&mut self) {
        let mut ports = OWN_PORTS.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(set) = ports.as_mut() {
            set.remove(&self.0);
        }
    }
}

/// Whether a connection from `peer` is one svidcar itself is making: it came back
/// through a redirect rule that misses the proxy's uid.
pub fn is_own_connection(peer: SocketAddr) -> bool {
    let ports = OWN_PORTS.lock().unwrap_or_else(|p| p.into_inner());
    ports.as_ref().is_some_and(|s| s.contains(&peer.port()))
}

/// Connects to `addr` from a port registered before the SYN leaves: a looped
/// connection can be accepted before `connect` returns.
async fn connect_own(addr: SocketAddr) -> io::Result<(TcpStream, Option<OwnPort>)> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    let any: SocketAddr = match addr {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    socket.bind(any)?;
    let port = socket.local_addr()?.port();
    OWN_PORTS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert_with(HashSet::new)
        .insert(port);
    let own = OwnPort(port);
    let stream = socket.connect(addr).await?;
    Ok((stream, Some(own)))
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
    /// `None`: the destination's IP address (no SNI is sent for an IP).
    pub server_name: Option<ServerName<'static>>,
    pub handshake_timeout: Duration,
    /// The verifier inside `connector`, for checking live connections again.
    pub verifier: Arc<crate::tls::SpiffeVerifier>,
}

impl MtlsOriginator {
    pub async fn originate(&self, tcp: TcpStream) -> Result<TlsStream<TcpStream>, Rejection> {
        if self.verifier.own_identity_expired() {
            return Err(Rejection::IdentityExpired);
        }
        let name = match &self.server_name {
            Some(n) => n.clone(),
            None => {
                let ip = tcp
                    .peer_addr()
                    .map_err(|e| Rejection::Protocol(e.to_string()))?
                    .ip();
                ServerName::IpAddress(crate::config::canonical_ip(ip).into())
            }
        };
        let connect = self.connector.connect(name, tcp);
        handshake(self.handshake_timeout, connect).await
    }
}
