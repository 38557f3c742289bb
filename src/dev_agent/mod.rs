//! `svidcar dev-agent`: a SPIFFE Workload API server backed by the dev CA, so the
//! `workload_api` source (and any SPIFFE client) can be run and tested with no SPIRE.
//!
//! Callers are attested from the socket's peer credentials against a small list of
//! registration entries, as SPIRE Agent does: once per connection, when it is accepted,
//! and every call checks the attested process is still the one behind it (see
//! `attest`). SVIDs are minted per entry and re-minted at half-life, and every open
//! stream gets the new ones. On SIGTERM/SIGINT open streams end and the process exits
//! within [`DRAIN_TIMEOUT`].

mod attest;
mod jwt;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use serde::Deserialize;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::config::{duration, ConfigError};
use crate::identity::dev_ca::DevCa;
use crate::identity::workload_api::SECURITY_HEADER;
use crate::identity::{pem, IdentityError, Svid};
use crate::log_limit::{printable, LogLimiter};
use crate::proto::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use crate::proto::workload::*;
use crate::spiffe::{
    parse_spiffe_id, parse_trust_domain, parse_workload_id, SpiffeId, TrustDomain,
};

/// The shortest `svid_ttl`: SVIDs are re-minted at half-life, so a tiny TTL would spin
/// the rotation loop and push a new SVID to every stream many times a second.
pub const MIN_SVID_TTL: Duration = Duration::from_secs(2);

/// How long shutdown waits for connections to close after open streams were ended.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The dev-agent config file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub socket: PathBuf,
    pub trust_domain: String,
    #[serde(default = "default_ttl", deserialize_with = "duration")]
    pub svid_ttl: Duration,
    #[serde(default)]
    pub ca_cert: Option<PathBuf>,
    #[serde(default)]
    pub ca_key: Option<PathBuf>,
    /// Other trust domains' CA certificates (PEM), served as federated bundles.
    #[serde(default)]
    pub federates_with: BTreeMap<String, PathBuf>,
    pub entries: Vec<EntryConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntryConfig {
    pub spiffe_id: String,
    pub selectors: Vec<String>,
    #[serde(default)]
    pub hint: String,
}

fn default_ttl() -> Duration {
    Duration::from_secs(3600)
}

struct Entry {
    id: SpiffeId,
    selectors: Vec<String>,
    hint: String,
}

/// What the agent has issued now; replaced whole at every rotation and when the
/// federated bundles change (SIGHUP).
struct Issued {
    svids: BTreeMap<SpiffeId, Arc<Svid>>,
    /// Trust domain ID → concatenated DER roots (ours and the federated ones).
    bundles: Arc<BTreeMap<String, Vec<u8>>>,
}

struct Agent {
    ca: DevCa,
    td: TrustDomain,
    ttl: Duration,
    entries: Vec<Entry>,
    jwt: jwt::JwtIssuer,
    issued: watch::Sender<Arc<Issued>>,
    /// Fired on SIGTERM/SIGINT: ends every open stream so the server can stop.
    shutdown: CancellationToken,
}

/// Refusals are caused by local callers, and their text holds paths those callers chose:
/// escaped (`printable`) and rate-limited.
static REFUSAL_LOG: LogLimiter = LogLimiter::new("dev-agent refusal", 20, Duration::from_secs(10));

type Stream<T> = Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

impl AgentConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let mut c: Self = crate::config::parse_yaml(&crate::config::read_text(path)?)?;
        // Relative paths are read relative to the config file, as in `svidcar run`.
        let base = crate::config::config_dir(path);
        crate::config::resolve_path(&base, &mut c.socket);
        for p in [&mut c.ca_cert, &mut c.ca_key].into_iter().flatten() {
            crate::config::resolve_path(&base, p);
        }
        for p in c.federates_with.values_mut() {
            crate::config::resolve_path(&base, p);
        }
        if c.svid_ttl < MIN_SVID_TTL {
            return Err(ConfigError::new(
                "svid_ttl",
                format!(
                    "{} is too short: must be at least {} (SVIDs are re-minted at half-life)",
                    humantime::format_duration(c.svid_ttl),
                    humantime::format_duration(MIN_SVID_TTL)
                ),
            ));
        }
        Ok(c)
    }
}

