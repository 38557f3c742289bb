//! `x-forwarded-client-cert` (XFCC) exactly as Envoy 1.40 writes it: the five
//! `forward_client_cert_details` modes, the `set_current_client_cert_details` fields, and
//! the byte layout of the element this hop adds (`By`, `Hash`, `Cert`, `Chain`, `Subject`,
//! `URI`, `DNS`, joined by `;`; hops joined by `,`).
//!
//! Byte identity with Envoy matters because policies written for Envoy meshes split the
//! header by position and compare strings; a different escape or field order would make
//! them silently fail to match. `tests/xfcc.rs` compares this module with a real Envoy.
//!
//! Pure code, no I/O. Use in two steps, because the element depends only on the
//! connection: [`Xfcc::connection`] once after the TLS handshake (parses the peer leaf),
//! then [`ConnXfcc::apply`] (or [`ConnXfcc::header`]) on every request.
//!
//! What Envoy does (`ConnectionManagerUtility::mutateXfccRequestHeader`), mirrored here:
//! - `always_forward_only`: the incoming header is passed on untouched, mTLS or not.
//! - `sanitize`, or any other mode on a connection where the peer presented no
//!   certificate: the incoming header is removed.
//! - `forward_only` (mTLS): passed on untouched.
//! - `append_forward` (mTLS): this hop's element is appended after `,` (no `,` when the
//!   incoming value is missing or empty).
//! - `sanitize_set` (mTLS): replaced by this hop's element.
//!
//! The element: `By=<URI SAN of our own certificate>` (one per URI SAN; an SVID has
//! exactly one), `Hash=<lowercase hex SHA-256 of the peer leaf DER>`, then in this fixed
//! order the configured fields: `Cert="<URL-encoded PEM of the leaf>"`,
//! `Chain="<URL-encoded PEM of every certificate the peer sent, leaf first>"`,
//! `Subject="<RFC 2253 subject, as OpenSSL/BoringSSL `X509_NAME_print_ex(XN_FLAG_RFC2253)`>"`
//! (present even when empty), `URI=<SAN>` (one per URI SAN; `URI=` when there is none),
//! `DNS=<SAN>` (one per DNS SAN; nothing when there is none). `By`, `URI` and `DNS` are
//! not quoted or escaped (Envoy does not either).
//!
//! Several incoming `x-forwarded-client-cert` lines count as one value joined by `,`, as
//! Envoy's header map joins repeated inline headers.

use std::fmt::Write as _;

use base64::Engine as _;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use x509_parser::asn1_rs::{Any, Class, Tag};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::x509::X509Name;

/// The header's name, lowercase as HTTP/2 requires.
pub const XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

/// Envoy's `forward_client_cert_details`: what happens to an incoming header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum XfccMode {
    /// Always remove the incoming header; never set one.
    Sanitize,
    /// mTLS: pass the incoming header on unchanged. Otherwise remove it.
    ForwardOnly,
    /// mTLS: append this hop's element to the incoming header. Otherwise remove it.
    AppendForward,
    /// mTLS: replace the incoming header with this hop's element. Otherwise remove it.
    #[default]
    SanitizeSet,
    /// Pass the incoming header on unchanged, mTLS or not (a trusted front proxy set it).
    AlwaysForwardOnly,
}

/// One of Envoy's `set_current_client_cert_details` fields, as written in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum XfccField {
    Uri,
    Dns,
    Subject,
    Cert,
    Chain,
}

/// Which optional fields this hop writes (`By` and `Hash` are always written). The
/// order in the header is fixed (Cert, Chain, Subject, URI, DNS) whatever the order in
/// the config, as in Envoy. In YAML a list: `details: [uri, subject]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XfccDetails {
    pub uri: bool,
    pub dns: bool,
    pub subject: bool,
    pub cert: bool,
    pub chain: bool,
}

impl XfccDetails {
    /// No optional field: only `By` and `Hash`.
    pub const NONE: Self = Self {
        uri: false,
        dns: false,
        subject: false,
        cert: false,
        chain: false,
    };

    /// The fields as a list, in header order.
    pub fn fields(&self) -> Vec<XfccField> {
        [
            (self.cert, XfccField::Cert),
            (self.chain, XfccField::Chain),
            (self.subject, XfccField::Subject),
            (self.uri, XfccField::Uri),
            (self.dns, XfccField::Dns),
        ]
        .into_iter()
        .filter_map(|(on, f)| on.then_some(f))
        .collect()
    }

    /// The set named by a list (duplicates are harmless).
    pub fn from_fields(fields: &[XfccField]) -> Self {
        let mut d = Self::NONE;
        for f in fields {
            match f {
                XfccField::Uri => d.uri = true,
                XfccField::Dns => d.dns = true,
                XfccField::Subject => d.subject = true,
                XfccField::Cert => d.cert = true,
                XfccField::Chain => d.chain = true,
            }
        }
        d
    }
}

/// The default: the caller's SPIFFE ID (`URI`) only.
impl Default for XfccDetails {
    fn default() -> Self {
        Self {
            uri: true,
            ..Self::NONE
        }
    }
}

impl Serialize for XfccDetails {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.fields().serialize(s)
    }
}

impl<'de> Deserialize<'de> for XfccDetails {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Self::from_fields(&Vec::<XfccField>::deserialize(d)?))
    }
}

