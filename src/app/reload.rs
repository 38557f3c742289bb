//! Live reload. The config file is read again on SIGHUP, when the file changes, and on
//! `POST /reload`; it is checked completely before anything changes, and a file that
//! does not check (or changes what cannot change live: the identity source, SDS, the
//! admin address, the redirect rules) is refused with the message `svidcar check`
//! gives, while the running config stays.
//!
//! Each listener runs in a slot, one generation at a time. A changed listener is built
//! beside the running one; at the commit its predecessor stops accepting and hands its
//! sockets over (connections waiting in the kernel's queue are not lost). The
//! predecessor's HTTP connections finish the requests in flight and close, so the next
//! requests meet the new rules; its TCP connections are left alone and are checked
//! again, with every other live connection, by [`crate::eviction`]. A removed listener
//! stops accepting and its connections get `drain_timeout`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::task::TaskTracker;

use super::listeners::{bind_sockets, BoundListener, PolicyBook};
use crate::config::{Config, ListenerSpec};
use crate::identity::IdentityState;
use crate::proxy::Drain;
use crate::spiffe::TrustDomain;

/// Tasks whose end is reported: `Some(reason)` stops the process (a listener or server
/// that died); `None` is an orderly end (a removed listener).
pub type Supervised = JoinSet<Option<String>>;

enum SlotCommand {
    /// Hand the sockets to this listener and let it accept from now on.
    Replace(Box<BoundListener>),
    /// Stop accepting; connections get this long before they are closed.
    Remove(Duration),
}

/// A running listener as the reloader knows it.
struct Slot {
    spec: ListenerSpec,
    book: PolicyBook,
    /// The connection limit, shared by every generation of the listener.
    limit: Arc<tokio::sync::Semaphore>,
    commands: mpsc::UnboundedSender<SlotCommand>,
}

/// The running listeners and what building new ones needs.
pub struct Reloader {
    path: PathBuf,
    config: Config,
    slots: BTreeMap<Arc<str>, Slot>,
    state: Arc<IdentityState>,
    own_td: TrustDomain,
    own_ports: Vec<u16>,
    drain: Drain,
    tracker: TaskTracker,
}

