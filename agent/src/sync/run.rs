//! One sync, phase by phase: [`begin`] (lock, recover what a crash left,
//! halt check), [`fetch_phase`], [`plan_phase`], [`apply_phase`] (through
//! [`deploy`]: stage, switch, unit actions and checks, commit or revert),
//! [`record_outcome`]. Each crash window has one function to read; what
//! each leaves behind and how the next run repairs it is in
//! [`crate::effects::apply`].

use anyhow::anyhow;
use tokio::runtime::Handle;
use tracing::warn;

use super::deploy::{deploy, keep_reboot_request, Reverted};
use super::marks::{self, Marks};
use super::recovery::{after_recovery, remember_rollbacks};
use super::runlog::{record, write_last_run};
use super::{
    applied_commits, applied_commits_from, fetch_head, floor_to_raise, gather_facts, lock,
    open_root, quick, raise_floor, read_changes, read_snapshot, repair, Fetched, Head, Prepared,
    Report, SyncOptions,
};
use crate::config::Settings;
use crate::desired::snapshot::Snapshot;
use crate::effects::apply;
use crate::effects::failpoint;
use crate::effects::rootfs::RootFs;
use crate::effects::state::history::Outcome;
use crate::effects::state::{LockGuard, StateDir};
use crate::exit::{Classify, Error, Failure};
use crate::plan::diff::short;
use crate::timings;

/// One full sync. Records the outcome in history and `last-run.json`.
///
/// The phases, each one function, in the order a crash can interrupt them
/// (see [`apply`] for what each leaves behind and how the next run repairs
/// it): `begin` (lock, recover what a crash left, halt check),
/// `fetch_phase`, `plan_phase` (quick check, or load → render → plan),
/// `apply_phase` (stage, switch, unit actions and checks, commit or
/// revert; floor and quick-check record), `record_outcome`.
pub fn sync_once(
    settings: &Settings,
    opts: &SyncOptions,
    now: i64,
    rt: &Handle,
) -> Result<Report, Error> {
    let mut pass = begin(settings, opts, now, rt, false)?;
    let mut fleet = super::fleet::FleetRun::default();
    let mut fleet_rollback = false;
    let result = (|| {
        let fetched = fetch_phase(&pass)?;
        match ask_fleet(&pass, &mut fleet, &fetched.head)? {
            FleetGate::Proceed => {}
            FleetGate::Wait(waiting) => return Ok(waiting_report(&pass, fetched.head, waiting)),
            FleetGate::RollBack(why) => {
                fleet_rollback = true;
                fleet.rolled_back();
                warn!(
                    "fleet: the applied commit is {why}; rolling back to the previous good commit"
                );
                return super::rollback_in(&mut pass, None, &format!("fleet: {why}; rolled back"))
                    .map_err(|mut e| {
                        e.error = e.error.context(format!(
                            "the applied commit is {why}, and this host cannot roll back"
                        ));
                        e
                    });
            }
        }
        match plan_phase(&pass, fetched)? {
            Planned::QuickHit { prepared } => {
                let commit = prepared.fetched.commit.clone();
                let commit_time = prepared.fetched.commit_time;
                pass.floor = floor_to_raise(settings, &commit, commit_time, now);
                let mut report = deploy(&mut pass, prepared)?;
                report.quick = true;
                raise_floor(settings, &commit, commit_time, now);
                Ok(report)
            }
            Planned::Full {
                prepared,
                inputs,
                verified,
                tree,
            } => apply_phase(&mut pass, prepared, &inputs, verified, tree),
        }
    })();
    if fleet_rollback {
        // rollback_in recorded the history itself.
        super::metrics::after_run(&pass, &result);
    } else {
        if !result.as_ref().is_ok_and(|r| r.quick) {
            // An applied run has its committed inventory at hand (decoding
            // it again from disk cost 15 ms at 10,000 files).
            let committed = result
                .as_ref()
                .ok()
                .filter(|r| r.applied.is_some())
                .map(|r| &r.plan.next_inventory);
            keep_reboot_request(&mut pass, committed);
        }
        record_outcome(&pass, &result);
    }
    fleet.finish(&pass, &result);
    super::reboot::after_run(&pass, &result);
    result
}

