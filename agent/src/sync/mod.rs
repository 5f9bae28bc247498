//! One pass of the pipeline: fetch → load → render → plan → apply → record.
//!
//! `plan` runs the same [`prepare`] and stops before applying, so what it
//! prints is exactly what `sync` would do. Every failure carries its exit
//! code ([`crate::exit::Failure`]); every stop before the commit point
//! leaves the host as it was.

pub mod bundle;
pub mod marks;
pub mod post;
pub mod quick;
pub mod repair;
pub mod stick;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use tokio::runtime::Handle;

use anyhow::{anyhow, Context};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::config::Settings;
use crate::desired::load::{self, LoadOptions};
use crate::desired::render::Renderer;
use crate::desired::snapshot::Snapshot;
use crate::desired::spec::TargetPath;
use crate::effects::apply::{self, Applied, ApplyOptions};
use crate::effects::fetch::{self, Location, SourceSpec, SshOptions};
use crate::effects::rootfs::RootFs;
use crate::effects::state::history::{Entry, Outcome};
use crate::effects::state::{floor, read_json, write_json_replace, LockGuard, StateDir};
use crate::effects::{facts, failpoint, ids, observe};
use crate::exit::{Classify, Error, Failure};
use crate::plan::diff::short;
use crate::plan::{self, Plan};
use crate::timings;
use marks::Marks;

/// The repository as fetched for this pass.
pub struct Fetched {
    pub commit: String,
    /// Committer time, seconds since the epoch.
    pub commit_time: i64,
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
    /// Apply a commit marked bad, and clear the halted flag.
    pub retry: bool,
    /// Skip the quick check: render and compare every file.
    pub full: bool,
}