impl Agent {
    fn new(c: &AgentConfig) -> anyhow::Result<Self> {
        let td = parse_trust_domain(&c.trust_domain).map_err(|e| anyhow!("trust_domain: {e}"))?;
        let ca = match (&c.ca_cert, &c.ca_key) {
            (Some(cert), Some(key)) => DevCa::load(&td, cert, key).map_err(|e| {
                let named = |p: &Path| matches!(&e, IdentityError::File { path, .. } if Path::new(path) == p);
                let k = if named(key) { "ca_key" } else { "ca_cert" };
                anyhow!("{k}: {e}")
            })?,
            (None, None) => DevCa::generate(&td, Duration::from_secs(365 * 24 * 3600))?,
            _ => return Err(anyhow!("ca_cert and ca_key: set both or neither")),
        };
        if c.entries.is_empty() {
            return Err(anyhow!(
                "entries: no registration entries; every caller would be refused"
            ));
        }
        let mut entries = Vec::new();
        for (i, e) in c.entries.iter().enumerate() {
            let id = parse_workload_id(&e.spiffe_id)
                .map_err(|err| anyhow!("entries[{i}].spiffe_id: {err}"))?;
            if !id.is_member_of(&td) {
                return Err(anyhow!(
                    "entries[{i}].spiffe_id: {id} is not in trust domain {td}"
                ));
            }
            if e.selectors.is_empty() {
                return Err(anyhow!(
                    "entries[{i}].selectors: at least one selector is needed"
                ));
            }
            for (j, s) in e.selectors.iter().enumerate() {
                attest::validate_selector(s)
                    .map_err(|p| anyhow!("entries[{i}].selectors[{j}]: {p}"))?;
            }
            entries.push(Entry {
                id,
                selectors: e.selectors.clone(),
                hint: e.hint.clone(),
            });
        }
        let bundles = bundles(&td, &ca, &c.federates_with)?;
        let jwt = jwt::JwtIssuer::generate().map_err(|e| anyhow!("JWT signing key: {e}"))?;
        let (issued, _) = watch::channel(Arc::new(Issued {
            svids: BTreeMap::new(),
            bundles: Arc::new(bundles),
        }));
        let agent = Self {
            ca,
            td,
            ttl: c.svid_ttl,
            entries,
            jwt,
            issued,
            shutdown: CancellationToken::new(),
        };
        agent.rotate()?;
        Ok(agent)
    }

    /// Mints a fresh SVID for every registered SPIFFE ID and notifies open streams.
    fn rotate(&self) -> anyhow::Result<()> {
        let mut svids = BTreeMap::new();
        for e in &self.entries {
            if !svids.contains_key(&e.id) {
                svids.insert(e.id.clone(), Arc::new(self.ca.mint(&e.id, self.ttl)?));
            }
        }
        let bundles = self.issued.borrow().bundles.clone();
        self.issued
            .send_replace(Arc::new(Issued { svids, bundles }));
        Ok(())
    }

    /// Serves these federated bundles from now on (as `spire-server federation`
    /// changes do): open streams get an update without the trust domains left out.
    fn federate(&self, federates_with: &BTreeMap<String, PathBuf>) -> anyhow::Result<()> {
        let bundles = Arc::new(bundles(&self.td, &self.ca, federates_with)?);
        self.issued.send_modify(|i| {
            *i = Arc::new(Issued {
                svids: i.svids.clone(),
                bundles,
            })
        });
        Ok(())
    }