/// What the fleet says about this run.
enum FleetGate {
    /// Go on as without a fleet.
    Proceed,
    /// The new commit waits (or is halted); nothing is touched.
    Wait(crate::effects::fleet::Waiting),
    /// The applied commit was halted fleet-wide: roll back (the reason).
    RollBack(String),
}

/// `[fleet]`: before a new commit is applied, asks whether this host may
/// apply it now. `Some`: it may not (yet); nothing is touched. Not asked
/// for the commit already applied (drift repair goes on as always), nor
/// for one this host marked bad itself (it is skipped anyway).
///
/// And whether the applied commit was halted fleet-wide since (other
/// hosts reverted it): unless a newer commit is about to be applied, this
/// host then rolls back too ("hosts of the failing wave revert"). That
/// rollback takes no permit and ignores maintenance windows: the commit is
/// known bad.
fn ask_fleet(
    pass: &Pass,
    fleet: &mut super::fleet::FleetRun,
    head: &Head,
) -> Result<FleetGate, Error> {
    if super::fleet::active(pass.settings).is_none() {
        return Ok(FleetGate::Proceed);
    }
    let current = match &pass.stamps {
        Some(r) => Some(r.commit.clone()),
        None => pass.state.inventory().kind(Failure::Failed)?.commit.clone(),
    };
    let locally_bad = pass.marks.bad.contains_key(&head.commit) && !pass.opts.retry;
    let newer = current.as_deref() != Some(head.commit.as_str()) && !locally_bad;
    let waiting = if newer {
        match fleet.ask(pass, head, current.as_deref())? {
            super::fleet::Gate::Go => None,
            super::fleet::Gate::Hold(w) => Some(w),
        }
    } else {
        None
    };
    let applying_newer = newer && waiting.is_none();
    if let Some(why) = fleet.current_halted(pass, head, current.as_deref(), applying_newer) {
        // Only one step, and only where there is a step to take: a host
        // with nothing earlier stays and keeps repairing drift, and a
        // commit this host reached by a rollback is not rolled back again
        // automatically (bad marks come from any host: a chain of them
        // must not walk the fleet down its history).
        let cur = current.as_deref().unwrap_or_default();
        match super::rollback_eligibility(pass, cur)? {
            super::RollbackEligibility::Yes => return Ok(FleetGate::RollBack(why)),
            super::RollbackEligibility::NoEarlierCommit => warn!(
                commit = %short(cur),
                "fleet: the applied commit is {why}, but this host has no earlier good commit to return to: it stays, and keeps repairing drift"
            ),
            super::RollbackEligibility::RollbackFailed => warn!(
                commit = %short(cur),
                "fleet: the applied commit is {why}, but this host's rollback from it failed already: not rolling back further by itself (an operator decides: `driftless rollback --to COMMIT`)"
            ),
            super::RollbackEligibility::ReachedByRollback => warn!(
                commit = %short(cur),
                "fleet: the applied commit is {why}, but this host came to it by a rollback: not rolling back further by itself (an operator decides: `driftless rollback --to COMMIT`)"
            ),
        }
    }
    Ok(match waiting {
        Some(w) => FleetGate::Wait(w),
        None => FleetGate::Proceed,
    })
}

/// The report of a run that left a new commit waiting for the fleet.
fn waiting_report(pass: &Pass, head: Head, waiting: crate::effects::fleet::Waiting) -> Report {
    Report {
        plan: crate::plan::Plan {
            host: pass.settings.host.clone(),
            commit: Some(head.commit.clone()),
            ownership_applied: super::ownership_applied(),
            ..Default::default()
        },
        commit: head.commit,
        applied: None,
        recovered: pass.recovered.clone(),
        skipped_bad: false,
        post: None,
        quick: false,
        waiting: Some(waiting),
    }
}

