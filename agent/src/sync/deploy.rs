//! A prepared plan applied as one transaction: staged, switched in, unit
//! actions and checks run, then committed, or reverted as a whole when
//! anything fails (the commit marked bad).

use anyhow::anyhow;
use tracing::{info, warn};

use super::run::Pass;
use super::{marks, ownership_applied, post, Prepared, Report};
use crate::effects::apply;
use crate::effects::rootfs::RootFs;
use crate::exit::{Classify, Error, Failure};
use crate::plan::diff::short;
use crate::timings;

/// A commit that was applied, failed its actions or checks, and was
/// reverted (or is being: see `waits`); it is marked bad. The fleet, the
/// history, the metrics and the notifications tell a revert by this type.
#[derive(Debug, thiserror::Error)]
#[error("{}", describe(self))]
pub struct Reverted {
    pub commit: String,
    pub reason: String,
    /// Accounts the commit made that the revert kept, and why.
    pub kept: Vec<String>,
    /// Why the revert could not finish yet (dpkg's lock held by another
    /// program): the next run's recovery finishes it.
    pub waits: Option<String>,
    /// The commit changes nothing on this host: nothing was written, so
    /// nothing was reverted (its checks failed, see `adopt_unchanged`).
    pub unchanged: bool,
    /// The commit was already this host's applied commit: the run repaired
    /// drift (or re-applied it), and its failure says this host is not
    /// healthy, not that the commit is bad for others. The fleet is not
    /// told to halt it (the host's status still says it reverted).
    pub already_applied: bool,
}

fn describe(r: &Reverted) -> String {
    if r.unchanged {
        return format!(
            "commit {} changes no file on this host, but {}; nothing was written, and the commit is marked bad",
            short(&r.commit),
            r.reason
        );
    }
    format!(
        "commit {} was switched in but {}; {}",
        short(&r.commit),
        r.reason,
        reverted_suffix(&r.kept, r.waits.as_deref())
    )
}

fn reverted_suffix(kept: &[String], waits: Option<&str>) -> String {
    match waits {
        None => format!(
            "the host was reverted to its previous state and the commit is marked bad{}",
            kept_suffix(kept)
        ),
        Some(why) => format!(
            "the commit is marked bad, and its revert waits: {why} (the next run finishes it)"
        ),
    }
}

/// `" (but kept user app: uid 850 owns …)"`, or nothing.
pub(super) fn kept_suffix(kept: &[String]) -> String {
    if kept.is_empty() {
        String::new()
    } else {
        format!(" (but {})", kept.join("; "))
    }
}