/// The result of a successful `sync`.
pub struct Report {
    pub commit: String,
    pub applied: Option<Applied>,
    pub plan: Plan,
    pub recovered: Vec<String>,
    /// The fetched commit is marked bad and was not applied.
    pub skipped_bad: bool,
    /// What the post-apply stage did (when something was applied).
    pub post: Option<post::PostReport>,
    /// Nothing changed since the last sync, proven by the quick check
    /// without rendering.
    pub quick: bool,
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

/// Fetches the configured commit and reads its tree (see [`fetch_head`]).
pub fn fetch(settings: &Settings, state: &StateDir, applied: &[String]) -> Result<Fetched, Error> {
    let head = fetch_head(settings, state, applied)?;
    read_snapshot(settings, head)
}

/// The commit to apply, fetched and trusted, its tree not read yet.
pub struct Head {
    repo: gix::Repository,
    id: gix::ObjectId,
    pub commit: String,
    pub commit_time: i64,
    pub summary: String,
}

/// The tree of an earlier commit (the one the quick-check record vouches
/// for), without reading any file; `None` if it cannot be read.
fn read_base(settings: &Settings, head: &Head, commit: &str) -> Option<Snapshot> {
    let _t = timings::stage("read-base");
    let id = gix::ObjectId::from_hex(commit.as_bytes()).ok()?;
    fetch::read_tree(&head.repo, id, &settings.path).ok()
}

/// Reads the configured sub-tree of the fetched commit.
pub fn read_snapshot(settings: &Settings, head: Head) -> Result<Fetched, Error> {
    let _t = timings::stage("read-tree");
    let snapshot =
        fetch::read_tree(&head.repo, head.id, &settings.path).kind(Failure::InvalidRepo)?;
    Ok(Fetched {
        commit: head.commit,
        commit_time: head.commit_time,
        summary: head.summary,
        snapshot,
    })
}

/// Fetches the configured commit and enforces the trust policy: the new
/// tip must descend from every commit in `applied` (the inventory's commit
/// and the anti-rollback floor, see [`floor`]), and with `require_signed`
/// the new commits must carry valid signatures. A refusal changes nothing.
pub fn fetch_head(
    settings: &Settings,
    state: &StateDir,
    applied: &[String],
) -> Result<Head, Error> {
    let spec = source_spec(settings)?;
    fetch::install_tls_provider();
    let timing = timings::stage("fetch");
    let got = fetch::fetch(&spec, &state.mirror()).kind(Failure::Failed)?;
    drop(timing);
    let commit = got.commit.to_string();
    let mut base = None;
    for prev in applied {
        let prev_id = gix::ObjectId::from_hex(prev.as_bytes())
            .with_context(|| format!("the state names an invalid commit {prev:?}"))
            .kind(Failure::Failed)?;
        if prev == &commit || settings.allow_non_fast_forward {
            base = base.or(Some(prev_id));
            continue;
        }
        if !fetch::is_ancestor(&got.repo, prev_id, got.commit).kind(Failure::Failed)? {
            let older = fetch::is_ancestor(&got.repo, got.commit, prev_id).unwrap_or(false);
            let why = if older {
                "which is older than (an ancestor of) the applied commit: applying it would downgrade the host"
            } else {
                "which does not descend from the applied commit: its history was rewritten (force-push?) or the source changed"
            };
            return Err(Error::new(
                Failure::Refused,
                anyhow!(
                    "branch {} now points to {}, {why} {}. Nothing applied. If this is intended, \
                     run `driftless rollback --to {}` or pass --allow-non-fast-forward (allow_non_fast_forward = true)",
                    settings.branch,
                    short(&commit),
                    short(prev),
                    short(&commit)
                ),
            ));
        }
        base = Some(prev_id);
    }
    if settings.require_signed {
        let _t = timings::stage("signatures");
        verify_signatures(settings, &got.repo, base, got.commit)?;
    }
    Ok(Head {
        repo: got.repo,
        id: got.commit,
        commit,
        commit_time: got.commit_time,
        summary: got.summary,
    })
}

/// The signers file, as a refusal-class error when missing or invalid.
pub fn allowed_signers(settings: &Settings) -> Result<crate::trust::AllowedSigners, Error> {
    crate::trust::AllowedSigners::load(&settings.allowed_signers).map_err(|e| {
        Error::new(
            Failure::Config,
            e.context(format!(
                "cannot use the allowed signers file {} (`allowed_signers`)",
                settings.allowed_signers.display()
            )),
        )
    })
}

/// `require_signed`: the commits new since `base` (or only the tip, on a
/// first sync) must be signed by an allowed key.
fn verify_signatures(
    settings: &Settings,
    repo: &gix::Repository,
    base: Option<gix::ObjectId>,
    tip: gix::ObjectId,
) -> Result<(), Error> {
    let signers = allowed_signers(settings)?;
    let verified =
        crate::trust::verify_history(repo, base, tip, &signers, settings.signature_policy)
            .map_err(|e| {
                Error::new(
                    Failure::Refused,
                    e.context(format!(
                        "refusing {}: require_signed is on and a commit fails signature verification. Nothing applied",
                        short(&tip.to_string())
                    )),
                )
            })?;
    for (id, v) in &verified {
        tracing::debug!(commit = %short(&id.to_string()), principal = %v.principal, key = %v.fingerprint, "signature verified");
    }
    Ok(())
}

/// The commits a new tip must descend from: the inventory's and the
/// anti-rollback floor's (the same one, normally).
pub fn applied_commits(settings: &Settings, state: &StateDir) -> Result<Vec<String>, Error> {
    let inventory = state.inventory().kind(Failure::Failed)?;
    applied_commits_from(settings, inventory.commit)
}

/// [`applied_commits`] when the inventory's commit is already known.
fn applied_commits_from(
    settings: &Settings,
    inventory_commit: Option<String>,
) -> Result<Vec<String>, Error> {
    let mut out = Vec::new();
    if let Some(c) = inventory_commit {
        out.push(c);
    }
    if let Some(f) = floor::load(&settings.root).kind(Failure::Failed)? {
        if !out.contains(&f.commit) {
            out.push(f.commit);
        }
    }
    Ok(out)
}

/// Raises the anti-rollback floor to `fetched` after it was applied (or
/// found already in place).
fn raise_floor(settings: &Settings, fetched_commit: &str, commit_time: i64, now: i64) {
    let full_ref =
        fetch::full_ref_name(&settings.branch).unwrap_or_else(|_| settings.branch.clone());
    let current = floor::load(&settings.root).ok().flatten();
    if current
        .as_ref()
        .is_some_and(|f| f.commit == fetched_commit && f.branch == full_ref)
    {
        return;
    }
    let record = floor::Floor {
        commit: fetched_commit.to_string(),
        commit_time,
        branch: full_ref,
        recorded_at: now,
    };
    if let Err(e) = floor::save(&settings.root, &record) {
        warn!("cannot record the anti-rollback floor: {e:#}");
    }
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

/// The host's facts (one gathering per sync: the quick check's inputs and
/// the templates see the same values).
pub fn gather_facts(fs: &RootFs) -> serde_json::Value {
    let _t = timings::stage("facts");
    facts::gather(fs.path())
}

/// Load, render, observe and plan for this host.
pub fn plan_for(
    settings: &Settings,
    state: &StateDir,
    fs: &RootFs,
    fetched: &Fetched,
    facts: &serde_json::Value,
) -> Result<Plan, Error> {
    let config = load_config(settings, &fetched.snapshot)?;
    plan_files(settings, state, fs, fetched, facts, &config, None)
}

/// This host's configuration in the fetched commit.
fn load_config(settings: &Settings, snap: &Snapshot) -> Result<load::HostConfig, Error> {
    let opts = LoadOptions {
        allowed_roots: settings.allowed_roots.clone(),
    };
    let host = host_name(settings, snap);
    let _t = timings::stage("load");
    load::load_host(snap, &host, &opts).kind(Failure::InvalidRepo)
}

/// Renders, observes and plans the files of `config`: all of them, or
/// only those in `only`, with every other inventory entry carried over
/// unchanged (see `repair` for when that is sound).
fn plan_files(
    settings: &Settings,
    state: &StateDir,
    fs: &RootFs,
    fetched: &Fetched,
    facts: &serde_json::Value,
    config: &load::HostConfig,
    only: Option<&BTreeSet<TargetPath>>,
) -> Result<Plan, Error> {
    let snap = &fetched.snapshot;
    let keys_settings = settings.clone();
    let resolver = std::sync::Arc::new(crate::desired::secrets::SecretResolver::new(
        snap,
        Box::new(move || crate::effects::keys::load(&keys_settings)),
    ));
    let timing = timings::stage("parse");
    let renderer = match only {
        None => Renderer::new(snap, &[config], resolver),
        Some(only) => Renderer::for_files(snap, config, only, resolver),
    }
    .kind(Failure::InvalidRepo)?
    .with_limits(settings.limits);
    drop(timing);
    let timing = timings::stage("render");
    let desired = renderer
        .render_only(snap, config, facts, only)
        .kind(Failure::InvalidRepo)?;
    drop(timing);
    let timing = timings::stage("ids");
    let mut ids = ids::resolve(fs.path(), &desired).kind(Failure::Failed)?;
    let inventory = state.inventory().kind(Failure::Failed)?;
    let (inventory, carried) = match only {
        None => (inventory, Vec::new()),
        Some(only) => (inventory.restricted_to(only), inventory.without(only)),
    };
    if desired.files.iter().any(|f| f.sensitive) || inventory.files.values().any(|e| e.sensitive) {
        ids.hash_key = state.hash_key().kind(Failure::Failed)?;
    }
    drop(timing);
    let timing = timings::stage("observe");
    let observed = observe::observe(fs, &desired, &inventory).kind(Failure::InvalidRepo)?;
    drop(timing);
    let _t = timings::stage("plan");
    let mut plan = plan::plan(&desired, Some(&fetched.commit), &observed, &inventory, &ids)
        .kind(Failure::InvalidRepo)?;
    plan.unchanged += carried.len();
    plan.next_inventory.files.extend(carried);
    Ok(plan)
}

/// Prepares a plan under an already-held lock.
pub fn prepare(settings: &Settings, state: &StateDir, fs: &RootFs) -> Result<Prepared, Error> {
    let applied = applied_commits(settings, state)?;
    let fetched = fetch(settings, state, &applied)?;
    let facts = gather_facts(fs);
    let plan = plan_for(settings, state, fs, &fetched, &facts)?;
    Ok(Prepared { fetched, plan })
}

/// One full sync. Records the outcome in history and `last-run.json`.
///
/// The phases, each one function, in the order a crash can interrupt them
/// (see [`apply`] for what each leaves behind and how the next run repairs
/// it): [`begin`] (lock, recover what a crash left, halt check),
/// [`fetch_phase`], [`plan_phase`] (quick check, or load → render → plan),
/// [`apply_phase`] (stage, switch, unit actions and checks, commit or
/// revert; floor and quick-check record), [`record_outcome`].
pub fn sync_once(
    settings: &Settings,
    opts: &SyncOptions,
    now: i64,
    rt: &Handle,
) -> Result<Report, Error> {
    let mut pass = begin(settings, opts, now, rt)?;
    let result = (|| {
        let fetched = fetch_phase(&pass)?;
        match plan_phase(&pass, fetched)? {
            Planned::QuickHit { prepared } => {
                let commit = prepared.fetched.commit.clone();
                let commit_time = prepared.fetched.commit_time;
                let mut report = deploy(&mut pass, prepared)?;
                report.quick = true;
                raise_floor(settings, &commit, commit_time, now);
                Ok(report)
            }
            Planned::Full { prepared, inputs } => apply_phase(&mut pass, prepared, &inputs),
        }
    })();
    record_outcome(&pass, &result);
    result
}

/// One sync under the lock: what every phase needs.
struct Pass<'a> {
    settings: &'a Settings,
    opts: &'a SyncOptions,
    now: i64,
    rt: &'a Handle,
    state: StateDir,
    _guard: LockGuard,
    fs: RootFs,
    marks: Marks,
    /// A quick-check record still valid at the start of this run.
    stamps: Option<std::sync::Arc<crate::plan::quick::QuickRecord>>,
    /// Transactions rolled back at the start of this run.
    recovered: Vec<String>,
}

/// Takes the lock, rolls back what a crash left behind, and refuses to go
/// on while halted (unless `--retry`).
fn begin<'a>(
    settings: &'a Settings,
    opts: &'a SyncOptions,
    now: i64,
    rt: &'a Handle,
) -> Result<Pass<'a>, Error> {
    let timing = timings::stage("lock");
    let (state, guard) = lock(settings, opts.wait)?;
    let fs = open_root(settings)?;
    drop(timing);
    // A quick-check record whose inventory stamp still holds proves that no
    // transaction started since the last successful sync (a transaction
    // removes the record, durably, before it touches anything): there is
    // nothing to recover, and the applied commit is the record's.
    let stamps = quick::current(&state);
    let recovered = match &stamps {
        Some(_) => Vec::new(),
        None => {
            let _t = timings::stage("recover");
            apply::recover(&fs, &state).kind(Failure::Failed)?
        }
    };
    let mut marks = marks::load(&state).kind(Failure::Failed)?;
    after_recovery(settings, &state, rt, &recovered, &mut marks, now)?;
    if let Some(h) = &marks.halted {
        if !opts.retry {
            return Err(Error::new(
                Failure::Degraded,
                anyhow!(
                    "driftless is halted since {}: {}. Repair the host, then run `driftless sync --retry` (or `driftless rollback`)",
                    crate::time::time_str(h.time),
                    h.reason
                ),
            ));
        }
        marks.halted = None;
        marks::save(&state, &marks).kind(Failure::Failed)?;
    }
    Ok(Pass {
        settings,
        opts,
        now,
        rt,
        state,
        _guard: guard,
        fs,
        marks,
        stamps,
        recovered: recovered.into_iter().map(|r| r.txid).collect(),
    })
}