/// A listener's `xfcc:` setting. Defaults: `sanitize_set` with `[uri]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Xfcc {
    #[serde(default)]
    pub mode: XfccMode,
    #[serde(default)]
    pub details: XfccDetails,
}

/// Why this hop's element could not be written. The connection's requests should be
/// refused: forwarding without the header would hide the caller from the app.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum XfccError {
    /// The peer leaf is not a DER certificate x509-parser can read (rustls accepted it,
    /// so this should not happen; refused rather than guessed).
    #[error("peer certificate cannot be parsed: {0}")]
    PeerCert(String),
    /// A SAN, or our own ID, holds a byte that cannot appear in an HTTP header value
    /// (control characters such as CR/LF): writing it would split or corrupt the header.
    #[error("{field} holds a byte not allowed in an HTTP header value")]
    NotHeaderSafe { field: &'static str },
    /// A DNS SAN holds `,`, `;` or `"`. Envoy writes DNS SANs unquoted, so such a SAN
    /// would add elements or keys of the peer's choosing (a `URI=` naming someone else)
    /// for whoever splits the header. No valid DNS name holds one, and the TLS layer
    /// checks only the URI SAN, so the peer's requests are refused here. (URI SANs are
    /// written as Envoy writes them: a peer's must be one SPIFFE ID, which holds none of
    /// these, and other URIs may legitimately hold `;` and `,`.)
    #[error("{field} holds `,`, `;` or `\"`, which would split the header")]
    SplitsHeader { field: &'static str },
    /// The peer's subject holds a string that is not valid in its declared ASN.1 type.
    #[error("peer certificate subject has a malformed {0} value")]
    Subject(&'static str),
}

impl Xfcc {
    /// What this mode does on one connection. `by` is our own certificate's URI SAN (our
    /// SPIFFE ID; `None` omits `By`). `peer_chain` is every certificate the peer sent,
    /// leaf first (rustls `peer_certificates()`); empty when the peer presented none
    /// (plaintext, or TLS without a client certificate).
    ///
    /// Only the leaf is parsed, and only when the mode writes an element.
    pub fn connection<C: AsRef<[u8]>>(
        &self,
        by: Option<&str>,
        peer_chain: &[C],
    ) -> Result<ConnXfcc, XfccError> {
        let mtls = !peer_chain.is_empty();
        let element = match (self.mode, peer_chain.first()) {
            (XfccMode::AppendForward | XfccMode::SanitizeSet, Some(leaf)) => {
                Some(element(self.details, by, leaf.as_ref(), peer_chain)?)
            }
            _ => None,
        };
        Ok(ConnXfcc {
            mode: self.mode,
            mtls,
            element,
        })
    }
}

/// The XFCC decision for one connection, computed once by [`Xfcc::connection`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnXfcc {
    mode: XfccMode,
    mtls: bool,
    /// This hop's element; `Some` exactly for `append_forward`/`sanitize_set` on mTLS.
    element: Option<HeaderValue>,
}

impl ConnXfcc {
    /// This hop's element, when the mode writes one.
    pub fn element(&self) -> Option<&HeaderValue> {
        self.element.as_ref()
    }

    /// The value to send on, given the incoming value; `None` means no header.
    pub fn header(&self, incoming: Option<&HeaderValue>) -> Option<HeaderValue> {
        match self.mode {
            XfccMode::AlwaysForwardOnly => incoming.cloned(),
            XfccMode::Sanitize => None,
            _ if !self.mtls => None,
            XfccMode::ForwardOnly => incoming.cloned(),
            XfccMode::SanitizeSet => self.element.clone(),
            XfccMode::AppendForward => match (incoming, &self.element) {
                (Some(old), Some(new)) if !old.is_empty() => {
                    let mut v = Vec::with_capacity(old.len() + 1 + new.len());
                    v.extend_from_slice(old.as_bytes());
                    v.push(b',');
                    v.extend_from_slice(new.as_bytes());
                    // Both parts are valid header values and `,` is visible ASCII.
                    HeaderValue::from_bytes(&v).ok()
                }
                (_, new) => new.clone(),
            },
        }
    }

    /// Rewrites a request's headers: every incoming `x-forwarded-client-cert` line is
    /// removed and the value [`header`](Self::header) decides is set (if any).
    pub fn apply(&self, headers: &mut HeaderMap) {
        let incoming = joined(headers);
        headers.remove(XFCC);
        if let Some(v) = self.header(incoming.as_ref()) {
            headers.insert(XFCC, v);
        }
    }
}

/// All incoming `x-forwarded-client-cert` lines as one value joined by `,` (Envoy's
/// handling of a repeated inline header); `None` when there is none.
pub fn joined(headers: &HeaderMap) -> Option<HeaderValue> {
    let mut it = headers.get_all(XFCC).iter();
    let first = it.next()?;
    let mut v = first.as_bytes().to_vec();
    let mut more = false;
    for h in it {
        more = true;
        v.push(b',');
        v.extend_from_slice(h.as_bytes());
    }
    if !more {
        return Some(first.clone());
    }
    HeaderValue::from_bytes(&v).ok()
}

/// One-shot form of [`Xfcc::connection`] + [`ConnXfcc::header`] (tests, tools).
pub fn header<C: AsRef<[u8]>>(
    cfg: &Xfcc,
    incoming: Option<&HeaderValue>,
    by: Option<&str>,
    peer_chain: &[C],
) -> Result<Option<HeaderValue>, XfccError> {
    Ok(cfg.connection(by, peer_chain)?.header(incoming))
}

/// This hop's element for a peer that presented `peer_chain` (leaf first, `leaf` its
/// first entry).
fn element<C: AsRef<[u8]>>(
    details: XfccDetails,
    by: Option<&str>,
    leaf: &[u8],
    peer_chain: &[C],
) -> Result<HeaderValue, XfccError> {
    let mut parts: Vec<String> = Vec::with_capacity(6);
    if let Some(by) = by.filter(|b| !b.is_empty()) {
        parts.push(format!("By={by}"));
    }
    parts.push(format!(
        "Hash={}",
        hex(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, leaf).as_ref())
    ));
    let needs_parse = details.subject || details.uri || details.dns;
    let parsed = if needs_parse {
        Some(
            X509Certificate::from_der(leaf)
                .map_err(|e| XfccError::PeerCert(e.to_string()))?
                .1,
        )
    } else {
        None
    };
    if details.cert {
        parts.push(format!("Cert=\"{}\"", url_pem(leaf)));
    }
    if details.chain {
        let chain: String = peer_chain.iter().map(|c| url_pem(c.as_ref())).collect();
        parts.push(format!("Chain=\"{chain}\""));
    }
    if let Some(cert) = &parsed {
        if details.subject {
            parts.push(format!("Subject=\"{}\"", rfc2253(cert.subject())?));
        }
        let (uris, dns) = sans(cert)?;
        let splits = |v: &&str| v.bytes().any(|b| matches!(b, b',' | b';' | b'"'));
        if details.dns && dns.iter().any(splits) {
            return Err(XfccError::SplitsHeader {
                field: "peer DNS SAN",
            });
        }
        if details.uri {
            if uris.is_empty() {
                parts.push("URI=".into());
            }
            parts.extend(uris.iter().map(|u| format!("URI={u}")));
        }
        if details.dns {
            parts.extend(dns.iter().map(|d| format!("DNS={d}")));
        }
    }
    let text = parts.join(";");
    // Bytes above 0x7F pass (Envoy forwards them as they are); control characters do not.
    HeaderValue::from_bytes(text.as_bytes()).map_err(|_| XfccError::NotHeaderSafe {
        field: blame(by, &text),
    })
}

