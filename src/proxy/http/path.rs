//! Request path normalization: the one place that turns a request target as received
//! into the path that authorization rules match, policies see and the app receives.
//! Using the same normalized text for all three is the point: every known path-based
//! authorization bypass (Envoy CVE-2019-9901 and CVE-2019-9900, Istio CVE-2021-31920,
//! CVE-2021-39156 and istio#27409, OPA-Envoy CVE-2026-26205) came from the proxy
//! checking one spelling of a path while the app served another.
//!
//! What [`normalize_target`] does, in order:
//! - refuses anything but an origin-form target (`/…`), raw NUL and other control
//!   characters, spaces and non-ASCII bytes, and `#` (a fragment is never sent by a
//!   conforming client; refusing it, as Envoy does by default, leaves no doubt about
//!   which part the app would use);
//! - splits off the query at the first `?` and passes it through untouched;
//! - decodes percent-encoded unreserved characters (`%2e` is `.`, `%41` is `A`) and
//!   upper-cases the hex digits of every other escape, so one resource has one spelling;
//! - refuses encoded controls (`%00`…`%1F`, `%7F`): an app that decodes would see a NUL;
//! - refuses `%2F` and `%5C` (encoded `/` and `\`) unless [`EncodedSlashes::Keep`] is
//!   set, in which case they stay encoded (`%2F`) and are never treated as separators;
//! - turns `\` into `/`, merges runs of `/`, and removes `.` and `..` segments as
//!   RFC 3986 section 5.2.4 does (a `..` above the root is dropped);
//! - refuses a segment that is empty, `.` or `..` before a `;` (`..;`, `.;`, `;x`):
//!   Tomcat and Spring cut path parameters before resolving dots, so `/a/..;/admin`
//!   is `/admin` to them (istio#27409); the same with `;` written `%3B`, for apps
//!   that decode first.
//!
//! [`normalize_host`] does the same for the `Host` header or `:authority`: lower case,
//! port stripped (Istio CVE-2021-39155 matched hosts case-sensitively).

use std::borrow::Cow;

/// What to do with `%2F` and `%5C` in a path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum EncodedSlashes {
    /// 400: an app that decodes them would see a different path than the rules did
    /// (Istio CVE-2021-31920).
    #[default]
    Refuse,
    /// Keep them encoded (upper-case hex) and never treat them as separators, for apps
    /// that use encoded slashes in identifiers (GitLab's `namespace%2Fproject`).
    Keep,
}

/// Normalization settings of one listener.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PathOptions {
    pub encoded_slashes: EncodedSlashes,
}

/// Why a request target was refused (the caller answers 400). Each names a class of
/// input, never the input itself, so it can be a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathRefusal {
    #[error("request target is not an origin-form path")]
    NotOriginForm,
    #[error("control character in request target")]
    ControlCharacter,
    #[error("space or non-ASCII byte in request target")]
    InvalidCharacter,
    #[error("fragment (#) in request target")]
    Fragment,
    #[error("malformed percent-encoding")]
    BadPercentEncoding,
    #[error("percent-encoded control character")]
    EncodedControl,
    #[error("percent-encoded slash or backslash")]
    EncodedSlash,
    #[error("path parameter on an empty or dot segment")]
    DotSegmentParameter,
}

impl PathRefusal {
    /// A short stable label for metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            PathRefusal::NotOriginForm => "not_origin_form",
            PathRefusal::ControlCharacter => "control_character",
            PathRefusal::InvalidCharacter => "invalid_character",
            PathRefusal::Fragment => "fragment",
            PathRefusal::BadPercentEncoding => "bad_percent_encoding",
            PathRefusal::EncodedControl => "encoded_control",
            PathRefusal::EncodedSlash => "encoded_slash",
            PathRefusal::DotSegmentParameter => "dot_segment_parameter",
        }
    }
}

/// A request target after normalization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target<'a> {
    /// The normalized path, no query: what rules match and what the app receives.
    /// Borrowed when the target was already normal (the common case: no allocation).
    pub path: Cow<'a, str>,
    /// The query as received, without the `?`; `None` when there was no `?`.
    pub query: Option<&'a str>,
}

impl Target<'_> {
    /// The path and query to forward (`/a/b?x=1`).
    pub fn path_and_query(&self) -> String {
        match self.query {
            Some(q) => format!("{}?{q}", self.path),
            None => self.path.to_string(),
        }
    }
}