/// The fetched commit (trusted: fast-forward and signatures checked) and
/// this run's facts.
struct FetchedHead {
    head: Head,
    facts: serde_json::Value,
}

fn fetch_phase(pass: &Pass) -> Result<FetchedHead, Error> {
    let applied = match &pass.stamps {
        Some(r) => applied_commits_from(pass.settings, Some(r.commit.clone()))?,
        None => applied_commits(pass.settings, &pass.state)?,
    };
    let head = fetch_head(pass.settings, &pass.state, &applied)?;
    failpoint::hit("sync.fetched").kind(Failure::Failed)?;
    let facts = gather_facts(&pass.fs);
    Ok(FetchedHead { head, facts })
}

/// What [`plan_phase`] decided.
enum Planned {
    /// The quick check proved the files unchanged: only declared units
    /// may need converging; the tree was not read.
    QuickHit { prepared: Prepared },
    /// A plan from rendering (all files, or the drifted/changed ones).
    Full { prepared: Prepared, inputs: String },
}

/// Quick check, partial repair, or the full load → render → plan.
fn plan_phase(pass: &Pass, fetched: FetchedHead) -> Result<Planned, Error> {
    let FetchedHead { head, facts } = fetched;
    let settings = pass.settings;
    let inputs = quick::inputs(settings, &facts);
    let bad = pass.marks.bad.contains_key(&head.commit);
    let mut partial = None;
    if let Some(record) = pass.stamps.clone().filter(|_| !pass.opts.full && !bad) {
        match quick::assess(settings, &pass.fs, record, &head.commit, &inputs) {
            quick::Assessment::Partial { record, drifted } => partial = Some((record, drifted)),
            quick::Assessment::Hit(plan) => {
                return Ok(Planned::QuickHit {
                    prepared: Prepared {
                        fetched: Fetched {
                            commit: head.commit,
                            commit_time: head.commit_time,
                            summary: head.summary,
                            snapshot: Snapshot::default(),
                        },
                        plan: *plan,
                    },
                });
            }
            _ => {}
        }
    }
    let base = partial
        .as_ref()
        .filter(|(record, _)| record.commit != head.commit)
        .and_then(|(record, _)| read_base(settings, &head, &record.commit));
    let fetched = read_snapshot(settings, head)?;
    let repaired = partial.and_then(|(record, drifted)| {
        repair::plan(
            settings,
            &pass.state,
            &pass.fs,
            &fetched,
            &facts,
            &record,
            &drifted,
            base.as_ref(),
        )
    });
    let plan = match repaired {
        Some(plan) => plan,
        None => plan_for(settings, &pass.state, &pass.fs, &fetched, &facts)?,
    };
    failpoint::hit("sync.planned").kind(Failure::Failed)?;
    Ok(Planned::Full {
        prepared: Prepared { fetched, plan },
        inputs,
    })
}

