//! `svidcar run`: start-up and shutdown, config → identity → listeners → admin and SDS →
//! wait for a signal → drain.

use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use rustls_pki_types::ServerName;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::authz::SpiffeIdMatcher;
use crate::config::{split_host_port, Config, IdentityConfig, ListenerConfig};
use crate::identity::{IdentitySource, IdentityState};
use crate::proxy::{InboundListener, OutboundListener, Timeouts};
use crate::tls;

/// `svidcar run`.
pub fn run(path: &Path) -> anyhow::Result<()> {
    let (config, identity) = Config::load(path)?;
    init_logging(config.log.level.as_deref());
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all().thread_name("svidcar-worker");
    if let Some(n) = config.worker_threads {
        rt.worker_threads(n);
    }
    let rt = rt.build().context("cannot start the runtime")?;
    rt.block_on(serve(config, identity))
}

/// An identity error, led by the config key that named the file it is about.
pub fn identity_error(e: crate::identity::IdentityError, config: &IdentityConfig) -> anyhow::Error {
    if let crate::identity::IdentityError::File { path, .. } = &e {
        if let Some(key) = config.key_of(path) {
            return anyhow!("{key}: {e}");
        }
    }
    anyhow!("identity: {e}")
}

pub fn init_logging(level: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    // `level` was checked by the config already; RUST_LOG, when set, wins.
    let wanted = level
        .and_then(|l| crate::config::log_filter(l).ok())
        .unwrap_or_else(|| "info".into());
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&wanted))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
}