/// Normalizes a request target (origin-form path and optional query, as received).
pub fn normalize_target<'a>(target: &'a str, opts: PathOptions) -> Result<Target<'a>, PathRefusal> {
    for b in target.bytes() {
        match b {
            0..=0x1f | 0x7f => return Err(PathRefusal::ControlCharacter),
            b' ' | 0x80..=0xff => return Err(PathRefusal::InvalidCharacter),
            b'#' => return Err(PathRefusal::Fragment),
            _ => {}
        }
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    if !path.starts_with('/') {
        return Err(PathRefusal::NotOriginForm);
    }
    let path = if is_normal(path) {
        Cow::Borrowed(path)
    } else {
        Cow::Owned(normalize_path(path, opts)?)
    };
    Ok(Target { path, query })
}

/// True when `path` (starting with `/`, checked for bad bytes) is already what
/// [`normalize_path`] would return: no escapes, no backslashes, no empty segment
/// except a final one, no dot segments, no path parameter on an empty or dot segment.
fn is_normal(path: &str) -> bool {
    if path.bytes().any(|b| b == b'%' || b == b'\\') {
        return false;
    }
    let mut segments = path[1..].split('/').peekable();
    while let Some(seg) = segments.next() {
        let last = segments.peek().is_none();
        if (seg.is_empty() && !last) || is_dot_or_parameter_on_dot(seg) {
            return false;
        }
    }
    true
}