/// Skips a commit marked bad (unless `--retry`); otherwise deploys it and,
/// once applied, raises the anti-rollback floor and writes the quick-check
/// record.
fn apply_phase(pass: &mut Pass, prepared: Prepared, inputs: &str) -> Result<Report, Error> {
    let commit = prepared.fetched.commit.clone();
    if let Some(bad) = pass.marks.bad.get(&commit) {
        if !pass.opts.retry {
            warn!(commit = %short(&commit), reason = %bad.reason, "commit is marked bad: not applied again until a new commit arrives (or --retry)");
            return Ok(Report {
                commit,
                applied: None,
                plan: prepared.plan,
                recovered: pass.recovered.clone(),
                skipped_bad: true,
                post: None,
                quick: false,
            });
        }
    }
    if pass.marks.bad.remove(&commit).is_some() {
        marks::save(&pass.state, &pass.marks).kind(Failure::Failed)?;
    }
    let commit_time = prepared.fetched.commit_time;
    let units = prepared.plan.units.clone();
    let managed: Vec<_> = prepared.plan.next_inventory.files.keys().cloned().collect();
    let self_contained = prepared.plan.self_contained.clone();
    let report = deploy(pass, prepared)?;
    failpoint::hit("sync.floor").kind(Failure::Failed)?;
    raise_floor(pass.settings, &commit, commit_time, pass.now);
    failpoint::hit("sync.quick").kind(Failure::Failed)?;
    quick::record(
        &pass.state,
        &pass.fs,
        &commit,
        inputs,
        &units,
        &managed,
        &self_contained,
    );
    Ok(report)
}