/// Names the part that made the element unusable as a header value (for the error).
fn blame(by: Option<&str>, text: &str) -> &'static str {
    let bad = |s: &str| s.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f);
    if by.is_some_and(bad) {
        return "our own URI SAN (By)";
    }
    for part in text.split(';') {
        if bad(part) {
            if part.starts_with("URI=") {
                return "peer URI SAN";
            }
            if part.starts_with("DNS=") {
                return "peer DNS SAN";
            }
        }
    }
    "peer certificate"
}

/// URI and DNS SANs of a certificate, in certificate order.
fn sans<'a>(cert: &'a X509Certificate<'a>) -> Result<(Vec<&'a str>, Vec<&'a str>), XfccError> {
    let mut uris = Vec::new();
    let mut dns = Vec::new();
    let san = cert
        .subject_alternative_name()
        .map_err(|e| XfccError::PeerCert(e.to_string()))?;
    if let Some(san) = san {
        for g in &san.value.general_names {
            match g {
                GeneralName::URI(u) => uris.push(*u),
                GeneralName::DNSName(d) => dns.push(*d),
                _ => {}
            }
        }
    }
    Ok((uris, dns))
}

/// Lowercase hex, as Envoy's `Hex::encode`.
fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// PEM as OpenSSL's `PEM_write_bio_X509` writes it (64-column base64, trailing newline),
/// with `\n`, space, `+`, `/`, `=` percent-encoded as Envoy does; other bytes as they are.
fn url_pem(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::with_capacity(b64.len() * 5 / 4 + 100);
    pem.push_str("-----BEGIN%20CERTIFICATE-----%0A");
    for line in b64.as_bytes().chunks(64) {
        for &c in line {
            match c {
                b'+' => pem.push_str("%2B"),
                b'/' => pem.push_str("%2F"),
                b'=' => pem.push_str("%3D"),
                c => pem.push(char::from(c)),
            }
        }
        pem.push_str("%0A");
    }
    pem.push_str("-----END%20CERTIFICATE-----%0A");
    pem
}

/// The subject as `X509_NAME_print_ex(.., XN_FLAG_RFC2253)` prints it in BoringSSL:
/// RDNs last to first joined by `,`, attributes of one RDN joined by `+` (also in reverse),
/// OpenSSL short names (`CN`, `O`, ...) or the dotted OID, values converted to UTF-8 with
/// RFC 2253 escapes (`\,` `\+` `\"` `\\` `\<` `\>` `\;`, a leading `#` or space, a
/// trailing space), control characters and every byte above 0x7F as `\XX`, and values
/// of unknown attribute or string types as `#` + hex of their DER.
fn rfc2253(name: &X509Name<'_>) -> Result<String, XfccError> {
    let mut out = String::new();
    let mut first = true;
    for rdn in name.iter().collect::<Vec<_>>().into_iter().rev() {
        let mut first_in_rdn = true;
        for atv in rdn.iter().collect::<Vec<_>>().into_iter().rev() {
            if !first {
                out.push(if first_in_rdn { ',' } else { '+' });
            }
            first = false;
            first_in_rdn = false;
            let oid = atv.attr_type().to_id_string();
            let short = short_name(&oid);
            out.push_str(short.unwrap_or(&oid));
            out.push('=');
            let value = atv.attr_value();
            match (short, decode(value)?) {
                (Some(_), Some(chars)) => escape_into(&mut out, &chars),
                _ => dump_der(&mut out, value),
            }
        }
    }
    Ok(out)
}