/// `.`, `..`, or a segment whose name before `;` is empty, `.` or `..`.
fn is_dot_or_parameter_on_dot(seg: &str) -> bool {
    let name = seg.split(';').next().unwrap_or(seg);
    seg == "." || seg == ".." || (seg.contains(';') && matches!(name, "" | "." | ".."))
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// The slow path: decode, then resolve segments.
fn normalize_path(path: &str, opts: PathOptions) -> Result<String, PathRefusal> {
    const UPPER_HEX: &[u8; 16] = b"0123456789ABCDEF";
    // Decoded text where `/` is always a separator (encoded slashes stay escaped).
    let mut decoded = String::with_capacity(path.len());
    let bytes = path.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let (hi, lo) = match (bytes.get(i + 1), bytes.get(i + 2)) {
                    (Some(&h), Some(&l)) => (h, l),
                    _ => return Err(PathRefusal::BadPercentEncoding),
                };
                let v = match (hex(hi), hex(lo)) {
                    (Some(h), Some(l)) => h << 4 | l,
                    _ => return Err(PathRefusal::BadPercentEncoding),
                };
                if v < 0x20 || v == 0x7f {
                    return Err(PathRefusal::EncodedControl);
                }
                if (v == b'/' || v == b'\\') && opts.encoded_slashes == EncodedSlashes::Refuse {
                    return Err(PathRefusal::EncodedSlash);
                }
                if is_unreserved(v) {
                    decoded.push(char::from(v));
                } else {
                    decoded.push('%');
                    decoded.push(char::from(UPPER_HEX[usize::from(v >> 4)]));
                    decoded.push(char::from(UPPER_HEX[usize::from(v & 0xf)]));
                }
                i += 3;
            }
            b'\\' => {
                decoded.push('/');
                i += 1;
            }
            _ => {
                decoded.push(char::from(b));
                i += 1;
            }
        }
    }
    let mut out: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    let mut segments = decoded.split('/').skip(1).peekable();
    while let Some(seg) = segments.next() {
        let last = segments.peek().is_none();
        if seg.contains(';') && is_dot_or_parameter_on_dot(seg) {
            return Err(PathRefusal::DotSegmentParameter);
        }
        // `..%3B` is `..;` to an app that decodes before it cuts path parameters.
        if seg.contains("%3B") && is_dot_or_parameter_on_dot(&seg.replace("%3B", ";")) {
            return Err(PathRefusal::DotSegmentParameter);
        }
        match seg {
            // Merged slashes; a final empty segment is the trailing slash.
            "" => trailing_slash = last,
            "." => trailing_slash = last,
            ".." => {
                out.pop();
                trailing_slash = last;
            }
            s => {
                out.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut normal = String::with_capacity(decoded.len());
    for seg in &out {
        normal.push('/');
        normal.push_str(seg);
    }
    if out.is_empty() || trailing_slash {
        normal.push('/');
    }
    Ok(normal)
}

/// Why a `Host` / `:authority` value was refused (400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HostRefusal {
    #[error("empty host")]
    Empty,
    #[error("character not allowed in a host")]
    InvalidCharacter,
    #[error("invalid port")]
    BadPort,
}

/// The host of a `Host` header or `:authority`, lower-cased, without its port, so
/// rules and policies compare one spelling (Istio CVE-2021-39155: `EXAMPLE.com`
/// slipped past a rule on `example.com`). IPv6 literals keep their brackets. Refuses
/// characters that could move the path boundary when a URL is rebuilt from it (`/`,
/// `?`, `#`, `@`, spaces, controls).
pub fn normalize_host(authority: &str) -> Result<Cow<'_, str>, HostRefusal> {
    let (host, port) = if authority.starts_with('[') {
        let end = authority.find(']').ok_or(HostRefusal::InvalidCharacter)?;
        let (h, rest) = authority.split_at(end + 1);
        let inner = &h[1..h.len() - 1];
        if inner.is_empty()
            || !inner
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        {
            return Err(HostRefusal::InvalidCharacter);
        }
        match rest {
            "" => (h, None),
            r => (
                h,
                Some(r.strip_prefix(':').ok_or(HostRefusal::InvalidCharacter)?),
            ),
        }
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if let Some(p) = port {
        // An empty port is allowed by RFC 3986 (`host:`).
        if !p.is_empty() && (!p.bytes().all(|b| b.is_ascii_digit()) || p.parse::<u16>().is_err()) {
            return Err(HostRefusal::BadPort);
        }
    }
    if host.is_empty() {
        return Err(HostRefusal::Empty);
    }
    let ok = |b: u8| {
        b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'[' | b']' | b':')
    };
    if !host.bytes().all(ok) {
        return Err(HostRefusal::InvalidCharacter);
    }
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Ok(Cow::Owned(host.to_ascii_lowercase()))
    } else {
        Ok(Cow::Borrowed(host))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(t: &str) -> Result<String, PathRefusal> {
        normalize_target(t, PathOptions::default()).map(|t| t.path.into_owned())
    }

    #[test]
    fn normal_paths_are_borrowed_and_unchanged() {
        for p in [
            "/",
            "/a",
            "/a/b/",
            "/v1/users/42",
            "/a;b=c/d",
            "/a.b/c..d/.e",
        ] {
            let t = normalize_target(p, PathOptions::default()).unwrap();
            assert!(matches!(t.path, Cow::Borrowed(_)), "{p}");
            assert_eq!(t.path, p);
            assert_eq!(t.query, None);
        }
    }

    #[test]
    fn query_is_split_off_and_kept_raw() {
        let t = normalize_target("/a/../b?x=/../admin&y=%2F", PathOptions::default()).unwrap();
        assert_eq!(t.path, "/b");
        assert_eq!(t.query, Some("x=/../admin&y=%2F"));
        assert_eq!(t.path_and_query(), "/b?x=/../admin&y=%2F");
        let t = normalize_target("/a?", PathOptions::default()).unwrap();
        assert_eq!(t.query, Some(""));
    }

    #[test]
    fn rfc3986_dot_segments() {
        // RFC 3986 5.2.4 examples, on absolute paths.
        assert_eq!(norm("/a/b/c/./../../g").unwrap(), "/a/g");
        assert_eq!(norm("/mid/content=5/../6").unwrap(), "/mid/6");
        assert_eq!(norm("/a/b/..").unwrap(), "/a/");
        assert_eq!(norm("/a/b/.").unwrap(), "/a/b/");
        assert_eq!(norm("/..").unwrap(), "/");
        assert_eq!(norm("/../../x").unwrap(), "/x");
        assert_eq!(norm("/./").unwrap(), "/");
    }

    #[test]
    fn slashes_backslashes_and_escapes() {
        assert_eq!(norm("//a///b//").unwrap(), "/a/b/");
        assert_eq!(norm("/a\\b\\..\\c").unwrap(), "/a/c");
        assert_eq!(norm("/%61%62c").unwrap(), "/abc");
        assert_eq!(norm("/a%3fb%20c").unwrap(), "/a%3Fb%20c");
        assert_eq!(norm("/%7e%2D%5f").unwrap(), "/~-_");
        assert_eq!(norm("/%"), Err(PathRefusal::BadPercentEncoding));
        assert_eq!(norm("/%4"), Err(PathRefusal::BadPercentEncoding));
        assert_eq!(norm("/%zz"), Err(PathRefusal::BadPercentEncoding));
        assert_eq!(norm("/a b"), Err(PathRefusal::InvalidCharacter));
        assert_eq!(norm("/é"), Err(PathRefusal::InvalidCharacter));
        assert_eq!(norm("a/b"), Err(PathRefusal::NotOriginForm));
        assert_eq!(norm("*"), Err(PathRefusal::NotOriginForm));
        assert_eq!(norm("http://x/admin"), Err(PathRefusal::NotOriginForm));
        assert_eq!(norm(""), Err(PathRefusal::NotOriginForm));
    }

    #[test]
    fn encoded_slashes_can_be_kept_encoded() {
        let keep = PathOptions {
            encoded_slashes: EncodedSlashes::Keep,
        };
        let t = normalize_target("/api/ns%2fproj/..%2f..%5cadmin", keep).unwrap();
        // Kept as part of one segment, never a separator: `..%2F..%5Cadmin` is not `..`.
        assert_eq!(t.path, "/api/ns%2Fproj/..%2F..%5Cadmin");
        assert_eq!(norm("/api/ns%2fproj"), Err(PathRefusal::EncodedSlash));
    }

    #[test]
    fn host_is_lowercased_and_its_port_stripped() {
        assert_eq!(normalize_host("Example.ORG:8443").unwrap(), "example.org");
        assert_eq!(normalize_host("example.org").unwrap(), "example.org");
        assert!(matches!(
            normalize_host("example.org").unwrap(),
            Cow::Borrowed(_)
        ));
        assert_eq!(normalize_host("[::1]:80").unwrap(), "[::1]");
        assert_eq!(normalize_host("[FE80::1]").unwrap(), "[fe80::1]");
        assert_eq!(normalize_host("a.b:").unwrap(), "a.b");
        assert_eq!(normalize_host(""), Err(HostRefusal::Empty));
        assert_eq!(normalize_host(":80"), Err(HostRefusal::Empty));
        assert_eq!(normalize_host("a:99999"), Err(HostRefusal::BadPort));
        assert_eq!(normalize_host("a:8x"), Err(HostRefusal::BadPort));
        assert_eq!(normalize_host("a:1:2"), Err(HostRefusal::BadPort));
        // CVE-2026-48710-style: a host that would move the path boundary on rebuild.
        assert_eq!(
            normalize_host("example.com/abc?bar="),
            Err(HostRefusal::InvalidCharacter)
        );
        assert_eq!(normalize_host("a@b"), Err(HostRefusal::InvalidCharacter));
        assert_eq!(normalize_host("[::1"), Err(HostRefusal::InvalidCharacter));
        assert_eq!(normalize_host("[::1]x"), Err(HostRefusal::InvalidCharacter));
    }
}

