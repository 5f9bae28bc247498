//! One pass of the pipeline: fetch → load → render → plan → apply → record.
//!
//! `plan` runs the same [`prepare`] and stops before applying, so what it
//! prints is exactly what `sync` would do. Every failure carries its exit
//! code ([`crate::exit::Failure`]); every stop before the commit point
//! leaves the host as it was.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::config::Settings;
use crate::desired::load::{self, LoadOptions};
use crate::desired::render::Renderer;
use crate::desired::snapshot::Snapshot;
use crate::effects::apply::{self, Applied, ApplyOptions};
use crate::effects::fetch::{self, Location, SourceSpec, SshOptions};
use crate::effects::rootfs::RootFs;
use crate::effects::state::history::{Entry, Outcome};
use crate::effects::state::{write_json_atomic, LockGuard, StateDir};
use crate::effects::{facts, ids, observe};
use crate::exit::{Classify, Error, Failure};
use crate::plan::diff::short;
use crate::plan::{self, Plan};

/// The repository as fetched for this pass.
pub struct Fetched {
    pub commit: String,
    pub summary: String,
    pub snapshot: Snapshot,
}

/// Everything `plan` shows and `sync` applies.
pub struct Prepared {
    pub fetched: Fetched,
    pub plan: Plan,
}

/// The latest run, as `last-run.json` and `status` show it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LastRun {
    pub time: i64,
    pub outcome: Outcome,
    #[serde(default)]
    pub commit: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct SyncOptions {
    /// How long to wait for another run's lock.
    pub wait: Duration,
    pub apply: ApplyOptions,
}

/// The result of a successful `sync`.
pub struct Report {
    pub commit: String,
    pub applied: Option<Applied>,
    pub plan: Plan,
    pub recovered: Vec<String>,
}

pub fn source_spec(settings: &Settings) -> Result<SourceSpec, Error> {
    let source = settings.source.as_deref().ok_or_else(|| {
        Error::new(
            Failure::Config,
            anyhow!(
                "no repository configured: set `source` in {} or pass --source",
                crate::config::MAIN_CONFIG
            ),
        )
    })?;
    Ok(SourceSpec {
        location: Location::parse(source).kind(Failure::Config)?,
        branch: settings.branch.clone(),
        ssh: SshOptions {
            key: settings.ssh_key.clone(),
            known_hosts: settings.ssh_known_hosts.clone(),
        },
    })
}

/// Opens the state directory and takes the lock.
pub fn lock(settings: &Settings, wait: Duration) -> Result<(StateDir, LockGuard), Error> {
    let state = StateDir::open(&settings.state_dir).kind(Failure::Failed)?;
    let guard = state.lock(wait).map_err(|e| {
        let kind = if e.is::<crate::effects::state::LockBusy>() {
            Failure::Busy
        } else {
            Failure::Failed
        };
        Error::new(kind, e)
    })?;
    Ok((state, guard))
}

/// Opens the managed root, creating a `--root` prefix if missing.
pub fn open_root(settings: &Settings) -> Result<RootFs, Error> {
    if !settings.root.exists() {
        std::fs::create_dir_all(&settings.root)
            .with_context(|| format!("cannot create root {}", settings.root.display()))
            .kind(Failure::Failed)?;
    }
    RootFs::open(&settings.root).kind(Failure::Failed)
}

/// Fetches the configured commit and enforces the fast-forward policy
/// against the last applied commit.
pub fn fetch(
    settings: &Settings,
    state: &StateDir,
    last_applied: Option<&str>,
) -> Result<Fetched, Error> {
    let spec = source_spec(settings)?;
    fetch::install_tls_provider();
    let got = fetch::fetch(&spec, &state.mirror()).kind(Failure::Failed)?;
    let commit = got.commit.to_string();
    if let Some(prev) = last_applied {
        if prev != commit && !settings.allow_non_fast_forward {
            let prev_id = gix::ObjectId::from_hex(prev.as_bytes())
                .with_context(|| format!("inventory names an invalid commit {prev:?}"))
                .kind(Failure::Failed)?;
            let ff = fetch::is_ancestor(&got.repo, prev_id, got.commit).kind(Failure::Failed)?;
            if !ff {
                return Err(Error::new(
                    Failure::Refused,
                    anyhow!(
                        "branch {} now points to {}, which does not descend from the applied commit {}: \
                         its history was rewritten (force-push?). Nothing applied. If this is intended, \
                         pass --allow-non-fast-forward or set allow_non_fast_forward = true",
                        settings.branch,
                        short(&commit),
                        short(prev)
                    ),
                ));
            }
        }
    }
    let snapshot =
        fetch::read_tree(&got.repo, got.commit, &settings.path).kind(Failure::InvalidRepo)?;
    Ok(Fetched {
        commit,
        summary: got.summary,
        snapshot,
    })
}

/// Picks the host name to look up: the configured name, or for an FQDN
/// whose file is missing, its first label.
fn host_name(settings: &Settings, snap: &Snapshot) -> String {
    let full = settings.host.clone();
    if !snap.contains(&format!("hosts/{full}.toml")) {
        if let Some((short, _)) = full.split_once('.') {
            if snap.contains(&format!("hosts/{short}.toml")) {
                return short.to_string();
            }
        }
    }
    full
}

