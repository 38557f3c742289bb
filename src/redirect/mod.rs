//! `svidcar redirect`: installs, in the current network namespace, the nat rules
//! that send the pod's TCP traffic to svidcar's transparent listeners, or removes
//! them (`--cleanup`), or prints what it would apply (`--dry-run`). This file owns
//! the command's flow: IPv4 then IPv6, all or nothing. `rules` writes the rules
//! (pure text); `backend` chooses iptables-legacy or iptables-nft and runs it.

pub mod backend;
pub mod rules;

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{anyhow, Context};
use tracing::{info, warn};

use crate::config::{Config, ListenerKind};
pub use backend::Backend;
use backend::{BackendError, Binaries, Tool};
use rules::{Family, Rules};

/// What the command line asked for.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// `--backend`; `None`: detect.
    pub backend: Option<Backend>,
    pub dry_run: bool,
    pub cleanup: bool,
}

/// Runs `svidcar redirect`. `config` is needed to apply; `--cleanup` removes every
/// SVIDCAR chain whatever the config says, so it does not read it.
pub fn run(config: Option<&Path>, opts: Options) -> anyhow::Result<()> {
    if opts.cleanup {
        return cleanup(opts);
    }
    let path = config.ok_or_else(|| anyhow!("--config is required (unless --cleanup)"))?;
    let config = Config::load(path)?;
    let plan = plan(&config).ok_or_else(|| {
        anyhow!(
            "{}: no `transparent` section: nothing to redirect",
            path.display()
        )
    })?;
    let bins = choose(opts.backend)?;
    // Read both families before writing either: a save that fails (not root, say)
    // fails before anything changed.
    let mut nat = Vec::new();
    for r in &plan {
        nat.push(read_nat(&bins, r.family)?);
    }
    if opts.dry_run {
        for (r, nat) in plan.iter().zip(&nat) {
            print!(
                "# svidcar redirect --dry-run: {} rules for {} --noflush -w 10\n{}",
                r.family.label(),
                bins.backend.binary(r.family, Tool::Restore),
                r.restore_input(nat)
            );
        }
        info!("dry run: nothing was applied");
        return Ok(());
    }
    let [v4, v6] = &plan;
    apply(&bins, v4, &nat[0]).with_context(|| {
        format!(
            "IPv4 rules not applied ({} backend); nothing was changed",
            bins.backend
        )
    })?;
    if let Err(e) = apply(&bins, v6, &nat[1]) {
        // All or nothing: take the IPv4 rules out again (and any of an earlier run
        // in IPv6; the failed IPv6 transaction itself changed nothing).
        let after = match remove(&bins, Family::V4) {
            Ok(_) => "the IPv4 rules were removed again, so nothing is half-applied".to_string(),
            Err(c) => format!("removing the IPv4 rules again failed too: {c}"),
        };
        if let Err(c) = remove(&bins, Family::V6) {
            warn!("removing earlier IPv6 rules failed as well: {c}");
        }
        return Err(anyhow!(e).context(format!(
            "IPv6 rules not applied ({} backend); {after}",
            bins.backend
        )));
    }
    info!(
        backend = bins.backend.name(),
        "applied {} IPv4 and {} IPv6 rules",
        v4.rules.len() + v4.hooks.len(),
        v6.rules.len() + v6.hooks.len(),
    );
    Ok(())
}

/// The rules of both families for the config's `transparent` section; `None`
/// without one. Logs a family the inbound listener cannot take.
fn plan(config: &Config) -> Option<[Rules; 2]> {
    let spec = config.redirect.as_ref()?;
    let listen: Option<SocketAddr> = config
        .listeners
        .iter()
        .find(|l| matches!(l.kind, ListenerKind::TransparentInbound(_)))
        .map(|l| l.listen);
    let (in4, in6) = match (spec.inbound.is_some(), listen) {
        (true, Some(a)) => rules::inbound_families(a),
        (true, None) => (true, true),
        (false, _) => (false, false),
    };
    if let Some(a) = listen.filter(|_| spec.inbound.is_some()) {
        if !in6 {
            info!("transparent.inbound.listen {a} takes IPv4 only: no IPv6 inbound capture (IPv6 connections to the pod are not redirected)");
        }
        if !in4 {
            info!("transparent.inbound.listen {a} takes IPv6 only: no IPv4 inbound capture (IPv4 connections to the pod are not redirected)");
        }
    }
    Some([
        rules::rules(spec, Family::V4, in4),
        rules::rules(spec, Family::V6, in6),
    ])
}