/// History and `last-run.json` for this run's outcome.
fn record_outcome(pass: &Pass, result: &Result<Report, Error>) {
    let _t = timings::stage("record");
    if let Err(e) = failpoint::hit("sync.record") {
        warn!("{e:#}");
    }
    let (state, now) = (&pass.state, pass.now);
    match result {
        Ok(r) => match (&r.applied, r.skipped_bad) {
            (Some(a), _) => record(
                state,
                now,
                Outcome::Applied,
                Some(r.commit.clone()),
                Some(a.txid.clone()),
                Some(a),
                None,
            ),
            (None, true) => write_last_run(
                state,
                now,
                Outcome::Skipped,
                Some(r.commit.clone()),
                Some("commit marked bad".into()),
            ),
            (None, false) => {
                write_last_run(state, now, Outcome::Unchanged, Some(r.commit.clone()), None)
            }
        },
        Err(e) => {
            let outcome = match e.kind {
                Failure::InvalidRepo | Failure::Refused => Outcome::Refused,
                Failure::Degraded => Outcome::Degraded,
                _ if e.error.downcast_ref::<Reverted>().is_some() => Outcome::Reverted,
                _ => Outcome::Failed,
            };
            let commit = e.error.downcast_ref::<Reverted>().map(|r| r.commit.clone());
            record(
                state,
                now,
                outcome,
                commit,
                None,
                None,
                Some(format!("{:#}", e.error)),
            );
        }
    }
}