    /// Checks the security header and attests the caller; returns its entries.
    fn caller<T>(&self, req: &Request<T>) -> Result<Vec<&Entry>, Status> {
        if req
            .metadata()
            .get(SECURITY_HEADER)
            .and_then(|v| v.to_str().ok())
            != Some("true")
        {
            return Err(Status::invalid_argument(
                "security header missing from request",
            ));
        }
        let attested = req
            .extensions()
            .get::<Arc<attest::Attestation>>()
            .ok_or_else(|| Status::internal("caller attestation unavailable"))?;
        if let Err(why) = attested.still_same() {
            if REFUSAL_LOG.allow("process_changed") {
                let why = printable(&why.to_string(), 512);
                tracing::warn!(pid = ?attested.pid, "call refused: {why}");
            }
            return Err(Status::permission_denied(format!(
                "caller is not the process attested for this connection: {why}"
            )));
        }
        let selectors = &attested.selectors;
        let entries: Vec<&Entry> = self
            .entries
            .iter()
            .filter(|e| attest::matches(&e.selectors, selectors))
            .collect();
        if entries.is_empty() {
            if REFUSAL_LOG.allow("no_entry") {
                tracing::info!(?selectors, "caller matches no registration entry");
            }
            return Err(Status::permission_denied("no identity issued"));
        }
        Ok(entries)
    }

    fn x509_response(&self, entries: &[SpiffeId], issued: &Issued) -> X509svidResponse {
        let own = self.td.id_string();
        let svids = entries
            .iter()
            .filter_map(|id| issued.svids.get(id))
            .map(|s| X509svid {
                spiffe_id: s.spiffe_id.to_string(),
                x509_svid: s.chain.iter().flat_map(|c| c.to_vec()).collect(),
                x509_svid_key: s.key_der().to_vec(),
                bundle: issued.bundles.get(&own).cloned().unwrap_or_default(),
                hint: self.hint_of(&s.spiffe_id),
            })
            .collect();
        let federated_bundles = issued
            .bundles
            .iter()
            .filter(|(k, _)| **k != own)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        X509svidResponse {
            svids,
            crl: vec![],
            federated_bundles,
        }
    }

    fn hint_of(&self, id: &SpiffeId) -> String {
        self.entries
            .iter()
            .find(|e| &e.id == id)
            .map(|e| e.hint.clone())
            .unwrap_or_default()
    }
}

/// What ends a stream early: shutdown, or the attested process leaving the connection.
struct StreamGuard {
    shutdown: CancellationToken,
    attested: Option<Arc<attest::Attestation>>,
}

impl StreamGuard {
    fn of<T>(agent: &Agent, req: &Request<T>) -> Self {
        Self {
            shutdown: agent.shutdown.clone(),
            attested: req.extensions().get::<Arc<attest::Attestation>>().cloned(),
        }
    }

    /// Re-checks, before each message, that the attested process is still behind the
    /// connection: a stream must not outlive it into a forked child's hands.
    fn check(&self) -> Result<(), Status> {
        match self.attested.as_ref().map(|a| a.still_same()) {
            Some(Err(why)) => {
                if REFUSAL_LOG.allow("stream_ended") {
                    let why = printable(&why.to_string(), 512);
                    tracing::warn!("stream ended: {why}");
                }
                Err(Status::permission_denied(format!(
                    "caller is not the process attested for this connection: {why}"
                )))
            }
            _ => Ok(()),
        }
    }
}

/// Streams a message now and after every rotation, until the caller goes away, the
/// attested process is gone, or the agent shuts down.
fn stream_on_rotation<T: Send + 'static>(
    mut issued: watch::Receiver<Arc<Issued>>,
    build: impl Fn(&Issued) -> T + Send + 'static,
    resend: bool,
    guard: StreamGuard,
) -> Stream<T> {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            if let Err(status) = guard.check() {
                let _ = tx.try_send(Err(status));
                return;
            }
            let msg = build(&issued.borrow_and_update().clone());
            if tx.send(Ok(msg)).await.is_err() {
                return;
            }
            loop {
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = guard.shutdown.cancelled() => {
                        let _ = tx.try_send(Err(Status::unavailable("dev-agent is shutting down")));
                        return;
                    }
                    changed = issued.changed() => {
                        if changed.is_err() { return; }
                        if resend { break; }
                    }
                }
            }
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