/// One sync under the lock: what every phase needs.
pub(super) struct Pass<'a> {
    pub(super) settings: &'a Settings,
    pub(super) opts: &'a SyncOptions,
    pub(super) now: i64,
    /// When the run started (before the lock), for its duration.
    pub(super) started: std::time::Instant,
    /// How long another run's lock was waited for.
    pub(super) lock_wait: Option<std::time::Duration>,
    /// SOPS files decrypted to render the plan.
    pub(super) secrets_decrypted: usize,
    /// Checks failing when they last ran in this pass (`None`: not run).
    pub(super) checks_failing: Option<usize>,
    pub(super) rt: &'a Handle,
    pub(super) state: StateDir,
    _guard: LockGuard,
    pub(super) fs: RootFs,
    pub(super) marks: Marks,
    /// A quick-check record still valid at the start of this run.
    stamps: Option<std::sync::Arc<crate::plan::quick::QuickRecord>>,
    /// Transactions rolled back at the start of this run.
    pub(super) recovered: Vec<String>,
    /// The anti-rollback record the next commit writes with its inventory.
    pub(super) floor: Option<crate::effects::state::floor::Floor>,
    /// Whether a committed reboot request is pending in this boot (`None`:
    /// this run did not read the inventory; the metrics keep what the last
    /// run that did found).
    pub(super) reboot_pending: Option<bool>,
}

impl Drop for Pass<'_> {
    /// Before the lock is released: the cached inventory and quick-check
    /// record are the largest things a pass holds (see
    /// [`crate::memory::discard`]).
    fn drop(&mut self) {
        self.state.discard_cache();
        crate::memory::discard(self.stamps.take());
    }
}

/// A halt whose rollback committed (the inventory names its target) but
/// whose run was killed before it lifted the halt: lifted now. Without
/// this the host stayed halted on the commit it was rolled back to, and
/// an operator's next `driftless rollback` went a second step back.
fn lift_halt_of_applied_rollback(state: &StateDir, marks: &mut marks::Marks) {
    let Some(target) = marks.halted.as_ref().and_then(|h| h.lifted_by.clone()) else {
        return;
    };
    let applied = state.inventory().ok().and_then(|i| i.commit.clone());
    if applied.as_deref() != Some(target.as_str()) {
        return;
    }
    tracing::info!(commit = %short(&target), "the rollback to this commit applied before its run was cut short: the halt is lifted");
    marks.halted = None;
    if let Err(e) = marks::save(state, marks) {
        warn!("cannot lift the halt in the marks: {e:#}");
    }
}