/// Load, render, observe and plan for this host.
pub fn plan_for(
    settings: &Settings,
    state: &StateDir,
    fs: &RootFs,
    fetched: &Fetched,
) -> Result<Plan, Error> {
    let snap = &fetched.snapshot;
    let opts = LoadOptions {
        allowed_roots: settings.allowed_roots.clone(),
    };
    let host = host_name(settings, snap);
    let config = load::load_host(snap, &host, &opts).kind(Failure::InvalidRepo)?;
    let renderer = Renderer::new(snap, &[&config]).kind(Failure::InvalidRepo)?;
    let facts = facts::gather(fs.path());
    let desired = renderer
        .render(snap, &config, &facts)
        .kind(Failure::InvalidRepo)?;
    let ids = ids::resolve(fs.path(), &desired).kind(Failure::Failed)?;
    let inventory = state.inventory().kind(Failure::Failed)?;
    let observed = observe::observe(fs, &desired, &inventory).kind(Failure::InvalidRepo)?;
    plan::plan(&desired, Some(&fetched.commit), &observed, &inventory, &ids)
        .kind(Failure::InvalidRepo)
}

/// Prepares a plan under an already-held lock.
pub fn prepare(settings: &Settings, state: &StateDir, fs: &RootFs) -> Result<Prepared, Error> {
    let inventory = state.inventory().kind(Failure::Failed)?;
    let fetched = fetch(settings, state, inventory.commit.as_deref())?;
    let plan = plan_for(settings, state, fs, &fetched)?;
    Ok(Prepared { fetched, plan })
}

/// One full sync. Records the outcome in history and `last-run.json`.
pub fn sync_once(settings: &Settings, opts: &SyncOptions, now: i64) -> Result<Report, Error> {
    let (state, _guard) = lock(settings, opts.wait)?;
    let fs = open_root(settings)?;
    let recovered = apply::recover(&fs, &state).kind(Failure::Failed)?;
    for txid in &recovered {
        warn!(txid = %txid, "rolled back a transaction interrupted by a crash; the host is back at its last committed state");
        record(
            &state,
            now,
            Outcome::Recovered,
            None,
            Some(txid.clone()),
            None,
            None,
        );
    }
    let result = prepare(settings, &state, &fs).and_then(|prepared| {
        let commit = prepared.fetched.commit.clone();
        let plan = prepared.plan;
        if plan.is_empty() {
            info!(commit = %short(&commit), files = plan.unchanged, "host already matches the repository: nothing to do");
            return Ok(Report { commit, applied: None, plan, recovered: recovered.clone() });
        }
        for c in &plan.changes {
            info!(path = %c.path, change = ?c.kind, "planned");
        }
        let applied = apply::apply(&fs, &state, &plan, ownership_applied(), now, &opts.apply)
            .kind(Failure::Failed)?;
        info!(
            commit = %short(&commit),
            summary = %prepared.fetched.summary,
            txid = %applied.txid,
            created = applied.created,
            changed = applied.changed,
            removed = applied.removed,
            "applied"
        );
        if !plan.unit_actions.is_empty() {
            let list: Vec<String> = plan.unit_actions.iter().map(|a| format!("{} {}", a.action, a.unit)).collect();
            warn!(actions = %list.join(", "), "unit actions are planned but this build does not execute them yet (systemd integration pending)");
        }
        if !plan.checks.is_empty() {
            warn!(checks = plan.checks.len(), "health checks are declared but this build does not run them yet");
        }
        Ok(Report { commit, applied: Some(applied), plan, recovered: recovered.clone() })
    });
    match &result {
        Ok(r) => match &r.applied {
            Some(a) => record(
                &state,
                now,
                Outcome::Applied,
                Some(r.commit.clone()),
                Some(a.txid.clone()),
                Some(a),
                None,
            ),
            None => write_last_run(
                &state,
                now,
                Outcome::Unchanged,
                Some(r.commit.clone()),
                None,
            ),
        },
        Err(e) => {
            let outcome = match e.kind {
                Failure::InvalidRepo | Failure::Refused => Outcome::Refused,
                _ => Outcome::Failed,
            };
            record(
                &state,
                now,
                outcome,
                None,
                None,
                None,
                Some(format!("{:#}", e.error)),
            );
        }
    }
    result
}

/// True when running as root: owners and groups are applied.
pub fn ownership_applied() -> bool {
    nix::unistd::geteuid().is_root()
}

#[allow(clippy::too_many_arguments)]
fn record(
    state: &StateDir,
    now: i64,
    outcome: Outcome,
    commit: Option<String>,
    txid: Option<String>,
    applied: Option<&Applied>,
    message: Option<String>,
) {
    let entry = Entry {
        time: now,
        outcome: outcome.clone(),
        commit: commit.clone(),
        txid,
        created: applied.map_or(0, |a| a.created),
        changed: applied.map_or(0, |a| a.changed),
        removed: applied.map_or(0, |a| a.removed),
        message: message.clone(),
    };
    if let Err(e) = state.append_history(&entry) {
        warn!("cannot record history: {e:#}");
    }
    write_last_run(state, now, outcome, commit, message);
}

fn write_last_run(
    state: &StateDir,
    now: i64,
    outcome: Outcome,
    commit: Option<String>,
    message: Option<String>,
) {
    let last = LastRun {
        time: now,
        outcome,
        commit,
        message,
    };
    if let Err(e) = write_json_atomic(&state.last_run_path(), &last) {
        warn!("cannot record the last run: {e:#}");
    }
}

/// Reads a repository for `validate`: a directory as it is on disk, or the
/// configured source.
pub fn snapshot_of_dir(dir: &Path, sub_path: &str) -> anyhow::Result<Snapshot> {
    let root = if sub_path.is_empty() {
        dir.to_path_buf()
    } else {
        dir.join(sub_path)
    };
    Snapshot::from_dir(&root)
}