/// The backend to use, with its binaries found; logs the one line saying which and why.
fn choose(forced: Option<Backend>) -> Result<Binaries, BackendError> {
    let (backend, why) = match forced {
        Some(b) => (b, "chosen with --backend".to_string()),
        None => backend::detect()?,
    };
    info!(
        backend = backend.name(),
        "iptables backend {backend}: {why}"
    );
    backend::binaries(backend, &[Tool::Save, Tool::Restore])
}

fn read_nat(bins: &Binaries, family: Family) -> Result<Vec<String>, BackendError> {
    Ok(rules::nat_section(&bins.save(family)?))
}

/// Applies one family's rules. A hook deleted by someone else between our save and
/// our restore makes the restore fail (and change nothing): read again, try once more.
fn apply(bins: &Binaries, r: &Rules, nat: &[String]) -> Result<(), BackendError> {
    match bins.restore(r.family, &r.restore_input(nat)) {
        Err(e) if !rules::hooks_in(nat).is_empty() => {
            warn!(
                "{} restore failed ({e}); the table may have changed since it was read: reading it again and retrying once",
                r.family.label()
            );
            let nat = read_nat(bins, r.family)?;
            bins.restore(r.family, &r.restore_input(&nat))
        }
        other => other,
    }
}

/// Removes svidcar's chains and hooks from one family; whether there were any.
fn remove(bins: &Binaries, family: Family) -> Result<bool, BackendError> {
    let nat = read_nat(bins, family)?;
    if !rules::has_svidcar(&nat) {
        return Ok(false);
    }
    bins.restore(family, &rules::cleanup_input(&nat))?;
    Ok(true)
}

/// `--cleanup`: on every backend (or the one forced) whose `-save` shows anything of
/// svidcar's, remove it. Reads before it writes, so a backend with nothing of
/// svidcar's is never written to (and legacy gets no tables it did not have).
fn cleanup(opts: Options) -> anyhow::Result<()> {
    let candidates = match opts.backend {
        Some(b) => vec![b],
        None => Backend::ALL.to_vec(),
    };
    let mut usable = Vec::new();
    let mut missing = None;
    for b in candidates {
        match backend::binaries(b, &[Tool::Save, Tool::Restore]) {
            Ok(bins) => usable.push(bins),
            Err(e @ BackendError::NotFound { .. }) => {
                info!(backend = b.name(), "skipping the {b} backend: {e}");
                missing = Some(e);
            }
            Err(e) => return Err(e.into()),
        }
    }
    if usable.is_empty() {
        return Err(match missing {
            Some(e) => anyhow!(e),
            None => anyhow!("no iptables backend to clean up"),
        });
    }
    let mut removed = Vec::new();
    for bins in &usable {
        for family in Family::ALL {
            let nat = read_nat(bins, family)?;
            if !rules::has_svidcar(&nat) {
                continue;
            }
            let input = rules::cleanup_input(&nat);
            if opts.dry_run {
                print!(
                    "# svidcar redirect --cleanup --dry-run: {} on the {} backend: {} --noflush -w 10\n{input}",
                    family.label(),
                    bins.backend,
                    bins.backend.binary(family, Tool::Restore)
                );
            } else {
                bins.restore(family, &input).with_context(|| {
                    format!(
                        "removing svidcar's {} rules from the {} backend",
                        family.label(),
                        bins.backend
                    )
                })?;
            }
            removed.push(format!("{} ({})", family.label(), bins.backend));
        }
    }
    let verb = if opts.dry_run {
        "would remove"
    } else {
        "removed"
    };
    if removed.is_empty() {
        info!("nothing to clean up: no SVIDCAR chains in this network namespace");
    } else {
        info!("{verb} svidcar's rules and chains: {}", removed.join(", "));
    }
    Ok(())
}
