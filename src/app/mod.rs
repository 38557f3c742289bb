//! `svidcar run`: start-up, live reload and shutdown. Config → identity → every
//! listener bound → SDS → admin (so `/ready` cannot say 200 before the listeners are
//! bound) → serve, reloading on SIGHUP, a change of the file or `POST /reload`, until a
//! signal or a failed task → drain.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use anyhow::{anyhow, Context};
use tokio_util::task::TaskTracker;

use crate::config::{Config, IdentityConfig};
use crate::identity::{IdentitySource, IdentityState};
use crate::proxy::Drain;
use crate::signals::{Request, Signals};
use crate::watch::FileWatch;

mod listeners;
mod reload;

pub use listeners::BoundListener;
use reload::{Reloader, Supervised};

/// `svidcar run`.
pub fn run(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    init_logging(config.log_filter.as_deref());
    // One worker thread: one event loop on the main thread, as Envoy runs with
    // `--concurrency 1`. The multi-thread scheduler with a single worker would still keep
    // its work-stealing bookkeeping (queue statistics, a clock read and a `pow` per batch
    // of tasks) for no use: 3% of the keep-alive pair's CPU per request (README).
    let mut rt = match config.worker_threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut rt = tokio::runtime::Builder::new_multi_thread();
            rt.worker_threads(n);
            rt
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    rt.enable_all().thread_name("svidcar-worker");
    let rt = rt.build().context("cannot start the runtime")?;
    rt.block_on(serve(path.to_path_buf(), config))
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

type LogFilterHandle =
    tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>;

/// Set when `log.level` rules the filter (RUST_LOG unset): a reload can change it.
static LOG_FILTER: OnceLock<LogFilterHandle> = OnceLock::new();

/// Logs to stderr through `filter` (a checked `log.level`); RUST_LOG, when set, wins.
pub fn init_logging(filter: Option<&str>) {
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::EnvFilter;
    let from_env = EnvFilter::try_from_default_env().ok();
    let by_config = from_env.is_none();
    let filter = from_env
        .or_else(|| EnvFilter::try_new(filter.unwrap_or("info")).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(false);
    if tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init()
        .is_ok()
        && by_config
    {
        let _ = LOG_FILTER.set(handle);
    }
}

/// Applies a reloaded `log.level` (nothing when RUST_LOG rules).
fn set_log_filter(filter: Option<&str>) {
    let Some(handle) = LOG_FILTER.get() else {
        return;
    };
    let Ok(next) = tracing_subscriber::EnvFilter::try_new(filter.unwrap_or("info")) else {
        return;
    };
    if let Err(e) = handle.reload(next) {
        tracing::warn!(error = %e, "cannot change the log level");
    }
}

/// What woke the serve loop.
enum Event {
    Signal(Request),
    FileChanged,
    ReloadRequested(crate::admin::ReloadRequest),
    Ended(Option<String>),
}

async fn serve(path: PathBuf, config: Config) -> anyhow::Result<()> {
    // Installed first: a SIGHUP or SIGTERM during start-up must not kill the process.
    let mut signals = Signals::new();
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
    let mut supervised = Supervised::new();
    tasks.push(tokio::spawn(source.run(state.clone(), shutdown.clone())));
    tasks.push(tokio::spawn(on_identity_changes(state.clone())));
    tasks.push(tokio::spawn(crate::eviction::check_on_identity_updates(
        state.clone(),
        shutdown.clone(),
    )));
    tasks.push(tokio::spawn(crate::eviction::expiry_sweeper(
        shutdown.clone(),
    )));

    if let Some(sds) = &config.sds {
        for server in crate::sds::start(sds, state.clone(), shutdown.clone()).await? {
            supervised.spawn(async move {
                Some(
                    server
                        .await
                        .unwrap_or_else(|e| format!("an SDS server failed: {e}")),
                )
            });
        }
    }

    let mut reloader = Reloader::new(
        path.clone(),
        config.clone(),
        state.clone(),
        own_td,
        drain.clone(),
        tracker.clone(),
    );
    reloader.start(&mut supervised).await?;
    reload::apply_globals(&config);

    // Admin last: /ready must not say 200 before every listener is bound.
    let (reload_tx, mut reload_rx) = tokio::sync::mpsc::unbounded_channel();
    let quit = tokio_util::sync::CancellationToken::new();
    if let Some(addr) = config.admin {
        let l = crate::admin::bind(addr).await?;
        tracing::info!(%addr, "admin listening");
        let options = Arc::new(crate::admin::AdminOptions {
            app_probes: config.app_probes.clone(),
            reload: Some(reload_tx),
            quit: quit.clone(),
            ready_min_svid_validity: config.ready_min_svid_validity,
            ..Default::default()
        });
        let admin = crate::admin::serve(l, state.clone(), options, shutdown.clone());
        supervised.spawn(async move {
            Some(match admin.await {
                Ok(()) => "the admin server stopped".to_string(),
                Err(e) => format!("the admin server failed: cannot accept: {e}"),
            })
        });
    }
    let mut config_file = match FileWatch::new(std::slice::from_ref(&path)) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, "the config file is not watched: reload with SIGHUP or POST /reload");
            None
        }
    };

    let id = state
        .load()
        .default_svid()
        .map(|s| s.spiffe_id.to_string())
        .unwrap_or_default();
    tracing::info!(spiffe_id = %id, "svidcar ready");

    let failed = loop {
        let event = tokio::select! {
            s = signals.next() => Event::Signal(s),
            _ = quit.cancelled() => Event::Signal(Request::Stop),
            Some(()) = file_changed(&mut config_file) => Event::FileChanged,
            Some(reply) = reload_rx.recv() => Event::ReloadRequested(reply),
            Some(ended) = supervised.join_next() => Event::Ended(match ended {
                Ok(why) => why,
                Err(e) => Some(format!("a listener or server failed: {e}")),
            }),
        };
        match event {
            Event::Signal(Request::Stop) => break None,
            Event::Signal(Request::Reload) => {
                let _ = reloader.reload("SIGHUP", &mut supervised).await;
            }
            Event::FileChanged => {
                let _ = reloader.reload("file change", &mut supervised).await;
            }
            Event::ReloadRequested(reply) => {
                let outcome = reloader.reload("POST /reload", &mut supervised).await;
                let _ = reply.send(outcome);
            }
            Event::Ended(None) => {}
            Event::Ended(Some(why)) => break Some(why),
        }
    };
    if let Some(why) = failed {
        tracing::error!("{why}; exiting");
        drain.draining.cancel();
        drain.closing.cancel();
        return Err(anyhow!("{why}"));
    }
    let drain_timeout = reloader.config().drain_timeout;
    tracing::info!(drain = ?drain_timeout, "shutting down: no new connections, draining");
    drain.draining.cancel();
    tracker.close();
    if tokio::time::timeout(drain_timeout, tracker.wait())
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

/// The next settled change of the config file; never, when it is not watched.
async fn file_changed(watch: &mut Option<FileWatch>) -> Option<()> {
    match watch {
        Some(w) => w.changed().await,
        None => std::future::pending().await,
    }
}

/// Per new snapshot: no TLS session from before is resumed (it was made with our old
/// SVID or checked against old bundles), and one info line says which SVID is now
/// presented.
async fn on_identity_changes(state: Arc<IdentityState>) {
    let mut rx = state.subscribe();
    while rx.changed().await.is_ok() {
        crate::tls::resumption::invalidate();
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
