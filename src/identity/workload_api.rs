//! The `workload_api` identity source: SVIDs and bundles streamed from SPIRE Agent (or
//! any SPIFFE Workload API server) over a unix socket.
//!
//! While the agent is unreachable the last good snapshot keeps serving (a "cached
//! identity"), and reconnection goes on forever with capped, jittered backoff. Once the
//! cached SVID expires, handshakes are refused (`identity expired`) rather than an
//! expired certificate presented.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_util::sync::CancellationToken;
use tonic::codegen::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::Channel;
use tonic::{Request, Status, Streaming};

use super::{Bundle, IdentityError, IdentityState, IdentityUpdate, Svid};
use crate::config::WorkloadApiConfig;
use crate::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use crate::proto::workload::{
    JwtBundlesRequest, JwtsvidRequest, JwtsvidResponse, X509BundlesRequest, X509BundlesResponse,
    X509svidRequest, X509svidResponse,
};
use crate::spiffe::{parse_trust_domain, SpiffeId, TrustDomain};

/// The metadata every Workload API call must carry (the spec's guard against SSRF).
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Adds the security header to every request.
#[derive(Clone, Copy, Debug, Default)]
pub struct SecurityHeader;

impl Interceptor for SecurityHeader {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert(
            SECURITY_HEADER,
            tonic::metadata::MetadataValue::from_static("true"),
        );
        Ok(req)
    }
}

pub type Client = SpiffeWorkloadApiClient<InterceptedService<Channel, SecurityHeader>>;

/// A Workload API client over a unix socket. The channel connects lazily and
/// reconnects by itself; a call fails with UNAVAILABLE while the socket is absent.
#[derive(Clone)]
pub struct WorkloadApiClient {
    inner: Client,
}

impl WorkloadApiClient {
    pub fn new(socket: &Path) -> Result<Self, IdentityError> {
        let channel = crate::net::unix::channel(socket)
            .map_err(|e| IdentityError::WorkloadApi(e.to_string()))?;
        Ok(Self {
            inner: SpiffeWorkloadApiClient::with_interceptor(channel, SecurityHeader),
        })
    }

    pub async fn x509_svids(&mut self) -> Result<Streaming<X509svidResponse>, Status> {
        Ok(self
            .inner
            .fetch_x509svid(X509svidRequest {})
            .await?
            .into_inner())
    }

    pub async fn x509_bundles(&mut self) -> Result<Streaming<X509BundlesResponse>, Status> {
        Ok(self
            .inner
            .fetch_x509_bundles(X509BundlesRequest {})
            .await?
            .into_inner())
    }

    /// JWT-SVIDs for `audience` (all identities, or only `spiffe_id`).
    pub async fn jwt_svids(
        &mut self,
        audience: Vec<String>,
        spiffe_id: Option<&SpiffeId>,
    ) -> Result<JwtsvidResponse, Status> {
        let req = JwtsvidRequest {
            audience,
            spiffe_id: spiffe_id.map(|s| s.to_string()).unwrap_or_default(),
        };
        Ok(self.inner.fetch_jwtsvid(req).await?.into_inner())
    }

    /// The JWT bundles stream: every message is the complete set.
    pub async fn jwt_bundle_stream(
        &mut self,
    ) -> Result<Streaming<crate::proto::workload::JwtBundlesResponse>, Status> {
        Ok(self
            .inner
            .fetch_jwt_bundles(JwtBundlesRequest {})
            .await?
            .into_inner())
    }

    /// The first JWKS bundles message: trust domain ID → JWKS JSON.
    pub async fn jwt_bundles(&mut self) -> Result<BTreeMap<String, Vec<u8>>, Status> {
        let mut stream = self
            .inner
            .fetch_jwt_bundles(JwtBundlesRequest {})
            .await?
            .into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::unavailable("JWT bundle stream ended"))?;
        Ok(first.bundles.into_iter().collect())
    }
}