/// Short names BoringSSL knows for attributes seen in subjects (`OBJ_nid2sn`).
fn short_name(oid: &str) -> Option<&'static str> {
    Some(match oid {
        "2.5.4.3" => "CN",
        "2.5.4.4" => "SN",
        "2.5.4.5" => "serialNumber",
        "2.5.4.6" => "C",
        "2.5.4.7" => "L",
        "2.5.4.8" => "ST",
        "2.5.4.9" => "street",
        "2.5.4.10" => "O",
        "2.5.4.11" => "OU",
        "2.5.4.12" => "title",
        "2.5.4.13" => "description",
        "2.5.4.15" => "businessCategory",
        "2.5.4.17" => "postalCode",
        "2.5.4.41" => "name",
        "2.5.4.42" => "GN",
        "2.5.4.43" => "initials",
        "2.5.4.44" => "generationQualifier",
        "2.5.4.45" => "x500UniqueIdentifier",
        "2.5.4.46" => "dnQualifier",
        "2.5.4.65" => "pseudonym",
        "0.9.2342.19200300.100.1.1" => "UID",
        "0.9.2342.19200300.100.1.25" => "DC",
        "1.2.840.113549.1.9.1" => "emailAddress",
        _ => return None,
    })
}

/// The characters of a string value, or `None` for a type BoringSSL dumps as DER.
fn decode(v: &Any<'_>) -> Result<Option<Vec<u32>>, XfccError> {
    if v.class() != Class::Universal || v.header.is_constructed() {
        return Ok(None);
    }
    let data = v.data;
    Ok(Some(match v.tag() {
        Tag::Utf8String => std::str::from_utf8(data)
            .map_err(|_| XfccError::Subject("UTF8String"))?
            .chars()
            .map(u32::from)
            .collect(),
        Tag::BmpString => {
            if !data.len().is_multiple_of(2) {
                return Err(XfccError::Subject("BMPString"));
            }
            data.chunks(2)
                .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
                .collect()
        }
        Tag::UniversalString => {
            if !data.len().is_multiple_of(4) {
                return Err(XfccError::Subject("UniversalString"));
            }
            data.chunks(4)
                .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        }
        Tag::NumericString
        | Tag::PrintableString
        | Tag::T61String
        | Tag::Ia5String
        | Tag::UtcTime
        | Tag::GeneralizedTime
        | Tag::VisibleString => data.iter().map(|&b| u32::from(b)).collect(),
        _ => return Ok(None),
    }))
}

/// Appends `chars` converted to UTF-8 with BoringSSL's `ASN1_STRFLGS_RFC2253` escapes.
/// The escape decision is made per UTF-8 byte, as `do_buf` does with `UTF8_CONVERT`.
fn escape_into(out: &mut String, chars: &[u32]) {
    let mut bytes = Vec::with_capacity(chars.len());
    for &c in chars {
        match char::from_u32(c) {
            Some(ch) => {
                let mut buf = [0u8; 4];
                bytes.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
            }
            // Not a Unicode scalar (a lone surrogate, or beyond U+10FFFF): OpenSSL's
            // UTF8_putc still writes its bytes; they are above 0x7F and get escaped.
            None => bytes.extend(utf8_put(c)),
        }
    }
    let n = bytes.len();
    for (i, &b) in bytes.iter().enumerate() {
        let first = i == 0;
        let last = i + 1 == n;
        if !(0x20..0x7f).contains(&b) {
            let _ = write!(out, "\\{b:02X}");
        } else if matches!(b, b'\\' | b'"' | b',' | b'+' | b'<' | b'>' | b';')
            || (first && matches!(b, b' ' | b'#'))
            || (last && b == b' ')
        {
            out.push('\\');
            out.push(char::from(b));
        } else {
            out.push(char::from(b));
        }
    }
}

/// UTF-8 bytes of a code point Rust's `char` refuses (as OpenSSL's `UTF8_putc`).
fn utf8_put(c: u32) -> Vec<u8> {
    if c < 0x10000 {
        vec![
            0xe0 | (c >> 12) as u8,
            0x80 | ((c >> 6) & 0x3f) as u8,
            0x80 | (c & 0x3f) as u8,
        ]
    } else {
        vec![
            0xf0 | ((c >> 18) & 0x07) as u8,
            0x80 | ((c >> 12) & 0x3f) as u8,
            0x80 | ((c >> 6) & 0x3f) as u8,
            0x80 | (c & 0x3f) as u8,
        ]
    }
}