/// `driftless rollback [--to COMMIT]`: applies an earlier commit on the
/// operator's request (no fast-forward check), through the same apply,
/// unit actions, checks and revert as a sync. The commit rolled back from
/// is marked bad, so the next poll does not re-apply it; a new commit on
/// the branch is applied as usual.
pub fn rollback(
    settings: &Settings,
    to: Option<&str>,
    now: i64,
    rt: &Handle,
) -> Result<Report, Error> {
    // The operator's rollback also resumes a halted agent.
    let opts = SyncOptions {
        retry: true,
        ..SyncOptions::default()
    };
    let mut pass = begin(settings, &opts, now, rt)?;
    let inventory = pass.state.inventory().kind(Failure::Failed)?;
    let current = inventory.commit.clone();
    let target = match to {
        Some(t) => t.to_string(),
        None => {
            let history = pass.state.history().kind(Failure::Failed)?;
            history
                .iter()
                .rev()
                .filter(|e| e.outcome == Outcome::Applied)
                .filter_map(|e| e.commit.clone())
                .find(|c| Some(c) != current.as_ref() && !pass.marks.bad.contains_key(c))
                .ok_or_else(|| {
                    Error::new(
                        Failure::Failed,
                        anyhow!("no earlier good commit in the history: name one with --to COMMIT"),
                    )
                })?
        }
    };
    let spec = source_spec(settings)?;
    let repo = fetch::open(&spec, &pass.state.mirror()).kind(Failure::Failed)?;
    let id = repo
        .rev_parse_single(target.as_str())
        .map_err(|e| {
            Error::new(
                Failure::Failed,
                anyhow!("{target:?} is not a commit of the repository: {e}"),
            )
        })?
        .detach();
    if settings.require_signed {
        verify_signatures(settings, &repo, None, id)?;
    }
    let commit_time = repo
        .find_commit(id)
        .ok()
        .and_then(|c| c.time().ok())
        .map_or(0, |t| t.seconds);
    let snapshot = fetch::read_tree(&repo, id, &settings.path).kind(Failure::InvalidRepo)?;
    let fetched = Fetched {
        commit: id.to_string(),
        commit_time,
        summary: format!("rollback to {}", short(&id.to_string())),
        snapshot,
    };
    let facts = gather_facts(&pass.fs);
    let plan = plan_for(settings, &pass.state, &pass.fs, &fetched, &facts)?;
    if let Some(cur) = current.as_ref().filter(|c| **c != fetched.commit) {
        pass.marks.bad.insert(
            cur.clone(),
            marks::Mark {
                time: now,
                reason: format!("rolled back by the operator to {}", short(&fetched.commit)),
            },
        );
    }
    pass.marks.bad.remove(&fetched.commit);
    pass.marks.halted = None;
    marks::save(&pass.state, &pass.marks).kind(Failure::Failed)?;
    let prepared = Prepared { fetched, plan };
    let result = deploy(&mut pass, prepared);
    match &result {
        Ok(r) => {
            // The operator lowered the floor on purpose.
            let full_ref =
                fetch::full_ref_name(&settings.branch).unwrap_or_else(|_| settings.branch.clone());
            let lowered = floor::Floor {
                commit: r.commit.clone(),
                commit_time,
                branch: full_ref,
                recorded_at: now,
            };
            if let Err(e) = floor::save(&settings.root, &lowered) {
                warn!("cannot record the anti-rollback floor: {e:#}");
            }
            record(
                &pass.state,
                now,
                Outcome::Applied,
                Some(r.commit.clone()),
                r.applied.as_ref().map(|a| a.txid.clone()),
                r.applied.as_ref(),
                Some(format!(
                    "rollback from {}",
                    current.as_deref().map(short).unwrap_or("nothing")
                )),
            )
        }
        Err(e) => record(
            &pass.state,
            now,
            Outcome::Failed,
            None,
            None,
            None,
            Some(format!("rollback: {:#}", e.error)),
        ),
    }
    result
}