async fn serve(config: Config, identity: IdentityConfig) -> anyhow::Result<()> {
    let state = Arc::new(IdentityState::new());
    let (source, update) = IdentitySource::start(&identity)
        .await
        .map_err(|e| identity_error(e, &identity))?;
    state.publish(update);
    let own_td = state
        .load()
        .default_svid()
        .map(|s| s.spiffe_id.trust_domain().clone())
        .ok_or_else(|| anyhow!("identity: no SVID loaded"))?;

    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let mut tasks = Vec::new();
    // Listener and SDS server tasks end only at shutdown; one that ends earlier (a
    // panic, a server error) stops the process with the reason logged, so the
    // orchestrator restarts it instead of keeping a half-dead sidecar.
    let mut listeners = tokio::task::JoinSet::new();
    tasks.push(tokio::spawn(source.run(state.clone(), shutdown.clone())));
    tasks.push(tokio::spawn(log_identity_changes(state.clone())));

    if let Some(sds) = &config.sds {
        // SDS servers end only at shutdown, like listeners: supervised the same way.
        for server in crate::sds::start(sds, state.clone(), shutdown.clone()).await? {
            listeners.spawn(async move {
                let _ = server.await;
                "the SDS server".to_string()
            });
        }
    }

    for (i, l) in config.inbound.iter().enumerate() {
        let at = format!("inbound[{i}]");
        let matcher = matcher(l, &l.allow, &own_td, &at, "allow")?;
        let verifier = Arc::new(tls::SpiffeVerifier::new(state.clone(), matcher));
        let server = tls::server_config(state.clone(), verifier, config.min_tls(l), &l.alpn)?;
        let inbound = InboundListener {
            name: l.name.as_str().into(),
            forward: l.forward.clone().unwrap_or_default(),
            acceptor: server.into(),
            timeouts: timeouts(l),
            max_connections: l.max_connections,
            state: state.clone(),
        };
        let socket = bind(l, &at).await?;
        tracing::info!(listener = %l.name, listen = %l.listen, forward = %inbound.forward, "inbound listening");
        let name = format!("listener {}", l.name);
        let run = inbound.run(socket, shutdown.clone(), tracker.clone());
        listeners.spawn(async move {
            run.await;
            name
        });
    }
    for (i, l) in config.outbound.iter().enumerate() {
        let at = format!("outbound[{i}]");
        let matcher = matcher(l, &l.expect, &own_td, &at, "expect")?;
        let verifier = Arc::new(tls::SpiffeVerifier::new(state.clone(), matcher));
        let client = tls::client_config(state.clone(), verifier, config.min_tls(l), &l.alpn)?;
        let connect = l.connect.clone().unwrap_or_default();
        let host = match &l.sni {
            Some(s) => s.clone(),
            None => {
                split_host_port(&connect)
                    .map_err(|p| anyhow!("{at}.connect: {p}"))?
                    .0
            }
        };
        let server_name = ServerName::try_from(host.clone())
            .map_err(|_| anyhow!("{at}.sni: {host:?} is not a valid server name"))?;
        let outbound = OutboundListener {
            name: l.name.as_str().into(),
            connect,
            server_name,
            connector: client.into(),
            timeouts: timeouts(l),
            max_connections: l.max_connections,
            state: state.clone(),
        };
        let socket = bind(l, &at).await?;
        tracing::info!(listener = %l.name, listen = %l.listen, connect = %outbound.connect, "outbound listening");
        let name = format!("listener {}", l.name);
        let run = outbound.run(socket, shutdown.clone(), tracker.clone());
        listeners.spawn(async move {
            run.await;
            name
        });
    }

    // Admin last: /ready must not say 200 before every listener is bound.
    if let Some(admin) = &config.admin {
        let l = crate::admin::bind(admin.listen).await?;
        tracing::info!(addr = %admin.listen, "admin listening");
        tasks.push(tokio::spawn(crate::admin::serve(
            l,
            state.clone(),
            shutdown.clone(),
        )));
    }

    let id = state
        .load()
        .default_svid()
        .map(|s| s.spiffe_id.to_string())
        .unwrap_or_default();
    tracing::info!(spiffe_id = %id, "svidcar ready");

    let failed = tokio::select! {
        _ = crate::signals::wait_for_signal() => None,
        Some(ended) = listeners.join_next() => Some(match ended {
            Ok(name) => format!("{name} stopped"),
            Err(e) => format!("a listener or server failed: {e}"),
        }),
    };
    if let Some(why) = failed {
        tracing::error!("{why}; exiting");
        shutdown.cancel();
        return Err(anyhow!("{why}"));
    }
    tracing::info!(drain = ?config.drain_timeout, "shutting down: no new connections, draining");
    shutdown.cancel();
    tracker.close();
    if tokio::time::timeout(config.drain_timeout, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = tracker.len(),
            "drain timeout: closing remaining connections"
        );
    }
    for t in tasks {
        t.abort();
    }
    Ok(())
}

/// One info line per new snapshot: which SVID is now presented.
async fn log_identity_changes(state: Arc<IdentityState>) {
    let mut rx = state.subscribe();
    while rx.changed().await.is_ok() {
        let snap = rx.borrow_and_update().clone();
        if let Some(svid) = snap.default_svid() {
            tracing::info!(
                version = snap.version,
                spiffe_id = %svid.spiffe_id,
                serial = %svid.serial,
                not_after = %humantime::format_rfc3339_seconds(svid.not_after),
                bundles = snap.bundles.len(),
                "identity updated"
            );
        }
    }
}

fn matcher(
    l: &ListenerConfig,
    list: &[crate::config::MatcherConfig],
    own_td: &crate::spiffe::TrustDomain,
    at: &str,
    key: &str,
) -> anyhow::Result<SpiffeIdMatcher> {
    let any = l.allow_any_in_trust_domain.then(|| own_td.clone());
    crate::config::build_matcher(list, any).map_err(|(i, p)| anyhow!("{at}.{key}[{i}]: {p}"))
}

fn timeouts(l: &ListenerConfig) -> Timeouts {
    Timeouts {
        connect: l.connect_timeout,
        handshake: l.handshake_timeout,
        idle: l.idle_timeout,
    }
}

async fn bind(l: &ListenerConfig, at: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(l.listen)
        .await
        .map_err(|e| anyhow!("{at}.listen: cannot bind {}: {e}", l.listen))
}