/// Splits concatenated DER certificates (the Workload API's `x509_svid` and `bundle`).
pub fn split_der(mut bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    use x509_parser::prelude::FromDer;
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let (rest, _) = x509_parser::certificate::X509Certificate::from_der(bytes)
            .map_err(|e| format!("certificate {} is not valid DER: {e}", out.len()))?;
        let len = bytes.len() - rest.len();
        out.push(CertificateDer::from(bytes[..len].to_vec()));
        bytes = rest;
    }
    if out.is_empty() {
        return Err("no certificates".into());
    }
    Ok(out)
}

/// Turns one `X509SVIDResponse` (plus the latest bundles message, if any) into an
/// update, with the selected SVID first. Invalid SVIDs are skipped with a warning; a
/// response with no usable SVID is an error (the cached identity stays).
fn to_update(
    resp: &X509svidResponse,
    bundles_msg: Option<&X509BundlesResponse>,
    config: &WorkloadApiConfig,
) -> Result<IdentityUpdate, IdentityError> {
    let mut svids: Vec<(Arc<Svid>, String)> = Vec::new();
    let mut bundles: BTreeMap<TrustDomain, Vec<u8>> = BTreeMap::new();
    for s in &resp.svids {
        let parsed = split_der(&s.x509_svid)
            .map_err(IdentityError::WorkloadApi)
            .and_then(|chain| {
                let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(s.x509_svid_key.clone()));
                Svid::new(chain, key)
            })
            .and_then(|svid| {
                if svid.spiffe_id.to_string() == s.spiffe_id {
                    Ok(svid)
                } else {
                    Err(IdentityError::WorkloadApi(format!(
                        "spiffe_id {:?} does not match the certificate's {}",
                        s.spiffe_id, svid.spiffe_id
                    )))
                }
            });
        match parsed {
            Ok(svid) => {
                bundles
                    .entry(svid.spiffe_id.trust_domain().clone())
                    .or_insert_with(|| s.bundle.clone());
                svids.push((Arc::new(svid), s.hint.clone()));
            }
            Err(e) => {
                tracing::warn!(spiffe_id = %s.spiffe_id, error = %e, "Workload API sent an unusable SVID; skipped")
            }
        }
    }
    let federated = resp.federated_bundles.iter();
    let streamed = bundles_msg.into_iter().flat_map(|b| b.bundles.iter());
    for (td_id, der) in federated.chain(streamed) {
        match parse_trust_domain(td_id) {
            Ok(td) => {
                bundles.insert(td, der.clone());
            }
            Err(e) => {
                tracing::warn!(trust_domain = %td_id, error = %e, "bundle with a bad trust domain name skipped")
            }
        }
    }
    if svids.is_empty() {
        return Err(IdentityError::WorkloadApi(format!(
            "no usable SVID in the response ({} sent)",
            resp.svids.len()
        )));
    }
    let selected = svids.iter().position(|(s, hint)| {
        config
            .spiffe_id
            .as_ref()
            .is_some_and(|id| &s.spiffe_id == id)
            || config.hint.as_ref().is_some_and(|h| h == hint)
    });
    match (
        selected,
        config.spiffe_id.is_some() || config.hint.is_some(),
    ) {
        (Some(i), _) => svids.swap(0, i),
        (None, true) => {
            let got: Vec<String> = svids.iter().map(|(s, _)| s.spiffe_id.to_string()).collect();
            return Err(IdentityError::WorkloadApi(format!(
                "the selected SVID ({}) is not among those issued: {}",
                config
                    .spiffe_id
                    .as_ref()
                    .map(|s| s.to_string())
                    .or(config.hint.clone())
                    .unwrap_or_default(),
                got.join(", ")
            )));
        }
        (None, false) => {}
    }
    let bundles = bundles
        .into_iter()
        .map(|(td, der)| {
            let roots = split_der(&der)
                .map_err(|e| IdentityError::WorkloadApi(format!("bundle of {td}: {e}")))?;
            Bundle::new(td, roots).map(Arc::new)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let update = IdentityUpdate {
        svids: svids.into_iter().map(|(s, _)| s).collect(),
        bundles,
    };
    update.check_own()?;
    Ok(update)
}

/// Open streams to the Workload API.
struct Session {
    svids: Streaming<X509svidResponse>,
    bundles: Option<Streaming<X509BundlesResponse>>,
    last_svids: X509svidResponse,
    last_bundles: Option<X509BundlesResponse>,
}

pub struct WorkloadApiSource {
    config: WorkloadApiConfig,
    client: WorkloadApiClient,
    session: Option<Session>,
}

impl WorkloadApiSource {
    /// Connects and waits (forever, with backoff) for the first usable identity.
    pub async fn start(
        config: &WorkloadApiConfig,
    ) -> Result<(Self, IdentityUpdate), IdentityError> {
        let mut source = Self {
            config: config.clone(),
            client: WorkloadApiClient::new(&config.socket)?,
            session: None,
        };
        let mut backoff = Backoff::default();
        loop {
            match source.open().await {
                Ok(update) => return Ok((source, update)),
                Err(e) => {
                    let wait = backoff.next();
                    tracing::warn!(socket = %config.socket.display(), error = %e, retry_in = ?wait, "waiting for the Workload API");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// Opens both streams and reads the first SVID message.
    async fn open(&mut self) -> Result<IdentityUpdate, IdentityError> {
        let status = |e: Status| {
            IdentityError::WorkloadApi(format!("{}: {}", code_name(e.code()), e.message()))
        };
        let mut svids = self.client.x509_svids().await.map_err(status)?;
        let first = svids.message().await.map_err(status)?.ok_or_else(|| {
            IdentityError::WorkloadApi("stream ended before the first SVID".into())
        })?;
        // FetchX509Bundles is optional for us: the SVID stream carries bundles too.
        let mut bundles = match self.client.x509_bundles().await {
            Ok(s) => Some(s),
            Err(e) if e.code() == tonic::Code::Unimplemented => None,
            Err(e) => return Err(status(e)),
        };
        let last_bundles = match bundles.as_mut() {
            Some(s) => s.message().await.map_err(status)?,
            None => None,
        };
        let update = to_update(&first, last_bundles.as_ref(), &self.config)?;
        self.session = Some(Session {
            svids,
            bundles,
            last_svids: first,
            last_bundles,
        });
        Ok(update)
    }

    /// JWT-SVIDs come from `FetchJWTSVID`, for our selected identity if one is configured.
    pub fn install_jwt(&self, jwt: &crate::jwt::JwtState) {
        jwt.set_minter(Arc::new(WorkloadJwtMinter {
            client: self.client.clone(),
            spiffe_id: self.config.spiffe_id.clone(),
            hint: self.config.hint.clone(),
        }));
    }

    /// Applies every message until the streams break, then reconnects, forever.
    pub async fn run(mut self, state: Arc<IdentityState>, shutdown: CancellationToken) {
        tokio::spawn(follow_jwt_bundles(
            self.client.clone(),
            state.jwt().clone(),
            shutdown.clone(),
        ));
        let mut backoff = Backoff::default();
        loop {
            if let Some(session) = self.session.as_mut() {
                let end = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    end = follow(session, &self.config, &state) => end,
                };
                self.session = None;
                state.set_cached(true);
                let until = state
                    .load()
                    .default_svid()
                    .map(|s| humantime::format_rfc3339_seconds(s.not_after).to_string())
                    .unwrap_or_default();
                tracing::warn!(error = %end, valid_until = %until, "Workload API stream ended; serving the cached identity");
            }
            let wait = backoff.next();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            match self.open().await {
                Ok(update) => {
                    backoff = Backoff::default();
                    state.publish(update);
                    state.set_cached(false);
                    tracing::info!("Workload API stream resumed");
                }
                Err(e) => {
                    tracing::debug!(error = %e, retry_in = ?backoff.peek(), "Workload API still unreachable")
                }
            }
        }
    }
}

/// Fetches JWT-SVIDs from the Workload API.
struct WorkloadJwtMinter {
    client: WorkloadApiClient,
    spiffe_id: Option<SpiffeId>,
    hint: Option<String>,
}

impl crate::jwt::JwtMinter for WorkloadJwtMinter {
    fn mint<'a>(&'a self, audience: &'a str) -> crate::jwt::MintFuture<'a> {
        Box::pin(async move {
            let mut client = self.client.clone();
            let resp = client
                .jwt_svids(vec![audience.to_string()], self.spiffe_id.as_ref())
                .await
                .map_err(|e| format!("FetchJWTSVID: {}: {}", code_name(e.code()), e.message()))?;
            let chosen = resp
                .svids
                .iter()
                .find(|s| self.hint.as_ref().is_some_and(|h| *h == s.hint))
                .or_else(|| match &self.hint {
                    Some(_) => None,
                    None => resp.svids.first(),
                })
                .ok_or_else(|| "FetchJWTSVID: no JWT-SVID for our identity".to_string())?;
            Ok(chosen.svid.clone())
        })
    }
}

/// Follows `FetchJWTBundles` until shutdown, reconnecting with backoff: each message
/// replaces the JWT bundles; a trust domain whose JWKS does not parse keeps its old one.
async fn follow_jwt_bundles(
    mut client: WorkloadApiClient,
    jwt: Arc<crate::jwt::JwtState>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::default();
    loop {
        let end = match client.jwt_bundle_stream().await {
            Err(e) if e.code() == tonic::Code::Unimplemented => {
                tracing::warn!("the Workload API does not serve JWT bundles; inbound JWT-SVIDs cannot be validated");
                return;
            }
            Err(e) => format!("{}: {}", code_name(e.code()), e.message()),
            Ok(mut stream) => loop {
                let msg = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    m = stream.message() => m,
                };
                match msg {
                    Ok(Some(m)) => {
                        backoff = Backoff::default();
                        let current = jwt.bundles();
                        let mut next = crate::jwt::JwtBundles::default();
                        for (td, jwks) in m.bundles {
                            let Ok(td) = parse_trust_domain(&td) else {
                                tracing::warn!(trust_domain = %crate::log_limit::printable(&td, 128), "JWT bundle for an invalid trust domain skipped");
                                continue;
                            };
                            match crate::jwt::JwtBundle::parse(&jwks) {
                                Ok((b, skipped)) => {
                                    for why in skipped {
                                        tracing::warn!(trust_domain = %td, "JWT bundle key skipped: {why}");
                                    }
                                    next.by_domain.insert(td, Arc::new(b));
                                }
                                Err(e) => {
                                    tracing::warn!(trust_domain = %td, error = %e, "JWT bundle does not parse; keeping the previous one");
                                    if let Some(old) = current.by_domain.get(&td) {
                                        next.by_domain.insert(td, old.clone());
                                    }
                                }
                            }
                        }
                        jwt.set_bundles(next, "workload_api");
                    }
                    Ok(None) => break "JWT bundle stream closed by the server".to_string(),
                    Err(e) => break format!("{}: {}", code_name(e.code()), e.message()),
                }
            },
        };
        let wait = backoff.next();
        tracing::debug!(error = %end, retry_in = ?wait, "JWT bundle stream ended; the last bundles stay in use");
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Reads both streams, publishing each change, until one fails or ends.
async fn follow(
    session: &mut Session,
    config: &WorkloadApiConfig,
    state: &IdentityState,
) -> String {
    loop {
        let changed = tokio::select! {
            m = session.svids.message() => match m {
                Ok(Some(m)) => { session.last_svids = m; true }
                Ok(None) => return "SVID stream closed by the server".into(),
                Err(e) => return format!("{}: {}", code_name(e.code()), e.message()),
            },
            m = async { session.bundles.as_mut().expect("guarded").message().await }, if session.bundles.is_some() => match m {
                Ok(Some(m)) => { session.last_bundles = Some(m); true }
                Ok(None) => return "bundle stream closed by the server".into(),
                Err(e) => return format!("{}: {}", code_name(e.code()), e.message()),
            },
        };
        if changed {
            match to_update(&session.last_svids, session.last_bundles.as_ref(), config) {
                Ok(update) => {
                    state.publish(update);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "Workload API update not usable; keeping the current identity")
                }
            }
        }
    }
}

fn code_name(code: tonic::Code) -> String {
    format!("{code:?}")
}

/// Capped exponential backoff with full jitter.
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { next: BACKOFF_MIN }
    }
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let cap = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        let ms = rand::random_range(cap.as_millis() as u64 / 2..=cap.as_millis() as u64);
        Duration::from_millis(ms)
    }

    fn peek(&self) -> Duration {
        self.next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let mut b = Backoff::default();
        let waits: Vec<Duration> = (0..12).map(|_| b.next()).collect();
        assert!(waits[0] <= BACKOFF_MIN && waits[0] >= BACKOFF_MIN / 2);
        assert!(waits.iter().all(|w| *w <= BACKOFF_MAX));
        assert!(waits[11] >= BACKOFF_MAX / 2, "{waits:?}");
    }

    #[test]
    fn split_der_splits_and_refuses_junk() {
        let a = rcgen::generate_simple_self_signed(vec!["a".into()])
            .unwrap()
            .cert;
        let b = rcgen::generate_simple_self_signed(vec!["b".into()])
            .unwrap()
            .cert;
        let mut both = a.der().to_vec();
        both.extend_from_slice(b.der());
        let certs = split_der(&both).unwrap();
        assert_eq!(certs.len(), 2);
        assert_eq!(certs[1].as_ref(), b.der().as_ref());
        assert!(split_der(b"junk").is_err());
        assert!(split_der(b"").is_err());
    }
}

#[cfg(test)]
mod properties {
    //! What the Workload API socket sends, mangled: a valid `X509SVIDResponse` as
    //! encoded on the wire with bytes flipped, cut, inserted, or replaced by noise.
    //! Decoding and turning it into an update never panics; an update that comes out
    //! still names, for each SVID, the ID its certificate carries.
    use super::*;
    use crate::proto::workload::X509svid;
    use crate::spiffe::parse_spiffe_id;
    use crate::testing::TestCa;
    use proptest::prelude::*;
    use prost::Message;
    use std::sync::OnceLock;

    fn concat(certs: &[CertificateDer<'_>]) -> Vec<u8> {
        certs
            .iter()
            .flat_map(|c| c.as_ref().iter().copied())
            .collect()
    }

    fn config() -> WorkloadApiConfig {
        WorkloadApiConfig {
            socket: "/nonexistent".into(),
            spiffe_id: None,
            hint: None,
        }
    }

    /// A valid response (two SVIDs, a federated bundle), encoded, and its chain's DER.
    fn valid() -> &'static (Vec<u8>, Vec<u8>) {
        static VALID: OnceLock<(Vec<u8>, Vec<u8>)> = OnceLock::new();
        VALID.get_or_init(|| {
            let ca = TestCa::new("example.org").ca;
            let other = TestCa::new("other.org").ca;
            let bundle = concat(&ca.bundle().unwrap().roots);
            let svid = |path: &str, hint: &str| {
                let id = parse_spiffe_id(path).unwrap();
                let s = ca.mint(&id, Duration::from_secs(600)).unwrap();
                X509svid {
                    spiffe_id: path.into(),
                    x509_svid: concat(&s.chain),
                    x509_svid_key: s.key_der().to_vec(),
                    bundle: bundle.clone(),
                    hint: hint.into(),
                }
            };
            let a = svid("spiffe://example.org/web", "internal");
            let chain = a.x509_svid.clone();
            let resp = X509svidResponse {
                svids: vec![a, svid("spiffe://example.org/db", "external")],
                federated_bundles: [(
                    "spiffe://other.org".to_string(),
                    concat(&other.bundle().unwrap().roots),
                )]
                .into(),
                ..Default::default()
            };
            (resp.encode_to_vec(), chain)
        })
    }

    #[derive(Debug, Clone)]
    enum Edit {
        Flip(prop::sample::Index, u8),
        Cut(prop::sample::Index),
        Insert(prop::sample::Index, Vec<u8>),
        Remove(prop::sample::Index, usize),
    }

    fn edits() -> impl Strategy<Value = Vec<Edit>> {
        let edit = prop_oneof![
            4 => (any::<prop::sample::Index>(), 1..=255u8).prop_map(|(i, x)| Edit::Flip(i, x)),
            1 => any::<prop::sample::Index>().prop_map(Edit::Cut),
            2 => (any::<prop::sample::Index>(), prop::collection::vec(any::<u8>(), 1..8)).prop_map(|(i, b)| Edit::Insert(i, b)),
            2 => (any::<prop::sample::Index>(), 1..16usize).prop_map(|(i, n)| Edit::Remove(i, n)),
        ];
        prop::collection::vec(edit, 1..4)
    }

    fn apply(mut bytes: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
        for e in edits {
            if bytes.is_empty() {
                break;
            }
            match e {
                Edit::Flip(i, x) => {
                    let i = i.index(bytes.len());
                    bytes[i] ^= x;
                }
                Edit::Cut(i) => bytes.truncate(i.index(bytes.len())),
                Edit::Insert(i, b) => {
                    let i = i.index(bytes.len());
                    bytes.splice(i..i, b.iter().copied());
                }
                Edit::Remove(i, n) => {
                    let i = i.index(bytes.len());
                    let end = (i + n).min(bytes.len());
                    bytes.drain(i..end);
                }
            }
        }
        bytes
    }

    fn check(wire: &[u8]) -> Result<(), TestCaseError> {
        let Ok(resp) = X509svidResponse::decode(wire) else {
            return Ok(());
        };
        if let Ok(update) = to_update(&resp, None, &config()) {
            for svid in &update.svids {
                let leaf = crate::x509::LeafInfo::parse(&svid.chain[0])
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(&leaf.spiffe_id, &svid.spiffe_id);
                prop_assert!(resp
                    .svids
                    .iter()
                    .any(|s| s.spiffe_id == svid.spiffe_id.to_string()));
            }
        }
        Ok(())
    }

    #[test]
    fn the_valid_response_is_taken() {
        let resp = X509svidResponse::decode(&valid().0[..]).unwrap();
        let update = to_update(&resp, None, &config()).unwrap();
        assert_eq!(update.svids.len(), 2);
        assert_eq!(update.bundles.len(), 2);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn mangled_responses(edits in edits()) {
            check(&apply(valid().0.clone(), &edits))?;
        }

        #[test]
        fn noise(wire in prop::collection::vec(any::<u8>(), 0..512)) {
            check(&wire)?;
        }

        /// The certificate parsers on a mangled certificate: an error, never a panic.
        #[test]
        fn mangled_certificates(edits in edits()) {
            let der = apply(valid().1.clone(), &edits);
            let _ = split_der(&der);
            let _ = crate::x509::LeafInfo::parse(&der);
            let _ = crate::x509::RootFacts::parse(&der);
            let _ = crate::x509::serial_of(&der);
            let _ = crate::x509::not_after_of(&der);
            let _ = crate::x509::is_ca(&der);
        }

        /// Concatenated certificates split back into the same certificates.
        #[test]
        fn split_der_round_trip(n in 1..5usize) {
            let one = &valid().1;
            let per_chain = split_der(one).map_err(TestCaseError::fail)?.len();
            let certs = split_der(&one.repeat(n)).map_err(TestCaseError::fail)?;
            prop_assert_eq!(certs.len(), per_chain * n);
            prop_assert_eq!(concat(&certs), one.repeat(n));
        }
    }
}