/// Apply, then run unit actions and checks; revert as a whole on failure.
pub(super) fn deploy(pass: &mut Pass, prepared: Prepared) -> Result<Report, Error> {
    let (settings, state, fs, now, opts, rt) = (
        pass.settings,
        &pass.state,
        &pass.fs,
        pass.now,
        pass.opts,
        pass.rt,
    );
    let floor = pass.floor.take();
    let marks = &mut pass.marks;
    let recovered = &pass.recovered;
    let commit = prepared.fetched.commit.clone();
    let mut plan = prepared.plan;
    if plan.is_empty() {
        let timing = timings::stage("units");
        let fixed = rt
            .block_on(post::converge_units(settings, &plan))
            .kind(Failure::Failed)?;
        drop(timing);
        for a in &fixed {
            warn!(action = %a, "a declared unit had drifted: repaired");
        }
        if opts.idle_logged.as_deref() == Some(commit.as_str()) {
            tracing::debug!(commit = %short(&commit), files = plan.unchanged, "host already matches the repository: nothing to do");
        } else {
            info!(commit = %short(&commit), files = plan.unchanged, "host already matches the repository: nothing to do");
        }
        return Ok(Report {
            commit,
            applied: None,
            plan,
            recovered: recovered.to_vec(),
            skipped_bad: false,
            post: None,
            quick: false,
            waiting: None,
        });
    }
    for c in &plan.changes {
        tracing::debug!(path = %c.path, change = ?c.kind, "planned");
    }
    // Pre hooks: before anything of the transaction is written. A failing
    // one stops the sync with nothing applied; the commit is not marked
    // bad (nothing of it was tried yet, and what failed may be the host's
    // moment: the next poll tries again, pre hooks first).
    if settings.run_checks {
        let mut ran = Vec::new();
        let pre = rt.block_on(crate::effects::hooks::run(
            &plan.hooks,
            crate::desired::spec::HookWhen::Pre,
            &mut ran,
        ));
        if let Err(e) = pre {
            return Err(Error::new(
                Failure::Failed,
                e.context(format!(
                    "commit {} not applied: a pre hook failed, nothing was changed",
                    short(&commit)
                )),
            ));
        }
    } else {
        crate::effects::hooks::skipped(&plan.hooks, crate::desired::spec::HookWhen::Pre);
    }
    // SIGTERM since the run's critical section opened (the pre hooks
    // included): the transaction does not start (see `crate::stop`).
    if crate::stop::requested() {
        return Err(Error::new(
            Failure::Failed,
            anyhow::anyhow!(
                "stopped by SIGTERM before applying {}: nothing was changed; the next run applies it",
                short(&commit)
            ),
        ));
    }
    // After a packages stage, the files are planned again (a package may
    // have brought a file the plan took for missing).
    let fetched = &prepared.fetched;
    let mut replan = || -> anyhow::Result<crate::plan::Plan> {
        let facts = super::gather_facts(fs);
        super::plan_for(settings, state, fs, fetched, &facts).map_err(|e| e.error)
    };
    let applied = apply::apply_with(
        fs,
        state,
        &mut plan,
        ownership_applied(),
        now,
        &opts.apply,
        Some(&mut replan),
    )
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
    let post = rt.block_on(post::run(settings, &plan, post::Stage::Apply));
    drop(timing);
    pass.checks_failing = Some(post.checks.iter().filter(|c| !c.ok).count());
    tracing::debug!(
        ?post,
        run_checks = settings.run_checks,
        checks = plan.checks.len(),
        "post-apply"
    );
    let staged_floor = match (&post.failure, floor) {
        (None, Some(f)) => match crate::effects::state::floor::stage(&settings.root, &f) {
            Ok(p) => Some(p),
            Err(e) => {
                // Written after the commit instead (`raise_floor`).
                warn!("cannot prepare the anti-rollback floor: {e:#}");
                None
            }
        },
        _ => None,
    };
    if post.failure.is_none() {
        // The reboot request goes into the commit record: a crash before
        // `/run/reboot-required` is written loses nothing. A request of an
        // earlier boot is dropped (the host rebooted since).
        let boot = crate::effects::reboot::boot_id();
        let mut paths = crate::effects::reboot::owners(fs, &plan.reboot_required);
        // A package's reason: its dpkg file list, under its own name.
        paths.extend(plan.reboot_packages.iter().filter_map(|n| {
            crate::desired::spec::TargetPath::parse(&format!("/var/lib/dpkg/info/{n}.list"))
                .ok()
                .map(|p| (p, n.clone()))
        }));
        plan.next_inventory.reboot = crate::plan::inventory::RebootRequest::merged(
            plan.next_inventory.reboot.as_ref(),
            &boot,
            Some(commit.as_str()),
            &applied.txid,
            &paths,
        );
    }
    let reason = match &post.failure {
        None => match apply::commit(
            fs,
            state,
            &applied.txid,
            &mut plan.next_inventory,
            now,
            staged_floor,
            // A repair plan's entries differ from the inventory's only at
            // the files it planned.
            plan.contained_carried.as_ref().map(|c| &c.planned),
        ) {
            Ok(()) => {
                if marks.interrupted.remove(&commit).is_some() {
                    if let Err(e) = marks::save(state, marks) {
                        warn!("cannot update {}: {e:#}", state.path().display());
                    }
                }
                info!(commit = %short(&commit), txid = %applied.txid, "applied");
                publish_reboot_request(fs, &plan.next_inventory);
                return Ok(Report {
                    commit,
                    applied: Some(applied),
                    plan,
                    recovered: recovered.to_vec(),
                    skipped_bad: false,
                    post: Some(post),
                    quick: false,
                    waiting: None,
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
    // Until the restored state has passed its checks: a run that finds
    // this (the revert, or its checks, cut short by a kill or dpkg's lock)
    // checks it after recovery (`recovery::after_recovery`).
    marks.unchecked_revert = Some(marks::Unchecked {
        time: now,
        commit: commit.clone(),
    });
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
    } else if let Err(e) = marks::save(state, marks) {
        // Likely the full disk the record just failed on: the revert goes
        // on (a crash now leaves its restored state unchecked, as before).
        warn!("cannot note the revert in the marks: {e:#}");
    }
    // The transaction is not committed: the inventory is still the one it
    // started from.
    let already_applied = state
        .inventory()
        .is_ok_and(|i| i.commit.as_deref() == Some(commit.as_str()));
    let reverted = apply::revert(fs, state, &applied.txid).kind(Failure::Failed);
    let mut kept = Vec::new();
    let after = match reverted {
        Ok(k) => {
            kept = k;
            info!(txid = %applied.txid, "reverted; re-running unit actions and checks for the previous state");
            // The restored state answers to its own commit's checks, not
            // to the failed commit's.
            let checked = restored_checks(settings, state, Some((&commit, &plan.checks)));
            if let Err(e) = &checked {
                warn!("{e:#}");
            }
            plan.checks = checked.as_ref().map_or_else(|_| Vec::new(), Clone::clone);
            let again = rt.block_on(post::run(settings, &plan, post::Stage::Restored));
            // Not checked is not "no check failing".
            pass.checks_failing = checked
                .is_ok()
                .then(|| again.checks.iter().filter(|c| !c.ok).count());
            again.failure
        }
        // dpkg's lock held by another program (apt, unattended-upgrades)
        // while the packages were put back: the transaction stays open and
        // the next run's recovery finishes the revert. A wait, not a
        // broken previous state: halting here would need a person on every
        // host that ran its daily upgrade at the wrong moment.
        // Still a revert for the fleet (its bad mark, its failure count),
        // the history, the metrics and the notifications.
        Err(e) if crate::effects::packages::must_wait(&e.error) => {
            let waits = format!("{:#}", e.error);
            return Err(match reason {
                Ok(reason) => Error::new(
                    Failure::Failed,
                    Reverted {
                        commit,
                        reason,
                        kept,
                        waits: Some(waits),
                        unchanged: false,
                        already_applied,
                    },
                ),
                Err(why) => Error::new(
                    Failure::Failed,
                    anyhow!(
                        "commit {} was switched in and {why}; its revert waits: {waits} (the next run finishes it, then tries the commit again)",
                        short(&commit)
                    ),
                ),
            });
        }
        Err(e) => Some(format!("the revert itself failed: {}", e)),
    };
    marks.unchecked_revert = None;
    if let Some(revert_failure) = after {
        marks.halted = Some(marks::Halt {
            time: now,
            commit: Some(commit.clone()),
            reason: format!(
                "commit {} failed ({failed}) and after reverting it: {revert_failure}",
                short(&commit)
            ),
            lifted_by: None,
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
    // Checked (or not checkable): a crash from here on leaves nothing to
    // check again. Not durable in time, a later run only checks it again.
    if let Err(e) = marks::save(state, marks) {
        warn!("cannot update the marks: {e:#}");
    }
    match reason {
        Ok(reason) => Err(Error::new(
            Failure::Failed,
            Reverted {
                commit,
                reason,
                kept,
                waits: None,
                unchanged: false,
                already_applied,
            },
        )),
        Err(why) => Err(Error::new(
            Failure::Failed,
            anyhow!(
                "commit {} was switched in and {why}; the host was reverted to its previous state. The next run tries again",
                short(&commit)
            ),
        )),
    }
}

/// A new commit whose plan changes nothing on this host (it changes other
/// hosts' files, or only checks): it becomes this host's applied commit
/// once its health checks pass, in a commit record without a transaction.
///
/// It was never recorded: the inventory kept naming the older commit while
/// the quick-check record and the anti-rollback floor named the new one.
/// The fleet saw the host on the older commit (a wave waited for it
/// forever), a fleet-wide halt of the new commit rolled the host back past
/// the older one, and a check the new commit added never ran until some
/// file changed. A commit whose checks fail is marked bad, as one whose
/// transaction failed them is (nothing was written: nothing is reverted),
/// unless the applied commit's checks fail too in this same state: then
/// the host is sick, not the commit, which is left for the next run
/// (`fails_already`).
///
/// Only for a plan made by rendering (`plan.next_inventory` is the whole
/// next inventory), never for a quick-check hit's, which holds none: the
/// caller (`run::apply_phase`) is the full path's. (A quick-check record
/// names the inventory's commit since this was added: `QUICK_VERSION` 2.)
/// `history`: whether to add the history's entry (a rollback adds its
/// own).
pub(super) fn adopt_unchanged(
    pass: &mut Pass,
    report: &mut Report,
    history: bool,
) -> Result<(), Error> {
    let (commit, plan) = (report.commit.as_str(), &mut report.plan);
    let recorded = pass.state.inventory().kind(Failure::Failed)?;
    if recorded.commit.as_deref() == Some(commit) {
        return Ok(());
    }
    if pass.settings.run_checks && !plan.checks.is_empty() {
        info!(commit = %short(commit), "no file changes on this host: running the commit's checks");
        let (failure, failing) = run_checks(pass.settings, pass.rt, plan.checks.clone());
        // For the fleet's health report and the reboot gate, as a
        // transaction's checks are.
        pass.checks_failing = Some(failing);
        if let Some(reason) = failure {
            // Nothing changed: if the applied commit's own checks fail in
            // this same state, the host is unhealthy, not the commit (a
            // host back from a reboot, a service down). Marking the commit
            // bad would halt it fleet-wide for one sick host; it is not
            // recorded, and tried again by the next run.
            if let Some(applied) = recorded.commit.clone() {
                if let Some(why) =
                    fails_already(pass.settings, &pass.state, pass.rt, &applied, &plan.checks)
                {
                    return Err(Error::new(
                        Failure::Failed,
                        anyhow!(
                            "commit {} changes no file on this host, and its checks fail ({reason}); so do the checks of the applied commit {} ({why}): the host is unhealthy, not the commit. Not recorded: the next run tries it again",
                            short(commit),
                            short(&applied)
                        ),
                    ));
                }
            }
            let marks = &mut pass.marks;
            marks.bad.insert(
                commit.to_string(),
                marks::Mark {
                    time: pass.now,
                    reason: reason.clone(),
                },
            );
            marks::save(&pass.state, marks).kind(Failure::Failed)?;
            return Err(Error::new(
                Failure::Failed,
                Reverted {
                    commit: commit.to_string(),
                    reason,
                    kept: Vec::new(),
                    waits: None,
                    unchanged: true,
                    already_applied: false,
                },
            ));
        }
    }
    // The planned inventory (same files; their roles, actions and flags as
    // this commit declares them) under the last transaction's id, with the
    // reboot request that transaction left.
    let next = &mut plan.next_inventory;
    next.commit = Some(commit.to_string());
    next.txid = recorded.txid.clone();
    next.applied_at = pass.now;
    next.reboot = recorded.reboot.clone();
    // In the history too: a rollback's "previous good commit" and its
    // one-step limit read the history's applied commits. Before the
    // inventory: a kill between the two leaves an entry for a commit the
    // next run records again (and enters twice), never a recorded commit
    // the history lacks (the next run would find nothing to do).
    if history {
        use crate::effects::state::history::{Entry, Outcome};
        let entry = Entry {
            time: pass.now,
            outcome: Outcome::Applied,
            commit: Some(commit.to_string()),
            txid: None,
            created: 0,
            changed: 0,
            removed: 0,
            message: Some("no file changes on this host".to_string()),
        };
        if let Err(e) = pass.state.append_history(&entry) {
            warn!("cannot record history: {e:#}");
        }
    }
    crate::effects::failpoint::hit("sync.adopt").kind(Failure::Failed)?;
    pass.state.save_inventory(next).kind(Failure::Failed)?;
    info!(commit = %short(commit), "recorded as applied: it changes no file on this host");
    Ok(())
}

/// Whether the state on the host fails the checks of the commit
/// `applied` too (why, if it does): the same checks as `failed` fail
/// again by definition; others are run. Checks that cannot be read, or
/// none, say nothing against the host.
fn fails_already(
    settings: &crate::config::Settings,
    state: &crate::effects::state::StateDir,
    rt: &tokio::runtime::Handle,
    applied: &str,
    failed: &[crate::desired::spec::Check],
) -> Option<String> {
    let checks = super::checks_of_commit(settings, state, applied)
        .map_err(|e| {
            warn!(
                "cannot read the checks of the applied commit {}: {e:#}",
                short(applied)
            )
        })
        .ok()
        .filter(|c| !c.is_empty())?;
    if checks == failed {
        return Some("the same checks".to_string());
    }
    info!(commit = %short(applied), "running the applied commit's checks");
    run_checks(settings, rt, checks).0
}

/// Runs `checks`: why they failed (if they did), and how many failed.
fn run_checks(
    settings: &crate::config::Settings,
    rt: &tokio::runtime::Handle,
    checks: Vec<crate::desired::spec::Check>,
) -> (Option<String>, usize) {
    let plan = crate::plan::Plan {
        checks,
        ..Default::default()
    };
    let ran = rt.block_on(post::run(settings, &plan, post::Stage::Restored));
    let failing = ran.checks.iter().filter(|c| !c.ok).count();
    (ran.failure, failing)
}

/// The health checks of the state a revert restored: those the
/// configuration of the inventory's commit (the one the host is back at)
/// declares. Not the failed commit's: a commit that adds a check, or moves
/// one (a new port), would fail them in the restored state as surely as in
/// its own, and the host would be halted (exit 5) for a commit that was
/// already reverted and marked bad. None when nothing was applied before
/// (a first sync puts the host back as it was: nothing vouched for it).
/// An error says the restored state cannot be checked, and why.
/// `failed`: the failed commit and its checks, reused when the host is
/// back at that same commit (a drift repair's revert).
fn restored_checks(
    settings: &crate::config::Settings,
    state: &crate::effects::state::StateDir,
    failed: Option<(&str, &[crate::desired::spec::Check])>,
) -> anyhow::Result<Vec<crate::desired::spec::Check>> {
    if !settings.run_checks {
        return Ok(Vec::new());
    }
    let inventory = state.inventory()?;
    let Some(previous) = inventory.commit.as_deref() else {
        return Ok(Vec::new());
    };
    if let Some((_, checks)) = failed.filter(|(commit, _)| *commit == previous) {
        return Ok(checks.to_vec());
    }
    let not_checked = |e: anyhow::Error| {
        e.context(format!(
            "the restored state is not checked: cannot read the health checks of commit {}, which it is back at",
            short(previous)
        ))
    };
    crate::effects::failpoint::hit("sync.restored-checks").map_err(not_checked)?;
    super::checks_of_commit(settings, state, previous).map_err(not_checked)
}

/// Checks the state a revert restored that recovery finished (a crash
/// during the revert, or dpkg's lock that made it wait), as `deploy` checks
/// one it finished itself: `Some` with what failed. An unreadable commit is
/// a warning, as there.
pub(super) fn check_restored(
    settings: &crate::config::Settings,
    state: &crate::effects::state::StateDir,
    rt: &tokio::runtime::Handle,
) -> Option<String> {
    let checks = restored_checks(settings, state, None)
        .map_err(|e| warn!("{e:#}"))
        .ok()
        .filter(|c| !c.is_empty())?;
    info!("running the checks of the restored state");
    run_checks(settings, rt, checks).0
}

/// After a commit: writes `/run/reboot-required` (and `.pkgs`) if the
/// committed inventory holds a request of this boot. Never fails the run:
/// the request is in the inventory, and the next full sync writes it again.
pub(super) fn publish_reboot_request(fs: &RootFs, inv: &crate::plan::inventory::Inventory) -> bool {
    let boot = crate::effects::reboot::boot_id();
    let Some(request) = crate::effects::reboot::pending(inv, &boot) else {
        return false;
    };
    match crate::effects::reboot::publish(fs, request) {
        Ok(true) => {
            info!(
                files = %crate::effects::reboot::describe(request),
                "reboot required: wrote {} (driftless reboots by itself only with [fleet] reboot = true)",
                fs.path().join("run/reboot-required").display()
            );
        }
        Ok(false) => {}
        Err(e) => warn!(
            "a reboot is required ({}), but {e:#}; the next sync tries again",
            crate::effects::reboot::describe(request)
        ),
    }
    true
}

/// Every run that read the state (not a quick hit) makes sure a request
/// committed in this boot is in `/run` (a crash between the commit and
/// the write lost it), rewriting nothing that is already there.
/// `committed`: the inventory this run committed, if it did.
pub(super) fn keep_reboot_request(
    pass: &mut Pass,
    committed: Option<&crate::plan::inventory::Inventory>,
) {
    if let Some(inv) = committed {
        pass.reboot_pending = Some(publish_reboot_request(&pass.fs, inv));
        return;
    }
    match pass.state.inventory() {
        Ok(inv) => pass.reboot_pending = Some(publish_reboot_request(&pass.fs, &inv)),
        Err(e) => tracing::debug!("reboot request not checked: {e:#}"),
    }
}
