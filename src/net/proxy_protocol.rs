//! PROXY protocol v2 headers (HAProxy's spec) written to the app before the caller's
//! bytes, for apps that log or limit by client address: the caller's address and port,
//! the TLS facts (ALPN, SNI, version, cipher, "client certificate verified"), and the
//! caller's SPIFFE ID in a custom TLV (0xE0 by default), which no other proxy sends.

use std::net::{IpAddr, SocketAddr};

/// The 12-byte signature that starts every v2 header.
const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Version 2, command PROXY.
const V2_PROXY: u8 = 0x21;
const TCP4: u8 = 0x11;
const TCP6: u8 = 0x21;

const PP2_TYPE_ALPN: u8 = 0x01;
const PP2_TYPE_AUTHORITY: u8 = 0x02;
const PP2_TYPE_SSL: u8 = 0x20;
const PP2_SUBTYPE_SSL_VERSION: u8 = 0x21;
const PP2_SUBTYPE_SSL_CIPHER: u8 = 0x23;
const PP2_CLIENT_SSL: u8 = 0x01;
const PP2_CLIENT_CERT_CONN: u8 = 0x02;
const PP2_CLIENT_CERT_SESS: u8 = 0x04;

/// The custom TLV types the spec reserves for private use.
pub const CUSTOM_TLV_TYPES: std::ops::RangeInclusive<u8> = 0xE0..=0xEF;
pub const DEFAULT_SPIFFE_ID_TLV: u8 = 0xE0;

/// What one header says.
#[derive(Debug, Clone, Default)]
pub struct ProxyHeader<'a> {
    /// The caller, as it connected to us.
    pub source: Option<SocketAddr>,
    /// Where it connected (our listener's address).
    pub destination: Option<SocketAddr>,
    pub alpn: Option<&'a [u8]>,
    /// The server name the caller asked for (SNI).
    pub authority: Option<&'a str>,
    /// `TLSv1.3`, `TLSv1.2`.
    pub tls_version: Option<&'a str>,
    pub cipher: Option<&'a str>,
    /// The caller's SPIFFE ID from its verified certificate.
    pub spiffe_id: Option<&'a str>,
    pub spiffe_id_tlv: u8,
}

fn tlv(out: &mut Vec<u8>, kind: u8, value: &[u8]) {
    // Values here are short (an ID is at most 2048 bytes); longer ones are cut to fit
    // the 16-bit length rather than corrupt the header.
    let value = &value[..value.len().min(u16::MAX as usize)];
    out.push(kind);
    out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    out.extend_from_slice(value);
}

/// IPv4 when both addresses are IPv4; otherwise both as IPv6 (IPv4 ones mapped).
fn addresses(src: SocketAddr, dst: SocketAddr) -> (u8, Vec<u8>) {
    let mut out = Vec::with_capacity(36);
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
            out.extend_from_slice(&src.port().to_be_bytes());
            out.extend_from_slice(&dst.port().to_be_bytes());
            (TCP4, out)
        }
        (s, d) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out.extend_from_slice(&v6(s).octets());
            out.extend_from_slice(&v6(d).octets());
            out.extend_from_slice(&src.port().to_be_bytes());
            out.extend_from_slice(&dst.port().to_be_bytes());
            (TCP6, out)
        }
    }
}

impl ProxyHeader<'_> {
    /// The header's bytes. Without both addresses the family is UNSPEC (the app
    /// keeps the connection's own addresses), as the spec allows.
    pub fn encode(&self) -> Vec<u8> {
        let (family, mut body) = match (self.source, self.destination) {
            (Some(s), Some(d)) => addresses(s, d),
            _ => (0x00, Vec::new()),
        };
        if let Some(alpn) = self.alpn {
            tlv(&mut body, PP2_TYPE_ALPN, alpn);
        }
        if let Some(name) = self.authority {
            tlv(&mut body, PP2_TYPE_AUTHORITY, name.as_bytes());
        }
        if let Some(version) = self.tls_version {
            let mut ssl = vec![PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS];
            // verify: 0 = the client's certificate was verified.
            ssl.extend_from_slice(&0u32.to_be_bytes());
            tlv(&mut ssl, PP2_SUBTYPE_SSL_VERSION, version.as_bytes());
            if let Some(cipher) = self.cipher {
                tlv(&mut ssl, PP2_SUBTYPE_SSL_CIPHER, cipher.as_bytes());
            }
            tlv(&mut body, PP2_TYPE_SSL, &ssl);
        }
        if let Some(id) = self.spiffe_id {
            tlv(&mut body, self.spiffe_id_tlv, id.as_bytes());
        }
        let mut out = Vec::with_capacity(16 + body.len());
        out.extend_from_slice(&SIGNATURE);
        out.push(V2_PROXY);
        out.push(family);
        out.extend_from_slice(&(body.len().min(u16::MAX as usize) as u16).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_header_layout() {
        let h = ProxyHeader {
            source: Some("10.1.2.3:40000".parse().unwrap()),
            destination: Some("10.9.8.7:8443".parse().unwrap()),
            spiffe_id_tlv: DEFAULT_SPIFFE_ID_TLV,
            ..Default::default()
        };
        let b = h.encode();
        assert_eq!(&b[..12], &SIGNATURE);
        assert_eq!(b[12], 0x21);
        assert_eq!(b[13], 0x11);
        assert_eq!(u16::from_be_bytes([b[14], b[15]]), 12);
        assert_eq!(&b[16..20], &[10, 1, 2, 3]);
        assert_eq!(&b[20..24], &[10, 9, 8, 7]);
        assert_eq!(u16::from_be_bytes([b[24], b[25]]), 40000);
        assert_eq!(u16::from_be_bytes([b[26], b[27]]), 8443);
    }

    #[test]
    fn mixed_families_are_written_as_ipv6() {
        let h = ProxyHeader {
            source: Some("[fd10::1]:5000".parse().unwrap()),
            destination: Some("10.0.0.1:80".parse().unwrap()),
            ..Default::default()
        };
        let b = h.encode();
        assert_eq!(b[13], 0x21);
        assert_eq!(u16::from_be_bytes([b[14], b[15]]), 36);
        assert_eq!(
            &b[32..48],
            &"10.0.0.1"
                .parse::<std::net::Ipv4Addr>()
                .unwrap()
                .to_ipv6_mapped()
                .octets()
        );
    }
}