/// `#` + uppercase hex of the value's DER (identifier, length, contents).
fn dump_der(out: &mut String, v: &Any<'_>) {
    let data = v.data;
    let mut der = Vec::with_capacity(data.len() + 6);
    let class = (v.class() as u8) << 6;
    let cons = if v.header.is_constructed() { 0x20 } else { 0 };
    let tag = v.tag().0;
    if tag < 31 {
        der.push(class | cons | tag as u8);
    } else {
        der.push(class | cons | 0x1f);
        let mut groups = Vec::new();
        let mut t = tag;
        loop {
            groups.push((t & 0x7f) as u8);
            t >>= 7;
            if t == 0 {
                break;
            }
        }
        for (i, g) in groups.iter().rev().enumerate() {
            der.push(if i + 1 < groups.len() { g | 0x80 } else { *g });
        }
    }
    let len = data.len();
    if len < 0x80 {
        der.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|&&b| b == 0).count();
        der.push(0x80 | (bytes.len() - skip) as u8);
        der.extend_from_slice(&bytes[skip..]);
    }
    der.extend_from_slice(data);
    out.push('#');
    for b in der {
        let _ = write!(out, "{b:02X}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue, IsCa, Issuer,
        KeyPair, SanType,
    };

    const BY: &str = "spiffe://example.org/ns/default/sa/users";
    const PEER: &str = "spiffe://example.org/ns/default/sa/payment";

    fn cfg(mode: XfccMode, details: &[XfccField]) -> Xfcc {
        Xfcc {
            mode,
            details: XfccDetails::from_fields(details),
        }
    }

    /// A CA, an intermediate and a leaf with `sans` and `dn`: (leaf DER, intermediate DER).
    fn chain(sans: Vec<SanType>, dn: DistinguishedName) -> (Vec<u8>, Vec<u8>) {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::default();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let _ = ca.clone().self_signed(&ca_key).unwrap();
        let ca = Issuer::new(ca, ca_key);
        let int_key = KeyPair::generate().unwrap();
        let mut int = CertificateParams::default();
        int.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let int_cert = int.clone().signed_by(&int_key, &ca).unwrap();
        let int = Issuer::new(int, int_key);
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = dn;
        p.subject_alt_names = sans;
        let leaf = p.signed_by(&key, &int).unwrap();
        (leaf.der().to_vec(), int_cert.der().to_vec())
    }

    fn uri(u: &str) -> SanType {
        SanType::URI(u.try_into().unwrap())
    }

    fn dns(d: &str) -> SanType {
        SanType::DnsName(d.try_into().unwrap())
    }

    fn spiffe_leaf() -> Vec<u8> {
        chain(vec![uri(PEER)], DistinguishedName::new()).0
    }

    fn hv(s: &str) -> HeaderValue {
        HeaderValue::from_str(s).unwrap()
    }

    fn text(v: Option<HeaderValue>) -> Option<String> {
        v.map(|v| v.to_str().unwrap().to_string())
    }

    fn sha(der: &[u8]) -> String {
        hex(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der).as_ref())
    }

    const NO_PEER: &[Vec<u8>] = &[];
    const FORGED: &str = "By=spiffe://evil;URI=spiffe://example.org/ns/default/sa/admin";

    #[test]
    fn sanitize_removes_always() {
        let leaf = spiffe_leaf();
        let c = cfg(XfccMode::Sanitize, &[XfccField::Uri]);
        assert_eq!(
            header(&c, Some(&hv(FORGED)), Some(BY), &[&leaf]).unwrap(),
            None
        );
        assert_eq!(
            header(&c, Some(&hv(FORGED)), Some(BY), NO_PEER).unwrap(),
            None
        );
        assert_eq!(header(&c, None, Some(BY), &[&leaf]).unwrap(), None);
    }

    #[test]
    fn forward_only_passes_on_mtls_and_removes_otherwise() {
        let leaf = spiffe_leaf();
        let c = cfg(XfccMode::ForwardOnly, &[XfccField::Uri]);
        let got = header(&c, Some(&hv(FORGED)), Some(BY), &[&leaf]).unwrap();
        assert_eq!(text(got).as_deref(), Some(FORGED));
        assert_eq!(header(&c, None, Some(BY), &[&leaf]).unwrap(), None);
        assert_eq!(
            header(&c, Some(&hv(FORGED)), Some(BY), NO_PEER).unwrap(),
            None
        );
    }

    #[test]
    fn always_forward_only_passes_even_without_mtls() {
        let leaf = spiffe_leaf();
        let c = cfg(XfccMode::AlwaysForwardOnly, &[XfccField::Uri]);
        for chain in [&[leaf.clone()][..], NO_PEER] {
            let got = header(&c, Some(&hv(FORGED)), Some(BY), chain).unwrap();
            assert_eq!(text(got).as_deref(), Some(FORGED));
            assert_eq!(header(&c, None, Some(BY), chain).unwrap(), None);
        }
    }

    #[test]
    fn sanitize_set_replaces_on_mtls_and_removes_otherwise() {
        let leaf = spiffe_leaf();
        let c = cfg(XfccMode::SanitizeSet, &[XfccField::Uri]);
        let want = format!("By={BY};Hash={};URI={PEER}", sha(&leaf));
        let got = header(&c, Some(&hv(FORGED)), Some(BY), &[&leaf]).unwrap();
        assert_eq!(text(got), Some(want.clone()));
        let got = header(&c, None, Some(BY), &[&leaf]).unwrap();
        assert_eq!(text(got), Some(want));
        assert_eq!(
            header(&c, Some(&hv(FORGED)), Some(BY), NO_PEER).unwrap(),
            None
        );
    }

    #[test]
    fn append_forward_appends_after_a_comma() {
        let leaf = spiffe_leaf();
        let c = cfg(XfccMode::AppendForward, &[XfccField::Uri]);
        let mine = format!("By={BY};Hash={};URI={PEER}", sha(&leaf));
        let got = header(&c, Some(&hv(FORGED)), Some(BY), &[&leaf]).unwrap();
        assert_eq!(text(got), Some(format!("{FORGED},{mine}")));
        // Missing or empty incoming: no leading comma.
        let got = header(&c, None, Some(BY), &[&leaf]).unwrap();
        assert_eq!(text(got), Some(mine.clone()));
        let got = header(&c, Some(&hv("")), Some(BY), &[&leaf]).unwrap();
        assert_eq!(text(got), Some(mine));
        assert_eq!(
            header(&c, Some(&hv(FORGED)), Some(BY), NO_PEER).unwrap(),
            None
        );
    }

    #[test]
    fn apply_joins_repeated_lines_and_replaces_them() {
        let leaf = spiffe_leaf();
        let mut h = HeaderMap::new();
        h.append(XFCC, hv("a=1"));
        h.append(XFCC, hv("b=2"));
        let conn = cfg(XfccMode::ForwardOnly, &[])
            .connection(Some(BY), &[&leaf])
            .unwrap();
        conn.apply(&mut h);
        let all: Vec<_> = h.get_all(XFCC).iter().collect();
        assert_eq!(all, vec![&hv("a=1,b=2")]);
        let conn = cfg(XfccMode::Sanitize, &[])
            .connection(Some(BY), &[&leaf])
            .unwrap();
        conn.apply(&mut h);
        assert!(h.get(XFCC).is_none());
    }

    #[test]
    fn by_and_hash_only_without_details_and_no_by_without_our_id() {
        let leaf = spiffe_leaf();
        let got = header(&cfg(XfccMode::SanitizeSet, &[]), None, Some(BY), &[&leaf]).unwrap();
        assert_eq!(text(got), Some(format!("By={BY};Hash={}", sha(&leaf))));
        let got = header(&cfg(XfccMode::SanitizeSet, &[]), None, None, &[&leaf]).unwrap();
        assert_eq!(text(got), Some(format!("Hash={}", sha(&leaf))));
        assert_eq!(hex(&[0x00, 0xab, 0x7f]), "00ab7f");
    }

    #[test]
    fn uri_one_per_san_and_empty_when_none() {
        let (leaf, _) = chain(
            vec![uri(PEER), dns("a.example"), uri("https://x.example/p")],
            DistinguishedName::new(),
        );
        let got = header(
            &cfg(XfccMode::SanitizeSet, &[XfccField::Uri]),
            None,
            None,
            &[&leaf],
        );
        let want = format!("Hash={};URI={PEER};URI=https://x.example/p", sha(&leaf));
        assert_eq!(text(got.unwrap()), Some(want));
        let (leaf, _) = chain(vec![dns("a.example")], DistinguishedName::new());
        let got = header(
            &cfg(XfccMode::SanitizeSet, &[XfccField::Uri]),
            None,
            None,
            &[&leaf],
        );
        assert_eq!(
            text(got.unwrap()),
            Some(format!("Hash={};URI=", sha(&leaf)))
        );
    }

    #[test]
    fn dns_one_per_san_and_absent_when_none() {
        let (leaf, _) = chain(
            vec![dns("a.example"), uri(PEER), dns("*.b.example")],
            DistinguishedName::new(),
        );
        let got = header(
            &cfg(XfccMode::SanitizeSet, &[XfccField::Dns]),
            None,
            None,
            &[&leaf],
        );
        let want = format!("Hash={};DNS=a.example;DNS=*.b.example", sha(&leaf));
        assert_eq!(text(got.unwrap()), Some(want));
        let leaf = spiffe_leaf();
        let got = header(
            &cfg(XfccMode::SanitizeSet, &[XfccField::Dns]),
            None,
            None,
            &[&leaf],
        );
        assert_eq!(text(got.unwrap()), Some(format!("Hash={}", sha(&leaf))));
    }

    /// Undoes Envoy's five replacements; the result must be the PEM of `ders`.
    fn unurl(s: &str) -> Vec<Vec<u8>> {
        let pem_text = s
            .replace("%0A", "\n")
            .replace("%20", " ")
            .replace("%2B", "+")
            .replace("%2F", "/")
            .replace("%3D", "=");
        for line in pem_text.lines() {
            assert!(line.len() <= 64, "PEM line longer than 64: {line}");
        }
        assert!(pem_text.ends_with("-----END CERTIFICATE-----\n"));
        pem::parse_many(&pem_text)
            .unwrap()
            .into_iter()
            .map(|p| p.into_contents())
            .collect()
    }

    #[test]
    fn cert_and_chain_are_url_encoded_pem() {
        let (leaf, int) = chain(vec![uri(PEER)], DistinguishedName::new());
        let c = cfg(XfccMode::SanitizeSet, &[XfccField::Cert, XfccField::Chain]);
        let got = text(header(&c, None, None, &[&leaf, &int]).unwrap()).unwrap();
        let parts: Vec<&str> = got.split(';').collect();
        assert_eq!(parts.len(), 3, "{got}");
        let cert = parts[1]
            .strip_prefix("Cert=\"")
            .unwrap()
            .strip_suffix('"')
            .unwrap();
        let chain = parts[2]
            .strip_prefix("Chain=\"")
            .unwrap()
            .strip_suffix('"')
            .unwrap();
        assert!(
            cert.starts_with("-----BEGIN%20CERTIFICATE-----%0A"),
            "{cert}"
        );
        assert!(!cert.contains(['\n', ' ', '+', '/', '=']), "{cert}");
        assert_eq!(unurl(cert), vec![leaf.clone()]);
        assert_eq!(unurl(chain), vec![leaf, int]);
    }

    #[test]
    fn fields_in_envoy_order_whatever_the_config_order() {
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "payment");
        let (leaf, int) = chain(vec![uri(PEER), dns("p.example")], dn);
        let c = cfg(
            XfccMode::SanitizeSet,
            &[
                XfccField::Dns,
                XfccField::Uri,
                XfccField::Subject,
                XfccField::Chain,
                XfccField::Cert,
            ],
        );
        let got = text(header(&c, None, Some(BY), &[&leaf, &int]).unwrap()).unwrap();
        let keys: Vec<&str> = got
            .split(';')
            .map(|p| p.split('=').next().unwrap())
            .collect();
        assert_eq!(
            keys,
            ["By", "Hash", "Cert", "Chain", "Subject", "URI", "DNS"]
        );
        assert!(got.contains(";Subject=\"CN=payment\";"), "{got}");
    }

    fn subject(dn: DistinguishedName) -> String {
        let (leaf, _) = chain(vec![uri(PEER)], dn);
        let got = header(
            &cfg(XfccMode::SanitizeSet, &[XfccField::Subject]),
            None,
            None,
            &[&leaf],
        );
        let got = text(got.unwrap()).unwrap();
        got.split_once(";Subject=").unwrap().1.to_string()
    }

    #[test]
    fn subject_rfc2253_reversed_short_names_escapes() {
        assert_eq!(subject(DistinguishedName::new()), "\"\"");
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CountryName,
            DnValue::PrintableString("US".try_into().unwrap()),
        );
        dn.push(DnType::OrganizationName, "Acme, Inc.");
        dn.push(DnType::OrganizationalUnitName, " #team+\"x\"; <y> \\ ");
        dn.push(DnType::CommonName, "#zo\u{eb}\u{7f}");
        dn.push(DnType::CustomDnType(vec![1, 2, 3, 4]), "abc");
        assert_eq!(
            subject(dn),
            "\"1.2.3.4=#0C03616263,CN=\\#zo\\C3\\AB\\7F,\
             OU=\\ #team\\+\\\"x\\\"\\; \\<y\\> \\\\\\ ,O=Acme\\, Inc.,C=US\""
        );
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            DnValue::BmpString(
                rcgen::string::BmpString::from_utf16be(vec![0x00, 0x41, 0x01, 0x00]).unwrap(),
            ),
        );
        assert_eq!(subject(dn), "\"CN=A\\C4\\80\"");
    }

    #[test]
    fn control_characters_in_a_san_are_refused_not_written() {
        let (leaf, _) = chain(
            vec![uri("spiffe://example.org/a\r\nx-injected: 1")],
            DistinguishedName::new(),
        );
        let err = header(
            &cfg(XfccMode::SanitizeSet, &[XfccField::Uri]),
            None,
            None,
            &[&leaf],
        );
        assert_eq!(
            err,
            Err(XfccError::NotHeaderSafe {
                field: "peer URI SAN"
            })
        );
        // Hash alone never fails, and modes that write nothing never parse.
        let c = cfg(XfccMode::ForwardOnly, &[XfccField::Uri]);
        assert!(header(&c, None, None, &[&leaf]).is_ok());
        assert!(matches!(
            header(
                &cfg(XfccMode::SanitizeSet, &[]),
                None,
                None,
                &[b"not der".to_vec()]
            ),
            Ok(Some(_))
        ));
        assert!(matches!(
            header(
                &cfg(XfccMode::SanitizeSet, &[XfccField::Uri]),
                None,
                None,
                &[b"not der".to_vec()]
            ),
            Err(XfccError::PeerCert(_))
        ));
    }

    #[test]
    fn config_names_and_defaults() {
        let x: Xfcc = serde_norway::from_str("{}").unwrap();
        assert_eq!(x, cfg(XfccMode::SanitizeSet, &[XfccField::Uri]));
        for (name, mode) in [
            ("sanitize", XfccMode::Sanitize),
            ("forward_only", XfccMode::ForwardOnly),
            ("append_forward", XfccMode::AppendForward),
            ("sanitize_set", XfccMode::SanitizeSet),
            ("always_forward_only", XfccMode::AlwaysForwardOnly),
        ] {
            let x: Xfcc = serde_norway::from_str(&format!(
                "{{mode: {name}, details: [dns, uri, subject, cert, chain]}}"
            ))
            .unwrap();
            assert_eq!(x.mode, mode);
            assert_eq!(
                x.details.fields(),
                [
                    XfccField::Cert,
                    XfccField::Chain,
                    XfccField::Subject,
                    XfccField::Uri,
                    XfccField::Dns
                ]
            );
        }
        let x: Xfcc = serde_norway::from_str("{details: []}").unwrap();
        assert_eq!(x.details, XfccDetails::NONE);
        let err = serde_norway::from_str::<Xfcc>("{mode: sanitise}").unwrap_err();
        assert!(err.to_string().contains("sanitise"), "{err}");
        assert!(serde_norway::from_str::<Xfcc>("{details: [ip]}").is_err());
    }
}