/// What a crash left behind is rolled back by [`apply::recover`]; this
/// finishes the job. Each rolled-back transaction is recorded in the
/// history. One that was switched in had told systemd to reload or
/// restart units: they are told again, for the restored files (if that
/// fails, the host is in a state nobody verified, and the agent halts).
/// A commit whose checks were interrupted [`marks::MAX_INTERRUPTED`]
/// times is marked bad; below that, the next sync simply tries again.
fn after_recovery(
    settings: &Settings,
    state: &StateDir,
    rt: &Handle,
    recovered: &[apply::Recovered],
    marks: &mut Marks,
    now: i64,
) -> Result<(), Error> {
    use crate::effects::apply::journal::TxState;
    let mut changed = false;
    for r in recovered {
        let commit = r.commit.as_deref().map(short).unwrap_or("none");
        let what = match r.phase {
            TxState::Switched => "interrupted during its unit actions or health checks",
            TxState::Reverting => "interrupted while it was being reverted",
            _ => "interrupted before all its files were switched in",
        };
        warn!(txid = %r.txid, commit = %commit, "rolled back a transaction {what}; the host is back at its last verified state");
        record(
            state,
            now,
            Outcome::Recovered,
            r.commit.clone(),
            Some(r.txid.clone()),
            None,
            Some(format!("transaction {what}: rolled back")),
        );
        if let Some(actions) = r.post.as_ref().filter(|_| r.was_live()) {
            if let Err(e) = rt.block_on(post::retell(settings, actions)) {
                marks.halted = Some(marks::Halt {
                    time: now,
                    commit: r.commit.clone(),
                    reason: format!(
                        "transaction {} ({what}) was rolled back, but the units of the restored files failed: {e:#}",
                        r.txid
                    ),
                });
                changed = true;
            }
        }
        if let (TxState::Switched, Some(c)) = (r.phase, &r.commit) {
            let n = marks.interrupted.entry(c.clone()).or_insert(0);
            *n += 1;
            if *n >= marks::MAX_INTERRUPTED {
                let n = *n;
                marks.interrupted.remove(c);
                warn!(commit = %short(c), times = n, "commit marked bad: its unit actions or checks were interrupted every time");
                marks.bad.insert(
                    c.clone(),
                    marks::Mark {
                        time: now,
                        reason: format!(
                            "its unit actions or health checks were interrupted {n} times (the agent was killed or the host went down each time)"
                        ),
                    },
                );
            }
            changed = true;
        }
    }
    if changed {
        marks::save(state, marks).kind(Failure::Failed)?;
    }
    Ok(())
}

/// A commit that was applied, failed its actions or checks, and was reverted.
#[derive(Debug, thiserror::Error)]
#[error("commit {} was switched in but {reason}; the host was reverted to its previous state and the commit is marked bad", short(commit))]
pub struct Reverted {
    pub commit: String,
    pub reason: String,
}