#[cfg(test)]
mod properties {
    //! Generated request targets, built from the pieces path bypasses are made of: no
    //! input panics; an accepted path is a fixed point; and an app that percent-decodes
    //! what it receives sees the very segments the rules matched (no dot segment, no
    //! empty segment, no path parameter on a dot) — the property every CVE in the module
    //! comment broke.
    use super::*;
    use proptest::prelude::*;

    const PIECES: &[&str] = &[
        "/", "//", "\\", ".", "..", "%2e", "%2E", "%2e%2e", "%2f", "%2F", "%5c", "%5C", ";", "..;",
        ".;", ";x", "%3b", "%3B", "%00", "%1f", "%7f", "%", "%4", "%zz", "%41", "%7e", "%7E",
        "%C3%A9", "%252e", "%25", "admin", "Admin", "a", "b~c", "?", "?x=1", "#", "\u{0}", "\t",
        "é", " ", "+", "@", ":",
    ];

    fn target() -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(PIECES), 0..14)
            .prop_map(|v| format!("/{}", v.concat()))
    }

    fn opts() -> impl Strategy<Value = PathOptions> {
        prop_oneof![Just(EncodedSlashes::Refuse), Just(EncodedSlashes::Keep)]
            .prop_map(|encoded_slashes| PathOptions { encoded_slashes })
    }

    /// What an app that percent-decodes its path sees.
    fn app_view(path: &str) -> Vec<u8> {
        let b = path.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' && i + 2 < b.len() {
                let v = u8::from_str_radix(&path[i + 1..i + 3], 16)
                    .expect("escape the normalizer wrote");
                out.push(v);
                i += 3;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        out
    }

    fn check_accepted(target: &str, opts: PathOptions) -> Result<(), TestCaseError> {
        let Ok(t) = normalize_target(target, opts) else {
            return Ok(());
        };
        prop_assert!(t.path.starts_with('/'));
        // A fixed point: normalizing again changes nothing.
        let again = normalize_target(&t.path, opts).map(|a| a.path.into_owned());
        prop_assert_eq!(again.as_deref(), Ok(&*t.path));
        // The query is passed through as received.
        prop_assert_eq!(t.query, target.split_once('?').map(|(_, q)| q));
        let decoded = app_view(&t.path);
        if opts.encoded_slashes == EncodedSlashes::Refuse {
            // No separator appears when the app decodes.
            prop_assert_eq!(
                decoded.iter().filter(|&&b| b == b'/').count(),
                t.path.matches('/').count()
            );
            prop_assert!(!decoded.contains(&b'\\'));
        }
        // Each segment as the app decodes it (with `Keep`, `%2F` stays inside one).
        let segments: Vec<Vec<u8>> = t.path[1..].split('/').map(app_view).collect();
        for (i, seg) in segments.iter().enumerate() {
            let name = seg.split(|&b| b == b';').next().unwrap_or(seg);
            let last = i + 1 == segments.len();
            prop_assert!(
                !seg.is_empty() || last,
                "empty segment in {:?} from {:?}",
                t.path,
                target
            );
            let dot = name == b"." || name == b"..";
            let param_on_empty = name.is_empty() && seg.contains(&b';');
            prop_assert!(
                !dot && !param_on_empty,
                "dot segment in {:?} (app sees {:?}) from {:?}",
                t.path,
                String::from_utf8_lossy(&decoded),
                target
            );
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        #[test]
        fn bypass_pieces(target in target(), opts in opts()) {
            check_accepted(&target, opts)?;
        }

        #[test]
        fn any_text(target in any::<String>(), opts in opts()) {
            check_accepted(&target, opts)?;
        }

        #[test]
        fn printable_ascii(target in "/[ -~]{0,60}", opts in opts()) {
            check_accepted(&target, opts)?;
        }

        /// Spelling an unreserved character as an escape (either case) names the same
        /// resource.
        #[test]
        fn escaped_unreserved_is_the_same_path(target in target(), at in any::<prop::sample::Index>(), lower in any::<bool>()) {
            let opts = PathOptions::default();
            let Ok(t) = normalize_target(&target, opts) else { return Ok(()) };
            let path = t.path.into_owned();
            // Unreserved characters outside an escape (`%3B`'s `3` is not one).
            let in_escape = |i: usize| (i >= 1 && path.as_bytes()[i - 1] == b'%') || (i >= 2 && path.as_bytes()[i - 2] == b'%');
            let spots: Vec<usize> = path.bytes().enumerate().filter(|&(i, b)| is_unreserved(b) && !in_escape(i)).map(|(i, _)| i).collect();
            if spots.is_empty() { return Ok(()) }
            let i = spots[at.index(spots.len())];
            let esc = if lower { format!("%{:02x}", path.as_bytes()[i]) } else { format!("%{:02X}", path.as_bytes()[i]) };
            let spelled = format!("{}{}{}", &path[..i], esc, &path[i + 1..]);
            let again = normalize_target(&spelled, opts).map(|a| a.path.into_owned());
            prop_assert_eq!(again, Ok(path));
        }

        #[test]
        fn hosts(host in prop_oneof![any::<String>(), "[a-zA-Z0-9.:\\[\\]@/_-]{0,30}"]) {
            if let Ok(h) = normalize_host(&host) {
                prop_assert!(!h.is_empty());
                prop_assert!(!h.bytes().any(|b| b.is_ascii_uppercase()));
                prop_assert!(!h.bytes().any(|b| matches!(b, b'/' | b'?' | b'#' | b'@' | b' ')));
                if !h.starts_with('[') {
                    prop_assert!(!h.contains(':'), "port left in {:?}", h);
                }
                let again = normalize_host(&h).map(|a| a.into_owned());
                prop_assert_eq!(again.as_deref(), Ok(&*h));
            }
        }
    }
}