/// The gRPC service; shares the agent.
struct Service(Arc<Agent>);

#[tonic::async_trait]
impl SpiffeWorkloadApi for Service {
    type FetchX509SVIDStream = Stream<X509svidResponse>;
    type FetchX509BundlesStream = Stream<X509BundlesResponse>;
    type FetchJWTBundlesStream = Stream<JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        req: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let ids: Vec<SpiffeId> = self.0.caller(&req)?.iter().map(|e| e.id.clone()).collect();
        tracing::info!(ids = ?ids.iter().map(|i| i.to_string()).collect::<Vec<_>>(), "FetchX509SVID");
        let agent = self.0.clone();
        let rx = agent.issued.subscribe();
        let guard = StreamGuard::of(&agent, &req);
        Ok(Response::new(stream_on_rotation(
            rx,
            move |i| agent.x509_response(&ids, i),
            true,
            guard,
        )))
    }

    async fn fetch_x509_bundles(
        &self,
        req: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        self.0.caller(&req)?;
        let rx = self.0.issued.subscribe();
        Ok(Response::new(stream_on_rotation(
            rx,
            |i| X509BundlesResponse {
                crl: vec![],
                bundles: i
                    .bundles
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            },
            true,
            StreamGuard::of(&self.0, &req),
        )))
    }

    async fn fetch_jwtsvid(
        &self,
        req: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        let entries = self.0.caller(&req)?;
        let r = req.get_ref();
        if r.audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        let wanted = if r.spiffe_id.is_empty() {
            None
        } else {
            Some(
                parse_spiffe_id(&r.spiffe_id)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?,
            )
        };
        let mut svids = Vec::new();
        for e in entries {
            if wanted.as_ref().is_some_and(|w| w != &e.id)
                || svids
                    .iter()
                    .any(|s: &Jwtsvid| s.spiffe_id == e.id.to_string())
            {
                continue;
            }
            let token = self
                .0
                .jwt
                .mint(
                    &e.id,
                    &r.audience,
                    self.0
                        .ttl
                        .min(Duration::from_secs(300))
                        .max(Duration::from_secs(60)),
                )
                .map_err(Status::internal)?;
            svids.push(Jwtsvid {
                spiffe_id: e.id.to_string(),
                svid: token,
                hint: e.hint.clone(),
            });
        }
        if svids.is_empty() {
            return Err(Status::permission_denied("no identity issued"));
        }
        Ok(Response::new(JwtsvidResponse { svids }))
    }

    async fn fetch_jwt_bundles(
        &self,
        req: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        self.0.caller(&req)?;
        let jwks = self.0.jwt.jwks().to_string().into_bytes();
        let bundles: std::collections::HashMap<String, Vec<u8>> =
            [(self.0.td.id_string(), jwks)].into_iter().collect();
        let rx = self.0.issued.subscribe();
        Ok(Response::new(stream_on_rotation(
            rx,
            move |_| JwtBundlesResponse {
                bundles: bundles.clone(),
            },
            false,
            StreamGuard::of(&self.0, &req),
        )))
    }

    async fn validate_jwtsvid(
        &self,
        req: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        self.0.caller(&req)?;
        let r = req.get_ref();
        if r.audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        if r.svid.is_empty() {
            return Err(Status::invalid_argument("svid must be specified"));
        }
        let (id, claims) = self
            .0
            .jwt
            .validate(&r.svid, &r.audience)
            .map_err(Status::invalid_argument)?;
        Ok(Response::new(ValidateJwtsvidResponse {
            spiffe_id: id.to_string(),
            claims: Some(jwt::to_struct(claims)),
        }))
    }
}