/// Takes the lock, rolls back what a crash left behind, and refuses to go
/// on while halted (unless `--retry`, which clears the halt). With
/// `operator` (a `rollback`), a halt neither refuses nor is cleared here:
/// the caller clears it once it knows what it applies.
pub(super) fn begin<'a>(
    settings: &'a Settings,
    opts: &'a SyncOptions,
    now: i64,
    rt: &'a Handle,
    operator: bool,
) -> Result<Pass<'a>, Error> {
    let started = std::time::Instant::now();
    let timing = timings::stage("lock");
    let (state, guard) = lock(settings, opts.wait)?;
    let fs = open_root(settings)?;
    drop(timing);
    // Temp files of a run that died while replacing a state file.
    for dir in [
        Some(state.path().to_path_buf()),
        crate::effects::state::floor::path(&settings.root)
            .parent()
            .map(|p| p.to_path_buf()),
    ]
    .into_iter()
    .flatten()
    {
        let n = crate::effects::state::remove_stale_temps(&dir);
        if n > 0 {
            tracing::info!(dir = %dir.display(), removed = n, "removed temp files left by an interrupted run");
        }
    }
    // A quick-check record whose inventory stamp still holds proves that no
    // transaction started since the last successful sync (a transaction
    // removes the record, durably, before it touches anything): there is
    // nothing to recover, and the applied commit is the record's.
    let stamps = quick::current(&state);
    // Corrupt state files: rebuilt, moved aside, or (the marks) halting.
    // A valid quick-check record vouches for the inventory, so an idle
    // poll skips the parse.
    if stamps.is_none() {
        super::state_repair::repair(&state, &settings.root, now).kind(Failure::Failed)?;
    }
    let recovered = match &stamps {
        Some(_) => Vec::new(),
        None => {
            let _t = timings::stage("recover");
            let _critical = crate::stop::critical();
            apply::recover(&fs, &state).kind(Failure::Failed)?
        }
    };
    let mut marks = match marks::load(&state) {
        Ok(m) => m,
        Err(_) => {
            super::state_repair::repair(&state, &settings.root, now).kind(Failure::Failed)?;
            marks::load(&state).kind(Failure::Failed)?
        }
    };
    remember_rollbacks(settings, &state, &mut marks)?;
    after_recovery(settings, &state, rt, &recovered, &mut marks, now)?;
    lift_halt_of_applied_rollback(&state, &mut marks);
    if let Some(h) = marks.halted.as_ref().filter(|_| !operator) {
        if !opts.retry {
            super::metrics::while_halted(settings, &state, now, started, guard.waited, &marks);
            crate::events::halted(
                h.commit.as_deref(),
                &crate::time::time_str(h.time),
                &h.reason,
            );
            crate::effects::notify::halted(
                settings,
                &state,
                rt,
                now,
                h.time,
                h.commit.as_deref(),
                &h.reason,
            );
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
        started,
        lock_wait: guard.waited,
        secrets_decrypted: 0,
        checks_failing: None,
        rt,
        state,
        _guard: guard,
        fs,
        marks,
        stamps,
        recovered: recovered.into_iter().map(|r| r.txid).collect(),
        floor: None,
        reboot_pending: None,
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
    Full {
        prepared: Prepared,
        inputs: String,
        /// The quick check of this run: every file of the record but the
        /// drifted ones still had its recorded stamp.
        verified: Option<quick::Verified>,
        /// What the commit's tree holds, for the quick-check record.
        tree: Option<crate::plan::quick::Tree>,
    },
}

/// Quick check, partial repair, or the full load → render → plan.
fn plan_phase(pass: &Pass, fetched: FetchedHead) -> Result<Planned, Error> {
    let FetchedHead { head, facts } = fetched;
    let settings = pass.settings;
    let inputs = quick::inputs(settings, &facts);
    let bad = pass.marks.bad.contains_key(&head.commit);
    let mut partial = None;
    // Both paths after the quick check plan against the inventory: it is
    // read on another core, from the first drifted file the quick check
    // sees (see `quick::assess`), or after it, while the tree is read and
    // the configuration loaded.
    let prefetched = std::sync::Once::new();
    let prefetch = || prefetched.call_once(|| pass.state.prefetch_inventory());
    // Back from a reboot under a fleet permit: the checks must run, which
    // the quick check does not do.
    let verifying = super::reboot::verifying(pass);
    if let Some(record) = pass
        .stamps
        .clone()
        .filter(|_| !pass.opts.full && !bad && !verifying)
    {
        match quick::assess(settings, &pass.fs, record, &head.commit, &inputs, &prefetch) {
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
    prefetch();
    let (changes, known_trees) = match partial
        .as_ref()
        .filter(|(record, _)| record.commit != head.commit)
        .and_then(|(record, _)| read_changes(settings, &head, &record.commit))
    {
        Some(found) => (Some(found.changed), found.trees),
        None => (None, Vec::new()),
    };
    // Updating only what changed reads only the entries it needs of the
    // tree (not 10,000 of them), when the tree is known to read whole
    // without error: see `lazy_tree`.
    type Partial = (
        std::sync::Arc<crate::plan::quick::QuickRecord>,
        std::collections::BTreeSet<crate::desired::spec::TargetPath>,
    );
    let repair = |fetched: &Fetched, (record, drifted): &Partial| {
        repair::plan(
            settings,
            &pass.state,
            &pass.fs,
            fetched,
            &facts,
            record,
            drifted,
            changes.as_deref(),
        )
    };
    let mut repair_whole = true;
    if let Some((drift, tree)) = partial
        .as_ref()
        .and_then(|p| Some((p, lazy_tree(&p.0, &head.commit, changes.as_deref())?)))
    {
        let planned = super::read_snapshot_lazily(settings, &head, known_trees)
            .map(|fetched| (repair(&fetched, drift), fetched));
        match planned {
            Ok((plan, fetched)) => match (plan, fetched.snapshot.failure()) {
                (Some(plan), None) => {
                    failpoint::hit("sync.planned").kind(Failure::Failed)?;
                    return Ok(Planned::Full {
                        prepared: Prepared { fetched, plan },
                        inputs,
                        verified: partial
                            .map(|(record, drifted)| quick::Verified { record, drifted }),
                        tree: Some(tree),
                    });
                }
                (_, Some(why)) => tracing::debug!(
                    "reading the tree entry by entry failed ({why}); reading it whole"
                ),
                // Read whole, the tree gives the same answer (its links are
                // the recorded ones): straight to the full path.
                (None, None) => repair_whole = false,
            },
            Err(e) => tracing::debug!(
                "cannot read the tree entry by entry ({:#}); reading it whole",
                e.error
            ),
        }
    }
    let fetched = read_snapshot(settings, head)?;
    let tree = Some(crate::plan::quick::Tree {
        entries: fetched.snapshot.len(),
        links: fetched.snapshot.has_symlinks(),
    });
    let repaired = partial
        .as_ref()
        .filter(|_| repair_whole)
        .and_then(|p| repair(&fetched, p));
    let plan = match repaired {
        Some(plan) => plan,
        None => super::plan_for_sync(settings, &pass.state, &pass.fs, &fetched, &facts)?,
    };
    failpoint::hit("sync.planned").kind(Failure::Failed)?;
    Ok(Planned::Full {
        prepared: Prepared { fetched, plan },
        inputs,
        verified: partial.map(|(record, drifted)| quick::Verified { record, drifted }),
        tree,
    })
}

/// What the fetched commit's tree holds, if it is known to read whole
/// without error, so that a sync may read only the entries it needs
/// (`None`: it is read whole).
///
/// Known: the record's commit was read (whole, or by this same argument)
/// by a sync of this agent that succeeded, its tree's count and links are
/// recorded, and the fetched commit is that one, or differs from it only
/// in regular files (`changes`, found by comparing the trees, which
/// checks every tree that differs as a whole read does) and stays within
/// the limit on entries. Every tree the fetched commit shares with the
/// recorded one read whole before; every other one was just checked.
fn lazy_tree(
    record: &crate::plan::quick::QuickRecord,
    commit: &str,
    changes: Option<&[crate::desired::snapshot::Changed]>,
) -> Option<crate::plan::quick::Tree> {
    use crate::desired::snapshot::Kind;
    let tree = record.tree?;
    if record.commit == commit {
        return Some(tree);
    }
    let mut entries = tree.entries;
    for c in changes? {
        if c.before == Some(Kind::Symlink) || c.after == Some(Kind::Symlink) {
            return None;
        }
        match (c.before, c.after) {
            (None, Some(_)) => entries += 1,
            (Some(_), None) => entries = entries.checked_sub(1)?,
            _ => {}
        }
    }
    (entries <= crate::effects::fetch::MAX_TREE_ENTRIES).then_some(crate::plan::quick::Tree {
        entries,
        links: tree.links,
    })
}

/// Skips a commit marked bad (unless `--retry`); otherwise deploys it and,
/// once applied, raises the anti-rollback floor and writes the quick-check
/// record.
fn apply_phase(
    pass: &mut Pass,
    prepared: Prepared,
    inputs: &str,
    verified: Option<quick::Verified>,
    tree: Option<crate::plan::quick::Tree>,
) -> Result<Report, Error> {
    let commit = prepared.fetched.commit.clone();
    pass.secrets_decrypted = prepared.plan.secrets_decrypted;
    // From here to the commit or revert, SIGTERM waits (see `stop`);
    // once it came, `deploy` starts no transaction.
    let _critical = crate::stop::critical();
    failpoint::hit("sync.applying").kind(Failure::Failed)?;
    if let Some(bad) = pass.marks.bad.get(&commit) {
        if !pass.opts.retry {
            // The applied commit, marked bad here (its drift repair failed
            // its checks, or was interrupted again and again): the host
            // differs from it and stays so. Not a quiet skip: the run
            // fails (exit 1, `status` and the history say why) on every
            // poll until a new commit or `--retry`. The webhook went out
            // with the revert.
            let applied = pass.state.inventory().ok().and_then(|i| i.commit.clone());
            if applied.as_deref() == Some(commit.as_str()) && !prepared.plan.is_empty() {
                return Err(Error::new(
                    Failure::Failed,
                    anyhow!(
                        "commit {} is this host's applied commit, but it is marked bad here since {} ({}): its drift is not repaired, and the host stays as it is, different from the commit (`driftless plan` lists how), until a new commit arrives or `driftless sync --retry`",
                        short(&commit),
                        crate::time::time_str(bad.time),
                        bad.reason,
                    ),
                ));
            }
            warn!(commit = %short(&commit), reason = %bad.reason, "commit is marked bad: not applied again until a new commit arrives (or --retry)");
            return Ok(Report {
                commit,
                applied: None,
                plan: prepared.plan,
                recovered: pass.recovered.clone(),
                skipped_bad: true,
                post: None,
                quick: false,
                waiting: None,
            });
        }
    }
    if pass.marks.bad.remove(&commit).is_some() {
        marks::save(&pass.state, &pass.marks).kind(Failure::Failed)?;
    }
    let commit_time = prepared.fetched.commit_time;
    pass.floor = floor_to_raise(pass.settings, &commit, commit_time, pass.now);
    let mut report = deploy(pass, prepared)?;
    if report.idle() {
        super::deploy::adopt_unchanged(pass, &mut report, true)?;
    }
    failpoint::hit("sync.floor").kind(Failure::Failed)?;
    raise_floor(pass.settings, &commit, commit_time, pass.now);
    failpoint::hit("sync.quick").kind(Failure::Failed)?;
    // From the plan as deployed: the packages stage may have planned the
    // files again (`Plan::replace_files`), and its changes are what this
    // transaction wrote. Borrowed, not copied (10,000 paths).
    let plan = &report.plan;
    let watched: Vec<crate::desired::spec::TargetPath> = if plan.packages_declared {
        vec![
            crate::desired::spec::TargetPath::parse(crate::effects::packages::DPKG_STATUS)
                .map_err(|e| anyhow!("{e}"))
                .kind(Failure::Failed)?,
        ]
    } else {
        Vec::new()
    };
    let inventory = &plan.next_inventory;
    quick::record(
        &pass.state,
        &pass.fs,
        &commit,
        inputs,
        &plan.units,
        quick::Managed {
            files: &inventory.files.keys().collect::<Vec<_>>(),
            self_contained: &plan.self_contained,
            carried: plan.contained_carried.as_ref(),
            links: &inventory.links.keys().collect::<Vec<_>>(),
            absent: &plan.absent_paths,
            directories: &inventory.directories.keys().collect::<Vec<_>>(),
            watched: &watched,
            verified: verified.as_ref(),
            // What this transaction wrote is stamped again; see
            // `quick::record`.
            written: &plan.changes.iter().map(|c| &c.path).collect(),
            config: plan.config_cache.as_ref(),
            tree,
        },
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
    if let Ok(Report {
        waiting: Some(w),
        commit,
        ..
    }) = result
    {
        let what = if w.halted { "halted" } else { "waiting" };
        write_last_run(
            state,
            now,
            Outcome::Skipped,
            Some(commit.clone()),
            Some(format!("fleet: {what}: {}", w.reason)),
        );
        super::metrics::after_run(pass, result);
        return;
    }
    match result {
        Ok(r) => match (&r.applied, r.skipped_bad) {
            (Some(a), _) => {
                crate::events::outcome(
                    Outcome::Applied,
                    Some(&r.commit),
                    Some(&a.txid),
                    Some(&format!("+{} ~{} -{}", a.created, a.changed, a.removed)),
                );
                crate::events::drift_repaired(&r.commit, &a.txid, r.plan.drifted);
                record(
                    state,
                    now,
                    Outcome::Applied,
                    Some(r.commit.clone()),
                    Some(a.txid.clone()),
                    Some(a),
                    None,
                )
            }
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
            crate::events::outcome(
                outcome.clone(),
                commit.as_deref(),
                None,
                Some(&format!("{:#}", e.error)),
            );
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
    super::metrics::after_run(pass, result);
    crate::effects::notify::run_finished(pass.settings, state, pass.rt, now, result);
}

#[cfg(test)]
mod lazy_tree_tests {
    use super::lazy_tree;
    use crate::desired::snapshot::{Changed, Kind};
    use crate::effects::fetch::MAX_TREE_ENTRIES;
    use crate::plan::quick::{QuickRecord, Tree};

    fn record(tree: Option<Tree>) -> QuickRecord {
        QuickRecord {
            tree,
            ..QuickRecord::example(Vec::new())
        }
    }

    fn change(path: &str, before: Option<Kind>, after: Option<Kind>) -> Changed {
        Changed {
            path: path.into(),
            before,
            after,
        }
    }

    /// Only a tree known to read whole without error is read lazily: the
    /// recorded commit's, or one that differs from it in regular files
    /// only and stays within the limit on entries; its count follows.
    #[test]
    fn a_tree_is_read_lazily_only_when_it_is_known_to_read_whole() {
        use Kind::{File, Symlink};
        let t = Tree {
            entries: 10,
            links: true,
        };
        let rec = record(Some(t));
        assert_eq!(lazy_tree(&rec, "c", None), Some(t), "the recorded commit");
        assert_eq!(
            lazy_tree(&record(None), "c", None),
            None,
            "no tree recorded"
        );
        assert_eq!(lazy_tree(&rec, "d", None), None, "trees not compared");
        let changes = [
            change("a", Some(File), Some(File)),
            change("b", None, Some(File)),
            change("c", Some(File), None),
            change("d", None, Some(File)),
        ];
        assert_eq!(
            lazy_tree(&rec, "d", Some(&changes)),
            Some(Tree {
                entries: 11,
                links: true
            })
        );
        for (before, after) in [
            (None, Some(Symlink)),
            (Some(Symlink), None),
            (Some(File), Some(Symlink)),
            (Some(Symlink), Some(Symlink)),
        ] {
            let changes = [change("l", before, after)];
            assert_eq!(
                lazy_tree(&rec, "d", Some(&changes)),
                None,
                "{before:?} -> {after:?}"
            );
        }
        // A count that cannot be (a damaged record), or one past the limit.
        let empty = record(Some(Tree {
            entries: 0,
            links: false,
        }));
        assert_eq!(
            lazy_tree(&empty, "d", Some(&[change("x", Some(File), None)])),
            None
        );
        let full = record(Some(Tree {
            entries: MAX_TREE_ENTRIES,
            links: false,
        }));
        assert!(lazy_tree(&full, "d", Some(&[change("x", Some(File), Some(File))])).is_some());
        assert_eq!(
            lazy_tree(&full, "d", Some(&[change("x", None, Some(File))])),
            None
        );
    }
}
