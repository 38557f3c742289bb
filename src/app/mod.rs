//! `svidcar run`: start-up and shutdown. Config → identity → every listener bound →
//! SDS → admin (so `/ready` cannot say 200 before the listeners are bound) → wait for a
//! signal or a failed task → drain.

use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use tokio_util::task::TaskTracker;

use crate::config::{Config, IdentityConfig};
use crate::identity::{IdentitySource, IdentityState};
use crate::proxy::Drain;

mod listeners;

pub use listeners::BoundListener;

/// `svidcar run`.
pub fn run(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    init_logging(config.log_filter.as_deref());
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all().thread_name("svidcar-worker");
    if let Some(n) = config.worker_threads {
        rt.worker_threads(n);
    }
    let rt = rt.build().context("cannot start the runtime")?;
    rt.block_on(serve(config))
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

/// Logs to stderr through `filter` (a checked `log.level`); RUST_LOG, when set, wins.
pub fn init_logging(filter: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(filter.unwrap_or("info")))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let state = Arc::new(IdentityState::new());
    let (source, update) = IdentitySource::start(&config.identity)
        .await
        .map_err(|e| identity_error(e, &config.identity))?;
    state.publish(update);
    source.install_jwt(state.jwt());
    let own_td = state
        .load()
        .default_svid()
        .map(|s| s.spiffe_id.trust_domain().clone())
        .ok_or_else(|| anyhow!("identity: no SVID loaded"))?;

    let drain = Drain::default();
    let shutdown = drain.draining.clone();
    let tracker = TaskTracker::new();
    let mut tasks = Vec::new();
    // Listener and SDS server tasks end only at shutdown; one that ends earlier (a
    // panic, a server error) stops the process with the reason logged, so the
    // orchestrator restarts it instead of keeping a half-dead sidecar.
    let mut supervised = tokio::task::JoinSet::new();
    tasks.push(tokio::spawn(source.run(state.clone(), shutdown.clone())));
    tasks.push(tokio::spawn(log_identity_changes(state.clone())));

    if let Some(sds) = &config.sds {
        for server in crate::sds::start(sds, state.clone(), shutdown.clone()).await? {
            supervised.spawn(async move {
                server
                    .await
                    .unwrap_or_else(|e| format!("an SDS server failed: {e}"))
            });
        }
    }

    let own_ports: Vec<u16> = config
        .redirect
        .as_ref()
        .map(|r| r.own_ports.clone())
        .unwrap_or_default();
    for spec in &config.listeners {
        let bound = BoundListener::bind(spec, state.clone(), &own_td, &own_ports).await?;
        let name = spec.name.clone();
        let run = bound.run(drain.clone(), tracker.clone());
        supervised.spawn(async move {
            match run.await {
                Ok(()) => format!("listener {name} stopped"),
                Err(e) => format!("listener {name} failed: cannot accept: {e}"),
            }
        });
    }

    // Admin last: /ready must not say 200 before every listener is bound.
    if let Some(addr) = config.admin {
        let l = crate::admin::bind(addr).await?;
        tracing::info!(%addr, "admin listening");
        let options = Arc::new(crate::admin::AdminOptions {
            app_probes: config.app_probes.clone(),
            ..Default::default()
        });
        let admin = crate::admin::serve(l, state.clone(), options, shutdown.clone());
        supervised.spawn(async move {
            match admin.await {
                Ok(()) => "the admin server stopped".to_string(),
                Err(e) => format!("the admin server failed: cannot accept: {e}"),
            }
        });
    }

    let id = state
        .load()
        .default_svid()
        .map(|s| s.spiffe_id.to_string())
        .unwrap_or_default();
    tracing::info!(spiffe_id = %id, "svidcar ready");

    let failed = tokio::select! {
        _ = crate::signals::wait_for_signal() => None,
        Some(ended) = supervised.join_next() => Some(match ended {
            Ok(why) => why,
            Err(e) => format!("a listener or server failed: {e}"),
        }),
    };
    if let Some(why) = failed {
        tracing::error!("{why}; exiting");
        drain.draining.cancel();
        drain.closing.cancel();
        return Err(anyhow!("{why}"));
    }
    tracing::info!(drain = ?config.drain_timeout, "shutting down: no new connections, draining");
    drain.draining.cancel();
    tracker.close();
    if tokio::time::timeout(config.drain_timeout, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = tracker.len(),
            "drain timeout: closing remaining connections"
        );
        // Connections end themselves on this signal and record what they moved.
        drain.closing.cancel();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), tracker.wait()).await;
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