/// Runs the dev agent until SIGTERM/SIGINT. Then open streams end at once, and the
/// server waits at most [`DRAIN_TIMEOUT`] for connections to close: a client holding a
/// stream open must not keep the process alive. SIGHUP reads `federates_with` from
/// `path` again.
pub async fn run(config: AgentConfig, path: PathBuf) -> anyhow::Result<()> {
    let agent = Arc::new(Agent::new(&config)?);
    let shutdown = agent.shutdown.clone();
    // Any local process may call; attestation decides what it gets (as with SPIRE Agent).
    let listener = crate::net::unix::bind(&config.socket, 0o777).context("socket")?;
    tracing::info!(socket = %config.socket.display(), trust_domain = %agent.td, entries = agent.entries.len(), "dev-agent serving the Workload API");
    let rotator = {
        let agent = agent.clone();
        let half = agent.ttl / 2;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(half).await;
                // Minting can mean generating RSA keys: off the async workers.
                let minting = agent.clone();
                let minted = tokio::task::spawn_blocking(move || minting.rotate())
                    .await
                    .unwrap_or_else(|e| Err(anyhow!("minting task failed: {e}")));
                match minted {
                    Ok(()) => tracing::info!("dev-agent rotated SVIDs"),
                    Err(e) => tracing::error!(error = %e, "dev-agent could not mint SVIDs"),
                }
            }
        })
    };
    let signal = {
        let shutdown = shutdown.clone();
        let agent = agent.clone();
        tokio::spawn(async move {
            let mut signals = crate::signals::Signals::new();
            while signals.next().await == crate::signals::Request::Reload {
                let federated = AgentConfig::load(&path)
                    .map_err(anyhow::Error::from)
                    .and_then(|c| agent.federate(&c.federates_with).map(|()| c));
                match federated {
                    Ok(c) => {
                        tracing::info!(trust_domains = ?c.federates_with.keys().collect::<Vec<_>>(), "dev-agent federated bundles reloaded")
                    }
                    Err(e) => tracing::error!("dev-agent reload refused: {e:#}"),
                }
            }
            tracing::info!(drain = ?DRAIN_TIMEOUT, "dev-agent shutting down: ending open streams");
            shutdown.cancel();
        })
    };
    // Each connection is attested when accepted, before any byte of it is read; then gRPC
    // C-core's percent-encoded :authority is repaired on its way to h2.
    let incoming = crate::h2_authority::incoming(
        UnixListenerStream::new(listener).map(|conn| conn.map(attest::Attested::new)),
    );
    let (incoming, fatal) = crate::net::accept::guard("workload-api", incoming);
    let server = tonic::transport::Server::builder()
        .add_service(SpiffeWorkloadApiServer::new(Service(agent)))
        .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned());
    let result = tokio::select! {
        r = server => r.map_err(|e| anyhow!("Workload API server: {e}")),
        Ok(e) = fatal => Err(anyhow!("Workload API server: cannot accept: {e}")),
        _ = async {
            shutdown.cancelled().await;
            tokio::time::sleep(DRAIN_TIMEOUT).await;
        } => {
            tracing::warn!(drain = ?DRAIN_TIMEOUT, "drain time exceeded; closing the remaining connections");
            Ok(())
        }
    };
    rotator.abort();
    signal.abort();
    let _ = std::fs::remove_file(&config.socket);
    result
}

/// Our bundle and the federated ones, by trust domain ID.
fn bundles(
    td: &TrustDomain,
    ca: &DevCa,
    federates_with: &BTreeMap<String, PathBuf>,
) -> anyhow::Result<BTreeMap<String, Vec<u8>>> {
    let mut bundles = BTreeMap::new();
    bundles.insert(
        td.id_string(),
        ca.bundle()?.roots.iter().flat_map(|r| r.to_vec()).collect(),
    );
    for (name, path) in federates_with {
        let other = parse_trust_domain(name).map_err(|e| anyhow!("federates_with.{name}: {e}"))?;
        let roots = pem::load_certs(path).map_err(|e| anyhow!("federates_with.{name}: {e}"))?;
        bundles.insert(
            other.id_string(),
            roots.iter().flat_map(|r| r.to_vec()).collect(),
        );
    }
    Ok(bundles)
}