#[cfg(test)]
mod properties {
    //! Peer certificates whose subject holds any text and whose DNS SANs hold hostile
    //! characters: the element either is refused, or splits (as a consumer that honours
    //! quotes splits it) into exactly the fields written, in Envoy's order, with the
    //! subject inside its quotes. No certificate content adds an element or a key.
    use super::*;
    use proptest::prelude::*;
    use rcgen::{CertificateParams, DistinguishedName, DnType, DnValue, KeyPair, SanType};
    use std::sync::OnceLock;

    fn key() -> &'static KeyPair {
        static KEY: OnceLock<KeyPair> = OnceLock::new();
        KEY.get_or_init(|| KeyPair::generate().unwrap())
    }

    /// Splits a header value as consumers do: `,` between elements and `;` between
    /// pairs, except inside double quotes, where `\` escapes the next character.
    fn split(v: &str) -> Vec<Vec<(String, String)>> {
        let mut elements = vec![vec![]];
        let (mut pair, mut quoted, mut escaped) = (String::new(), false, false);
        let end_pair = |pair: &mut String, elements: &mut Vec<Vec<(String, String)>>| {
            let (k, v) = pair.split_once('=').unwrap_or((pair.as_str(), ""));
            elements
                .last_mut()
                .unwrap()
                .push((k.to_string(), v.to_string()));
            pair.clear();
        };
        for c in v.chars() {
            match c {
                _ if escaped => escaped = false,
                '\\' if quoted => escaped = true,
                '"' => quoted = !quoted,
                ';' if !quoted => {
                    end_pair(&mut pair, &mut elements);
                    continue;
                }
                ',' if !quoted => {
                    end_pair(&mut pair, &mut elements);
                    elements.push(vec![]);
                    continue;
                }
                _ => {}
            }
            pair.push(c);
        }
        end_pair(&mut pair, &mut elements);
        elements
    }

    fn leaf(cn: &str, org: &str, uris: &[String], dns: &[String]) -> Option<Vec<u8>> {
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, DnValue::Utf8String(cn.into()));
        dn.push(DnType::OrganizationName, DnValue::Utf8String(org.into()));
        p.distinguished_name = dn;
        for u in uris {
            p.subject_alt_names
                .push(SanType::URI(u.clone().try_into().ok()?));
        }
        for d in dns {
            p.subject_alt_names
                .push(SanType::DnsName(d.clone().try_into().ok()?));
        }
        Some(p.self_signed(key()).ok()?.der().to_vec())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn certificate_content_never_adds_fields(
            cn in any::<String>(),
            org in "[ -~]{0,20}",
            uris in prop::collection::vec(prop_oneof![
                "spiffe://example.org/[a-z0-9/]{1,20}",
                "spiffe://example.org/a[,;=\"]URI=spiffe://example.org/admin",
            ], 0..3),
            dns in prop::collection::vec("[a-z0-9.,;=\"-]{1,20}", 0..3),
            incoming in prop::option::of("[ -~]{0,40}"),
        ) {
            let Some(der) = leaf(&cn, &org, &uris, &dns) else { return Ok(()) };
            let details = XfccDetails::from_fields(&[XfccField::Subject, XfccField::Uri, XfccField::Dns]);
            let cfg = Xfcc { mode: XfccMode::AppendForward, details };
            let incoming = incoming.and_then(|v| HeaderValue::from_str(&v).ok());
            let conn = match cfg.connection(Some("spiffe://example.org/ns/default/sa/users"), &[&der]) {
                Ok(c) => c,
                Err(XfccError::SplitsHeader { .. }) => {
                    prop_assert!(dns.iter().any(|v| v.contains([',', ';', '"'])));
                    return Ok(());
                }
                Err(_) => return Ok(()),
            };
            // The TLS layer admits only peers whose one URI SAN is a SPIFFE ID; URIs
            // with `;` (legitimate in general) are written as Envoy writes them.
            if uris.iter().any(|v| v.contains([',', ';', '"'])) {
                return Ok(());
            }
            let element = conn.element().expect("an element on mTLS").to_str().map(str::to_string);
            let Ok(element) = element else { return Ok(()) };  // bytes above 0x7F: not a str
            let parsed = split(&element);
            prop_assert_eq!(parsed.len(), 1, "{:?} split into elements", element);
            let keys: Vec<&str> = parsed[0].iter().map(|(k, _)| k.as_str()).collect();
            let mut want = vec!["By", "Hash", "Subject"];
            want.extend(std::iter::repeat_n("URI", uris.len().max(1)));
            want.extend(std::iter::repeat_n("DNS", dns.len()));
            prop_assert_eq!(keys, want);
            let subject = &parsed[0][2].1;
            prop_assert!(subject.starts_with('"') && subject.ends_with('"') && subject.len() >= 2);
            // The appended header is the incoming one, then exactly this element.
            if let Some(h) = conn.header(incoming.as_ref()) {
                let h = String::from_utf8_lossy(h.as_bytes()).into_owned();
                prop_assert!(h.ends_with(&element));
                if let Some(inc) = incoming.as_ref().filter(|i| !i.is_empty()) {
                    prop_assert_eq!(h, format!("{},{element}", inc.to_str().unwrap()));
                }
            }
        }
    }
}
