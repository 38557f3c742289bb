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

/// Appends one TLV to `out`, which becomes the value of a 16-bit length (the header's
/// or an enclosing TLV's). Values here are short (an ID is at most 2048 bytes, SNI and
/// ALPN 255); one that would push `out` past that length is left out whole rather than
/// cut or let corrupt the length.
fn tlv(out: &mut Vec<u8>, kind: u8, value: &[u8]) {
    if out.len() + 3 + value.len() > usize::from(u16::MAX) {
        return;
    }
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
        // `tlv` keeps the body within a 16-bit length.
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
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

#[cfg(test)]
mod properties {
    //! Round trip through an independent parser (the `ppp` crate): whatever the
    //! addresses and TLV values, the header parses, says what was written, and its
    //! length covers exactly its bytes.
    use super::*;
    use proptest::prelude::*;

    fn addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::from((ip, p))),
            (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::from((ip, p))),
        ]
    }

    fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            8 => prop::collection::vec(any::<u8>(), 0..64),
            1 => prop::collection::vec(any::<u8>(), 0..max),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn round_trip_through_ppp(
            addrs in prop::option::of((addr(), addr())),
            alpn in prop::option::of(bytes(300)),
            authority in prop::option::of("[ -~]{0,300}"),
            version in prop::option::of("TLSv1\\.[23]"),
            cipher in prop::option::of("[A-Z0-9_]{0,40}"),
            id in prop::option::of(prop_oneof!["spiffe://[a-z.]{1,20}/[a-z/]{1,40}", "[ -~]{0,70000}"]),
            tlv_type in CUSTOM_TLV_TYPES,
        ) {
            let header = ProxyHeader {
                source: addrs.map(|a| a.0),
                destination: addrs.map(|a| a.1),
                alpn: alpn.as_deref(),
                authority: authority.as_deref(),
                tls_version: version.as_deref(),
                cipher: cipher.as_deref(),
                spiffe_id: id.as_deref(),
                spiffe_id_tlv: tlv_type,
            };
            let bytes = header.encode();
            prop_assert_eq!(usize::from(u16::from_be_bytes([bytes[14], bytes[15]])) + 16, bytes.len());
            let parsed = ppp::v2::Header::try_from(&bytes[..])
                .map_err(|e| TestCaseError::fail(format!("ppp refused the header: {e:?}")))?;
            prop_assert_eq!(parsed.command, ppp::v2::Command::Proxy);
            match (addrs, parsed.addresses) {
                (None, ppp::v2::Addresses::Unspecified) => {}
                (Some((s, d)), ppp::v2::Addresses::IPv4(a)) => {
                    prop_assert_eq!(SocketAddr::from((a.source_address, a.source_port)), s);
                    prop_assert_eq!(SocketAddr::from((a.destination_address, a.destination_port)), d);
                }
                (Some((s, d)), ppp::v2::Addresses::IPv6(a)) => {
                    prop_assert!(s.is_ipv6() || d.is_ipv6());
                    let v6 = |ip: IpAddr| match ip {
                        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                        IpAddr::V6(v6) => v6,
                    };
                    prop_assert_eq!((a.source_address, a.source_port), (v6(s.ip()), s.port()));
                    prop_assert_eq!((a.destination_address, a.destination_port), (v6(d.ip()), d.port()));
                }
                (want, got) => prop_assert!(false, "wrote {:?}, ppp read {:?}", want, got),
            }
            // ppp reads no TLVs after an UNSPEC address block (svidcar writes one only
            // when a connection's addresses are unknown).
            if addrs.is_none() {
                return Ok(());
            }
            let tlvs: Vec<(u8, Vec<u8>)> = parsed
                .tlvs()
                .map(|t| t.map(|t| (t.kind, t.value.to_vec())))
                .collect::<Result<_, _>>()
                .map_err(|e| TestCaseError::fail(format!("ppp refused a TLV: {e:?}")))?;
            let find = |kind: u8| tlvs.iter().find(|(k, _)| *k == kind).map(|(_, v)| v.clone());
            // Every value that fits is there, byte for byte, in the order written.
            if let (Some(id), true) = (&id, id.as_ref().is_some_and(|i| i.len() < 60000)) {
                prop_assert_eq!(find(tlv_type), Some(id.as_bytes().to_vec()));
            }
            if let Some(alpn) = &alpn {
                prop_assert_eq!(find(PP2_TYPE_ALPN), Some(alpn.clone()));
            }
            if let Some(name) = &authority {
                prop_assert_eq!(find(PP2_TYPE_AUTHORITY), Some(name.as_bytes().to_vec()));
            }
            prop_assert_eq!(find(PP2_TYPE_SSL).is_some(), version.is_some());
        }
    }
}