/// Apply, then run unit actions and checks; revert as a whole on failure.
fn deploy(pass: &mut Pass, prepared: Prepared) -> Result<Report, Error> {
    let (settings, state, fs, now, opts, rt) = (
        pass.settings,
        &pass.state,
        &pass.fs,
        pass.now,
        pass.opts,
        pass.rt,
    );
    let marks = &mut pass.marks;
    let recovered = &pass.recovered;
    let commit = prepared.fetched.commit.clone();
    let plan = prepared.plan;
    if plan.is_empty() {
        let timing = timings::stage("units");
        let fixed = rt
            .block_on(post::converge_units(settings, &plan))
            .kind(Failure::Failed)?;
        drop(timing);
        for a in &fixed {
            warn!(action = %a, "a declared unit had drifted: repaired");
        }
        info!(commit = %short(&commit), files = plan.unchanged, "host already matches the repository: nothing to do");
        return Ok(Report {
            commit,
            applied: None,
            plan,
            recovered: recovered.to_vec(),
            skipped_bad: false,
            post: None,
            quick: false,
        });
    }
    for c in &plan.changes {
        tracing::debug!(path = %c.path, change = ?c.kind, "planned");
    }
    let applied = apply::apply(fs, state, &plan, ownership_applied(), now, &opts.apply)
        .kind(Failure::Failed)?;
    info!(
        commit = %short(&commit),
        summary = %prepared.fetched.summary,
        txid = %applied.txid,
        created = applied.created,
        changed = applied.changed,
        removed = applied.removed,
        "switched in; running unit actions and checks"
    );
    let timing = timings::stage("post");
    let post = rt.block_on(post::run(settings, &plan));
    drop(timing);
    tracing::debug!(
        ?post,
        run_checks = settings.run_checks,
        checks = plan.checks.len(),
        "post-apply"
    );
    let reason = match &post.failure {
        None => match apply::commit(state, &applied.txid, &plan.next_inventory, now) {
            Ok(()) => {
                if marks.interrupted.remove(&commit).is_some() {
                    if let Err(e) = marks::save(state, marks) {
                        warn!("cannot update {}: {e:#}", state.path().display());
                    }
                }
                info!(commit = %short(&commit), txid = %applied.txid, "applied");
                return Ok(Report {
                    commit,
                    applied: Some(applied),
                    plan,
                    recovered: recovered.to_vec(),
                    skipped_bad: false,
                    post: Some(post),
                    quick: false,
                });
            }
            // Not the commit's fault (a full disk, a failing state
            // directory): revert, but do not mark it bad.
            Err(e) => Err(format!(
                "its checks passed but it could not be recorded: {e:#}"
            )),
        },
        Some(reason) => Ok(reason.clone()),
    };
    let failed = match &reason {
        Ok(r) | Err(r) => r.clone(),
    };
    warn!(commit = %short(&commit), reason = %failed, "reverting the transaction");
    if reason.is_ok() {
        // Durable before the revert starts: a crash during the revert is
        // finished by recovery, and the commit is not tried again.
        marks.bad.insert(
            commit.clone(),
            marks::Mark {
                time: now,
                reason: failed.clone(),
            },
        );
        marks::save(state, marks).kind(Failure::Failed)?;
    }
    let reverted = apply::revert(fs, state, &applied.txid).kind(Failure::Failed);
    let after = match reverted {
        Ok(()) => {
            info!(txid = %applied.txid, "reverted; re-running unit actions and checks for the previous state");
            let again = rt.block_on(post::run(settings, &plan));
            again.failure
        }
        Err(e) => Some(format!("the revert itself failed: {}", e)),
    };
    if let Some(revert_failure) = after {
        marks.halted = Some(marks::Halt {
            time: now,
            commit: Some(commit.clone()),
            reason: format!(
                "commit {} failed ({failed}) and after reverting it: {revert_failure}",
                short(&commit)
            ),
        });
        marks::save(state, marks).kind(Failure::Failed)?;
        return Err(Error::new(
            Failure::Degraded,
            anyhow!(
                "commit {} failed ({failed}); it was reverted, but the previous state fails too ({revert_failure}). \
                 driftless stops touching this host until `driftless sync --retry`",
                short(&commit)
            ),
        ));
    }
    match reason {
        Ok(reason) => Err(Error::new(Failure::Failed, Reverted { commit, reason })),
        Err(why) => Err(Error::new(
            Failure::Failed,
            anyhow!(
                "commit {} was switched in and {why}; the host was reverted to its previous state. The next run tries again",
                short(&commit)
            ),
        )),
    }
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
    let path = state.last_run_path();
    // An idle host repeats the same outcome on every poll: moving the
    // file's mtime says "checked again now" for a fraction of the cost of
    // a new file (see `load_last_run`).
    if let Ok(Some(prev)) = read_json::<LastRun>(&path) {
        if prev.outcome == last.outcome
            && prev.commit == last.commit
            && prev.message == last.message
        {
            let when = nix::sys::time::TimeSpec::new(now, 0);
            if nix::sys::stat::utimensat(
                nix::fcntl::AT_FDCWD,
                &path,
                &when,
                &when,
                nix::sys::stat::UtimensatFlags::NoFollowSymlink,
            )
            .is_ok()
            {
                return;
            }
        }
    }
    if let Err(e) = write_json_replace(&path, &last) {
        warn!("cannot record the last run: {e:#}");
    }
}

/// The latest run. Its time is the later of the recorded time and the
/// file's mtime: a repeated outcome only moves the mtime.
pub fn load_last_run(state: &StateDir) -> anyhow::Result<Option<LastRun>> {
    let path = state.last_run_path();
    let Some(mut last) = read_json::<LastRun>(&path)? else {
        return Ok(None);
    };
    if let Ok(m) = std::fs::metadata(&path) {
        use std::os::unix::fs::MetadataExt;
        last.time = last.time.max(m.mtime());
    }
    Ok(Some(last))
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