impl Reloader {
    pub fn new(
        path: PathBuf,
        config: Config,
        state: Arc<IdentityState>,
        own_td: TrustDomain,
        drain: Drain,
        tracker: TaskTracker,
    ) -> Self {
        let own_ports = config
            .redirect
            .as_ref()
            .map(|r| r.own_ports.clone())
            .unwrap_or_default();
        Self {
            path,
            config,
            slots: BTreeMap::new(),
            state,
            own_td,
            own_ports,
            drain,
            tracker,
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Builds and binds every listener of the config read at start-up.
    pub async fn start(&mut self, supervised: &mut Supervised) -> anyhow::Result<()> {
        for spec in self.config.listeners.clone() {
            let bound =
                BoundListener::bind(&spec, self.state.clone(), &self.own_td, &self.own_ports)
                    .await?;
            self.run_slot(spec, bound, supervised);
        }
        Ok(())
    }

    fn run_slot(&mut self, spec: ListenerSpec, bound: BoundListener, supervised: &mut Supervised) {
        let (tx, rx) = mpsc::unbounded_channel();
        let book = bound.policies().clone();
        let limit = bound.limit();
        supervised.spawn(slot(
            spec.name.clone(),
            bound,
            rx,
            self.drain.clone(),
            self.tracker.clone(),
        ));
        self.slots.insert(
            spec.name.clone(),
            Slot {
                spec,
                book,
                limit,
                commands: tx,
            },
        );
    }

    /// Reads the file again and applies it; the text says what changed, or why nothing
    /// did. Logged and counted here.
    pub async fn reload(
        &mut self,
        trigger: &str,
        supervised: &mut Supervised,
    ) -> Result<String, String> {
        let count = |result: &str| {
            crate::metrics::get()
                .config_reloads
                .with_label_values(&[result])
                .inc()
        };
        let next = match Config::load(&self.path) {
            Ok(c) => c,
            Err(e) => {
                count("invalid");
                tracing::error!(
                    trigger,
                    "config reload refused: {e}; the running config stays"
                );
                return Err(e.to_string());
            }
        };
        if next.raw == self.config.raw {
            count("unchanged");
            tracing::info!(trigger, "config reload: no change");
            return Ok("no change".into());
        }
        if let Some(key) = needs_restart(&self.config, &next) {
            count("restart_required");
            let e = format!("{key}: cannot change while svidcar runs; restart it to apply this change (the running config stays)");
            tracing::error!(trigger, "config reload refused: {e}");
            return Err(e);
        }
        let plan = match self.plan(&next).await {
            Ok(p) => p,
            Err(e) => {
                count("failed");
                tracing::error!(
                    trigger,
                    "config reload failed: {e:#}; the running config stays"
                );
                return Err(format!("{e:#}"));
            }
        };
        let summary = self.commit(plan, &next, supervised);
        // Sessions were resumed under the old rules: none is resumed from now on.
        crate::tls::resumption::invalidate();
        self.config = next;
        apply_globals(&self.config);
        let checked = crate::eviction::check_all_now("a config reload").await;
        count("ok");
        let text = format!(
            "{summary}; {} live connection(s) checked, {} closed",
            checked.live, checked.revoked
        );
        tracing::info!(trigger, "config reloaded: {text}");
        Ok(text)
    }

    /// Builds every new or changed listener and binds new addresses. Nothing running
    /// is touched: an error leaves the old config whole.
    async fn plan(&self, next: &Config) -> anyhow::Result<Vec<Step>> {
        let mut plan = Vec::new();
        for spec in &next.listeners {
            let running = self.slots.get(&spec.name);
            let previous = running.map(|s| &s.book).cloned().unwrap_or_default();
            if running.is_some_and(|slot| same_spec(&slot.spec, spec)) {
                continue;
            }
            let b = BoundListener::build(
                spec,
                self.state.clone(),
                &self.own_td,
                &self.own_ports,
                &previous,
            )?;
            if running.is_some_and(|slot| slot.spec.listen == spec.listen) {
                plan.push(Step::Replace(spec.clone(), Box::new(b)));
            } else {
                let sockets = bind_sockets(spec).await?;
                plan.push(Step::Add(spec.clone(), Box::new(b.with_sockets(sockets))));
            }
        }
        Ok(plan)
    }

    fn commit(&mut self, plan: Vec<Step>, next: &Config, supervised: &mut Supervised) -> String {
        let (mut changed, mut added, mut removed) = (Vec::new(), Vec::new(), Vec::new());
        for step in plan {
            match step {
                Step::Replace(spec, mut b) => {
                    let Some(slot) = self.slots.get_mut(&spec.name) else {
                        continue;
                    };
                    b.commit(&slot.book);
                    b.share_limit(&slot.limit, slot.spec.max_connections);
                    slot.book = b.policies().clone();
                    slot.spec = spec.clone();
                    let _ = slot.commands.send(SlotCommand::Replace(b));
                    changed.push(spec.name.to_string());
                }
                Step::Add(spec, mut b) => {
                    match self.slots.remove(&spec.name) {
                        // Same name, new address: the old one drains.
                        Some(old) => {
                            b.commit(&old.book);
                            let _ = old.commands.send(SlotCommand::Remove(next.drain_timeout));
                            changed.push(spec.name.to_string());
                        }
                        None => {
                            b.commit(&PolicyBook::default());
                            added.push(spec.name.to_string());
                        }
                    }
                    self.run_slot(spec, *b, supervised);
                }
            }
        }
        let gone: Vec<Arc<str>> = self
            .slots
            .keys()
            .filter(|n| !next.listeners.iter().any(|l| &l.name == *n))
            .cloned()
            .collect();
        for name in gone {
            if let Some(slot) = self.slots.remove(&name) {
                let _ = slot.commands.send(SlotCommand::Remove(next.drain_timeout));
                removed.push(name.to_string());
            }
        }
        let list = |v: &[String]| {
            if v.is_empty() {
                "none".to_string()
            } else {
                v.join(", ")
            }
        };
        format!(
            "listeners changed: {}; added: {}; removed: {}",
            list(&changed),
            list(&added),
            list(&removed)
        )
    }
}

enum Step {
    Replace(ListenerSpec, Box<BoundListener>),
    Add(ListenerSpec, Box<BoundListener>),
}

/// The specs are plain data, checked and typed; their `Debug` text shows every field,
/// so two specs that print the same build the same listener.
fn same_spec(a: &ListenerSpec, b: &ListenerSpec) -> bool {
    format!("{a:?}") == format!("{b:?}")
}

/// The first key that differs and cannot change live.
fn needs_restart(running: &Config, next: &Config) -> Option<&'static str> {
    let (a, b) = (&running.raw, &next.raw);
    if a.identity != b.identity {
        Some("identity")
    } else if a.sds != b.sds {
        Some("sds")
    } else if a.admin != b.admin {
        Some("admin")
    } else if a.worker_threads != b.worker_threads {
        Some("worker_threads")
    } else if running.redirect != next.redirect {
        // `svidcar redirect` installed iptables rules for these ports at pod start.
        Some("transparent (the ports the redirect rules send traffic to)")
    } else {
        None
    }
}

/// Settings that are not part of any listener.
pub fn apply_globals(config: &Config) {
    crate::eviction::registry().set_close_expired_peers(config.close_expired_peers);
    super::set_log_filter(config.log_filter.as_deref());
}

/// Runs the generations of one listener until it is removed or the process drains.
async fn slot(
    name: Arc<str>,
    mut current: BoundListener,
    mut commands: mpsc::UnboundedReceiver<SlotCommand>,
    process: Drain,
    tracker: TaskTracker,
) -> Option<String> {
    let failed = |e: std::io::Error| Some(format!("listener {name} failed: cannot accept: {e}"));
    loop {
        let generation = Drain {
            draining: process.draining.child_token(),
            closing: process.closing.child_token(),
        };
        let run = current.run(generation.clone(), tracker.clone());
        tokio::pin!(run);
        let command = tokio::select! {
            ended = &mut run => return ended.err().and_then(failed),
            c = commands.recv() => c,
        };
        let Some(command) = command else {
            // The reloader is gone: the process is stopping.
            return run.await.err().and_then(failed);
        };
        generation.draining.cancel();
        let sockets = match run.await {
            Ok(s) => s,
            Err(e) => return failed(e),
        };
        match command {
            SlotCommand::Replace(next) => current = next.with_sockets(sockets),
            SlotCommand::Remove(drain_timeout) => {
                drop(sockets);
                tracing::info!(listener = %name, drain = ?drain_timeout, "listener removed: no new connections; open ones get the drain time");
                tokio::spawn(async move {
                    tokio::select! {
                        _ = tokio::time::sleep(drain_timeout) => generation.closing.cancel(),
                        _ = generation.closing.cancelled() => {}
                    }
                });
                return None;
            }
        }
    }
}
